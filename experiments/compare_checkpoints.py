"""Are two quantized checkpoints identical, code for code?

    python experiments/compare_checkpoints.py --a=runs/x --b=runs/y

Compares every layer's codes, SU, SV and fused-group scales bit for bit, and the norms;
prints one line per difference and a summary; exits 1 if anything differs.
"""
from __future__ import annotations

import os
import sys

import numpy as np
from absl import app, flags, logging

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from quipjax.pipeline import checkpoint as ckpt  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("a", None, "First checkpoint directory.", required=True)
flags.DEFINE_string("b", None, "Second checkpoint directory.", required=True)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    ma, mb = ckpt.read_meta(FLAGS.a), ckpt.read_meta(FLAGS.b)
    n = ma["model"]["num_layers"]
    if mb["model"]["num_layers"] != n:
        print("different models")
        sys.exit(1)
    diffs, arrays = 0, 0
    for i in range(n):
        ga, na, _ = ckpt.load_layer(FLAGS.a, i)
        gb, nb, _ = ckpt.load_layer(FLAGS.b, i)
        for name in sorted(set(ga) | set(gb)):
            for field in ("codes", "SU", "SV"):
                x, y = np.asarray(getattr(ga[name].ql, field)), np.asarray(getattr(gb[name].ql, field))
                arrays += 1
                if x.shape != y.shape or not np.array_equal(x, y):
                    diffs += 1
                    print(f"layer {i} {name}.{field} differs")
            arrays += 1
            if not np.array_equal(np.asarray(ga[name].scales), np.asarray(gb[name].scales)):
                diffs += 1
                print(f"layer {i} {name}.scales differs")
        for k in na:
            arrays += 1
            if not np.array_equal(np.asarray(na[k]), np.asarray(nb[k])):
                diffs += 1
                print(f"layer {i} {k} differs")
    print(f"{arrays - diffs} of {arrays} arrays identical over {n} layers")
    sys.exit(1 if diffs else 0)


if __name__ == "__main__":
    app.run(main)
