"""Interoperability with other quantized-checkpoint formats.

`quipjax.formats.quipsharp`: the packed E8P format of the official QuIP# code (quip-sharp),
in which the published QuIP# models are stored: its bit packing (`quipsharp.packing`, pure
array functions) and whole Hugging Face folders in both directions (`quipsharp.folder`).
"""
