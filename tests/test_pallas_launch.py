"""The single PTX instructions of `kernels.pallas_launch`: the operands the kernels give
`lop3` and `dp4a` compute, by those instructions' definitions (PTX ISA), the same values as
the plain expressions the interpreter runs. (No test here can execute PTX; this checks the
truth table and the operands, ptxas checks the syntax in experiments/kernel_ptx.py.)"""
import jax.numpy as jnp
import numpy as np

from quipjax.kernels import pallas_launch


def lop3(a, b, c, lut):
    """PTX lop3.b32: bit i of the result is bit (4 a_i + 2 b_i + c_i) of lut."""
    out = np.zeros_like(a)
    for i in range(32):
        idx = (((a >> i) & 1) << 2) | (((b >> i) & 1) << 1) | ((c >> i) & 1)
        out |= ((np.uint32(lut) >> idx.astype(np.uint32)) & 1) << np.uint32(i)
    return out


def dp4a_u32(a, b, c):
    """PTX dp4a.u32.u32: the sum of the four products of a's and b's bytes, plus c, mod 2^32."""
    s = sum(((a.astype(np.uint64) >> (8 * k)) & 255) * ((b.astype(np.uint64) >> (8 * k)) & 255)
            for k in range(4))
    return ((s + c) % (1 << 32)).astype(np.uint32)


def test_lop3_table_is_and_then_xor():
    rng = np.random.default_rng(0)
    a, b, c = (rng.integers(0, 1 << 32, 1000, dtype=np.uint64).astype(np.uint32) for _ in "abc")
    np.testing.assert_array_equal(lop3(a, b, c, pallas_launch.AND_XOR_LUT), (a & b) ^ c)
    mask, xor = 0x8FFF8FFF, 996162400
    got = np.asarray(pallas_launch.and_xor(jnp.asarray(a), mask, xor, ptx=False))
    np.testing.assert_array_equal(got, lop3(a, np.full_like(a, mask), np.full_like(a, xor),
                                            pallas_launch.AND_XOR_LUT))


def test_lop3_tables_of_the_other_helpers():
    rng = np.random.default_rng(2)
    a, b = (rng.integers(0, 1 << 32, 1000, dtype=np.uint64).astype(np.uint32) for _ in "ab")
    full = lambda v: np.full_like(a, v)  # noqa: E731
    got = np.asarray(pallas_launch.and_or(jnp.asarray(a), 15, 0x4B000000, ptx=False))
    np.testing.assert_array_equal(got, lop3(a, full(15), full(0x4B000000),
                                            pallas_launch.AND_OR_LUT))
    got = np.asarray(pallas_launch.xor_masked(jnp.asarray(a), jnp.asarray(b), 0x80000000,
                                              ptx=False))
    np.testing.assert_array_equal(got, lop3(a, b, full(0x80000000),
                                            pallas_launch.XOR_MASKED_LUT))
    assert not np.array_equal(got, a) and not np.array_equal(got, a ^ b)


def test_dp4a_operands_give_the_byte_sum():
    rng = np.random.default_rng(1)
    a = np.concatenate([rng.integers(0, 1 << 32, 1000, dtype=np.uint64),
                        [0, 0xFFFFFFFF, 0x01FF00FF]]).astype(np.uint32)
    for offset in (-510, 0, 7):
        got = np.asarray(pallas_launch.byte_sum(jnp.asarray(a), offset, ptx=False))
        want = dp4a_u32(a, np.full_like(a, 0x01010101), offset % (1 << 32)).view(np.int32)
        np.testing.assert_array_equal(got, want)
        assert got.dtype == np.int32
