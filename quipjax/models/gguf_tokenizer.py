"""SentencePiece-style tokenizers (GGUF `tokenizer.ggml.model` = "llama": Gemma, Llama 2, ...)
built from the metadata fields of a GGUF file, and a fast reader of those fields.

    meta = gguf_metadata(path)                         # {key: value}, numpy + struct only
    tok = sentencepiece_from_gguf(lambda k, d=KeyError: ...)   # any field(key, default) getter
    ids = tok.encode("text")                           # no BOS / special tokens added
    text = tok.decode(ids)

The vocabulary (tokens, scores, token types, byte fallback <0x..> pieces) goes through
transformers' own GGUF converter (`convert_gguf_tokenizer`, called directly: its
AutoTokenizer(gguf_file=) route imports torch). For Gemma files that converter rebuilds the
merges from the token order (Gemma's scores do not follow its merge order) and respells the
all-space tokens; control tokens (type 3) become special tokens.
"""
from __future__ import annotations

import os
import struct
from typing import Callable, NamedTuple, Optional

import numpy as np

# transformers prints an advisory about PyTorch on import; only its tokenizers are used
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__all__ = ["GGUFTokenizer", "sentencepiece_from_gguf", "gguf_metadata", "TOKENIZER_FIELDS"]

# GGUF metadata key (after "tokenizer.ggml.") -> transformers' tokenizer_dict key
TOKENIZER_FIELDS = {"model": "tokenizer_type", "pre": "pre_tokenizer_type", "tokens": "tokens",
                    "scores": "scores", "token_type": "token_type", "merges": "merges",
                    "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
                    "unknown_token_id": "unk_token_id", "padding_token_id": "pad_token_id",
                    "add_space_prefix": "add_prefix_space"}


class GGUFTokenizer(NamedTuple):
    """encode(text) -> list of int ids (no special tokens added); decode(ids) -> text;
    `backend`: the `tokenizers.Tokenizer`."""

    encode: Callable
    decode: Callable
    bos_id: Optional[int]
    eos_id: Optional[int]
    backend: object


def sentencepiece_from_gguf(field: Callable) -> GGUFTokenizer:
    """The tokenizer of a GGUF file with tokenizer.ggml.model "llama" from its metadata getter
    field(key, default) (as `GGUFFile.field`, or `gguf_metadata(path).get`)."""
    kind = field("tokenizer.ggml.model", None)
    if kind != "llama":
        raise ValueError(f"GGUF tokenizer model {kind!r}: this builder reads SentencePiece-style "
                         "('llama') vocabularies; 'gpt2' (byte-level BPE) files have their own")
    arch = field("general.architecture", "llama")
    tdict = {}
    for key, name in TOKENIZER_FIELDS.items():
        value = field(f"tokenizer.ggml.{key}", None)
        if value is not None:
            tdict[name] = list(value) if isinstance(value, (list, tuple, np.ndarray)) else value
    if "tokens" not in tdict:
        raise ValueError("the GGUF has no tokenizer.ggml.tokens: it carries no tokenizer")
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    backend, _ = convert_gguf_tokenizer(arch, tdict)
    # transformers picks the dummy-prefix behaviour by architecture, not from the file: a
    # file that says otherwise would tokenize every text differently from llama.cpp
    want = bool(tdict.get("add_prefix_space", True))
    first = backend.encode("x", add_special_tokens=False).tokens
    if bool(first) and first[0].startswith("\u2581") != want:
        raise ValueError(f"the GGUF says add_space_prefix={want} but transformers' {arch!r} "
                         "tokenizer does the opposite: this vocabulary is not supported")
    return GGUFTokenizer(
        encode=lambda text: backend.encode(text, add_special_tokens=False).ids,
        decode=lambda ids: backend.decode([int(i) for i in ids], skip_special_tokens=False),
        bos_id=tdict.get("bos_token_id"), eos_id=tdict.get("eos_token_id"), backend=backend)


# ---------------------------------------------------------------------------- metadata

# GGUF value types: struct format of the scalar ones (8 STRING, 9 ARRAY)
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
           10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
          10: "<u8", 11: "<i8", 12: "<f8"}


def gguf_metadata(path: str) -> dict:
    """{key: value} of a little-endian GGUF file's metadata (strings decoded, arrays as
    lists), without the tensors. About 1 s for a 262k-token vocabulary, where gguf's
    GGUFReader takes 30 s (it maps every array element)."""
    with open(path, "rb") as f:
        buf = f.read(1 << 20)
        magic, version = buf[:4], struct.unpack_from("<I", buf, 4)[0]
        if magic != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (magic {magic!r})")
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} (big-endian file?) is not read; "
                             "versions 2 and 3 little-endian are")
        n_kv = struct.unpack_from("<Q", buf, 16)[0]
        reader = _Reader(f, buf, 24)
        return dict(reader.kv() for _ in range(n_kv))


class _Reader:
    """Sequential reads from a file through a growing buffer."""

    def __init__(self, f, buf: bytes, pos: int):
        self.f, self.buf, self.pos = f, buf, pos

    def take(self, n: int) -> bytes:
        while self.pos + n > len(self.buf):
            more = self.f.read(max(n, 1 << 22))
            if not more:
                raise ValueError("the GGUF metadata is truncated")
            self.buf = self.buf[self.pos:] + more
            self.pos = 0
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.scalar("<Q")).decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype == 8:
            return self.string()
        if vtype in _SCALAR:
            return self.scalar(_SCALAR[vtype])
        if vtype != 9:
            raise ValueError(f"unknown GGUF value type {vtype}")
        etype, count = self.scalar("<I"), self.scalar("<Q")
        if etype in _NUMPY:
            dt = np.dtype(_NUMPY[etype])
            return np.frombuffer(self.take(dt.itemsize * count), dt).tolist()
        return [self.value(etype) for _ in range(count)]

    def kv(self) -> tuple:
        key = self.string()
        return key, self.value(self.scalar("<I"))
