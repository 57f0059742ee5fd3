"""The whole pipeline rehearsed on a random model with a real model's shapes, killed and resumed.

    python experiments/rehearse.py --shape=llama2_7b     # hours on 2 cores; ~40 GB of disk
    python experiments/rehearse.py --shape=tiny --work=/tmp/rehearsal     # the same, in a minute

1. Under --work, a random bf16 safetensors folder with the shape's dimensions (Llama-2-7B: 32
   layers, hidden 4096, intermediate 11008, 32 heads, vocab 32000; 13.5 GB), one file per layer,
   and a byte-level BPE tokenizer of at most the shape's vocabulary trained on the shipped wiki
   calibration split; a second folder whose config stops after --ref_layers layers (links to the
   same files). Both are kept for the next rehearsal (rebuilt when incomplete).
2. `experiments/quantize.py` on the big folder: Hessians of --devset_size windows of the shape's
   context, quantization of every linear, FP and quantized perplexity of one window of the wiki
   test text (`--text_file`). With --kill (default) the run is killed with SIGKILL twice: once in
   the Hessian stage, once its first layer's Hessians are on disk, and once in quantization,
   once its first layer is saved; each time the same command resumes it, and the last one ends it.
3. The same command, uninterrupted, on the short folder. A layer depends only on the layers
   before it, so its Hessians and codes must be the rehearsal's first layers' bits.
4. A table of every stage of every invocation (`stages.jsonl`: seconds, peak RSS) beside the
   estimate of `experiments/plan.py` for this machine's run, and the comparison; the summary
   also goes to --work/rehearsal.json. Exits 1 if an array differs, a kill missed, or a stage
   peaked above --max_rss_gb.

The point: nothing in the pipeline holds the whole model in memory (13.5 GB for 7B in bf16).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
from absl import flags

from quipjax.pipeline import cli
from random_model import SHAPES, write_config, write_random_folder, write_tokenizer

FLAGS = flags.FLAGS
flags.DEFINE_enum("shape", "llama2_7b", list(SHAPES), "The dimensions of the random model.")
flags.DEFINE_string("work", os.path.join(os.path.expanduser("~"), ".cache", "quipjax",
                                         "rehearsal"), "Where the folders, the Hessians, the "
                    "checkpoints, the logs and rehearsal.json go.")
flags.DEFINE_integer("devset_size", 2, "Calibration windows (of the shape's context).")
flags.DEFINE_string("codebook", "E8P12", "Codebook of the run.")
flags.DEFINE_integer("ref_layers", 2, "Layers of the uninterrupted reference run.")
flags.DEFINE_boolean("kill", True, "Kill the run in the Hessian stage and in quantization.")
flags.DEFINE_float("max_rss_gb", 16.0, "A stage whose peak RSS exceeds this fails the rehearsal.")
flags.DEFINE_boolean("fresh", False, "Remove the run's checkpoints and Hessians first (the "
                     "folders are kept).")

HERE = os.path.dirname(os.path.abspath(__file__))
GB = 2 ** 30


# ------------------------------------------------------------------------------- the folders

def make_folders(work: str, name: str, shape: dict, ref_layers: int) -> tuple:
    """(big folder, short folder): built once (a marker file written last says complete)."""
    big, short = os.path.join(work, name), os.path.join(work, f"{name}_{ref_layers}layers")
    marker = os.path.join(big, "rehearsal.json")
    want = dict(shape, seed=0)
    if not (os.path.exists(marker) and json.load(open(marker)) == want):
        t = time.perf_counter()
        print(f"writing the random {name} folder to {big} ...", flush=True)
        os.makedirs(big, exist_ok=True)
        write_tokenizer(big, shape["vocab"])
        write_random_folder(big, shape)
        with open(marker, "w") as f:
            json.dump(want, f)
        print(f"  {time.perf_counter() - t:.0f} s", flush=True)
    os.makedirs(short, exist_ok=True)
    names = ["model-globals.safetensors", "tokenizer.json", "tokenizer_config.json"] + [
        f"model-layer{i}.safetensors" for i in range(ref_layers)]
    for n in names:
        dst = os.path.join(short, n)
        if os.path.lexists(dst):
            os.remove(dst)
        os.symlink(os.path.join(big, n), dst)
    write_config(short, shape, ref_layers)
    return big, short


def one_window_text(folder: str, ctx: int, path: str) -> str:
    """A prefix of the wiki test text of 1.5 windows of tokens (one evaluation window)."""
    from quipjax.models.loaders import open_checkpoint
    from quipjax.pipeline import data
    tok = open_checkpoint(folder).tokenizer
    ids = tok.encode(data.eval_text("wiki"))
    text = tok.decode(ids[:ctx + ctx // 2])
    n = len(tok.encode(text))
    if not ctx <= n < 2 * ctx:
        raise RuntimeError(f"the evaluation text has {n} tokens, not one window of {ctx}")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


# ------------------------------------------------------------------------------- the runs

def invoke(args: list, log: str, kill_when=None) -> dict:
    """Run quantize.py with args (output to `log`); with kill_when (a callable), SIGKILL the
    run as soon as it returns True. Returns {"seconds", "status", "killed", "max_rss_gb"}
    (max_rss_gb: the child's peak since the pipeline last reset its high-water mark, i.e. in
    its last stage)."""
    t = time.perf_counter()
    with open(log, "a") as lf:
        lf.write(f"\n$ quantize.py {' '.join(args)}\n")
        lf.flush()
        p = subprocess.Popen([sys.executable, os.path.join(HERE, "quantize.py")] + args,
                             stdout=lf, stderr=subprocess.STDOUT)
        killed = False
        while kill_when is not None:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)     # reaped here, not by Popen
            if pid:
                break
            if kill_when():
                os.kill(p.pid, signal.SIGKILL)
                killed = True
                kill_when = None
            else:
                time.sleep(0.05)
        if kill_when is None:
            _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": time.perf_counter() - t, "status": p.returncode,
            "killed": killed, "max_rss_gb": ru.ru_maxrss / 2 ** 20}


def stage_lines(out: str) -> list:
    path = os.path.join(out, "stages.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def same_hessians(a: str, b: str, layers: int) -> tuple:
    """(arrays compared, [differences]) of the Hessian files of the first `layers` layers."""
    from quipjax.pipeline import hessians
    n, diffs = 0, []
    for i in range(layers):
        with np.load(hessians.layer_file(a, i)) as x, np.load(hessians.layer_file(b, i)) as y:
            for k in sorted(set(x.files) | set(y.files)):
                n += 1
                if k not in x.files or k not in y.files or not np.array_equal(x[k], y[k]):
                    diffs.append(f"Hessian layer {i} {k} differs")
    return n, diffs


def estimate(folder: str, args_cfg: dict) -> dict:
    """plan.py's estimate for this run (one device): {stage: (seconds, memory GB)}."""
    import dataclasses
    from quipjax.pipeline.plan import PlanCosts, plan, read_spec
    from quipjax.pipeline.settings import QuantSettings, RunConfig
    spec, _ = read_spec(folder)
    cfg = RunConfig(devset_size=args_cfg["devset_size"], ctx_size=args_cfg["ctx"],
                    eval_ctx_size=args_cfg["ctx"], eval_datasets=("wiki",),
                    settings=QuantSettings(codebook=args_cfg["codebook"]))
    out = {}
    for st in plan(spec, {"data": 1}, PlanCosts.builtin(), dataclasses.replace(cfg)):
        sec = st["seconds"] / 24 if st["name"].startswith("perplexity") else st["seconds"]
        out[st["name"]] = (sec, st["memory_gb"])          # perplexity: of one window
    return out


