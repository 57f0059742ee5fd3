"""Perplexity of an FP model or a quantized checkpoint, by the protocol of REAL_DATA.md.

    python experiments/eval_ppl.py --dataset=wiki                      # the shipped SmolLM2, FP
    python experiments/eval_ppl.py --checkpoint=runs/smollm2_135m_2bit --dataset=c4
    python experiments/eval_ppl.py --model=/path/to/hf_folder --text_file=my.txt
    python experiments/eval_ppl.py --checkpoint=runs/llama2_70b_2bit --mesh=data:2,model:4

The last line of standard output is one JSON object {"ppl": .., "tokens": ..}.
"""
from __future__ import annotations

import json
import os

import jax.numpy as jnp
from absl import flags, logging

import quipjax
from quipjax.pipeline import data
from quipjax.pipeline.checkpoint import read_meta
from quipjax.pipeline.run import perplexity_bar, tokenizer_from_ref
from quipjax.distributed import processes
from quipjax.pipeline import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "FP model: HF folder or .gguf (default: the shipped SmolLM2). "
                    "With --checkpoint: where to read the tokenizer if its recorded path is gone.")
flags.DEFINE_string("checkpoint", None, "A quantized checkpoint (the --output_dir of quantize.py).")
flags.DEFINE_enum("dataset", "wiki", ["wiki", "c4"], "Evaluation set (ignored with --text_file).")
flags.DEFINE_string("text_file", None, "Evaluate on this text instead.")
flags.DEFINE_integer("ctx_size", 2048, "Tokens per window.")
flags.DEFINE_integer("max_windows", 24, "Use at most this many windows (protocol: 24).")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Weights/matmul input dtype.")
flags.DEFINE_string("mesh", None, "Devices: 'data:8' (windows split over 8 devices) or "
                    "'data:2,model:4' (weights also sharded over 4: a model larger than one "
                    "device); same perplexity as one device. Default: one device (with "
                    "--distributed: data:<all devices>).")
cli.define_process_flags()


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    cli.start_processes()
    if FLAGS.ctx_size < 2 or FLAGS.max_windows < 1:
        raise ValueError(f"need --ctx_size >= 2 and --max_windows >= 1, got {FLAGS.ctx_size} "
                         f"and {FLAGS.max_windows}")
    placement = quipjax.Placement(quipjax.parse_mesh(cli.default_mesh(FLAGS.mesh)))
    dtype = jnp.dtype(FLAGS.dtype)
    if FLAGS.checkpoint:
        meta = read_meta(FLAGS.checkpoint)
        tok = (quipjax.open_checkpoint(FLAGS.model).tokenizer if FLAGS.model
               else tokenizer_from_ref(meta["tokenizer"]))
        model, stream = quipjax.build_model_streamed(FLAGS.checkpoint, dtype=dtype,
                                                     placement=placement, meta=meta)
    else:
        src = quipjax.open_checkpoint(FLAGS.model)
        tok = src.tokenizer
        model, stream = quipjax.load_model_streamed(src, dtype, placement=placement)
    if FLAGS.text_file:
        windows = data.text_windows(tok, data.read_text(FLAGS.text_file), FLAGS.ctx_size,
                                    FLAGS.max_windows, FLAGS.text_file)
        name = os.path.basename(FLAGS.text_file)
    else:
        windows = data.eval_windows(tok, FLAGS.dataset, FLAGS.ctx_size)[:FLAGS.max_windows]
        name = FLAGS.dataset
    r = perplexity_bar(model, windows, f"ppl {name}", placement, stream)   # block by block
    if not processes.is_writer():
        return
    print(f"{name}: perplexity {r['ppl']:.4f} over {r['tokens']} predicted tokens "
          f"({len(windows)} windows of {FLAGS.ctx_size}), {r['seconds']:.1f} s, "
          f"{placement.describe()}")
    print(json.dumps({"ppl": r["ppl"], "tokens": r["tokens"]}))


if __name__ == "__main__":
    cli.run(main, positional="model")
