"""The job behind experiments/quantize.py, as a sequence of stage functions.

    metrics = quantize_model(RunConfig(model=..., output_dir=...))

open_job (output directory, resume) -> fp_stage (FP perplexity, cached) -> hessian_stage
(calibration windows, Hessians: cached, resumable) -> quantize_stage (layer by layer with
optional in-block fine-tuning: resumable) -> e2e_stage (optional end-to-end fine-tuning) ->
bits_stage -> the quantized perplexity -> metrics.json. Each stage records its seconds.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import sys
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from quipjax.distributed import Placement, parse_mesh, processes
from quipjax.models.adapter import ModelAdapter
from quipjax.models.families import adapter_of
from quipjax.rule import rules_to_json
from quipjax.models.family import global_names
from quipjax.models.loaders import (CheckpointSource, Tokenizer, load_model_streamed,
                                     open_checkpoint)
from quipjax.pipeline import checkpoint as ckpt
from quipjax.pipeline import calibration, curves, data, evaluate, hessians, interrupt, outdir
from quipjax.pipeline.build import build_model_streamed
from quipjax.pipeline.peak_memory import PeakRSS, release_freed
from quipjax.pipeline.quantization import (SourceLayers, check_model, group_settings,
                                           quantize_layers)
from quipjax.pipeline.settings import RunConfig
from quipjax.pipeline.tuning import ActivationWindows, BlockTuner, finetune_e2e

__all__ = ["Job", "quantize_model", "open_job", "check_processes", "fp_stage", "hessian_stage", "quantize_stage",
           "e2e_stage", "bits_stage", "hessian_key", "measure", "fp_perplexity", "checkpoint_perplexity",
           "tokenizer_from_ref", "eval_sets", "perplexity_bar", "progress_bar"]


def progress_bar(total, desc):
    """A tqdm bar on stderr (process 0's only, in a run of several processes); each step
    raises a Ctrl-C that a library swallowed (`interrupt.check`)."""
    from tqdm import tqdm

    class Bar(tqdm):
        def update(self, n=1):
            interrupt.check()
            return super().update(n)

        def refresh(self, *a, **k):
            interrupt.check()
            return super().refresh(*a, **k)

        def log(self, msg):
            """A line above the bar (none from a disabled bar: processes other than 0)."""
            if not self.disable:
                self.write(msg)
    return Bar(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=True,
               disable=not processes.is_writer())


def perplexity_bar(model, windows, desc: str, placement: Placement = Placement(),
                   stream=None) -> dict:
    """`evaluate.perplexity` with a progress bar showing the running perplexity (with
    `stream`, the bar counts window-blocks)."""
    evaluate.check_windows(np.asarray(windows), model.spec.vocab_size)   # before the bar shows
    bar = progress_bar(len(windows) * (1 if stream is None else len(stream)), desc)

    def progress(done, total, ppl):
        bar.n = done
        if ppl is not None:
            bar.set_postfix(ppl=f"{ppl:.3f}", refresh=False)
        bar.refresh()
    try:
        return evaluate.perplexity(model, windows, progress=progress, placement=placement,
                                   stream=stream)
    finally:                            # closed before an error or Ctrl-C message is printed
        bar.close()


def eval_sets(tokenizer, datasets, text_file, ctx) -> dict:
    """{name: windows (k, ctx) int32} of the protocol's datasets and an optional text file."""
    out = {ds: data.eval_windows(tokenizer, ds, ctx) for ds in datasets}
    if text_file:
        text = data.read_text(text_file)
        out[os.path.basename(text_file)] = data.text_windows(tokenizer, text, ctx,
                                                              data.EVAL_WINDOWS, text_file)
    return out


def _cache_path(prefix: str, key: dict, suffix: str) -> str:
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return os.path.join(data.cache_dir(), prefix + h[:20] + suffix)


def fp_perplexity(src: CheckpointSource, sets: dict, dtype: str,
                  placement: Placement = Placement()) -> dict:
    """{dataset: {"ppl", "tokens"}} of the FP model, cached on disk by model, data and dtype
    (the mesh does not change the value)."""
    out, todo = {}, {}
    for name, w in sets.items():
        path = _cache_path("fp_ppl_", {"model": src.fingerprint(), "dtype": dtype,
                                       "windows": hashlib.sha256(w.tobytes()).hexdigest()}, ".json")
        if os.path.exists(path):
            with open(path) as f:
                out[name] = json.load(f)
        else:
            todo[name] = (w, path)
    if todo:
        # block by block: the whole FP model is never in memory
        model, stream = load_model_streamed(src, jnp.dtype(dtype), placement=placement)
        for name, (w, path) in todo.items():
            r = perplexity_bar(model, w, f"FP ppl {name}", placement, stream)
            out[name] = {"ppl": r["ppl"], "tokens": r["tokens"]}
            if processes.is_writer():
                _write_json(path, out[name])
    return out


def tokenizer_from_ref(ref: dict) -> Tokenizer:
    """The tokenizer a checkpoint records (`meta["tokenizer"]`)."""
    if not os.path.exists(ref["path"]):
        raise FileNotFoundError(f"the checkpoint's tokenizer comes from {ref['path']}, which is "
                                "missing: pass --model=<the source model> to read it from there")
    return open_checkpoint(ref["path"]).tokenizer


def checkpoint_perplexity(ckpt_dir: str, sets: dict, dtype: str,
                          placement: Placement = Placement()) -> dict:
    """{dataset: {"ppl", "tokens"}} of a checkpoint (dequantized weights of `dtype`, built
    one block at a time)."""
    model, stream = build_model_streamed(ckpt_dir, dtype=jnp.dtype(dtype), placement=placement)
    out = {}
    for name, w in sets.items():
        r = perplexity_bar(model, w, f"quantized ppl {name}", placement, stream)
        out[name] = {"ppl": r["ppl"], "tokens": r["tokens"]}
    return out


def _write_json(path: str, obj, indent=None) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=indent)
    os.replace(path + ".tmp", path)


