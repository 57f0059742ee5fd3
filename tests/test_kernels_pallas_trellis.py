"""Pallas (Triton) trellis decode-matmul kernels: the interpreter equals the reference
decode-then-matmul for every trellis codebook, odd shapes, batches 1 / 3 / 16 and the input
dtypes; a tuned HYB table reaches the kernel; every configuration lowers for CUDA."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quipjax import codebooks, kernels
from quipjax.kernels import pallas_trellis

from helpers import case_seed, verify_triton_kernels

# (m, n): 48 x 80 pads to 64 x 128 (2 row blocks, 2 K steps, partial tiles of padding);
# 32 x 16 one block and one step; 48 x 256 the matvec's 8-tile steps (2 of them); 256 x 128
# its 256-row blocks
CASES = [((48, 80), 1, jnp.bfloat16), ((48, 80), 3, jnp.float16), ((48, 80), 16, jnp.float32),
         ((32, 16), 1, jnp.float32), ((48, 256), 1, jnp.float32), ((256, 128), 1, jnp.float32)]


def _matches(y, ref, dt):
    scale = float(jnp.max(jnp.abs(ref)))
    # float32 inputs: only the summation order differs; 16-bit inputs of the batch kernel
    # meet the weights rounded to that dtype (the 3INST / HYB values are not all exact there)
    tol = 2e-6 if dt == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=0, atol=tol * scale)


# every code and every K once (each case is a slow interpreter run); all nine lower below
@pytest.mark.parametrize("name", ["1MAD2", "3INST3", "HYB4", "HYB2"])
def test_interpret_equals_reference(name):
    cb = codebooks.get(name)
    rng = np.random.default_rng(case_seed(name))
    for (m, n), b, dt in CASES:
        codes = jnp.asarray(rng.integers(0, 1 << 16, cb.codes_shape(m, n)).astype(np.uint16))
        x = jnp.asarray(rng.standard_normal((b, n)), dt)
        prep = kernels.prepare(codes, name, backend="pallas_interpret")
        y = jax.jit(kernels.prepared_matmul)(x, prep)
        ref = kernels.reference_decode_matmul(x.astype(jnp.float32), codes, name)
        assert y.shape == (b, m) and y.dtype == jnp.float32
        _matches(y, ref, dt if b > 1 else jnp.float32)


def test_matvec_step_width():
    """8 tile columns per matvec step where they divide the matrix's, else 4."""
    assert pallas_trellis.kernel_configs(4096, 4096, 1)["bt"] == 8
    assert pallas_trellis.kernel_configs(48, 256, 1)["bt"] == 8
    assert pallas_trellis.kernel_configs(576, 576, 1)["bt"] == 4      # 36 tile columns
    assert pallas_trellis.kernel_configs(48, 80, 1)["bt"] == 4
    assert pallas_trellis.kernel_configs(4096, 4096, 16)["bt"] == 16
    # 256 rows per matvec program where they divide the rows, else 128 (no padded rows)
    assert pallas_trellis.kernel_configs(4096, 4096, 1)["bm"] == 256
    assert pallas_trellis.kernel_configs(576, 576, 1)["bm"] == 128
    assert pallas_trellis.kernel_configs(4096, 4096, 16)["bm"] == 64


def _plan_cost(plan, L):
    one = {0, 32 - L} | ({8} if L == 16 else set())
    windows = {s for s, _ in plan}
    return sum(s % 32 != 0 for s in windows) + sum(1 if q in one else 2 for _, q in plan)


def _cheapest_cost(L, step, n, bits):
    """Brute force: every set of windows placing some state at a one-instruction offset, each
    state from its cheapest window of the set or of the loaded words."""
    one = {0, 32 - L} | ({8} if L == 16 else set())
    offs = [j * step for j in range(n)]
    free = [s for s in range(0, bits - 31, 32)]
    cands = sorted({o - q for o in offs for q in one if 0 <= o - q <= bits - 32} - set(free))
    best = None
    for k in range(len(cands) + 1):
        if best is not None and k + n >= best:
            break
        for sub in itertools.combinations(cands, k):
            costs = [min([1 if o - s in one else 2 for s in free + list(sub)
                          if 0 <= o - s <= 32 - L] or [None]) for o in offs]
            if None not in costs and (best is None or k + sum(costs) < best):
                best = k + sum(costs)
    return best


@pytest.mark.parametrize("name", [n for n in pallas_trellis.CODEBOOKS
                                  if codebooks.get(n).trellis.K % 2 == 0])
def test_window_plan_cuts_each_state_and_is_cheapest(name):
    """Each state is taken from a window holding it, inside the loaded words, and no other
    set of windows costs fewer instructions."""
    tr = codebooks.get(name).trellis
    bits = 32 * (tr.K // 2 + 1)
    plan = pallas_trellis._window_plan(tr.L, tr.KV, 16 // tr.V, bits)
    assert len(plan) == 16 // tr.V
    for j, (s, q) in enumerate(plan):
        assert s + q == j * tr.KV and 0 <= q <= 32 - tr.L and 0 <= s <= bits - 32
    assert _plan_cost(plan, tr.L) == _cheapest_cost(tr.L, tr.KV, 16 // tr.V, bits)


def test_tuned_table_reaches_the_kernel():
    name = "HYB3"
    cb = codebooks.get(name)
    rng = np.random.default_rng(3)
    codes = jnp.asarray(rng.integers(0, 1 << 16, cb.codes_shape(48, 80)).astype(np.uint16))
    table = jnp.asarray(np.asarray(cb.default_table()) * 1.5 + 0.1)
    x = jnp.asarray(rng.standard_normal((1, 80)), jnp.float32)
    prep = kernels.prepare(codes, name, backend="pallas_interpret", table=table)
    ref = kernels.reference_decode_matmul(x, codes, name, table)
    _matches(kernels.prepared_matmul(x, prep), ref, jnp.float32)
    assert float(jnp.max(jnp.abs(ref - kernels.reference_decode_matmul(x, codes, name)))) > 0.1


def test_every_configuration_lowers_for_cuda():
    """Every kernel exports for cuda and its Triton IR parses and verifies (the inline PTX
    operands' types are checked there: Triton takes signless integers only)."""
    targets = pallas_trellis.export_targets(shapes=((576, 1536),), batches=(1, 16),
                                            dtypes=(jnp.bfloat16,))
    assert len(targets) == len(pallas_trellis.CODEBOOKS) * 2
    for name, fn, args, meta in targets:
        assert meta["weights_per_iter"] > 0
        ttir = verify_triton_kernels(fn, args, name)
        if "3INST" in name or "1MAD" in name:
            assert ("lop3.b32" if "3INST" in name else "dp4a.u32.u32") in ttir, name
