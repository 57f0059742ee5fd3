"""Random Llama folders with a real model's shapes, for rehearsals and memory benchmarks
(`experiments/rehearse.py`, `experiments/bench_hessian_memory.py`). A helper module, not a
script."""
from __future__ import annotations

import json
import os
import zlib

import numpy as np

__all__ = ["SHAPES", "write_random_folder", "write_config", "write_tokenizer"]

SHAPES = {
    "llama2_7b": dict(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32,
                      vocab=32000, ctx=2048),
    "tiny": dict(hidden=64, intermediate=160, layers=4, heads=4, kv_heads=2, vocab=512, ctx=64),
}


def write_random_folder(path: str, shape: dict, layers: int = None, seed: int = 0) -> None:
    """A random Llama folder of `shape`'s dimensions: config.json, model-globals.safetensors
    and model-layer<i>.safetensors (bf16; weights N(0, 0.02^2), norms 1). Each tensor comes
    from a generator seeded by its name, so a folder of fewer layers has the same first ones."""
    import jax.numpy as jnp
    from safetensors.flax import save_file
    d, f, v = shape["hidden"], shape["intermediate"], shape["vocab"]
    layers = shape["layers"] if layers is None else layers
    os.makedirs(path, exist_ok=True)
    write_config(path, shape, layers)

    def rnd(name, shp):
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        return jnp.asarray(0.02 * rng.standard_normal(shp, dtype=np.float32), jnp.bfloat16)
    g = {n: rnd(n, (v, d)) for n in ("model.embed_tokens.weight", "lm_head.weight")}
    save_file(dict(g, **{"model.norm.weight": jnp.ones((d,), jnp.bfloat16)}),
              os.path.join(path, "model-globals.safetensors"))
    hd = d // shape["heads"]
    for i in range(layers):
        p = f"model.layers.{i}."
        t = {p + "input_layernorm.weight": jnp.ones((d,), jnp.bfloat16),
             p + "post_attention_layernorm.weight": jnp.ones((d,), jnp.bfloat16)}
        for n, rows in (("q_proj", d), ("k_proj", shape["kv_heads"] * hd),
                        ("v_proj", shape["kv_heads"] * hd), ("o_proj", d)):
            t[p + f"self_attn.{n}.weight"] = rnd(p + n, (rows, d))
        for n, shp in (("gate_proj", (f, d)), ("up_proj", (f, d)), ("down_proj", (d, f))):
            t[p + f"mlp.{n}.weight"] = rnd(p + n, shp)
        save_file(t, os.path.join(path, f"model-layer{i}.safetensors"))


def write_config(path: str, shape: dict, layers: int) -> None:
    cfg = {"model_type": "llama", "vocab_size": shape["vocab"], "hidden_size": shape["hidden"],
           "intermediate_size": shape["intermediate"], "num_hidden_layers": layers,
           "num_attention_heads": shape["heads"], "num_key_value_heads": shape["kv_heads"],
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
           "max_position_embeddings": 4096}
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(cfg, fh)


def write_tokenizer(path: str, vocab: int) -> None:
    """A byte-level BPE tokenizer of at most `vocab` ids, trained on the wiki calibration split
    (tokenizer.json + tokenizer_config.json for transformers' AutoTokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from quipjax.pipeline import data
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(data.calibration_text().split("\n\n"), trainer)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
                   "eos_token": "</s>"}, f)
