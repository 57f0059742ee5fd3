"""Where a run's calibration windows (Hessians, fine-tuning) come from, and the check that
the text holds enough distinct tokens for them.

    plan = make_plan(tokenizer, cfg.calibration, requests(cfg), cfg.settings.seed)
    plan.windows("hessian")      # (devset_size, ctx_size) int32; "ft", "e2e" likewise
    plan.stats                   # metrics.json "calibration"; plan.identity: the run identity

Three sources (--calibration, --calibration_files):
  * wiki (the default): `data.calibration_windows`, the sampler of earlier releases (seeded
    random offsets with replacement: windows may overlap) -- the same windows, bit for bit, so
    earlier results and caches stay valid. Only the count is checked: a run asking for more
    tokens than the split holds is refused unless --allow_repeats.
  * mix: the wiki calibration split with exllamav2's technical, code, multilingual and
    TinyStories texts, weighted by `MIX` (never c4: it is an evaluation set). From those four
    the lines in a run of 12 words that also occurs in the evaluation texts (wiki test split,
    c4) are dropped: technical.utf8 quotes a C4 paragraph, multilingual.utf8 a C4 table row.
  * files: the user's .txt (a file is a document), .jsonl (a line is a document: its
    --calibration_field string) and .parquet (a row is a document: that column; needs
    pyarrow) files. Each entry of --calibration_files is a path or glob with an optional
    ":weight" (`a.jsonl:0.7,b/*.txt:0.3`); the files an entry matches are one source. Without
    weights the sources share the windows in proportion to their tokens.

mix and files sample WITHOUT overlap: a source's documents are tokenized (the model's
tokenizer, no BOS, as the wiki split is) and joined with the tokens of "\\n\\n" into one
stream (cached per file). The requests are placed in order -- Hessian windows, then in-block,
then end-to-end fine-tuning windows -- each split among the sources by weight (largest
remainder) and placed at seeded random positions among the tokens the earlier requests left
(stars and bars: every non-overlapping placement equally likely). So each token is used at
most once, and the Hessian windows do not depend on the fine-tuning settings (the Hessian
cache stays valid when they change); a later window may join the text on both sides of an
earlier one. A request larger than what a source has left is refused before any model work
unless --allow_repeats, which starts another pass over the whole source.
"""
from __future__ import annotations

import bisect
import dataclasses
import functools
import glob
import json
import os
import re
from typing import List, Optional, Sequence, Tuple

import numpy as np

from quipjax.models.files import content_fingerprint, file_sha256
from quipjax.pipeline import data

__all__ = ["MIX", "SOURCES", "EXTENSIONS", "Source", "Request", "CalibrationPlan",
           "split_weight", "parse_sources", "read_documents", "shipped_documents",
           "source_tokens", "requests",
           "split_counts", "place_windows", "make_plan", "coverage"]

# the shipped mix: exllamav2's standard calibration rows without c4 (an evaluation set):
# wiki 48, multilingual 20, code 15, technical 10, tiny 10 of 103 rows, rounded
MIX = (("wiki", 0.45), ("multilingual", 0.2), ("code", 0.15), ("technical", 0.1),
       ("tiny", 0.1))
SOURCES = ("wiki", "mix")               # values of --calibration
EXTENSIONS = (".txt", ".jsonl", ".parquet")
PLACEMENT = "no-overlap-v1"             # the placement algorithm, part of the identity
SHINGLE = 12                            # words of a run shared with the evaluation texts
CHUNK_CHARS = 1 << 20                   # documents are tokenized in joined chunks of this size
SEPARATOR = "\n\n"                      # between documents, as in the protocol's texts
# (what messages call a request, the flags that size it)
PURPOSES = {"hessian": ("Hessian", "--devset_size x --ctx_size"),
            "ft": ("in-block fine-tuning", "--ft_train_size + --ft_valid_size x --ft_ctx_size"),
            "e2e": ("end-to-end", "--e2e_train_size + --e2e_valid_size x --e2e_ctx_size")}


