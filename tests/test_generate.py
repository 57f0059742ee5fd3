"""KV-cache generation and the codes-based inference model (tiny random models, fast)."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from quipjax import generate as gen
from quipjax.layers import Codes, CodesLinear
from quipjax.models import llama
from quipjax.models.adapter import LLAMA
from quipjax.pipeline import checkpoint as ckpt
from quipjax.pipeline.build import build_model

from helpers import TINY_GEN as SPEC


def build_inference_model(path, backend, dtype):
    return build_model(path, linears="codes", backend=backend, dtype=dtype)

def _fp_model(seed=0, spec=SPEC):
    return llama.init_random(spec, jax.random.key(seed), scale=0.2)


def _naive_greedy(model, prompt, n, width=32):
    """Greedy decoding by re-running the full forward pass on the whole sequence every step
    (right-padded to `width`, one compilation: causal attention makes the padding invisible)."""
    fwd = nnx.jit(lambda m, t: m(t))
    toks = list(prompt)
    logits = []
    for _ in range(n):
        buf = np.zeros((1, width), np.int32)
        buf[0, :len(toks)] = toks
        out = np.asarray(fwd(model, jnp.asarray(buf)))[0, len(toks) - 1]
        logits.append(out)
        toks.append(int(np.argmax(out)))
    return np.asarray(toks[len(prompt):], np.int32), np.stack(logits)


def test_kv_cache_greedy_equals_naive_forward():
    model = _fp_model()
    prompt = np.array([3, 17, 5, 9, 41], np.int32)
    want, want_logits = _naive_greedy(model, prompt, 12)
    out = gen.generate(model, prompt, 12, eos_id=None, return_logits=True, prefill_bucket=8)
    np.testing.assert_array_equal(out.tokens[0], want)
    np.testing.assert_allclose(out.logits[0], want_logits, rtol=1e-4, atol=1e-4)
    assert out.steps == 11 and out.tokens.dtype == np.int32
    # a batch of two different prompts: each row as if alone
    p2 = np.stack([prompt, np.array([1, 2, 60, 33, 7], np.int32)])
    b = gen.generate(model, p2, 6, eos_id=None, prefill_bucket=8)
    np.testing.assert_array_equal(b.tokens[0], want[:6])
    np.testing.assert_array_equal(b.tokens[1], _naive_greedy(model, p2[1], 6)[0])


def test_decode_step_compiled_once():
    model = _fp_model()
    gen.generate(model, [1, 2, 3], 5, eos_id=None, max_len=128)
    n0 = gen._decode_step._cache_size()
    gen.generate(model, [4, 5, 6, 7], 9, eos_id=None, max_len=128)   # same shapes: no retrace
    assert gen._decode_step._cache_size() == n0


def test_inference_model_structure(tiny_ckpt):
    path, meta = tiny_ckpt
    m = build_inference_model(path, backend="reference", dtype=jnp.float32)
    att = m.layers[0].self_attn
    assert isinstance(att.q_proj, CodesLinear) and att.q_proj.group is att.v_proj.group
    assert isinstance(m.layers[1].mlp.down_proj, CodesLinear)
    # the codes are Variables but not Params; a shared group is stored once
    params = nnx.to_flat_state(nnx.state(m, nnx.Param))
    assert not any(isinstance(v, Codes) for _, v in params)
    codes = [p for p, _ in nnx.to_flat_state(nnx.state(m, Codes))]
    assert len(codes) == SPEC.num_layers * len(LLAMA.groups), codes


@pytest.mark.parametrize("which", ["plain", "e2e"])
def test_inference_logits_equal_dequantized(which, tiny_ckpt, tiny_ckpt_e2e):
    path, meta = tiny_ckpt if which == "plain" else tiny_ckpt_e2e
    codes = build_inference_model(path, backend="reference", dtype=jnp.float32)
    dense = build_model(path, dtype=jnp.float32)
    tok = jnp.asarray(np.random.default_rng(2).integers(0, SPEC.vocab_size, (2, 24)), jnp.int32)
    fwd = nnx.jit(lambda m, t: m(t))
    a, b = np.asarray(fwd(codes, tok)), np.asarray(fwd(dense, tok))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())
    if which == "e2e":       # the tuned values are the ones used
        plain = ckpt.load_layer(path, 0)[0]["qkv"].ql.SU
        got = codes.layers[0].self_attn.q_proj.group.SU[...]
        assert not np.allclose(np.asarray(plain), np.asarray(got))


def test_codes_generation_equals_dequantized(tiny_ckpt):
    path, meta = tiny_ckpt
    codes = build_inference_model(path, backend="reference", dtype=jnp.float32)
    dense = build_model(path, dtype=jnp.float32)
    prompt = np.array([5, 6, 7, 8, 9, 10, 11], np.int32)
    a = gen.generate(codes, prompt, 16, eos_id=None)
    b = gen.generate(dense, prompt, 16, eos_id=None)
    np.testing.assert_array_equal(a.tokens, b.tokens)


def test_codes_generation_xla_backend(tiny_ckpt):
    path, meta = tiny_ckpt
    ref = build_inference_model(path, backend="reference", dtype=jnp.float32)
    xla = build_inference_model(path, backend="xla", dtype=jnp.float32)
    assert xla.layers[0].self_attn.q_proj.group.backend == "xla"
    prompt = np.array([5, 6, 7, 8, 9, 10, 11], np.int32)
    np.testing.assert_array_equal(gen.generate(ref, prompt, 12, eos_id=None).tokens,
                                  gen.generate(xla, prompt, 12, eos_id=None).tokens)


def test_fused_group_product_computed_once(tiny_ckpt):
    """q/k/v (and up/gate) each call the shared group; XLA's CSE must leave one decode and one
    decode-matmul per group in the optimized HLO of a block."""
    path, _ = tiny_ckpt
    m = build_inference_model(path, backend="reference", dtype=jnp.float32)
    graphdef, state = nnx.split(m.layers[0])
    f = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, jnp.arange(x.shape[1])))
    x = jnp.ones((1, 8, SPEC.hidden_size), jnp.float32)
    lowered = f.lower(state, x)
    members = sum(len(g.members) for g in LLAMA.groups)            # 7
    # the reference kernel's matmul is einsum("...n,mn->...m"), its decode a table gather
    pre = lowered.as_text(debug_info=True)
    assert len(re.findall(r'loc\("[^"]*\.\.\.n,mn->\.\.\.m/dot_general', pre)) == members
    hlo = lowered.compile().as_text()
    dec = [l for l in hlo.splitlines() if re.search(r"= \S+ dot\(", l) and "...n,mn->...m" in l]
    gathers = [l for l in hlo.splitlines()
               if re.search(r"= \S+ gather\(", l) and "slice_sizes={1,8}" in l]
    assert len(dec) == len(LLAMA.groups), dec
    assert len(gathers) == len(LLAMA.groups), gathers


@pytest.mark.parametrize("backend", ["reference", "xla"])
def test_fused_members_cost_one_group(backend, tiny_ckpt):
    """Backend-agnostic: the compiled cost of q, k and v (and up, gate) together is that of
    one product of their group, not three (XLA's cost analysis of the optimized program)."""
    path, _ = tiny_ckpt
    m = build_inference_model(path, backend=backend, dtype=jnp.float32)
    x = jnp.ones((1, 4, SPEC.hidden_size), jnp.float32)

    def flops(mod, fn):
        graphdef, state = nnx.split(mod)
        c = jax.jit(lambda s, x: fn(nnx.merge(graphdef, s), x)).lower(state, x).compile()
        ca = c.cost_analysis()
        return (ca[0] if isinstance(ca, (list, tuple)) else ca)["flops"]

    att, mlp = m.layers[0].self_attn, m.layers[0].mlp
    one = flops(att, lambda a, x: a.q_proj.group(x))
    three = flops(att, lambda a, x: (a.q_proj(x), a.k_proj(x), a.v_proj(x)))
    assert one <= three < 1.1 * one, (one, three)
    one = flops(mlp, lambda a, x: a.up_proj.group(x))
    two = flops(mlp, lambda a, x: (a.up_proj(x), a.gate_proj(x)))
    assert one <= two < 1.1 * one, (one, two)


def test_sampling_deterministic_and_filters():
    model = _fp_model(3)
    prompt = np.array([1, 2, 3, 4], np.int32)
    kw = dict(eos_id=None, max_len=128)
    a = gen.generate(model, prompt, 16, temperature=1.5, seed=7, **kw).tokens
    b = gen.generate(model, prompt, 16, temperature=1.5, seed=7, **kw).tokens
    c = gen.generate(model, prompt, 16, temperature=1.5, seed=8, **kw).tokens
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    greedy = gen.generate(model, prompt, 16, **kw).tokens
    np.testing.assert_array_equal(gen.generate(model, prompt, 16, temperature=2.0, top_k=1,
                                               seed=1, **kw).tokens, greedy)
    np.testing.assert_array_equal(gen.generate(model, prompt, 16, temperature=2.0, top_p=1e-6,
                                               seed=1, **kw).tokens, greedy)
    # top-k / top-p keep only the allowed tokens
    logits = jnp.asarray(np.tile(np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32)), (400, 1)))
    draws = gen.sample_logits(logits, jax.random.key(0), 1.0, 0.7, greedy=False, use_top_p=True)
    assert set(np.asarray(draws).tolist()) == {0, 1}
    draws = gen.sample_logits(logits, jax.random.key(0), 1.0, 1.0, greedy=False, top_k=3)
    assert set(np.asarray(draws).tolist()) == {0, 1, 2}


