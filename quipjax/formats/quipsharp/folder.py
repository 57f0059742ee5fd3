"""quip-sharp model folders: import an official Hugging Face folder into a quipjax checkpoint,
export a quipjax checkpoint as one (`experiments/convert.py`).

A Hugging Face folder of the official format (`quantize_llama/hfize_llama.py`, model
`model/llama.py`): config.json = a LlamaConfig plus `quip_params`; safetensors with, per
decoder layer, `model.layers.{i}.self_attn.qkv_proj.*` (fused q, k, v),
`self_attn.o_proj.*`, `mlp.upgate_proj.*` (fused **up, gate**: in that order) and
`mlp.down_proj.*`, the two RMSNorm weights, and `model.embed_tokens.weight`,
`model.norm.weight`, `lm_head.weight` (absent when tied); all floating tensors float16.
The layer tensors themselves are `quipjax.formats.quipsharp.packing`'s business.

    import_folder("Llama-2-7b-E8P-2Bit", "runs/llama7b_e8p")    # a whole model -> quipjax
    export_checkpoint("runs/smollm2_2bit", "smollm2_e8p_hf")    # quipjax -> official folder
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Callable, Optional

import jax.numpy as jnp
import numpy as np

from quipjax import codebooks as _codebooks
from quipjax.formats.quipsharp.packing import (CODEBOOK_IDS, CODEBOOK_VERSIONS, CODESZ, MODEL_VERSION,
                                               PACKSZ, as_float32, check_shape, check_transforms,
                                               codebook_name, from_quantized_linear,
                                               reference_decode, reference_dequantize,
                                               to_quantized_linear)
from quipjax.group import QuantizedGroup
from quipjax.models.adapter import LLAMA
from quipjax.models.llama import LlamaSpec
from quipjax.models.loaders import files_fingerprint, read_config_json, safetensors_index
from quipjax.pipeline import checkpoint as ckpt
from quipjax.pipeline.build import build_model

__all__ = ["OFFICIAL_MODULES", "quip_params", "official_config", "OfficialFolder",
           "import_folder", "export_checkpoint", "checkpoint_logits"]

# the official module of each linear group of the Llama adapter (whose members are in the
# official row order: q, k, v and up, gate)
OFFICIAL_MODULES = {"qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj",
                    "up": "mlp.upgate_proj", "down": "mlp.down_proj"}
_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")


def quip_params(codebook) -> dict:
    """The config.json `quip_params` of the official format for a codebook."""
    name = codebook_name(codebook)
    return {"codebook": name, "codebook_version": CODEBOOK_VERSIONS[name], "codesz": CODESZ,
            "idx_dtype": "torch.int64", "lora_rank": 0, "model_version": MODEL_VERSION,
            "packsz": PACKSZ[name], "rescale_WH": False, "resid_scale_override": -1}


def official_config(spec, codebook, *, name_or_path: str = "", torch_dtype: str = "float16",
                    extra: Optional[dict] = None) -> dict:
    """config.json of the official format (a LlamaConfig plus quip_params) for a LlamaSpec."""
    _check_spec(spec)
    rope = None
    if spec.rope_scaling:
        sc = dict(spec.rope_scaling)
        rope = {"type": sc.get("rope_type", sc.get("type")), "factor": sc["factor"]}
    cfg = {
        "_name_or_path": name_or_path,
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": spec.bos_token_id,
        "eos_token_id": spec.eos_token_id,
        "hidden_act": "silu",
        "hidden_size": spec.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": spec.intermediate_size,
        "max_position_embeddings": spec.max_position,
        "model_type": "llama",
        "num_attention_heads": spec.num_heads,
        "num_hidden_layers": spec.num_layers,
        "num_key_value_heads": spec.num_kv_heads,
        "pretraining_tp": 1,
        "quip_params": quip_params(codebook),
        "rms_norm_eps": _short(spec.rms_eps),
        "rope_scaling": rope,
        "rope_theta": _short(spec.rope_theta),
        "tie_word_embeddings": spec.tie_embeddings,
        "torch_dtype": torch_dtype,
        "transformers_version": "4.40.1",      # the official requirements.txt
        "use_cache": True,
        "vocab_size": spec.vocab_size,
    }
    if extra:
        cfg.update(extra)
    return cfg


def _short(x: float) -> float:
    """The shortest decimal of a float32 value (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(x)))


