"""Ctrl-C that a library cannot swallow.

Python turns SIGINT into a KeyboardInterrupt raised wherever the main thread happens to be.
When that is a finalizer (`__del__`, a weakref callback, a garbage-collection pass) or code
that catches BaseException, the interrupt is printed as "Exception ignored" or dropped, and
the run goes on as if Ctrl-C had never been pressed (seen once in CI in the Hessian stage).
`install()` keeps Python's behaviour (raise at once) and also records the interrupt;
`check()` raises it again at the next progress step if it was lost.
"""
from __future__ import annotations

import signal
import threading

__all__ = ["install", "restore", "check"]

_state = {"pending": False}


def _on_sigint(signum, frame):
    _state["pending"] = True
    raise KeyboardInterrupt


def install():
    """Route SIGINT through the recorder (main thread only; a no-op where Ctrl-C is ignored,
    e.g. in pytest-xdist workers, or handled by someone else). Returns what `restore` takes."""
    _state["pending"] = False
    if threading.current_thread() is not threading.main_thread():
        return None
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return None
    signal.signal(signal.SIGINT, _on_sigint)
    return signal.default_int_handler


def restore(previous) -> None:
    """Undo `install()` (given its return value)."""
    if previous is not None and signal.getsignal(signal.SIGINT) is _on_sigint:
        signal.signal(signal.SIGINT, previous)


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed (and, apparently, swallowed)."""
    if _state["pending"]:
        raise KeyboardInterrupt
