import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quipjax import hessian


def test_float64_accuracy_large_mean():
    # 10^6 tokens, mean ~100: float32 two-sum accumulation matches a float64 reference
    rng = np.random.default_rng(0)
    n = 48
    mu = rng.standard_normal(n) * 100
    A = rng.standard_normal((n, n)) / np.sqrt(n)
    st = hessian.init(n)
    upd = jax.jit(hessian.update)
    ref, s, cnt = np.zeros((n, n)), np.zeros(n), 0
    for _ in range(50):
        x = (rng.standard_normal((20000, n)) @ A + mu).astype(np.float32)
        st = upd(st, x)
        x64 = x.astype(np.float64)
        ref += x64.T @ x64
        s += x64.sum(0)
        cnt += len(x)
    stats = hessian.finalize(st)
    assert float(stats.count) == cnt == 10 ** 6
    Href = ref / cnt
    H = np.asarray(stats.H, np.float64)
    assert np.linalg.norm(H - Href) / np.linalg.norm(Href) < 1e-6
    assert np.abs(H - Href).max() / np.abs(Href).max() < 1e-6
    np.testing.assert_allclose(stats.mean, s / cnt, rtol=1e-6)
    np.testing.assert_array_equal(stats.H, np.asarray(stats.H).T)


def test_mask_merge_and_bf16():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 100, 16)).astype(np.float32)
    mask = rng.random((3, 100)) > 0.3
    st = hessian.update(hessian.init(16), x, mask=mask)
    kept = x[mask].astype(np.float64)
    stats = hessian.finalize(st)
    np.testing.assert_allclose(stats.H, kept.T @ kept / len(kept), rtol=1e-5, atol=1e-6)
    assert float(stats.count) == mask.sum()
    # merging two halves equals one pass (data-parallel reduction)
    a = hessian.update(hessian.init(16), x[:2])
    b = hessian.update(hessian.init(16), x[2:])
    whole = hessian.finalize(hessian.update(hessian.init(16), x))
    merged = hessian.finalize(hessian.merge(a, b))
    np.testing.assert_allclose(merged.H, whole.H, rtol=1e-6, atol=1e-6)
    xb = jnp.asarray(x, jnp.bfloat16)
    sb = hessian.finalize(hessian.update(hessian.init(16), xb))
    xf = np.asarray(xb.astype(jnp.float32), np.float64).reshape(-1, 16)
    np.testing.assert_allclose(sb.H, xf.T @ xf / len(xf), rtol=1e-5, atol=1e-6)


def test_dimension_mismatch_and_regularize():
    with pytest.raises(ValueError, match="dimension"):
        hessian.update(hessian.init(8), jnp.ones((4, 9)))
    H = jnp.diag(jnp.array([2.0, 4.0]))
    R = hessian.regularize(H, 0.01)
    np.testing.assert_allclose(R, np.diag([2 / 3 + 0.01, 4 / 3 + 0.01]), rtol=1e-6)


def _full_gram(x):
    return jnp.dot(x.T, x, precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


@pytest.mark.parametrize("n", [333, 640])
def test_gram_blocks_match_float64(n):
    # the block-row split (uneven last block at 333) against a float64 NumPy product
    rng = np.random.default_rng(n)
    x = (rng.standard_normal((700, n)) * 2 + rng.standard_normal(n) * 5).astype(np.float32)
    g = np.asarray(jax.jit(hessian.gram)(x), np.float64)
    ref = x.astype(np.float64).T @ x.astype(np.float64)
    assert np.abs(g - ref).max() / np.abs(ref).max() < 1e-6
    np.testing.assert_array_equal(g, g.T)


@pytest.mark.parametrize("n", [576, 1536, 640, 1024, 2048, 4096])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_gram_has_the_full_products_bits_on_model_widths(n, dtype):
    # SmolLM2's (576, 1536), Gemma 3 270M's (640, 1024, 2048) and Llama-2-7B's 4096 inputs: the
    # cached Hessians were made with the full product, the split must not change a bit
    rng = np.random.default_rng(n)
    for rows in (1024, 37):
        x = jnp.asarray(rng.standard_normal((rows, n)) * 3 + 0.5, dtype)
        np.testing.assert_array_equal(np.asarray(jax.jit(hessian.gram)(x)),
                                      np.asarray(jax.jit(_full_gram)(x)))