@dataclasses.dataclass(frozen=True)
class Source:
    """A calibration source: its name in messages, its files (a shipped corpus name when
    `shipped`), its weight (None: in proportion to its tokens)."""

    name: str
    files: Tuple[str, ...]
    weight: Optional[float] = None
    shipped: bool = False


@dataclasses.dataclass(frozen=True)
class Request:
    """`count` windows of `ctx` tokens for `purpose` (hessian, ft or e2e), sampled with `seed`."""

    purpose: str
    count: int
    ctx: int
    seed: int


# ------------------------------------------------------------------------------- reading

def split_weight(spec: str) -> Tuple[str, Optional[float]]:
    """'path:0.7' -> ('path', 0.7); 'path' -> ('path', None). A weight must be > 0."""
    head, sep, tail = spec.rpartition(":")
    if not sep or not head:
        return spec, None
    try:
        w = float(tail)
    except ValueError:
        return spec, None                # a ':' that is part of the path
    if not np.isfinite(w) or w <= 0:
        raise ValueError(f"--calibration_files: the weight of {head} must be a positive number, "
                         f"got {tail}")
    return head, w


def parse_sources(specs: Sequence[str]) -> List[Source]:
    """The sources of --calibration_files entries (globs expanded, sorted); raises naming the
    entry that matches nothing, a file of an unknown type, a file listed twice, or weights
    given for some entries only."""
    out, seen = [], {}
    for spec in specs:
        pattern, weight = split_weight(spec.strip())
        path = os.path.expanduser(pattern)
        if glob.has_magic(path):          # a glob's directories are not files of it
            files = sorted(f for f in glob.glob(path) if not os.path.isdir(f))
        else:
            files = [path]
        if not files:
            raise FileNotFoundError(f"--calibration_files: {pattern} matches no file")
        for f in files:
            if os.path.isdir(f):
                raise IsADirectoryError(f"--calibration_files: {f} is a directory: use a glob, "
                                        f"e.g. {os.path.join(f, '*.jsonl')}")
            if not os.path.isfile(f):
                raise FileNotFoundError(f"--calibration_files: {f} does not exist")
            if not f.endswith(EXTENSIONS):
                raise ValueError(f"--calibration_files: {f} is not one of "
                                 f"{', '.join(EXTENSIONS)}")
            key = os.path.realpath(f)
            if key in seen:           # its tokens would be sampled twice
                raise ValueError(f"--calibration_files: {f} is matched by both {seen[key]} "
                                 f"and {pattern}")
            seen[key] = pattern
        out.append(Source(pattern, tuple(files), weight))
    given = [s.weight is not None for s in out]
    if any(given) and not all(given):
        raise ValueError("--calibration_files: give a weight to every entry (a.jsonl:0.7,"
                         "b.txt:0.3) or to none (windows in proportion to tokens)")
    return out


def _jsonl_documents(path: str, field: str) -> list:
    docs = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as e:
                raise ValueError(f"{path} line {n} is not a JSON object ({e})") from None
            if not isinstance(obj, dict) or field not in obj:
                have = ", ".join(list(obj)[:8]) if isinstance(obj, dict) else type(obj).__name__
                raise ValueError(f"{path} line {n} has no field {field!r} (it has: {have}): "
                                 "name the text field with --calibration_field")
            if not isinstance(obj[field], str):
                raise ValueError(f"{path} line {n}: field {field!r} is a "
                                 f"{type(obj[field]).__name__}, not text: name the text field "
                                 "with --calibration_field")
            docs.append(obj[field])
    return docs


def _parquet_documents(path: str, field: str) -> list:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError(f"reading {path} needs pyarrow (pip install pyarrow), or convert it "
                         "to .jsonl") from None
    names = pq.read_schema(path).names
    if field not in names:
        raise ValueError(f"{path} has no column {field!r} (it has: {', '.join(names[:8])}): "
                         "name the text column with --calibration_field")
    col = pq.read_table(path, columns=[field]).column(field)
    docs = col.to_pylist()
    bad = next((d for d in docs if d is not None and not isinstance(d, str)), None)
    if bad is not None:
        raise ValueError(f"{path}: column {field!r} holds {type(bad).__name__} values, not "
                         "text: name the text column with --calibration_field")
    return [d for d in docs if d is not None]


