import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quipjax import hadamard, rht

KS = [12, 20, 28, 36, 52, 60, 76, 108, 116, 124, 140, 156, 172]

# SHA-256 (first 16 hex digits) of the official quip-sharp K x K +-1 matrices as int8 bytes
# (lib/utils/matmul_had.py get_hadK), so that official checkpoints decode bit for bit.
OFFICIAL_SHA = {
    12: "67507aecbe2abee5", 20: "f54960fecf1ccf70", 28: "a6cb994c78f9acd4",
    36: "d674d8240e6b622b", 52: "9ee082772819b105", 60: "091e76fba0aef583",
    108: "690a34c6c9ed2f0e", 116: "e35aecfbc1d95799", 124: "9b41cf5242a1dd12",
    140: "b9ff01506ffe4db5", 156: "99a1b852ce559ffd", 172: "378ef12c7cc31f3e",
}

REAL_DIMS_DENSE = [576, 960, 1536, 2560, 4096, 4864, 5120, 5632]
REAL_DIMS_LARGE = [8192, 11008, 13824, 14336, 28672]


@pytest.mark.parametrize("k", KS)
def test_k_matrix_is_hadamard(k):
    h = hadamard.hadamard_k_matrix(k).astype(np.int64)
    assert h.shape == (k, k)
    assert set(np.unique(h)) == {-1, 1}
    np.testing.assert_array_equal(h @ h.T, k * np.eye(k, dtype=np.int64))


@pytest.mark.parametrize("k", sorted(OFFICIAL_SHA))
def test_k_matrix_equals_official(k):
    h = hadamard.hadamard_k_matrix(k).astype(np.int8)
    assert hashlib.sha256(h.tobytes()).hexdigest()[:16] == OFFICIAL_SHA[k]


def test_constructions_not_tables():
    # the orders built by Paley I / II (not read from the data file) match the official ones
    for q in (11, 19, 59, 107, 139):
        assert np.array_equal(hadamard.paley1(q), hadamard.hadamard_k_matrix(q + 1))
    for q in (13, 17, 37):
        assert np.array_equal(hadamard.paley2(q), hadamard.hadamard_k_matrix(2 * (q + 1)))
    # Paley II also builds 52 and 124 (the transform uses the official tables there)
    for q in (61,):
        h = hadamard.paley2(q).astype(np.int64)
        np.testing.assert_array_equal(h @ h.T, 2 * (q + 1) * np.eye(2 * (q + 1), dtype=np.int64))
    with pytest.raises(ValueError):
        hadamard.paley1(13)


@pytest.mark.parametrize("n", KS + [1, 2, 64, 12 * 8])
def test_hadamard_matrix_orthonormal_small(n):
    m = np.asarray(hadamard.hadamard_matrix(n), np.float64)
    np.testing.assert_allclose(np.abs(m), 1 / np.sqrt(n), rtol=1e-6)
    np.testing.assert_allclose(m @ m.T, np.eye(n), atol=1e-5)


@pytest.mark.parametrize("n", REAL_DIMS_DENSE)
def test_real_dims_dense_orthonormal(n):
    # products in float64 NumPy: XLA:CPU's float32 dot sums 1536 terms with ~1e-5 error on
    # some CPUs (AVX2 Zen 2), which would test the dot, not the matrix
    m = np.asarray(hadamard.hadamard_matrix(n), np.float64)
    assert np.abs(m @ m.T - np.eye(n)).max() < 1e-6
    x = jax.random.normal(jax.random.key(n), (3, n))
    fast = hadamard.hadamard_transform(x)
    np.testing.assert_allclose(fast, np.asarray(x, np.float64) @ m.T, atol=2e-5)


