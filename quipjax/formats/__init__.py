"""Interoperability with other quantized-checkpoint formats.

`quipjax.formats.quipsharp`: the packed E8P format of the official QuIP# code (quip-sharp),
in which the published QuIP# models are stored: pack/unpack its int64 code words, turn its
layers into `QuantizedLinear`s, and convert whole Hugging Face folders in both directions.
"""
from quipjax.formats import quipsharp

__all__ = ["quipsharp"]
