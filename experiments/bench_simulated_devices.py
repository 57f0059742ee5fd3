"""Simulated CPU devices: how often XLA's CPU thread pool deadlocks, and what its size costs.

Runs `experiments/quantize.py` on a tiny random Llama with in-block and end-to-end
fine-tuning on --mesh=data:4,model:2 with --cpu_devices=8 (the program that deadlocked in
CI: collectives inside the scanned blocks), --runs times per pool size (PJRT_NPROC, which
`distributed.simulate_cpu_devices` keeps when it is set). Every run is a fresh process and
output directory; all share one Hessian cache, filled by a first untimed run. XLA's
collective timeouts are shortened (a warning after 10 s, the abort 60 s later) so that a
deadlock ends as an aborted run instead of a hang. --busy starts that many busy-loop
processes beside the runs (the load of a test suite).

    python experiments/bench_simulated_devices.py --threads=8,32 --runs=6 --busy=1

Prints per pool size: runs, deadlocks (XLA's "Termination timeout"), other failures and the
median seconds of the runs that finished.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

from random_model import SHAPES, write_random_folder, write_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
F = flags.FLAGS
flags.DEFINE_list("threads", ["8", "32"], "Pool sizes (PJRT_NPROC) to compare.")
flags.DEFINE_integer("runs", 4, "Runs per pool size.")
flags.DEFINE_integer("busy", 0, "Busy-loop processes beside the runs.")
flags.DEFINE_string("work", "/tmp/quipjax_bench_simulated_devices", "Scratch directory.")
flags.DEFINE_integer("timeout", 900, "Seconds before a run is killed (a hang XLA missed).")

RUN_FLAGS = ["--seed=3", "--devset_size=10", "--ctx_size=64", "--eval_ctx_size=64",
             "--eval_datasets=c4", "--cpu_devices=8", "--mesh=data:4,model:2",
             "--ft_epochs=1", "--ft_train_size=8", "--ft_valid_size=4", "--ft_bs=4",
             "--ft_update_freq=1", "--ft_ctx_size=32", "--e2e_epochs=1", "--e2e_train_size=8",
             "--e2e_valid_size=4", "--e2e_bs=4", "--e2e_ctx_size=32"]
XLA_TIMEOUTS = ("--xla_cpu_collective_call_warn_stuck_timeout_seconds=10 "
                "--xla_cpu_collective_call_terminate_timeout_seconds=60")


def run_once(model: str, out: str, threads: int, timeout: int) -> tuple:
    """(status, seconds): status "ok", "deadlock" or "failed (rc)"."""
    env = dict(os.environ, PJRT_NPROC=str(threads), XLA_FLAGS=XLA_TIMEOUTS,
               QUIPJAX_CACHE=os.path.join(F.work, "cache"))
    cmd = [sys.executable, os.path.join(HERE, "quantize.py"), f"--model={model}",
           f"--output_dir={out}"] + RUN_FLAGS
    t = time.perf_counter()
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "deadlock", time.perf_counter() - t
    dt = time.perf_counter() - t
    if p.returncode == 0:
        return "ok", dt
    if "Termination timeout" in p.stderr:
        return "deadlock", dt
    return f"failed ({p.returncode}): {p.stderr.strip().splitlines()[-1:]}", dt


def main(argv):
    del argv
    os.makedirs(F.work, exist_ok=True)
    model = os.path.join(F.work, "tiny")
    if not os.path.exists(os.path.join(model, "config.json")):
        os.makedirs(model, exist_ok=True)
        write_tokenizer(model, SHAPES["tiny"]["vocab"])
        write_random_folder(model, SHAPES["tiny"])
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(F.busy)]
    try:
        status, dt = run_once(model, os.path.join(F.work, "warm"), 32, F.timeout)
        print(f"warm-up run (Hessians into the cache): {status}, {dt:.1f} s", flush=True)
        rows = []
        for n in (int(t) for t in F.threads):
            got = []
            for i in range(F.runs):
                status, dt = run_once(model, os.path.join(F.work, f"run_{n}_{i}"), n, F.timeout)
                print(f"threads {n} run {i}: {status}, {dt:.1f} s", flush=True)
                got.append((status, dt))
            ok = [dt for s, dt in got if s == "ok"]
            rows.append((n, len(got), sum(s == "deadlock" for s, _ in got),
                         sum(s.startswith("failed") for s, _ in got),
                         statistics.median(ok) if ok else float("nan")))
    finally:
        for p in busy:
            p.kill()
    print(f"\n8 simulated devices, data:4,model:2, in-block + e2e FT; busy processes: {F.busy}")
    print("| threads (PJRT_NPROC) | runs | deadlocks | other failures | median s (finished) |")
    print("|---|---|---|---|---|")
    for n, r, d, f, med in rows:
        print(f"| {n} | {r} | {d} | {f} | {med:.1f} |")


if __name__ == "__main__":
    app.run(main)