def read_documents(path: str, field: str = "text") -> list:
    """The documents [str] of a .txt (one), .jsonl (one a line: its `field`) or .parquet
    (one a row: its `field` column) file, empty ones dropped; errors name the file."""
    if path.endswith(".jsonl"):
        docs = _jsonl_documents(path, field)
    elif path.endswith(".parquet"):
        docs = _parquet_documents(path, field)
    else:
        docs = [data.read_text(path)]
    docs = [d.strip() for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"{path} holds no text")
    return docs


def _tokenize(tokenizer, docs: list) -> np.ndarray:
    """Documents joined with SEPARATOR and tokenized in chunks of about CHUNK_CHARS
    characters (one encode call per chunk), the chunks joined with SEPARATOR's tokens."""
    sep = tokenizer.encode(SEPARATOR)
    parts, chunk, size = [], [], 0
    for d in docs + [None]:
        if chunk and (d is None or size + len(d) > CHUNK_CHARS):
            parts += [sep, tokenizer.encode(SEPARATOR.join(chunk))] if parts else [
                tokenizer.encode(SEPARATOR.join(chunk))]
            chunk, size = [], 0
        if d is not None:
            chunk.append(d)
            size += len(d) + len(SEPARATOR)
    return np.concatenate(parts).astype(np.int32)


def _shingles(text: str) -> set:
    w = text.split()
    return {" ".join(w[i:i + SHINGLE]) for i in range(len(w) - SHINGLE + 1)}


@functools.lru_cache(maxsize=1)
def _eval_shingles() -> frozenset:
    return frozenset(_shingles(data.eval_text("wiki")) | _shingles(data.eval_text("c4")))


@functools.lru_cache(maxsize=8)
def shipped_documents(name: str) -> Tuple[tuple, int]:
    """The paragraphs (split at blank lines) of shipped corpus `name` without the lines that
    hold part of a run of SHINGLE words also found in the evaluation texts (wiki test split,
    c4): (paragraphs, number of lines dropped)."""
    text = data.read_text(data.corpus_path(name))
    words = list(re.finditer(r"\S+", text))
    newlines = [m.start() for m in re.finditer("\n", text)]
    ev, bad = _eval_shingles(), set()
    for i in range(len(words) - SHINGLE + 1):
        run = words[i:i + SHINGLE]
        if " ".join(w.group() for w in run) in ev:
            bad.update(bisect.bisect_right(newlines, w.start()) for w in run)   # line numbers
    kept = "\n".join(ln for j, ln in enumerate(text.split("\n")) if j not in bad)
    paras = tuple(p.strip() for p in re.split(r"\n[ \t]*\n", kept) if p.strip())
    return paras, len(bad)


def source_tokens(tokenizer, source: Source, field: str = "text") -> np.ndarray:
    """The token stream (T,) int32 of a source: its files' tokens joined with SEPARATOR's
    (each file's tokenization cached by tokenizer, content and field)."""
    if source.shipped and source.files == ("wiki",):
        return data.calibration_tokens(tokenizer)       # the split, as the wiki sampler sees it
    streams = []
    for f in source.files:
        path = data.corpus_path(f) if source.shipped else f
        key = {"kind": "calib_file_tokens", "tok": tokenizer.ref, "sha256": file_sha256(path),
               "field": field if path.endswith((".jsonl", ".parquet")) else None,
               "drop_eval_overlap": f"lines-{SHINGLE}" if source.shipped else None}
        docs = ((lambda: list(shipped_documents(f)[0])) if source.shipped
                else (lambda: read_documents(path, field)))
        toks = data.cached_array(key, lambda: _tokenize(tokenizer, docs()), prefix="tokens_")
        streams += [tokenizer.encode(SEPARATOR), toks] if streams else [toks]
    return np.concatenate(streams).astype(np.int32)


