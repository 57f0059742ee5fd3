"""Run many command lines of the experiments/ scripts cheaply: this process imports the heavy
libraries once, then runs each case in a forked child process (its own exit status, stdout and
stderr, a fresh absl flag registry, the script run as __main__ exactly as `python script.py`).

    python tests/cli_runner.py < cases.json > results.json
    cases: [{"script": path, "args": [...], "cwd": dir, "watch": dir or null}]
    results: [{"rc", "out", "err", "after": snapshot of "watch" after the case}]
"""
import json
import os
import runpy
import sys
import tempfile

# the imports every script makes; nothing here starts a JAX backend, so forking stays safe
import absl.flags  # noqa: F401
import flax.nnx  # noqa: F401
import jax  # noqa: F401
import numpy  # noqa: F401
import orbax.checkpoint  # noqa: F401
import tokenizers  # noqa: F401
import transformers  # noqa: F401

import quipjax  # noqa: F401
import quipjax.pipeline.cli  # noqa: F401


def snapshot(root: str) -> dict:
    """{relative path: [size, mtime_ns]} of every file and directory under root."""
    snap = {}
    for dp, dns, fns in os.walk(root):
        for n in dns + fns:
            p = os.path.join(dp, n)
            st = os.lstat(p)
            snap[os.path.relpath(p, root)] = [st.st_size if n in fns else 0, st.st_mtime_ns]
    return snap


def run_case(case: dict) -> dict:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:                    # the child: become `python script args...`
            code = 1
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                os.chdir(case["cwd"])
                sys.argv = [case["script"]] + list(case["args"])
                sys.path.insert(0, os.path.dirname(os.path.abspath(case["script"])))
                runpy.run_path(case["script"], run_name="__main__")
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except BaseException:
                import traceback
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        return {"rc": os.waitstatus_to_exitcode(status),
                "out": out.read().decode("utf-8", "replace"),
                "err": err.read().decode("utf-8", "replace"),
                "after": snapshot(case["watch"]) if case.get("watch") else None}


if __name__ == "__main__":
    cases = json.load(sys.stdin)
    json.dump([run_case(c) for c in cases], sys.stdout)