def _check_spec(spec) -> None:
    """The architecture limits of the official model (model/llama.py)."""
    if spec.attention_bias or spec.mlp_bias:
        raise ValueError("the official quantized Llama has no biases; this model has "
                         f"attention_bias={spec.attention_bias}, mlp_bias={spec.mlp_bias}")
    if spec.head_dim * spec.num_heads != spec.hidden_size:
        raise ValueError(f"the official model uses head_dim = hidden_size / num_heads; this model "
                         f"has head_dim {spec.head_dim} x {spec.num_heads} heads != hidden "
                         f"{spec.hidden_size}")
    if spec.rope_scaling:
        kind = dict(spec.rope_scaling).get("rope_type", dict(spec.rope_scaling).get("type"))
        if kind not in ("linear", "dynamic"):
            raise ValueError(f"RoPE scaling {kind!r}: the official model supports only 'linear' "
                             "and 'dynamic'")


def _group_rows(spec, name: str) -> tuple:
    hd = spec.hidden_size // spec.num_heads           # as the official LlamaAttention
    return {"qkv": (spec.num_heads * hd, spec.num_kv_heads * hd, spec.num_kv_heads * hd),
            "o": (spec.hidden_size,),
            "up": (spec.intermediate_size, spec.intermediate_size),
            "down": (spec.hidden_size,)}[name]


def _group_in(spec, name: str) -> int:
    return {"qkv": spec.hidden_size, "o": spec.hidden_size, "up": spec.hidden_size,
            "down": spec.intermediate_size}[name]


# ----------------------------------------------------------------------------- official folders

