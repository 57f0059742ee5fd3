"""Mixture-of-experts decoders in Flax NNX: Mixtral and Qwen3-MoE.

The attention is the Llama family's (`models.llama.Attention`: Mixtral as Mistral, Qwen3-MoE
with Qwen3's q/k norms); the MLP of a sparse layer is a router (`gate`, kept in floating
point) choosing the top-k of E experts per token, each expert a SwiGLU MLP. Module paths are
the Hugging Face checkpoint names (the hub's per-expert layout):

    Mixtral    block_sparse_moe.gate, block_sparse_moe.experts.{e}.w1 (gate) / w3 (up) / w2 (down)
    Qwen3-MoE  mlp.gate, mlp.experts.{e}.gate_proj / up_proj / down_proj (every layer sparse:
               configs with dense `mlp_only_layers` are refused)

Routing as transformers computes it: softmax of the router logits in float32, the top-k
probabilities (renormalized to sum 1 for Mixtral, and for Qwen3-MoE when norm_topk_prob).
Every expert runs on every token with the input of the tokens not routed to it set to zero
(so the output is the routed sum exactly, and an expert's linears see exactly its tokens:
the Hessian of an expert comes from the tokens routed to it, `ModelAdapter.pools`). Dense
evaluation costs E / k times the FLOPs of the routed computation; it keeps shapes static.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from quipjax.models import llama
from quipjax.models.parts import DecoderLM, Linear

__all__ = ["MoESpec", "Expert", "SparseMoE", "Block", "MoEModel", "MODEL_TYPES", "STYLES",
           "spec_from_gguf", "GGUF_ARCHS"]

MODEL_TYPES = ("mixtral", "qwen3_moe")
# module names of each style: (moe attribute, gate, up, down)
STYLES = {"mixtral": ("block_sparse_moe", "w1", "w3", "w2"),
          "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj")}
# the Llama-family model_type whose attention each MoE family shares
_ATTENTION_OF = {"mixtral": "mistral", "qwen3_moe": "qwen3"}
# llama.cpp's general.architecture of each (Mixtral is its "llama" with experts)
GGUF_ARCHS = {"mixtral": "llama", "qwen3_moe": "qwen3moe"}


@dataclasses.dataclass(frozen=True)
class MoESpec(llama.LlamaSpec):
    """A `LlamaSpec` (attention, norms, RoPE) plus the experts. intermediate_size is the
    dense MLP's (unused by the sparse layers), expert_intermediate_size each expert's."""

    num_experts: int = 8
    top_k: int = 2
    expert_intermediate_size: int = 0
    norm_topk_prob: bool = True

    @staticmethod
    def from_hf(cfg: Any) -> "MoESpec":
        d = dict(cfg if isinstance(cfg, dict) else cfg.to_dict())
        arch = d.get("model_type")
        if arch not in MODEL_TYPES:
            raise ValueError(f"model_type {arch!r} is not a mixture of experts {MODEL_TYPES}")
        base = llama.LlamaSpec.from_hf(dict(d, model_type=_ATTENTION_OF[arch]))
        E = d.get("num_experts") or d.get("num_local_experts")
        L = d["num_hidden_layers"]
        if arch == "mixtral":
            f_e, norm = d["intermediate_size"], True
        else:
            step = d.get("decoder_sparse_step") or 1
            dense = [i for i in range(L) if i in set(d.get("mlp_only_layers") or ())
                     or (i + 1) % step]
            if dense:
                raise ValueError(f"Qwen3-MoE with dense MLP layers {dense} (mlp_only_layers / "
                                 "decoder_sparse_step > 1) is not supported: every layer must "
                                 "be sparse")
            f_e, norm = d["moe_intermediate_size"], bool(d.get("norm_topk_prob", False))
        k = d["num_experts_per_tok"]
        if not 0 < k <= E:
            raise ValueError(f"num_experts_per_tok {k} must be in 1..{E} (the experts)")
        return MoESpec(**dict(dataclasses.asdict(base), rope_scaling=base.rope_scaling,
                              model_type=arch), num_experts=E, top_k=k,
                       expert_intermediate_size=f_e, norm_topk_prob=norm)

    @staticmethod
    def from_dict(d: dict) -> "MoESpec":
        return MoESpec(**llama.hashable_rope(d))

    @property
    def style(self) -> tuple:
        return STYLES[self.model_type]


class Expert(nnx.Module):
    """One SwiGLU expert with the style's linear names: down(silu(gate(x)) * up(x))."""

    def __init__(self, spec: MoESpec, dtype):
        _, g, u, dn = spec.style
        d, f = spec.hidden_size, spec.expert_intermediate_size
        setattr(self, g, Linear(d, f, dtype=dtype))
        setattr(self, u, Linear(d, f, dtype=dtype))
        setattr(self, dn, Linear(f, d, dtype=dtype))
        self.names = (g, u, dn)

    def __call__(self, x):
        g, u, dn = (getattr(self, n) for n in self.names)
        return dn(jax.nn.silu(g(x)) * u(x))


