"""Model families: what quipjax needs to know of an architecture, as one value.

A `Family` bundles a model class, its block class, its spec (read from HF configs, GGUF
metadata and quipjax checkpoints), its default rules (`quipjax.rule.Rule`s over module paths
inside a block: which linears are quantized and which are fused because they share an
input; the pipeline's `ModelAdapter` is derived from them) and how checkpoint tensors map to
module paths. The pipeline reads only this; adding a family is a new module and a line in
`models.families`, no `if model_type == ...` elsewhere.

Module paths inside a block are the Hugging Face names, so a block parameter `path` of layer
i is the tensor `f"model.layers.{i}.{path}"` of an HF checkpoint (`block_names`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Tuple

import jax
import jax.numpy as jnp
from flax import nnx

from quipjax.models.adapter import ModelAdapter, path_str

__all__ = ["Family", "GGUFLayout", "block_names", "global_names", "param_paths"]


def _same(spec, name, array):
    return array


def _no_scale(spec):
    return None


def _always(field):
    return True


@dataclasses.dataclass(frozen=True, kw_only=True)
class GGUFLayout:
    """How llama.cpp stores a family: the architectures (general.architecture), the spec
    from the header, block tensor names ("attn_q" -> "self_attn.q_proj") and a per-tensor
    fix-up (spec, hf_name, array) -> array (llama.cpp's Q/K row permutation for llama).

    experts: llama.cpp's stacked expert tensors, (E, rows, cols), by block name
    ("ffn_gate_exps" -> "block_sparse_moe.experts.{e}.w1"); expert e is slice e (files of
    older converters store "ffn_gate.{e}" per expert: read likewise). when: field getter ->
    whether this layout reads the file (Mixtral is llama.cpp's "llama" with experts)."""

    archs: Tuple[str, ...]
    spec: Callable[[Callable, dict], Any]       # (field getter, {hf name: shape}) -> spec
    block: dict
    fixup: Callable = _same
    experts: dict = dataclasses.field(default_factory=dict)
    when: Callable[[Callable], bool] = _always


@dataclasses.dataclass(frozen=True, kw_only=True)
class Family:
    """An architecture quipjax runs.

    name: the family's name. model_types: HF `model_type` values it reads. spec_from_hf:
    config dict -> spec (errors for options it does not run). spec_from_dict: the inverse of
    `spec.to_dict()` (quipjax checkpoints). model: (spec, dtype) -> the model (a
    `models.parts.DecoderLM`). block: (spec, dtype, layer) -> block `layer`. rules:
    spec -> the default `Rule`s (their groups, in order, are the quantization order; see
    `ModelAdapter.from_rules`). hf_transform:
    (spec, hf_name, array) -> array for tensors read from HF folders (Gemma's 1 + w norms).
    gguf: the llama.cpp layouts of its architectures (none when llama.cpp has none).
    embed_scale: spec -> the factor of the embeddings (Gemma: sqrt(hidden)) or None; the
    model's `embed_scale` is the same value.
    """

    name: str
    model_types: Tuple[str, ...]
    spec_from_hf: Callable[[dict], Any]
    spec_from_dict: Callable[[dict], Any]
    model: Callable
    block: Callable
    rules: Callable[[Any], tuple]
    hf_transform: Callable = _same
    gguf: Tuple[GGUFLayout, ...] = ()
    embed_scale: Callable[[Any], Any] = _no_scale

    def abstract_block(self, spec, layer: int = 0, dtype=jnp.float32):
        """Block `layer` as shapes only (`nnx.eval_shape`: nothing allocated)."""
        return nnx.eval_shape(lambda: self.block(spec, dtype, layer))

    def adapter(self, spec, user_rules=()) -> ModelAdapter:
        """The linear groups of `spec`'s blocks under `user_rules` followed by the family's
        rules (the first match decides)."""
        return ModelAdapter.from_rules(spec.model_type, self.abstract_block(spec),
                                       tuple(user_rules) + tuple(self.rules(spec)))


def param_paths(module) -> list:
    """Module paths of the `nnx.Param`s of module ("self_attn.q_proj.weight", ...)."""
    return [path_str(p) for p, _ in
            jax.tree_util.tree_flatten_with_path(nnx.state(module, nnx.Param))[0]]


_PATHS: dict = {}


def _block_param_paths(family: Family, spec, i: int) -> tuple:
    # traced once per (family, spec, layer): weights are fetched by name layer after layer
    key = (family.name, spec, i)
    if key not in _PATHS:
        _PATHS[key] = tuple(param_paths(family.abstract_block(spec, i)))
    return _PATHS[key]


def block_names(family: Family, spec, i: int) -> dict:
    """{block parameter path: HF tensor name} of layer i."""
    return {p: f"model.layers.{i}.{p}" for p in _block_param_paths(family, spec, i)}


def global_names(spec) -> dict:
    """{model parameter path: HF tensor name} of the global parameters."""
    names = {"embed_tokens": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not spec.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    return names
