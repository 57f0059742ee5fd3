"""Greedy vs beam search of the 3/4-bit residual codebooks: Gaussian MSE, search time, and the
proxy loss of one random-Hessian layer.

    python experiments/bench_rvq_search.py [--n=100000] [--beams=4,16,64] [--proxy_beams=4,16,64]

Table 1, per codebook and beam (1 = greedy, the registered codebooks' search): MSE per weight
of x ~ N(0, I) (n 8-dim vectors) rounded at the codebook's opt_scale, measured at unit scale
(`Codebook.mse`); the fraction of vectors whose squared error the beam lowers; the search time
per 10^5 vectors (`jax.jit(cb.quantize)` on the n vectors, compile apart, median of --repeats)
and its ratio to greedy.
Table 2: the proxy loss tr(E H E^T) / tr(W H W^T) of `quantize_linear` (BlockLDLQ, default
scale and sigma_reg, seed 0) on a Gaussian --proxy_n x --proxy_n W and H = A^T A, A =
N(0, 1/n) + I (as experiments/bench_quantize.py), and the seconds of that call (compile
included).
"""
from __future__ import annotations

import statistics
import time

from absl import flags

import jax
import jax.numpy as jnp
import numpy as np

from quipjax import codebooks, hessian, ldlq, quantize_linear
from quipjax.pipeline import cli

FLAGS = flags.FLAGS
flags.DEFINE_integer("n", 100_000, "Gaussian 8-dim vectors of the MSE and the timing.")
flags.DEFINE_list("beams", ["4", "16", "64"], "Beam widths compared with greedy.")
flags.DEFINE_integer("repeats", 3, "Timed runs per search (the median is reported).")
flags.DEFINE_list("proxy_beams", ["4", "16", "64"], "Beam widths of the proxy-loss table (empty: "
                  "no proxy table).")
flags.DEFINE_integer("proxy_n", 512, "Rows and columns of the proxy-loss matrix.")

NAMES = ("E8P12RVQ4B", "E8P12RVQ3B")


def search_table(x):
    print("| codebook | beam | MSE / weight | vs greedy | vectors improved | s / 10^5 vectors "
          "| time vs greedy |")
    print("|---|---|---|---|---|---|---|")
    for name in NAMES:
        greedy = codebooks.get(name)
        xs = x * greedy.opt_scale
        base_err = base_t = None
        for beam in [1] + [int(b) for b in FLAGS.beams]:
            cb = codebooks.get(name, beam=beam)
            f = jax.jit(cb.quantize_with_values)
            jax.block_until_ready(f(xs))                       # compile (and warm up)
            ts = []
            for _ in range(FLAGS.repeats):
                t = time.perf_counter()
                _, xhat = jax.block_until_ready(f(xs))
                ts.append(time.perf_counter() - t)
            err = np.asarray(jnp.sum((xhat / greedy.opt_scale - x) ** 2, -1), np.float64)
            per1e5 = statistics.median(ts) / x.shape[0] * 1e5
            if beam == 1:
                base_err, base_t = err, per1e5
            mse = err.mean() / 8
            print(f"| {name} | {beam if beam > 1 else '1 (greedy)'} | {mse:.6f} "
                  f"| {100 * (mse / (base_err.mean() / 8) - 1):+.2f}% "
                  f"| {100 * (err < base_err - 1e-9).mean():.1f}% | {per1e5:.3f} "
                  f"| {per1e5 / base_t:.1f}x |", flush=True)


def proxy_table():
    n = FLAGS.proxy_n
    kw, ka = jax.random.split(jax.random.key(1000 + 2 * n))
    W = jax.random.normal(kw, (n, n), jnp.float32)
    A = jax.random.normal(ka, (n, n), jnp.float32) / np.sqrt(n) + jnp.eye(n)
    H = jnp.dot(A.T, A, precision="highest")
    print(f"\n| codebook | beam | proxy loss ({n}x{n}, BlockLDLQ) | vs greedy | seconds (incl. "
          f"compile) |")
    print("|---|---|---|---|---|")
    for name in NAMES:
        base = None
        for beam in [1] + [int(b) for b in FLAGS.proxy_beams]:
            t = time.perf_counter()
            ql = quantize_linear(W, H, codebook=codebooks.get(name, beam=beam),
                                 key=jax.random.key(0))
            jax.block_until_ready(ql.codes)
            sec = time.perf_counter() - t
            p = float(ldlq.proxy_loss(W, ql.dequantize(), hessian.regularize(H)))
            base = p if beam == 1 else base
            print(f"| {name} | {beam if beam > 1 else '1 (greedy)'} | {p:.6f} "
                  f"| {100 * (p / base - 1):+.2f}% | {sec:.1f} |", flush=True)


def main(argv):
    del argv
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, n = {FLAGS.n}")
    search_table(jax.random.normal(jax.random.key(0), (FLAGS.n, 8)))
    if FLAGS.proxy_beams:
        proxy_table()


if __name__ == "__main__":
    cli.run(main)