class SparseMoE(nnx.Module):
    """x (B, T, d) float32 -> (B, T, d) float32: the weighted sum of each token's top-k
    experts. `gate` is the router (E, d)."""

    def __init__(self, spec: MoESpec, dtype):
        self.gate = Linear(spec.hidden_size, spec.num_experts, dtype=dtype)
        self.experts = nnx.List([Expert(spec, dtype) for _ in range(spec.num_experts)])
        self.top_k, self.norm_topk = spec.top_k, spec.norm_topk_prob

    def routing(self, x):
        """(weights (B, T, E) float32, routed (B, T, E) bool): each token's top-k experts
        and their weights (zero elsewhere)."""
        probs = jax.nn.softmax(self.gate(x).astype(jnp.float32), -1)
        top, idx = jax.lax.top_k(probs, self.top_k)
        if self.norm_topk:
            top = top / jnp.sum(top, -1, keepdims=True)
        onehot = jax.nn.one_hot(idx, probs.shape[-1], dtype=jnp.float32)    # (B, T, k, E)
        return jnp.einsum("btk,btke->bte", top, onehot), jnp.sum(onehot, 2) > 0

    def __call__(self, x):
        weights, routed = self.routing(x)
        out = jnp.zeros(x.shape, jnp.float32)
        for e, expert in enumerate(self.experts):
            # tokens not routed to e enter as zeros: e's linears see only its tokens
            xe = jnp.where(routed[..., e:e + 1], x, 0.0)
            out = out + weights[..., e:e + 1] * expert(xe)
        return out


class Block(llama.Block):
    """The Llama block with the sparse MoE in place of its MLP."""

    def __init__(self, spec: MoESpec, dtype, layer: int = 0):
        super().__init__(spec, dtype, layer, ffn=(spec.style[0], SparseMoE(spec, dtype)))


class MoEModel(DecoderLM):
    """Token ids (B, T) int32 -> logits (B, T, vocab) float32."""

    def __init__(self, spec: MoESpec, dtype=jnp.float32):
        super().__init__(spec, dtype, Block)


def spec_from_gguf(field, model_type: str, shapes: dict) -> MoESpec:
    """A MoESpec from a llama.cpp GGUF header (`llama.spec_from_gguf` for the attention, then
    {arch}.expert_count / expert_used_count / expert_feed_forward_length). llama.cpp always
    renormalizes the top-k weights of both (`{arch}.expert_weights_norm` = false, where
    present, turns it off), so a GGUF is read as llama.cpp runs it."""
    arch = GGUF_ARCHS[model_type]
    ff = field(f"{arch}.expert_feed_forward_length", None) or field(f"{arch}.feed_forward_length")

    def with_defaults(key, default=KeyError):
        # Qwen3-MoE files may omit the dense feed_forward_length: the experts' stands in
        return field(key, ff if key == f"{arch}.feed_forward_length" else default)

    base = llama.spec_from_gguf(with_defaults, arch, shapes)
    E, k = field(f"{arch}.expert_count"), field(f"{arch}.expert_used_count")
    if not 0 < k <= E:
        raise ValueError(f"GGUF {arch}.expert_used_count {k} must be in 1..{E} (expert_count)")
    return MoESpec(**dict(dataclasses.asdict(base), rope_scaling=base.rope_scaling,
                          model_type=model_type), num_experts=int(E), top_k=int(k),
                   expert_intermediate_size=int(ff),
                   norm_topk_prob=bool(field(f"{arch}.expert_weights_norm", True)))