# ------------------------------------------------------------------------------- placing

def requests(cfg) -> List[Request]:
    """The windows a RunConfig asks for: the Hessian windows, and the in-block and end-to-end
    fine-tuning windows when those stages run (seeds as in earlier releases)."""
    seed = cfg.settings.seed
    out = [Request("hessian", cfg.devset_size, cfg.ctx_size, seed)]
    if cfg.ft.epochs > 0:
        out.append(Request("ft", cfg.ft.train_size + cfg.ft.valid_size, cfg.ft.ctx_size, seed + 1))
    if cfg.e2e.epochs > 0:
        out.append(Request("e2e", cfg.e2e.train_size + cfg.e2e.valid_size, cfg.e2e.ctx_size,
                           seed + 2))
    return out


def split_counts(n: int, weights: Sequence[float]) -> List[int]:
    """n split in proportion to weights, rounded by largest remainder (ties: the earlier)."""
    w = np.asarray(weights, np.float64)
    raw = n * w / w.sum()
    base = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - base), kind="stable")
    base[order[:n - int(base.sum())]] += 1
    return [int(b) for b in base]


def _subtract(free: list, pieces: list) -> list:
    """Free intervals [(a, b)] minus the sorted, disjoint pieces inside them."""
    out, j = [], 0
    pieces = sorted(pieces)
    for a, b in free:
        cur = a
        while j < len(pieces) and pieces[j][0] < b:
            s, e = pieces[j]
            if s > cur:
                out.append((cur, s))
            cur = max(cur, e)
            j += 1
        if cur < b:
            out.append((cur, b))
    return out


def _place_pass(free: list, k: int, ctx: int, rng) -> Tuple[list, list]:
    """k windows of ctx tokens at uniformly random non-overlapping positions of the free
    tokens (read in order): ([pieces of each window: [(start, end)]], the new free list)."""
    lengths = np.array([b - a for a, b in free], np.int64)
    total = int(lengths.sum())
    slack = total - k * ctx
    # stars and bars: the k gaps before the windows are a uniform composition of <= slack
    c = np.sort(rng.choice(slack + k, size=k, replace=False))
    vstarts = c - np.arange(k) + np.arange(k) * ctx
    vend = np.cumsum(lengths)
    windows, used = [], []
    for v in vstarts:
        i, need, pieces = int(np.searchsorted(vend, v, side="right")), ctx, []
        v = int(v)
        while need:
            off = v - int(vend[i] - lengths[i])
            take = min(need, int(lengths[i]) - off)
            pieces.append((free[i][0] + off, free[i][0] + off + take))
            v, need, i = v + take, need - take, i + 1
        windows.append(pieces)
        used += pieces
    return windows, _subtract(free, used)


def place_windows(free: list, n_tokens: int, k: int, ctx: int, rng,
                  allow_repeats: bool) -> Tuple[list, list]:
    """k windows of ctx tokens among the free intervals of a stream of n_tokens, without
    overlap; with allow_repeats, further passes over the whole stream when the free tokens
    run out. Returns (pieces of each window in stream order, the free intervals left)."""
    windows = []
    while k:
        fits = sum(b - a for a, b in free) // ctx
        if not fits:
            if not allow_repeats or n_tokens < ctx:
                raise ValueError(f"no room for a window of {ctx} tokens")
            free = [(0, n_tokens)]                  # another pass over the whole stream
            continue
        got, free = _place_pass(free, min(k, fits), ctx, rng)
        windows += got
        k -= len(got)
    return windows, free


def coverage(pieces: list) -> Tuple[int, int]:
    """(distinct positions covered, the most times one position is covered) of intervals."""
    if not pieces:
        return 0, 0
    p = np.asarray(pieces, np.int64)
    pos = np.concatenate([p[:, 0], p[:, 1]])
    step = np.concatenate([np.ones(len(p), np.int64), -np.ones(len(p), np.int64)])
    order = np.lexsort((step, pos))                 # at a shared point: ends before starts
    pos, depth = pos[order], np.cumsum(step[order])
    seg = np.diff(pos)
    return int(seg[depth[:-1] > 0].sum()), int(depth.max())


