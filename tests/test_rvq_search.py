"""The beam search of the residual codebooks (`quipjax.codebooks.rvq`, `RVQ.beam`): its k
nearest E8P12 points against all 65536, B = 1 against the greedy search bit for bit, never
worse than greedy, the exhaustive nearest codeword with B large enough, its codes decoding to
its values; and how it is chosen (codebooks.get(name, beam=B), --rvq_beam)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quipjax import codebooks
from quipjax.codebooks import e8p, rvq
from quipjax.pipeline.settings import QuantSettings

RVQS = ["E8P12RVQ4B", "E8P12RVQ3B"]


def gaussian(cb, n, seed):
    """n unit Gaussian 8-dim vectors times the codebook's opt_scale, float32."""
    return (np.random.default_rng(seed).standard_normal((n, 8)) * cb.opt_scale).astype(np.float32)


def sq_err(x, cb, codes):
    """Squared error (N,) float64 of the decoded codes against x (N, 8)."""
    q = np.asarray(cb.decode(np.asarray(codes)), np.float64)
    return ((x.astype(np.float64) - q) ** 2).sum(1)


# --- the k nearest E8P12 points ---------------------------------------------------------------

def test_e8p_nearest_k_is_the_k_nearest_of_all_codewords():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    x[:30] *= 3.0                                   # far out, where the patterns run out
    table = e8p.codeword_table().astype(np.float64)
    tset = {r.tobytes() for r in table}
    d_all = np.concatenate([((x[i:i + 100, None].astype(np.float64) - table[None]) ** 2).sum(-1)
                            for i in range(0, len(x), 100)])
    ref = np.sort(d_all, 1)
    for k in (1, 5, 64):
        codes, q, d = jax.jit(rvq.e8p_nearest_k, static_argnums=1)(jnp.asarray(x), k)
        codes, q, d = np.asarray(codes), np.asarray(q, np.float64), np.asarray(d)
        assert q.shape == (300, k, 8) and d.shape == (300, k) and codes.dtype == np.uint16
        np.testing.assert_array_equal(table[codes.astype(np.int64)], q)   # official codes
        dq = ((x.astype(np.float64)[:, None] - q) ** 2).sum(-1)
        np.testing.assert_allclose(dq, ref[:, :k], rtol=0, atol=1e-4)   # the k smallest, in order
        np.testing.assert_allclose(d, dq, rtol=0, atol=1e-4)
        assert all(r.tobytes() in tset for r in q.reshape(-1, 8))          # codewords ...
        assert all(len({r.tobytes() for r in qq}) == k for qq in q)        # ... k distinct ones
    with pytest.raises(ValueError, match="k must be in 1..512"):
        rvq.e8p_nearest_k(jnp.asarray(x), 513)


# --- the search ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", RVQS)
def test_beam_of_one_is_greedy_bit_for_bit(name):
    cb = codebooks.get(name)
    x = gaussian(cb, 3000, 1)
    codes_g, xhat_g = jax.jit(cb.quantize_t)(jnp.asarray(x.T))
    # through the beam machinery (chunked: 3000 = 5 x 512 + a padded remainder)
    beam1 = jax.jit(lambda xt: rvq.rvq_beam_quantize_t(xt, cb.stage2, cb.resid_scale, 1,
                                                       chunk=512))
    codes_b, xhat_b = beam1(jnp.asarray(x.T))
    np.testing.assert_array_equal(np.asarray(codes_b), np.asarray(codes_g))
    np.testing.assert_array_equal(np.asarray(xhat_b), np.asarray(xhat_g))
    assert codebooks.get(name, beam=1) == cb and cb.search == "greedy" and cb.beam == 1


@pytest.mark.parametrize("name", RVQS)
def test_beam_is_never_worse_than_greedy_and_decodes_to_its_values(name):
    greedy = codebooks.get(name)
    x = gaussian(greedy, 2000, 2)
    e_greedy = sq_err(x, greedy, jax.jit(greedy.quantize)(x))
    better = {}
    # beam 4 by the public path (one chunk), beam 16 in chunks of 700 (lax.map, padded)
    for beam, chunk in ((4, None), (16, 700)):
        cb = codebooks.get(name, beam=beam)
        if chunk is None:
            codes, xhat = jax.jit(cb.quantize_with_values)(x)
        else:
            codes, xhat_t = jax.jit(lambda xt: rvq.rvq_beam_quantize_t(
                xt, cb.stage2, cb.resid_scale, beam, chunk=chunk))(jnp.asarray(x.T))
            xhat = xhat_t.T
        codes, xhat = np.asarray(codes), np.asarray(xhat)
        assert codes.shape == (2000, 2) and codes.dtype == np.uint16
        # decode(codes) == the returned values, up to the rounding of q1 + q2 / s
        np.testing.assert_allclose(np.asarray(cb.decode(codes)), xhat, rtol=0, atol=1e-6)
        e = sq_err(x, cb, codes)
        assert (e <= e_greedy + 1e-6).all()
        better[beam] = (e < e_greedy - 1e-6).mean()
    # the beam does find better pairs: greedy misses the nearest for ~44% (4 bits) / ~0.7%
    # (3 bits) of these vectors (tests/test_codebooks.py::test_search_attribute_is_honest)
    assert better[16] >= better[4] > (0.25 if name == "E8P12RVQ4B" else 0.0)


