"""Peak resident memory (RSS) of this process over a stretch of work, e.g. one pipeline stage.

    with PeakRSS() as peak:
        work()
    peak.gb          # the largest RSS during `work` (GiB)

On Linux the kernel's high-water mark (VmHWM) is reset at the start (`/proc/self/clear_refs`,
"5"), so each stretch reports its own peak, not the largest since the process started. Where
that is not possible (other systems, a restricted /proc), `gb` is the process-wide peak so far
(`resource.getrusage`, an upper bound) and `reset` is False.

`release_freed()` hands memory the process no longer uses back to the system before a stage
whose peak matters (JAX's compiled programs, glibc's free heap).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
import sys

__all__ = ["PeakRSS", "release_freed"]

_STATUS, _CLEAR = "/proc/self/status", "/proc/self/clear_refs"


def _hwm_kb():
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _maxrss_kb() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r // 1024 if sys.platform == "darwin" else r        # bytes on macOS, else kB


class PeakRSS:
    """A context manager measuring the peak RSS of what runs inside it (`gb`, `reset`). Not
    nestable: the reset is the process's, so an inner one ends the outer's measurement."""

    def __init__(self):
        self.gb = None
        self.reset = False

    def __enter__(self):
        try:
            with open(_CLEAR, "w") as f:
                f.write("5")
            self.reset = _hwm_kb() is not None
        except OSError:
            self.reset = False
        return self

    def __exit__(self, *exc):
        kb = _hwm_kb() if self.reset else None
        self.gb = (kb if kb is not None else _maxrss_kb()) / 1024 ** 2
        return False


def release_freed() -> None:
    """Drop JAX's compiled programs (they are compiled again when next called) and return
    glibc's free heap pages to the system (`malloc_trim`; nothing elsewhere).

    Why: freed buffers stay in glibc's heap and count in RSS, where the next stage's larger
    or differently sized buffers may not reuse them (measured on SmolLM2's end-to-end stage:
    building the tunable model leaves ~0.6 GB above its 0.48 GB of arrays; BUILD_NOTES.md)."""
    gc.collect()
    import jax                   # here: `PeakRSS` alone needs no JAX
    jax.clear_caches()
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass
