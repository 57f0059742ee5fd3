"""Mixture-of-experts families (Mixtral, Qwen3-MoE): the forward against an independent
float64 NumPy forward, Hessians of each expert from exactly the tokens routed to it, the
policy for experts that receive too few tokens, and the pipeline end to end (quantize,
evaluate, resume after a kill, codes vs dequantized logits)."""
import os

import numpy as np
import pytest

from quipjax.models import loaders
from quipjax.models.adapter import ModelAdapter
from quipjax.pipeline import hessians

from helpers import needs_text, write_gguf, write_word_tokenizer

STYLE = {"mixtral": ("block_sparse_moe", "w1", "w3", "w2"),
         "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj")}


def config(kind, layers=2):
    from transformers import MixtralConfig, Qwen3MoeConfig
    common = dict(vocab_size=96, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
                  tie_word_embeddings=False)
    if kind == "mixtral":
        return MixtralConfig(**common, intermediate_size=48, num_local_experts=4,
                             num_experts_per_tok=2)
    return Qwen3MoeConfig(**common, intermediate_size=80, moe_intermediate_size=40,
                          num_experts=6, num_experts_per_tok=2, norm_topk_prob=False,
                          head_dim=16)


def tensors(kind, c, seed=0):
    rng = np.random.default_rng(seed)
    attr, g, u, dn = STYLE[kind]
    d, V, h, kv = c["hidden_size"], c["vocab_size"], c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim") or d // h
    E = c.get("num_experts") or c.get("num_local_experts")
    f = c["intermediate_size"] if kind == "mixtral" else c["moe_intermediate_size"]
    t = {"model.embed_tokens.weight": rng.normal(0, 1, (V, d)),
         "model.norm.weight": 1 + 0.1 * rng.normal(size=d), "lm_head.weight": rng.normal(0, .1, (V, d))}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = 1 + 0.1 * rng.normal(size=d)
        t[p + "post_attention_layernorm.weight"] = 1 + 0.1 * rng.normal(size=d)
        for n, rows in (("q", h * hd), ("k", kv * hd), ("v", kv * hd)):
            t[p + f"self_attn.{n}_proj.weight"] = rng.normal(0, 0.15, (rows, d))
        t[p + "self_attn.o_proj.weight"] = rng.normal(0, 0.15, (d, h * hd))
        if kind == "qwen3_moe":
            t[p + "self_attn.q_norm.weight"] = 1 + 0.1 * rng.normal(size=hd)
            t[p + "self_attn.k_norm.weight"] = 1 + 0.1 * rng.normal(size=hd)
        t[p + f"{attr}.gate.weight"] = rng.normal(0, 0.5, (E, d))
        for e in range(E):
            q = p + f"{attr}.experts.{e}."
            t[q + g + ".weight"] = rng.normal(0, 0.15, (f, d))
            t[q + u + ".weight"] = rng.normal(0, 0.15, (f, d))
            t[q + dn + ".weight"] = rng.normal(0, 0.15, (d, f))
    return {k: np.asarray(v, np.float32) for k, v in t.items()}


def reference(kind, c, t, tokens):
    """(logits (T, V), [per layer: (MoE input (T, d), routed (T, E) bool)]) in float64, from
    the transformers modeling code's definitions, independently of quipjax."""
    W = {k: v.astype(np.float64) for k, v in t.items()}
    attr, g, u, dn = STYLE[kind]
    d, h, kv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim") or d // h
    E = c.get("num_experts") or c.get("num_local_experts")
    k_top = c["num_experts_per_tok"]
    norm_top = kind == "mixtral" or c.get("norm_topk_prob")
    theta = (c.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    eps, n = c["rms_norm_eps"], len(tokens)
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    ang = np.arange(n)[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], 1)), np.sin(np.concatenate([ang, ang], 1))

    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    def rot(x):
        half = np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1)
        return x * cos[:, None] + half * sin[:, None]

    x = W["model.embed_tokens.weight"][tokens]
    causal = np.tril(np.ones((n, n), bool))
    seen = []
    for L in range(c["num_hidden_layers"]):
        p = f"model.layers.{L}."
        a = rms(x, W[p + "input_layernorm.weight"])
        q, k, v = ((a @ W[p + f"self_attn.{m}_proj.weight"].T).reshape(n, -1, hd) for m in "qkv")
        if kind == "qwen3_moe":
            q, k = rms(q, W[p + "self_attn.q_norm.weight"]), rms(k, W[p + "self_attn.k_norm.weight"])
        q, k = rot(q), rot(k)
        o = np.zeros((n, h, hd))
        for head in range(h):
            j = head // (h // kv)
            s = np.where(causal, q[:, head] @ k[:, j].T / np.sqrt(hd), -np.inf)
            pr = np.exp(s - s.max(-1, keepdims=True))
            o[:, head] = pr / pr.sum(-1, keepdims=True) @ v[:, j]
        x = x + o.reshape(n, -1) @ W[p + "self_attn.o_proj.weight"].T
        m = rms(x, W[p + "post_attention_layernorm.weight"])
        logits = m @ W[p + f"{attr}.gate.weight"].T
        prob = np.exp(logits - logits.max(-1, keepdims=True))
        prob /= prob.sum(-1, keepdims=True)
        top = np.argsort(-prob, -1, kind="stable")[:, :k_top]
        routed = np.zeros((n, E), bool)
        np.put_along_axis(routed, top, True, -1)
        wts = np.where(routed, prob, 0.0)
        if norm_top:
            wts /= wts.sum(-1, keepdims=True)
        out = np.zeros_like(m)
        for e in range(E):
            q_ = p + f"{attr}.experts.{e}."
            gt, up = m @ W[q_ + g + ".weight"].T, m @ W[q_ + u + ".weight"].T
            out += wts[:, e:e + 1] * ((gt / (1 + np.exp(-gt)) * up) @ W[q_ + dn + ".weight"].T)
        seen.append((m, routed))
        x = x + out
    return rms(x, W["model.norm.weight"]) @ W["lm_head.weight"].T, seen


