"""A Llama-family decoder in Flax NNX (Llama-2/3, TinyLlama, SmolLM2, ...).

Plain modules, no quantization code: anything with `__call__(x) -> y` can stand in for a
`Linear` (quipjax swaps in recorders and quantized layers through `models.adapter`).

Numerics: the residual stream, norms, softmax and RoPE run in float32; matmuls take their
inputs in the weights' dtype and accumulate in float32 (`preferred_element_type`), so bf16
weights run at bf16 speed (about 3x float32 on AMX CPUs) without bf16 accumulation.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["LlamaSpec", "Linear", "RMSNorm", "Attention", "MLP", "Block", "Llama",
           "rope_frequencies", "init_random", "random_block"]


@dataclasses.dataclass(frozen=True)
class LlamaSpec:
    """The architecture, as transformers' LlamaConfig describes it."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: Optional[tuple] = None     # sorted (key, value) pairs, hashable
    rms_eps: float = 1e-5
    tie_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    max_position: int = 4096
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None

    @staticmethod
    def from_hf(cfg: Any) -> "LlamaSpec":
        """From a transformers config object or its dict (config.json)."""
        d = cfg if isinstance(cfg, dict) else cfg.to_dict()
        arch = d.get("model_type", "llama")
        if arch not in ("llama", "mistral"):
            raise ValueError(f"model_type {arch!r} is not a Llama-family model")
        heads = d["num_attention_heads"]
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
        rtype = rope.get("rope_type", rope.get("type", "default"))
        scaling = None if rtype in (None, "default") else tuple(sorted(
            (k, v) for k, v in rope.items() if k != "rope_theta" and not isinstance(v, (list, dict))))
        eos = d.get("eos_token_id")
        return LlamaSpec(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
            num_heads=heads, num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rope_theta=float(theta), rope_scaling=scaling, rms_eps=d.get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            max_position=d.get("max_position_embeddings", 4096),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) else eos)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        return d

    @staticmethod
    def from_dict(d: dict) -> "LlamaSpec":
        d = dict(d)
        if d.get("rope_scaling"):
            d["rope_scaling"] = tuple(sorted(d["rope_scaling"].items()))
        return LlamaSpec(**d)


def rope_frequencies(spec: LlamaSpec) -> np.ndarray:
    """Inverse frequencies (head_dim // 2,) float64, with the config's rope scaling."""
    hd = spec.head_dim
    inv = 1.0 / spec.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    sc = dict(spec.rope_scaling or ())
    kind = sc.get("rope_type", sc.get("type"))
    if kind is None:
        return inv
    if kind == "linear":
        return inv / sc["factor"]
    if kind == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        scaled = np.where(wavelen > old / lo, inv / factor, inv)
        mid = (wavelen <= old / lo) & (wavelen >= old / hi)
        return np.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    raise ValueError(f"rope scaling type {kind!r} is not supported (default, linear, llama3)")


def _rope(x, inv_freq, positions):
    """Rotate-half RoPE. x (B, T, H, hd) float32, positions (T,) int."""
    ang = positions[:, None].astype(jnp.float32) * inv_freq[None, :]          # (T, hd/2)
    cos = jnp.concatenate([jnp.cos(ang)] * 2, -1)[None, :, None, :]
    sin = jnp.concatenate([jnp.sin(ang)] * 2, -1)[None, :, None, :]
    half = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rot * sin


def _attention(q, k, v, qpos, kpos, causal_chunks: bool, chunk: int = 256):
    """Causal grouped-query attention. q (B, T, H, hd), k/v (B, S, KV, hd) -> (B, T, H * hd).

    Layout (B, KV, T * g, hd) so each KV head's g query heads form one batched matmul. With
    `causal_chunks` (prefill, qpos = kpos = 0..T-1) the queries are cut into chunks that only
    see the keys up to their end: about half the FLOPs and exps of the full T x T product.
    """
    B, T, H, hd = q.shape
    S, KV = k.shape[1], k.shape[2]
    g = H // KV
    qg = q.reshape(B, T, KV, g, hd).transpose(0, 2, 1, 3, 4).reshape(B, KV, T * g, hd)
    kk, vv = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)        # (B, KV, S, hd)
    scale = 1.0 / math.sqrt(hd)
    qrows = jnp.repeat(qpos, g)                                        # query position per row

    def part(r0, r1, s1):
        s = jnp.einsum("bkqd,bksd->bkqs", qg[:, :, r0:r1], kk[:, :, :s1],
                       preferred_element_type=jnp.float32) * scale
        s = jnp.where(kpos[None, :s1] <= qrows[r0:r1, None], s, -jnp.inf)
        p = jax.nn.softmax(s, -1)
        return jnp.einsum("bkqs,bksd->bkqd", p.astype(vv.dtype), vv[:, :, :s1],
                          preferred_element_type=jnp.float32)

    if causal_chunks and T == S and T > chunk:
        outs = [part(c * g, min(c + chunk, T) * g, min(c + chunk, T)) for c in range(0, T, chunk)]
        o = jnp.concatenate(outs, 2)
    else:
        o = part(0, T * g, S)
    return o.reshape(B, KV, T, g, hd).transpose(0, 2, 1, 3, 4).reshape(B, T, H * hd)


