"""No run loses work: locks on output directories and Hessian cache entries (a second run stops
or waits, naming the holder's PID; a dead holder's lock is taken over), ownership of output
directories, and Ctrl-C saying that the same command resumes."""
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from quipjax.pipeline import cli, outdir

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUTDIR_PY = os.path.join(ROOT, "quipjax", "pipeline", "outdir.py")


def _hold(directory, seconds):
    """A separate process holding the lock of `directory` for `seconds` (outdir.py loaded by
    path: no JAX import, so it starts at once). Returns it once it holds the lock."""
    code = (f"import importlib.util, time\n"
            f"s = importlib.util.spec_from_file_location('od', {OUTDIR_PY!r})\n"
            f"m = importlib.util.module_from_spec(s); s.loader.exec_module(m)\n"
            f"m.FileLock({directory!r}, 'x').acquire(); print('held', flush=True)\n"
            f"time.sleep({seconds})\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_run_stops_naming_the_holder_and_a_dead_holders_lock_is_taken(tmp_path):
    d = str(tmp_path / "out")
    p = _hold(d, 60)
    try:
        with pytest.raises(outdir.RunLocked, match=f"PID {p.pid}"):
            outdir.FileLock(d, "the output directory").acquire()
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    lock = outdir.FileLock(d, "the output directory").acquire()      # kill -9: taken over
    with open(os.path.join(d, outdir.LOCK_NAME)) as f:
        assert f.read().strip() == str(os.getpid())
    lock.release()


def test_a_waiting_run_proceeds_when_the_holder_ends(tmp_path):
    d = str(tmp_path / "hessians")
    p = _hold(d, 1.5)
    said = []
    t = time.perf_counter()
    lock = outdir.FileLock(d, "the Hessian cache").acquire(wait=True, log=said.append, poll=0.1)
    assert time.perf_counter() - t > 0.5
    lock.release()
    p.wait()
    assert len(said) == 1 and f"PID {p.pid}" in said[0]


def test_overwrite_removes_only_what_quipjax_wrote(tmp_path):
    d = tmp_path / "run"
    (d / "layers").mkdir(parents=True)
    (d / "layers" / "layer_000.json").write_text("{}")
    (d / "ft_acts.p1of2").mkdir()               # a run of two processes' work directory
    for name in ("quipjax.json", "metrics.json", "stages.jsonl", "mine.txt", "ft_acts.p1"):
        (d / name).write_text("x")
    assert outdir.foreign_entries(str(d)) == ["ft_acts.p1", "mine.txt"]
    assert sorted(outdir.remove_owned(str(d))) == ["ft_acts.p1of2", "layers", "metrics.json",
                                                   "quipjax.json", "stages.jsonl"]
    assert sorted(os.listdir(d)) == ["ft_acts.p1", "mine.txt"]


def test_flagfiles_resolve_from_anywhere_and_nest(tmp_path):
    configs = os.path.join(ROOT, "experiments", "configs")
    args = cli.expand_args(["--flagfile=llama70b_2bit"], configs)
    assert "--mesh=model:8" in args and "--codebook=E8P12" in args
    # the 70B line comes after the included 7B flagfile's, so it wins
    req = [a for a in args if a.startswith("--requires_model=")]
    assert len(req) == 2 and "Llama-2-70B" in req[-1]
    with pytest.raises(cli.UserError, match="nosuch"):
        cli.expand_args(["--flagfile=nosuch"], configs)


def test_ctrl_c_says_the_same_command_resumes(tiny_hf, tmp_path):
    path, _ = tiny_hf
    env = dict(os.environ, QUIPJAX_CACHE=str(tmp_path / "cache"))
    cmd = [sys.executable, os.path.join(ROOT, "experiments", "quantize.py"), f"--model={path}",
           f"--output_dir={tmp_path / 'out'}", "--noeval", "--devset_size=64", "--ctx_size=64"]
    # xdist workers ignore SIGINT and children inherit that: give the run the default handler
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    err = []

    def read():             # progress bars end lines with \r: read bytes, not lines
        for chunk in iter(lambda: p.stderr.read1(4096), b""):
            err.append(chunk.decode("utf-8", "replace"))
    th = threading.Thread(target=read)
    th.start()
    deadline = time.time() + 300
    while "Hessians" not in "".join(err) and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    alive = p.poll() is None
    p.send_signal(signal.SIGINT)
    p.wait(timeout=120)
    th.join()
    text = "".join(err).replace("\r", "\n")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert alive, ("the run ended before the test saw its Hessian stage and sent Ctrl-C",
                   text[-3000:])
    assert p.returncode == 130, (p.returncode, text[-3000:])
    assert "Traceback" not in text
    assert lines[-1] == "interrupted: run the same command again to resume where it stopped"


# a job run through the CLI wrapper: {before} runs first (Ctrl-C lands somewhere odd), then
# three progress steps, the first of which must raise the interrupt again
INTERRUPTED_JOB = """
import gc, os, signal, sys, time
from quipjax.pipeline import cli
from quipjax.pipeline.run import progress_bar
{setup}
def main(argv):
    bar = progress_bar(3, "steps")
{before}
    print("past the interrupt", flush=True)
    try:                                    # closed before the Ctrl-C line, as the pipeline does
        for _ in range(3):
            bar.update(1)
        print("ran to the end", flush=True)
    finally:
        bar.close()

cli.run(main, resumable=True, argv=[sys.argv[0]])
"""

SWALLOWING = dict(setup="", before="""
    try:                                    # a library that catches BaseException
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)
    except BaseException:
        pass""")

IN_GC_CALLBACK = dict(setup="""
fired = []

def on_gc(phase, info):                     # as jax's _xla_gc_callback: Ctrl-C lands in here
    if phase == "start" and not fired:
        fired.append(1)
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):               # bytecode boundaries: the handler runs in here
            pass
""", before="""
    gc.callbacks.append(on_gc)
    gc.collect()
    gc.callbacks.remove(on_gc)""")


def _run_interrupted(job: dict) -> subprocess.CompletedProcess:
    """Run INTERRUPTED_JOB with `job`'s parts; check it stopped at the first progress step
    with exit 130 and the resume line."""
    p = subprocess.run([sys.executable, "-c", INTERRUPTED_JOB.format(**job)],
                       capture_output=True, text=True, timeout=120,
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert "past the interrupt" in p.stdout, (p.stdout, p.stderr[-2000:])
    assert "ran to the end" not in p.stdout, p.stdout
    assert p.returncode == 130, (p.returncode, p.stderr[-2000:])
    assert p.stderr.strip().splitlines()[-1] == (
        "interrupted: run the same command again to resume where it stopped")
    return p


def test_ctrl_c_swallowed_by_a_library_still_stops_the_run():
    """A KeyboardInterrupt caught by third-party code (or raised inside a finalizer) must not
    let the run go on: the next progress step raises it again (exit 130, the resume line)."""
    _run_interrupted(SWALLOWING)


def test_ctrl_c_inside_a_gc_callback_stops_the_run_without_a_traceback():
    """Python can only print an interrupt raised in a gc callback ("Exception ignored ...
    Traceback"): CI saw that from jax's gc callback. The run must still stop at the next
    progress step, with the resume line and no traceback."""
    p = _run_interrupted(IN_GC_CALLBACK)
    assert "Traceback" not in p.stderr and "Exception ignored" not in p.stderr, p.stderr


def test_other_unraisable_errors_are_still_printed():
    """The quiet hook drops only the recorded Ctrl-C, nothing else a finalizer raises."""
    job = ("import gc, sys\nfrom quipjax.pipeline import interrupt\n"
           "prev = interrupt.install()\n"
           "class Bad:\n    def __del__(self):\n        raise ValueError('from a finalizer')\n"
           "Bad()\ninterrupt.restore(prev)\nprint(sys.unraisablehook is sys.__unraisablehook__)\n")
    p = subprocess.run([sys.executable, "-c", job], capture_output=True, text=True, timeout=60,
                       preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert "ValueError: from a finalizer" in p.stderr, p.stderr
    assert p.stdout.strip() == "True", (p.stdout, p.stderr)
