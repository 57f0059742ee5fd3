import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quipjax import codebooks, ldlq
from quipjax.codebooks import e8p, rvq


def correlated_hessian(n, seed=0, strength=1.0):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, n)) / np.sqrt(n) * strength + np.eye(n)
    X = rng.standard_normal((4 * n, n)) @ A
    H = X.T @ X / len(X)
    return H / np.mean(np.diag(H)) + 0.01 * np.eye(n)


# slow, plainly written reference quantizers (brute force) and BlockLDLQ
def ref_quantizer(name):
    if name == "E8P12":
        table = e8p.codeword_table().astype(np.float64)

        def q(x):
            d = ((x[:, None, :] - table[None]) ** 2).sum(-1)
            c = d.argmin(1)
            return c, table[c]
        return q
    if name == "E8P12RVQ4B":
        q1 = ref_quantizer("E8P12")

        def q(x):
            c1, v1 = q1(x)
            c2, v2 = q1((x - v1) * 3.45)
            return np.stack([c1, c2], -1), v1 + v2 / 3.45
        return q
    if name == "E8P12RVQ3B":
        q1, t = ref_quantizer("E8P12"), rvq.e81b_table().astype(np.float64)

        def q(x):
            c1, v1 = q1(x)
            r = (x - v1) * 2.04
            c2 = ((r[:, None, :] - t[None]) ** 2).sum(-1).argmin(1)
            return np.stack([c1, c2], -1), v1 + t[c2] / 2.04
        return q
    if name == "HI2":
        def q(x):
            c = np.clip(np.floor(x) + 2, 0, 3)
            return c, c - 1.5
        return q
    raise KeyError(name)