def exhaustive_nearest(cb, x):
    """The nearest two-stage codeword of each row of x (N, 8), by brute force over all 65536
    stage-1 points: for each, stage 2's nearest point to the scaled residual (stage 2's exact
    search, checked against its brute force in test_codebooks.py). Returns the squared
    distances (N,) float64 and the 0-based distance rank of the best pair's stage-1 point."""
    table = e8p.codeword_table()
    s = cb.resid_scale
    q2 = jax.jit(cb.stage2.__call__)
    best, rank = [], []
    for i in range(0, len(x), 10):
        xc = x[i:i + 10]
        resid = (xc[:, None, :] - table[None]) * s                             # (10, 65536, 8)
        x2 = np.asarray(q2(resid.reshape(-1, 8))).reshape(resid.shape).astype(np.float64)
        x64 = xc[:, None, :].astype(np.float64)
        e = ((x64 - table - x2 / s) ** 2).sum(-1)
        d1 = ((x64 - table) ** 2).sum(-1)
        j = e.argmin(1)
        best.append(e.min(1))
        rank.append((d1 < d1[np.arange(len(xc)), j][:, None]).sum(1))
    return np.concatenate(best), np.concatenate(rank)


@pytest.mark.parametrize("name", RVQS)
def test_large_beam_finds_the_exhaustive_nearest(name):
    greedy = codebooks.get(name)
    x = gaussian(greedy, 100, 3)
    best, rank = exhaustive_nearest(greedy, x)
    assert rank.max() < 64          # so a beam of 64 holds every optimal stage-1 point
    cb = codebooks.get(name, beam=64)
    e = sq_err(x, cb, jax.jit(cb.quantize)(x))
    np.testing.assert_allclose(e, best, rtol=0, atol=1e-5)
    if name == "E8P12RVQ4B":        # ... which greedy does not find
        e_greedy = sq_err(x, greedy, jax.jit(greedy.quantize)(x))
        assert (e_greedy > best + 1e-5).mean() > 0.25


def test_float64_input():
    cb = codebooks.get("E8P12RVQ4B", beam=8)
    x = gaussian(cb, 200, 4)
    with jax.enable_x64(True):
        codes, xhat = jax.jit(cb.quantize_with_values)(jnp.asarray(x, jnp.float64))
        assert xhat.dtype == jnp.float64
        codes = np.asarray(codes)
        np.testing.assert_allclose(np.asarray(cb.decode(codes), np.float64), np.asarray(xhat),
                                   rtol=0, atol=1e-6)
    np.testing.assert_array_equal(codes, np.asarray(jax.jit(cb.quantize)(x)))


# --- choosing it --------------------------------------------------------------------------------

def test_beam_codebook_attributes_and_errors():
    greedy = codebooks.get("E8P12RVQ4B")
    cb = codebooks.get("E8P12RVQ4B", beam=16)
    assert cb.search == "beam" and cb.beam == 16 and cb.name == greedy.name
    assert cb.code_shape == greedy.code_shape and cb.bits_per_weight == greedy.bits_per_weight
    assert cb != greedy and hash(cb) != hash(greedy)          # a different jit-static value
    assert "beam 16" in repr(cb) and "beam" not in repr(greedy)
    assert cb.with_beam(1) == greedy and greedy.with_beam(16) == cb
    assert codebooks.get(cb) is cb
    codes = np.random.default_rng(5).integers(0, 65536, (50, 2)).astype(np.uint16)
    np.testing.assert_array_equal(np.asarray(cb.decode(codes)), np.asarray(greedy.decode(codes)))
    with pytest.raises(ValueError, match="only the residual codebooks"):
        codebooks.get("E8P12", beam=4)
    for bad in (0, 513, 2.5, True):
        with pytest.raises(ValueError, match="beam must be an int in 1..512"):
            greedy.with_beam(bad)
    with pytest.raises(ValueError, match="use with_beam"):
        dataclasses.replace(greedy, beam=4)                   # search left at "greedy"
    with pytest.raises(ValueError, match="E8P12 first stage"):
        dataclasses.replace(greedy, stage1=codebooks.get("E81B")).with_beam(4)


