"""In-block fine-tuning learning rates probed on one layer: held-out block MSE per setting.

    python experiments/probe_ft_lr.py --flagfile=experiments/configs/smollm2_135m_4bit_ft.cfg \
        --codebook=1MAD4 \
        --probe_layer=5 --probe_lrs=0,5e-4/5e-3,1e-4/1e-3,5e-5/5e-4 \
        --output_dir=/tmp/probe_1mad4 [--probe_heldout=16] [--json_out=...]

The run's settings (codebook, --ft_* windows, batch, epochs; the learning rates are replaced)
and its cached Hessians (collected first if missing). For each setting "lr/susv_lr" ("0":
no tuning), layer `--probe_layer` is quantized group by group with in-block tuning in
between exactly as `quantize.py` does (`pipeline.tuning.BlockTuner`, the run's train and
validation windows), and the finished block (every group quantized, tuned su/sv) is compared
with the FP block on `--probe_heldout` other windows (drawn with another seed from the same
calibration text: windows may share tokens with the training ones, not starts): the mean
squared error of its outputs. Prints one line per setting and a JSON summary; each setting
works in its own subfolder of --output_dir (the layer's checkpoint, the activations).

Why: the learning rates that lower the block MSE at 2 bits (probed on layer 5 for issue 4)
kept the untuned state in 9 of 14 stages of a 4-bit run (BUILD_NOTES.md).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np
from absl import flags, logging

import quipjax
from quipjax import training
from quipjax.pipeline import cli
from quipjax.pipeline.data import calibration_windows
from quipjax.pipeline.quantization import quantize_layers
from quipjax.pipeline.run import hessian_stage, open_job
from quipjax.pipeline.tuning import ActivationWindows, BlockTuner

FLAGS = flags.FLAGS
quipjax.RunConfig.define_flags()
flags.DEFINE_integer("probe_layer", 5, "The layer to quantize and tune.")
flags.DEFINE_list("probe_lrs", ["0", "5e-4/5e-3", "1e-4/1e-3", "5e-5/5e-4"],
                  "Settings to compare: 'lr/susv_lr' (in-block Adam rates of the other weights "
                  "and of su/sv), or '0' for no tuning.")
flags.DEFINE_integer("probe_heldout", 16, "Held-out windows (of --ft_ctx_size tokens).")
flags.DEFINE_integer("probe_heldout_seed", 1000, "Seed of the held-out windows' starts (the "
                     "run's windows use --seed).")
flags.DEFINE_string("json_out", "", "Also write the summary here.")


def parse_setting(s: str):
    """'lr/susv_lr' -> (lr, susv_lr); '0' -> None (no tuning)."""
    if s.strip() == "0":
        return None
    try:
        lr, susv = (float(v) for v in s.split("/"))
    except ValueError:
        raise ValueError(f"--probe_lrs: {s!r} is not 'lr/susv_lr' (e.g. 5e-4/5e-3) "
                         "or '0'") from None
    return lr, susv


class _HeldOut(BlockTuner):
    """BlockTuner that measures the finished block (all groups quantized and tuned) on the
    held-out batches before handing its groups back."""

    def __init__(self, *a, heldout, **k):
        super().__init__(*a, **k)
        self.heldout, self.mse = heldout, None

    def end(self, i, groups):
        self.mse = float(np.mean([float(training.block_mse(self.block, b))
                                  for b in self.heldout()]))
        return super().end(i, groups)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    cfg = quipjax.RunConfig.from_flags(FLAGS)
    if cfg.ft.epochs <= 0:
        raise ValueError("--ft_epochs must be > 0 (the tuning to probe): pass a flagfile with "
                         "fine-tuning, e.g. experiments/configs/smollm2_135m_4bit_ft.cfg")
    settings = [parse_setting(s) for s in FLAGS.probe_lrs]
    job = open_job(cfg)
    try:
        i = FLAGS.probe_layer
        if not 0 <= i < job.src.spec.num_layers:
            raise ValueError(f"--probe_layer={i}: the model has {job.src.spec.num_layers} layers")
        hdir = hessian_stage(job)
        out = cfg.output_dir
        acts = ActivationWindows(job.src, os.path.join(out, "acts_ft"), cfg.ft, cfg.tune_dtype,
                                 job.calibration.windows("ft"), seed=cfg.settings.seed)
        held_ft = dataclasses.replace(cfg.ft, train_size=0, valid_size=FLAGS.probe_heldout)
        held_windows = calibration_windows(job.src.tokenizer, FLAGS.probe_heldout,
                                           cfg.ft.ctx_size, FLAGS.probe_heldout_seed)
        held = ActivationWindows(job.src, os.path.join(out, "acts_heldout"), held_ft,
                                 cfg.tune_dtype, held_windows, seed=cfg.settings.seed)
        heldout = held(i)[2]
        rows = []
        for s, text in zip(settings, FLAGS.probe_lrs):
            ft = (dataclasses.replace(cfg.ft, epochs=0) if s is None else
                  dataclasses.replace(cfg.ft, lr=s[0], susv_lr=s[1]))
            lines = []
            # (a plain callable: the ActivationWindows' own `saved` would drop the inputs that
            # the next setting reuses)
            hook = _HeldOut(ft, cfg.tune_dtype, lambda j: acts(j), seed=cfg.settings.seed,
                            adapter=job.adapter, log=lines.append, heldout=heldout)
            t0 = time.perf_counter()
            sdir = os.path.join(out, "setting_" + text.replace("/", "_"))
            curves = {}
            quantize_layers(sdir, hdir, cfg.settings, hook, [i], adapter=job.adapter, kw=job.kw,
                            progress=lambda _, info: curves.update(info["curves"]))
            if hook.mse is None:
                raise ValueError(f"{sdir} already holds layer {i}: remove it to probe again")
            row = {"setting": text, "lr": s and s[0], "susv_lr": s and s[1],
                   "heldout_block_mse": hook.mse, "seconds": time.perf_counter() - t0,
                   "stages": lines, "curves": curves}
            rows.append(row)
            print(f"{text:>12}: held-out block MSE {hook.mse:.6g} ({row['seconds']:.0f} s)"
                  + "".join(f"\n    {ln}" for ln in lines), flush=True)
        summary = {"layer": i, "codebook": cfg.settings.codebook, "rows": rows}
        if FLAGS.json_out:
            with open(FLAGS.json_out, "w") as f:
                json.dump(summary, f, indent=1)
        print(json.dumps({r["setting"]: r["heldout_block_mse"] for r in rows}))
    finally:
        job.lock.release()


if __name__ == "__main__":
    cli.run(main)
