"""Peak memory of the end-to-end fine-tuning stage, on a copy of a quantized checkpoint.

    python experiments/bench_ft_memory.py --checkpoint=runs/smollm2_135m_2bit_ft
    python experiments/bench_ft_memory.py --checkpoint=... --bs=4 --ctx=512 --train=8 --valid=4

Runs `pipeline.tuning.finetune_e2e` (the stage quantize.py runs) for --epochs epochs on --train +
--valid random calibration-free windows (token ids drawn from the vocabulary: memory does not
depend on the text) in a fresh process, on a temporary copy of the checkpoint (the original is
not touched), and prints its peak resident memory (`PeakRSS`) and seconds as one JSON line.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import numpy as np
from absl import flags

from quipjax.pipeline import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "A quantized checkpoint (quantize.py's --output_dir).",
                    required=True)
flags.DEFINE_string("model", None, "The FP source the checkpoint was made from (default: the "
                    "shipped SmolLM2).")
flags.DEFINE_integer("bs", 4, "Batch size (windows).")
flags.DEFINE_integer("ctx", 512, "Tokens per window.")
flags.DEFINE_integer("train", 8, "Training windows (one epoch).")
flags.DEFINE_integer("valid", 4, "Validation windows.")
flags.DEFINE_integer("epochs", 1, "Epochs (the heap may grow over them).")
flags.DEFINE_string("tune_dtype", "bfloat16", "Matmul input dtype while tuning.")


def main(argv):
    del argv
    from quipjax.models.loaders import open_checkpoint
    from quipjax.pipeline import checkpoint as ckpt
    from quipjax.pipeline.peak_memory import PeakRSS
    from quipjax.pipeline.settings import E2ESettings
    from quipjax.pipeline.tuning import finetune_e2e
    ckpt.read_meta(FLAGS.checkpoint)                   # a clear error for a wrong directory
    src = open_checkpoint(FLAGS.model)
    rng = np.random.default_rng(0)
    windows = rng.integers(0, src.spec.vocab_size, (FLAGS.train + FLAGS.valid, FLAGS.ctx),
                           dtype=np.int64).astype(np.int32)
    e2e = E2ESettings(epochs=FLAGS.epochs, bs=FLAGS.bs, update_freq=1, train_size=FLAGS.train,
                      valid_size=FLAGS.valid, ctx_size=FLAGS.ctx, early_stop=1)
    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, "ckpt")
        shutil.copytree(FLAGS.checkpoint, copy, ignore=shutil.ignore_patterns(
            "ft_acts*", "e2e", "e2e.json", ".quipjax.lock"))
        t = time.perf_counter()
        with PeakRSS() as peak:
            finetune_e2e(copy, src, e2e, FLAGS.tune_dtype, windows)
        print(json.dumps({"peak_rss_gb": round(peak.gb, 3), "seconds": time.perf_counter() - t,
                          "bs": FLAGS.bs, "ctx": FLAGS.ctx, "vocab": src.spec.vocab_size}))


if __name__ == "__main__":
    cli.run(main)
