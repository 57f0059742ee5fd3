"""Peak memory of Hessian collection at several calibration set sizes.

    python experiments/bench_hessian_memory.py --devset_sizes=8,32            # shipped SmolLM2
    python experiments/bench_hessian_memory.py --shape=llama2_7b --layers=2 --devset_sizes=2,8

Each size runs in a fresh subprocess (collect_hessians into a temporary directory) and reports
its peak resident memory (ru_maxrss) and time. --shape=llama2_7b builds a random model with
Llama-2-7B's dimensions (hidden 4096, intermediate 11008, 32 heads, vocab 32000) and --layers
blocks as a bf16 safetensors folder: the memory of layer-major collection does not depend on the
number of layers, so two layers show the peak of the full 32-layer run.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from absl import flags
from quipjax.pipeline import cli

FLAGS = flags.FLAGS
flags.DEFINE_list("devset_sizes", ["8", "32"], "Calibration windows per run.")
flags.DEFINE_integer("ctx_size", 2048, "Tokens per window.")
flags.DEFINE_enum("shape", "smollm2", ["smollm2", "llama2_7b"], "Model: the shipped SmolLM2 or "
                  "a random Llama-2-7B-shaped one.")
flags.DEFINE_integer("layers", 2, "Blocks of the random 7B-shaped model.")
flags.DEFINE_string("child", None, "Internal: run one collection (json args).")


def child(args):
    import numpy as np
    from quipjax.models.loaders import open_checkpoint
    from quipjax.pipeline import hessians
    src = open_checkpoint(args["model"])
    windows = np.random.default_rng(0).integers(0, src.spec.vocab_size,
                                                (args["devset"], args["ctx"])).astype(np.int32)
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        hessians.collect_hessians(src, windows, d)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mb": rss_mb, "seconds": time.perf_counter() - t}))


def main(argv):
    del argv
    if FLAGS.child:
        return child(json.loads(FLAGS.child))
    with tempfile.TemporaryDirectory() as tmp:
        model = None
        if FLAGS.shape == "llama2_7b":
            model = os.path.join(tmp, "llama2_7b_shaped")
            from random_model import SHAPES, write_random_folder      # this directory
            write_random_folder(model, SHAPES["llama2_7b"], FLAGS.layers)
        print("| model | windows x ctx | peak RSS (MB) | seconds |")
        print("|---|---|---|---|")
        for n in FLAGS.devset_sizes:
            args = json.dumps({"model": model, "devset": int(n), "ctx": FLAGS.ctx_size})
            out = subprocess.run([sys.executable, __file__, f"--child={args}"], check=True,
                                 capture_output=True, text=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            name = "SmolLM2-135M" if model is None else f"Llama-2-7B-shaped, {FLAGS.layers} layers"
            print(f"| {name} | {n} x {FLAGS.ctx_size} | {r['peak_rss_mb']:.0f} | {r['seconds']:.0f} |",
                  flush=True)


if __name__ == "__main__":
    cli.run(main)
