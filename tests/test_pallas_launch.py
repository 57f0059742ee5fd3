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


def prmt(a, b, sel):
    """PTX prmt.b32 (default mode): byte i of the result is byte (nibble i of sel) & 7 of
    the 8 bytes {b, a} (a: bytes 0-3), replicated from its top bit when the nibble's bit 3
    is set."""
    src = (b.astype(np.uint64) << np.uint64(32)) | a.astype(np.uint64)
    out = np.zeros_like(a)
    for i in range(4):
        nib = (sel >> (4 * i)) & 15
        byte = ((src >> np.uint64(8 * (nib & 7))) & np.uint64(255)).astype(np.uint32)
        if nib & 8:
            byte = np.where(byte & 128, np.uint32(255), np.uint32(0))
        out |= byte << np.uint32(8 * i)
    return out


def shf_l_wrap(a, b, c):
    """PTX shf.l.wrap.b32: the top 32 bits of the 64-bit {b, a} (b high) shifted left by
    c mod 32."""
    v = (b.astype(np.uint64) << np.uint64(32)) | a.astype(np.uint64)
    return ((v << np.uint64(c % 32)) >> np.uint64(32)).astype(np.uint32) & np.uint32(0xFFFFFFFF)


def _emulated(monkeypatch):
    """Replace the inline-PTX call by an emulation of the instruction it names, with the
    operands as written in its template ($k: the k-th argument; else an immediate)."""
    ops = {"prmt.b32": prmt, "shf.l.wrap.b32": shf_l_wrap}

    def run(code, args, dtype, constraints):
        name, rest = code.rstrip(";").split(" ", 1)
        operands = [t.strip() for t in rest.split(",")][1:]
        vals = [np.asarray(args[int(t[1:]) - 1]).astype(np.uint32) if t.startswith("$")
                else np.uint32(int(t, 0)) for t in operands]
        a = np.broadcast_to(vals[0], np.shape(args[0])).astype(np.uint32)
        return jnp.asarray(ops[name](a, *vals[1:]))
    monkeypatch.setattr(pallas_launch, "_asm", run)


def test_prmt_and_funnel_operands(monkeypatch):
    rng = np.random.default_rng(3)
    a, b = (rng.integers(0, 1 << 32, 1000, dtype=np.uint64).astype(np.uint32) for _ in "ab")
    plain_mid = np.asarray(pallas_launch.middle_half(jnp.asarray(a), ptx=False))
    plain_fun = {n: np.asarray(pallas_launch.funnel(jnp.asarray(a), jnp.asarray(b), n, ptx=False))
                 for n in (1, 8, 14, 31)}
    np.testing.assert_array_equal(plain_mid, (a >> 8) & 0xFFFF)
    for n, v in plain_fun.items():
        want = ((a.astype(np.uint64) << 32 | b) >> (32 - n)) & 0xFFFFFFFF
        np.testing.assert_array_equal(v, want.astype(np.uint32))
    _emulated(monkeypatch)
    np.testing.assert_array_equal(
        np.asarray(pallas_launch.middle_half(jnp.asarray(a), ptx=True)), plain_mid)
    for n, v in plain_fun.items():
        got = pallas_launch.funnel(jnp.asarray(a), jnp.asarray(b), n, ptx=True)
        np.testing.assert_array_equal(np.asarray(got), v)
