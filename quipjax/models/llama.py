"""The Llama-family decoder in Flax NNX: Llama 1/2/3/3.1/3.2, Mistral, Qwen2/2.5 (q/k/v
biases), Qwen3 (q/k RMSNorm), Phi-3 (fused qkv_proj and gate_up_proj), SmolLM2, TinyLlama.

One block structure (pre-norm attention and SwiGLU MLP); the families differ in the options
of `LlamaSpec`, read from their HF configs by `LlamaSpec.from_hf`. Module paths are the HF
names (`self_attn.q_proj`, `mlp.gate_up_proj`, ...), so checkpoints load by name.

Plain modules, no quantization code: anything with `__call__(x) -> y` can stand in for a
`Linear` (quipjax swaps in recorders and quantized layers by module path).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from quipjax.models import parts
from quipjax.models.parts import DecoderLM, Linear, RMSNorm

__all__ = ["LlamaSpec", "Linear", "RMSNorm", "Attention", "MLP", "Block", "Llama",
           "rope_frequencies", "init_random", "random_block", "MODEL_TYPES", "hashable_rope"]

# HF model_type values this module runs
MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3")


@dataclasses.dataclass(frozen=True)
class LlamaSpec:
    """The architecture, as transformers' Llama / Mistral / Qwen2 / Qwen3 / Phi3 configs
    describe it. The options after `eos_token_id` default to plain Llama."""

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
    attention_bias: bool = False             # biases of q/k/v (and o, see o_bias)
    mlp_bias: bool = False
    max_position: int = 4096
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    model_type: str = "llama"                # the HF model_type it was read from
    o_bias: Optional[bool] = None            # o_proj bias; None: as attention_bias (Qwen2: False)
    qk_norm: bool = False                    # RMSNorm of each q/k head before RoPE (Qwen3)
    fused_qkv: bool = False                  # one qkv_proj, rows q | k | v (Phi-3)
    fused_gate_up: bool = False              # one gate_up_proj, rows gate | up (Phi-3)
    rotary_dim: Optional[int] = None         # RoPE over the first rotary_dim dims (None: all)
    sliding_window: Optional[int] = None     # keys at most sliding_window - 1 positions back

    @staticmethod
    def from_hf(cfg: Any) -> "LlamaSpec":
        """From a transformers config object or its dict (config.json)."""
        d = cfg if isinstance(cfg, dict) else cfg.to_dict()
        arch = d.get("model_type", "llama")
        if arch not in MODEL_TYPES:
            raise ValueError(f"model_type {arch!r} is not a Llama-family model {MODEL_TYPES}")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"hidden_act {act!r}: the {arch} family runs 'silu' only")
        heads = d["num_attention_heads"]
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        theta = d.get("rope_theta") or rope.get("rope_theta", 10000.0)
        rtype = rope.get("rope_type", rope.get("type", "default"))
        extra = ("rope_theta", "partial_rotary_factor")
        scaling = None if rtype in (None, "default") else tuple(sorted(
            (k, v) for k, v in rope.items() if k not in extra and not isinstance(v, (list, dict))))
        hd = d.get("head_dim") or d["hidden_size"] // heads
        partial = d.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 1.0
        if any(t != "full_attention" for t in d.get("layer_types") or ()) and arch != "mistral":
            raise ValueError(f"{arch} with sliding-window layers (use_sliding_window) is not "
                             "supported; set use_sliding_window false")
        window = d.get("sliding_window") if arch in ("mistral", "phi3") else None
        eos = d.get("eos_token_id")
        qwen2 = arch == "qwen2"
        spec = LlamaSpec(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_layers=d["num_hidden_layers"],
            num_heads=heads, num_kv_heads=d.get("num_key_value_heads") or heads, head_dim=hd,
            rope_theta=float(theta), rope_scaling=scaling, rms_eps=d.get("rms_norm_eps", 1e-6),
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=qwen2 or bool(d.get("attention_bias", False)),
            mlp_bias=bool(d.get("mlp_bias", False)),
            max_position=d.get("max_position_embeddings", 4096),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
            model_type=arch, o_bias=False if qwen2 else None, qk_norm=arch == "qwen3",
            fused_qkv=arch == "phi3", fused_gate_up=arch == "phi3",
            rotary_dim=None if partial == 1.0 else int(hd * partial),
            sliding_window=int(window) if window else None)
        rope_frequencies(spec)          # an unsupported rope scaling fails here, not later
        return spec

    @property
    def has_o_bias(self) -> bool:
        return self.attention_bias if self.o_bias is None else self.o_bias

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        return d

    @staticmethod
    def from_dict(d: dict) -> "LlamaSpec":
        return LlamaSpec(**hashable_rope(d))


def hashable_rope(d: dict) -> dict:
    """A spec dict (`to_dict`, JSON) with its rope scaling as sorted (key, value) tuples (lists,
    llama.cpp's frequency factors, as tuples): hashable, as the spec's field is."""
    d = dict(d)
    if d.get("rope_scaling"):
        d["rope_scaling"] = tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                                         for k, v in d["rope_scaling"].items()))
    return d


def rope_frequencies(spec: LlamaSpec) -> np.ndarray:
    """Inverse frequencies (rotary_dim // 2,) float64, with the config's rope scaling."""
    return parts.rope_frequencies(spec.rope_theta, spec.rotary_dim or spec.head_dim,
                                  dict(spec.rope_scaling or ()))


class Attention(nnx.Module):
    def __init__(self, spec: LlamaSpec, dtype):
        d, h, kv, hd = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
        b = spec.attention_bias
        if spec.fused_qkv:
            self.qkv_proj = Linear(d, (h + 2 * kv) * hd, bias=b, dtype=dtype)
        else:
            self.q_proj = Linear(d, h * hd, bias=b, dtype=dtype)
            self.k_proj = Linear(d, kv * hd, bias=b, dtype=dtype)
            self.v_proj = Linear(d, kv * hd, bias=b, dtype=dtype)
        self.o_proj = Linear(h * hd, d, bias=spec.has_o_bias, dtype=dtype)
        if spec.qk_norm:
            self.q_norm = RMSNorm(hd, spec.rms_eps)
            self.k_norm = RMSNorm(hd, spec.rms_eps)
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, hd
        self.fused, self.qk_norm, self.window = spec.fused_qkv, spec.qk_norm, spec.sliding_window
        self.inv_freq = nnx.Variable(jnp.asarray(rope_frequencies(spec), jnp.float32))

    @property
    def compute_dtype(self):
        """The matmul input dtype of the attention: its first projection's (float32 when
        that is a stand-in without one, e.g. a Hessian tap)."""
        first = self.qkv_proj if self.fused else self.q_proj
        return getattr(first, "matmul_dtype", jnp.float32)

    def qkv(self, x):
        """q (B, T, H, hd), k, v (B, T, KV, hd) float32 of x (B, T, d), before RoPE."""
        B, T, _ = x.shape
        h, kv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        if self.fused:
            y = self.qkv_proj(x)
            q, k, v = y[..., :h * hd], y[..., h * hd:(h + kv) * hd], y[..., (h + kv) * hd:]
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k, v = q.reshape(B, T, h, hd), k.reshape(B, T, kv, hd), v.reshape(B, T, kv, hd)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def __call__(self, x, positions, cache=None):
        """x (B, T, d) float32 -> (B, T, d). cache: optional (k, v, length) for decoding."""
        q, k, v = self.qkv(x)
        inv = self.inv_freq[...]
        q, k = parts.apply_rope(q, inv, positions), parts.apply_rope(k, inv, positions)
        o, new_cache = parts.attend(q, k, v, positions, cache, self.compute_dtype,
                                    window=self.window)
        out = self.o_proj(o)
        return out if cache is None else (out, new_cache)


class MLP(nnx.Module):
    def __init__(self, spec: LlamaSpec, dtype):
        d, f, b = spec.hidden_size, spec.intermediate_size, spec.mlp_bias
        if spec.fused_gate_up:
            self.gate_up_proj = Linear(d, 2 * f, bias=b, dtype=dtype)
        else:
            self.gate_proj = Linear(d, f, bias=b, dtype=dtype)
            self.up_proj = Linear(d, f, bias=b, dtype=dtype)
        self.down_proj = Linear(f, d, bias=b, dtype=dtype)
        self.fused = spec.fused_gate_up

    def __call__(self, x):
        if self.fused:
            y = self.gate_up_proj(x)
            f = y.shape[-1] // 2
            return self.down_proj(jax.nn.silu(y[..., :f]) * y[..., f:])
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nnx.Module):
    """Pre-norm attention and MLP with residuals. `ffn` names the MLP attribute ("mlp"; a
    mixture of experts puts its own there, `models.moe`)."""

    def __init__(self, spec: LlamaSpec, dtype, layer: int = 0, ffn=("mlp", None)):
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps)
        self.self_attn = Attention(spec, dtype)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_eps)
        self.ffn = ffn[0]
        setattr(self, ffn[0], MLP(spec, dtype) if ffn[1] is None else ffn[1])

    def __call__(self, x, positions, cache=None):
        a, new_cache = parts.self_attention(self.self_attn, self.input_layernorm(x), positions,
                                            cache)
        x = x + a
        x = x + getattr(self, self.ffn)(self.post_attention_layernorm(x))
        return x if cache is None else (x, new_cache)