# ------------------------------------------------------------------------------- the job

STAGES_FILE = "stages.jsonl"     # one line per finished stage of every invocation


@dataclasses.dataclass
class Job:
    """A run in progress: its config, source, placement, output and what it measured."""

    cfg: RunConfig
    src: CheckpointSource
    placement: Placement
    log: Callable
    want: dict                       # the run's identity (compared on resume)
    metrics: dict = dataclasses.field(default_factory=lambda: {"ppl": {}, "tokens": {}})
    seconds: dict = dataclasses.field(default_factory=dict)
    peak_rss_gb: dict = dataclasses.field(default_factory=dict)    # per stage, this process
    sets: dict = dataclasses.field(default_factory=dict)
    hessian_dir: Optional[str] = None
    calibration: Optional[calibration.CalibrationPlan] = None   # the calibration windows
    lock: Optional[outdir.FileLock] = None     # of the output directory, held while it runs
    #                                            (by process 0 of a run of several processes)
    rules: tuple = ()                # --rules, before the family's own
    adapter: Optional[ModelAdapter] = None     # the linear groups (from the rules)
    kw: Optional[dict] = None                  # {group: quantize settings}

    @property
    def out(self) -> str:
        return self.cfg.output_dir

    @contextlib.contextmanager
    def timed(self, name: str):
        """Time a stage into `seconds` and its peak RSS into `peak_rss_gb` (`PeakRSS`); a
        finished stage is also appended to output_dir/stages.jsonl, which keeps the stages of
        every invocation of a resumed run (metrics.json has the last invocation's)."""
        t, started = time.perf_counter(), time.strftime("%Y-%m-%dT%H:%M:%S")
        with PeakRSS() as peak:
            yield
        self.seconds[name] = time.perf_counter() - t
        self.peak_rss_gb[name] = round(peak.gb, 3)
        if processes.is_writer() and os.path.isdir(self.out):
            with open(os.path.join(self.out, STAGES_FILE), "a") as f:
                f.write(json.dumps({"stage": name, "started": started,
                                    "seconds": round(self.seconds[name], 3),
                                    "peak_rss_gb": self.peak_rss_gb[name]}) + "\n")


