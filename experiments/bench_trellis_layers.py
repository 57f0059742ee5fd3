"""Proxy loss and quantization time of codebooks on real layers with their real Hessians.

    python experiments/bench_trellis_layers.py --hessians=$QUIPJAX_CACHE/hessians/<hash> \
        [--model=smollm2-135m] [--layers=0,15,29] [--codebooks=E8P12,HYB2,1MAD2,3INST2] \
        [--out=runs/trellis_layers.tsv]

For every (layer, group, codebook): the group's fused weight W (`quipjax.group.fuse`) and
the input Hessian H of the Hessian directory (the one `experiments/quantize.py` prints:
"reusing the Hessians in ..."; it must be the same model's), quantized by `quantize_linear`
(RHT + BlockLDLQ, --seed's signs, the codebook's default scale) and scored by the proxy
loss tr((What - W) Hr (What - W)^T) / tr(W Hr W^T), Hr = H / mean(diag H) + 1e-2 I, the loss
the pipeline records. Seconds: wall time of `quantize_linear` (compile included, on this
machine's cores).

Rows are appended to --out as they finish (tab-separated); rows already there are skipped,
so a killed run resumes. At the end the table of every row of --out is printed with each
codebook's mean proxy relative to --baseline's.
"""
from __future__ import annotations

import collections
import os
import time

from absl import flags

import jax
import numpy as np

from quipjax import codebooks
from quipjax.group import fuse
from quipjax.models import loaders
from quipjax.models.families import adapter_of
from quipjax.models.loaders import block_param_names
from quipjax.pipeline import cli
from quipjax.pipeline.hessians import load_layer_hessians
from quipjax.quantize import proxy, quantize_linear

FLAGS = flags.FLAGS
flags.DEFINE_string("hessians", None, "Hessian directory of --model (written by "
                    "experiments/quantize.py under $QUIPJAX_CACHE/hessians).")
flags.DEFINE_string("model", "smollm2-135m", "Model: an alias, an HF folder or a .gguf file.")
flags.DEFINE_list("layers", ["0", "15", "29"], "Layers.")
flags.DEFINE_list("groups", [], "Groups (default: every group of the model's adapter).")
flags.DEFINE_list("codebooks", ["E8P12", "HYB2", "1MAD2", "3INST2"], "Codebooks.")
flags.DEFINE_string("baseline", "E8P12", "Codebook the mean proxies are divided by, per bit "
                    "width (E8P12 / E8P12RVQ3B / E8P12RVQ4B for 2 / 3 / 4 bits if present).")
flags.DEFINE_integer("seed", 0, "Seed of the sign vectors (jax.random.key(seed)).")
flags.DEFINE_string("out", "runs/trellis_layers.tsv", "Rows are appended here.")
flags.mark_flag_as_required("hessians")

_BASE = {2: "E8P12", 3: "E8P12RVQ3B", 4: "E8P12RVQ4B"}


def _rows(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [line.rstrip("\n").split("\t") for line in f if line.strip()]


def main(argv):
    del argv
    src = loaders.open_checkpoint(FLAGS.model)
    adapter = adapter_of(src.spec)
    groups = [g for g in adapter.groups if not FLAGS.groups or g.name in FLAGS.groups]
    done = {tuple(r[:3]) for r in _rows(FLAGS.out)}
    os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
    for layer in map(int, FLAGS.layers):
        names = block_param_names(src.spec, layer)
        hs = load_layer_hessians(FLAGS.hessians, layer, groups=tuple(g.name for g in groups))
        for g in groups:
            W, _ = fuse([np.asarray(src.tensor(names[m + ".weight"]), np.float32)
                         for m in g.members])
            if W.shape[1] != hs[g.name].shape[0]:
                raise ValueError(f"--hessians: layer {layer} {g.name} has H of size "
                                 f"{hs[g.name].shape[0]} but the weight has {W.shape[1]} "
                                 "inputs: the Hessians are of another model")
            for name in FLAGS.codebooks:
                if (str(layer), g.name, name) in done:
                    continue
                t0 = time.perf_counter()
                ql = quantize_linear(W, hs[g.name], codebook=name, key=jax.random.key(FLAGS.seed))
                p = float(proxy(W, ql, hs[g.name], 1e-2))
                dt = time.perf_counter() - t0
                row = [str(layer), g.name, name, f"{W.shape[0]}x{W.shape[1]}", f"{p:.6g}",
                       f"{dt:.1f}"]
                with open(FLAGS.out, "a") as f:
                    f.write("\t".join(row) + "\n")
                print("\t".join(row), flush=True)
    report(_rows(FLAGS.out))


def report(rows):
    """Print the rows as a table, then each codebook's mean proxy / its bit width's baseline."""
    print("| layer | group | shape | " + " | ".join(FLAGS.codebooks) + " |")
    print("|---|---|---|" + "---|" * len(FLAGS.codebooks))
    table = collections.defaultdict(dict)
    shapes = {}
    for layer, group, name, shape, p, dt in rows:
        table[(int(layer), group)][name] = (float(p), float(dt))
        shapes[(int(layer), group)] = shape
    for key in sorted(table):
        cells = [f"{table[key][n][0]:.5f} ({table[key][n][1]:.0f} s)" if n in table[key] else "-"
                 for n in FLAGS.codebooks]
        print(f"| {key[0]} | {key[1]} | {shapes[key]} | " + " | ".join(cells) + " |")
    for name in FLAGS.codebooks:
        bits = int(round(codebooks.get(name).bits_per_weight))
        base = FLAGS.baseline if bits == 2 else _BASE.get(bits, FLAGS.baseline)
        both = [k for k in table if name in table[k] and base in table[k]]
        if not both:
            continue
        ratio = np.mean([table[k][name][0] / table[k][base][0] for k in both])
        secs = sum(table[k][name][1] for k in both) / max(sum(table[k][base][1] for k in both), 1e-9)
        print(f"{name}: mean proxy ratio to {base} {ratio:.3f} over {len(both)} groups; "
              f"time {secs:.1f}x")


if __name__ == "__main__":
    cli.run(main)