class OfficialFolder:
    """A Hugging Face folder in the official format: `config`, `quip_params`, `codebook`,
    `spec` (a LlamaSpec) and lazy `tensor(name)` (numpy, the stored dtype; bfloat16 read as
    float32)."""

    def __init__(self, path: str):
        self.path = path
        self.config = read_config_json(path)
        qp = self.config.get("quip_params")
        if not qp:
            raise ValueError(f"{path}/config.json has no quip_params: not a quip-sharp quantized model "
                             "(an FP model is read by quipjax.models.loaders)")
        self.quip_params = qp
        self.codebook = codebook_name(qp.get("codebook"))
        self._check_params(qp)
        if self.config.get("model_type", "llama") != "llama":
            raise ValueError(f"model_type {self.config.get('model_type')!r}: the official format "
                             "holds Llama models (model/llama.py)")
        self.spec = LlamaSpec.from_hf(self.config)
        hd = self.spec.hidden_size // self.spec.num_heads
        if hd != self.spec.head_dim:     # the official model ignores a head_dim entry
            self.spec = dataclasses.replace(self.spec, head_dim=hd)
        self._where = safetensors_index(path)

    def _check_params(self, qp: dict) -> None:
        name = self.codebook
        v = qp.get("codebook_version", 0)
        if v != CODEBOOK_VERSIONS[name]:
            raise ValueError(f"{name} codebook version {v} in quip_params; the official code "
                             f"(and quipjax) read version {CODEBOOK_VERSIONS[name]}: the weights "
                             "predate the current packing; download the current release")
        if qp.get("model_version", MODEL_VERSION) != MODEL_VERSION:
            raise ValueError(f"model_version {qp.get('model_version')} != {MODEL_VERSION}")
        if qp.get("lora_rank", 0) not in (0, -1, None):
            raise ValueError(f"lora_rank {qp['lora_rank']}: low-rank corrections are not "
                             "supported (the official code removed them in 07/2024)")
        if qp.get("codesz", CODESZ) != CODESZ or qp.get("pack_out", False):
            raise ValueError(f"codesz {qp.get('codesz')} / pack_out {qp.get('pack_out')}: not an "
                             "E8P layout")
        if qp.get("idx_dtype", "torch.int64") != "torch.int64":
            raise ValueError(f"idx_dtype {qp['idx_dtype']}: E8P codes are stored as torch.int64")
        ps = qp.get("packsz")
        if ps is not None and abs(float(ps) - PACKSZ[name]) > 1e-6:
            raise ValueError(f"packsz {ps} does not match {name} ({PACKSZ[name]})")
        rso = qp.get("resid_scale_override", -1)
        if rso is not None and rso > 0 and name != "E8P12" and \
                abs(rso - _codebooks.get(name).resid_scale) > 1e-9:
            raise ValueError(f"resid_scale_override {rso}: quipjax's {name} uses the residual "
                             f"scale {_codebooks.get(name).resid_scale}")

    def names(self) -> list:
        return list(self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    def tensor(self, name: str) -> np.ndarray:
        from safetensors import safe_open
        if name not in self._where:
            raise KeyError(f"{name} is not in {self.path}")
        try:
            with safe_open(self._where[name], framework="numpy") as h:
                return h.get_tensor(name)
        except (TypeError, ValueError):     # bfloat16: numpy has no such dtype
            with safe_open(self._where[name], framework="flax") as h:
                return np.asarray(h.get_tensor(name).astype(jnp.float32))

    def fingerprint(self) -> str:
        return files_fingerprint(sorted(set(self._where.values()))
                                 + [os.path.join(self.path, "config.json")])

    def group(self, layer: int, g) -> tuple:
        """(the quipjax `QuantizedGroup`, the official Qidxs) of the official module of the
        adapter group `g` (a `LinearGroup`) in a layer."""
        spec = self.spec
        p = f"model.layers.{layer}.{OFFICIAL_MODULES[g.name]}."
        rows = _group_rows(spec, g.name)
        m, n = sum(rows), _group_in(spec, g.name)
        for extra in ("A", "B", "bias"):
            if self.has(p + extra):
                raise ValueError(f"{p + extra} is present: low-rank terms and biases are not "
                                 "supported")
        cid = self.tensor(p + "codebook_id")
        if int(cid) != CODEBOOK_IDS[self.codebook]:
            raise ValueError(f"{p}codebook_id is {int(cid)} but quip_params names "
                             f"{self.codebook} ({CODEBOOK_IDS[self.codebook]})")
        qidxs = self.tensor(p + "Qidxs")
        scale_wh = self.tensor(p + "scaleWH") if self.quip_params.get("rescale_WH") else None
        ql = to_quantized_linear(qidxs, self.tensor(p + "SU"), self.tensor(p + "SV"), int(cid),
                                 m, n, Wscale=self.tensor(p + "Wscale") if self.has(p + "Wscale")
                                 else None, scaleWH=scale_wh)
        if len(g.members) > 1:
            fs = as_float32(self.tensor(p + "fuse_scales"))
            if fs.shape != (len(g.members),):
                raise ValueError(f"{p}fuse_scales has shape {fs.shape}, expected "
                                 f"({len(g.members)},)")
        else:
            fs = np.ones((1,), np.float32)
        return QuantizedGroup(ql=ql, scales=jnp.asarray(fs), members=g.members, rows=rows), qidxs


def _tokenizer_ref(path: str, config: dict) -> dict:
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    if any(os.path.exists(os.path.join(path, f)) for f in names):
        return {"kind": "hf", "path": os.path.abspath(path)}
    src = config.get("_name_or_path") or ""
    if src and os.path.exists(src):      # a local HF folder or GGUF file
        return {"kind": "hf" if os.path.isdir(src) else "gguf", "path": os.path.abspath(src)}
    return {"kind": "hf", "path": os.path.abspath(path), "name_or_path": src}


def _prepare_out(path: str, overwrite: bool, marker: str) -> None:
    if os.path.exists(path) and os.listdir(path):
        if not overwrite:
            raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True "
                                  "(--overwrite) to replace it")
        if not os.path.exists(os.path.join(path, marker)):
            raise FileExistsError(f"{path} is not empty and has no {marker}: refusing to delete "
                                  "a folder this converter did not write")
        shutil.rmtree(path)
    os.makedirs(path, exist_ok=True)


