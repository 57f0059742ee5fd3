"""Time quantize_linear on synthetic layers and print proxy losses (and ratios to a baseline).

    python experiments/bench_quantize.py                       # 1024x1024, 4096x4096, 4096x11008
    python experiments/bench_quantize.py --shapes=1024x1024 --codebooks=E8P12 --repeats=3

Inputs: W ~ N(0, 1) (m, n) and H = A^T A with A = G / sqrt(n) + I (the second moment of
correlated Gaussian inputs x = z A), generated with fixed seeds, or read from --data_dir
(W_{m}x{n}.npy, H_{n}.npy) so that another implementation can be fed the very same inputs.

Timing: the first call of each configuration includes XLA compilation; "compile_s" is the first
call minus the median of the next --repeats calls ("run_s"). --baseline_cmd runs another
implementation on the same inputs in the same run (for ratios measured under the same machine
load): it is formatted with {w} {h} {codebook} {scale} {tune_iters} {seed} {out} and must write an
.npz with `seconds` and `proxy`. --proxy_seeds=k compares proxy losses over k sign seeds.
"""
from __future__ import annotations

import os
import shlex
import statistics
import subprocess
import tempfile
import time

from absl import flags

import jax
import jax.numpy as jnp
import numpy as np

from quipjax import codebooks, hessian, ldlq
from quipjax.quantize import quantize_linear
from quipjax.pipeline import cli

FLAGS = flags.FLAGS
flags.DEFINE_list("shapes", ["1024x1024", "4096x4096", "4096x11008"], "Layer shapes m x n (out x in).")
flags.DEFINE_list("codebooks", ["E8P12", "E8P12RVQ3B", "E8P12RVQ4B"], "Codebooks to time.")
flags.DEFINE_integer("tune_iters", 0, "BlockLDLQ tune passes.")
flags.DEFINE_float("scale", None, "rho (default: each codebook's default_scale).")
flags.DEFINE_integer("repeats", 1, "Timed calls after the compiling one (median reported).")
flags.DEFINE_integer("seed", 0, "Sign-vector seed.")
flags.DEFINE_string("data_dir", None, "Read W_{m}x{n}.npy and H_{n}.npy from here.")
flags.DEFINE_string("baseline_cmd", None, "Command timing another implementation (see module doc).")
flags.DEFINE_string("baseline_codebooks", "E8P12", "Codebooks for which to run the baseline.")
flags.DEFINE_string("baseline_shapes", None, "Shapes for the baseline (default: all).")
flags.DEFINE_integer("proxy_seeds", 0, "If > 0: instead of timing, report the mean and std of the "
                     "proxy loss over this many sign seeds (0..k-1), ours and the baseline's.")


def make_inputs(m, n):
    if FLAGS.data_dir:
        W = np.load(os.path.join(FLAGS.data_dir, f"W_{m}x{n}.npy"))
        H = np.load(os.path.join(FLAGS.data_dir, f"H_{n}.npy"))
        return W.astype(np.float32), H.astype(np.float32)
    kw, ka = jax.random.split(jax.random.key(1000 + m + n))
    W = jax.random.normal(kw, (m, n), jnp.float32)
    A = jax.random.normal(ka, (n, n), jnp.float32) / np.sqrt(n) + jnp.eye(n)
    H = jnp.dot(A.T, A, precision="highest")
    return np.asarray(W), np.asarray(H)


def time_ours(W, H, name):
    def run():
        t = time.perf_counter()
        ql = quantize_linear(W, H, codebook=name, scale=FLAGS.scale, tune_iters=FLAGS.tune_iters,
                             key=jax.random.key(FLAGS.seed))
        jax.block_until_ready(ql.codes)
        return ql, time.perf_counter() - t

    ql, first = run()
    times = [run()[1] for _ in range(FLAGS.repeats)]
    run_s = statistics.median(times) if times else first
    proxy = float(ldlq.proxy_loss(jnp.asarray(W), ql.dequantize(), hessian.regularize(H)))
    return first - run_s if times else float("nan"), run_s, proxy


def proxy_ours(W, H, name, seed):
    ql = quantize_linear(W, H, codebook=name, scale=FLAGS.scale, tune_iters=FLAGS.tune_iters,
                         key=jax.random.key(seed))
    return float(ldlq.proxy_loss(jnp.asarray(W), ql.dequantize(), hessian.regularize(H)))


def time_baseline(W, H, name, seed=None):
    with tempfile.TemporaryDirectory() as d:
        wp, hp, out = (os.path.join(d, f) for f in ("W.npy", "H.npy", "out.npz"))
        np.save(wp, W)
        np.save(hp, H)
        scale = FLAGS.scale if FLAGS.scale is not None else codebooks.get(name).default_scale
        cmd = FLAGS.baseline_cmd.format(w=wp, h=hp, codebook=name, scale=scale,
                                        tune_iters=FLAGS.tune_iters, out=out,
                                        seed=FLAGS.seed if seed is None else seed)
        subprocess.run(shlex.split(cmd), check=True, stdout=subprocess.DEVNULL)
        r = np.load(out)
        return float(r["seconds"]), float(r["proxy"])


def main(argv):
    del argv
    print(f"jax {jax.__version__}, devices {jax.devices()}, cpu count {os.cpu_count()}")
    base_cbs = set(FLAGS.baseline_codebooks.split(","))
    base_shapes = set(FLAGS.baseline_shapes.split(",")) if FLAGS.baseline_shapes else None
    if FLAGS.proxy_seeds:
        return seed_table(base_cbs, base_shapes)
    header = "| shape | codebook | compile_s | run_s | proxy |"
    if FLAGS.baseline_cmd:
        header += " baseline_s | baseline_proxy | speedup |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for shape in FLAGS.shapes:
        m, n = (int(v) for v in shape.split("x"))
        W, H = make_inputs(m, n)
        for name in FLAGS.codebooks:
            comp, run_s, proxy = time_ours(W, H, name)
            row = f"| {m}x{n} | {name} | {comp:.1f} | {run_s:.2f} | {proxy:.6f} |"
            if FLAGS.baseline_cmd and name in base_cbs and (base_shapes is None or shape in base_shapes):
                bs, bp = time_baseline(W, H, name)
                row += f" {bs:.2f} | {bp:.6f} | {bs / run_s:.1f}x |"
            print(row, flush=True)


def seed_table(base_cbs, base_shapes):
    seeds = range(FLAGS.proxy_seeds)
    print(f"| shape | codebook | proxy over seeds 0..{FLAGS.proxy_seeds - 1} (mean +- std) | baseline |")
    print("|---|---|---|---|")
    for shape in FLAGS.shapes:
        m, n = (int(v) for v in shape.split("x"))
        W, H = make_inputs(m, n)
        for name in FLAGS.codebooks:
            ours = [proxy_ours(W, H, name, s) for s in seeds]
            row = f"| {m}x{n} | {name} | {np.mean(ours):.6f} +- {np.std(ours):.6f} |"
            if FLAGS.baseline_cmd and name in base_cbs and (base_shapes is None or shape in base_shapes):
                base = [time_baseline(W, H, name, s)[1] for s in seeds]
                row += f" {np.mean(base):.6f} +- {np.std(base):.6f} |"
            print(row, flush=True)


if __name__ == "__main__":
    cli.run(main)
