"""Measured per-unit costs behind experiments/plan.py: one matrix quantized, one block step.

    python experiments/bench_sharding_costs.py --what=matrix --shapes=4096x11008,8192x28672
    python experiments/bench_sharding_costs.py --what=block --blocks=llama2_7b,llama2_70b
    python experiments/bench_sharding_costs.py --what=proxy --shapes=4096x11008,8192x28672

--what=matrix: `quantize_linear` at 2 bits (E8P12) on W ~ N(0, 1) (m, n) with a random SPD
Hessian (H = B B^T / r + diag(exp(N(0, 1))) with B (n, r), r = 1024: full rank, a spread
spectrum, cheap to build for n = 28672), timed stage by stage with the functions
`quantize_linear` runs: input checks, the Hessian's regularization + two-sided RHT, W's RHT +
scale, the block LDL (Cholesky), BlockLDLQ. Each stage is compiled ahead of time (compile
seconds reported apart) and run once. The sum of the stages is the per-matrix cost.

--what=block: one Hessian-collection step of a random bf16 block of the given shape on one
window of --ctx tokens (the pipeline's step: the block forward, its outputs, and the Hessian
updates of the four linear groups), and the block forward alone (evaluation and fine-tuning
use it). Compile apart, median of --repeats runs.

--what=proxy: the proxy loss the pipeline records for every matrix (dequantize, then two
(m, n) x (n, n) products at HIGHEST precision), on random codes.

Each shape runs in a fresh subprocess, which also reports its peak resident memory. Output:
one JSON line per shape (`--out` appends them to a file), then a table.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

from absl import flags
from quipjax.pipeline import cli

FLAGS = flags.FLAGS
flags.DEFINE_enum("what", "matrix", ["matrix", "block", "proxy"], "What to measure.")
flags.DEFINE_list("shapes", ["4096x11008", "8192x28672"], "Matrix shapes m x n (out x in).")
flags.DEFINE_list("blocks", ["llama2_7b", "llama2_70b"], "Block shapes (names of "
                  "tests/data/configs/<name>.json or paths to config.json files).")
flags.DEFINE_string("codebook", "E8P12", "Codebook of the matrix measurement.")
flags.DEFINE_integer("ctx", 2048, "Tokens per window of the block measurement.")
flags.DEFINE_integer("repeats", 3, "Timed runs of the block step (median reported).")
flags.DEFINE_string("out", None, "Append the JSON lines to this file.")
flags.DEFINE_string("child", None, "Internal: one measurement (json args).")

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "configs")


def _rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn, *args):
    import jax
    t = time.perf_counter()
    comp = jax.jit(fn).lower(*args).compile()
    c = time.perf_counter() - t
    t = time.perf_counter()
    out = jax.block_until_ready(comp(*args))
    return out, c, time.perf_counter() - t


def matrix_child(m, n, codebook):
    import jax
    import jax.numpy as jnp
    from quipjax import codebooks, hessian, ldlq, rht
    from quipjax import quantize as q
    cb = codebooks.get(codebook)
    r = 1024
    kw, kb, kd = jax.random.split(jax.random.key(m * 100003 + n), 3)
    t = time.perf_counter()
    W = jax.random.normal(kw, (m, n), jnp.float32)

    @jax.jit
    def make_h(kb, kd):
        B = jax.random.normal(kb, (n, r), jnp.float32)
        H = jnp.dot(B, B.T, precision="highest") / r
        return H + jnp.diag(jnp.exp(jax.random.normal(kd, (n,), jnp.float32)))
    H = jax.block_until_ready(make_h(kb, kd))
    build_s = time.perf_counter() - t
    rss0 = _rss_mb()
    res = {"kind": "matrix", "shape": f"{m}x{n}", "m": m, "n": n, "codebook": cb.name,
           "build_inputs_s": build_s}
    t = time.perf_counter()
    q.check_inputs(W, H, cb)
    res["check_s"] = time.perf_counter() - t      # includes its (small) compile
    rot_m, rot_n = rht.rotation(m), rht.rotation(n)
    key = jax.random.key(0)
    SU, SV = rht.sign_vectors(key, m, n)
    sigma, rho = jnp.float32(1e-2), jnp.float32(cb.default_scale)

    def h_stage(H, SU, sigma):          # regularize + two-sided RHT of H
        return rht.transform_hessian(hessian.regularize(H, sigma), SU, rot_n)
    Hr, res["hessian_rht_compile_s"], res["hessian_rht_s"] = _timed(h_stage, H, SU, sigma)
    del H

    def w_stage(W, SU, SV, rho):        # RHT of W + scale (as quantize.rotate_and_scale)
        w = W * SV[:, None] * SU[None, :]
        w = rot_m.apply(w, axis=0, transpose=True)
        w = rot_n.apply(w, axis=1, transpose=True)
        return w / (jnp.sqrt(jnp.mean(w * w)) / rho)
    Ws, res["weight_rht_compile_s"], res["weight_rht_s"] = _timed(w_stage, W, SU, SV, rho)
    del W
    (L, _), res["block_ldl_compile_s"], res["block_ldl_s"] = _timed(ldlq.block_ldl, Hr)
    del Hr
    assert bool(jnp.all(jnp.isfinite(L)))
    codes, res["block_ldlq_compile_s"], res["block_ldlq_s"] = _timed(
        lambda Ws, L: q.round_ldlq(Ws, L, cb), Ws, L)
    res["hessian_steps_s"] = res["hessian_rht_s"] + res["block_ldl_s"]
    res["total_s"] = (res["check_s"] + res["hessian_rht_s"] + res["weight_rht_s"]
                      + res["block_ldl_s"] + res["block_ldlq_s"])
    res["compile_s"] = sum(v for k, v in res.items() if k.endswith("_compile_s"))
    res["codes_shape"] = list(codes.shape)
    res["peak_rss_mb"] = _rss_mb()
    res["rss_after_inputs_mb"] = rss0
    res["devices"] = str(jax.devices()[0].device_kind)
    return res


def proxy_child(m, n, codebook):
    """The proxy loss the pipeline records per matrix (dequantize + two (m, n) x (n, n)
    products), on random codes: its cost does not depend on the values."""
    import jax
    import jax.numpy as jnp
    from quipjax import codebooks, rht
    from quipjax.quantize import QuantizedLinear, proxy as proxy_loss
    cb = codebooks.get(codebook)
    kw, kc, kh = jax.random.split(jax.random.key(7), 3)
    W = jax.random.normal(kw, (m, n), jnp.float32)
    codes = jax.random.randint(kc, (m, n // cb.dim) + cb.code_shape, 0, 65536,
                               jnp.int32).astype(jnp.uint16)
    B = jax.random.normal(kh, (n, 256), jnp.float32)
    H = jnp.dot(B, B.T) / 256 + jnp.eye(n)
    SU, SV = rht.sign_vectors(jax.random.key(0), m, n)
    tr = (rht.rotation(m).kind, rht.rotation(n).kind)

    def proxy(W, codes, SU, SV, H, sigma):
        ql = QuantizedLinear(codes=codes, SU=SU, SV=SV, codebook=cb.name, shape=(m, n),
                             transforms=tr)
        return proxy_loss(W, ql, H, sigma)
    _, c, s = _timed(proxy, W, codes, SU, SV, H, jnp.float32(1e-2))
    return {"kind": "proxy", "shape": f"{m}x{n}", "proxy_compile_s": c, "proxy_s": s,
            "peak_rss_mb": _rss_mb()}


def block_child(name, ctx, repeats):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from quipjax.distributed import HessianEngine, Placement
    from quipjax.models import llama
    cfg_path = name if os.path.exists(name) else os.path.join(CONFIGS, f"{name}.json")
    with open(cfg_path) as f:
        spec = llama.LlamaSpec.from_hf(json.load(f))
    block = llama.random_block(spec, jax.random.key(0), jnp.bfloat16)
    x = np.asarray(jax.random.normal(jax.random.key(1), (1, ctx, spec.hidden_size), jnp.float32))
    res = {"kind": "block", "block": os.path.basename(cfg_path).split(".")[0],
           "hidden": spec.hidden_size, "intermediate": spec.intermediate_size,
           "heads": spec.num_heads, "kv_heads": spec.num_kv_heads, "ctx": ctx,
           "params": sum(int(np.prod(np.shape(l))) for l in jax.tree.leaves(nnx.state(block))
                         if np.ndim(l) == 2)}
    # the forward alone (evaluation, fine-tuning): one window through the block
    graphdef, state = nnx.split(block)
    fwd = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, jnp.arange(x.shape[1])))
    t = time.perf_counter()
    comp = fwd.lower(state, x).compile()
    res["forward_compile_s"] = time.perf_counter() - t
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(comp(state, x))
        times.append(time.perf_counter() - t)
    res["forward_s"] = statistics.median(times)
    del comp
    # one Hessian-collection step: the pipeline's program (forward + the four Hessian updates),
    # one accumulator slot (the slot count changes memory, not the per-step work)
    eng = HessianEngine(block, Placement(), shards=1)
    t = time.perf_counter()
    jax.block_until_ready(eng.step(x, 0))
    res["hessian_step_first_s"] = time.perf_counter() - t      # compile + one step
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(eng.step(x, i + 1))
        times.append(time.perf_counter() - t)
    res["hessian_step_s"] = statistics.median(times)
    res["hessian_step_compile_s"] = res["hessian_step_first_s"] - res["hessian_step_s"]
    res["peak_rss_mb"] = _rss_mb()
    return res


def main(argv):
    del argv
    if FLAGS.child:
        a = json.loads(FLAGS.child)
        if a["kind"] == "matrix":
            r = matrix_child(a["m"], a["n"], a["codebook"])
        elif a["kind"] == "proxy":
            r = proxy_child(a["m"], a["n"], a["codebook"])
        else:
            r = block_child(a["name"], a["ctx"], a["repeats"])
        print(json.dumps(r), flush=True)
        return
    if FLAGS.what in ("matrix", "proxy"):
        jobs = [{"kind": FLAGS.what, "m": int(s.split("x")[0]), "n": int(s.split("x")[1]),
                 "codebook": FLAGS.codebook} for s in FLAGS.shapes]
    else:
        jobs = [{"kind": "block", "name": b, "ctx": FLAGS.ctx, "repeats": FLAGS.repeats}
                for b in FLAGS.blocks]
    rows = []
    for job in jobs:
        t = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, f"--child={json.dumps(job)}"],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        r["wall_s"] = time.perf_counter() - t
        rows.append(r)
        print(json.dumps(r), flush=True)
        if FLAGS.out:
            with open(FLAGS.out, "a") as f:
                f.write(json.dumps(r) + "\n")
    if FLAGS.what == "matrix":
        print("| shape | H: reg + RHT s | W: RHT s | block LDL s | BlockLDLQ s | checks s | "
              "total s | compile s | peak RSS MB |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['shape']} | {r['hessian_rht_s']:.1f} | {r['weight_rht_s']:.1f} | "
                  f"{r['block_ldl_s']:.1f} | {r['block_ldlq_s']:.1f} | {r['check_s']:.1f} | "
                  f"{r['total_s']:.1f} | {r['compile_s']:.1f} | {r['peak_rss_mb']:.0f} |")
    elif FLAGS.what == "proxy":
        print("| shape | proxy loss s | compile s | peak RSS MB |")
        print("|---|---|---|---|")
        for r in rows:
            print(f"| {r['shape']} | {r['proxy_s']:.1f} | {r['proxy_compile_s']:.1f} | "
                  f"{r['peak_rss_mb']:.0f} |")
    else:
        print("| block | Hessian step s | forward s | compile s | peak RSS MB |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['block']} ({FLAGS.ctx} tokens) | {r['hessian_step_s']:.2f} | "
                  f"{r['forward_s']:.2f} | {r['hessian_step_compile_s']:.1f} | "
                  f"{r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    cli.run(main)