def import_folder(folder: str, out_dir: str, *, verify: bool = True, overwrite: bool = False,
                  verify_flops: float = 2e10, log: Callable = print) -> dict:
    """An official-format Hugging Face folder -> a quipjax checkpoint in out_dir.

    Every layer is checked after writing (verify=True): read back from out_dir, it must equal
    what was written; its codes must decode to the values read straight from the official
    words (`reference_decode`: exact for E8P, 1e-6 for the RVQ residual's float32 division);
    and for layers with m n (m + n) <= verify_flops the dequantized weight must be finite and
    match the official formula computed in float64 with dense Hadamard matrices
    (`reference_dequantize`, times fuse_scales) to 1e-5 relative.
    Returns a summary dict (layers, codebook, max relative error seen).
    """
    src = OfficialFolder(folder)
    spec = src.spec
    _prepare_out(out_dir, overwrite, "quipjax.json")
    meta = {"model": spec.to_dict(), "tokenizer": _tokenizer_ref(folder, src.config),
            "adapter": LLAMA.name, "quantized_linears": LLAMA.linear_paths(),
            "settings": {"codebook": src.codebook, "scale": None, "sigma_reg": None,
                         "tune_iters": None, "rotation": "hadamard", "rounding": None, "seed": 0},
            "source": {"path": os.path.abspath(folder), "kind": "quip-sharp",
                       "fingerprint": src.fingerprint()},
            "imported": {"format": "quip-sharp", "quip_params": src.quip_params,
                         "name_or_path": src.config.get("_name_or_path", "")}}
    ckpt.write_meta(out_dir, meta)
    g = {"embed_tokens": as_float32(src.tensor("model.embed_tokens.weight")),
         "norm": as_float32(src.tensor("model.norm.weight"))}
    if not spec.tie_embeddings:
        g["lm_head"] = as_float32(src.tensor("lm_head.weight"))
    ckpt.save_globals(out_dir, g)
    worst, checked, total = 0.0, 0, 0
    for i in range(spec.num_layers):
        groups, raw = {}, {}
        for g in LLAMA.groups:
            groups[g.name], raw[g.name] = src.group(i, g)
        p = f"model.layers.{i}."
        norms = {k: as_float32(src.tensor(p + k)) for k in _NORMS}
        ckpt.save_layer(out_dir, i, groups, norms, {"imported_from": "quip-sharp"})
        if verify:
            back, _, _ = ckpt.load_layer(out_dir, i)
            for g in LLAMA.groups:
                err, did = _verify_group(back[g.name], groups[g.name], raw[g.name], src.codebook,
                                         verify_flops, f"layer {i} {OFFICIAL_MODULES[g.name]}")
                worst, checked, total = max(worst, err), checked + did, total + 1
        if log:
            log(f"imported layer {i + 1}/{spec.num_layers}")
    out = {"layers": spec.num_layers, "codebook": src.codebook, "verified": bool(verify),
           "dense_checked_groups": checked, "groups": total, "max_rel_err": worst}
    if log:
        log(f"imported {folder} -> {out_dir}: {json.dumps(out)}")
    return out


def _verify_group(back, group, qidxs, codebook, verify_flops, what) -> tuple:
    m, n = back.ql.shape
    if not (np.array_equal(np.asarray(back.ql.codes), np.asarray(group.ql.codes))
            and np.array_equal(np.asarray(back.ql.SU), np.asarray(group.ql.SU))
            and np.array_equal(np.asarray(back.ql.SV), np.asarray(group.ql.SV))
            and np.array_equal(np.asarray(back.scales), np.asarray(group.scales))):
        raise RuntimeError(f"{what}: the written checkpoint does not read back identically")
    if not np.isfinite(np.asarray(back.scales)).all():
        raise RuntimeError(f"{what}: fuse_scales hold NaN/Inf")
    cb = _codebooks.get(codebook)
    codes = np.asarray(back.ql.codes)
    step = 16 * max(1, (1 << 22) // (16 * n))      # bounded memory: blocks of 16-row tiles
    for r in range(0, m, step):                     # stored rows [r, r+k) = weight rows
        k = min(step, m - r)
        ours = np.asarray(cb.decode(codes[r:r + k]), np.float64).reshape(k, n)
        # E8P values are exact (multiples of 1/4); RVQ adds stage2 / resid_scale in float32
        if np.abs(ours - reference_decode(qidxs[r:r + k], codebook, k, n)).max() > 1e-6:
            raise RuntimeError(f"{what}: codes decode differently from the official words")
    if m * n * (m + n) > verify_flops:
        return 0.0, 0
    W = np.concatenate([np.asarray(w, np.float64) for w in back.dequantize_members()], 0)
    ref = reference_dequantize(qidxs, np.asarray(back.ql.SU), np.asarray(back.ql.SV), codebook,
                               m, n)
    ref = ref * np.repeat(np.asarray(back.scales, np.float64), back.rows)[:, None]
    err = float(np.linalg.norm(W - ref) / max(np.linalg.norm(ref), 1e-30))
    if not np.isfinite(W).all() or err > 1e-5:
        raise RuntimeError(f"{what}: dequantized weight differs from the official formula "
                           f"(relative error {err:.3g})")
    return err, 1


# ----------------------------------------------------------------------------- export

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
                    "generation_config.json")


