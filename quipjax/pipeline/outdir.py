"""Ownership and locking of the directories a run writes: its output directory and its
Hessian cache entry.

* quipjax writes only the entries of `OWNED` (and per-process work directories: `owned`) into
  an output directory; a non-empty directory that holds none of its runs is refused (never
  written into, never deleted), and `remove_owned` (what --overwrite does) deletes only those
  entries.
* `FileLock` is an advisory `flock` on a file in the directory, holding the owner's PID: a
  second run on the same directory stops (output directory) or waits (Hessian cache) with a
  message naming that PID. The kernel releases the lock when its process dies, so a lock left
  by a killed run is taken over at once.
"""
from __future__ import annotations

import fcntl
import os
import re
import shutil
import time
from typing import Callable, Optional

__all__ = ["OWNED", "owned", "LOCK_NAME", "FileLock", "RunLocked", "foreign_entries", "remove_owned"]

LOCK_NAME = ".quipjax.lock"

# every top-level entry quipjax writes into an output directory (pipeline.checkpoint's layout,
# metrics, fine-tuning curves and work files, the lock)
OWNED = ("quipjax.json", "globals", "globals.json", "layers", "e2e", "e2e.json", "ft_acts",
         "metrics.json", "metrics.json.tmp", "quipjax.json.tmp", "ft_curves.json",
         "ft_curves.png", "stages.jsonl", LOCK_NAME)
# the per-process work directories of a run of several processes (`processes.local_dir`)
_PER_PROCESS = re.compile(r"ft_acts\.p\d+of\d+")


def owned(entry: str) -> bool:
    """Whether a top-level entry of an output directory is one quipjax writes."""
    return entry in OWNED or _PER_PROCESS.fullmatch(entry) is not None


class RunLocked(RuntimeError):
    """Another live process holds the directory."""


def foreign_entries(path: str) -> list:
    """The entries of directory `path` that quipjax did not write (empty if it does not exist)."""
    if not os.path.isdir(path):
        return []
    return sorted(e for e in os.listdir(path) if not owned(e))


def remove_owned(path: str) -> list:
    """Delete quipjax's entries in `path` (`owned`; not the lock, not anything else); returns
    them."""
    gone = []
    for e in sorted(set(OWNED) | {e for e in os.listdir(path) if owned(e)}):
        p = os.path.join(path, e)
        if e == LOCK_NAME or not os.path.lexists(p):
            continue
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        else:
            os.remove(p)
        gone.append(e)
    return gone


def _holder(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip() or "unknown"
    except OSError:
        return "unknown"


class FileLock:
    """An exclusive lock on `directory/.quipjax.lock` (the directory is created).

    acquire(wait=False) raises RunLocked naming the holder's PID when another process holds it;
    wait=True blocks until it is free (calling log once with the holder's PID)."""

    def __init__(self, directory: str, what: str):
        self.path = os.path.join(directory, LOCK_NAME)
        self.what = what
        self.fd: Optional[int] = None

    def acquire(self, wait: bool = False, log: Optional[Callable] = None,
                poll: float = 0.5) -> "FileLock":
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                pid = _holder(self.path)
                if not wait:
                    os.close(fd)
                    raise RunLocked(f"{self.what} is in use by another quipjax run (PID {pid}): "
                                    "wait for it to finish, or use another directory") from None
                if not told and log is not None:
                    log(f"waiting for the quipjax run with PID {pid}, which holds {self.what}")
                    told = True
                time.sleep(poll)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