class Linear(nnx.Module):
    """y = x W^T (+ b), W stored (out, in) as in PyTorch/HF checkpoints."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False,
                 dtype=jnp.float32, compute_dtype=None):
        self.weight = nnx.Param(jnp.zeros((out_features, in_features), dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32)) if bias else None
        # matmul input dtype; None = the weight's (training keeps float32 weights, bf16 matmuls)
        self.compute_dtype = compute_dtype

    @property
    def matmul_dtype(self):
        return self.compute_dtype or self.weight.dtype

    def __call__(self, x):
        cdt = self.matmul_dtype
        y = jnp.einsum("...i,oi->...o", x.astype(cdt), self.weight[...].astype(cdt),
                       preferred_element_type=jnp.float32)
        return y if self.bias is None else y + self.bias[...]


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x):
        x = x.astype(jnp.float32)
        return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + self.eps) * self.weight[...]


class Attention(nnx.Module):
    def __init__(self, spec: LlamaSpec, dtype):
        d, h, kv, hd = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
        b = spec.attention_bias
        self.q_proj = Linear(d, h * hd, bias=b, dtype=dtype)
        self.k_proj = Linear(d, kv * hd, bias=b, dtype=dtype)
        self.v_proj = Linear(d, kv * hd, bias=b, dtype=dtype)
        self.o_proj = Linear(h * hd, d, bias=b, dtype=dtype)
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, hd
        self.inv_freq = nnx.Variable(jnp.asarray(rope_frequencies(spec), jnp.float32))

    def __call__(self, x, positions, cache=None):
        """x (B, T, d) float32 -> (B, T, d). cache: optional (k, v, length) for decoding."""
        B, T, _ = x.shape
        q = self.q_proj(x).reshape(B, T, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        inv = self.inv_freq[...]
        q, k = _rope(q, inv, positions), _rope(k, inv, positions)
        if cache is not None:
            ck, cv, length = cache
            k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, length, 0, 0))
            v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, length, 0, 0))
            new_cache = (k, v, length + T)
            kpos = jnp.arange(k.shape[1])
        else:
            new_cache = None
            kpos = positions
        cdt = getattr(self.q_proj, "matmul_dtype", jnp.float32)
        o = _attention(q.astype(cdt), k.astype(cdt), v.astype(cdt), positions, kpos,
                       causal_chunks=cache is None)
        out = self.o_proj(o)
        return out if cache is None else (out, new_cache)


class MLP(nnx.Module):
    def __init__(self, spec: LlamaSpec, dtype):
        d, f, b = spec.hidden_size, spec.intermediate_size, spec.mlp_bias
        self.gate_proj = Linear(d, f, bias=b, dtype=dtype)
        self.up_proj = Linear(d, f, bias=b, dtype=dtype)
        self.down_proj = Linear(f, d, bias=b, dtype=dtype)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    def __init__(self, spec: LlamaSpec, dtype):
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps)
        self.self_attn = Attention(spec, dtype)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps)
        self.mlp = MLP(spec, dtype)

    def __call__(self, x, positions, cache=None):
        h = self.input_layernorm(x)
        if cache is None:
            x = x + self.self_attn(h, positions)
        else:
            a, cache = self.self_attn(h, positions, cache)
            x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x if cache is None else (x, cache)


class Llama(nnx.Module):
    """Token ids (B, T) int32 -> logits (B, T, vocab) float32."""

    def __init__(self, spec: LlamaSpec, dtype=jnp.float32):
        self.spec = spec
        self.embed_tokens = nnx.Param(jnp.zeros((spec.vocab_size, spec.hidden_size), dtype))
        self.layers = nnx.List([Block(spec, dtype) for _ in range(spec.num_layers)])
        self.norm = RMSNorm(spec.hidden_size, spec.rms_eps)
        self.lm_head = None if spec.tie_embeddings else Linear(spec.hidden_size, spec.vocab_size,
                                                               dtype=dtype)

    def embed(self, tokens):
        return self.embed_tokens[...][tokens].astype(jnp.float32)

    def head(self, x):
        x = self.norm(x)
        if self.lm_head is not None:
            return self.lm_head(x)
        e = self.embed_tokens[...]
        return jnp.einsum("...d,vd->...v", x.astype(e.dtype), e, preferred_element_type=jnp.float32)

    def __call__(self, tokens, positions=None):
        T = tokens.shape[1]
        positions = jnp.arange(T) if positions is None else positions
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, positions)
        return self.head(x)


def init_random(spec: LlamaSpec, key, dtype=jnp.float32, scale: float = 0.05) -> Llama:
    """A Llama with random weights (tests, benchmarks)."""
    model = Llama(spec, dtype)
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(key, len(leaves))
    new = []
    for k, leaf in zip(keys, leaves):
        if leaf.ndim == 1:   # norm weights and biases
            new.append((1.0 + 0.1 * jax.random.normal(k, leaf.shape)).astype(leaf.dtype))
        else:
            new.append((scale * jax.random.normal(k, leaf.shape)).astype(leaf.dtype))
    nnx.update(model, jax.tree.unflatten(treedef, new))
    return model


def random_block(spec: LlamaSpec, key, dtype=jnp.bfloat16, scale: float = 0.02) -> Block:
    """A block of `spec` with N(0, scale^2) weights and unit norms, built without first
    allocating zeros (benchmarks of large shapes)."""
    block = nnx.eval_shape(lambda: Block(spec, dtype))
    graphdef, state = nnx.split(block)
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    keys = jax.random.split(key, len(flat))
    vals = []
    for k, (p, leaf) in zip(keys, flat):
        if any(getattr(e, "key", None) == "inv_freq" for e in p):
            vals.append(jnp.asarray(rope_frequencies(spec), jnp.float32))
        elif len(leaf.shape) == 1:
            vals.append(jnp.ones(leaf.shape, leaf.dtype))
        else:
            vals.append((scale * jax.random.normal(k, leaf.shape, jnp.float32)).astype(leaf.dtype))
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, vals))
