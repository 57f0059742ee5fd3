"""Where does a quantized model lose perplexity? Quick diagnostics on the first k windows.

    python experiments/diagnose.py --checkpoint=runs/smollm2_135m_4bit --windows=4
    python experiments/diagnose.py --rtn_group_sizes=64,32 --no-by_group      # baselines only

Prints perplexities (first --windows windows of each dataset) of: the FP model; the checkpoint;
the FP model with the checkpoint's weights substituted for one linear group type at a time
(--by_group) and for the first / last three blocks; and round-to-nearest asymmetric 4-bit
quantization with the given group sizes (a baseline that needs no calibration).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from absl import flags, logging

import quipjax
from quipjax import layers
from quipjax.models.adapter import get_path
from quipjax.pipeline import checkpoint as ckpt
from quipjax.pipeline import data
from quipjax.pipeline import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "FP model (default: the shipped SmolLM2).")
flags.DEFINE_string("checkpoint", None, "Quantized checkpoint to diagnose.")
flags.DEFINE_integer("windows", 4, "Windows per dataset.")
flags.DEFINE_list("datasets", ["wiki", "c4"], "Datasets.")
flags.DEFINE_boolean("by_group", True, "Substitute one group type / a few blocks at a time.")
flags.DEFINE_list("rtn_group_sizes", [], "Round-to-nearest 4-bit baselines with these group sizes.")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Forward dtype.")


def rtn(w, g, bits=4):
    m, n = w.shape
    x = w.reshape(m, n // g, g)
    lo, hi = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
    s = (hi - lo) / (2 ** bits - 1)
    s = np.where(s == 0, 1, s)
    return (np.round((x - lo) / s) * s + lo).reshape(m, n)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    dt = jnp.dtype(FLAGS.dtype)
    src = quipjax.open_checkpoint(FLAGS.model)
    sets = {ds: data.eval_windows(src.tokenizer, ds)[:FLAGS.windows] for ds in FLAGS.datasets}

    def report(label, model):
        r = {ds: quipjax.perplexity(model, w)["ppl"] for ds, w in sets.items()}
        print(f"{label:28s} " + "  ".join(f"{ds} {v:.4f}" for ds, v in r.items()), flush=True)

    report("FP", quipjax.load_model(src, dt))
    if FLAGS.checkpoint:
        report("checkpoint", quipjax.build_model(FLAGS.checkpoint, dtype=dt))
        if FLAGS.by_group:
            L = src.spec.num_layers
            groups = [ckpt.load_layer(FLAGS.checkpoint, i)[0] for i in range(L)]
            names_all = [g.name for g in quipjax.LLAMA.groups]
            cases = [([g.name], range(L), f"only {g.name}") for g in quipjax.LLAMA.groups]
            cases += [(names_all, range(0, 3), "blocks 0-2"),
                      (names_all, range(L - 3, L), f"blocks {L - 3}-{L - 1}")]
            for names, which, label in cases:
                model = quipjax.load_model(src, dt)
                for i in which:
                    for k in names:
                        layers.attach_dequantized(model.layers[i], groups[i][k], dt)
                report(label, model)
    for g in FLAGS.rtn_group_sizes:
        model = quipjax.load_model(src, jnp.float32)
        for b in model.layers:
            for p in quipjax.LLAMA.linear_paths():
                lin = get_path(b, p)
                lin.weight[...] = jnp.asarray(rtn(np.asarray(lin.weight[...]), int(g)))
        report(f"RTN 4-bit, groups of {g}", model)


if __name__ == "__main__":
    cli.run(main)
