import jax
import numpy as np
import pytest

from quipjax import codebooks, hessian, ldlq, rht
from quipjax.quantize import FORMAT_VERSION, QuantizedLinear, quantize_linear


def layer(m, n, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((3 * n, n)) @ (rng.standard_normal((n, n)) / np.sqrt(n) + np.eye(n))
    H = (X.T @ X / len(X)).astype(np.float32)
    W = (rng.standard_normal((m, n)) * 0.02).astype(np.float32)
    return W, H


@pytest.mark.parametrize("name", ["E8P12", "E8P12RVQ3B", "E8P12RVQ4B", "HI2"])
def test_dequantize_apply_and_formula(name):
    m, n = 48, 96
    W, H = layer(m, n)
    ql = quantize_linear(W, H, codebook=name, key=jax.random.key(0))
    assert isinstance(ql, QuantizedLinear)
    cb = codebooks.get(name)
    assert ql.codes.shape == (m, n // cb.dim) + cb.code_shape
    assert ql.codes.dtype == cb.code_dtype
    assert ql.format_version == FORMAT_VERSION and ql.transforms == ("hadamard", "hadamard")
    Q = np.asarray(cb.decode(ql.codes), np.float64).reshape(m, n)
    Mm = np.asarray(rht.rotation(m).matrix(), np.float64)
    Mn = np.asarray(rht.rotation(n).matrix(), np.float64)
    want = np.diag(np.asarray(ql.SV, np.float64)) @ Mm @ Q @ Mn.T @ np.diag(np.asarray(ql.SU, np.float64))
    What = np.asarray(ql.dequantize())
    np.testing.assert_allclose(What, want, atol=1e-6)
    x = np.random.default_rng(1).standard_normal((2, 3, n)).astype(np.float32)
    np.testing.assert_allclose(ql.apply(x), x @ What.T, atol=1e-5)
    # the layer is a pytree: it passes through jit
    y = jax.jit(lambda q, v: q.apply(v))(ql, x)
    np.testing.assert_allclose(y, x @ What.T, atol=1e-5)
    # quantization is reasonable: proxy loss well below 1 and ordered by bits
    p = float(ldlq.proxy_loss(W, What, hessian.regularize(H)))
    assert p < {"E8P12": 0.1, "E8P12RVQ3B": 0.03, "E8P12RVQ4B": 0.01, "HI2": 0.12}[name]


def test_default_scale_folded_into_sv():
    W, H = layer(32, 64)
    ql = quantize_linear(W, H, key=jax.random.key(0))
    rms = float(np.sqrt(np.mean(W.astype(np.float64) ** 2)))
    np.testing.assert_allclose(np.abs(np.asarray(ql.SV)), rms / 0.9, rtol=1e-5)
    np.testing.assert_array_equal(np.abs(np.asarray(ql.SU)), 1.0)
    ql2 = quantize_linear(W, H, key=jax.random.key(0), scale=1.2)
    np.testing.assert_allclose(np.abs(np.asarray(ql2.SV)), rms / 1.2, rtol=1e-5)


def test_deterministic_bit_for_bit():
    W, H = layer(32, 64, seed=4)
    a = quantize_linear(W, H, key=jax.random.key(7), codebook="E8P12RVQ3B")
    b = quantize_linear(W, H, key=jax.random.key(7), codebook="E8P12RVQ3B")
    c = quantize_linear(W, H, key=jax.random.key(8), codebook="E8P12RVQ3B")
    for f in ("codes", "SU", "SV"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert not np.array_equal(a.codes, c.codes)


def test_any_even_dimension_via_fft():
    # 26 = 2 * 13 (outputs) and 184 = 8 * 23 (inputs) have no known Hadamard matrix
    W, H = layer(26, 184, seed=2)
    ql = quantize_linear(W, H, key=jax.random.key(0))
    assert ql.transforms == ("rfft", "rfft")
    What = np.asarray(ql.dequantize())
    Q = np.asarray(codebooks.get("E8P12").decode(ql.codes), np.float64).reshape(26, 184)
    Mm = np.asarray(rht.Rotation("rfft", 26).matrix(), np.float64)
    Mn = np.asarray(rht.Rotation("rfft", 184).matrix(), np.float64)
    want = np.diag(np.asarray(ql.SV)) @ Mm @ Q @ Mn.T @ np.diag(np.asarray(ql.SU))
    np.testing.assert_allclose(What, want, atol=1e-6)
    assert float(ldlq.proxy_loss(W, What, hessian.regularize(H))) < 0.1


def test_float64_retry():
    # H = diag(1, ..., 1, 1e-9) is exactly representable and positive definite, but the
    # float32 rotation perturbs the eigenvalues by ~1e-7, so the float32 Cholesky fails; the
    # float64 retry (regularize, rotate, factor in float64) succeeds
    n = 64
    H = np.diag(np.r_[np.ones(n - 1), 1e-9]).astype(np.float32)
    W = np.random.default_rng(5).standard_normal((16, n)).astype(np.float32)
    key = jax.random.key(0)
    SU, _ = rht.sign_vectors(key, 16, n)
    Hr = rht.transform_hessian(hessian.regularize(H, 0.0), SU, rht.rotation(n))
    assert not np.isfinite(np.asarray(ldlq.block_ldl(Hr)[0])).all()  # the premise
    ql = quantize_linear(W, H, sigma_reg=0.0, key=key)
    What = np.asarray(ql.dequantize())
    assert np.isfinite(What).all()
    assert float(ldlq.proxy_loss(W, What, H)) < 0.1


def test_zero_weight():
    W = np.zeros((16, 32), np.float32)
    ql = quantize_linear(W, np.eye(32, dtype=np.float32), key=jax.random.key(0))
    np.testing.assert_array_equal(ql.dequantize(), 0.0)


def test_bits_per_weight():
    """One definition, the storage of a quipjax checkpoint: the codes, SU one bit per sign
    (32 once real-valued), SV float32; a group adds its float32 fuse scales."""
    from quipjax.group import quantize_group
    W, H = layer(64, 128)
    for name, bits in [("E8P12", 2), ("E8P12RVQ3B", 3), ("E8P12RVQ4B", 4)]:
        ql = quantize_linear(W, H, codebook=name, key=jax.random.key(0))
        assert ql.bits() == {"codes": 64 * 128 * bits, "SU": 128, "SV": 32 * 64}
        assert ql.bits_per_weight == bits + (128 + 32 * 64) / (64 * 128)
        tuned = type(ql)(**{**ql.__dict__, "SU": ql.SU * 1.01})
        assert tuned.bits()["SU"] == 32 * 128
        g = quantize_group([W[:40], W[40:]], H, key=jax.random.key(0), codebook=name)
        assert g.bits() == dict(g.ql.bits(), scales=64)


@pytest.mark.parametrize("case,match", [
    ("nan_w", "NaN or Inf"),
    ("inf_h", "NaN or Inf"),
    ("indefinite", "not positive definite"),
    ("n_not_8", "divisible by 8"),
    ("shape", "must be"),
    ("asym", "not symmetric"),
    ("odd_m", "even"),
    ("w_1d", "2-D"),
    ("scale", "positive"),
    ("zero_h", "non-positive mean diagonal"),
])
def test_failures_are_loud(case, match):
    W, H = layer(16, 32)
    kw = {}
    if case == "nan_w":
        W[3, 4] = np.nan
    elif case == "inf_h":
        H[1, 1] = np.inf
    elif case == "indefinite":
        H = np.diag(np.r_[np.ones(31), -30.0]).astype(np.float32)
    elif case == "n_not_8":
        W, H = layer(16, 36)
    elif case == "shape":
        H = np.eye(24, dtype=np.float32)
    elif case == "asym":
        H[0, 5] += 1.0
    elif case == "odd_m":
        W = W[:15]
    elif case == "w_1d":
        W = W[0]
    elif case == "scale":
        kw["scale"] = -1.0
    elif case == "zero_h":
        H = np.zeros_like(H)
    with pytest.raises(ValueError, match=match):
        quantize_linear(W, H, key=jax.random.key(0), **kw)


def test_indefinite_message_suggests_sigma_reg():
    W, _ = layer(16, 32)
    H = np.diag(np.r_[np.ones(31), -30.0]).astype(np.float32)
    with pytest.raises(ValueError, match="increase sigma_reg"):
        quantize_linear(W, H, key=jax.random.key(0))


def test_quantize_stack_is_quantize_linear():
    """The stacked composition of the same stages gives quantize_linear's bits, whatever the
    group width (the last group padded), with the sequential and the vmapped lift.
    (tests/test_sharding.py checks tune passes, nearest rounding and the float64 retry
    through the sharded lift.)"""
    kw = {}
    from quipjax.quantize import SequentialLift, VmapLift, proxy, quantize_stack
    Ws = [layer(40, 64, seed=s)[0] for s in range(3)]
    _, H = layer(40, 64, seed=9)
    keys = [jax.random.key(10 + i) for i in range(3)]
    ref = [quantize_linear(W, H, key=k, **kw) for W, k in zip(Ws, keys)]
    for lift in (SequentialLift(2), VmapLift(2)):        # 3 matrices: the last group padded
        got, prox = quantize_stack(Ws, [H] * 3, keys, lift=lift, proxies=True, **kw)
        assert len(got) == 3
        for a, b, p, W in zip(ref, got, prox, Ws):
            assert (a.codebook, a.shape, a.transforms) == (b.codebook, b.shape, b.transforms)
            for f in ("codes", "SU", "SV"):
                np.testing.assert_array_equal(np.asarray(getattr(a, f)),
                                              np.asarray(getattr(b, f)))
            np.testing.assert_allclose(p, float(proxy(W, a, H, 1e-2)), rtol=1e-5)


def test_quantize_stack_reads_only_this_process_rows():
    """In a run of several processes a process provides only its rows of a stack
    (`Lift.local`): quantize_stack reads only those Ws / Hs entries, and their codes are the
    ones of the whole stack. The other processes' rows are stood in for here by copies of
    this process's first row."""
    import dataclasses
    from quipjax.quantize import SequentialLift, quantize_stack
    Ws = [layer(40, 64, seed=s)[0] for s in range(4)]
    Hs = [layer(40, 64, seed=20 + s)[1] for s in range(4)]
    keys = [jax.random.key(30 + i) for i in range(4)]
    want = quantize_stack(Ws, Hs, keys, lift=SequentialLift(4))

    @dataclasses.dataclass(frozen=True)
    class Rows12(SequentialLift):
        def local(self):
            return 1, 3

        def put(self, x):
            x = np.asarray(x)
            return np.concatenate([x[:1], x, x[:1]]) if len(x) == 2 else x

        def local_part(self, x):
            return np.asarray(x)[1:3]
    read = []

    class Recorded:
        def __init__(self, xs):
            self.xs = xs

        def __len__(self):
            return len(self.xs)

        def __getitem__(self, i):
            read.append(i)
            return self.xs[i]
    got = quantize_stack(Recorded(Ws), Recorded(Hs), keys, lift=Rows12(4))
    assert set(read) == {1, 2}
    for j in (1, 2):
        for f in ("codes", "SU", "SV"):
            np.testing.assert_array_equal(np.asarray(getattr(want[j], f)),
                                          np.asarray(getattr(got[j], f)))


def test_quantize_stack_errors():
    from quipjax.quantize import quantize_stack
    W, H = layer(40, 64)
    with pytest.raises(ValueError, match="share a shape"):
        quantize_stack([W, W[:, :32]], [H, H[:32, :32]], [jax.random.key(0)] * 2)
    with pytest.raises(ValueError, match="as many Ws, Hs and keys"):
        quantize_stack([W], [H, H], [jax.random.key(0)])
    with pytest.raises(ValueError, match="quantize_linear for a rounding function"):
        quantize_stack([W], [H], [jax.random.key(0)], rounding=lambda r, cb: None)