@pytest.mark.parametrize("n", REAL_DIMS_LARGE)
def test_real_dims_large_orthonormal(n):
    # too big for a dense n x n product: check 64 random columns of M (M e_j via the fast
    # transform) are orthonormal with entries +-1/sqrt(n), and M^T M x = x
    k = hadamard.hadamard_factor(n)
    assert k is not None and n % k == 0
    cols = np.random.default_rng(n).choice(n, 64, replace=False)
    e = jnp.zeros((n, 64)).at[cols, jnp.arange(64)].set(1.0)
    mc = hadamard.hadamard_transform(e, axis=0)
    np.testing.assert_allclose(np.abs(np.asarray(mc)), 1 / np.sqrt(n), rtol=1e-5)
    mc = np.asarray(mc, np.float64)
    assert np.abs(mc.T @ mc - np.eye(64)).max() < 1e-5
    x = jax.random.normal(jax.random.key(1), (2, n))
    back = hadamard.hadamard_transform(hadamard.hadamard_transform(x), transpose=True)
    assert float(jnp.max(jnp.abs(back - x))) < 1e-5


def test_official_factor_choice():
    # the dense factor K is the official one for the official code's dimensions
    for n, k in [(4096, 1), (11008, 172), (5120, 20), (13824, 108), (28672, 28),
                 (14336, 28), (576, 36), (1536, 12), (960, 60), (2560, 20)]:
        assert hadamard.hadamard_factor(n) == k
    assert hadamard.hadamard_factor(4864) == 76      # Qwen2: not in the official code
    assert hadamard.hadamard_factor(10920) is None   # 2^3 * 3 * 5 * 7 * 13
    assert hadamard.hadamard_factor(1000) is None


def test_transform_axis_transpose_and_dtype():
    n = 12 * 4
    m = np.asarray(hadamard.hadamard_matrix(n), np.float64)
    x = np.random.default_rng(0).standard_normal((5, n, 3)).astype(np.float32)
    y = hadamard.hadamard_transform(x, axis=1)
    np.testing.assert_allclose(y, np.einsum("ij,ajb->aib", m, x), atol=1e-5)
    yt = hadamard.hadamard_transform(x, axis=1, transpose=True)
    np.testing.assert_allclose(yt, np.einsum("ji,ajb->aib", m, x), atol=1e-5)
    xb = jnp.asarray(x, jnp.bfloat16)
    assert hadamard.hadamard_transform(xb, axis=1).dtype == jnp.bfloat16
    yj = jax.jit(lambda v: hadamard.hadamard_transform(v, axis=1))(x)
    np.testing.assert_allclose(yj, y, atol=1e-6)


def test_unknown_order_raises():
    with pytest.raises(ValueError, match="rfft"):
        hadamard.hadamard_transform(jnp.ones((10920,)))


@pytest.mark.parametrize("n", [1000, 3000])
def test_rfft_fallback_orthogonal_dense(n):
    r = rht.Rotation("rfft", n)
    m = r.matrix()
    m64 = np.asarray(m, np.float64)
    assert np.abs(m64 @ m64.T - np.eye(n)).max() < 1e-5
    # transpose is the inverse, and the entries are bounded by sqrt(2/n)
    x = jax.random.normal(jax.random.key(0), (4, n))
    np.testing.assert_allclose(r.apply(r.apply(x), transpose=True), x, atol=1e-5)
    assert float(jnp.max(jnp.abs(m))) <= np.sqrt(2 / n) * (1 + 1e-5)


def test_rfft_fallback_orthogonal_10920():
    n = 10920
    r = rht.rotation(n)
    assert r.kind == "rfft"
    cols = np.random.default_rng(0).choice(n, 96, replace=False)
    e = jnp.zeros((n, 96)).at[cols, jnp.arange(96)].set(1.0)
    mc = r.apply(e, axis=0)
    mc = np.asarray(mc, np.float64)
    assert np.abs(mc.T @ mc - np.eye(96)).max() < 1e-5
    x = jax.random.normal(jax.random.key(2), (3, n))
    np.testing.assert_allclose(jnp.linalg.norm(r.apply(x), axis=1), jnp.linalg.norm(x, axis=1),
                               rtol=1e-5)
    np.testing.assert_allclose(r.apply(r.apply(x), transpose=True), x, atol=2e-5)


def test_rfft_needs_even():
    with pytest.raises(ValueError, match="even"):
        rht.rotation(1001)
