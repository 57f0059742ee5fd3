import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from quipjax.models import llama
from quipjax.pipeline import evaluate


def np_forward(params, spec, tokens):
    """An independent float64 NumPy Llama forward (HF conventions)."""
    P = {k: np.asarray(v, np.float64) for k, v in params.items()}
    H, KV, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
    T = tokens.shape[0]
    inv = 1.0 / spec.rope_theta ** (np.arange(0, hd, 2) / hd)
    sc = dict(spec.rope_scaling or ())
    if sc.get("rope_type") == "llama3":
        f, lo, hi, old = (sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"],
                          sc["original_max_position_embeddings"])
        out = []
        for fr in inv:
            wl = 2 * math.pi / fr
            if wl < old / hi:
                out.append(fr)
            elif wl > old / lo:
                out.append(fr / f)
            else:
                s = (old / wl - lo) / (hi - lo)
                out.append((1 - s) * fr / f + s * fr)
        inv = np.array(out)
    ang = np.arange(T)[:, None] * inv[None, :]
    cos, sin = np.cos(np.concatenate([ang, ang], 1)), np.sin(np.concatenate([ang, ang], 1))

    def rope(x):  # (T, h, hd)
        rot = np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1)
        return x * cos[:, None] + rot * sin[:, None]

    def rms(x, w):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + spec.rms_eps) * w

    def lin(x, name):
        y = x @ P[name + ".weight"].T
        return y + P[name + ".bias"] if name + ".bias" in P else y

    x = P["embed"][tokens]
    for i in range(spec.num_layers):
        p = f"l{i}."
        h = rms(x, P[p + "input_layernorm.weight"])
        q = rope(lin(h, p + "self_attn.q_proj").reshape(T, H, hd))
        k = rope(lin(h, p + "self_attn.k_proj").reshape(T, KV, hd))
        v = lin(h, p + "self_attn.v_proj").reshape(T, KV, hd)
        k, v = np.repeat(k, H // KV, 1), np.repeat(v, H // KV, 1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd)
        s = np.where(np.tril(np.ones((T, T), bool))[None], s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", s, v).reshape(T, H * hd)
        x = x + lin(o, p + "self_attn.o_proj")
        h = rms(x, P[p + "post_attention_layernorm.weight"])
        g = lin(h, p + "mlp.gate_proj")
        x = x + lin(g / (1 + np.exp(-g)) * lin(h, p + "mlp.up_proj"), p + "mlp.down_proj")
    x = rms(x, P["norm"])
    return x @ (P["embed"] if spec.tie_embeddings else P["lm_head"]).T


def flat_params(model):
    out = {"embed": model.embed_tokens[...], "norm": model.norm.weight[...]}
    if model.lm_head is not None:
        out["lm_head"] = model.lm_head.weight[...]
    for i, b in enumerate(model.layers):
        for path, v in nnx.to_flat_state(nnx.state(b, nnx.Param)):
            out[f"l{i}." + ".".join(str(p) for p in path)] = v[...]
    return out


SPECS = {
    "tied_gqa": llama.LlamaSpec(vocab_size=97, hidden_size=64, intermediate_size=96,
                                num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                                rope_theta=10000.0, rms_eps=1e-5, tie_embeddings=True),
    "untied_llama3_bias": llama.LlamaSpec(
        vocab_size=61, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=3,
        num_kv_heads=1, head_dim=16, rope_theta=500000.0, rms_eps=1e-6, tie_embeddings=False,
        attention_bias=True, mlp_bias=True,
        rope_scaling=tuple(sorted({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64}.items()))),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_logits_match_float64_numpy(name):
    spec = SPECS[name]
    model = llama.init_random(spec, jax.random.key(0), scale=0.2)
    tokens = np.random.default_rng(0).integers(0, spec.vocab_size, 300)   # > one 256-row chunk
    ours = np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(tokens[None])))[0]
    ref = np_forward(flat_params(model), spec, tokens)
    assert np.abs(ours - ref).max() < 1e-4, np.abs(ours - ref).max()
    # the block-by-block evaluator gives the same logits
    lay = np.asarray(evaluate.forward_logits(model, tokens[None]))[0]
    assert np.abs(lay - ref).max() < 1e-4


def test_perplexity_matches_logits():
    spec = SPECS["tied_gqa"]
    model = llama.init_random(spec, jax.random.key(1), scale=0.2)
    w = np.random.default_rng(1).integers(0, spec.vocab_size, (3, 40)).astype(np.int32)
    r = evaluate.perplexity(model, w)
    logits = np.asarray(model(jnp.asarray(w)), np.float64)
    lp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(lp[:, :-1], w[:, 1:, None], -1).mean()
    assert r["tokens"] == 3 * 39
    assert abs(math.log(r["ppl"]) - nll) < 1e-5


def test_kv_cache_decoding_matches_full_forward():
    spec = SPECS["tied_gqa"]
    model = llama.init_random(spec, jax.random.key(2), scale=0.2)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, spec.vocab_size, (1, 12)))
    full = model(tokens)
    caches = [(jnp.zeros((1, 16, spec.num_kv_heads, spec.head_dim)),) * 2 + (0,)
              for _ in model.layers]
    outs = []
    for t in range(12):
        x = model.embed(tokens[:, t:t + 1])
        new = []
        for layer, c in zip(model.layers, caches):
            x, c = layer(x, jnp.array([t]), c)
            new.append(c)
        caches = new
        outs.append(model.head(x))
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-4)


def test_from_hf_config_dict():
    cfg = {"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
           "rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0,
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192},
           "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
    spec = llama.LlamaSpec.from_hf(cfg)
    assert spec.head_dim == 16 and spec.rope_theta == 500000.0
    assert dict(spec.rope_scaling)["rope_type"] == "llama3"
    assert llama.LlamaSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="Llama-family"):
        llama.LlamaSpec.from_hf(dict(cfg, model_type="gpt2"))
    with pytest.raises(ValueError, match="not supported"):
        llama.rope_frequencies(llama.LlamaSpec.from_hf(
            dict(cfg, rope_parameters={"rope_theta": 1e4, "rope_type": "yarn", "factor": 2.0})))