def write_folder(path, cfg, t):
    from safetensors.numpy import save_file
    os.makedirs(path, exist_ok=True)
    cfg.to_json_file(os.path.join(path, "config.json"))
    save_file(t, os.path.join(path, "model.safetensors"))
    write_word_tokenizer(path, cfg.vocab_size)


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_forward_matches_float64_numpy(kind, tmp_path):
    import jax.numpy as jnp
    cfg = config(kind)
    c = cfg.to_dict()
    t = tensors(kind, c)
    write_folder(str(tmp_path), cfg, t)
    src = loaders.open_checkpoint(str(tmp_path))
    assert src.spec.model_type == kind and src.family.name == "moe"
    tokens = np.random.default_rng(1).integers(0, c["vocab_size"], 20)
    got = np.asarray(loaders.load_model(src, jnp.float32)(jnp.asarray(tokens)[None]))[0]
    want, _ = reference(kind, c, t, tokens)
    assert np.abs(want).max() > 1
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind,per_expert", [("mixtral", False), ("mixtral", True),
                                             ("qwen3_moe", False)])
def test_gguf_matches_float64_numpy(kind, per_expert, tmp_path):
    """The same models as llama.cpp's converter writes them: Mixtral as its llama
    architecture with experts (Q/K rows permuted), Qwen3-MoE as qwen3moe; experts stacked in
    (E, rows, cols) tensors (or one tensor per expert, older files). llama.cpp renormalizes
    the top-k weights of both, so the Qwen3-MoE config here has norm_topk_prob."""
    import jax.numpy as jnp
    cfg = config(kind)
    if kind == "qwen3_moe":
        cfg.norm_topk_prob = True
    c = cfg.to_dict()
    t = tensors(kind, c, seed=3)
    path = str(tmp_path / f"{kind}.gguf")
    write_gguf(path, {"mixtral": "llama", "qwen3_moe": "qwen3moe"}[kind], c, t,
               model_type=kind, per_expert=per_expert)
    src = loaders.open_checkpoint(path)
    assert src.kind == "gguf" and src.spec.model_type == kind and src.family.name == "moe"
    tokens = np.random.default_rng(4).integers(0, c["vocab_size"], 20)
    got = np.asarray(loaders.load_model(src, jnp.float32)(jnp.asarray(tokens)[None]))[0]
    want, _ = reference(kind, c, t, tokens)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def stats(H, count):
    from quipjax.hessian import HessianStats
    n = H.shape[0]
    return HessianStats(np.asarray(H, np.float32), np.full(n, 0.5, np.float32), np.float32(count))