def test_quant_settings_flag():
    default = QuantSettings(codebook="E8P12RVQ4B")
    assert default.rvq_beam == 1
    # the default keeps the keyword arguments and the identity of earlier runs
    assert default.quantize_kw()["codebook"] == "E8P12RVQ4B"
    assert "rvq_beam" not in default.identity()
    s = QuantSettings(codebook="E8P12RVQ4B", rvq_beam=16)
    s.check()
    cb = s.quantize_kw()["codebook"]
    assert cb == codebooks.get("E8P12RVQ4B", beam=16)
    assert s.identity()["rvq_beam"] == 16
    assert s.searched("E8P12RVQ3B") == codebooks.get("E8P12RVQ3B", beam=16)   # a rule's choice
    assert s.searched("E8P12") == "E8P12"                   # exact searches are left alone
    with pytest.raises(ValueError, match="--rvq_beam must be in 1..512"):
        QuantSettings(rvq_beam=0).check()


def test_rvq_beam_reaches_the_codebooks_rules_pick():
    from quipjax import Rule
    from quipjax.models.adapter import LLAMA
    from quipjax.pipeline.quantization import group_settings
    rules = (Rule(r"mlp\.down_proj", codebook="E8P12RVQ3B"),)
    kw = group_settings(QuantSettings(codebook="E8P12", rvq_beam=8), LLAMA, rules)
    assert kw["down"]["codebook"] == codebooks.get("E8P12RVQ3B", beam=8)
    assert kw["qkv"]["codebook"] == kw["o"]["codebook"] == "E8P12"
    kw = group_settings(QuantSettings(codebook="E8P12RVQ4B"), LLAMA, rules)    # default: names
    assert kw["down"]["codebook"] == "E8P12RVQ3B" and kw["up"]["codebook"] == "E8P12RVQ4B"


def test_checkpoints_of_greedy_runs_keep_their_identity():
    """A checkpoint written before --rvq_beam existed (tests/data/checkpoint_v2_tiny) has the
    identity of a default run, so it resumes; a beam run's identity differs from it."""
    import json
    import os
    from quipjax.pipeline.run import identity_diff
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "checkpoint_v2_tiny")
    with open(os.path.join(here, "quipjax.json")) as f:
        have = {"settings": json.load(f)["settings"]}
    assert identity_diff(have, {"settings": QuantSettings(**have["settings"]).identity()}) == []
    beam = QuantSettings(**dict(have["settings"], rvq_beam=4))
    assert identity_diff(have, {"settings": beam.identity()}) == ["settings.rvq_beam: None -> 4"]


def test_quantize_linear_with_a_beam_codebook():
    from quipjax import quantize as qz
    rng = np.random.default_rng(6)
    W = rng.standard_normal((32, 64)).astype(np.float32)
    A = rng.standard_normal((64, 64)).astype(np.float32) / 8 + np.eye(64, dtype=np.float32)
    H = A.T @ A
    key = jax.random.key(0)
    greedy = qz.quantize_linear(W, H, codebook="E8P12RVQ4B", key=key, rounding="nearest")
    beam = qz.quantize_linear(W, H, codebook=codebooks.get("E8P12RVQ4B", beam=8), key=key,
                              rounding="nearest")
    assert beam.codebook == "E8P12RVQ4B"                    # what a checkpoint records
    assert beam.codes.shape == greedy.codes.shape == (32, 8, 2)
    np.testing.assert_array_equal(np.asarray(greedy.SV), np.asarray(beam.SV))
    # nearest rounding (no error feedback) of the same rotated, scaled weight: the beam's
    # error is no larger on any 8-weight block and smaller on some
    r = qz.rotate_and_scale(jnp.asarray(W), jnp.asarray(H), key, jnp.float32(1e-2),
                            jnp.float32(codebooks.get("E8P12RVQ4B").default_scale),
                            qz.rotations_for(W.shape))
    Wr = np.asarray(r.W, np.float64).reshape(32, 8, 8)
    err = {n: ((Wr - np.asarray(ql.decode_rotated(), np.float64).reshape(32, 8, 8)) ** 2).sum(-1)
           for n, ql in (("greedy", greedy), ("beam", beam))}
    assert (err["beam"] <= err["greedy"] + 1e-6).all()
    assert (err["beam"] < err["greedy"] - 1e-6).mean() > 0.2
