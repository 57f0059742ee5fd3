"""The one builder of a model from a quantized checkpoint.

    model = build_model("runs/smollm2_135m_2bit")                       # dequantized, bf16
    model = build_model(ckpt, linears="codes", backend="auto")           # from the codes
    model = build_model(ckpt, linears="tunable", dtype=jnp.bfloat16)     # su/sv trainable

The skeleton comes from `models.assemble_model` (`nnx.eval_shape`, globals filled by key,
blocks built and placed one at a time); each block's FP parameters (norms, biases) are filled
by key and every quantized group gets the stand-in of `linears` (`quipjax.layers.attach`). The
end-to-end overrides are applied by `checkpoint.Reader`. Unknown or missing parameters, and
linears the checkpoint does not quantize, fail with the layer and the path.
"""
from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
from flax import nnx

from quipjax import layers
from quipjax.models.adapter import set_param
from quipjax.models.assemble import assemble_model, block_loaders
from quipjax.models.families import adapter_of, family_of
from quipjax.models.parts import Linear
from quipjax.pipeline.checkpoint import Reader
from quipjax.rule import rules_from_json

__all__ = ["build_model", "build_model_streamed", "LINEAR_KINDS"]

LINEAR_KINDS = layers.KINDS


def _block(reader: Reader, i: int, kind: str, dtype, backend: str, adapter,
           train_table: bool = False):
    spec = reader.spec
    groups, norms = reader.layer(i)
    where = f"layer {i} of {reader.dir}"
    # tunable blocks keep float32 parameters (the trainables); their matmuls run in `dtype`
    block = family_of(spec).block(spec, jnp.float32 if kind == "tunable" else dtype, i)
    missing = set(adapter.fp_params(block)) - set(norms)
    if missing:
        raise ValueError(f"{where} lacks the parameters {sorted(missing)}")
    for path, v in norms.items():
        try:
            set_param(block, path, v)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    members = [m for g in groups.values() for m in g.members]
    lacking = [m for m in reader.meta.get("quantized_linears", adapter.linear_paths())
               if m not in members]
    # linears neither quantized nor stored in floating point (a MoE router is stored)
    dense = [".".join(map(str, p)) for p, m in nnx.iter_graph(block)
             if isinstance(m, Linear) and ".".join(map(str, p)) not in members
             and ".".join(map(str, p)) + ".weight" not in norms]
    if lacking or dense:
        raise ValueError(f"{where} lacks {sorted(set(lacking) | set(dense))}: the checkpoint "
                         "does not quantize them (it stores no dense weights)")
    for g in groups.values():
        layers.attach(block, g, kind, dtype=dtype, backend=backend, train_table=train_table)
    return block


def build_model(ckpt_dir: str, *, linears: str = "dequantized", dtype=jnp.bfloat16,
                placement=None, backend: str = "auto", head_dtype=None,
                meta: Optional[dict] = None, adapter=None, train_table: bool = False):
    """The model (of the checkpoint's family) from a quantized checkpoint.

    Args:
      ckpt_dir: a checkpoint directory (the --output_dir of experiments/quantize.py).
      linears: the stand-in of the quantized linears (`quipjax.layers`): "dequantized" (dense
        weights of `dtype`), "tunable" (`TunableQuantLinear`s computing in `dtype`; float32
        parameters), or "codes" (the decode-matmul kernels of `backend`, inputs in `dtype`).
      dtype: compute dtype (embeddings and dense weights are stored in it, norms float32).
      placement: a `quipjax.distributed.Placement`: every block placed as it is built.
      head_dtype: embeddings / lm_head dtype (default `dtype`; "tunable" with a trained head
        wants float32). With "tunable" the head's matmuls still run in `dtype`.
      meta: the checkpoint's quipjax.json (read when None).
      train_table: with "tunable", the value tables of the HYB groups are trainable too.
    """
    spec, block, kw = _parts(ckpt_dir, linears, dtype, placement, backend, head_dtype, meta,
                             adapter, train_table)
    return assemble_model(spec, block=block, **kw)


def build_model_streamed(ckpt_dir: str, *, linears: str = "dequantized", dtype=jnp.bfloat16,
                         placement=None, backend: str = "auto", head_dtype=None,
                         meta: Optional[dict] = None, adapter=None):
    """(skeleton, loaders): `build_model`'s globals with the layers left abstract, and one
    function per block that builds it (placed) when called, for passes that hold one block
    at a time (`pipeline.evaluate.perplexity(stream=...)`). Arguments as `build_model`'s."""
    spec, block, kw = _parts(ckpt_dir, linears, dtype, placement, backend, head_dtype, meta,
                             adapter, False)
    return (assemble_model(spec, block=None, **kw),
            block_loaders(spec.num_layers, block, placement))


def _parts(ckpt_dir, linears, dtype, placement, backend, head_dtype, meta, adapter, train_table):
    if linears not in LINEAR_KINDS:
        raise ValueError(f"linears must be one of {LINEAR_KINDS}, got {linears!r}")
    reader = Reader(ckpt_dir, meta)
    # the groups the run quantized: its --rules (kept in the meta), then the family's
    adapter = adapter or adapter_of(reader.spec, rules_from_json(reader.meta.get("rules", [])))
    dtype = jnp.dtype(dtype)
    return reader.spec, (lambda i: _block(reader, i, linears, dtype, backend, adapter,
                                          train_table)), dict(
        dtype=jnp.float32 if linears == "tunable" else dtype, globals_=reader.globals(),
        placement=placement, head_dtype=head_dtype or dtype,
        head_compute_dtype=dtype if linears == "tunable" else None)
