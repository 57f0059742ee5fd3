"""The one way a model of any family is put together from stored parts (FP sources and quantized
checkpoints alike), after flax's gemma `from_params`: the skeleton by `nnx.eval_shape`
(nothing allocated), the global parameters filled by key, the blocks built one at a time,
each placed as soon as it is built, so a model larger than one device (or than memory, for
a streamed pass) never exists whole on one device.

    model = assemble_model(spec, dtype, globals_={"embed_tokens": E, "norm.weight": g},
                           block=lambda i: load_block(src, i, dtype), placement=placement)
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
from flax import nnx

from quipjax.models.adapter import path_str, set_param
from quipjax.models.families import family_of
from quipjax.models.family import global_names

__all__ = ["assemble_model", "abstract_paths", "block_loaders"]


def abstract_paths(module) -> list:
    """Paths of the variables of `module` that are still shapes only (never filled)."""
    return [path_str(p) for p, v in jax.tree_util.tree_flatten_with_path(nnx.state(module))[0]
            if isinstance(v, jax.ShapeDtypeStruct)]


def assemble_model(spec, dtype, *, globals_: dict, block: Optional[Callable],
                   placement=None, head_dtype=None, head_compute_dtype=None):
    """A model of `spec`'s family (`models.families`) from its parts.

    Args:
      spec: the architecture (any family's spec).
      dtype: dtype of the skeleton's linears (the blocks bring their own).
      globals_: {module path: array} for "embed_tokens", "norm.weight" and, unless the
        embeddings are tied, "lm_head.weight" (`models.family.global_names`); an unknown or
        missing key is an error.
      block: i -> block i (a filled block, its linears possibly stand-ins of
        `quipjax.layers`); None: the layers stay abstract (a skeleton for a pass that loads
        its blocks one at a time, `block_loaders`).
      placement: an object with `.module(m) -> m` placing a module's variables (e.g.
        `quipjax.distributed.Placement`); None: left where they are built.
      head_dtype: dtype of the embeddings and lm_head (default dtype); the final norm is
        float32. head_compute_dtype: lm_head's matmul input dtype (None: its weight's).
    Returns:
      The model; every variable concrete (checked), the layers' too unless block is None.
    """
    head_dtype = head_dtype or dtype
    family = family_of(spec)
    model = nnx.eval_shape(lambda: family.model(spec, dtype))
    want = set(global_names(spec))
    unknown, missing = set(globals_) - want, want - set(globals_)
    if unknown or missing:
        raise ValueError(f"global parameters: unknown {sorted(unknown)}, missing "
                         f"{sorted(missing)} (tie_embeddings={spec.tie_embeddings})")
    for path in sorted(want):
        set_param(model, path, globals_[path], "float32" if path == "norm.weight" else head_dtype)
    if model.lm_head is not None:
        model.lm_head.compute_dtype = head_compute_dtype
    if placement is not None:
        placement.module(model)             # the globals; the layers are still abstract
    for i in range(spec.num_layers if block is not None else 0):
        b = block(i)
        model.layers[i] = placement.module(b) if placement is not None else b
    left = [p for p in abstract_paths(model) if block is not None or not p.startswith("layers.")]
    if left:
        raise ValueError(f"the model's parameters {left[:5]} were never filled")
    return model


def block_loaders(num_layers: int, block: Callable, placement=None) -> list:
    """[load_0, ..., load_{L-1}]: load_i() builds block i by `block(i)` and places it (as
    `assemble_model` does) each time it is called, so a pass can hold one block at a time."""
    def load(i):
        b = block(i)
        return placement.module(b) if placement is not None else b
    return [functools.partial(load, i) for i in range(num_layers)]