def test_starved_experts_take_the_pooled_hessian():
    """Fewer tokens than the input dimension -> the count-weighted pool of the layer's
    experts of the same kind, logged; dense groups untouched; an empty pool is an error."""
    n = 4
    rng = np.random.default_rng(0)
    A = [rng.normal(size=(n, n)) for _ in range(4)]
    Hs = [a @ a.T for a in A]
    st = {"o": stats(Hs[0], 50), "e0_up": stats(Hs[1], 10), "e1_up": stats(Hs[2], 3),
          "e2_up": stats(np.full((n, n), np.nan), 0)}
    ad = ModelAdapter(name="t", groups=(), pools=(("e0_up", "up"), ("e1_up", "up"),
                                                  ("e2_up", "up")))
    lines = []
    out = hessians.pool_starved(st, ad, 7, lines.append)
    pooled = (10 * Hs[1] + 3 * Hs[2]) / 13
    for g in ("e1_up", "e2_up"):
        np.testing.assert_allclose(out[g][0], pooled, rtol=1e-6)
        assert out[g][3] and np.isfinite(out[g][1]).all()
    assert out["e2_up"][2] == 0 and out["e1_up"][2] == 3
    assert not out["e0_up"][3] and np.array_equal(out["e0_up"][0], st["e0_up"].H)
    assert np.array_equal(out["o"][0], st["o"].H)
    assert len(lines) == 1 and "layer 7" in lines[0] and "e2_up: 0" in lines[0]
    with pytest.raises(ValueError, match="no calibration token reached any group of up"):
        hessians.pool_starved({"e0_up": stats(Hs[0], 0)}, ModelAdapter(
            name="t", groups=(), pools=(("e0_up", "up"),)), 0)


@needs_text
def test_pipeline_end_to_end(tmp_path, monkeypatch, run_killed):
    """Hessians per expert (checked against the tokens routed to it in the float64
    reference), quantization, evaluation, a killed run resumed with the same codes, and the
    codes model against the dequantized one."""
    import jax.numpy as jnp
    from quipjax.pipeline import checkpoint as ckpt
    from quipjax.pipeline.build import build_model
    from quipjax.pipeline.run import quantize_model
    from quipjax.pipeline.settings import QuantSettings, RunConfig
    from quipjax.pipeline import data
    monkeypatch.setenv("QUIPJAX_CACHE", str(tmp_path / "cache"))
    kind = "mixtral"
    cfg = config(kind)
    c = cfg.to_dict()
    t = tensors(kind, c)
    path = str(tmp_path / "model")
    write_folder(path, cfg, t)
    lines = []
    run = RunConfig(model=path, output_dir=str(tmp_path / "a"), settings=QuantSettings(seed=2),
                    devset_size=4, ctx_size=64, eval_ctx_size=32, eval_datasets=("c4",),
                    dtype="float32")
    metrics = quantize_model(run, log=lines.append)
    assert np.isfinite(metrics["ppl"]["quantized"]["c4"])
    assert len(ckpt.load_layer(run.output_dir, 0)[0]) == 2 + 2 * 4     # qkv, o, 4 x (up, down)

    # layer 0's expert Hessians: the routed tokens of the reference forward, nothing else
    src = loaders.open_checkpoint(path)
    windows = data.calibration_windows(src.tokenizer, 4, 64, 2)
    hdir = [d for d in (tmp_path / "cache" / "hessians").iterdir()][0]
    with np.load(hdir / "layer_000.npz") as z:
        H = {k: z[k] for k in z.files}
    rows, routed = [], []
    for w in windows:
        _, seen = reference(kind, c, t, w)
        rows.append(seen[0][0])
        routed.append(seen[0][1])
    X, R = np.concatenate(rows), np.concatenate(routed)
    checked = 0
    for e in range(4):
        cnt = int(R[:, e].sum())
        assert H[f"count_e{e}_up"] == cnt
        if cnt >= 64:
            Xe = X[R[:, e]]
            np.testing.assert_allclose(H[f"H_e{e}_up"], Xe.T @ Xe / cnt, rtol=2e-4, atol=2e-5)
            checked += 1
        else:
            assert H[f"pooled_e{e}_up"]
    assert checked >= 1

    # a killed run resumes and ends with the same codes; codes model = dequantized model
    run_b = RunConfig(**{**run.__dict__, "output_dir": str(tmp_path / "b"), "evaluate": False})
    run_killed(quantize_model, run_b)
    quantize_model(run_b, log=lambda *a: None)
    for i in range(2):
        ga, gb = ckpt.load_layer(run.output_dir, i)[0], ckpt.load_layer(run_b.output_dir, i)[0]
        for name in ga:
            assert np.array_equal(np.asarray(ga[name].ql.codes), np.asarray(gb[name].ql.codes))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, c["vocab_size"], (1, 16)))
    a = np.asarray(build_model(run.output_dir, linears="dequantized", dtype=jnp.float32)(tokens))
    b = np.asarray(build_model(run.output_dir, linears="codes", dtype=jnp.float32,
                               backend="xla")(tokens))
    np.testing.assert_allclose(b, a, atol=2e-3 * np.abs(a).max())
