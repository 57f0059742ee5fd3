"""Models (Flax NNX) and their loaders; no quantization code.

`llama`: the Llama-family decoder; `loaders`: HF folders and GGUF files, read lazily;
`adapter`: where a model's linears are and which share an input; `assemble`: the one way a
model is built from stored parts.
"""
