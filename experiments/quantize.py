"""Quantize a Llama-family model with QuIP# and measure it.

    python experiments/quantize.py --flagfile=experiments/configs/smollm2_135m_2bit.cfg
    python experiments/quantize.py --model=/path/to/Llama-2-7b-hf --flagfile=experiments/configs/llama7b_2bit.cfg
    python experiments/quantize.py ... --distributed     # on every host (SLURM: srun); README

Stages (each reported in metrics.json "seconds"): FP perplexity (cached), calibration windows,
Hessians (cached by model and calibration settings, resumable), layer-by-layer quantization
with optional in-block fine-tuning (--ft_epochs; resumable: a killed run continues at its first
unfinished layer and ends with the same codes), optional end-to-end fine-tuning (--e2e_epochs),
quantized perplexity. Output: an orbax checkpoint, metrics.json, and with fine-tuning
ft_curves.json / ft_curves.png in --output_dir. Every flag is a field of
`quipjax.RunConfig` (`--help` lists them).
"""
from __future__ import annotations

import dataclasses
import json

from absl import flags, logging

import quipjax
from quipjax.distributed import processes
from quipjax.pipeline import cli

FLAGS = flags.FLAGS
quipjax.RunConfig.define_flags()
cli.define_process_flags()


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    cli.start_processes()
    cfg = quipjax.RunConfig.from_flags(FLAGS)
    cfg = dataclasses.replace(cfg, mesh=cli.default_mesh(cfg.mesh))
    metrics = quipjax.quantize_model(cfg)
    if processes.is_writer():
        print(json.dumps({k: metrics[k] for k in ("ppl", "tokens", "bits_per_weight", "seconds")}))


if __name__ == "__main__":
    cli.run(main, positional="model", resumable=True)
