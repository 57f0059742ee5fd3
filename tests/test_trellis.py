"""QTIP's bitshift trellis codes (`quipjax.codebooks.trellis`): the code values against plain
Python integer arithmetic, the Viterbi search against brute force over every bitstream (path
for path where the table has no ties, cost for cost where it has), tail-biting and packing."""
import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quipjax import codebooks
from quipjax.codebooks import trellis as t


def py_1mad(s):
    x = (s * 34038481 + 76625530) % 2 ** 32
    return (sum((x >> (8 * i)) & 255 for i in range(4)) - 510) / 147.800537109375


def py_3inst(s):
    x = (s * 89226354 + 64248484) % 2 ** 32
    m16 = (1 << 15) + (1 << 12) - 1
    r = (x & ((m16 << 16) + m16)) ^ 996162400
    hi, lo = np.array([r >> 16, r & 0xFFFF], np.uint16).view(np.float16)
    return float(hi + lo)           # a float16 add, as QTIP's `top + bottom` of two halves


def py_hyb(s, table, Q):
    h = (s * (s + 1)) % 2 ** 32
    v = table[(h >> (15 - Q)) & ((1 << Q) - 1)].astype(np.float64).copy()
    if (h >> 15) & 1:
        v[0] = -v[0]
    return v


def test_code_values_match_integer_arithmetic():
    states = np.concatenate([np.arange(40), np.random.default_rng(0).integers(0, 2 ** 16, 200),
                             [2 ** 16 - 1]])
    got = np.asarray(t.decode_1mad(jnp.asarray(states)))
    np.testing.assert_allclose(got, [py_1mad(int(s)) for s in states], rtol=0, atol=1e-6)
    got = np.asarray(t.decode_3inst(jnp.asarray(states)))
    np.testing.assert_array_equal(got, np.float32([py_3inst(int(s)) for s in states]))
    # every state: the float16 sum, which is not the exact sum of the halves for many of them
    allst = np.arange(2 ** 16)
    got = np.asarray(t.decode_3inst(jnp.asarray(allst)))
    np.testing.assert_array_equal(got, np.float32([py_3inst(int(s)) for s in allst]))
    x = (allst.astype(np.uint64) * 89226354 + 64248484) % 2 ** 32
    r = ((x & 0x8FFF8FFF) ^ 996162400).astype(np.uint32)
    exact = ((r >> 16).astype(np.uint16).view(np.float16).astype(np.float64)
             + (r & 0xFFFF).astype(np.uint16).view(np.float16).astype(np.float64))
    assert (got != exact).mean() > 0.3
    table = t.hyb_table(9)
    got = np.asarray(t.decode_hyb(jnp.asarray(states), table, 9))
    np.testing.assert_array_equal(got, np.float32([py_hyb(int(s), table, 9) for s in states]))
    # the codes are near-Gaussian over all 2^16 states (1MAD unit variance by construction)
    v = np.asarray(t.decode_1mad(jnp.arange(2 ** 16)))
    assert abs(v.mean()) < 0.01 and abs(v.std() - 1) < 0.01


def test_hyb_table_is_deterministic():
    a, b = t.hyb_table(5, seed=3, samples=4096, iters=5), t.hyb_table(5, seed=3, samples=4096, iters=5)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (32, 2) and abs(a.std() - t.HYB_STD) < 1e-5
    assert not np.array_equal(a, t.hyb_table(5, seed=4, samples=4096, iters=5))


def brute_force(x, tr, values, overlap=None):
    """(best cost, best states) over every bitstream: the first state's L bits and each
    step's KV new bits, by plain enumeration; with overlap, only the streams whose first
    state's high bits and last state's low bits both equal it."""
    S = len(x) // tr.V
    xv = x.reshape(S, tr.V)
    best = (np.inf, None)
    low = (1 << (tr.L - tr.KV)) - 1
    for first in range(1 << tr.L):
        if overlap is not None and first >> tr.KV != overlap:
            continue
        for new in itertools.product(range(1 << tr.KV), repeat=S - 1):
            s = [first]
            for b in new:
                s.append(((s[-1] << tr.KV) | b) & ((1 << tr.L) - 1))
            if overlap is not None and s[-1] & low != overlap:
                continue
            cost = float(np.sum((values[s] - xv) ** 2))
            if cost < best[0]:
                best = (cost, s)
    return best