def ref_block_ldlq(W, L, name, H=None, tune_iters=0):
    q = ref_quantizer(name)
    m, n = W.shape
    What = np.zeros_like(W)
    codes = [None] * (n // 8)
    for k in reversed(range(n // 8)):
        s = slice(8 * k, 8 * k + 8)
        x = W[:, s] + (W[:, 8 * k + 8:] - What[:, 8 * k + 8:]) @ L[8 * k + 8:, s]
        codes[k], What[:, s] = q(x)
    for _ in range(tune_iters):
        for k in reversed(range(n // 8)):
            s = slice(8 * k, 8 * k + 8)
            x = What[:, s] + (W - What) @ H[:, s] @ np.linalg.inv(H[s, s])
            codes[k], What[:, s] = q(x)
    return codes, What


def _codes_as_blocks(codes, name, m, n):
    codes = np.asarray(codes)
    if name == "HI2":
        return [codes[:, 8 * k:8 * k + 8] for k in range(n // 8)]
    return [codes[:, k] for k in range(n // 8)]


@pytest.mark.parametrize("name,m,n,buf,tune", [
    ("E8P12", 24, 96, 32, 0),    # 3 buffers
    ("E8P12", 16, 72, 32, 0),    # n not a multiple of the buffer: padded
    ("E8P12", 16, 64, 16, 2),    # tune passes
    ("E8P12RVQ4B", 16, 48, 16, 0),
    ("E8P12RVQ3B", 16, 48, 16, 1),
    ("HI2", 16, 40, 16, 1),
])
def test_block_ldlq_equals_reference_code_for_code(name, m, n, buf, tune):
    # float64 on both sides, so any difference would be a real one, not rounding
    H = correlated_hessian(n, seed=n)
    rng = np.random.default_rng(m + n)
    W = rng.standard_normal((m, n))
    with jax.enable_x64(True):
        L, D = ldlq.block_ldl(jnp.asarray(H))
        codes, What = ldlq.block_ldlq(jnp.asarray(W), L, name, tune, H=jnp.asarray(H),
                                      buf_cols=buf)
        L = np.asarray(L)
        codes, What = np.asarray(codes), np.asarray(What)
    ref_codes, ref_What = ref_block_ldlq(W, L, name, H, tune)
    ours = _codes_as_blocks(codes, name, m, n)
    for k in range(n // 8):
        np.testing.assert_array_equal(ours[k], ref_codes[k])
    np.testing.assert_allclose(What, ref_What, atol=1e-12)


def test_block_ldl_factorization():
    H = correlated_hessian(64)
    L, D = ldlq.block_ldl(jnp.asarray(H, jnp.float32))
    L, D = np.asarray(L, np.float64), np.asarray(D, np.float64)
    Dfull = np.zeros((64, 64))
    for i in range(8):
        Dfull[8 * i:8 * i + 8, 8 * i:8 * i + 8] = D[i]
        np.testing.assert_array_equal(L[8 * i:8 * i + 8, 8 * i:8 * i + 8], np.eye(8))
    assert np.all(np.triu(L, 1)[np.triu(np.ones((64, 64)), 8).astype(bool)] == 0)
    np.testing.assert_allclose(L @ Dfull @ L.T, H, atol=1e-5)
    # not positive definite -> NaN (quantize_linear turns that into a clear error)
    L2, _ = ldlq.block_ldl(-jnp.eye(16))
    assert not np.isfinite(np.asarray(L2)).all()


@pytest.mark.parametrize("name", ["E8P12", "E8P12RVQ3B", "HI2"])
def test_ldlq_beats_nearest_on_correlated_hessian(name):
    n, m = 128, 64
    H = correlated_hessian(n, seed=1, strength=2.0).astype(np.float32)
    W = np.random.default_rng(3).standard_normal((m, n)).astype(np.float32)
    cb = codebooks.get(name)
    L, _ = ldlq.block_ldl(jnp.asarray(H))
    _, What = ldlq.block_ldlq(W, L, name)
    nearest = cb(W.reshape(m, -1, cb.dim)).reshape(m, n)
    p_ldlq = float(ldlq.proxy_loss(W, What, H))
    p_near = float(ldlq.proxy_loss(W, nearest, H))
    assert p_ldlq < p_near * 0.9, (p_ldlq, p_near)
    # a tune pass never makes the proxy loss worse than the LDLQ start by much, typically better
    _, What_t = ldlq.block_ldlq(W, L, name, 1, H=jnp.asarray(H))
    assert float(ldlq.proxy_loss(W, What_t, H)) < p_ldlq


def test_vmap_over_matrices_and_errors():
    n, m = 32, 8
    H = np.stack([correlated_hessian(n, seed=s) for s in range(3)]).astype(np.float32)
    W = np.random.default_rng(0).standard_normal((3, m, n)).astype(np.float32)
    Ls = jax.vmap(lambda h: ldlq.block_ldl(h)[0])(H)
    codes, What = jax.vmap(lambda w, l: ldlq.block_ldlq(w, l, "E8P12", buf_cols=16))(W, Ls)
    for i in range(3):
        c, w = ldlq.block_ldlq(W[i], Ls[i], "E8P12", buf_cols=16)
        np.testing.assert_array_equal(codes[i], c)
    with pytest.raises(ValueError, match="multiple of 8"):
        ldlq.block_ldlq(np.ones((4, 12), np.float32), jnp.eye(12), "E8P12")
    with pytest.raises(ValueError, match="H="):
        ldlq.block_ldlq(W[0], Ls[0], "E8P12", 1)
    with pytest.raises(ValueError, match="shape"):
        ldlq.block_ldlq(W[0], jnp.eye(16), "E8P12")


def test_proxy_loss_definition():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((5, 16)).astype(np.float32)
    Wh = W + 0.1 * rng.standard_normal((5, 16)).astype(np.float32)
    H = correlated_hessian(16).astype(np.float32)
    want = np.trace((Wh - W) @ H @ (Wh - W).T) / np.trace(W @ H @ W.T)
    assert abs(float(ldlq.proxy_loss(W, Wh, H)) - want) < 1e-6
