"""Gaussian MSE and search speed of QTIP's trellis codes (`quipjax.codebooks.trellis`).

    python experiments/bench_trellis.py [--samples=1000000] [--bits=2] [--codes=1MAD,3INST,HYB]

Unit Gaussian sequences of 256 weights (one 16 x 16 tile each) are scaled by s, quantized
with the tail-biting Viterbi search (L = --L) and the error divided by s^2: the MSE per
weight at each scale of --scales (multiples of the code's value std), beside the
rate-distortion bound 2^(-2K) and E8P12's MSE at its best scale (1.03) on the same numbers.
Search time: seconds per 256-weight tile (both passes), median of 3 timed calls on
--speed_tiles tiles, compile apart.

--proxy_codebooks: also the proxy loss of `quantize_linear` (RHT + BlockLDLQ) on a random
--proxy_shape weight with a synthetic Hessian (correlated Gaussian inputs, seed 0), each
codebook beside the others, with its wall time (compile included).
"""
from __future__ import annotations

import statistics
import time

from absl import flags

import jax
import jax.numpy as jnp
import numpy as np

from quipjax import codebooks
from quipjax.codebooks import trellis
from quipjax.pipeline import cli

FLAGS = flags.FLAGS
flags.DEFINE_integer("samples", 1_000_000, "Gaussian weights for the MSE (rounded up to whole "
                     "256-weight tiles).")
flags.DEFINE_list("bits", ["2"], "Bits per weight K.")
flags.DEFINE_list("codes", ["1MAD", "3INST", "HYB"], "Trellis codes.")
flags.DEFINE_integer("L", 16, "Trellis state bits.")
flags.DEFINE_list("scales", ["0.9", "1.0", "1.1"], "Input scales, as multiples of the std of "
                  "the code's values over all states.")
flags.DEFINE_integer("speed_tiles", 64, "Tiles per timed search call.")
flags.DEFINE_integer("chunk", None, "Sequences per Viterbi batch (default: trellis.default_chunk).")
flags.DEFINE_list("proxy_codebooks", [], "Codebooks for the proxy-loss comparison, e.g. "
                  "E8P12,1MAD2,3INST2,HYB2 (empty: skip it).")
flags.DEFINE_string("proxy_shape", "128x256", "m x n of the proxy-loss weight.")


def proxy_table():
    from quipjax.quantize import proxy, quantize_linear
    m, n = map(int, FLAGS.proxy_shape.split("x"))
    rng = np.random.default_rng(0)
    W = rng.standard_normal((m, n)).astype(np.float32)
    z = rng.standard_normal((2048, n)).astype(np.float32)
    X = z @ (rng.standard_normal((n, n)) * 0.3 + np.eye(n)).astype(np.float32)
    H = X.T @ X / len(X)
    print(f"| codebook | bits | proxy loss ({m}x{n}, synthetic H) | seconds (compile included) |")
    print("|---|---|---|---|")
    for name in FLAGS.proxy_codebooks:
        t0 = time.perf_counter()
        ql = quantize_linear(W, H, codebook=name, key=jax.random.key(0))
        p = float(proxy(W, ql, H, 1e-2))
        cb = codebooks.get(name)
        print(f"| {name} | {cb.bits_per_weight:g} | {p:.5f} | {time.perf_counter() - t0:.1f} |",
              flush=True)


def main(argv):
    del argv
    if FLAGS.proxy_codebooks:
        proxy_table()
    tiles = -(-FLAGS.samples // 256)
    x = np.asarray(jax.random.normal(jax.random.key(0), (tiles, 256)), np.float32)
    e8 = codebooks.get("E8P12")
    e8_mse = float(e8.mse(jnp.asarray(x.reshape(-1, 8)), 1.03))
    print(f"{tiles * 256} Gaussian weights; E8P12 at scale 1.03: MSE {e8_mse:.5f}")
    print("| code | K | V | L | scale (x value std) | MSE | bound 2^-2K | s / tile |")
    print("|---|---|---|---|---|---|---|---|")
    for K in map(int, FLAGS.bits):
        for code in FLAGS.codes:
            tr = trellis.Trellis(code, L=FLAGS.L, K=K, V=2 if code == "HYB" else 1)
            std = float(jnp.std(tr.state_values()))
            xs = jnp.asarray(x[:FLAGS.speed_tiles])
            jax.block_until_ready(trellis.quantize_tail_biting(xs, tr, chunk=FLAGS.chunk))
            ts = []
            for _ in range(3):
                t0 = time.perf_counter()
                jax.block_until_ready(trellis.quantize_tail_biting(xs, tr, chunk=FLAGS.chunk))
                ts.append(time.perf_counter() - t0)
            per_tile = statistics.median(ts) / len(xs)
            for f in map(float, FLAGS.scales):
                s = f * std
                _, xhat = trellis.quantize_tail_biting(jnp.asarray(x * s), tr, chunk=FLAGS.chunk)
                mse = float(np.mean((x * s - np.asarray(xhat)) ** 2)) / s ** 2
                print(f"| {code} | {K} | {tr.V} | {tr.L} | {f:g} ({s:.4f}) | {mse:.5f} | "
                      f"{2.0 ** (-2 * K):.5f} | {per_tile:.4f} |", flush=True)


if __name__ == "__main__":
    cli.run(main)
