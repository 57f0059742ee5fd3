"""Peak resident memory (RSS) of this process over a stretch of work, e.g. one pipeline stage.

    with PeakRSS() as peak:
        work()
    peak.gb          # the largest RSS during `work` (GiB)

On Linux the kernel's high-water mark (VmHWM) is reset at the start (`/proc/self/clear_refs`,
"5"), so each stretch reports its own peak, not the largest since the process started. Where
that is not possible (other systems, a restricted /proc), `gb` is the process-wide peak so far
(`resource.getrusage`, an upper bound) and `reset` is False.
"""
from __future__ import annotations

import resource
import sys

__all__ = ["PeakRSS"]

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
