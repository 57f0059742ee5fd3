"""Hessian collection throughput as a fraction of the plain FP forward's, on the same windows.

    python experiments/bench_hessian_throughput.py                    # shipped SmolLM2, 8 x 2048
    python experiments/bench_hessian_throughput.py --windows=16 --dtype=float32

Three timed passes over the same wiki windows (the protocol's evaluation text), each after an
untimed warm-up pass (compiles), in one process:
* forward: the model's blocks over every window in memory (`distributed.EvalPrograms`, the
  perplexity path without the head), one window per call;
* layer-major forward: the same blocks one layer at a time through activation files on disk
  (`pipeline.activations.forward_file`), the I/O pattern of collection without the taps;
* Hessians: `pipeline.hessians.collect_hessians` into a temporary directory (taps, the
  accumulator update of every group, the end-of-layer exact reduction, the npz writes).

Prints tokens per second of each and the ratios; the last line is one JSON object.
"""
from __future__ import annotations

import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
from absl import flags

from quipjax.distributed import EvalPrograms, block_forward_fn
from quipjax.models.loaders import load_block, load_model, open_checkpoint
from quipjax.pipeline import cli, data
from quipjax.pipeline.activations import ActFile, acts_path, embed_windows, forward_file
from quipjax.pipeline.hessians import collect_hessians

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "FP model: HF folder or .gguf (default: the shipped SmolLM2).")
flags.DEFINE_integer("windows", 8, "Windows per timed pass.")
flags.DEFINE_integer("ctx_size", 2048, "Tokens per window.")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Weights / matmul input dtype "
                  "(quantize.py's --dtype).")


def forward_in_memory(model, windows) -> float:
    ev = EvalPrograms(model)
    t = time.perf_counter()
    for w in windows:
        jax.block_until_ready(ev.blocks(ev.embed(ev.put(w[None]))))
    return time.perf_counter() - t


def forward_layer_major(src, windows, dtype, work) -> float:
    t = time.perf_counter()
    embed_windows(src, windows, acts_path(work, 0))
    for i in range(src.spec.num_layers):
        fwd = block_forward_fn(load_block(src, i, dtype))
        forward_file(fwd, ActFile(acts_path(work, i)), acts_path(work, i + 1))
        os.remove(acts_path(work, i))
    os.remove(acts_path(work, src.spec.num_layers))
    return time.perf_counter() - t


def hessians(src, windows, dtype, work) -> float:
    t = time.perf_counter()
    collect_hessians(src, windows, work, dtype=dtype)
    return time.perf_counter() - t


def main(argv):
    del argv
    if FLAGS.windows < 1 or FLAGS.ctx_size < 2:
        raise ValueError(f"need --windows >= 1 and --ctx_size >= 2, got {FLAGS.windows} and "
                         f"{FLAGS.ctx_size}")
    src = open_checkpoint(FLAGS.model)
    dtype = jnp.dtype(FLAGS.dtype)
    windows = data.eval_windows(src.tokenizer, "wiki", FLAGS.ctx_size)
    if len(windows) < FLAGS.windows:
        raise ValueError(f"the wiki text has {len(windows)} windows of {FLAGS.ctx_size}, "
                         f"fewer than --windows={FLAGS.windows}")
    windows = windows[:FLAGS.windows]
    tokens = windows.size
    model = load_model(src, dtype)
    out = {"model": src.path, "windows": FLAGS.windows, "ctx": FLAGS.ctx_size,
           "dtype": FLAGS.dtype, "devices": 1, "seconds": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, run in (("forward", lambda w, d: forward_in_memory(model, w)),
                          ("layer_major_forward",
                           lambda w, d: forward_layer_major(src, w, dtype, d)),
                          ("hessians", lambda w, d: hessians(src, w, dtype, d))):
            warm, timed = (os.path.join(tmp, f"{name}_{k}") for k in ("warm", "timed"))
            for d in (warm, timed):
                os.makedirs(d)
            run(windows[:1], warm)                           # compiles
            out["seconds"][name] = run(windows, timed)
            print(f"{name}: {out['seconds'][name]:.1f} s, "
                  f"{tokens / out['seconds'][name]:.0f} tokens/s", flush=True)
    s = out["seconds"]
    out["tokens_per_s"] = {k: tokens / v for k, v in s.items()}
    out["hessians_vs_forward"] = s["forward"] / s["hessians"]
    out["hessians_vs_layer_major_forward"] = s["layer_major_forward"] / s["hessians"]
    print(f"Hessian collection runs at {out['hessians_vs_forward']:.2f}x the in-memory forward's "
          f"throughput and {out['hessians_vs_layer_major_forward']:.2f}x the layer-major "
          "forward's")
    print(json.dumps(out))


if __name__ == "__main__":
    cli.run(main)