def main(argv):
    del argv
    shape = SHAPES[FLAGS.shape]
    if not 1 <= FLAGS.ref_layers < shape["layers"]:
        raise ValueError(f"--ref_layers must be in [1, {shape['layers'] - 1}]")
    from quipjax.pipeline import checkpoint as ckpt
    from quipjax.pipeline import hessians
    sys.path.insert(0, HERE)
    from compare_checkpoints import compare
    work = os.path.abspath(FLAGS.work)
    os.makedirs(work, exist_ok=True)
    t0 = time.perf_counter()
    big, short = make_folders(work, FLAGS.shape, shape, FLAGS.ref_layers)
    folder_s = time.perf_counter() - t0
    ctx = shape["ctx"]
    text = one_window_text(big, ctx, os.path.join(work, "eval_one_window.txt"))
    out, ref = os.path.join(work, "run"), os.path.join(work, "ref")
    hdir, hdir_ref = os.path.join(work, "hessians"), os.path.join(work, "hessians_ref")
    if FLAGS.fresh:
        import shutil
        for d in (out, ref, hdir, hdir_ref):
            shutil.rmtree(d, ignore_errors=True)
    log = os.path.join(work, "rehearsal.log")
    common = [f"--devset_size={FLAGS.devset_size}", f"--ctx_size={ctx}",
              f"--eval_ctx_size={ctx}", "--eval_datasets=", f"--text_file={text}",
              f"--codebook={FLAGS.codebook}", "--seed=0"]
    run_args = [f"--model={big}", f"--output_dir={out}", f"--hessian_dir={hdir}"] + common
    print(f"rehearsal of {FLAGS.shape} in {work} (log: {log})", flush=True)

    kills = []
    if FLAGS.kill and not ckpt.layer_done(out, 0):
        kills = [("hessians", lambda: os.path.exists(hessians.layer_file(hdir, 0))),
                 ("quantize", lambda: ckpt.layer_done(out, 0))]
    invocations = []
    for what, cond in kills + [("to the end", None)]:
        before = len(stage_lines(out))
        r = invoke(run_args, log, cond)
        r["until"] = what
        r["stages"] = stage_lines(out)[before:]
        invocations.append(r)
        print(f"invocation {len(invocations)} ({'killed in ' + what if r['killed'] else what}): "
              f"{r['seconds']:.0f} s, exit {r['status']}, peak RSS of its last stage "
              f"{r['max_rss_gb']:.2f} GB", flush=True)
        if not r["killed"] and r["status"] != 0:
            raise SystemExit(f"invocation {len(invocations)} failed (exit {r['status']}; -9 "
                             f"without our kill: the kernel's OOM killer?): see {log}")
        if cond is not None and not r["killed"]:
            print(f"  the kill in {what} missed: the run ended first", flush=True)
    if invocations[-1]["status"] != 0:
        raise SystemExit(f"the last invocation failed (exit {invocations[-1]['status']}): see {log}")
    r = invoke([f"--model={short}", f"--output_dir={ref}", f"--hessian_dir={hdir_ref}", "--noeval"]
               + common, log)
    if r["status"] != 0:
        raise SystemExit(f"the reference run failed: see {log}")
    layers = range(FLAGS.ref_layers)
    n_c, d_c = compare(out, ref, layers, globals_=True)
    n_h, d_h = same_hessians(hdir, hdir_ref, FLAGS.ref_layers)
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    plan_est = estimate(big, dict(devset_size=FLAGS.devset_size, ctx=ctx, codebook=FLAGS.codebook))

    rows = []
    names = {"hessians": "Hessian collection", "quantize": "quantization (no FT)",
             "fp_eval": "perplexity (each of FP and quantized)",
             "quantized_eval": "perplexity (each of FP and quantized)"}
    print(f"\nfolder written in {folder_s:.0f} s\n")
    print("| invocation | stage | seconds | peak RSS (GB) | plan.py: seconds / GB per device |")
    print("|---|---|---|---|---|")
    over = []
    for k, inv in enumerate(invocations, 1):
        for st in inv["stages"]:
            est = plan_est.get(names.get(st["stage"], ""), None)
            e = f"{est[0]:.1f} / {est[1]:.2f}" if est else ""
            label = f"killed in {inv['until']}" if inv["killed"] else inv["until"]
            print(f"| {k} ({label}) | {st['stage']} | {st['seconds']:.1f} | "
                  f"{st['peak_rss_gb']:.2f} | {e} |")
            rows.append(dict(st, invocation=k))
            if st["peak_rss_gb"] > FLAGS.max_rss_gb:
                over.append(f"{st['stage']} of invocation {k}: {st['peak_rss_gb']:.2f} GB")
        if inv["killed"]:
            # ru_maxrss counts from the last reset of the high-water mark (`PeakRSS`, at each
            # stage's start): the peak of the stage the kill cut short
            print(f"| {k} | killed in {inv['until']} after {inv['seconds']:.0f} s | | "
                  f"{inv['max_rss_gb']:.2f} (the stage cut short) | |")
    missed = [inv["until"] for inv in invocations if inv["until"] != "to the end"
              and not inv["killed"]]
    diffs = d_c + d_h
    print(f"\nfirst {FLAGS.ref_layers} layers against the uninterrupted {FLAGS.ref_layers}-layer "
          f"run: {n_c - len(d_c)} of {n_c} checkpoint arrays and {n_h - len(d_h)} of {n_h} "
          "Hessian arrays identical")
    for d in diffs:
        print("  " + d)
    print(f"perplexity of one window: FP {metrics['ppl'].get('fp')}, quantized "
          f"{metrics['ppl'].get('quantized')}")
    summary = {"shape": FLAGS.shape, "folder_seconds": folder_s, "invocations": invocations,
               "plan": plan_est, "compared": {"checkpoint": [n_c, d_c], "hessians": [n_h, d_h]},
               "ppl": metrics["ppl"], "over_rss": over, "missed_kills": missed}
    with open(os.path.join(work, "rehearsal.json"), "w") as f:
        json.dump(summary, f, indent=1)
    if over:
        print("over --max_rss_gb: " + "; ".join(over))
    ok = not diffs and not over and not missed
    print("rehearsal " + ("passed" if ok else "FAILED"))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    cli.run(main)