def _identity(cfg: RunConfig, src: CheckpointSource, calib: dict) -> dict:
    """What a run's results depend on: a resumed run must agree on all of it. The source is
    identified by the contents of its weights, configuration and tokenizer (not by where it is
    or when its files were touched), the calibration text likewise (`CalibrationPlan.identity`)."""
    ident = {"settings": cfg.settings.identity(), "finetune": cfg.finetune_meta(),
             "devset_size": cfg.devset_size, "ctx_size": cfg.ctx_size, "calibration": calib,
             "source": {"kind": src.kind, "content": src.fingerprint()},
             "hessian_dtype": cfg.dtype, "hessian_shards": cfg.hessian_shards,
             "hessian_batch": cfg.batch_size}
    rules = cfg.user_rules()
    if rules:               # only with --rules: runs without them keep their identity
        ident["rules"] = rules_to_json(rules)
    return ident


# identity entries checkpoints of earlier releases lack, and the value they ran with
_IDENTITY_DEFAULTS = {"hessian_batch": 1, "calibration": {"source": "wiki"}}
# identity entries present only when set (a run with them differs from one without)
_OPTIONAL_IDENTITY = ("rules",)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def identity_diff(have: dict, want: dict, ignore_e2e: bool = False) -> list:
    """["name: old -> new", ...] of the identity entries of `want` that `have` (a checkpoint's
    quipjax.json) records differently; with ignore_e2e, the end-to-end settings are skipped."""
    keys = set(want) | (set(_OPTIONAL_IDENTITY) & set(have))
    h = _flat({k: have.get(k, _IDENTITY_DEFAULTS.get(k)) for k in keys})
    w = _flat(want)
    diff = []
    for k in sorted(set(h) | set(w)):
        if ignore_e2e and k.startswith("finetune.e2e_"):
            continue
        if h.get(k) != w.get(k):
            diff.append(f"{k}: {h.get(k)!r} -> {w.get(k)!r}")
    return diff


def check_processes(cfg: RunConfig, placement: Placement) -> None:
    """A run of several processes needs a mesh over every process's devices: a clear error
    before any work."""
    if processes.count() > 1 and placement.mesh is None:
        raise ValueError(f"a run of {processes.count()} processes needs --mesh over all their "
                         f"devices (e.g. --mesh=data:{len(jax.devices())})")


def open_job(cfg: RunConfig, log=print) -> Job:
    """Check the settings and the model, open the source, then claim the output directory
    (lock, ownership) and resume or start it. Nothing is written before the checks pass."""
    cfg.check()
    src = open_checkpoint(cfg.model)
    rules = cfg.user_rules()
    try:
        adapter = adapter_of(src.spec, rules)
    except ValueError as e:
        raise ValueError(f"--rules={cfg.rules}: {e}") from None
    kw = group_settings(cfg.settings, adapter, rules)
    check_model(src.spec, cfg.settings.codebook, adapter, kw)
    placement = Placement(parse_mesh(cfg.mesh))
    check_processes(cfg, placement)
    if cfg.hessian_shards % placement.devices:
        raise ValueError(f"hessian_shards ({cfg.hessian_shards}) must be a positive multiple of "
                         f"the number of devices ({placement.devices}); the Hessians depend on it "
                         "(not on the mesh): keep it fixed to compare runs")
    src.tokenizer                       # a missing or broken tokenizer fails here, not later
    if cfg.text_file:
        data.read_text(cfg.text_file)
    spec = src.spec
    log(f"model {src.path} ({spec.model_type}): {spec.num_layers} layers, hidden "
        f"{spec.hidden_size}, intermediate {spec.intermediate_size}, vocab {spec.vocab_size}; "
        f"{len(adapter.groups)} linear groups per layer; {placement.describe()}")
    out = cfg.output_dir
    foreign = outdir.foreign_entries(out)
    if foreign and not os.path.exists(os.path.join(out, "quipjax.json")):
        raise ValueError(f"{out} is not empty and is not a quipjax run (it holds "
                         f"{', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}): "
                         "choose a new or empty --output_dir")
    t = time.perf_counter()             # the text must hold the windows asked for: check now
    plan = calibration.make_plan(src.tokenizer, cfg.calibration, calibration.requests(cfg),
                                 cfg.settings.seed)
    job = Job(cfg, src, placement, log, _identity(cfg, src, plan.identity), calibration=plan,
              rules=rules, adapter=adapter, kw=kw)
    job.seconds["calibration_plan"] = time.perf_counter() - t
    job.metrics["calibration"] = plan.stats
    processes.barrier("open_job: checked")     # every process sees the directory as it was
    if processes.is_writer():
        job.lock = outdir.FileLock(out, f"the output directory {out}").acquire()
        try:
            _resume_or_start(job)
        except BaseException:
            job.lock.release()
            raise
    processes.barrier("open_job: started")
    return job


