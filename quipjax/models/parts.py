"""The building blocks every decoder family of `quipjax.models` is made of.

`Linear` (weight (out, in), as PyTorch/HF checkpoints store it), `RMSNorm` (weight used as
stored: families whose checkpoints store w for a (1 + w) scale add the 1 when loading),
rotate-half RoPE (`rope_frequencies`, `apply_rope`), causal grouped-query `attention` (sliding
windows, any scale), and `DecoderLM`, the embed -> blocks -> head skeleton of every family.

Numerics: the residual stream, norms, softmax and RoPE run in float32; matmuls take their
inputs in the weights' dtype and accumulate in float32 (`preferred_element_type`), so bf16
weights run at bf16 speed (about 3x float32 on AMX CPUs) without bf16 accumulation.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["Linear", "RMSNorm", "rope_frequencies", "apply_rope", "attention", "attend",
           "self_attention", "randomize",
           "DecoderLM", "Head", "ACTIVATIONS", "nll_sum", "CHUNKED_LOGITS"]

# the hidden_act values of HF configs the families run, as jax functions
ACTIVATIONS = {"silu": jax.nn.silu,
               "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


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
    """x / rms(x) * weight over the last axis, in float32."""

    def __init__(self, dim: int, eps: float):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x):
        x = x.astype(jnp.float32)
        return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + self.eps) * self.weight[...]


def rope_frequencies(theta: float, dim: int, scaling: Optional[dict] = None) -> np.ndarray:
    """Inverse frequencies (dim // 2,) float64 of RoPE over `dim` rotated dimensions, with
    the config's rope scaling (None/default, linear, llama3, freq_factors: llama.cpp's
    per-frequency divisors)."""
    inv = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    sc = dict(scaling or ())
    kind = sc.get("rope_type", sc.get("type"))
    if kind in (None, "default"):
        return inv
    if kind == "linear":
        return inv / sc["factor"]
    if kind == "freq_factors":      # llama.cpp's rope_freqs: one divisor per frequency
        factors = np.asarray(sc["factors"], np.float64)
        if factors.shape != inv.shape:
            raise ValueError(f"{factors.size} rope frequency factors for {inv.size} "
                             f"frequencies ({dim} rotated dimensions)")
        return inv / factors
    if kind == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        scaled = np.where(wavelen > old / lo, inv / factor, inv)
        mid = (wavelen <= old / lo) & (wavelen >= old / hi)
        return np.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    raise ValueError(f"rope scaling type {kind!r} is not supported (default, linear, llama3, "
                     "freq_factors)")


def apply_rope(x, inv_freq, positions):
    """Rotate-half RoPE of the first 2 * len(inv_freq) dimensions of each head (the rest pass
    through: partial rotary). x (B, T, H, hd) float32, positions (T,) int."""
    ang = positions[:, None].astype(jnp.float32) * inv_freq[None, :]          # (T, r/2)
    cos = jnp.concatenate([jnp.cos(ang)] * 2, -1)[None, :, None, :]
    sin = jnp.concatenate([jnp.sin(ang)] * 2, -1)[None, :, None, :]
    r = 2 * inv_freq.shape[0]
    xr = x if r == x.shape[-1] else x[..., :r]
    half = r // 2
    rot = jnp.concatenate([-xr[..., half:], xr[..., :half]], -1)
    out = xr * cos + rot * sin
    return out if r == x.shape[-1] else jnp.concatenate([out, x[..., r:]], -1)


def attention(q, k, v, qpos, kpos, causal_chunks: bool, chunk: int = 256,
              scale: Optional[float] = None, window: Optional[int] = None):
    """Causal grouped-query attention. q (B, T, H, hd), k/v (B, S, KV, hd) -> (B, T, H * hd).

    scale: of the scores (default 1/sqrt(hd)). window: a sliding window (a query sees the
    keys at most window - 1 positions back, as transformers' sliding masks), None: all.
    Layout (B, KV, T * g, hd) so each KV head's g query heads form one batched matmul. With
    `causal_chunks` (prefill, qpos = kpos = 0..T-1) the queries are cut into chunks that only
    see the keys up to their end: about half the FLOPs and exps of the full T x T product.
    """
    B, T, H, hd = q.shape
    S, KV = k.shape[1], k.shape[2]
    g = H // KV
    qg = q.reshape(B, T, KV, g, hd).transpose(0, 2, 1, 3, 4).reshape(B, KV, T * g, hd)
    kk, vv = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)        # (B, KV, S, hd)
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    qrows = jnp.repeat(qpos, g)                                        # query position per row

    def part(r0, r1, s1):
        s = jnp.einsum("bkqd,bksd->bkqs", qg[:, :, r0:r1], kk[:, :, :s1],
                       preferred_element_type=jnp.float32) * scale
        seen = kpos[None, :s1] <= qrows[r0:r1, None]
        if window is not None:
            seen = seen & (kpos[None, :s1] > qrows[r0:r1, None] - window)
        s = jnp.where(seen, s, -jnp.inf)
        p = jax.nn.softmax(s, -1)
        return jnp.einsum("bkqs,bksd->bkqd", p.astype(vv.dtype), vv[:, :, :s1],
                          preferred_element_type=jnp.float32)

    if causal_chunks and T == S and T > chunk:
        outs = [part(c * g, min(c + chunk, T) * g, min(c + chunk, T)) for c in range(0, T, chunk)]
        o = jnp.concatenate(outs, 2)
    else:
        o = part(0, T * g, S)
    return o.reshape(B, KV, T, g, hd).transpose(0, 2, 1, 3, 4).reshape(B, T, H * hd)


class DecoderLM(nnx.Module):
    """Token ids (B, T) int32 -> logits (B, T, vocab) float32: embed, the blocks in
    `layers` (each `block(x, positions[, cache])`), final `norm` and the head (`lm_head`, or
    the embeddings when tied). `embed_scale` (a float or None) multiplies the embeddings
    (Gemma's sqrt(hidden)).

    Args (of a family's subclass calling this constructor): spec (vocab_size, hidden_size,
    num_layers, rms_eps, tie_embeddings), dtype of the embeddings and linears, block(spec,
    dtype, layer) -> a block, embed_scale.
    """

    def __init__(self, spec, dtype, block, embed_scale=None):
        self.spec = spec
        self.embed_tokens = nnx.Param(jnp.zeros((spec.vocab_size, spec.hidden_size), dtype))
        self.layers = nnx.List([block(spec, dtype, i) for i in range(spec.num_layers)])
        self.norm = RMSNorm(spec.hidden_size, spec.rms_eps)
        self.lm_head = None if spec.tie_embeddings else Linear(spec.hidden_size, spec.vocab_size,
                                                               dtype=dtype)
        self.embed_scale = embed_scale

    def embed(self, tokens):
        x = self.embed_tokens[...][tokens].astype(jnp.float32)
        return x if self.embed_scale is None else x * jnp.float32(self.embed_scale)

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


class Head(nnx.Module):
    """The output head of a model on its own: final norm + lm_head, or the tied embeddings
    (`DecoderLM.head`). It shares the model's variables."""

    head = DecoderLM.head

    def __init__(self, model):
        self.norm = model.norm
        self.lm_head = model.lm_head
        self.embed_tokens = model.embed_tokens


def self_attention(attn, h, positions, cache):
    """(attn(h, positions), cache): an attention module called with or without a decoding
    cache (it returns (out, new cache) with one)."""
    if cache is None:
        return attn(h, positions), None
    return attn(h, positions, cache)


def attend(q, k, v, positions, cache, dtype, scale: Optional[float] = None,
           window: Optional[int] = None):
    """Attention of roped q (B, T, H, hd), k/v (B, T, KV, hd) at `positions`, through an
    optional decoding cache (k_cache, v_cache, length): the new keys/values are written at
    [length, length + T). Matmul inputs in `dtype`. Returns (o (B, T, H * hd) float32,
    new cache or None)."""
    T = q.shape[1]
    if cache is not None:
        ck, cv, length = cache
        k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, length, 0, 0))
        v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, length, 0, 0))
        new_cache = (k, v, length + T)
        kpos = jnp.arange(k.shape[1])
    else:
        new_cache = None
        kpos = positions
    o = attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), positions, kpos,
                  causal_chunks=cache is None, scale=scale, window=window)
    return o, new_cache


