"""Quantize a Llama-family model with QuIP# and measure it.

    python experiments/quantize.py --flagfile=experiments/configs/smollm2_135m_2bit.cfg
    python experiments/quantize.py --model=/path/to/Llama-2-7b-hf --flagfile=experiments/configs/llama7b_2bit.cfg

Stages (each reported in metrics.json "seconds"): FP perplexity (cached), calibration windows,
Hessians (cached by model and calibration settings, resumable), layer-by-layer quantization
with optional in-block fine-tuning (--ft_epochs; resumable: a killed run continues at its first
unfinished layer and ends with the same codes), optional end-to-end fine-tuning (--e2e_epochs),
quantized perplexity. Output: an orbax checkpoint, metrics.json, and with fine-tuning
ft_curves.json / ft_curves.png in --output_dir. Every flag is a field of
`quipjax.RunConfig` (`--help` lists them).
"""
from __future__ import annotations

import json

from absl import flags, logging

import quipjax
from quipjax.pipeline import cli

FLAGS = flags.FLAGS
quipjax.RunConfig.define_flags()
flags.DEFINE_integer("cpu_devices", 0, "Simulate this many devices on the CPU (testing --mesh "
                     "without GPUs); 0: the real devices.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    if FLAGS.cpu_devices:
        import jax
        jax.config.update("jax_num_cpu_devices", FLAGS.cpu_devices)
    metrics = quipjax.quantize_model(quipjax.RunConfig.from_flags(FLAGS))
    print(json.dumps({k: metrics[k] for k in ("ppl", "tokens", "bits_per_weight", "seconds")}))


if __name__ == "__main__":
    cli.run(main, positional="model", resumable=True)