# ------------------------------------------------------------------------------- the plan

@dataclasses.dataclass
class CalibrationPlan:
    """The calibration windows of a run. `identity`: what they depend on besides the
    requests and the seed (part of the run identity and, unless wiki, of the Hessian cache
    key); `stats`: the counts metrics.json reports."""

    kind: str
    identity: dict
    stats: dict
    tokenizer: object
    reqs: dict                                    # purpose -> Request
    streams: list = dataclasses.field(default_factory=list)    # the sources' token streams
    pieces: dict = dataclasses.field(default_factory=dict)     # purpose -> [(source, pieces)]

    def windows(self, purpose: str) -> np.ndarray:
        """(count, ctx) int32 windows of a request ("hessian", "ft", "e2e")."""
        r = self.reqs[purpose]
        if self.kind == "wiki":
            return data.calibration_windows(self.tokenizer, r.count, r.ctx, r.seed)
        return np.stack([np.concatenate([self.streams[s][a:b] for a, b in p])
                         for s, p in self.pieces[purpose]]).astype(np.int32)


def _too_many(what: str, reqs, counts, have: int, seq: str) -> ValueError:
    parts = [f"{c} {PURPOSES[r.purpose][0]} windows x {r.ctx}" for r, c in zip(reqs, counts) if c]
    need = sum(c * r.ctx for r, c in zip(reqs, counts))
    flags_ = ", ".join(PURPOSES[r.purpose][1] for r, c in zip(reqs, counts) if c)
    return ValueError(
        f"calibration: the run asks {what} for {need:,} tokens ({' + '.join(parts)}) but it "
        f"holds {have:,} distinct tokens (each would be used ~{need / max(have, 1):.1f} times): "
        f"{seq}ask for fewer windows ({flags_}), or pass --allow_repeats to reuse tokens")


def _wiki_plan(tokenizer, reqs: list, allow_repeats: bool) -> CalibrationPlan:
    n = len(data.calibration_tokens(tokenizer))
    need = sum(r.count * r.ctx for r in reqs)
    if need > n and not allow_repeats:
        raise _too_many("the wiki calibration split", reqs, [r.count for r in reqs], n,
                        "bring more text (--calibration_files=<RedPajama or other .jsonl/"
                        ".parquet/.txt>), ")
    pieces = [(int(s), int(s) + r.ctx) for r in reqs
              for s in data.wiki_window_starts(n, r.count, r.ctx, r.seed)]
    used, most = coverage(pieces)
    stats = {"source": "wiki", "distinct_tokens": n, "windows": {r.purpose: r.count for r in reqs},
             "tokens_used": need, "distinct_tokens_used": used, "max_uses_per_token": most,
             "sampling": "random offsets with replacement (windows may overlap)"}
    return CalibrationPlan("wiki", {"source": "wiki"}, stats, tokenizer,
                           {r.purpose: r for r in reqs})


def _sources(calib) -> Tuple[str, List[Source]]:
    if calib.files:
        return "files", parse_sources(calib.files)
    if calib.source == "mix":
        return "mix", [Source(name, (name,), w, shipped=True) for name, w in MIX]
    return "wiki", []


def _check_source(src: Source, n: int, share: float, reqs: list, mine: list,
                  allow_repeats: bool) -> None:
    """Raise when source `src` (n tokens) cannot hold its windows `mine` of the requests."""
    too_long = [r for r, c in zip(reqs, mine) if c and r.ctx > n]
    if too_long:
        raise ValueError(f"calibration: {src.name} holds {n:,} tokens, fewer than one window "
                         f"of {too_long[0].ctx}: bring more text or give it no weight")
    if sum(c * r.ctx for r, c in zip(reqs, mine)) > n and not allow_repeats:
        raise _too_many(f"of {src.name} (weight {share:.3f})", reqs, mine, n, "bring more text, ")