def cost_of(x, tr, values, states):
    return float(np.sum((values[np.asarray(states)] - x.reshape(-1, tr.V)) ** 2))


# KV = K V new bits per step: 1-4 take the argmin reduce, 5, 6 and 8 (HYB3 / HYB4 at L = 16)
# the min-then-first-index path of `_viterbi_core`
@pytest.mark.parametrize("L,K,V,T", [(6, 1, 1, 8), (6, 1, 2, 8), (5, 2, 1, 6), (6, 5, 1, 3),
                                     (7, 3, 2, 4), (9, 4, 2, 4)])
def test_viterbi_equals_brute_force_path_for_path(L, K, V, T):
    """A random table (no ties): the Viterbi path is the brute-force path, free and with
    every overlap value."""
    rng = np.random.default_rng(L * 100 + K * 10 + V)
    table = rng.standard_normal((1 << L, V)).astype(np.float32)
    tr = t.Trellis("LUT", L=L, K=K, V=V, T=16 * V, table=tuple(map(tuple, table)))
    values = table.astype(np.float64)
    x = rng.standard_normal((3, T)).astype(np.float32)
    got = np.asarray(t.viterbi(jnp.asarray(x), tr))
    for b in range(3):
        want_cost, want = brute_force(x[b], tr, values)
        assert list(got[b]) == want
        np.testing.assert_allclose(cost_of(x[b], tr, values, got[b]), want_cost, rtol=1e-5)
    n_ov = 1 << (L - K * V)
    ov = np.arange(n_ov) % n_ov
    xs = np.repeat(x[:1], n_ov, 0)
    got = np.asarray(t.viterbi(jnp.asarray(xs), tr, jnp.asarray(ov)))
    for o in range(n_ov):
        _, want = brute_force(xs[o], tr, values, overlap=o)
        assert list(got[o]) == want, o


def plain_viterbi(x, tr, values):
    """A plain NumPy dynamic program: costs of every state, each step's best predecessor by
    np.argmin (the first of equal costs), then the path back from the first best last state."""
    S = len(x) // tr.V
    xv = x.reshape(S, tr.V).astype(np.float64)
    n_low, mask = 1 << (tr.L - tr.KV), (1 << tr.L) - 1
    cost = np.sum((values - xv[0]) ** 2, 1)
    back = []
    for t_ in range(1, S):
        preds = np.array([[j * n_low + (s >> tr.KV) for j in range(1 << tr.KV)]
                          for s in range(1 << tr.L)])
        arg = np.argmin(cost[preds], 1)
        back.append(preds[np.arange(1 << tr.L), arg])
        cost = cost[back[-1]] + np.sum((values - xv[t_]) ** 2, 1)
    path = [int(np.argmin(cost))]
    for b in reversed(back):
        path.append(int(b[path[-1]]))
    assert all(((p << tr.KV) & mask) >> tr.KV == (q >> tr.KV) for p, q in zip(path[1:], path))
    return path[::-1]


@pytest.mark.parametrize("L,K,V", [(8, 1, 2), (8, 3, 2), (9, 4, 2), (7, 5, 1)])
def test_viterbi_breaks_ties_as_a_plain_dynamic_program(L, K, V):
    """A table of few values and inputs on a coarse grid (every cost exact in float32, ties
    everywhere): the Viterbi path is the plain program's, the first predecessor of equal cost
    at every step, whichever reduction the step uses (KV <= 4: argmin; above: min then the
    first index)."""
    rng = np.random.default_rng(L + K + V)
    table = rng.integers(-2, 3, (1 << L, V)).astype(np.float32) / 2
    tr = t.Trellis("LUT", L=L, K=K, V=V, T=16 * V, table=tuple(map(tuple, table)))
    x = (rng.integers(-6, 7, (4, 8 * V)) / 4).astype(np.float32)
    got = np.asarray(t.viterbi(jnp.asarray(x), tr))
    for b in range(4):
        assert list(got[b]) == plain_viterbi(x[b], tr, table.astype(np.float64)), b