# logits (positions x vocabulary) above which the loss is computed in chunks of positions:
# a 2048-token window over Gemma 3's 262,144-token vocabulary is 2 GB of float32 logits
CHUNKED_LOGITS = 1 << 28


def nll_sum(head, x, tokens, chunk: int = 256):
    """Sum over b, t of -log p(tokens[b, t + 1] | ...), float32 (), from the last hidden
    states x (B, T, d) float32 (before the final norm) and tokens (B, T) int32; head(x) ->
    logits (a `DecoderLM.head`). Above CHUNKED_LOGITS logits the head runs on `chunk`
    positions at a time (`lax.map`), so memory does not grow with the vocabulary."""
    B, T, d = x.shape
    n = T - 1
    if n * _vocab(head, x[:, :1]) <= CHUNKED_LOGITS:
        logits = head(x[:, :-1])
        logz = jax.nn.logsumexp(logits, -1)
        tgt = jnp.take_along_axis(logits, tokens[:, 1:, None], -1)[..., 0]
        return jnp.sum(logz - tgt)
    nc = -(-n // chunk)
    pad = nc * chunk - n
    xs = jnp.pad(x[:, :-1], ((0, 0), (0, pad), (0, 0))).reshape(B, nc, chunk, d).swapaxes(0, 1)
    tg = jnp.pad(tokens[:, 1:], ((0, 0), (0, pad))).reshape(B, nc, chunk).swapaxes(0, 1)
    valid = (jnp.arange(nc * chunk) < n).reshape(nc, chunk)

    def one(args):
        xc, tc, vc = args
        logits = head(xc)                                   # (B, chunk, V) float32
        logz = jax.nn.logsumexp(logits, -1)
        tgt = jnp.take_along_axis(logits, tc[..., None], -1)[..., 0]
        return jnp.sum(jnp.where(vc[None], logz - tgt, 0.0))

    return jnp.sum(jax.lax.map(one, (xs, tg, valid)))


def randomize(model, key, scale: float = 0.05):
    """Fill the `nnx.Param`s of model in place (and return it): vectors (norms, biases)
    1 + N(0, 0.1^2), matrices N(0, scale^2), one key per parameter (tests, benchmarks)."""
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


def _vocab(head, x1):
    return jax.eval_shape(head, x1).shape[-1]
