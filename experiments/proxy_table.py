"""Per-layer proxy loss and quantization time of quantized checkpoints, side by side.

    python experiments/proxy_table.py --runs=runs/smollm2_2bit,runs/smollm2_hyb2 \
        [--layers=0,15,29] [--markdown]

Reads what each run recorded per layer (layers/layer_XXX.json: the proxy loss of every fused
group under its real Hessian, and the layer's seconds); prints one row per layer and group
with each run's proxy and, from the second run on, its ratio to the first; then the mean per
group and the total seconds. Runs must be of the same model; missing layers are skipped
(a run still in progress).
"""
from __future__ import annotations

import os

from absl import flags

from quipjax.pipeline import checkpoint as ckpt
from quipjax.pipeline import cli

FLAGS = flags.FLAGS
flags.DEFINE_list("runs", None, "Checkpoint directories; the first is the reference.",
                  required=True)
flags.DEFINE_list("layers", [], "Layer indices (default: every layer all runs have).")


def _codebook(run):
    return ckpt.read_meta(run).get("settings", {}).get("codebook", "?")


def main(argv):
    del argv
    runs = FLAGS.runs
    n = {ckpt.read_meta(r)["model"]["num_layers"] for r in runs}
    if len(n) != 1:
        raise cli.UserError(f"--runs: the runs are of different models (layers {sorted(n)})")
    n = n.pop()
    layers = [int(i) for i in FLAGS.layers] or range(n)
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise cli.UserError(f"--layers: {bad} outside 0..{n - 1}")
    layers = [i for i in layers if all(ckpt.layer_done(r, i) for r in runs)]
    if not layers:
        raise cli.UserError("no layer is done in every run")
    infos = {r: {i: ckpt.layer_info(r, i) for i in layers} for r in runs}
    names = [f"{os.path.basename(os.path.normpath(r))} ({_codebook(r)})" for r in runs]
    print("| layer | group | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(runs))
    sums = {}
    for i in layers:
        for g in sorted(infos[runs[0]][i]["proxy"]):
            vals = [infos[r][i]["proxy"][g] for r in runs]
            cells = [f"{vals[0]:.5f}"] + [f"{v:.5f} ({v / vals[0]:.2f}x)" for v in vals[1:]]
            print(f"| {i} | {g} | " + " | ".join(cells) + " |")
            for r, v in zip(runs, vals):
                sums.setdefault((r, g), []).append(v)
    for g in sorted({g for (_, g) in sums}):
        vals = [sum(sums[(r, g)]) / len(sums[(r, g)]) for r in runs]
        cells = [f"{vals[0]:.5f}"] + [f"{v:.5f} ({v / vals[0]:.2f}x)" for v in vals[1:]]
        print(f"| mean of {len(layers)} | {g} | " + " | ".join(cells) + " |")
    secs = [sum(infos[r][i].get("seconds", 0.0) for i in layers) for r in runs]
    print(f"| seconds, {len(layers)} layers | | " + " | ".join(f"{s:.0f}" for s in secs) + " |")


if __name__ == "__main__":
    cli.run(main)