def _place_source(si: int, n: int, reqs: list, mine: list, seed: int,
                  allow_repeats: bool) -> Tuple[dict, dict]:
    """The windows of source si, request after request: ({purpose: [pieces]}, its counts)."""
    free, placed, used = [(0, n)], {}, []
    for pi, (r, k) in enumerate(zip(reqs, mine)):
        rng = np.random.default_rng([seed, pi, si])         # a request's own stream of choices
        placed[r.purpose], free = place_windows(free, n, k, r.ctx, rng, allow_repeats)
        used += [x for p in placed[r.purpose] for x in p]
    distinct, most = coverage(used)
    return placed, {"windows": {r.purpose: k for r, k in zip(reqs, mine)},
                    "tokens_used": sum(k * r.ctx for r, k in zip(reqs, mine)),
                    "distinct_tokens_used": distinct, "max_uses_per_token": most}


def _identity(kind: str, sources: list, field: str) -> dict:
    return {"source": kind, "placement": PLACEMENT,
            "drop_eval_overlap": f"lines-{SHINGLE}" if kind == "mix" else None,
            "field": field if kind == "files" else None,
            "sources": [{"weight": s.weight, "content": content_fingerprint(
                [data.corpus_path(f) for f in s.files] if s.shipped else s.files)}
                for s in sources]}


def make_plan(tokenizer, calib, reqs: Sequence[Request], seed: int) -> CalibrationPlan:
    """The calibration plan of settings `calib` (`settings.CalibrationSettings`: source,
    files, field, allow_repeats) for the requests; raises ValueError naming the counts and
    the fix when a source holds fewer distinct tokens than asked of it."""
    kind, sources = _sources(calib)
    reqs = list(reqs)
    if kind == "wiki":
        return _wiki_plan(tokenizer, reqs, calib.allow_repeats)
    streams = [source_tokens(tokenizer, s, calib.field) for s in sources]
    sizes = [len(t) for t in streams]
    weights = [s.weight if s.weight is not None else n for s, n in zip(sources, sizes)]
    shares = [w / sum(weights) for w in weights]
    counts = [split_counts(r.count, weights) for r in reqs]      # [request][source]
    mine = [[c[si] for c in counts] for si in range(len(sources))]
    for si, (src, n) in enumerate(zip(sources, sizes)):          # every check before placing
        _check_source(src, n, shares[si], reqs, mine[si], calib.allow_repeats)
    pieces = {r.purpose: [] for r in reqs}
    per_source = []
    for si, (src, n) in enumerate(zip(sources, sizes)):
        placed, st = _place_source(si, n, reqs, mine[si], seed, calib.allow_repeats)
        for r in reqs:
            pieces[r.purpose] += [(si, p) for p in placed[r.purpose]]
        per_source.append({"name": src.name, "files": len(src.files),
                           **({"lines_dropped_eval_overlap": shipped_documents(src.name)[1]}
                              if src.shipped and src.name != "wiki" else {}),
                           "weight": shares[si], "distinct_tokens": n, **st})
    for pi, r in enumerate(reqs):       # the sources' windows interleaved (train/valid mixed)
        order = np.random.default_rng([seed, pi, len(sources)]).permutation(len(pieces[r.purpose]))
        pieces[r.purpose] = [pieces[r.purpose][i] for i in order]
    stats = {"source": kind, "distinct_tokens": sum(sizes),
             "windows": {r.purpose: r.count for r in reqs},
             "tokens_used": sum(r.count * r.ctx for r in reqs),
             "distinct_tokens_used": sum(s["distinct_tokens_used"] for s in per_source),
             "max_uses_per_token": max(s["max_uses_per_token"] for s in per_source),
             "sampling": "no overlap" + (" (repeats allowed)" if calib.allow_repeats else ""),
             "sources": per_source}
    return CalibrationPlan(kind, _identity(kind, sources, calib.field), stats, tokenizer,
                           {r.purpose: r for r in reqs}, streams, pieces)