class _ShardWriter:
    """Writes safetensors shards of at most max_bytes (HF names and index)."""

    def __init__(self, path: str, max_bytes: float):
        self.path, self.max_bytes = path, max_bytes
        self.cur, self.cur_bytes, self.files, self.weight_map, self.total = {}, 0, [], {}, 0

    def add(self, name: str, arr: np.ndarray) -> None:
        arr = np.asarray(arr)
        if not arr.flags.c_contiguous:        # (np.ascontiguousarray would make 0-d arrays 1-d)
            arr = arr.copy()
        if self.cur and self.cur_bytes + arr.nbytes > self.max_bytes:
            self._flush()
        self.cur[name] = arr
        self.cur_bytes += arr.nbytes
        self.total += arr.nbytes

    def _flush(self) -> None:
        from safetensors.numpy import save_file
        fn = os.path.join(self.path, f"shard-{len(self.files):05d}.tmp")
        save_file(self.cur, fn, metadata={"format": "pt"})
        self.files.append((fn, list(self.cur)))
        self.cur, self.cur_bytes = {}, 0

    def close(self) -> list:
        if self.cur or not self.files:
            self._flush()
        k = len(self.files)
        if k == 1:
            os.replace(self.files[0][0], os.path.join(self.path, "model.safetensors"))
            return ["model.safetensors"]
        names = []
        for j, (fn, keys) in enumerate(self.files):
            name = f"model-{j + 1:05d}-of-{k:05d}.safetensors"
            os.replace(fn, os.path.join(self.path, name))
            names.append(name)
            self.weight_map.update({key: name for key in keys})
        with open(os.path.join(self.path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": self.total}, "weight_map": self.weight_map},
                      f, indent=2, sort_keys=True)
        return names


def _check_exportable(reader: ckpt.Reader) -> str:
    """Every layer of the checkpoint fits the official format (checked before anything is
    written); returns the codebook."""
    spec, codebook = reader.spec, None
    if reader.meta.get("adapter", "llama") != "llama":
        raise ValueError(f"adapter {reader.meta.get('adapter')!r}: the official format holds "
                         "Llama models")
    _check_spec(spec)
    for i in range(spec.num_layers):
        if not ckpt.layer_done(reader.dir, i):
            raise FileNotFoundError(f"layer {i} of {reader.dir} is missing: the checkpoint is "
                                    "incomplete (finish the quantization run first)")
        info = reader.info(i)
        for g in LLAMA.groups:
            gm = info["groups"].get(g.name)
            if gm is None:
                raise ValueError(f"layer {i} has no quantized {g.name} group: the official "
                                 "format needs all seven linears quantized")
            if tuple(gm["members"]) != g.members:
                raise ValueError(
                    f"layer {i} group {g.name!r} stacks {tuple(gm['members'])}; the official "
                    f"{OFFICIAL_MODULES[g.name]} stacks {g.members} in that order. Rows cannot "
                    "be reordered after the randomized Hadamard transform: quantize the model "
                    "again with the current quipjax (whose Llama adapter uses the official order)")
            if tuple(gm["rows"]) != _group_rows(spec, g.name):
                raise ValueError(f"layer {i} {g.name}: rows {gm['rows']} != official "
                                 f"{_group_rows(spec, g.name)}")
            if codebook is None:
                codebook = codebook_name(gm["codebook"])
            elif gm["codebook"] != codebook:
                raise ValueError(f"layer {i} {g.name} uses {gm['codebook']} and others "
                                 f"{codebook}: the official config holds one codebook per model")
            m, n = gm["shape"]
            check_shape(m, n)
            if tuple(gm["transforms"]) != ("hadamard", "hadamard"):
                raise ValueError(f"layer {i} {g.name}: transforms {gm['transforms']}; the "
                                 "official format needs Hadamard transforms on both sides")
            check_transforms(m, n)
    return codebook


def _copy_tokenizer(meta: dict, out_folder: str) -> list:
    """Copy the tokenizer files of the checkpoint's HF source into the folder."""
    tok = meta.get("tokenizer") or {}
    tok_dir = tok.get("path") if tok.get("kind") == "hf" else None
    copied = []
    if tok_dir and os.path.isdir(tok_dir):
        for fn in _TOKENIZER_FILES:
            if os.path.exists(os.path.join(tok_dir, fn)):
                shutil.copy(os.path.join(tok_dir, fn), os.path.join(out_folder, fn))
                copied.append(fn)
    return copied


def _write_layer(w: "_ShardWriter", fp: Callable, i: int, groups: dict, norms: dict, dt) -> None:
    p = f"model.layers.{i}."
    for g in LLAMA.groups:
        qg = groups[g.name]
        fused = len(g.members) > 1
        scales = np.asarray(qg.scales, np.float32)
        t = from_quantized_linear(qg.ql, sv_scale=1.0 if fused else float(scales[0]),
                                  float_dtype=dt)
        if fused:
            t["fuse_scales"] = scales.astype(dt)
        for k in ("Qidxs", "SU", "SV", "Wscale", "codebook_id", "fuse_scales"):
            if k in t:
                w.add(p + OFFICIAL_MODULES[g.name] + "." + k, t[k])
    for k in _NORMS:
        fp(p + k, norms[k])
    extra = set(norms) - set(_NORMS)
    if extra:
        raise ValueError(f"layer {i} has FP parameters the official model lacks: {sorted(extra)}")


def export_checkpoint(ckpt_dir: str, out_folder: str, *, float_dtype: str = "float16",
                      name_or_path: Optional[str] = None, max_shard_bytes: float = 5e9,
                      overwrite: bool = False, log: Callable = print) -> dict:
    """A quipjax checkpoint -> a Hugging Face folder in the official format.

    Uses the end-to-end tuned SU/SV and norms when the checkpoint has them. float_dtype:
    "float16" (the official files; SU, SV, scales, norms and embeddings are rounded to fp16)
    or "float32" (quipjax-only: lossless, same names and layout). name_or_path: written as
    config `_name_or_path`, where the official loader takes the tokenizer from (default: the
    tokenizer files copied into the folder when the source is a HF folder, else the source).
    """
    if float_dtype not in ("float16", "float32"):
        raise ValueError(f"float_dtype must be 'float16' (official) or 'float32', got {float_dtype!r}")
    dt = np.dtype(float_dtype)
    reader = ckpt.Reader(ckpt_dir)
    spec, meta = reader.spec, reader.meta
    codebook = _check_exportable(reader)
    glob_ = reader.globals()

    _prepare_out(out_folder, overwrite, "config.json")
    copied = _copy_tokenizer(meta, out_folder)
    if name_or_path is None:
        name_or_path = ((meta.get("imported") or {}).get("name_or_path")
                        or (os.path.abspath(out_folder) if copied else
                            (meta.get("source") or {}).get("path", "")))
    cfg = official_config(spec, codebook, name_or_path=name_or_path, torch_dtype=float_dtype)
    w = _ShardWriter(out_folder, max_shard_bytes)

    def fp(name, arr):
        a = np.asarray(arr, np.float32).astype(dt)
        if not np.isfinite(a).all():
            raise ValueError(f"{name} overflows {float_dtype}")
        w.add(name, a)

    fp("model.embed_tokens.weight", glob_["embed_tokens"])
    for i in range(spec.num_layers):
        _write_layer(w, fp, i, *reader.layer(i), dt)
        if log:
            log(f"exported layer {i + 1}/{spec.num_layers}")
    fp("model.norm.weight", glob_["norm.weight"])
    if not spec.tie_embeddings:
        fp("lm_head.weight", glob_["lm_head.weight"])
    files = w.close()
    with open(os.path.join(out_folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    out = {"folder": out_folder, "codebook": codebook, "layers": spec.num_layers,
           "files": files, "bytes": w.total, "float_dtype": float_dtype,
           "tokenizer_files": copied, "name_or_path": name_or_path}
    if log:
        log(f"exported {ckpt_dir} -> {out_folder}: {json.dumps(out)}")
    return out


def checkpoint_logits(ckpt_dir: str, tokens, dtype=jnp.float32) -> np.ndarray:
    """Logits (T, vocab) float32 of a quipjax checkpoint on one token sequence (T,)."""
    model = build_model(ckpt_dir, dtype=dtype)
    return np.asarray(model(jnp.asarray(np.asarray(tokens, np.int32))[None]))[0]
