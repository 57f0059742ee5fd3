"""XLA (plain JAX, CPU) decode-matmul: equals the reference decode-then-matmul for every E8P
codebook, shape (including row counts that leave a partial tile), batch shape and input dtype,
under jit and vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quipjax import codebooks, kernels
from quipjax.kernels import xla_decode

from helpers import case_seed, random_codes

CODEBOOKS = ["E8P12", "E8P12RVQ4B", "E8P12RVQ3B"]
# With 768 KiB tiles (`small_tiles`): 576x1536 runs 4 tiles of 128 rows + 64 rows, 960x576 3 of
# 256 + 192 (the loop and a partial tile); 24x200 one tile (no loop), n / 8 = 25 codes and
# n / 2 = 100 bytes per row (multiples of nothing in particular).
SHAPES = [(576, 1536), (960, 576), (24, 200)]
# (batch shape, dtype): every batch shape and both dtypes on the main shape, two elsewhere
# (each case is a compilation; the file should stay well under 30 s)
CASES = {(576, 1536): [((), jnp.float32), ((1,), jnp.bfloat16), ((3,), jnp.float32),
                       ((2, 5), jnp.bfloat16)],
         (960, 576): [((1,), jnp.float32), ((2, 5), jnp.bfloat16)],
         (24, 200): [((), jnp.bfloat16), ((3,), jnp.float32)]}


def assert_matches(y, ref):
    # Products are exact (same decoded float32 weights as the reference, x scaled by powers of
    # two), so only the float32 summation order differs.
    assert y.dtype == jnp.float32 and y.shape == ref.shape
    scale = float(jnp.max(jnp.abs(ref)))
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=0, atol=2e-6 * scale)


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(xla_decode, "_TILE_BYTES", 768 << 10)
    assert xla_decode._tile_rows(576, 1536) == 128 and xla_decode._tile_rows(960, 576) == 256


@pytest.mark.parametrize("codebook", CODEBOOKS)
@pytest.mark.parametrize("m,n", SHAPES)
def test_xla_equals_reference(codebook, m, n, small_tiles):
    rng = np.random.default_rng(case_seed(codebook, m, n))
    codes = random_codes(rng, codebook, m, n)
    f = jax.jit(lambda x, c: kernels.decode_matmul(x, c, codebook, backend="xla"))
    for batch, dtype in CASES[(m, n)]:
        x = jnp.asarray(rng.standard_normal(batch + (n,)), dtype)
        y = f(x, codes)
        ref = kernels.reference_decode_matmul(x.astype(jnp.float32), codes, codebook)
        assert y.shape == batch + (m,)
        assert_matches(y, ref)


@pytest.mark.parametrize("codebook", CODEBOOKS)
def test_prepared_layout(codebook):
    rng = np.random.default_rng(7)
    m, n = 40, 200
    codes = random_codes(rng, codebook, m, n)
    p = kernels.prepare(codes, codebook, backend="xla")
    assert p.backend == "xla" and p.shape == (m, n)
    nib = np.asarray(p.arrays["nib"])
    bits = xla_decode.bits_per_weight(codebook)
    assert nib.dtype == np.uint8 and nib.size * 8 == bits * m * n
    # the nibbles decode to exactly the codebook's values
    cb = codebooks.get(codebook)
    hi, lo = (nib >> 4).astype(np.float64), (nib & 15).astype(np.float64)
    if codebook == "E8P12":
        Q = np.concatenate([hi, lo], 1) * 0.5 - 3.75
        np.testing.assert_array_equal(Q, np.asarray(cb.decode(codes)).reshape(m, n))
    else:
        q1 = np.asarray(cb.stage1.decode(codes[..., 0])).reshape(m, n)
        q2 = np.asarray(cb.stage2.decode(codes[..., 1])).reshape(m, n)
        np.testing.assert_array_equal(hi * 0.5 - 3.75, q1)
        np.testing.assert_array_equal(lo * 0.5 - (3.75 if codebook == "E8P12RVQ4B" else 4.0), q2)


@pytest.mark.parametrize("codebook", CODEBOOKS)
def test_vmap_and_jit(codebook, monkeypatch):
    monkeypatch.setattr(xla_decode, "_TILE_BYTES", 64 * 576 * 4)    # one tile of 64 rows + 32
    rng = np.random.default_rng(3)
    m, n = 96, 576
    codes = random_codes(rng, codebook, m, n)
    p = kernels.prepare(codes, codebook, backend="xla")
    ref_fn = lambda x: kernels.reference_decode_matmul(x.astype(jnp.float32), codes, codebook)
    # vmap of the matvec (x (n,) per example) and of a batched call (x (3, n) per example)
    for shape, dtype in (((4, n), jnp.float32), ((2, 3, n), jnp.bfloat16)):
        x = jnp.asarray(rng.standard_normal(shape), dtype)
        y = jax.jit(jax.vmap(lambda xx: kernels.prepared_matmul(xx, p)))(x)
        assert_matches(y, ref_fn(x))
    # vmap over the codes too (through decode_matmul, which prepares inside)
    codes2 = jnp.stack([codes, random_codes(rng, codebook, m, n)])
    x = jnp.asarray(rng.standard_normal((2, n)), jnp.float32)
    y = jax.vmap(lambda xx, cc: kernels.decode_matmul(xx, cc, codebook, backend="xla"))(x, codes2)
    for i in range(2):
        assert_matches(y[i], kernels.reference_decode_matmul(x[i], codes2[i], codebook))


def test_gradient_wrt_x(monkeypatch):
    monkeypatch.setattr(xla_decode, "_TILE_BYTES", 8 * 200 * 4)     # 5 tiles of 8 rows (loop)
    rng = np.random.default_rng(5)
    m, n = 40, 200
    codes = random_codes(rng, "E8P12RVQ4B", m, n)
    Q = codebooks.get("E8P12RVQ4B").decode(codes).reshape(m, n)
    for batch in ((n,), (3, n)):
        x = jnp.asarray(rng.standard_normal(batch), jnp.float32)
        g = jax.grad(lambda xx: kernels.decode_matmul(xx, codes, "E8P12RVQ4B",
                                                      backend="xla").sum())(x)
        np.testing.assert_allclose(np.asarray(g), np.broadcast_to(np.asarray(Q.sum(0)), batch),
                                   rtol=1e-5, atol=1e-5)


def test_tile_rows():
    assert xla_decode._tile_rows(4096, 4096) == 512 and xla_decode._tile_rows(4096, 11008) == 256
    assert xla_decode._tile_rows(576, 1536) == 576 and xla_decode._tile_rows(8, 1 << 22) == 8


def test_tables():
    from quipjax.codebooks import rvq
    tab2 = xla_decode._packed_table("e81b")
    nib2 = (tab2[:, None] >> (4 * np.arange(8))) & 15
    np.testing.assert_array_equal(nib2 * 0.5 - 4.0, rvq.e81b_table())
    tab = xla_decode._packed_table("e8p")
    c = np.arange(0, 1 << 16, 97)
    nib = (tab[c][:, None] >> (4 * np.arange(8))) & 15
    np.testing.assert_array_equal(nib * 0.5 - 3.75, codebooks.e8p.codeword_table()[c])


def test_empty_batch_and_bad_codebook():
    rng = np.random.default_rng(9)
    codes = random_codes(rng, "E8P12", 16, 64)
    y = kernels.decode_matmul(jnp.zeros((0, 64)), codes, "E8P12", backend="xla")
    assert y.shape == (0, 16) and y.dtype == jnp.float32
    with pytest.raises(ValueError):
        xla_decode.matmul(jnp.zeros((64,)), {"nib": jnp.zeros((16, 32), jnp.uint8)}, "HI2",
                          (16, 64))


@pytest.mark.parametrize("name", kernels.TRELLIS_CODEBOOKS)
def test_trellis_xla_equals_reference(name, monkeypatch):
    """The trellis codebooks' "xla" decoder (bands of rows, packed codes) = decode everything,
    then one matmul: random words (every word is a valid bitstream piece), 2-band loop plus a
    partial band (bands of 32 rows, 80 rows), a single band, batches 1 / 3 / (2, 5), both
    dtypes; "auto" picks it."""
    from quipjax.kernels import xla_trellis
    monkeypatch.setattr(xla_trellis, "_BAND_BYTES", 4 * 48 * 16 * 2)
    assert xla_trellis.band_rows(80, 48) == 32
    cb = codebooks.get(name)
    rng = np.random.default_rng(case_seed(name))
    for (m, n), batch, dt in [((80, 48), (1,), jnp.float32), ((80, 48), (2, 5), jnp.bfloat16),
                              ((32, 16), (3,), jnp.float32)]:
        codes = jnp.asarray(rng.integers(0, 1 << 16, cb.codes_shape(m, n)).astype(np.uint16))
        x = jnp.asarray(rng.standard_normal(batch + (n,)), dt)
        prep = kernels.prepare(codes, name)
        assert prep.backend == "xla"
        y = jax.jit(kernels.prepared_matmul)(x, prep)
        ref = kernels.reference_decode_matmul(x, codes, name)
        assert_matches(y, ref)
