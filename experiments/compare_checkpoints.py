"""Are two quantized checkpoints identical, code for code?

    python experiments/compare_checkpoints.py --a=runs/x --b=runs/y

Compares every layer's codes, SU, SV and fused-group scales bit for bit, its norms, the global
parameters (embeddings, final norm, head) and the end-to-end overrides when either checkpoint
has them; prints one line per difference and a summary; exits 1 if anything differs.
"""
from __future__ import annotations

import sys

import numpy as np
from absl import flags, logging

from quipjax.pipeline import checkpoint as ckpt
from quipjax.pipeline import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("a", None, "First checkpoint directory.", required=True)
flags.DEFINE_string("b", None, "Second checkpoint directory.", required=True)


def compare(a: str, b: str, layers=None, globals_: bool = True) -> tuple:
    """(arrays compared, [what differs]) of checkpoints a and b: every layer of `layers`
    (default all; both must have them), the globals and the e2e overrides (with globals_)."""
    ma, mb = ckpt.read_meta(a), ckpt.read_meta(b)
    na_, nb_ = ma["model"]["num_layers"], mb["model"]["num_layers"]
    if (layers is None and na_ != nb_) or max(layers or [0], default=0) >= min(na_, nb_):
        return 0, [f"different models ({na_} and {nb_} layers)"]
    layers = range(na_) if layers is None else layers
    diffs, arrays = [], 0
    for i in layers:
        ga, na, _ = ckpt.load_layer(a, i)
        gb, nb, _ = ckpt.load_layer(b, i)
        for name in sorted(set(ga) | set(gb)):
            if name not in ga or name not in gb:
                arrays += 1
                diffs.append(f"layer {i} {name} is in one checkpoint only")
                continue
            for field in ("codes", "SU", "SV"):
                x, y = np.asarray(getattr(ga[name].ql, field)), np.asarray(getattr(gb[name].ql, field))
                arrays += 1
                if x.shape != y.shape or not np.array_equal(x, y):
                    diffs.append(f"layer {i} {name}.{field} differs")
            arrays += 1
            if not np.array_equal(np.asarray(ga[name].scales), np.asarray(gb[name].scales)):
                diffs.append(f"layer {i} {name}.scales differs")
        for k in sorted(set(na) | set(nb)):
            arrays += 1
            if k not in na or k not in nb or not np.array_equal(np.asarray(na[k]), np.asarray(nb[k])):
                diffs.append(f"layer {i} {k} differs")
    if not globals_:
        return arrays, diffs
    extra = [("globals", ckpt.load_globals(a), ckpt.load_globals(b))]
    ea, eb = ckpt.load_e2e(a), ckpt.load_e2e(b)
    if (ea is None) != (eb is None):
        diffs.append("only one checkpoint has an end-to-end stage")
    elif ea is not None:
        flat = [lambda e: {f"e2e globals {k}": v for k, v in e[1].items()}]
        flat.append(lambda e: {f"e2e layer {i} {g}.{f}": v for i, l in enumerate(e[0])
                               for g, (su, sv) in l["groups"].items()
                               for f, v in (("SU", su), ("SV", sv))})
        flat.append(lambda e: {f"e2e layer {i} {k}": v for i, l in enumerate(e[0])
                               for k, v in l["norms"].items()})
        extra += [("", f(ea), f(eb)) for f in flat]
    for what, da, db in extra:
        for k in sorted(set(da) | set(db)):
            arrays += 1
            if k not in da or k not in db or not np.array_equal(np.asarray(da[k]), np.asarray(db[k])):
                diffs.append(f"{what} {k} differs".strip())
    return arrays, diffs


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    arrays, diffs = compare(FLAGS.a, FLAGS.b)
    for d in diffs:
        print(d)
    n = ckpt.read_meta(FLAGS.a)["model"]["num_layers"]
    print(f"{arrays - len(diffs)} of {arrays} arrays identical over {n} layers")
    sys.exit(1 if diffs else 0)


if __name__ == "__main__":
    cli.run(main)
