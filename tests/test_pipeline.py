import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from quipjax.models import loaders
from quipjax.pipeline import checkpoint as ckpt
from quipjax.pipeline import data, evaluate, hessians
from quipjax.pipeline.build import build_model
from quipjax.pipeline.run import open_job, quantize_model
from quipjax.pipeline.settings import QuantSettings, RunConfig

from helpers import TINY as SPEC, needs_smollm2, needs_text, quantized_in_memory


def test_hf_folder_loads_same_logits(tiny_hf):
    path, model = tiny_hf
    src = loaders.open_checkpoint(path)
    assert src.spec.num_layers == 3 and src.spec.num_kv_heads == 2
    loaded = loaders.load_model(src, jnp.float32)
    tok = np.random.default_rng(0).integers(0, SPEC.vocab_size, (1, 20))
    np.testing.assert_array_equal(np.asarray(loaded(jnp.asarray(tok))),
                                  np.asarray(model(jnp.asarray(tok))))
    ids = src.tokenizer.encode("the first time he was")
    assert ids.dtype == np.int32 and len(ids) == 5 and (ids > 0).all()


def test_missing_shard_and_not_a_model(tiny_hf, tmp_path):
    path, _ = tiny_hf
    import shutil
    bad = str(tmp_path / "bad")
    shutil.copytree(path, bad)
    os.remove(os.path.join(bad, "model-00002-of-00002.safetensors"))
    with pytest.raises(FileNotFoundError, match="missing"):
        loaders.open_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="config.json"):
        loaders.open_checkpoint(str(tmp_path))
    junk = tmp_path / "x.bin"
    junk.write_bytes(b"1234567")
    with pytest.raises(ValueError, match="neither"):
        loaders.open_checkpoint(str(junk))