def _resume_or_start(job: Job) -> None:
    """Compare the run in the output directory (if any) with this one: resume it, redo only
    its end-to-end stage, or (--overwrite) replace what quipjax wrote; then write the meta."""
    cfg, out, src, log = job.cfg, job.out, job.src, job.log
    if os.path.exists(os.path.join(out, "quipjax.json")):
        have = ckpt.read_meta(out)
        diff = identity_diff(have, job.want)
        if diff and not identity_diff(have, job.want, ignore_e2e=True):
            # the layers are still valid: redo just the end-to-end stage with the new settings
            log(f"end-to-end settings changed: discarding the end-to-end stage of {out}")
            ckpt.drop_e2e(out)
            diff = []
        if diff and not cfg.overwrite:
            raise ValueError(f"{out} holds a run with other settings ({'; '.join(diff)}): pass "
                             "--overwrite to replace it, or choose another --output_dir")
        if diff:
            log(f"--overwrite: replacing the run in {out} ({'; '.join(diff)})")
            outdir.remove_owned(out)
        else:
            log(f"resuming the run in {out}")
    ckpt.write_meta(out, dict(job.want, model=src.spec.to_dict(), tokenizer=src.tokenizer.ref,
                              adapter=job.adapter.name,
                              quantized_linears=job.adapter.linear_paths()))


def fp_stage(job: Job) -> None:
    """The evaluation windows and the FP perplexity (cached)."""
    cfg = job.cfg
    with job.timed("fp_eval"):
        job.sets = eval_sets(job.src.tokenizer, cfg.eval_datasets, cfg.text_file,
                             cfg.eval_ctx_size)
        fp = fp_perplexity(job.src, job.sets, cfg.dtype, job.placement)
    job.metrics["ppl"]["fp"] = {k: v["ppl"] for k, v in fp.items()}
    job.metrics["tokens"] = {k: v["tokens"] for k, v in fp.items()}
    for k, v in fp.items():
        job.log(f"FP perplexity {k}: {v['ppl']:.4f} ({v['tokens']} tokens)")


def hessian_key(job: Job) -> dict:
    """What the Hessians depend on: the key of their cache entry."""
    cfg = job.cfg
    key = {"model": job.src.fingerprint(), "devset": cfg.devset_size, "ctx": cfg.ctx_size,
           "seed": cfg.settings.seed, "dtype": cfg.dtype, "hessian_shards": cfg.hessian_shards,
           "reduction": "slots-exact-v1"}
    if job.calibration.kind != "wiki":   # wiki keeps the key (and caches) of earlier releases
        key["calibration"] = job.calibration.identity
    if cfg.batch_size != 1:     # batch 1 keeps the key (and the caches) of earlier releases
        key["batch"] = cfg.batch_size
    if job.rules:               # other groups, other Hessians (the family's keep the key)
        key["groups"] = [[g.name, list(g.members)] for g in job.adapter.groups]
    return key


def hessian_stage(job: Job) -> str:
    """Calibration windows and the Hessians of every layer (cached by model and calibration
    settings, batch size included; resumable). Returns the Hessian directory."""
    cfg, src = job.cfg, job.src
    L = src.spec.num_layers
    with job.timed("calibration_data"):
        windows = job.calibration.windows("hessian")
        evaluate.check_windows(windows, src.spec.vocab_size)
        hkey = hashlib.sha256(json.dumps(hessian_key(job), sort_keys=True).encode()).hexdigest()[:16]
        hdir = cfg.hessian_dir or os.path.join(data.cache_dir(), "hessians", hkey)
    with job.timed("hessians"):
        def missing():
            return sum(not os.path.exists(hessians.layer_file(hdir, i)) for i in range(L))
        if not missing():
            job.log(f"reusing the Hessians in {hdir}")
            return hdir
        # one collector per cache entry: a second run with the same calibration waits for it
        lock = (outdir.FileLock(hdir, f"the Hessian cache {hdir}").acquire(wait=True, log=job.log)
                if processes.is_writer() else None)
        processes.barrier("hessians: locked")
        try:
            _collect(job, windows, hdir, missing())
        finally:
            if lock is not None:
                lock.release()
    return hdir


