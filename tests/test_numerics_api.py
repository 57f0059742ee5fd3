"""The numerics layer under jit / vmap, and its errors on concrete values.

quantize_linear under jax.jit (settings static) and jax.vmap gives the eager call's bits;
checks that need values run on concrete arrays only (out-of-range codes, weights whose scale
overflows, an empty Hessian), shape checks also under tracing. Small shapes, fixed seeds.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quipjax import codebooks, hessian, ldlq, rht
from quipjax.quantize import QuantizedLinear, check_result, quantize_linear

SETTINGS = ("codebook", "scale", "sigma_reg", "tune_iters", "rotation", "rounding", "buf_cols")
M, N = 32, 64


def layer(m, n, seed):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((3 * n, n)) @ (rng.standard_normal((n, n)) / np.sqrt(n) + np.eye(n))
    H = (X.T @ X / len(X)).astype(np.float32)
    W = (rng.standard_normal((m, n)) * 0.02).astype(np.float32)
    return W, H


@functools.cache
def stack():
    """Three (W, H, key) of shape (32, 64), (64, 64), () stacked on a leading axis."""
    Ws, Hs = zip(*(layer(M, N, seed) for seed in range(3)))
    return np.stack(Ws), np.stack(Hs), jax.random.split(jax.random.key(5), 3)


@functools.cache
def eager(i, codebook):
    Ws, Hs, keys = stack()
    return quantize_linear(Ws[i], Hs[i], codebook=codebook, key=keys[i])


def assert_same_bits(a, b, i=None):
    for f in ("codes", "SU", "SV"):
        x, y = np.asarray(getattr(a, f)), np.asarray(getattr(b, f))
        y = y if i is None else y[i]
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y, err_msg=f)


qjit = jax.jit(quantize_linear, static_argnames=SETTINGS)


@pytest.mark.parametrize("codebook", ["E8P12", "E8P12RVQ3B"])
def test_jit_quantize_linear_is_eager_bits(codebook):
    Ws, Hs, keys = stack()
    got = qjit(Ws[0], Hs[0], codebook=codebook, key=keys[0])
    assert (got.codebook, got.shape, got.transforms) == (codebook, (M, N), ("hadamard",) * 2)
    assert_same_bits(eager(0, codebook), got)
    # shape checks still run under tracing
    with pytest.raises(ValueError, match="H has shape"):
        qjit(Ws[0], Hs[0][:32, :32], codebook=codebook, key=keys[0])
    with pytest.raises(ValueError, match="2-D"):
        qjit(Ws[0][0], Hs[0], codebook=codebook, key=keys[0])


def test_vmap_quantize_linear_is_eager_bits_per_matrix():
    Ws, Hs, keys = stack()
    got = jax.vmap(functools.partial(quantize_linear, codebook="E8P12"))(Ws, Hs, key=keys)
    assert got.codes.shape == (3, M, N // 8)
    for i in range(3):
        assert_same_bits(eager(i, "E8P12"), got, i)


def test_traced_failures_are_flagged_by_nan_sv():
    Ws, Hs, keys = stack()
    # an indefinite H: eagerly an error (tests/test_quantize.py::test_failures_are_loud); under
    # jit there is no float64 retry and no error: a failed factorization gives an all-NaN SV
    H = np.diag(np.r_[np.ones(N - 1), -30.0]).astype(np.float32)
    ql = qjit(Ws[0], H, codebook="E8P12", key=keys[0])
    assert np.isnan(np.asarray(ql.SV)).all()
    assert np.isnan(np.asarray(ql.dequantize())).all()
    # weights whose scale overflows: a non-finite SV (eagerly an error, test below)
    ql = qjit(Ws[0] * np.float32(1e32), Hs[0], codebook="E8P12", key=keys[0])
    assert not np.isfinite(np.asarray(ql.SV)).any()


def test_rfft_rotation_then_cholesky_under_one_jit():
    # XLA:CPU propagated the Cholesky's column-major layout back into the FFT of the rfft
    # rotation (RET_CHECK failure in fft_thunk.cc), so jit(quantize_linear) failed for any
    # dimension without a Hadamard matrix
    n = 24
    rng = np.random.default_rng(0)
    X = rng.standard_normal((4 * n, n)).astype(np.float32)
    H = X.T @ X / len(X)
    SU = jnp.asarray(rng.choice([-1.0, 1.0], n).astype(np.float32))
    rot = rht.Rotation("rfft", n)
    Hr = jax.jit(rht.transform_hessian, static_argnums=2)(H, SU, rot)
    L = jax.jit(lambda H, SU: ldlq.block_ldl(rht.transform_hessian(H, SU, rot))[0])(H, SU)
    np.testing.assert_array_equal(np.asarray(L), np.asarray(jax.jit(ldlq.block_ldl)(Hr)[0]))


def test_huge_weights_raise():
    Ws, Hs, keys = stack()
    with pytest.raises(ValueError, match=r"non-finite scale.*overflows float32.*multiply the "
                                         r"result's SV by c"):
        quantize_linear(Ws[0] * np.float32(1e32), Hs[0], key=keys[0])   # max |W| ~ 1e30


def test_check_result_catches_overflowing_dequantized_weight():
    # a finite SV whose product with the codewords overflows: checked by dequantizing
    ql = QuantizedLinear(codes=jnp.zeros((M, N // 8), jnp.uint16), SU=jnp.ones(N),
                         SV=jnp.full((M,), 3e38, jnp.float32), codebook="E8P12",
                         shape=(M, N), transforms=("hadamard", "hadamard"))
    with pytest.raises(ValueError, match=r"dequantized weight has \d+ NaN or Inf"):
        check_result(ql)
    check_result(dataclasses.replace(ql, SV=jnp.full((M,), 1e20, jnp.float32)))
    with pytest.raises(ValueError, match="non-finite scale: 1 of the 32"):
        check_result(dataclasses.replace(ql, SV=ql.SV.at[3].set(jnp.inf)))


# one family each: (codebook, bad codes, expected message parts)
BAD_CODES = [
    ("E8P12", np.array([[5, 70000], [3, 70001]], np.int32), ["E8P12", "0..65535", "2 of 4",
                                                             "70000", "(0, 1)"]),
    ("E8P12", np.array([0, -1], np.int64), ["E8P12", "0..65535", "1 of 2", "-1"]),
    ("E81B", np.array([255, 256], np.uint16), ["E81B", "0..255", "1 of 2", "256"]),
    ("E8P12RVQ3B", np.array([[7, 3], [9, 300]], np.uint16),
     ["E8P12RVQ3B", "stage-2", "E81B", "0..255", "300"]),
    ("E8P12RVQ4B", np.array([[70000, 3]], np.int32), ["E8P12RVQ4B", "stage-1", "0..65535",
                                                      "70000"]),
    ("HI2", np.array([0, 3, 200], np.uint8), ["HI2", "0..3", "1 of 3", "200"]),
    ("HI3", np.array([8], np.int32), ["HI3", "0..7", "8"]),
    ("HI4", np.array([1.5], np.float32), ["HI4", "0..15", "1.5"]),
]


@pytest.mark.parametrize("name,codes,parts", BAD_CODES)
def test_decode_rejects_out_of_range_codes(name, codes, parts):
    cb = codebooks.get(name)
    for c in (codes, jnp.asarray(codes), codes.tolist()):
        with pytest.raises(ValueError) as err:
            cb.decode(c)
        for p in parts:
            assert p in str(err.value), (p, str(err.value))
    # under tracing there is no check (and no error): the shape and dtype are those of valid
    # codes
    out = jax.jit(cb.decode)(jnp.asarray(codes))
    assert out.shape == codes.shape[:codes.ndim - len(cb.code_shape)] + (cb.dim,)
    assert jax.vmap(cb.decode)(jnp.asarray(codes)).shape == out.shape


def test_empty_hessian_finalize_raises():
    with pytest.raises(ValueError, match="no rows were accumulated"):
        hessian.finalize(hessian.init(8))
    x = np.ones((2, 3, 8), np.float32)
    with pytest.raises(ValueError, match="no rows were accumulated"):
        hessian.finalize(hessian.update(hessian.init(8), x, mask=np.zeros((2, 3))))
    # under jit the count is not known: no error (the caller checks count > 0)
    stats = jax.jit(hessian.finalize)(hessian.init(8))
    assert float(stats.count) == 0
    ok = hessian.finalize(hessian.update(hessian.init(8), x))
    assert float(ok.count) == 6
