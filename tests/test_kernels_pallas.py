"""Pallas decode-matmul kernels: interpret-mode results equal the XLA reference, and every
kernel configuration lowers for CUDA (Triton) through jax.export on this CPU."""
import inspect
import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quipjax import kernels
from quipjax.kernels import pallas_e8p

from helpers import case_seed, random_codes, verify_triton_kernels

CODEBOOKS = ["E8P12", "E8P12RVQ4B", "E8P12RVQ3B"]


def test_case_seed_is_the_same_in_every_process():
    """Two interpreters with different string-hash seeds run `case_seed` (its source, without
    the jax imports of this module) and derive the same seed as this process."""
    code = f"import zlib\n{inspect.getsource(case_seed)}\nprint(case_seed('E8P12RVQ4B', 576, 1536))"
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env=dict(os.environ, PYTHONHASHSEED=str(h))).stdout.strip()
            for h in (1, 2)}
    assert outs == {str(case_seed("E8P12RVQ4B", 576, 1536))}


@pytest.mark.parametrize("codebook", CODEBOOKS)
@pytest.mark.parametrize("m,n,batch,dtype", [
    (576, 1536, (1,), jnp.bfloat16),      # SmolLM2 gate/up-sized, matvec
    (96, 576, (3,), jnp.float16),         # rows not a multiple of 64, n/8 = 72 (BK 16, padded)
    (40, 200, (), jnp.float32),           # nothing a multiple of any block; unbatched x
    (128, 1536, (2, 10), jnp.bfloat16),   # 20 rows of x: two 16-row chunks
])
def test_interpret_equals_reference(codebook, m, n, batch, dtype):
    rng = np.random.default_rng(case_seed(codebook, m, n))
    codes = random_codes(rng, codebook, m, n)
    x = jnp.asarray(rng.standard_normal(batch + (n,)), dtype)
    f = jax.jit(lambda x, c: kernels.decode_matmul(x, c, codebook, backend="pallas_interpret"))
    y = f(x, codes)
    ref = kernels.reference_decode_matmul(x.astype(jnp.float32), codes, codebook)
    assert y.shape == batch + (m,) and y.dtype == jnp.float32
    # Products are exact (E8P values are k/4; the RVQ stage-2 scale is applied once, in f32),
    # so only the float32 summation order differs.
    scale = float(jnp.max(jnp.abs(ref)))
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=0, atol=2e-6 * scale)


def test_prepared_layout_and_padding():
    rng = np.random.default_rng(1)
    codes = random_codes(rng, "E8P12RVQ4B", 100, 576)
    p = kernels.prepare(codes, "E8P12RVQ4B", backend="pallas_interpret")
    assert p.shape == (100, 576) and p.backend == "pallas_interpret"
    c1, c2 = p.arrays["c1"], p.arrays["c2"]
    assert c1.dtype == jnp.uint16 and c1.shape == (128, 80)          # rows to 64, 72 codes to 80
    np.testing.assert_array_equal(np.asarray(c1[:100, :72]), np.asarray(codes[..., 0]))
    np.testing.assert_array_equal(np.asarray(c2[:100, :72]), np.asarray(codes[..., 1]))
    assert not np.asarray(c1[100:]).any() and not np.asarray(c1[:, 72:]).any()
    # vmap over inputs through the prepared pytree
    x = jnp.asarray(rng.standard_normal((2, 3, 576)), jnp.float32)
    y = jax.vmap(lambda xx: kernels.prepared_matmul(xx, p))(x)
    ref = kernels.reference_decode_matmul(x, codes, "E8P12RVQ4B")
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), atol=2e-6 * float(jnp.abs(ref).max()))


