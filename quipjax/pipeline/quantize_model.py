"""Quantize a model's linear groups layer by layer, and rebuild a model from the checkpoint."""
from __future__ import annotations

import dataclasses
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from quipjax.models.adapter import LLAMA, ModelAdapter, get_path
from quipjax.models.llama import Block, Llama, LlamaSpec
from flax import nnx

from quipjax.pipeline.checkpoint import QuantizedGroup, load_e2e, load_globals, load_layer_tuned
from quipjax.quantize import quantize_linear

__all__ = ["QuantSettings", "fuse_members", "quantize_group", "quantize_block", "assign_dequantized",
           "build_quantized_model", "group_key", "block_fp_params", "source_fp_params", "set_param"]


@dataclasses.dataclass(frozen=True)
class QuantSettings:
    codebook: str = "E8P12"
    scale: Optional[float] = None
    sigma_reg: float = 1e-2
    tune_iters: int = 0
    rotation: str = "auto"
    rounding: str = "ldlq"
    seed: int = 0


def group_key(seed: int, layer: int, group_index: int) -> jax.Array:
    """The sign-vector key of one group: a pure function of (seed, layer, group)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), layer), group_index)


def fuse_members(weights: list) -> tuple:
    """(W, scales): the members' (out_i, in) matrices row-stacked, each divided by its RMS
    (the official fused q/k/v and gate/up); one member: itself and scale 1."""
    ws = [np.asarray(w, np.float32) for w in weights]
    if len(ws) == 1:
        return ws[0], np.ones((1,), np.float32)
    scales = np.array([np.sqrt(np.mean(w.astype(np.float64) ** 2)) for w in ws], np.float32)
    scales = np.where(scales > 0, scales, 1.0).astype(np.float32)
    return np.concatenate([w / s for w, s in zip(ws, scales)], 0), scales


def quantize_group(weights: list, H: np.ndarray, settings: QuantSettings, key) -> QuantizedGroup:
    """weights: the members' (out_i, in) matrices; H the shared input Hessian (in, in)."""
    ws = [np.asarray(w, np.float32) for w in weights]
    W, scales = fuse_members(ws)
    ql = quantize_linear(W, H, codebook=settings.codebook, scale=settings.scale,
                         sigma_reg=settings.sigma_reg, tune_iters=settings.tune_iters, key=key,
                         rotation=settings.rotation, rounding=settings.rounding)
    return QuantizedGroup(ql=ql, scales=jnp.asarray(scales), rows=tuple(w.shape[0] for w in ws))


def quantize_block(block, hessians: dict, settings: QuantSettings, layer: int,
                   adapter: ModelAdapter = LLAMA, groups=None) -> dict:
    """{group name: QuantizedGroup} for one block (its FP weights and Hessians)."""
    out = {}
    for gi, g in enumerate(adapter.groups):
        if groups is not None and g.name not in groups:
            continue
        ws = [np.asarray(get_path(block, m).weight[...], np.float32) for m in g.members]
        qg = quantize_group(ws, hessians[g.name], settings, group_key(settings.seed, layer, gi))
        out[g.name] = dataclasses.replace(qg, members=g.members)
    return out


def block_fp_params(block, adapter: ModelAdapter = LLAMA) -> dict:
    """The block's parameters that stay in floating point (norm weights, biases): {module path
    ("input_layernorm.weight", "self_attn.q_proj.bias"): float32 array}, everything but the
    weights of the adapter's linears (and the su/sv of tunable ones)."""
    quantized = {m + ".weight" for m in adapter.linear_paths()}
    out = {}
    for path, v in nnx.to_flat_state(nnx.state(block, nnx.Param)):
        name = ".".join(str(p) for p in path)
        if name in quantized or path[-1] in ("su", "sv"):
            continue
        out[name] = np.asarray(v[...], np.float32)
    return out


def source_fp_params(src, i: int, adapter: ModelAdapter = LLAMA) -> dict:
    """`block_fp_params` of layer i read straight from the source (norms, biases: float32),
    without loading the block's quantized weights."""
    from quipjax.models.loaders import block_param_names
    quantized = {m + ".weight" for m in adapter.linear_paths()}
    return {p: np.asarray(src.tensor(n), np.float32)
            for p, n in block_param_names(src.spec, i).items() if p not in quantized}


def set_param(block, path: str, value) -> None:
    """Assign `value` to the Param at `path` ("mlp.up_proj.bias"), keeping its dtype."""
    *mod, name = path.split(".")
    holder = get_path(block, ".".join(mod)) if mod else block
    var = getattr(holder, name, None)
    if var is None:
        raise ValueError(f"the model has no parameter {path}: the checkpoint is from another "
                         "architecture or configuration")
    if tuple(var.shape) != tuple(np.shape(value)):
        raise ValueError(f"{path}: checkpoint shape {np.shape(value)} != model {var.shape}")
    var[...] = jnp.asarray(value, var.dtype)


def assign_dequantized(block, groups: dict, dtype) -> None:
    """Replace the members' weights in `block` by their dequantized values (in `dtype`)."""
    for g in groups.values():
        for path, w in zip(g.members, g.dequantize_members()):
            lin = get_path(block, path)
            if tuple(lin.weight.shape) != tuple(w.shape):
                raise ValueError(f"{path}: quantized shape {w.shape} != model {lin.weight.shape}")
            lin.weight[...] = w.astype(dtype)


def build_quantized_model(ckpt_dir: str, meta: dict, dtype=jnp.bfloat16, mesh=None) -> Llama:
    """A Llama whose linears hold the dequantized weights of the checkpoint (in `dtype`).

    mesh: place every weight by `quipjax.sharding.RULES` as it is built, one block at a time
    (a model larger than one device)."""
    spec = LlamaSpec.from_dict(meta["model"])
    glob = load_globals(ckpt_dir)
    e2e = load_e2e(ckpt_dir)          # end-to-end tuned su/sv and norms override the layers'
    if e2e is not None:
        glob.update(e2e[1])
    if mesh is None:
        model = Llama(spec, dtype)
        model.embed_tokens[...] = jnp.asarray(glob["embed_tokens"], dtype)
        model.norm.weight[...] = jnp.asarray(glob["norm"], jnp.float32)
        if model.lm_head is not None:
            model.lm_head.weight[...] = jnp.asarray(glob["lm_head"], dtype)
    else:
        from quipjax import sharding
        model = sharding.abstract_model(spec, dtype)
        sharding.put_param(model, "embed_tokens", glob["embed_tokens"], mesh, dtype=dtype)
        sharding.put_param(model.norm, "weight", glob["norm"], mesh, "norm.weight", jnp.float32)
        if model.lm_head is not None:
            sharding.put_param(model.lm_head, "weight", glob["lm_head"], mesh, "lm_head.weight",
                               dtype)
    for i in range(spec.num_layers):
        groups, norms = load_layer_tuned(ckpt_dir, i, e2e)
        block = model.layers[i] if mesh is None else Block(spec, dtype)
        for name, v in norms.items():
            set_param(block, name, v)
        assign_dequantized(block, groups, dtype)
        if mesh is not None:
            from quipjax import sharding
            model.layers[i] = sharding.shard_module(block, mesh)
        missing = [m for m in meta["quantized_linears"] if not any(m in g.members for g in groups.values())]
        if missing:
            raise ValueError(f"layer {i} of {ckpt_dir} lacks {missing}")
    return model
