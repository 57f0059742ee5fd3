"""The end-to-end job behind experiments/quantize.py and experiments/eval_ppl.py.

FP perplexity (cached) -> calibration windows -> Hessians (cached, resumable) -> layer-by-layer
quantization (resumable) -> quantized perplexity -> metrics.json.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from quipjax.models.adapter import LLAMA
from quipjax.models.loaders import CheckpointSource, Tokenizer, load_model, open_checkpoint
from quipjax.pipeline import checkpoint as ckpt
from quipjax.pipeline import data, evaluate, hessians
from quipjax.pipeline import finetune_model as ftm
from quipjax.pipeline.finetune_model import FTSettings
from quipjax.pipeline.quantize_model import QuantSettings, build_quantized_model
from quipjax.sharding import DEFAULT_HESSIAN_SHARDS

__all__ = ["RunConfig", "quantize_model", "fp_perplexity", "checkpoint_perplexity", "tokenizer_from_ref"]

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: Optional[str]
    output_dir: str
    settings: QuantSettings
    devset_size: int = 64
    ctx_size: int = 2048
    eval_ctx_size: int = 2048
    eval_datasets: Sequence[str] = ("wiki", "c4")
    text_file: Optional[str] = None
    evaluate: bool = True
    dtype: str = "bfloat16"
    hessian_dir: Optional[str] = None
    batch_size: int = 1
    overwrite: bool = False
    ft: FTSettings = FTSettings()
    eval_before_e2e: bool = True
    mesh: Optional[str] = None            # "data:8", "data:2,model:4" (quipjax.sharding)
    hessian_shards: int = DEFAULT_HESSIAN_SHARDS    # accumulator slots of Hessian collection


def _bar(total, desc):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=True)


def _eval_sets(tokenizer, datasets, text_file, ctx):
    out = {}
    for ds in datasets:
        out[ds] = data.eval_windows(tokenizer, ds, ctx)
    if text_file:
        with open(text_file, encoding="utf-8") as f:
            text = f.read()
        out[os.path.basename(text_file)] = data.text_windows(tokenizer, text, ctx,
                                                              data.EVAL_WINDOWS, text_file)
    return out


def _ppl(model, windows, desc, mesh=None):
    bar = _bar(len(windows), desc)

    def progress(done, total, ppl):
        bar.n = done
        bar.set_postfix(ppl=f"{ppl:.3f}", refresh=False)
        bar.refresh()
    r = evaluate.perplexity(model, windows, progress=progress, mesh=mesh)
    bar.close()
    return r


def fp_perplexity(src: CheckpointSource, sets: dict, dtype: str, ctx: int, mesh=None) -> dict:
    """{dataset: {"ppl", "tokens"}} of the FP model, cached on disk by model, data and dtype
    (the mesh does not change the value)."""
    out, todo = {}, {}
    for name, w in sets.items():
        key = json.dumps({"model": src.fingerprint(), "windows": hashlib.sha256(w.tobytes()).hexdigest(),
                          "dtype": dtype}, sort_keys=True)
        path = os.path.join(data.cache_dir(), "fp_ppl_" + hashlib.sha256(key.encode()).hexdigest()[:20] + ".json")
        if os.path.exists(path):
            with open(path) as f:
                out[name] = json.load(f)
        else:
            todo[name] = (w, path)
    if todo:
        if mesh is None:
            model = load_model(src, DTYPES[dtype])
        else:
            from quipjax import sharding
            model = sharding.load_model_sharded(src, DTYPES[dtype], mesh)
        for name, (w, path) in todo.items():
            r = _ppl(model, w, f"FP ppl {name}", mesh)
            out[name] = {"ppl": r["ppl"], "tokens": r["tokens"]}
            with open(path + ".tmp", "w") as f:
                json.dump(out[name], f)
            os.replace(path + ".tmp", path)
    return out


def tokenizer_from_ref(ref: dict) -> Tokenizer:
    if not os.path.exists(ref["path"]):
        raise FileNotFoundError(f"the checkpoint's tokenizer comes from {ref['path']}, which is "
                                "missing: pass --model=<the source model> to read it from there")
    return open_checkpoint(ref["path"]).tokenizer


def checkpoint_perplexity(ckpt_dir: str, sets: dict, dtype: str, mesh=None) -> dict:
    meta = ckpt.read_meta(ckpt_dir)
    model = build_quantized_model(ckpt_dir, meta, DTYPES[dtype], mesh=mesh)
    return {name: {k: v for k, v in _ppl(model, w, f"quantized ppl {name}", mesh).items()
                   if k != "seconds"}
            for name, w in sets.items()}


def _settings_meta(cfg: RunConfig, src: CheckpointSource) -> dict:
    s = dataclasses.asdict(cfg.settings)
    return {"settings": s, "finetune": dataclasses.asdict(cfg.ft),
            "devset_size": cfg.devset_size, "ctx_size": cfg.ctx_size,
            "source": {"path": os.path.abspath(src.path), "kind": src.kind,
                       "fingerprint": src.fingerprint()},
            "hessian_dtype": cfg.dtype, "hessian_shards": cfg.hessian_shards}


def _only_e2e_differs(have: dict, want: dict) -> bool:
    def strip(m):
        m = dict(m)
        m["finetune"] = {k: v for k, v in (m.get("finetune") or {}).items()
                         if not k.startswith("e2e_")}
        return m
    h, w = strip(have), strip(want)
    return all(h.get(k) == v for k, v in w.items())


def quantize_model(cfg: RunConfig, log=print) -> dict:
    """Run the whole job; returns the metrics dict (also written to output_dir/metrics.json)."""
    t_start = time.perf_counter()
    seconds = {}
    src = open_checkpoint(cfg.model)
    spec = src.spec
    tok = src.tokenizer
    from quipjax import sharding
    mesh = sharding.parse_mesh(cfg.mesh)
    if cfg.hessian_shards < 1 or cfg.hessian_shards % sharding.num_devices(mesh):
        raise ValueError(f"hessian_shards ({cfg.hessian_shards}) must be a positive multiple of "
                         f"the number of devices ({sharding.num_devices(mesh)}); the Hessians "
                         "depend on it (not on the mesh): keep it fixed to compare runs")
    log(f"model {src.path}: {spec.num_layers} layers, hidden {spec.hidden_size}, "
        f"intermediate {spec.intermediate_size}, vocab {spec.vocab_size}; "
        f"{sharding.describe(mesh)}")
    out = cfg.output_dir
    want = _settings_meta(cfg, src)
    if os.path.exists(os.path.join(out, "quipjax.json")):
        have = ckpt.read_meta(out)
        same = all(have.get(k) == v for k, v in want.items())
        if not same and _only_e2e_differs(have, want):
            # the layers are still valid: redo just the end-to-end stage with the new settings
            log(f"end-to-end settings changed: discarding the end-to-end stage of {out}")
            ckpt.drop_e2e(out)
            same = True
        if not same:
            if not cfg.overwrite:
                raise ValueError(f"{out} holds a run with other settings; pass --overwrite to "
                                 "replace it, or choose another --output_dir")
            import shutil
            shutil.rmtree(out)
        else:
            log(f"resuming the run in {out}")
    meta = dict(want, model=spec.to_dict(), tokenizer=tok.ref, adapter=LLAMA.name,
                quantized_linears=LLAMA.linear_paths())
    ckpt.write_meta(out, meta)

    # 1. FP perplexity (cached)
    sets = {}
    metrics = {"ppl": {}, "tokens": {}}
    if cfg.evaluate:
        t = time.perf_counter()
        sets = _eval_sets(tok, cfg.eval_datasets, cfg.text_file, cfg.eval_ctx_size)
        fp = fp_perplexity(src, sets, cfg.dtype, cfg.eval_ctx_size, mesh)
        metrics["ppl"]["fp"] = {k: v["ppl"] for k, v in fp.items()}
        metrics["tokens"] = {k: v["tokens"] for k, v in fp.items()}
        for k, v in fp.items():
            log(f"FP perplexity {k}: {v['ppl']:.4f} ({v['tokens']} tokens)")
        seconds["fp_eval"] = time.perf_counter() - t

    # 2. calibration data and Hessians (cached, resumable)
    t = time.perf_counter()
    windows = data.calibration_windows(tok, cfg.devset_size, cfg.ctx_size, cfg.settings.seed)
    hkey = hashlib.sha256(json.dumps({"model": src.fingerprint(), "devset": cfg.devset_size,
                                      "ctx": cfg.ctx_size, "seed": cfg.settings.seed,
                                      "dtype": cfg.dtype, "hessian_shards": cfg.hessian_shards,
                                      "reduction": "slots-exact-v1"},
                                     sort_keys=True).encode()).hexdigest()[:16]
    hdir = cfg.hessian_dir or os.path.join(data.cache_dir(), "hessians", hkey)
    seconds["calibration_data"] = time.perf_counter() - t
    t = time.perf_counter()
    n_missing = sum(not os.path.exists(hessians.layer_file(hdir, i)) for i in range(spec.num_layers))
    if n_missing:
        log(f"collecting Hessians of {n_missing} layers over {len(windows)} windows of "
            f"{cfg.ctx_size} tokens into {hdir}")
        bar = _bar(spec.num_layers * -(-len(windows) // (cfg.batch_size
                                                         * sharding.num_devices(mesh))),
                   "Hessians")

        def hprog(layer, done, total):
            bar.n = layer * total + done
            bar.set_postfix(layer=layer, refresh=False)
            bar.refresh()
        hessians.collect_hessians(src, windows, hdir, dtype=DTYPES[cfg.dtype],
                                  batch=cfg.batch_size, progress=hprog, mesh=mesh,
                                  shards=cfg.hessian_shards)
        bar.close()
    else:
        log(f"reusing the Hessians in {hdir}")
    seconds["hessians"] = time.perf_counter() - t

    # 3. quantization, layer by layer (resumable)
    t = time.perf_counter()
    if not os.path.exists(os.path.join(out, "globals.json")):
        g = {"embed_tokens": src.tensor("model.embed_tokens.weight"),
             "norm": src.tensor("model.norm.weight")}
        if not spec.tie_embeddings:
            g["lm_head"] = src.tensor("lm_head.weight")
        ckpt.save_globals(out, g)
    ftc = cfg.ft
    ftc.check()
    ft_windows = None
    if ftc.epochs > 0:
        ft_windows = data.calibration_windows(tok, ftc.train_size + ftc.valid_size, ftc.ctx_size,
                                              cfg.settings.seed + 1)
    desc = f"quantize {cfg.settings.codebook}" + (" + in-block FT" if ftc.epochs else "")
    bar = _bar(spec.num_layers, desc)
    bar.update(sum(ckpt.layer_done(out, i) for i in range(spec.num_layers)))

    def qprog(i, info):
        bar.set_postfix(refresh=False, layer=i, **{k: f"{v:.4f}" for k, v in info["proxy"].items()})
        bar.update(1)
    ftm.quantize_layers(src, out, hdir, cfg.settings, ftc, ft_windows, progress=qprog,
                        log=(lambda m: bar.write(m)) if ftc.epochs else None, mesh=mesh)
    bar.close()
    seconds["quantize"] = time.perf_counter() - t

    # 4. end-to-end fine-tuning (optional), then the quantized perplexity
    old = {}
    if os.path.exists(os.path.join(out, "metrics.json")):
        with open(os.path.join(out, "metrics.json")) as f:      # what an earlier run measured
            old = json.load(f)
    before = old.get("ppl", {}).get("before_e2e")
    if ftc.e2e_epochs > 0 and before is not None and set(before) == set(sets):
        metrics["ppl"]["before_e2e"] = before          # the layers are unchanged since then
    if ftc.e2e_epochs > 0 and not ckpt.e2e_done(out):
        if cfg.evaluate and cfg.eval_before_e2e and "before_e2e" not in metrics["ppl"]:
            _measure(out, sets, cfg.dtype, metrics, seconds, "before_e2e", log,
                     "perplexity before end-to-end tuning", mesh)
            _save_metrics(out, metrics)       # kept if the e2e stage is interrupted
        t = time.perf_counter()
        e2e_windows = data.calibration_windows(tok, ftc.e2e_train_size + ftc.e2e_valid_size,
                                               ftc.e2e_ctx_size, cfg.settings.seed + 2)
        ftm.finetune_e2e(out, src, ftc, e2e_windows, log=log, mesh=mesh)
        seconds["e2e_finetune"] = time.perf_counter() - t
    if ftc.epochs > 0 or ftc.e2e_epochs > 0:
        from quipjax.pipeline import curves
        curves.write_curves(out, spec.num_layers)

    # bits, proxy summary from the saved layers
    code_bits = over_bits = weights = 0
    proxy_all = {}
    e2e = ckpt.load_e2e(out)
    for i in range(spec.num_layers):
        info = ckpt.load_layer(out, i)[2]
        groups, _ = ckpt.load_layer_tuned(out, i, e2e)     # e2e-tuned SU is real: count as stored
        for name, g in groups.items():
            m, n = g.ql.shape
            weights += m * n
            code_bits += g.code_bits()
            over_bits += g.overhead_bits()
            proxy_all.setdefault(name, []).append(info["proxy"][name])
    metrics["bits_per_weight"] = (code_bits + over_bits) / weights
    metrics["bits_breakdown"] = {"codes": code_bits / weights, "overhead": over_bits / weights}
    metrics["proxy_loss_mean"] = {k: float(np.mean(v)) for k, v in proxy_all.items()}
    log(f"bits per weight (linears, all overheads): {metrics['bits_per_weight']:.4f}")

    if cfg.evaluate:
        _measure(out, sets, cfg.dtype, metrics, seconds, "quantized", log, "quantized perplexity",
                 mesh)
    seconds["total"] = time.perf_counter() - t_start
    metrics["seconds"] = seconds
    metrics["settings"] = dict(want, eval_ctx_size=cfg.eval_ctx_size, dtype=cfg.dtype,
                               mesh=sharding.describe(mesh))
    _save_metrics(out, metrics)
    return metrics


def _measure(out, sets, dtype, metrics, seconds, name, log, what, mesh=None):
    """Perplexity of the checkpoint in `out` on every set, into metrics["ppl"][name]."""
    t = time.perf_counter()
    q = checkpoint_perplexity(out, sets, dtype, mesh)
    metrics["ppl"][name] = {k: v["ppl"] for k, v in q.items()}
    for k, v in q.items():
        log(f"{what} {k}: {v['ppl']:.4f} ({v['tokens']} tokens)")
    seconds[f"{name}_eval"] = time.perf_counter() - t


def _save_metrics(out, metrics):
    with open(os.path.join(out, "metrics.json") + ".tmp", "w") as f:
        json.dump(metrics, f, indent=1)
    os.replace(os.path.join(out, "metrics.json") + ".tmp", os.path.join(out, "metrics.json"))
