"""Gaussian MSE and search speed of every codebook.

    python experiments/bench_codebooks.py [--samples=1000000] [--speed_n=262144]

MSE per dimension of rounding x * s and dividing by s, x ~ N(0, I), at the codebook's
opt_scale and default_scale; search time per 8-dim vector (jit, median of 5, compile apart);
and, for E8P12, the fraction of vectors on which the fast search agrees with a brute-force
argmin over all 65536 codewords.
"""
from __future__ import annotations

import statistics
import time

from absl import flags

import jax
import numpy as np

from quipjax import codebooks
from quipjax.codebooks import e8p
from quipjax.pipeline import cli

FLAGS = flags.FLAGS
flags.DEFINE_integer("samples", 1_000_000, "Gaussian 8-dim vectors for the MSE.")
flags.DEFINE_integer("speed_n", 262144, "Vectors per timed search call.")
flags.DEFINE_integer("brute_n", 20000, "Vectors checked against the brute-force E8P12 search.")


def main(argv):
    del argv
    x = jax.random.normal(jax.random.key(0), (FLAGS.samples, 8))
    xs = jax.random.normal(jax.random.key(1), (FLAGS.speed_n, 8))
    print("| codebook | bits | MSE @ opt_scale | opt_scale | MSE @ default | default | ns / 8 weights |")
    print("|---|---|---|---|---|---|---|")
    for name in codebooks.names():
        cb = codebooks.get(name)
        xx = x if cb.dim == 8 else x.reshape(-1, 1)
        mse_opt = float(cb.mse(xx, cb.opt_scale))
        mse_def = float(cb.mse(xx, cb.default_scale))
        f = jax.jit(cb.quantize)
        v = xs if cb.dim == 8 else xs.reshape(-1, 1)
        jax.block_until_ready(f(v))
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            jax.block_until_ready(f(v))
            ts.append(time.perf_counter() - t)
        ns = statistics.median(ts) / FLAGS.speed_n * 1e9
        print(f"| {name} | {cb.bits_per_weight:g} | {mse_opt:.4f} | {cb.opt_scale} | {mse_def:.4f} "
              f"| {cb.default_scale} | {ns:.0f} |", flush=True)
    xb = np.asarray(x[:FLAGS.brute_n]) * 1.03
    fast = np.asarray(codebooks.get("E8P12").quantize(xb))
    brute, _ = e8p.e8p_quantize_brute_force(xb)
    print(f"E8P12 fast search == brute-force argmin on {(fast == np.asarray(brute)).mean():.6f} "
          f"of {FLAGS.brute_n} Gaussian vectors")


if __name__ == "__main__":
    cli.run(main)