def test_non_llama_gguf_rejected(tmp_path):
    import gguf
    path = str(tmp_path / "gpt2.gguf")
    w = gguf.GGUFWriter(path, "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="architecture 'gpt2'"):
        loaders.open_checkpoint(path)


def test_text_too_short(tiny_hf):
    path, _ = tiny_hf
    tok = loaders.open_checkpoint(path).tokenizer
    with pytest.raises(ValueError, match="too short"):
        data.text_windows(tok, "the first time", 64, name="tiny.txt")


@needs_text
def test_quantize_resume_reload_and_errors(tiny_hf, tmp_path, monkeypatch, run_killed):
    path, _ = tiny_hf
    monkeypatch.setenv("QUIPJAX_CACHE", str(tmp_path / "cache"))
    cfg = RunConfig(model=path, output_dir=str(tmp_path / "a"), settings=QuantSettings(seed=3),
                    devset_size=4, ctx_size=64, eval_ctx_size=64, eval_datasets=("c4",),
                    dtype="float32", batch_size=2)
    metrics = quantize_model(cfg, log=lambda *a: None)
    assert metrics["tokens"]["c4"] > 0 and metrics["ppl"]["quantized"]["c4"] > 1
    assert 2.0 < metrics["bits_per_weight"] < 3.0
    # one bits-per-weight definition: the groups' own accounting (QuantizedGroup.bits)
    bits = weights = 0
    for i in range(SPEC.num_layers):
        for g in ckpt.load_layer(cfg.output_dir, i)[0].values():
            bits += sum(g.bits().values())
            weights += g.ql.shape[0] * g.ql.shape[1]
    assert metrics["bits_per_weight"] == bits / weights
    assert metrics["bits_per_parameter_checkpoint"] > metrics["bits_per_weight"]  # f32 embeddings
    with open(os.path.join(cfg.output_dir, "metrics.json")) as f:
        saved = json.load(f)
    assert set(saved["seconds"]) >= {"fp_eval", "hessians", "quantize", "quantized_eval"}
    stages = set(saved["seconds"]) - {"total", "calibration_plan"}
    assert set(saved["peak_rss_gb"]) == stages                 # every timed stage's peak
    assert all(0.05 < v < 64 for v in saved["peak_rss_gb"].values()), saved["peak_rss_gb"]

    # a run killed after one layer resumes and ends with the same codes, also after its model
    # folder was moved, touched and given a README (the identity is the files' content)
    cfg_b = RunConfig(**{**cfg.__dict__, "output_dir": str(tmp_path / "b"), "evaluate": False})
    run_killed(quantize_model, cfg_b)
    assert ckpt.layer_done(cfg_b.output_dir, 0) and not ckpt.layer_done(cfg_b.output_dir, 1)
    moved = str(tmp_path / "moved_model")
    shutil.copytree(path, moved)
    os.utime(os.path.join(moved, "config.json"))
    with open(os.path.join(moved, "README.md"), "w") as f:
        f.write("notes")
    with open(os.path.join(cfg_b.output_dir, "my_notes.txt"), "w") as f:    # the user's file
        f.write("mine")
    quantize_model(RunConfig(**{**cfg_b.__dict__, "model": moved}), log=lambda *a: None)
    # stages.jsonl keeps the finished stages of both invocations (the killed one's quantize
    # stage never finished), metrics.json the last invocation's
    with open(os.path.join(cfg_b.output_dir, "stages.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    assert [r["stage"] for r in lines] == ["calibration_data", "hessians", "calibration_data",
                                           "hessians", "quantize"], lines
    assert all(r["seconds"] >= 0 and r["peak_rss_gb"] > 0.05 for r in lines)
    for i in range(SPEC.num_layers):
        ga, _, _ = ckpt.load_layer(cfg.output_dir, i)
        gb, _, _ = ckpt.load_layer(cfg_b.output_dir, i)
        for name in ga:
            np.testing.assert_array_equal(ga[name].ql.codes, gb[name].ql.codes)
            np.testing.assert_array_equal(ga[name].ql.SV, gb[name].ql.SV)

    # loading the checkpoint gives the logits of the in-memory quantized model, exactly
    mem = quantized_in_memory(path, str(tmp_path / "cache"), cfg.settings)
    disk = build_model(cfg.output_dir, dtype=jnp.float32)
    tok = jnp.asarray(np.random.default_rng(4).integers(0, SPEC.vocab_size, (2, 30)))
    np.testing.assert_array_equal(np.asarray(evaluate.forward_logits(mem, tok)),
                                  np.asarray(evaluate.forward_logits(disk, tok)))

    # other settings in the same output_dir are refused, saying what differs; --overwrite
    # replaces only what quipjax wrote
    other = RunConfig(**{**cfg_b.__dict__, "settings": QuantSettings(codebook="HI2", seed=3)})
    with pytest.raises(ValueError, match="settings.codebook: 'E8P12' -> 'HI2'"):
        quantize_model(other, log=lambda *a: None)
    assert ckpt.layer_done(cfg_b.output_dir, 2)                 # nothing was touched
    ckpt.read_meta(cfg_b.output_dir)
    open_job(RunConfig(**{**other.__dict__, "overwrite": True}), log=lambda *a: None).lock.release()
    assert sorted(os.listdir(cfg_b.output_dir)) == [".quipjax.lock", "my_notes.txt", "quipjax.json"]
    # a checkpoint from another format version, a truncated one, a missing one
    meta_path = os.path.join(cfg.output_dir, "quipjax.json")
    meta = json.load(open(meta_path))
    json.dump(dict(meta, format_version=99), open(meta_path, "w"))
    with pytest.raises(ValueError, match="version"):
        ckpt.read_meta(cfg.output_dir)
    json.dump(meta, open(meta_path, "w"))
    os.remove(os.path.join(cfg.output_dir, "layers", "layer_002.json"))
    with pytest.raises(FileNotFoundError, match="truncated"):
        build_model(cfg.output_dir, dtype=jnp.float32)
    with pytest.raises(FileNotFoundError, match="not a quipjax checkpoint"):
        ckpt.read_meta(str(tmp_path / "nothing"))


@needs_smollm2
@needs_text
def test_real_smollm2_first_windows(tmp_path, monkeypatch):
    # the shipped GGUF, un-permuted Q/K and the GGUF tokenizer: a wrong layout gives 200-300
    monkeypatch.setenv("QUIPJAX_CACHE", str(tmp_path))
    src = loaders.open_checkpoint(None)
    assert src.spec.num_layers == 30 and src.spec.tie_embeddings
    text = "The quick brown fox jumps over the lazy dog in 2024."
    assert src.tokenizer.decode(src.tokenizer.encode(text)) == text
    w = data.eval_windows(src.tokenizer, "wiki")
    assert w.shape == (22, 2048)
    model = loaders.load_model(src, jnp.bfloat16)
    r = evaluate.perplexity(model, w[:2])
    assert 7.0 < r["ppl"] < 11.0, r   # float32 gives 10.377 on these two windows


def test_hessian_collection_resumes_identically(tiny_hf, tmp_path, monkeypatch):
    path, _ = tiny_hf
    src = loaders.open_checkpoint(path)
    windows = np.random.default_rng(5).integers(0, SPEC.vocab_size, (3, 32)).astype(np.int32)
    clean = str(tmp_path / "clean")
    hessians.collect_hessians(src, windows, clean, dtype=jnp.float32, batch=2)
    real_save = hessians.save_npz
    calls = {"n": 0}

    def dying(*a, **k):
        if calls["n"] == 1:
            raise KeyboardInterrupt("killed")
        calls["n"] += 1
        return real_save(*a, **k)

    cut = str(tmp_path / "cut")
    monkeypatch.setattr(hessians, "save_npz", dying)
    with pytest.raises(KeyboardInterrupt):
        hessians.collect_hessians(src, windows, cut, dtype=jnp.float32, batch=2)
    monkeypatch.setattr(hessians, "save_npz", real_save)
    assert os.path.exists(hessians.layer_file(cut, 0)) and not os.path.exists(hessians.layer_file(cut, 1))
    hessians.collect_hessians(src, windows, cut, dtype=jnp.float32, batch=2)
    for i in range(SPEC.num_layers):
        a, b = hessians.load_layer_hessians(clean, i), hessians.load_layer_hessians(cut, i)
        assert set(a) == {"qkv", "o", "up", "down"}
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert not os.path.exists(os.path.join(cut, "acts"))   # activations cleaned up


def test_hessians_killed_after_a_layer_is_saved_leave_no_activations(tiny_hf, tmp_path,
                                                                     monkeypatch):
    """A kill between saving a layer's Hessians and removing its input activations used to
    leave that activation file behind for good."""
    path, _ = tiny_hf
    src = loaders.open_checkpoint(path)
    windows = np.random.default_rng(6).integers(0, SPEC.vocab_size, (3, 32)).astype(np.int32)
    real_save = hessians.save_npz

    def save_then_die(p, **arrays):
        real_save(p, **arrays)
        if p.endswith("layer_001.npz"):
            raise KeyboardInterrupt("killed")

    out = str(tmp_path / "h")
    monkeypatch.setattr(hessians, "save_npz", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        hessians.collect_hessians(src, windows, out, dtype=jnp.float32)
    monkeypatch.setattr(hessians, "save_npz", real_save)
    assert os.path.exists(os.path.join(out, "acts", "acts_001.npy"))
    hessians.collect_hessians(src, windows, out, dtype=jnp.float32)
    assert all(os.path.exists(hessians.layer_file(out, i)) for i in range(SPEC.num_layers))
    assert not os.path.exists(os.path.join(out, "acts"))


@needs_text
def test_hessian_cache_is_keyed_by_batch_size(tiny_hf, tmp_path, monkeypatch):
    """Hessians depend on the windows per forward pass in their last bits (the matmul row
    blocks differ), so runs with other batch sizes must not share a cache entry."""
    from quipjax.pipeline import run
    path, _ = tiny_hf
    cache = tmp_path / "cache"
    monkeypatch.setenv("QUIPJAX_CACHE", str(cache))
    base = dict(model=path, settings=QuantSettings(seed=2), devset_size=4, ctx_size=64,
                dtype="float32", evaluate=False)
    hdirs = {}
    for b in (1, 2):
        job = run.open_job(RunConfig(output_dir=str(tmp_path / f"b{b}"), batch_size=b, **base),
                           log=lambda *a: None)
        hdirs[b] = run.hessian_stage(job)
        assert ckpt.read_meta(job.out)["hessian_batch"] == b
    assert hdirs[1] != hdirs[2] and sorted(os.listdir(cache / "hessians")) == sorted(
        os.path.basename(d) for d in hdirs.values())
    src = loaders.open_checkpoint(path)
    windows = data.calibration_windows(src.tokenizer, 4, 64, 2)
    direct = str(tmp_path / "direct")
    hessians.collect_hessians(src, windows, direct, dtype=jnp.float32, batch=2)
    for b, same in ((1, False), (2, True)):
        assert np.array_equal(hessians.load_layer_hessians(hdirs[b], 1)["up"],
                              hessians.load_layer_hessians(direct, 1)["up"]) == same


def test_config_loader_errors_are_not_swallowed(tiny_hf, tmp_path, monkeypatch):
    path, _ = tiny_hf
    import transformers

    def broken(*a, **k):
        raise RuntimeError("a bug in the config loader")
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", broken)
    with pytest.raises(RuntimeError, match="a bug in the config loader"):
        loaders.open_checkpoint(path)
    monkeypatch.undo()
    # a model type transformers does not know is read from config.json as written
    import shutil
    other = str(tmp_path / "other")
    shutil.copytree(path, other)
    cfg = json.load(open(os.path.join(other, "config.json")))
    json.dump(dict(cfg, model_type="not-a-model"), open(os.path.join(other, "config.json"), "w"))
    with pytest.raises(ValueError, match="model_type .not-a-model. is not supported; quipjax runs"):
        loaders.open_checkpoint(other)
    json.dump(cfg, open(os.path.join(other, "config.json"), "w"))
    with open(os.path.join(other, "config.json"), "a") as f:
        f.write("}")
    with pytest.raises(ValueError, match="not valid JSON"):
        loaders.open_checkpoint(other)


def test_build_model_fails_clearly_on_missing_or_unknown_parameters(tmp_path):
    from helpers import write_tiny_checkpoint
    path = str(tmp_path / "c")
    write_tiny_checkpoint(path)
    groups, norms, info = ckpt.load_layer(path, 1)
    for kind in ("dequantized", "tunable", "codes"):
        build_model(path, linears=kind, dtype=jnp.float32)          # the intact checkpoint
    bad = {k: v for k, v in norms.items() if k != "post_attention_layernorm.weight"}
    ckpt.save_layer(path, 1, groups, bad, info)
    with pytest.raises(ValueError, match=r"layer 1 .* lacks the parameters \['post_attention"):
        build_model(path, dtype=jnp.float32)
    ckpt.save_layer(path, 1, groups, dict(norms, **{"mlp.extra.weight": norms[
        "post_attention_layernorm.weight"]}), info)
    with pytest.raises(ValueError, match="layer 1 .* no parameter mlp.extra.weight"):
        build_model(path, dtype=jnp.float32)
    partial = {k: g for k, g in groups.items() if k != "down"}
    ckpt.save_layer(path, 1, partial, norms, info)
    for kind in ("dequantized", "tunable", "codes"):
        with pytest.raises(ValueError, match=r"layer 1 .* lacks \['mlp.down_proj'\]"):
            build_model(path, linears=kind, dtype=jnp.float32)


def test_checkpoint_written_before_the_redesign_loads_and_evaluates():
    """tests/data/checkpoint_v2_tiny was written by quipjax 6da1341 (before the layered
    package; `make_hf_folder` model, seed 3, float32), and its logits on fixed tokens were
    computed there (`build_quantized_model` + `evaluate.forward_logits`)."""
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
    path = os.path.join(here, "checkpoint_v2_tiny")
    want = np.load(os.path.join(here, "checkpoint_v2_tiny_logits.npy"))
    tok = np.random.default_rng(0).integers(0, 64, (2, 24)).astype(np.int32)
    got = np.asarray(evaluate.forward_logits(build_model(path, dtype=jnp.float32), tok))
    # The reference was computed on a 2-core Intel Xeon (AVX-512). XLA's CPU matmuls sum in an
    # order that depends on the instruction set, so another CPU (an AVX2 AMD EPYC here) agrees
    # only to float32 rounding of those sums: 9.1e-6 at a logit scale of 6.2 (1.5e-6 of it).
    # Any change in what is computed (a scale, a sign, a permutation) moves logits by O(1).
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(got, want, rtol=0, atol=5e-6 * scale)
    r = evaluate.perplexity(build_model(path, dtype=jnp.float32), tok)
    # the old code's value 290.0819188611838 (AMD EPYC: 290.0818226373126, 3.3e-7 apart)
    assert r["ppl"] == pytest.approx(290.0819188611838, rel=2e-6) and r["tokens"] == 2 * 23
    codes = build_model(path, linears="codes", backend="xla", dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(evaluate.forward_logits(codes, tok)), want,
                               rtol=1e-4, atol=1e-4)


def test_streamed_perplexity_is_the_in_memory_float(tiny_hf, tiny_ckpt):
    """A pass that loads one block at a time (layer-major over chunks of windows) gives the
    very float of the model-in-memory pass, for the FP model and a quantized checkpoint."""
    from quipjax.models.assemble import abstract_paths
    from quipjax.pipeline.build import build_model_streamed
    path, _ = tiny_hf
    src = loaders.open_checkpoint(path)
    w = np.random.default_rng(7).integers(0, SPEC.vocab_size, (5, 24)).astype(np.int32)
    want = evaluate.perplexity(loaders.load_model(src, jnp.float32), w)
    skeleton, stream = loaders.load_model_streamed(src, jnp.float32)
    assert abstract_paths(skeleton) and all(p.startswith("layers.") for p in abstract_paths(skeleton))
    calls, seen = [], []

    def counted(i, load):
        def f():
            calls.append(i)
            return load()
        return f
    # 24 x 16 x 4 bytes per window: a budget of two windows makes three chunks
    budget = 2 * 24 * SPEC.hidden_size * 4 / 2 ** 30
    got = evaluate.perplexity(skeleton, w, stream=[counted(i, f) for i, f in enumerate(stream)],
                              stream_gb=budget, progress=lambda d, t, p: seen.append((d, t, p)))
    assert got["ppl"] == want["ppl"] and got["tokens"] == want["tokens"]
    L = SPEC.num_layers
    assert calls == list(range(L)) * 3                  # each block loaded once per chunk
    assert seen[-1][:2] == (5 * L, 5 * L) and seen[-1][2] == want["ppl"]
    ck, _ = tiny_ckpt
    want = evaluate.perplexity(build_model(ck, dtype=jnp.float32), w)
    skeleton, stream = build_model_streamed(ck, dtype=jnp.float32)
    assert evaluate.perplexity(skeleton, w, stream=stream)["ppl"] == want["ppl"]
