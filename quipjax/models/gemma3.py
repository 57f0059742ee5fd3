"""Gemma 3 text decoders (HF `Gemma3ForCausalLM`, model_type "gemma3_text"; GGUF
architecture "gemma3") in Flax NNX, built on `quipjax.models.parts`.

Block (module paths = the HF names, so checkpoints load by name):

    h = input_layernorm(x)
    x = x + post_attention_layernorm(self_attn(h))        # sandwich norms
    x = x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))

    self_attn: q/k/v_proj -> q_norm / k_norm (RMSNorm over head_dim) -> RoPE -> attention
               scaled by query_pre_attn_scalar ** -0.5 -> o_proj
    mlp:       down_proj(gelu_tanh(gate_proj(x)) * up_proj(x))       (GeGLU)

Conventions:
  * Layer i is "sliding_attention" (keys at most sliding_window - 1 positions back, RoPE theta
    rope_local_theta, default 10000) or "full_attention" (all keys, RoPE theta rope_theta with
    the config's rope scaling); `Gemma3Spec.layer_types` says which. Gemma 3: every 6th layer
    (i + 1) % 6 == 0 is global.
  * RMSNorm weights are used AS STORED (parts.RMSNorm: x / rms(x) * w). HF checkpoints store w
    for a (1 + w) scale: `hf_tensor_transform` adds the 1 to every norm weight read from a HF
    folder. GGUF files store the weights with the 1 already added: use them as read.
  * The embeddings are multiplied by sqrt(hidden_size) (in float32; HF rounds the factor to the
    embedding dtype, which differs only for bf16 embeddings), the head is the tied embedding.
  * No Q/K row permutation in GGUF files of this architecture (llama.cpp runs Gemma with the
    rotate-half RoPE): GGUF tensors map by name only (`hf_name_from_gguf`).
  * Not implemented (rejected by `Gemma3Spec.from_hf`): attention / final logit softcapping
    (Gemma 2), bidirectional attention, activations other than tanh GELU, attention biases.

Numerics as parts.py: residual stream, norms, softmax and RoPE in float32, matmul inputs in the
weights' dtype with float32 accumulation.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from quipjax.models import parts
from quipjax.models.parts import DecoderLM, Linear, RMSNorm

__all__ = ["Gemma3Spec", "Attention", "MLP", "Block", "Gemma3", "MODEL_TYPES", "LAYER_TYPES",
           "layer_rope_frequencies", "hf_tensor_transform", "spec_from_gguf",
           "GGUF_BLOCK_NAMES", "init_random"]

# HF model_type values this module runs ("gemma3": the multimodal config, its text_config)
MODEL_TYPES = ("gemma3_text", "gemma3")
LAYER_TYPES = ("sliding_attention", "full_attention")
# Gemma 3: layer i is global iff (i + 1) % 6 == 0 (configs without layer_types, GGUF files)
SLIDING_WINDOW_PATTERN = 6
# the tanh-approximated GELU under its HF names
GELU_TANH = ("gelu_pytorch_tanh", "gelu_tanh")


def default_layer_types(num_layers: int, pattern: int = SLIDING_WINDOW_PATTERN) -> tuple:
    """("sliding_attention" | "full_attention",) * num_layers: every `pattern`-th global."""
    return tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                 for i in range(num_layers))


@dataclasses.dataclass(frozen=True)
class Gemma3Spec:
    """The architecture, as transformers' Gemma3TextConfig describes it."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float = 1e-6
    tie_embeddings: bool = True
    max_position: int = 32768
    bos_token_id: Optional[int] = 2
    eos_token_id: Optional[int] = 1
    model_type: str = "gemma3_text"
    sliding_window: int = 512
    layer_types: tuple = ()                  # per layer; () = default_layer_types(num_layers)
    rope_theta: float = 1e6                  # global (full_attention) layers
    rope_local_theta: float = 1e4            # sliding_attention layers
    rope_scaling: Optional[tuple] = None     # global layers: sorted (key, value) pairs
    query_pre_attn_scalar: float = 256.0     # scores scaled by query_pre_attn_scalar ** -0.5
    hidden_act: str = "gelu_pytorch_tanh"

    def __post_init__(self):
        if not self.layer_types:
            object.__setattr__(self, "layer_types", default_layer_types(self.num_layers))
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for "
                             f"{self.num_layers} layers: give one per layer")
        bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
        if bad:
            raise ValueError(f"layer_types {bad} are not supported (use {LAYER_TYPES})")
        if self.hidden_act not in GELU_TANH:
            raise ValueError(f"hidden_act {self.hidden_act!r}: Gemma 3 runs the tanh GELU "
                             f"{GELU_TANH} only")

    # the options of LlamaSpec that generic code reads; Gemma 3 has none of them
    attention_bias = property(lambda self: False)
    mlp_bias = property(lambda self: False)
    has_o_bias = property(lambda self: False)

    @staticmethod
    def from_hf(cfg: Any) -> "Gemma3Spec":
        """From a transformers Gemma3TextConfig (or its dict / config.json; a multimodal
        "gemma3" config is read through its text_config). Reads both rope layouts:
        rope_parameters {"sliding_attention": {...}, "full_attention": {...}} (transformers 5)
        and rope_theta / rope_local_base_freq / rope_scaling (older)."""
        d = cfg if isinstance(cfg, dict) else cfg.to_dict()
        if d.get("model_type") == "gemma3" and isinstance(d.get("text_config"), dict):
            d = dict(d["text_config"], model_type="gemma3_text")
        arch = d.get("model_type", "gemma3_text")
        if arch != "gemma3_text":
            raise ValueError(f"model_type {arch!r} is not a Gemma 3 text model ('gemma3_text')")
        check_supported(d)
        theta, local_theta, scaling = rope_settings(d)
        heads = d["num_attention_heads"]
        n = d["num_hidden_layers"]
        pattern = d.get("sliding_window_pattern") or d.get("_sliding_window_pattern")
        types = d.get("layer_types") or default_layer_types(n, pattern or SLIDING_WINDOW_PATTERN)
        eos = d.get("eos_token_id")
        hd = d.get("head_dim") or d["hidden_size"] // heads
        return Gemma3Spec(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"], num_layers=n, num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads, head_dim=hd,
            rms_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(d.get("tie_word_embeddings", True)),
            max_position=d.get("max_position_embeddings", 32768),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
            sliding_window=int(d.get("sliding_window") or 4096), layer_types=tuple(types),
            rope_theta=theta, rope_local_theta=local_theta, rope_scaling=scaling,
            query_pre_attn_scalar=float(d.get("query_pre_attn_scalar") or hd),
            hidden_act=d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layer_types"] = list(self.layer_types)
        d["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        return d

    @staticmethod
    def from_dict(d: dict) -> "Gemma3Spec":
        d = dict(d)
        d["layer_types"] = tuple(d.get("layer_types") or ())
        if d.get("rope_scaling"):
            d["rope_scaling"] = tuple(sorted(d["rope_scaling"].items()))
        return Gemma3Spec(**d)

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == "sliding_attention"


def check_supported(d: dict) -> None:
    """Raise for the options of a Gemma config dict this module does not run."""
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if d.get(key) is not None:
            raise ValueError(f"{key} = {d[key]}: logit softcapping is not implemented "
                             "(Gemma 3 configs have it None)")
    if d.get("use_bidirectional_attention"):
        raise ValueError("use_bidirectional_attention: only causal decoders are supported")
    if d.get("attention_bias"):
        raise ValueError("attention_bias: Gemma 3 projections without biases are supported only")
    act = d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in GELU_TANH:
        raise ValueError(f"hidden_activation {act!r}: Gemma 3 runs the tanh GELU {GELU_TANH} only")


def rope_settings(d: dict) -> tuple:
    """(global theta, local theta, global rope scaling as sorted pairs or None) of a config."""
    rp = d.get("rope_parameters")
    if isinstance(rp, dict) and ("full_attention" in rp or "sliding_attention" in rp):
        glob, loc = rp.get("full_attention") or {}, rp.get("sliding_attention") or {}
    else:       # older configs: one global rope dict (or none) + rope_local_base_freq
        glob = dict(rp or d.get("rope_scaling") or {})
        glob.setdefault("rope_theta", d.get("rope_theta", 1e6))
        loc = {"rope_theta": d.get("rope_local_base_freq", 1e4)}
    if loc.get("rope_type", loc.get("type", "default")) != "default":
        raise ValueError(f"rope scaling {loc} on the sliding-window layers is not supported")
    kind = glob.get("rope_type", glob.get("type", "default"))
    scaling = None if kind in (None, "default") else tuple(sorted(
        (k, v) for k, v in glob.items() if k != "rope_theta" and not isinstance(v, (list, dict))))
    if scaling:
        parts.rope_frequencies(1e4, 8, dict(scaling))   # an unsupported type fails here
    return (float(glob.get("rope_theta", 1e6)), float(loc.get("rope_theta", 1e4)), scaling)


def layer_rope_frequencies(spec: Gemma3Spec, layer: int) -> np.ndarray:
    """Inverse frequencies (head_dim // 2,) float64 of layer `layer`: local theta on the
    sliding-window layers, global theta with the rope scaling on the others."""
    if spec.is_sliding(layer):
        return parts.rope_frequencies(spec.rope_local_theta, spec.head_dim)
    return parts.rope_frequencies(spec.rope_theta, spec.head_dim, dict(spec.rope_scaling or ()))


class Attention(nnx.Module):
    def __init__(self, spec: Gemma3Spec, dtype, layer: int = 0):
        d, h, kv, hd = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.q_proj = Linear(d, h * hd, dtype=dtype)
        self.k_proj = Linear(d, kv * hd, dtype=dtype)
        self.v_proj = Linear(d, kv * hd, dtype=dtype)
        self.o_proj = Linear(h * hd, d, dtype=dtype)
        self.q_norm = RMSNorm(hd, spec.rms_eps)
        self.k_norm = RMSNorm(hd, spec.rms_eps)
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, hd
        self.window = spec.sliding_window if spec.is_sliding(layer) else None
        self.scale = float(spec.query_pre_attn_scalar) ** -0.5
        self.inv_freq = nnx.Variable(jnp.asarray(layer_rope_frequencies(spec, layer), jnp.float32))

    @property
    def compute_dtype(self):
        """The matmul input dtype: q_proj's (float32 when a stand-in has none)."""
        return getattr(self.q_proj, "matmul_dtype", jnp.float32)

    def __call__(self, x, positions, cache=None):
        """x (B, T, d) float32 at positions (T,) -> (B, T, d) float32; with a decoding
        cache (k, v, length) -> (out, new cache)."""
        B, T, _ = x.shape
        h, kv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_norm(self.q_proj(x).reshape(B, T, h, hd))
        k = self.k_norm(self.k_proj(x).reshape(B, T, kv, hd))
        v = self.v_proj(x).reshape(B, T, kv, hd)
        inv = self.inv_freq[...]
        q, k = parts.apply_rope(q, inv, positions), parts.apply_rope(k, inv, positions)
        o, new_cache = parts.attend(q, k, v, positions, cache, self.compute_dtype,
                                    scale=self.scale, window=self.window)
        out = self.o_proj(o)
        return out if cache is None else (out, new_cache)


class MLP(nnx.Module):
    """GeGLU: down_proj(gelu_tanh(gate_proj(x)) * up_proj(x))."""

    def __init__(self, spec: Gemma3Spec, dtype):
        d, f = spec.hidden_size, spec.intermediate_size
        self.gate_proj = Linear(d, f, dtype=dtype)
        self.up_proj = Linear(d, f, dtype=dtype)
        self.down_proj = Linear(f, d, dtype=dtype)

    def __call__(self, x):
        return self.down_proj(jax.nn.gelu(self.gate_proj(x), approximate=True) * self.up_proj(x))


class Block(nnx.Module):
    """One decoder layer with sandwich norms; `block(x, positions, cache=None)`."""

    def __init__(self, spec: Gemma3Spec, dtype=jnp.float32, layer: int = 0):
        d, eps = spec.hidden_size, spec.rms_eps
        self.input_layernorm = RMSNorm(d, eps)
        self.self_attn = Attention(spec, dtype, layer)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.pre_feedforward_layernorm = RMSNorm(d, eps)
        self.mlp = MLP(spec, dtype)
        self.post_feedforward_layernorm = RMSNorm(d, eps)

    def __call__(self, x, positions, cache=None):
        """x (B, T, d) float32 -> (B, T, d) float32 (and the new cache when one is given)."""
        a, new_cache = parts.self_attention(self.self_attn, self.input_layernorm(x), positions,
                                            cache)
        x = x + self.post_attention_layernorm(a)
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x if cache is None else (x, new_cache)


class Gemma3(DecoderLM):
    """Token ids (B, T) int32 -> logits (B, T, vocab) float32."""

    def __init__(self, spec: Gemma3Spec, dtype=jnp.float32):
        super().__init__(spec, dtype, Block, embed_scale=math.sqrt(spec.hidden_size))


# ---------------------------------------------------------------------------- checkpoints

def hf_tensor_transform(spec: Gemma3Spec, hf_name: str, array) -> np.ndarray:
    """A tensor read from a HF folder, as the model uses it: every RMSNorm weight (names
    ending in "norm.weight": the four block norms, q_norm, k_norm, the final norm) + 1, in
    float32 (HF stores w of a (1 + w) scale; the model multiplies by the weight as stored).
    Other tensors pass unchanged. Not for GGUF tensors (stored with the 1 added)."""
    del spec    # the same rule for every Gemma 3 size
    if hf_name.endswith("norm.weight"):
        return np.asarray(array, np.float32) + np.float32(1.0)
    return array


# llama.cpp block tensor names of the gemma3 architecture -> module paths (no row permutations)
GGUF_BLOCK_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
                    "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
                    "attn_k_norm": "self_attn.k_norm",
                    "post_attention_norm": "post_attention_layernorm",
                    "ffn_norm": "pre_feedforward_layernorm",
                    "post_ffw_norm": "post_feedforward_layernorm",
                    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                    "ffn_down": "mlp.down_proj"}


def spec_from_gguf(field: Callable, tensor_names=None) -> Gemma3Spec:
    """The spec of a gemma3 GGUF file from its metadata getter field(key, default) (as
    `GGUFFile.field`: raises for a missing key without default). tensor_names (optional, the
    GGUF tensor names): an "output.weight" makes the head untied.

    Not stored in GGUF files, taken as llama.cpp does: layer types (every 6th global),
    sliding-window RoPE theta 10000, and query_pre_attn_scalar = key_length (hidden / heads
    for the 27B, 62 layers of 5376)."""
    arch = field("general.architecture")
    if arch != "gemma3":
        raise ValueError(f"GGUF architecture {arch!r} is not 'gemma3'")
    g = lambda key, default=KeyError: field(f"gemma3.{key}", default)   # noqa: E731
    n, d, heads = g("block_count"), g("embedding_length"), g("attention.head_count")
    hd = g("attention.key_length", d // heads)
    if g("attention.value_length", hd) != hd:
        raise ValueError("gemma3 GGUF with value_length != key_length is not supported")
    scaling = None
    kind = g("rope.scaling.type", None)
    if kind not in (None, "none"):
        scaling = (("factor", float(g("rope.scaling.factor"))), ("rope_type", kind))
    big = n == 62 and d == 5376
    names = set(tensor_names or ())
    return Gemma3Spec(
        vocab_size=len(field("tokenizer.ggml.tokens")), hidden_size=d,
        intermediate_size=g("feed_forward_length"), num_layers=n, num_heads=heads,
        num_kv_heads=g("attention.head_count_kv", heads), head_dim=hd,
        # GGUF stores eps as float32: 7 significant digits give back the config's 1e-6
        rms_eps=float(f"{g('attention.layer_norm_rms_epsilon', 1e-6):.7g}"),
        tie_embeddings="output.weight" not in names,
        max_position=g("context_length", 32768),
        bos_token_id=field("tokenizer.ggml.bos_token_id", None),
        eos_token_id=field("tokenizer.ggml.eos_token_id", None),
        sliding_window=g("attention.sliding_window", 4096),
        layer_types=default_layer_types(n), rope_theta=float(g("rope.freq_base", 1e6)),
        rope_local_theta=1e4, rope_scaling=scaling,
        query_pre_attn_scalar=float(d // heads if big else hd))


def init_random(spec: Gemma3Spec, key, dtype=jnp.float32, scale: float = 0.05) -> Gemma3:
    """A Gemma3 with N(0, scale^2) matrices and norm weights about 1 (tests, benchmarks)."""
    return parts.randomize(Gemma3(spec, dtype), key, scale)
