"""The command-line behaviour every experiments/ script shares.

    if __name__ == "__main__":
        cli.run(main, positional="model", resumable=True)

* `--help` (or -h, --helpshort, --helpfull) prints the script's flags and quipjax's and exits 0.
* `--flagfile=NAME` that is not a file is looked up in the script's configs/ folder (with and
  without ".cfg"), so the shipped flagfiles work from any directory.
* A positional argument is an error that suggests the flag it was probably meant for.
* User errors (bad flags, missing or unreadable files, settings quipjax refuses, a busy output
  directory) print one line `error: ...` to stderr and exit 2; `--verbose` adds the traceback.
  Anything else is a bug and keeps its traceback (exit 1).
* Ctrl-C prints one line (for resumable jobs: the same command resumes) and exits 130, also
  when a library swallowed the KeyboardInterrupt (`interrupt`: the next progress step raises).
"""
from __future__ import annotations

import os
import sys
import traceback
import warnings
from typing import Callable, Optional, Sequence

from absl import flags

from quipjax.pipeline import interrupt
from quipjax.pipeline.outdir import RunLocked

__all__ = ["run", "UserError", "USER_ERRORS", "one_line", "resolve_flagfile", "expand_args",
           "define_process_flags", "start_processes", "default_mesh"]

HELP_FLAGS = ("-h", "-?", "--help", "--helpshort", "--helpfull", "-help")


class UserError(Exception):
    """An error in what the user asked for; its message says what to change."""


# what the CLIs report in one line: errors in the input, not in quipjax
USER_ERRORS = (UserError, ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError,
               PermissionError, FloatingPointError, RunLocked, flags.Error)


def one_line(e: BaseException) -> str:
    """The exception's message with its whitespace (newlines included) collapsed."""
    msg = " ".join(str(e).split())
    return msg or type(e).__name__


def resolve_flagfile(name: str, configs: str, near: Optional[str] = None) -> str:
    """The file a `--flagfile=NAME` means: NAME itself, else NAME (or NAME.cfg) beside the
    flagfile that includes it (`near`), else in the shipped configs folder."""
    if os.path.isfile(name):
        return name
    for d in ([near] if near else []) + [configs]:
        for cand in (os.path.join(d, os.path.basename(name)),
                     os.path.join(d, os.path.basename(name) + ".cfg")):
            if os.path.isfile(cand):
                return cand
    raise UserError(f"flagfile {name} not found (nor in {configs}: "
                    f"{', '.join(sorted(_configs(configs))) or 'none'})")


def expand_args(args: Sequence[str], configs: str, near: Optional[str] = None,
                depth: int = 0) -> list:
    """Arguments with every --flagfile replaced by its lines (recursively, each resolved by
    `resolve_flagfile`), so that flagfiles work from any directory."""
    out = []
    for a in args:
        for prefix in ("--flagfile=", "-flagfile="):
            if a.startswith(prefix):
                if depth > 8:
                    raise UserError("flagfiles include each other too deeply (a cycle?)")
                path = resolve_flagfile(a[len(prefix):], configs, near)
                with open(path, encoding="utf-8") as f:
                    lines = [ln.strip() for ln in f]
                out += expand_args([ln for ln in lines if ln and not ln.startswith("#")],
                                   configs, os.path.dirname(os.path.abspath(path)), depth + 1)
                break
        else:
            out.append(a)
    return out


def _configs(configs):
    return [f for f in os.listdir(configs) if f.endswith(".cfg")] if os.path.isdir(configs) else []


def _help(fv) -> str:
    """Help of the script's own flags and of quipjax's (not absl's or JAX's)."""
    mods = fv.flags_by_module_dict()
    main = sys.argv[0]
    parts = [fv.module_help(m) for m in mods
             if m == main or m.endswith(os.path.basename(main)) or m.startswith("quipjax")]
    doc = (sys.modules["__main__"].__doc__ or "").strip()
    return "\n\n".join([doc] + parts if doc else parts)