class Llama(DecoderLM):
    """Token ids (B, T) int32 -> logits (B, T, vocab) float32."""

    def __init__(self, spec: LlamaSpec, dtype=jnp.float32):
        super().__init__(spec, dtype, Block)


def init_random(spec: LlamaSpec, key, dtype=jnp.float32, scale: float = 0.05) -> Llama:
    """A Llama with random weights (tests, benchmarks; `parts.randomize`)."""
    return parts.randomize(Llama(spec, dtype), key, scale)


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


def spec_from_gguf(field, arch: str, shapes: dict) -> LlamaSpec:
    """A LlamaSpec from a llama.cpp GGUF header. field(key, default): the header's fields;
    arch: general.architecture (llama, qwen2, qwen3, phi3); shapes: {HF tensor name: shape}
    of the file's tensors (biases and tied embeddings are read from what is stored)."""
    heads = field(f"{arch}.attention.head_count")
    d = field(f"{arch}.embedding_length")
    emb = shapes["model.embed_tokens.weight"]
    hd = field(f"{arch}.attention.key_length", d // heads)
    rot = field(f"{arch}.rope.dimension_count", hd)
    window = field(f"{arch}.attention.sliding_window", None) if arch == "phi3" else None
    kind = field(f"{arch}.rope.scaling.type", "none")
    if kind not in ("none", "linear"):
        raise ValueError(f"GGUF {arch}.rope.scaling.type {kind!r} is not supported (none, "
                         "linear; Llama 3.1 factors come as rope_freqs.weight)")
    scaling = ((("factor", float(field(f"{arch}.rope.scaling.factor"))), ("rope_type", "linear"))
               if kind == "linear" else None)
    return LlamaSpec(
        vocab_size=int(emb[0]) if len(emb) > 1 else len(field("tokenizer.ggml.tokens")),
        hidden_size=d, intermediate_size=field(f"{arch}.feed_forward_length"),
        num_layers=field(f"{arch}.block_count"), num_heads=heads,
        num_kv_heads=field(f"{arch}.attention.head_count_kv", heads), head_dim=hd,
        rope_theta=float(field(f"{arch}.rope.freq_base", 10000.0)), rope_scaling=scaling,
        rms_eps=float(field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_embeddings="lm_head.weight" not in shapes,
        attention_bias="model.layers.0.self_attn.q_proj.bias" in shapes,
        max_position=field(f"{arch}.context_length", 4096),
        bos_token_id=field("tokenizer.ggml.bos_token_id", None),
        eos_token_id=field("tokenizer.ggml.eos_token_id", None),
        model_type=arch, o_bias=("model.layers.0.self_attn.o_proj.bias" in shapes
                                 if arch == "qwen2" else None),
        qk_norm="model.layers.0.self_attn.q_norm.weight" in shapes,
        fused_qkv=arch == "phi3", fused_gate_up=arch == "phi3",
        rotary_dim=None if rot == hd else int(rot),
        sliding_window=int(window) if window else None)
