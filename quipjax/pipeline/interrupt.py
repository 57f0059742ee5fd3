"""Ctrl-C that a library cannot swallow.

Python turns SIGINT into a KeyboardInterrupt raised wherever the main thread happens to be.
When that is a finalizer (`__del__`, a weakref callback, a garbage-collection pass) or code
that catches BaseException, the interrupt is printed as "Exception ignored" or dropped, and
the run goes on as if Ctrl-C had never been pressed (seen once in CI in the Hessian stage).
`install()` keeps Python's behaviour (raise at once) and also records the interrupt;
`check()` raises it again at the next progress step if it was lost. While installed, an
interrupt that Python could only report as "Exception ignored" (it landed in a finalizer or a
gc callback, such as jax's `_xla_gc_callback`) is not printed: `check()` will raise it, and a
traceback there would read as a crash.
"""
from __future__ import annotations

import signal
import sys
import threading

__all__ = ["install", "restore", "check"]

_state = {"pending": False, "hook": None}


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
    if sys.unraisablehook is not _quiet_unraisable:
        _state["hook"] = sys.unraisablehook
        sys.unraisablehook = _quiet_unraisable
    return signal.default_int_handler


def _quiet_unraisable(unraisable):
    # Only our own recorded interrupt is dropped; anything else goes to the previous hook.
    if _state["pending"] and unraisable.exc_type is KeyboardInterrupt:
        return
    (_state["hook"] or sys.__unraisablehook__)(unraisable)


def restore(previous) -> None:
    """Undo `install()` (given its return value)."""
    if previous is None:                    # install() changed nothing
        return
    if signal.getsignal(signal.SIGINT) is _on_sigint:
        signal.signal(signal.SIGINT, previous)
    if sys.unraisablehook is _quiet_unraisable:
        sys.unraisablehook = _state["hook"] or sys.__unraisablehook__
        _state["hook"] = None


def check() -> None:
    """Raise KeyboardInterrupt if Ctrl-C was pressed (and, apparently, swallowed)."""
    if _state["pending"]:
        raise KeyboardInterrupt
