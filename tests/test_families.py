"""The Llama-family variants (Llama, Mistral, Qwen2, Qwen3, Phi-3) against an independent
float64 NumPy forward, on tiny random configs written as transformers writes them and
safetensors written here, read through the loaders a user's folder goes through; and the
same weights as llama.cpp GGUF files (F32 tensors, llama.cpp's tensor names and, for the
llama architecture, its Q/K row permutation)."""
import os

import numpy as np
import pytest

from quipjax.models import loaders

from helpers import needs_text, write_gguf, write_word_tokenizer

T = 24          # longer than the sliding windows below, so they matter


def configs():
    from transformers import (LlamaConfig, MistralConfig, Phi3Config, Qwen2Config,
                              Qwen3Config)
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-5)
    return {
        "llama": LlamaConfig(**common, tie_word_embeddings=False),
        "mistral": MistralConfig(**common, sliding_window=7, tie_word_embeddings=False),
        "qwen2": Qwen2Config(**common, tie_word_embeddings=True, rope_theta=1e6),
        "qwen3": Qwen3Config(**common, head_dim=24, tie_word_embeddings=True),
        "phi3": Phi3Config(**dict(common, num_key_value_heads=4), sliding_window=9,
                           partial_rotary_factor=0.5, tie_word_embeddings=False,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2),
    }


def hf_tensors(kind, c, seed=0):
    """Random HF-named float32 tensors of config dict c."""
    rng = np.random.default_rng(seed)
    d, f, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    h, kv = c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim") or d // h
    t = {"model.embed_tokens.weight": rng.normal(0, 1, (V, d)),
         "model.norm.weight": 1 + 0.1 * rng.normal(size=d)}
    if not c["tie_word_embeddings"]:
        t["lm_head.weight"] = rng.normal(0, 0.1, (V, d))
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = 1 + 0.1 * rng.normal(size=d)
        t[p + "post_attention_layernorm.weight"] = 1 + 0.1 * rng.normal(size=d)
        if kind == "phi3":
            t[p + "self_attn.qkv_proj.weight"] = rng.normal(0, 0.15, ((h + 2 * kv) * hd, d))
            t[p + "mlp.gate_up_proj.weight"] = rng.normal(0, 0.15, (2 * f, d))
        else:
            for n, rows in (("q", h * hd), ("k", kv * hd), ("v", kv * hd)):
                t[p + f"self_attn.{n}_proj.weight"] = rng.normal(0, 0.15, (rows, d))
                if kind == "qwen2":
                    t[p + f"self_attn.{n}_proj.bias"] = rng.normal(0, 0.5, rows)
            t[p + "mlp.gate_proj.weight"] = rng.normal(0, 0.15, (f, d))
            t[p + "mlp.up_proj.weight"] = rng.normal(0, 0.15, (f, d))
        if kind == "qwen3":
            t[p + "self_attn.q_norm.weight"] = 1 + 0.1 * rng.normal(size=hd)
            t[p + "self_attn.k_norm.weight"] = 1 + 0.1 * rng.normal(size=hd)
        t[p + "self_attn.o_proj.weight"] = rng.normal(0, 0.15, (d, h * hd))
        t[p + "mlp.down_proj.weight"] = rng.normal(0, 0.15, (d, f))
    return {k: np.asarray(v, np.float32) for k, v in t.items()}