def define_process_flags(fv=None) -> None:
    """--cpu_devices and the flags of a run over several processes (hosts): --distributed,
    --coordinator, --num_processes, --process_id, --process_timeout, --process_heartbeat.
    `start_processes` acts on them."""
    fv = flags.FLAGS if fv is None else fv
    flags.DEFINE_integer("cpu_devices", 0, "Simulate this many devices on the CPU (testing "
                         "--mesh without GPUs), with 4 XLA threads per device (PJRT_NPROC, "
                         "unless set); 0: the real devices.", flag_values=fv)
    flags.DEFINE_boolean("distributed", False, "Run as one of several processes (hosts) with "
                         "jax.distributed: every process runs the same command; the cluster "
                         "is read from SLURM / Open MPI / TPU / Kubernetes environments, or "
                         "given by --coordinator, --num_processes and --process_id. --mesh "
                         "then spans every process's devices (default: data:<all devices>); "
                         "process 0 logs and writes the files (a file system all processes "
                         "share).", flag_values=fv)
    flags.DEFINE_string("coordinator", None, "With --distributed: host:port of process 0's "
                        "coordinator (e.g. node0:12345).", flag_values=fv)
    flags.DEFINE_integer("num_processes", None, "With --distributed: how many processes.",
                         flag_values=fv)
    flags.DEFINE_integer("process_id", None, "With --distributed: this process's index, 0 .. "
                         "num_processes - 1.", flag_values=fv)
    flags.DEFINE_integer("process_timeout", 300, "With --distributed: seconds to wait for every "
                         "process to connect, else every process that came exits with an "
                         "error.", flag_values=fv)
    flags.DEFINE_integer("process_heartbeat", 60, "With --distributed: seconds after which a "
                         "process that stopped answering (died, killed) is declared dead and "
                         "the others exit with an error instead of waiting.", flag_values=fv)


def start_processes(fv=None) -> None:
    """Act on `define_process_flags`'s flags: simulated CPU devices, then (--distributed)
    join the other processes. Call before any JAX computation."""
    fv = flags.FLAGS if fv is None else fv
    if fv.cpu_devices:
        from quipjax.distributed.mesh import simulate_cpu_devices
        simulate_cpu_devices(fv.cpu_devices)
    explicit = [f"--{n}" for n in ("coordinator", "num_processes", "process_id")
                if fv[n].value is not None]
    if not fv.distributed:
        if explicit:
            raise UserError(f"{', '.join(explicit)} need --distributed")
        return
    from quipjax.distributed import processes
    processes.initialize(fv.coordinator, fv.num_processes, fv.process_id,
                         timeout=fv.process_timeout, heartbeat=fv.process_heartbeat)


def default_mesh(mesh: Optional[str]) -> Optional[str]:
    """--mesh, or in a run of several processes "data:<every device>"."""
    import jax
    if mesh or jax.process_count() == 1:
        return mesh
    return f"data:{jax.device_count()}"


def _fail(msg: str, code: int = 2) -> None:
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


def _define_common(fv) -> None:
    if "verbose" not in fv:
        flags.DEFINE_boolean("verbose", False, "Print the whole traceback of an error.",
                             flag_values=fv)


def run(main: Callable, *, positional: Optional[str] = None, resumable: bool = False,
        argv: Optional[Sequence[str]] = None, flag_values=None) -> None:
    """Parse the flags and run `main(argv)` with the behaviour of the module docstring.

    positional: the flag a stray positional argument was probably meant for (its suggestion);
    resumable: Ctrl-C says that the same command resumes the job."""
    fv = flags.FLAGS if flag_values is None else flag_values
    argv = list(sys.argv if argv is None else argv)
    _define_common(fv)
    if any(a in HELP_FLAGS for a in argv[1:]):
        print(_help(fv))
        sys.exit(0)
    configs = os.path.join(os.path.dirname(os.path.abspath(argv[0])), "configs")
    try:
        rest = fv(argv[:1] + expand_args(argv[1:], configs))
    except (UserError, flags.Error) as e:
        _fail(one_line(e))
    if len(rest) > 1:
        hint = f": did you mean --{positional}={rest[1]}?" if positional else ""
        _fail(f"unexpected argument {rest[1]!r} (flags are given as --name=value){hint}")
    previous = interrupt.install()
    try:
        main(rest)
        interrupt.check()           # Ctrl-C that a library swallowed after the last progress step
    except KeyboardInterrupt:
        # libraries may warn while the interpreter shuts down: keep the interrupt line last
        warnings.simplefilter("ignore")
        print("interrupted" + (": run the same command again to resume where it stopped"
                               if resumable else ""), file=sys.stderr)
        sys.exit(130)
    except USER_ERRORS as e:
        if fv["verbose"].value:
            traceback.print_exc()
        _fail(one_line(e))
    finally:
        interrupt.restore(previous)