def test_block_choices():
    # K step: the power of two in {64, 32, 16} that pads the least (ties: larger)
    assert pallas_e8p._block_k(512) == 64 and pallas_e8p._block_k(1376) == 32
    assert pallas_e8p._block_k(72) == 16 and pallas_e8p._block_k(192) == 64
    cfg = pallas_e8p.kernel_configs(576, 1536, 1)
    # enough programs for two waves of an H100, none of them empty
    assert (cfg["mp"] // cfg["bm"]) * cfg["splits"] >= min(2 * pallas_e8p.H100_SMS,
                                                           (cfg["mp"] // cfg["bm"]) * cfg["nk"])
    assert (cfg["splits"] - 1) * cfg["ks"] < cfg["nk"] <= cfg["splits"] * cfg["ks"]


def test_every_kernel_configuration_lowers_for_cuda():
    """Every configuration exports for cuda and its Triton IR verifies (with the inline
    `lop3` / `fma` of the decode)."""
    targets = pallas_e8p.export_targets()
    # 3 codebooks x 3 shapes x batch 1 / 16 x bf16 / fp16
    assert len(targets) == 36
    for name, fn, args, meta in targets:
        assert meta["weights_per_iter"] > 0
        assert "lop3.b32" in verify_triton_kernels(fn, args, name), name


def test_dispatcher():
    assert kernels.pick_backend("auto") == ("pallas" if jax.default_backend() == "gpu" else "xla")
    with pytest.raises(ValueError, match="unknown decode-matmul backend"):
        kernels.pick_backend("cuda")
    codes = random_codes(np.random.default_rng(2), "E8P12", 16, 64)
    with pytest.raises(ValueError, match="last dimension 32"):
        kernels.decode_matmul(jnp.zeros((2, 32)), codes, "E8P12", backend="pallas_interpret")
    with pytest.raises(ValueError, match="codes must have shape"):
        kernels.decode_matmul(jnp.zeros((2, 64)), codes[..., None], "E8P12")
    # codebooks without a kernel (the scalar grids, E81B): "auto" and "reference" take the
    # reference path, an explicit kernel backend is an error naming them
    for name, codes in (("HI2", jnp.zeros((4, 16), jnp.uint8)),
                        ("E81B", jnp.zeros((4, 2), jnp.uint16))):
        for backend in ("auto", "reference"):
            assert kernels.prepare(codes, name, backend=backend).backend == "reference"
        for backend in ("pallas", "pallas_interpret", "xla"):
            with pytest.raises(ValueError, match=rf"{backend!r} has no kernel for codebook {name}"
                                                 r".*backend='auto' or backend='reference'"):
                kernels.prepare(codes, name, backend=backend)
            with pytest.raises(ValueError, match="backend='auto' or backend='reference'"):
                kernels.decode_matmul(jnp.zeros((16,)), codes, name, backend=backend)


# --- "auto" on a GPU checks each kernel configuration on first use ------------------------

@pytest.fixture
def fake_gpu(monkeypatch):
    """"auto" sees a GPU, the Pallas kernels run in interpret mode, no verdicts are cached.

    Returns the list of (x dtype, batch rows) of every Pallas matmul call."""
    monkeypatch.setattr(kernels, "_platform", lambda: "gpu")
    monkeypatch.setattr(kernels, "_VERDICTS", {})
    real, calls = pallas_e8p.matmul, []

    def interpreted(x, *args, interpret=False):
        calls.append((jnp.dtype(x.dtype).name, int(np.prod(x.shape[:-1]))))
        return real(x, *args, interpret=True)

    monkeypatch.setattr(pallas_e8p, "matmul", interpreted)
    return calls


def test_auto_on_gpu_keeps_a_correct_kernel(fake_gpu):
    rng = np.random.default_rng(case_seed("auto keeps", "E8P12RVQ3B"))
    codes = random_codes(rng, "E8P12RVQ3B", 64, 512)
    x = jnp.asarray(rng.standard_normal((1, 512)), jnp.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p = kernels.prepare(codes, "E8P12RVQ3B", backend="auto")
        y = jax.jit(kernels.prepared_matmul)(x, p)
        y2 = kernels.prepared_matmul(x, p)                     # verdict cached: no new check
    assert p.backend == "pallas" and p.verify
    assert kernels._VERDICTS == {("E8P12RVQ3B", "bfloat16", "matvec"): True}
    # one check (on the check case), then the two calls ran the kernel
    assert fake_gpu == [("bfloat16", kernels._CHECK_BATCH["matvec"])] + [("bfloat16", 1)] * 2
    ref = kernels.reference_decode_matmul(x, codes, "E8P12RVQ3B")
    for out in (y, y2):
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=0,
                                   atol=2e-6 * float(jnp.abs(ref).max()))
    # an explicit backend="pallas" runs what was asked, unchecked
    p = kernels.prepare(codes, "E8P12RVQ3B", backend="pallas")
    assert not p.verify
    kernels.prepared_matmul(jnp.zeros((2, 512), jnp.float16), p)
    assert len(kernels._VERDICTS) == 1 and fake_gpu[-1] == ("float16", 2)


def test_auto_on_gpu_replaces_a_wrong_kernel_by_xla(fake_gpu, monkeypatch):
    """A kernel wrong for bfloat16 inputs only (outputs x 1.01): "auto" warns once for that
    configuration, computes it with the xla backend, and keeps the kernel for float32."""
    interpreted = pallas_e8p.matmul

    def wrong_for_bf16(x, *args, interpret=False):
        y = interpreted(x, *args)
        return y * 1.01 if x.dtype == jnp.bfloat16 else y

    monkeypatch.setattr(pallas_e8p, "matmul", wrong_for_bf16)
    rng = np.random.default_rng(case_seed("auto replaces", "E8P12"))
    codes = random_codes(rng, "E8P12", 40, 1024)
    xb = jnp.asarray(rng.standard_normal((3, 1024)), jnp.bfloat16)
    xf = jnp.asarray(rng.standard_normal((3, 1024)), jnp.float32)
    with pytest.warns(RuntimeWarning) as record:
        y = kernels.decode_matmul(xb, codes, "E8P12")               # backend="auto"
        y_jit = jax.jit(lambda x, c: kernels.decode_matmul(x, c, "E8P12"))(xb, codes)
        yf = kernels.decode_matmul(xf, codes, "E8P12")
    msgs = [str(w.message) for w in record if "quipjax.kernels" in str(w.message)]
    assert len(msgs) == 1 and "\n" not in msgs[0], msgs
    assert "Pallas batch kernel for E8P12 with bfloat16 inputs" in msgs[0]
    assert "'xla'" in msgs[0]
    assert kernels._VERDICTS == {("E8P12", "bfloat16", "batch"): False,
                                 ("E8P12", "float32", "batch"): True}
    want = kernels.decode_matmul(xb, codes, "E8P12", backend="xla")
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want))
    np.testing.assert_allclose(np.asarray(y_jit), np.asarray(want), rtol=0,
                               atol=2e-6 * float(jnp.abs(want).max()))
    # the float32 calls still ran the (correct) kernel: after the two checks, one call
    assert fake_gpu[-1] == ("float32", 3) and fake_gpu.count(("float32", 3)) == 2
    ref = kernels.reference_decode_matmul(xf, codes, "E8P12")
    np.testing.assert_allclose(np.asarray(yf), np.asarray(ref), rtol=0,
                               atol=2e-6 * float(jnp.abs(ref).max()))


@pytest.mark.parametrize("codebook", CODEBOOKS)
def test_quantized_linear_apply_through_kernel(codebook):
    from quipjax.quantize import quantize_linear
    rng = np.random.default_rng(3)
    m, n = 64, 576
    W = rng.standard_normal((m, n)).astype(np.float32)
    X = rng.standard_normal((4 * n, n)).astype(np.float32)
    ql = quantize_linear(W, X.T @ X / len(X), codebook=codebook, key=jax.random.key(0))
    x = jnp.asarray(rng.standard_normal((3, n)), jnp.float32)
    y = ql.apply(x, backend="pallas_interpret")
    ref = x @ ql.dequantize().T
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), atol=2e-5 * float(jnp.abs(ref).max()))
