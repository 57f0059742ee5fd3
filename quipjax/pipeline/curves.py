"""Training curves of the fine-tuning stages: ft_curves.json (numbers) and ft_curves.png."""
from __future__ import annotations

import json
import os

from quipjax.pipeline import checkpoint as ckpt

__all__ = ["collect_curves", "write_curves"]


def collect_curves(ckpt_dir: str, num_layers: int) -> dict:
    """{"in_block": {layer: {group: curve}}, "e2e": curve or None}; a curve is a list of
    {"epoch", "train", "valid", "best", "seconds"} (epoch 0: before tuning)."""
    inblock = {}
    for i in range(num_layers):
        if ckpt.layer_done(ckpt_dir, i):
            c = ckpt.layer_info(ckpt_dir, i).get("curves")
            if c:
                inblock[str(i)] = c
    info = ckpt.e2e_info(ckpt_dir)
    return {"in_block": inblock, "e2e": None if info is None else info.get("curve")}


def write_curves(ckpt_dir: str, num_layers: int) -> dict:
    """Write ft_curves.json and ft_curves.png into ckpt_dir; returns the curves."""
    curves = collect_curves(ckpt_dir, num_layers)
    with open(os.path.join(ckpt_dir, "ft_curves.json"), "w") as f:
        json.dump(curves, f, indent=1)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    colors = {"qkv": "tab:blue", "o": "tab:orange", "up": "tab:green"}
    ax = axes[0]
    for layer, groups in curves["in_block"].items():
        for g, c in groups.items():
            v0 = c[0]["valid"]
            ax.plot([e["epoch"] for e in c], [e["valid"] / v0 for e in c], color=colors.get(g, "k"),
                    alpha=0.4, lw=1, label=g if layer == next(iter(curves["in_block"])) else None)
    ax.set(title="in-block: validation MSE / MSE before tuning", xlabel="epoch")
    if curves["in_block"]:
        ax.legend()
    ax = axes[1]
    layers = sorted(curves["in_block"], key=int)
    for g in colors:
        pts = [(int(l), min(e["valid"] for e in curves["in_block"][l][g]) / curves["in_block"][l][g][0]["valid"])
               for l in layers if g in curves["in_block"][l]]
        if pts:
            ax.plot(*zip(*pts), "o-", color=colors[g], label=g, ms=3)
    ax.set(title="in-block: best / initial validation MSE per layer", xlabel="layer")
    if layers:
        ax.legend()
    ax = axes[2]
    if curves["e2e"]:
        c = curves["e2e"]
        ax.plot([e["epoch"] for e in c], [e["valid"] for e in c], "o-", label="validation KL")
        tr = [(e["epoch"], e["train"]) for e in c if e["train"] is not None]
        if tr:
            ax.plot(*zip(*tr), "s--", label="train KL (mean over epoch)")
        ax.legend()
    ax.set(title="end to end: KL to the FP model", xlabel="epoch")
    fig.tight_layout()
    fig.savefig(os.path.join(ckpt_dir, "ft_curves.png"), dpi=90)
    plt.close(fig)
    return curves