def reference(kind, c, t, tokens, divisors=1.0):
    """Logits (T, V) float64 of the HF model of config dict c with tensors t: written from the
    transformers modeling code's definitions, independently of quipjax. divisors: of the RoPE
    frequencies (scalar or one per frequency: rope scaling)."""
    W = {k: v.astype(np.float64) for k, v in t.items()}
    d, h, kv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim") or d // h
    rope = c.get("rope_parameters") or {}
    theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
    partial = rope.get("partial_rotary_factor", c.get("partial_rotary_factor") or 1.0)
    rd = int(hd * partial)
    window = c.get("sliding_window") if kind in ("mistral", "phi3") else None
    eps = c["rms_norm_eps"]
    n = len(tokens)
    pos = np.arange(n, dtype=np.float64)
    inv = 1.0 / theta ** (np.arange(0, rd, 2) / rd) / divisors
    ang = pos[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], 1)), np.sin(np.concatenate([ang, ang], 1))

    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    def rot(x):                                          # (n, heads, hd): rotate-half on rd
        xr, rest = x[..., :rd], x[..., rd:]
        half = np.concatenate([-xr[..., rd // 2:], xr[..., :rd // 2]], -1)
        return np.concatenate([xr * cos[:, None] + half * sin[:, None], rest], -1)

    def lin(x, name):
        y = x @ W[name + ".weight"].T
        return y + W[name + ".bias"] if name + ".bias" in W else y

    x = W["model.embed_tokens.weight"][tokens]
    i_q, i_k = np.arange(n)[:, None], np.arange(n)[None, :]
    allowed = i_k <= i_q
    if window:
        allowed &= i_k > i_q - window
    for L in range(c["num_hidden_layers"]):
        p = f"model.layers.{L}."
        a = rms(x, W[p + "input_layernorm.weight"])
        if kind == "phi3":
            qkv = lin(a, p + "self_attn.qkv_proj")
            q, k, v = np.split(qkv, [h * hd, (h + kv) * hd], -1)
        else:
            q, k, v = (lin(a, p + f"self_attn.{m}_proj") for m in "qkv")
        q, k, v = q.reshape(n, h, hd), k.reshape(n, kv, hd), v.reshape(n, kv, hd)
        if kind == "qwen3":
            q, k = rms(q, W[p + "self_attn.q_norm.weight"]), rms(k, W[p + "self_attn.k_norm.weight"])
        q, k = rot(q), rot(k)
        out = np.zeros((n, h, hd))
        for head in range(h):
            j = head // (h // kv)
            s = q[:, head] @ k[:, j].T / np.sqrt(hd)
            s = np.where(allowed, s, -np.inf)
            pr = np.exp(s - s.max(-1, keepdims=True))
            out[:, head] = (pr / pr.sum(-1, keepdims=True)) @ v[:, j]
        x = x + lin(out.reshape(n, h * hd), p + "self_attn.o_proj")
        m = rms(x, W[p + "post_attention_layernorm.weight"])
        if kind == "phi3":
            gate, up = np.split(lin(m, p + "mlp.gate_up_proj"), 2, -1)
        else:
            gate, up = lin(m, p + "mlp.gate_proj"), lin(m, p + "mlp.up_proj")
        x = x + lin(gate / (1 + np.exp(-gate)) * up, p + "mlp.down_proj")
    x = rms(x, W["model.norm.weight"])
    head = W.get("lm_head.weight", W["model.embed_tokens.weight"])
    return x @ head.T


def write_hf(path, cfg, tensors):
    from safetensors.numpy import save_file
    os.makedirs(path, exist_ok=True)
    cfg.to_json_file(os.path.join(path, "config.json"))
    save_file(tensors, os.path.join(path, "model.safetensors"))


def quipjax_logits(path, tokens):
    import jax.numpy as jnp
    src = loaders.open_checkpoint(path)
    model = loaders.load_model(src, jnp.float32)
    return np.asarray(model(jnp.asarray(tokens)[None]))[0], src


KINDS = ["llama", "mistral", "qwen2", "qwen3", "phi3"]


@pytest.mark.parametrize("kind", KINDS)
def test_hf_folder_matches_float64_numpy(kind, tmp_path):
    cfg = configs()[kind]
    c = cfg.to_dict()
    tensors = hf_tensors(kind, c)
    write_hf(str(tmp_path / kind), cfg, tensors)
    tokens = np.random.default_rng(1).integers(0, c["vocab_size"], T)
    got, src = quipjax_logits(str(tmp_path / kind), tokens)
    want = reference(kind, c, tensors, tokens)
    assert src.spec.model_type == kind
    assert np.abs(want).max() > 1.0                   # not a vanishing signal
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "phi3"])
def test_gguf_matches_float64_numpy(kind, tmp_path):
    cfg = configs()[kind]
    c = cfg.to_dict()
    tensors = hf_tensors(kind, c, seed=2)
    path = str(tmp_path / f"{kind}.gguf")
    write_gguf(path, kind, c, tensors)
    tokens = np.random.default_rng(3).integers(0, c["vocab_size"], T)
    got, src = quipjax_logits(path, tokens)
    np.testing.assert_allclose(got, reference(kind, c, tensors, tokens), atol=1e-4, rtol=0)
    assert src.kind == "gguf" and src.spec.model_type == kind


@pytest.mark.parametrize("how", ["rope_freqs", "linear"])
def test_gguf_rope_scaling(how, tmp_path):
    """llama.cpp's two ways of storing rope scaling for the llama architecture: per-frequency
    divisors as a `rope_freqs.weight` tensor (Llama 3.1 / 3.2) and rope.scaling.type linear
    with its factor. Read, not ignored: the logits follow the scaled frequencies."""
    cfg = configs()["llama"]
    c = cfg.to_dict()
    tensors = hf_tensors("llama", c, seed=4)
    n_freq = c["hidden_size"] // c["num_attention_heads"] // 2
    if how == "rope_freqs":
        divisors = np.linspace(1.0, 8.0, n_freq)
        kw = dict(rope_factors=divisors)
    else:
        divisors = 4.0
        kw = dict(header=lambda w: (w.add_rope_scaling_type(__import__("gguf").RopeScalingType.LINEAR),
                                    w.add_rope_scaling_factor(4.0)))
    path = str(tmp_path / "scaled.gguf")
    write_gguf(path, "llama", c, tensors, **kw)
    tokens = np.random.default_rng(5).integers(0, c["vocab_size"], T)
    got, src = quipjax_logits(path, tokens)
    want = reference("llama", c, tensors, tokens, divisors)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    unscaled = reference("llama", c, tensors, tokens)
    assert np.abs(unscaled - want).max() > 1e-2        # the scaling matters at these positions
    assert dict(src.spec.rope_scaling)["rope_type"] == ("freq_factors" if how == "rope_freqs"
                                                       else "linear")
    # a checkpoint's spec survives its JSON round trip (the factors come back as a tuple)
    import json
    from quipjax.models.families import spec_from_dict
    assert spec_from_dict(json.loads(json.dumps(src.spec.to_dict()))) == src.spec


def test_unknown_architectures_are_refused(tmp_path):
    from transformers import Qwen2Config
    cfg = Qwen2Config(vocab_size=16, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=2, use_sliding_window=True, sliding_window=4,
                      max_window_layers=0)
    write_hf(str(tmp_path / "q"), cfg, {"x": np.zeros(1, np.float32)})
    with pytest.raises(ValueError, match="sliding-window layers"):
        loaders.open_checkpoint(str(tmp_path / "q"))
    c = cfg.to_dict()
    c["model_type"] = "falcon"
    path = tmp_path / "f"
    os.makedirs(path)
    import json
    json.dump(c, open(path / "config.json", "w"))
    with pytest.raises(ValueError, match="model_type 'falcon' is not supported"):
        loaders.open_checkpoint(str(path))


def test_family_rules_give_the_fixed_groups():
    """The Llama family's default rules derive exactly the groups (and order) quipjax has
    always quantized; rules that match nothing or a non-linear are refused by name."""
    from quipjax.models import families
    from quipjax.models.adapter import LLAMA, ModelAdapter
    from quipjax.rule import Rule
    from helpers import TINY
    assert families.adapter_of(TINY) == LLAMA
    block = families.LLAMA_FAMILY.abstract_block(TINY)
    with pytest.raises(ValueError, match=r"Rule\(pattern='mlp\\\\.nothing'.*matches no module"):
        ModelAdapter.from_rules("llama", block, (Rule(r"mlp\.nothing"),))
    with pytest.raises(ValueError, match="matches input_layernorm, a RMSNorm, not a linear"):
        ModelAdapter.from_rules("llama", block, (Rule(r"input_layernorm"),))


@needs_text
def test_pipeline_phi3_with_rules(tmp_path, monkeypatch):
    """quantize.py's job on a Phi-3 folder (fused linears, partial RoPE, sliding window) with
    --rules: down_proj at 4 bits, o_proj kept in floating point, the fused qkv_proj and
    gate_up_proj at the run's 2 bits. The checkpoint says so, the model rebuilt from the
    codes computes what the dequantized one does, and a rerun without the rules is refused."""
    import json
    import jax.numpy as jnp
    from quipjax.pipeline import checkpoint as ckpt
    from quipjax.pipeline.build import build_model
    from quipjax.pipeline.run import quantize_model
    from quipjax.pipeline.settings import RunConfig
    monkeypatch.setenv("QUIPJAX_CACHE", str(tmp_path / "cache"))
    cfg = configs()["phi3"]
    path = str(tmp_path / "phi3")
    tensors = hf_tensors("phi3", cfg.to_dict())
    write_hf(path, cfg, tensors)
    write_word_tokenizer(path, cfg.vocab_size)
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([{"pattern": r"mlp\.down_proj", "codebook": "E8P12RVQ4B"},
                                 {"pattern": r"self_attn\.o_proj", "skip": True}]))
    run = RunConfig(model=path, output_dir=str(tmp_path / "out"), devset_size=2, ctx_size=32,
                    evaluate=False, dtype="float32", rules=str(rules))
    quantize_model(run, log=lambda *a: None)
    meta = ckpt.read_meta(run.output_dir)
    assert meta["model"]["model_type"] == "phi3"
    assert sorted(meta["quantized_linears"]) == ["mlp.down_proj", "mlp.gate_up_proj",
                                                 "self_attn.qkv_proj"]
    groups, fp = ckpt.load_layer(run.output_dir, 1)[:2]
    assert sorted(groups) == ["mlp.down_proj", "qkv", "up"]
    assert groups["mlp.down_proj"].ql.codebook == "E8P12RVQ4B"
    assert groups["qkv"].ql.codebook == groups["up"].ql.codebook == "E8P12"
    o = tensors["model.layers.1.self_attn.o_proj.weight"]
    np.testing.assert_array_equal(fp["self_attn.o_proj.weight"], o)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 16)))
    deq = build_model(run.output_dir, dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(deq.layers[1].self_attn.o_proj.weight[...]), o)
    codes = build_model(run.output_dir, linears="codes", dtype=jnp.float32, backend="xla")
    a, b = np.asarray(deq(tokens)), np.asarray(codes(tokens))
    np.testing.assert_allclose(b, a, atol=2e-3 * np.abs(a).max())
    with pytest.raises(ValueError, match="rules"):
        quantize_model(RunConfig(**{**run.__dict__, "rules": None}), log=lambda *a: None)