def _collect(job: Job, windows, hdir: str, n_missing: int) -> None:
    """Collect the missing Hessians of hdir (the caller holds its lock)."""
    cfg, L = job.cfg, job.src.spec.num_layers
    if not n_missing:
        job.log(f"reusing the Hessians in {hdir} (collected by another run)")
        return
    job.log(f"collecting Hessians of {n_missing} layers over {len(windows)} windows of "
            f"{cfg.ctx_size} tokens into {hdir}")
    bar = progress_bar(L * -(-len(windows) // (cfg.batch_size * job.placement.devices)),
                       "Hessians")

    def progress(layer, done, total):
        bar.n = layer * total + done
        bar.set_postfix(layer=layer, refresh=False)
        bar.refresh()
    try:
        hessians.collect_hessians(job.src, windows, hdir, dtype=jnp.dtype(cfg.dtype),
                                  batch=cfg.batch_size, progress=progress,
                                  placement=job.placement, shards=cfg.hessian_shards,
                                  log=bar.log, adapter=job.adapter)
    finally:
        bar.close()


def quantize_stage(job: Job, hdir: str) -> None:
    """The globals, then every unfinished layer (with in-block fine-tuning when asked)."""
    cfg, src, out = job.cfg, job.src, job.out
    L = src.spec.num_layers
    with job.timed("quantize"):
        if not os.path.exists(os.path.join(out, "globals.json")) and processes.is_writer():
            g = {ckpt.GLOBAL_NAMES[p]: src.tensor(n) for p, n in global_names(src.spec).items()}
            ckpt.save_globals(out, g)
        processes.barrier("quantize: globals")
        tuning = cfg.ft.epochs > 0
        bar = progress_bar(L, f"quantize {cfg.settings.codebook}" + (" + in-block FT" if tuning else ""))
        try:
            bar.update(sum(ckpt.layer_done(out, i) for i in range(L)))
            hook = SourceLayers(src, job.placement, job.adapter)
            if tuning:
                windows = job.calibration.windows("ft")
                acts = ActivationWindows(src, processes.local_dir(os.path.join(out, "ft_acts")),
                                         cfg.ft, cfg.tune_dtype,
                                         windows, seed=cfg.settings.seed, placement=job.placement)
                hook = BlockTuner(cfg.ft, cfg.tune_dtype, acts, seed=cfg.settings.seed,
                                  placement=job.placement, log=bar.log,
                                  adapter=job.adapter)

            def progress(i, info):
                bar.set_postfix(refresh=False, layer=i,
                                **{k: f"{v:.4f}" for k, v in info["proxy"].items()})
                bar.update(1)
            quantize_layers(out, hdir, cfg.settings, hook, range(L), progress=progress,
                            adapter=job.adapter, kw=job.kw)
        finally:
            bar.close()


def e2e_stage(job: Job) -> None:
    """End-to-end fine-tuning when asked (and not done), after measuring the perplexity
    before it; then the fine-tuning curves."""
    cfg, out = job.cfg, job.out
    ppl = job.metrics["ppl"]
    if cfg.e2e.epochs > 0:
        old = {}
        if os.path.exists(os.path.join(out, "metrics.json")):
            with open(os.path.join(out, "metrics.json")) as f:   # what an earlier run measured
                old = json.load(f)
        before = old.get("ppl", {}).get("before_e2e")
        if before is not None and set(before) == set(job.sets):
            ppl["before_e2e"] = before                # the layers are unchanged since then
    if cfg.e2e.epochs > 0 and not ckpt.e2e_done(out):
        if cfg.evaluate and cfg.eval_before_e2e and "before_e2e" not in ppl:
            measure(job, "before_e2e", "perplexity before end-to-end tuning")
            if processes.is_writer():                   # kept if e2e dies
                _write_json(os.path.join(out, "metrics.json"), job.metrics, 1)
        with job.timed("e2e_finetune"):
            windows = job.calibration.windows("e2e")
            finetune_e2e(out, job.src, cfg.e2e, cfg.tune_dtype, windows,
                         placement=job.placement, log=job.log, adapter=job.adapter)
        release_freed()      # the next stage's peak would start from the tuning's heap
    if (cfg.ft.epochs > 0 or cfg.e2e.epochs > 0) and processes.is_writer():
        curves.write_curves(out, job.src.spec.num_layers)


def bits_stage(job: Job) -> None:
    """Bits per weight of the quantized linears (`QuantizedGroup.bits`: codes, SU, SV, fuse
    scales as stored), bits per parameter of the whole checkpoint (embeddings, head and norms
    as stored, float32), and the mean proxy loss of each group."""
    reader = ckpt.Reader(job.out)
    lin_bits, weights, other_bits, other_params = 0, 0, 0, 0
    breakdown, proxy = {}, {}
    for i in range(reader.spec.num_layers):
        info = reader.info(i)
        groups, norms = reader.layer(i)          # e2e-tuned SU is real: count as stored
        for name, g in groups.items():
            m, n = g.ql.shape
            weights += m * n
            for k, b in g.bits().items():
                breakdown[k] = breakdown.get(k, 0) + b
                lin_bits += b
            proxy.setdefault(name, []).append(info["proxy"][name])
        for v in norms.values():
            other_bits += 32 * np.size(v)
            other_params += np.size(v)
    for v in reader.globals().values():
        other_bits += 32 * np.size(v)
        other_params += np.size(v)
    m = job.metrics
    m["bits_per_weight"] = lin_bits / weights
    m["bits_breakdown"] = {"codes": breakdown["codes"] / weights,
                           "overhead": (lin_bits - breakdown["codes"]) / weights}
    m["bits_per_parameter_checkpoint"] = (lin_bits + other_bits) / (weights + other_params)
    m["proxy_loss_mean"] = {k: float(np.mean(v)) for k, v in proxy.items()}
    job.log(f"bits per weight (linears, all overheads): {m['bits_per_weight']:.4f}; whole "
            f"checkpoint per parameter: {m['bits_per_parameter_checkpoint']:.4f}")


def measure(job: Job, name: str, what: str) -> None:
    """Perplexity of the checkpoint on every set, into metrics["ppl"][name]."""
    with job.timed(f"{name}_eval"):
        q = checkpoint_perplexity(job.out, job.sets, job.cfg.dtype, job.placement)
    job.metrics["ppl"][name] = {k: v["ppl"] for k, v in q.items()}
    for k, v in q.items():
        job.log(f"{what} {k}: {v['ppl']:.4f} ({v['tokens']} tokens)")


def quantize_model(cfg: RunConfig, log=print) -> dict:
    """Run the whole job; returns the metrics dict (also written to output_dir/metrics.json).
    In a run of several processes (`processes.initialize`) every process calls it; process 0
    logs, shows progress and writes files."""
    t_start = time.perf_counter()
    job = open_job(cfg, log if processes.is_writer() else _quiet)
    try:
        return _run(job, t_start)
    finally:
        if job.lock is not None:
            job.lock.release()


def _quiet(*args, **kwargs) -> None:
    """The log of processes other than 0."""


def _run(job: Job, t_start: float) -> dict:
    cfg = job.cfg
    if cfg.evaluate:
        fp_stage(job)
    hdir = hessian_stage(job)
    quantize_stage(job, hdir)
    e2e_stage(job)
    bits_stage(job)
    if cfg.evaluate:
        measure(job, "quantized", "quantized perplexity")
    job.seconds["total"] = time.perf_counter() - t_start
    job.metrics["seconds"] = job.seconds
    job.metrics["peak_rss_gb"] = job.peak_rss_gb
    job.metrics["settings"] = dict(job.want, eval_ctx_size=cfg.eval_ctx_size, dtype=cfg.dtype,
                                   mesh=job.placement.describe())
    if processes.count() > 1:
        job.metrics["settings"]["processes"] = processes.count()
    if processes.is_writer():
        _write_json(os.path.join(cfg.output_dir, "metrics.json"), job.metrics, 1)
    processes.barrier("run: done")
    return job.metrics
