"""Calibration text users bring (--calibration_files), the shipped mix and the window plan:
file reading, globs and weights, windows without overlap (checked token by token),
determinism, the too-many-windows check, and the default wiki windows of earlier releases."""
import dataclasses
import hashlib
import importlib.util
import json
import os

import numpy as np
import pytest
from absl import flags

from quipjax.models import loaders
from quipjax.pipeline import calibration, data
from quipjax.pipeline.run import hessian_key, open_job
from quipjax.pipeline.settings import CalibrationSettings, RunConfig

from helpers import HAS_TEXT, needs_text

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments", "configs")
WORDS = "the of and in to a is was for on as with by he at from his that it an were are".split()


class ByteTokenizer:
    """One token per byte (ids 0..255): token counts are byte counts, tokenizing is free."""

    ref = {"kind": "bytes", "path": ""}

    def encode(self, text):
        return np.frombuffer(text.encode(), np.uint8).astype(np.int32)


def _words(n, seed):
    return " ".join(np.random.default_rng(seed).choice(WORDS, n))


def _uses(plan, purposes, n_sources):
    """How often each token of each source stream is in a window, counted directly."""
    uses = [np.zeros(len(plan.streams[s]), np.int32) for s in range(n_sources)]
    for p in purposes:
        for s, pieces in plan.pieces[p]:
            for a, b in pieces:
                uses[s][a:b] += 1
    return uses


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache directory for the module: the wiki split is tokenized once."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QUIPJAX_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield


@pytest.fixture
def files(tmp_path):
    """a.jsonl (40 documents in "text", 30 in "body"), b/1.txt and b/2.txt."""
    with open(tmp_path / "a.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"text": _words(50, i), "body": "x", "id": i}) + "\n")
        f.write("\n")                                       # blank lines are skipped
    os.makedirs(tmp_path / "b")
    for i in (1, 2):
        (tmp_path / "b" / f"{i}.txt").write_text(_words(800, 100 + i))
    return tmp_path


def test_reads_txt_jsonl_globs_and_weights(files, cache, tiny_hf):
    srcs = calibration.parse_sources([f"{files}/a.jsonl:0.7", f"{files}/b/*.txt:0.3"])
    assert [s.weight for s in srcs] == [0.7, 0.3]
    assert srcs[1].files == (f"{files}/b/1.txt", f"{files}/b/2.txt")       # sorted glob
    docs = calibration.read_documents(f"{files}/a.jsonl")
    assert len(docs) == 40 and docs[3] == _words(50, 3)
    assert calibration.read_documents(f"{files}/a.jsonl", "body") == ["x"] * 40
    tok = loaders.open_checkpoint(tiny_hf[0]).tokenizer
    stream = calibration.source_tokens(tok, srcs[1])
    sep = tok.encode("\n\n")               # the word-level tokenizer drops newlines: no tokens
    assert len(stream) == 1600 + len(sep)
    np.testing.assert_array_equal(stream[:800], tok.encode(_words(800, 101)))
    calib = CalibrationSettings(files=(f"{files}/a.jsonl:0.7", f"{files}/b/*.txt:0.3"))
    plan = calibration.make_plan(tok, calib, [calibration.Request("hessian", 10, 64, 0)], 0)
    assert [s["windows"]["hessian"] for s in plan.stats["sources"]] == [7, 3]
    assert plan.stats["distinct_tokens"] == 2000 + 1600 + len(sep)
    assert plan.stats["max_uses_per_token"] == 1 and plan.stats["distinct_tokens_used"] == 640
    # no weights: in proportion to the tokens (2000 : 1600)
    plan = calibration.make_plan(tok, dataclasses.replace(calib, files=(
        f"{files}/a.jsonl", f"{files}/b/*.txt")), [calibration.Request("hessian", 9, 64, 0)], 0)
    assert [s["windows"]["hessian"] for s in plan.stats["sources"]] == [5, 4]


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="the .parquet reader needs pyarrow, an optional extra: pip install -e '.[parquet]'")
def test_reads_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"content": ["one doc", None, "two docs"], "n": [1, 2, 3]}),
                   tmp_path / "d.parquet")
    assert calibration.read_documents(str(tmp_path / "d.parquet"), "content") == ["one doc",
                                                                                  "two docs"]
    with pytest.raises(ValueError, match="no column 'text' .*content, n.*--calibration_field"):
        calibration.read_documents(str(tmp_path / "d.parquet"))
    with pytest.raises(ValueError, match="holds int values, not text"):
        calibration.read_documents(str(tmp_path / "d.parquet"), "n")


