"""Kill -9 a tiny-model quantize.py run at random moments, rerun the same command, and compare
the result with an uninterrupted run, array for array.

    python tests/kill_resume.py --kills=10 --seed=0 [--work=/tmp/kills]

The run covers every stage: Hessians, layer-by-layer quantization with in-block fine-tuning,
end-to-end fine-tuning and the checkpoint writes (evaluation is off: it writes nothing that a
resume reuses). Each trial has its own Hessian cache, so a kill can land in the Hessian stage;
between the kill and the rerun the model folder is moved to a new path, one file is touched
and a README is added, so the resume also proves that the run's identity is the model's
content. Prints one line per trial and, last, one JSON object; exits 1 if any trial differs.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")

FLAGS = ["--noeval", "--devset_size=4", "--ctx_size=64", "--dtype=float32", "--ft_dtype=float32",
         "--ft_epochs=1", "--ft_train_size=4", "--ft_valid_size=2", "--ft_bs=2",
         "--ft_update_freq=1", "--ft_ctx_size=32", "--e2e_epochs=1", "--e2e_train_size=4",
         "--e2e_valid_size=2", "--e2e_bs=2", "--e2e_ctx_size=32"]


def command(model, out):
    return [sys.executable, os.path.join(ROOT, "experiments", "quantize.py"), f"--model={model}",
            f"--output_dir={out}"] + FLAGS


def run(cmd, env, kill_after=None):
    """(exit status, seconds, last stderr line) of cmd; kill -9 after kill_after seconds."""
    t = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            p.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
            p.wait()
        err.seek(0)
        text = err.read().decode("utf-8", "replace").replace("\r", "\n")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return p.returncode, time.perf_counter() - t, (lines[-1] if lines else "")


def compare(a, b) -> int:
    """Differing arrays between two checkpoints (experiments/compare_checkpoints.py)."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "experiments",
                                                     "compare_checkpoints.py"),
                        f"--a={a}", f"--b={b}"], capture_output=True, text=True)
    if r.returncode not in (0, 1):
        raise RuntimeError(r.stderr[-2000:])
    return sum(line.endswith("differs") for line in r.stdout.splitlines()) or r.returncode


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=10, help="Trials (one kill each).")
    ap.add_argument("--seed", type=int, default=0, help="Seed of the kill moments.")
    ap.add_argument("--work", default=None, help="Work directory (default: a temporary one).")
    ap.add_argument("--between", default="0.15,0.97", help="Kill moments are uniform in this "
                    "range of fractions of the uninterrupted run's time.")
    args = ap.parse_args()
    sys.path.insert(0, HERE)
    from helpers import make_hf_folder
    work = args.work or tempfile.mkdtemp(prefix="kill_resume_")
    os.makedirs(work, exist_ok=True)
    model = os.path.join(work, "model")
    if not os.path.exists(model):
        make_hf_folder(model)
    env = dict(os.environ, QUIPJAX_CACHE=os.path.join(work, "cache_ref"))
    ref = os.path.join(work, "ref")
    shutil.rmtree(ref, ignore_errors=True)
    rc, ref_s, last = run(command(model, ref), env)
    if rc != 0:
        raise SystemExit(f"the uninterrupted run failed: {last}")
    print(f"uninterrupted run: {ref_s:.1f} s")
    rng = np.random.default_rng(args.seed)
    trials = []
    for k in range(args.kills):
        lo, hi = (float(x) for x in args.between.split(","))
        at = float(rng.uniform(lo, hi) * ref_s)
        env_k = dict(os.environ, QUIPJAX_CACHE=os.path.join(work, f"cache_{k}"))
        shutil.rmtree(env_k["QUIPJAX_CACHE"], ignore_errors=True)
        out = os.path.join(work, f"run_{k}")
        shutil.rmtree(out, ignore_errors=True)
        here = os.path.join(work, f"model_{k}")
        shutil.rmtree(here, ignore_errors=True)
        shutil.copytree(model, here)
        rc1, _, stage = run(command(here, out), env_k, kill_after=at)
        moved = here + "_moved"                     # move, touch, add a README
        shutil.rmtree(moved, ignore_errors=True)
        os.rename(here, moved)
        os.utime(os.path.join(moved, "config.json"))
        with open(os.path.join(moved, "README.md"), "w") as f:
            f.write("moved after the kill\n")
        rc2, s2, last = run(command(moved, out), env_k)
        diff = compare(ref, out) if rc2 == 0 else -1
        trials.append({"kill_s": round(at, 2), "killed": rc1 == -9, "stage": stage[:80],
                       "rerun_status": rc2, "rerun_s": round(s2, 1), "differing_arrays": diff,
                       "rerun_error": "" if rc2 == 0 else last})
        print(f"trial {k}: kill -9 at {at:.1f} s ({'killed' if rc1 == -9 else 'had ended'}) "
              f"during: {stage[:60]!r}; rerun status {rc2}, {diff} differing arrays")
    ok = all(t["rerun_status"] == 0 and t["differing_arrays"] == 0 for t in trials)
    print(json.dumps({"uninterrupted_s": round(ref_s, 1), "trials": trials, "all_identical": ok}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
