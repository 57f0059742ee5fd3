"""What identifies a model's files: content hashes (cached by path, size and mtime) and the cache
directory they and other derived data live in.

    content_fingerprint(["model.safetensors", "config.json", "tokenizer.json"])  # 16 hex digits

A run's identity and the caches of derived data (Hessians, FP perplexity) use the content: a
touched, copied or moved model folder is the same model, while a changed weight is not.
"""
from __future__ import annotations

import hashlib
import json
import os

__all__ = ["cache_dir", "file_sha256", "content_fingerprint", "files_fingerprint"]


def cache_dir() -> str:
    """$QUIPJAX_CACHE, default ~/.cache/quipjax (created)."""
    d = os.environ.get("QUIPJAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "quipjax"))
    os.makedirs(d, exist_ok=True)
    return d


def _stat_key(path: str) -> str:
    st = os.stat(path)
    return f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"


def file_sha256(path: str) -> str:
    """sha256 hex digest of a file's bytes; remembered in the cache directory under the file's
    absolute path, size and modification time, so each file is read once."""
    key = hashlib.sha256(_stat_key(path).encode()).hexdigest()[:32]
    memo = os.path.join(cache_dir(), "file_hashes", key + ".json")
    if os.path.exists(memo):
        try:
            with open(memo) as f:
                return json.load(f)["sha256"]
        except (ValueError, KeyError, OSError):
            pass                        # a damaged memo: hash again
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
    except OSError as e:
        raise OSError(f"cannot read {path}: {e.strerror or e}") from e
    digest = h.hexdigest()
    os.makedirs(os.path.dirname(memo), exist_ok=True)
    tmp = f"{memo}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"path": os.path.abspath(path), "sha256": digest}, f)
    os.replace(tmp, memo)
    return digest


def content_fingerprint(files) -> str:
    """16 hex digits from the names (not folders) and contents of files: independent of where
    the files are and of their timestamps."""
    h = hashlib.sha256()
    for f in sorted(files, key=os.path.basename):
        h.update(f"{os.path.basename(f)}:{file_sha256(f)}\n".encode())
    return h.hexdigest()[:16]


def files_fingerprint(files) -> str:
    """16 hex digits identifying files (in the given order) by absolute path, size and
    modification time (cheap; changes when a file is touched or moved)."""
    h = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        h.update(f"{os.path.abspath(f)}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]