@pytest.mark.parametrize("specs,exc,match", [
    (["{d}/a.jsonl:-1"], ValueError, "weight of .*a.jsonl must be a positive number"),
    (["{d}/nothing/*.txt"], FileNotFoundError, "matches no file"),
    (["{d}/missing.txt"], FileNotFoundError, "missing.txt does not exist"),
    (["{d}/b"], IsADirectoryError, "b is a directory: use a glob, e.g. .*b/\\*.jsonl"),
    (["{d}/a.jsonl:0.5", "{d}/b/*.txt"], ValueError, "give a weight to every entry"),
    (["{d}/b/*.txt", "{d}/b/1.txt"], ValueError, "1.txt is matched by both"),
    (["{d}/c.csv"], ValueError, "c.csv is not one of .txt, .jsonl, .parquet"),
])
def test_bad_calibration_files(files, specs, exc, match):
    (files / "c.csv").write_text("a,b")
    with pytest.raises(exc, match=match):
        calibration.parse_sources([s.format(d=files) for s in specs])


def test_bad_documents(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"title": "t", "body": "b"}\n')
    with pytest.raises(ValueError, match=r"a.jsonl line 2 has no field 'text' \(it has: title, "
                                         r"body\): name the text field with --calibration_field"):
        calibration.read_documents(str(tmp_path / "a.jsonl"))
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match="b.jsonl line 2 is not a JSON object"):
        calibration.read_documents(str(tmp_path / "b.jsonl"))
    (tmp_path / "c.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(ValueError, match="field 'text' is a int, not text"):
        calibration.read_documents(str(tmp_path / "c.jsonl"))
    (tmp_path / "e.txt").write_text("  \n")
    with pytest.raises(ValueError, match="e.txt holds no text"):
        calibration.read_documents(str(tmp_path / "e.txt"))
    if importlib.util.find_spec("pyarrow") is None:          # said clearly, not an ImportError
        (tmp_path / "p.parquet").write_bytes(b"PAR1")
        with pytest.raises(ValueError, match="needs pyarrow .*or convert it to .jsonl"):
            calibration.read_documents(str(tmp_path / "p.parquet"))
    with pytest.raises(ValueError, match="--calibration=mix and --calibration_files exclude"):
        CalibrationSettings(source="mix", files=(str(tmp_path / "e.txt"),)).check()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_placement_never_reuses_a_token(seed):
    """Requests of several sizes placed one after the other: every token index at most once,
    each window contiguous in the free tokens, and a request that fills the stream exactly."""
    rng = np.random.default_rng(seed)
    n = 5000
    free, uses = [(0, n)], np.zeros(n, np.int32)
    for k, ctx in ((20, 64), (7, 100), (3, 333)):
        got, free = calibration.place_windows(free, n, k, ctx, rng, allow_repeats=False)
        assert len(got) == k
        for pieces in got:
            assert sum(b - a for a, b in pieces) == ctx
            for a, b in pieces:
                uses[a:b] += 1
    assert uses.max() == 1 and uses.sum() == 20 * 64 + 700 + 999
    assert sum(b - a for a, b in free) == n - uses.sum()
    assert calibration.coverage([p for w in got for p in w]) == (999, 1)
    left = sum(b - a for a, b in free)
    got, free = calibration.place_windows(free, n, 1, left, rng, allow_repeats=False)
    assert free == [] and sum(b - a for a, b in got[0]) == left
    with pytest.raises(ValueError, match="no room"):
        calibration.place_windows(free, n, 1, 10, rng, allow_repeats=False)
    # --allow_repeats: further passes over the whole stream, each token at most twice here
    got, _ = calibration.place_windows([(0, n)], n, 60, 128, rng, allow_repeats=True)
    assert calibration.coverage([p for w in got for p in w])[1] == 2


def test_plan_is_deterministic_and_windows_are_the_tokens(files, cache, tiny_hf):
    tok = loaders.open_checkpoint(tiny_hf[0]).tokenizer
    calib = CalibrationSettings(files=(f"{files}/a.jsonl:0.5", f"{files}/b/*.txt:0.5"))
    reqs = [calibration.Request("hessian", 12, 64, 0), calibration.Request("ft", 6, 32, 1),
            calibration.Request("e2e", 4, 48, 2)]
    a = calibration.make_plan(tok, calib, reqs, 0)
    b = calibration.make_plan(tok, calib, reqs, 0)
    c = calibration.make_plan(tok, calib, reqs, 1)
    for p in ("hessian", "ft", "e2e"):
        np.testing.assert_array_equal(a.windows(p), b.windows(p))
        assert a.windows(p).shape == (reqs[["hessian", "ft", "e2e"].index(p)].count,
                                      reqs[["hessian", "ft", "e2e"].index(p)].ctx)
    assert not np.array_equal(a.windows("hessian"), c.windows("hessian"))
    assert all(u.max() <= 1 for u in _uses(a, ("hessian", "ft", "e2e"), 2))
    for (s, pieces), w in zip(a.pieces["ft"], a.windows("ft")):
        np.testing.assert_array_equal(np.concatenate([a.streams[s][x:y] for x, y in pieces]), w)
    # the Hessian windows do not depend on the fine-tuning requests (the Hessian cache key
    # leaves those out)
    only = calibration.make_plan(tok, calib, reqs[:1], 0)
    np.testing.assert_array_equal(only.windows("hessian"), a.windows("hessian"))
    assert a.identity == only.identity == c.identity      # the seed is a setting of its own


def test_too_many_windows_names_counts_and_fix(files, cache, tiny_hf):
    tok = loaders.open_checkpoint(tiny_hf[0]).tokenizer
    calib = CalibrationSettings(files=(f"{files}/b/*.txt",))
    reqs = [calibration.Request("hessian", 20, 64, 0), calibration.Request("ft", 10, 64, 1)]
    with pytest.raises(ValueError, match=r"asks of .*b/\*.txt \(weight 1.000\) for 1,920 tokens "
                       r"\(20 Hessian windows x 64 \+ 10 in-block fine-tuning windows x 64\) "
                       r"but it holds 1,600 distinct tokens .*--devset_size x --ctx_size, "
                       r"--ft_train_size.*--allow_repeats"):
        calibration.make_plan(tok, calib, reqs, 0)
    plan = calibration.make_plan(tok, dataclasses.replace(calib, allow_repeats=True), reqs, 0)
    assert plan.stats["max_uses_per_token"] == 2 and plan.stats["tokens_used"] == 1920
    with pytest.raises(ValueError, match="holds 1,600 tokens, fewer than one window of 2048"):
        calibration.make_plan(tok, calib, [calibration.Request("hessian", 1, 2048, 0)], 0)


# the wiki windows of the code before --calibration existed (commit 538d654), tiny tokenizer
WIKI_BEFORE = {(8, 64, 0): "4b3ba86f509be13a6e48408a4d587520ca227d7a8190046e033eb345706c1e96",
               (5, 32, 3): "5a50edb05ef251b0543cd12dfc972036311d3c498e3bf76d9f8aab90df04e69d"}


@needs_text
def test_default_wiki_windows_unchanged(cache, tiny_hf):
    tok = loaders.open_checkpoint(tiny_hf[0]).tokenizer
    ids = tok.encode(data.calibration_text())
    assert len(ids) == len(data.calibration_tokens(tok)) == 322605
    for (devset, ctx, seed), digest in WIKI_BEFORE.items():
        plan = calibration.make_plan(tok, CalibrationSettings(),
                                     [calibration.Request("hessian", devset, ctx, seed)], seed)
        w = plan.windows("hessian")
        assert hashlib.sha256(w.tobytes()).hexdigest() == digest
        # ... which is the old sampler: seeded offsets with replacement over the split
        starts = np.random.default_rng(seed).integers(0, len(ids) - ctx + 1, size=devset)
        np.testing.assert_array_equal(w, np.stack([ids[s:s + ctx] for s in starts]))
    assert plan.identity == {"source": "wiki"} and plan.stats["distinct_tokens"] == 322605
    with pytest.raises(ValueError, match=r"wiki calibration split for 327,680 tokens \(5120 "
                                         r"Hessian windows x 64\) but it holds 322,605 .*"
                                         r"--calibration_files=.*--allow_repeats"):
        calibration.make_plan(tok, CalibrationSettings(),
                              [calibration.Request("hessian", 5120, 64, 0)], 0)


def _flagfile_config(argv):
    fv = flags.FlagValues()
    RunConfig.define_flags(fv)
    fv(["prog"] + argv)
    return RunConfig.from_flags(fv)


def test_llama7b_shaped_plan_uses_each_token_once(tmp_path, cache):
    """The Llama-2-7B flagfile (6144 x 2048 Hessian, 384 x 4096 in-block and 384 x 4096
    end-to-end windows: 15.7M tokens) on 16 MB of the user's text, one token a byte."""
    os.makedirs(tmp_path / "text")
    rng = np.random.default_rng(0)
    for i in range(4):
        (tmp_path / "text" / f"part{i}.txt").write_bytes(
            rng.integers(97, 123, 4_000_000, dtype=np.uint8).tobytes())
    cfg = _flagfile_config([f"--flagfile={CONFIGS}/llama7b_2bit.cfg", "--noallow_repeats",
                            f"--calibration_files={tmp_path}/text/*.txt"])
    reqs = calibration.requests(cfg)
    assert [(r.purpose, r.count, r.ctx) for r in reqs] == [
        ("hessian", 6144, 2048), ("ft", 384, 4096), ("e2e", 384, 4096)]
    plan = calibration.make_plan(ByteTokenizer(), cfg.calibration, reqs, cfg.settings.seed)
    assert plan.windows("hessian").shape == (6144, 2048)
    assert plan.stats["distinct_tokens"] == 16_000_006            # 4 files + 3 separators
    assert plan.stats["tokens_used"] == plan.stats["distinct_tokens_used"] == 15_728_640
    assert _uses(plan, ("hessian", "ft", "e2e"), 1)[0].max() == 1
    cut = _flagfile_config([f"--flagfile={CONFIGS}/llama7b_2bit.cfg", "--noallow_repeats",
                            f"--calibration_files={tmp_path}/text/part[01].txt"])
    with pytest.raises(ValueError, match="for 15,728,640 tokens .* holds 8,000,002 distinct"):
        calibration.make_plan(ByteTokenizer(), cut.calibration, reqs, cut.settings.seed)


def test_identity_and_hessian_key_follow_the_files(files, cache, tiny_hf, tmp_path):
    base = RunConfig(model=tiny_hf[0], devset_size=4, ctx_size=64, evaluate=False,
                     calibration=CalibrationSettings(files=(f"{files}/a.jsonl:0.7",
                                                            f"{files}/b/*.txt:0.3")))

    def job_of(cfg, out):
        job = open_job(dataclasses.replace(cfg, output_dir=str(tmp_path / "runs" / out)), log=lambda *a: None)
        job.lock.release()
        return job
    a = job_of(base, "a")
    assert a.want["calibration"]["source"] == "files"
    assert a.metrics["calibration"]["windows"] == {"hessian": 4}
    assert hessian_key(a)["calibration"] == a.want["calibration"]
    w = dataclasses.replace(base, calibration=dataclasses.replace(
        base.calibration, files=(f"{files}/a.jsonl:0.5", f"{files}/b/*.txt:0.5")))
    assert job_of(w, "w").want["calibration"] != a.want["calibration"]
    (files / "b" / "2.txt").write_text(_words(800, 7))               # other content
    b = job_of(base, "b")
    assert b.want["calibration"] != a.want["calibration"] and hessian_key(b) != hessian_key(a)
    with pytest.raises(ValueError, match="holds a run with other settings .*calibration.sources"):
        job_of(base, "a")
    if not HAS_TEXT:
        return
    wiki = job_of(RunConfig(model=tiny_hf[0], devset_size=4, ctx_size=64, evaluate=False), "c")
    assert wiki.want["calibration"] == {"source": "wiki"} and "calibration" not in hessian_key(wiki)


@needs_text
def test_mix_weights_no_reuse_and_no_evaluation_text(cache, tiny_hf):
    tok = loaders.open_checkpoint(tiny_hf[0]).tokenizer
    reqs = [calibration.Request("hessian", 40, 256, 0), calibration.Request("e2e", 20, 128, 2)]
    plan = calibration.make_plan(tok, CalibrationSettings(source="mix"), reqs, 0)
    src = plan.stats["sources"]
    assert [s["name"] for s in src] == [n for n, _ in calibration.MIX]
    assert [s["windows"]["hessian"] for s in src] == [18, 8, 6, 4, 4]     # 0.45/0.2/0.15/0.1/0.1
    assert all(u.max() <= 1 for u in _uses(plan, ("hessian", "e2e"), len(src)))
    assert src[0]["distinct_tokens"] == len(data.calibration_tokens(tok))  # the wiki split itself
    # technical.utf8 quotes a C4 paragraph, multilingual.utf8 a C4 table row: those lines go
    evaluation = calibration._eval_shingles()
    for name in ("technical", "multilingual", "code", "tiny"):
        paras, dropped = calibration.shipped_documents(name)
        assert dropped == {"technical": 1, "multilingual": 2}.get(name, 0)
        assert not calibration._shingles("\n\n".join(paras)) & evaluation
    assert plan.identity["source"] == "mix" and len(plan.identity["sources"]) == 5


def test_a_run_on_files_reports_its_calibration(files, cache, tiny_hf, tmp_path):
    """The whole job on the tiny model with --calibration_files: Hessians from the planned
    windows (a cache entry of their own), metrics.json reporting the counts."""
    from quipjax.pipeline.run import quantize_model
    cfg = RunConfig(model=tiny_hf[0], output_dir=str(tmp_path / "run"), devset_size=4,
                    ctx_size=64, evaluate=False, dtype="float32",
                    calibration=CalibrationSettings(files=(f"{files}/a.jsonl:0.5",
                                                           f"{files}/b/*.txt:0.5")))
    metrics = quantize_model(cfg, log=lambda *a: None)
    with open(tmp_path / "run" / "metrics.json") as f:
        saved = json.load(f)["calibration"]
    assert saved == metrics["calibration"]
    assert saved["distinct_tokens"] == 3600 and saved["tokens_used"] == 256
    assert saved["distinct_tokens_used"] == 256 and saved["max_uses_per_token"] == 1
    assert [s["windows"]["hessian"] for s in saved["sources"]] == [2, 2]
    hdirs = os.listdir(os.path.join(os.environ["QUIPJAX_CACHE"], "hessians"))
    job = open_job(cfg, log=lambda *a: None)             # resumes the finished run
    job.lock.release()
    assert hashlib.sha256(json.dumps(hessian_key(job), sort_keys=True).encode()).hexdigest()[
        :16] in hdirs and "calibration" in hessian_key(job)