def test_eos_stops_and_callback():
    model = _fp_model()
    prompt = np.array([3, 17, 5, 9, 41], np.int32)
    free = gen.generate(model, prompt, 12, eos_id=None, max_len=128).tokens[0]
    k = 3
    eos = int(free[k])
    first = int(np.argmax(free == eos))              # the first time it appears
    seen = []
    out = gen.generate(model, prompt, 12, eos_id=[eos, 999], max_len=128,
                       callback=lambda i, t: seen.append((i, int(t[0]))))
    assert out.tokens.shape == (1, first + 1) and out.tokens[0, -1] == eos and out.finished[0]
    assert seen == [(i, int(t)) for i, t in enumerate(out.tokens[0])]
    spec_eos = llama.LlamaSpec(**{**SPEC.__dict__, "eos_token_id": eos})
    model2 = _fp_model(spec=spec_eos)                # "auto" reads spec.eos_token_id
    assert gen.generate(model2, prompt, 12, max_len=128).tokens.shape == (1, first + 1)


def test_tokens_per_second_reports():
    model = _fp_model()
    r = gen.tokens_per_second(model, np.arange(1, 9), 6, batch=2, repeats=2)
    assert r["batch"] == 2 and r["prompt_tokens"] == 8 and r["new_tokens"] == 6
    assert r["decode_tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0
    assert len(r["decode_tokens_per_s_runs"]) == 2
