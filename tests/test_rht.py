import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quipjax import rht


def _dense(rot):
    return np.asarray(rot.matrix(), np.float64)


@pytest.mark.parametrize("m,n", [(24, 48), (40, 64), (26, 184)])
def test_incoherence_transform_matches_dense_formula(m, n):
    # 26 = 2 * 13 and 184 = 8 * 23 have no known Hadamard matrix: the randomized FFT is used
    rng = np.random.default_rng(0)
    W = rng.standard_normal((m, n)).astype(np.float32)
    X = rng.standard_normal((200, n))
    H = (X.T @ X / 200).astype(np.float32)
    Wr, Hr, SU, SV = rht.incoherence_transform(W, H, jax.random.key(3))
    Mm, Mn = _dense(rht.rotation(m)), _dense(rht.rotation(n))
    su, sv = np.asarray(SU, np.float64), np.asarray(SV, np.float64)
    assert set(np.unique(su)) <= {-1.0, 1.0} and set(np.unique(sv)) <= {-1.0, 1.0}
    Wr_ref = Mm.T @ np.diag(sv) @ W @ np.diag(su) @ Mn
    Hr_ref = Mn.T @ np.diag(su) @ H @ np.diag(su) @ Mn
    np.testing.assert_allclose(Wr, Wr_ref, atol=1e-4)
    np.testing.assert_allclose(Hr, Hr_ref, atol=1e-4)
    back = rht.incoherence_inverse(Wr, SU, SV)
    np.testing.assert_allclose(back, W, atol=1e-4)


def test_kinds_chosen_per_dimension():
    assert rht.rotation(4096).kind == "hadamard"
    assert rht.rotation(11008).kind == "hadamard"
    assert rht.rotation(10920).kind == "rfft"
    assert rht.rotation(48, "rfft").kind == "rfft"
    assert rht.rotation(184).kind == "rfft" and rht.rotation(40).kind == "hadamard"
    with pytest.raises(ValueError):
        rht.rotation(26, "hadamard")


def test_signs_deterministic_and_key_dependent():
    a = rht.sign_vectors(jax.random.key(0), 16, 32)
    b = rht.sign_vectors(jax.random.key(0), 16, 32)
    c = rht.sign_vectors(jax.random.key(1), 16, 32)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    assert a[0].shape == (32,) and a[1].shape == (16,)


def test_proxy_quantities_invariant():
    # tr(W H W^T) is unchanged by the incoherence transform (orthogonal invariance)
    rng = np.random.default_rng(1)
    W = rng.standard_normal((32, 96)).astype(np.float32)
    X = rng.standard_normal((300, 96))
    H = (X.T @ X / 300).astype(np.float32)
    Wr, Hr, _, _ = rht.incoherence_transform(W, H, jax.random.key(0))
    a = np.trace(W @ H @ W.T)
    b = float(jnp.trace(Wr @ Hr @ Wr.T))
    assert abs(a - b) / a < 1e-5


def test_works_under_jit_and_vmap():
    rng = np.random.default_rng(2)
    W = rng.standard_normal((3, 24, 48)).astype(np.float32)
    H = np.stack([np.eye(48, dtype=np.float32)] * 3)
    keys = jax.random.split(jax.random.key(0), 3)
    f = jax.jit(jax.vmap(lambda w, h, k: rht.incoherence_transform(w, h, k)[0]))
    out = f(W, H, keys)
    for i in range(3):
        np.testing.assert_allclose(out[i], rht.incoherence_transform(W[i], H[i], keys[i])[0],
                                   atol=1e-5)