@pytest.mark.parametrize("code", ["1MAD", "3INST"])
def test_viterbi_cost_equals_brute_force_for_the_codes(code):
    """The compute-based codes at a small L (ties are frequent: 1MAD takes few distinct
    values): the Viterbi cost is the brute-force minimum."""
    tr = t.Trellis(code, L=6, K=2, V=1, T=8)
    values = np.asarray(tr.state_values(), np.float64)
    x = np.random.default_rng(7).standard_normal((4, 6)).astype(np.float32)
    got = np.asarray(t.viterbi(jnp.asarray(x), tr))
    for b in range(4):
        want_cost, _ = brute_force(x[b], tr, values)
        np.testing.assert_allclose(cost_of(x[b], tr, values, got[b]), want_cost, rtol=1e-5)


@pytest.mark.parametrize("L,K,V,T", [(16, 2, 1, 256), (16, 3, 1, 256), (16, 4, 2, 256),
                                     (12, 3, 1, 32), (17, 1, 1, 64), (20, 2, 2, 64)])
def test_unpack_reads_every_state_window_of_the_stream(L, K, V, T):
    """unpack_states = a plain reading of the bitstream: state i is the L bits starting at bit
    i * K * V (MSB first, wrapping past the end), for random words (fast path L <= 17 and the
    bit-by-bit path)."""
    tr = t.Trellis("LUT", L=L, K=K, V=V, T=T, table=((0.0,) * V,))
    words = np.random.default_rng(L * K).integers(0, 1 << 16, (3, T * K // 16), np.uint16)
    got = np.asarray(t.unpack_states(jnp.asarray(words), tr))
    nbits = words.shape[1] * 16
    for b in range(3):
        stream = "".join(format(int(w), "016b") for w in words[b])
        for i in range(T // V):
            bits = "".join(stream[(i * K * V + j) % nbits] for j in range(L))
            assert got[b, i] == int(bits, 2), (b, i)
    # packing the unpacked states gives the words back (the stream is all there is)
    np.testing.assert_array_equal(np.asarray(t.pack_states(jnp.asarray(got), tr)), words)


# 1MAD at 2 bits: through BlockLDLQ in test_block_ldlq_with_trellis_tiles_equals_a_plain_loop
@pytest.mark.parametrize("code,V,K", [("3INST", 1, 3), ("HYB", 2, 2), ("HYB", 2, 4)])
def test_tail_biting_pack_round_trip(code, V, K):
    """Tail-biting states wrap (the first state's high bits are the last state's low bits),
    pack to T * K bits, unpack to the same states, and decode to the returned xhat."""
    tr = t.Trellis(code, L=16, K=K, V=V)
    x = np.random.default_rng(1).standard_normal((5, tr.T)).astype(np.float32)
    s, xhat = t.quantize_tail_biting(jnp.asarray(x), tr)
    s = np.asarray(s)
    assert s.shape == (5, tr.T // V)
    low = (1 << (tr.L - tr.KV)) - 1
    np.testing.assert_array_equal(s[:, 0] >> tr.KV, s[:, -1] & low)
    np.testing.assert_array_equal(s[:, 1:] >> tr.KV, s[:, :-1] & low)      # a trellis path
    packed = t.pack_states(jnp.asarray(s), tr)
    assert packed.dtype == jnp.uint16 and packed.shape == (5, tr.T * K // 16)
    np.testing.assert_array_equal(np.asarray(t.unpack_states(packed, tr)), s)
    np.testing.assert_array_equal(np.asarray(tr.decode_states(jnp.asarray(s))).reshape(5, -1),
                                  np.asarray(xhat))
    mse = float(np.mean((x - np.asarray(xhat)) ** 2))
    # below the best scalar quantizer of each rate (Lloyd-Max: 0.1175, 0.0345, 0.0095)
    assert mse < {2: 0.075, 3: 0.025, 4: 0.0095}[K], mse


def test_batching_never_changes_a_state():
    """The sequences searched together (default_chunk, padded chunks, one at a time) do not
    change any sequence's states, free or tail-biting, at L = 16 as the codebooks use it."""
    for B in (1, 31, 32, 33, 60, 96, 193):
        c = t.default_chunk(B)
        n = -(-B // c)
        assert 1 <= c <= t.MAX_CHUNK and n * c - B < n, (B, c)    # equal batches, no waste
    for code, V in (("HYB", 2), ("1MAD", 1)):
        tr = t.Trellis(code, L=16, K=2, V=V)
        x = jnp.asarray(np.random.default_rng(2).standard_normal((37, 64)), jnp.float32)
        ov = jnp.asarray(np.random.default_rng(3).integers(0, 1 << (16 - tr.KV), 37), jnp.int32)
        for overlap in (None, ov):
            ref = np.asarray(t.viterbi(x, tr, overlap))                  # 2 chunks of 19
            for chunk in (1, 8, 37):
                np.testing.assert_array_equal(np.asarray(t.viterbi(x, tr, overlap, chunk=chunk)), ref)
            alone = t.viterbi(x[5:6], tr, None if overlap is None else overlap[5:6])
            np.testing.assert_array_equal(np.asarray(alone)[0], ref[5])


def test_bad_trellis_settings_are_refused():
    with pytest.raises(ValueError, match="V must be 1"):
        t.Trellis("1MAD", V=2)
    with pytest.raises(ValueError, match="V must be 2"):
        t.Trellis("HYB", V=1)
    with pytest.raises(ValueError, match="K \\* V"):
        t.Trellis("1MAD", L=4, K=4)
    with pytest.raises(ValueError, match="needs a table"):
        t.Trellis("LUT")


def plain_block_ldlq(W, L, tr):
    """BlockLDLQ written plainly for 16 x 16 tiles: blocks of 16 columns from the last, each
    W_k + (W_>k - What_>k) L_>k,k rounded tile by tile (rows 16 i..16 i + 15, row-major)."""
    m, n = W.shape
    What = np.zeros_like(W)
    codes = np.zeros((m // 16, n // 16, tr.T * tr.K // 16), np.uint16)
    for k in reversed(range(n // 16)):
        c = slice(16 * k, 16 * k + 16)
        x = W[:, c] + (W[:, 16 * k + 16:] - What[:, 16 * k + 16:]) @ L[16 * k + 16:, c]
        for i in range(m // 16):
            tile = x[16 * i:16 * i + 16].reshape(1, 256)
            s, xh = t.quantize_tail_biting(jnp.asarray(tile), tr)
            What[16 * i:16 * i + 16, c] = np.asarray(xh).reshape(16, 16)
            codes[i, k] = np.asarray(t.pack_states(s, tr))[0]
    return codes, What


def test_block_ldlq_with_trellis_tiles_equals_a_plain_loop():
    """The registered trellis codebook through the one BlockLDLQ (16-column blocks, block LDL
    in 16 x 16 blocks) gives the codes of a plain per-tile loop, and its codes decode to the
    same matrix; quantize_linear's QuantizedLinear applies as its dequantized weight."""
    from quipjax import codebooks, ldlq
    from quipjax.quantize import quantize_linear
    cb = codebooks.get("1MAD2")
    assert cb.block == 16 and cb.search == "tail-biting" and cb.bits_per_weight == 2
    rng = np.random.default_rng(0)
    m, n = 32, 48
    W = rng.standard_normal((m, n)).astype(np.float32)
    X = rng.standard_normal((256, n)) @ (np.eye(n) + 0.3 * rng.standard_normal((n, n)))
    H = (X.T @ X / 256 + 1e-2 * np.eye(n)).astype(np.float32)
    L, _ = ldlq.block_ldl(jnp.asarray(H), 16)
    codes, What = ldlq.block_ldlq(jnp.asarray(W), L, cb)
    want_codes, want_What = plain_block_ldlq(W, np.asarray(L), cb.trellis)
    assert codes.shape == (2, 3, 32) and codes.dtype == jnp.uint16
    np.testing.assert_array_equal(np.asarray(codes), want_codes)
    np.testing.assert_allclose(np.asarray(What), want_What, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(cb.decode_matrix(codes, m, n)), np.asarray(What))
    ql = quantize_linear(W, H, codebook="1MAD2", key=jax.random.key(0))
    x = jnp.asarray(rng.standard_normal((3, n)), jnp.float32)
    np.testing.assert_allclose(np.asarray(ql.apply(x)), np.asarray(x @ ql.dequantize().T),
                               atol=1e-4)
    # the public coordinates-first search on whole tiles
    tiles = rng.standard_normal((4, 256)).astype(np.float32)
    c, xt = cb.quantize_t(jnp.asarray(tiles.T))
    assert c.shape == (4, 32) and xt.shape == (256, 4)
    np.testing.assert_array_equal(np.asarray(cb.decode(c)), np.asarray(xt).T)
    with pytest.raises(ValueError, match="multiple of 16 in both"):
        quantize_linear(W[:24], H, codebook="1MAD2", key=jax.random.key(0))


def test_tuned_hyb_table_decodes_and_has_exact_gradients():
    """A QuantizedLinear carries a tuned HYB table: None and the default table decode alike, a
    changed table changes exactly the entries it indexes (= a plain decode with that table),
    apply() uses it, its storage is counted, and tables are refused where they do not fit.
    The tunable table's gradient (`TableSource`, R linear in the table) matches the change of
    the loss."""
    from flax import nnx
    from quipjax import layers
    from quipjax.quantize import quantize_linear
    rng = np.random.default_rng(0)
    W = rng.standard_normal((32, 48)).astype(np.float32)
    H = np.cov(rng.standard_normal((48, 256))).astype(np.float32) + np.eye(48, dtype=np.float32)
    ql = quantize_linear(W, H, codebook="HYB2", key=jax.random.key(0))
    cb = codebooks.get("HYB2")
    tab = np.asarray(cb.default_table())
    assert cb.has_table and not codebooks.get("1MAD2").has_table and tab.shape == (512, 2)
    same = dataclasses.replace(ql, table=jnp.asarray(tab))
    np.testing.assert_array_equal(np.asarray(same.dequantize()), np.asarray(ql.dequantize()))
    new = tab + rng.standard_normal(tab.shape).astype(np.float32) * 0.1
    tuned = dataclasses.replace(ql, table=jnp.asarray(new))
    states = np.asarray(t.unpack_states(ql.codes.reshape(-1, ql.codes.shape[-1]), cb.trellis))
    h = (states.astype(np.uint64) * (states.astype(np.uint64) + 1)) % (1 << 32)
    idx = ((h >> 6) & 511).astype(np.int64)
    v = new[idx] * np.stack([np.where((h >> 15) & 1, -1.0, 1.0), np.ones(h.shape)], -1)
    tiles = v.reshape(2, 3, 16, 16).transpose(0, 2, 1, 3).reshape(32, 48)
    np.testing.assert_allclose(np.asarray(tuned.decode_rotated()), tiles, rtol=1e-6, atol=1e-6)
    x = rng.standard_normal((3, 48)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(tuned.apply(x)), x @ np.asarray(tuned.dequantize()).T,
                               rtol=1e-4, atol=1e-4)
    assert tuned.bits()["table"] == 512 * 2 * 32 and "table" not in ql.bits()
    with pytest.raises(ValueError, match="has no value table"):
        codebooks.get("E8P12").check_table(tab)
    with pytest.raises(ValueError, match=r"table has shape \(512, 2\)"):
        cb.check_table(tab[:10])

    src = layers.TableSource(tuned)
    G = jnp.asarray(rng.standard_normal((32, 48)), jnp.float32)
    loss = lambda s: jnp.sum(s.R() * G)                                   # noqa: E731
    grad = nnx.grad(loss)(src).table[...]
    delta = rng.standard_normal(tab.shape).astype(np.float32)
    moved = layers.TableSource(dataclasses.replace(tuned, table=jnp.asarray(new + delta)))
    np.testing.assert_allclose(float(loss(moved) - loss(src)), float(jnp.sum(grad * delta)),
                               rtol=1e-3)
