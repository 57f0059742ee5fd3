"""A Llama that keeps its quantized linears as codes (for generation and serving).

    model = build_inference_model("runs/smollm2_135m_2bit", backend="auto", dtype=jnp.bfloat16)
    logits = model(tokens)                    # (B, T) int32 -> (B, T, vocab) float32

`build_quantized_model` (quantize_model.py) decodes every group into dense weights;
here each quantized group of a block stays as its codes, converted once at load to the
decode-matmul kernel's layout (`quipjax.kernels.prepare`), and the member linears of the
group read their rows from one product of the whole group:

    QuantGroup (one per group: fused q/k/v, o, up/gate, down)
        codes  : `Codes` variable holding the `kernels.Prepared` pytree (never trained)
        SU, SV : `QuantVector` variables (n,), (m,) float32: the tuned values (end-to-end
                 fine-tuning overrides included, as `build_quantized_model` resolves them)
        scales : `QuantVector` (k,) float32, the members' fuse scales; `rows` (static) their
                 row counts; `rot_m`, `rot_n` (static) the `quipjax.rht.Rotation`s
        __call__(x) = (SV * repeat(scales, rows)) * M_m( x_rot @ Q^T ),
                      x_rot = M_n^T (SU * x)            (x (..., n) -> (..., m) float32)
    QuantMember (replaces q_proj, k_proj, ...): group(x)[..., r0:r1] (+ bias)

The members of a fused group hold the same `QuantGroup` object (NNX shared reference), so it
is stored once in the model state, and the group's product is written once per member in the
traced program; identical HLO with identical operands is merged by XLA's common-subexpression
elimination under `jit`, so q, k and v cost one rotation, one decode-matmul and one inverse
rotation (`tests/test_generate.py` checks the optimized HLO of one block). Called eagerly
(without jit) the product runs once per member. The model code (models/llama.py) is not
touched: the members are swapped in by module path (models/adapter.py paths, as the
checkpoint records them).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from quipjax import kernels as _kernels
from quipjax.models.adapter import get_path, set_path
from quipjax.models.llama import Block, Linear, Llama, LlamaSpec
from quipjax.pipeline import checkpoint as _ckpt
from quipjax.pipeline.checkpoint import QuantizedGroup
from quipjax.pipeline.quantize_model import set_param

__all__ = ["Codes", "QuantVector", "QuantGroup", "QuantMember", "attach_inference_group",
           "build_inference_model"]


class Codes(nnx.Variable):
    """Quantized codes in a kernel backend's layout: the value is a `kernels.Prepared` pytree.
    Not an `nnx.Param`: optimizers and `nnx.state(model, nnx.Param)` never see it."""


class QuantVector(nnx.Variable):
    """A fixed float32 vector of a quantized group (SU, SV, fuse scales); not an `nnx.Param`."""


class QuantGroup(nnx.Module):
    """The product of one quantized (row-stacked) group with its input, from the codes.

    Args:
      group: a `QuantizedGroup` (codes, SU, SV, fuse scales, member rows).
      backend: decode-matmul backend ("auto", "xla", "pallas", "reference", ...).
      dtype: dtype of the rotated input fed to the decode-matmul (bfloat16 or float32; the
        kernel accumulates in float32). Rotations and scales run in float32.
    """

    def __init__(self, group: QuantizedGroup, backend: str = "auto", dtype=jnp.bfloat16):
        ql = group.ql
        m, n = ql.shape
        if sum(group.rows) != m or len(group.rows) != len(group.scales):
            raise ValueError(f"group {group.members}: rows {group.rows} / {len(group.scales)} "
                             f"scales do not describe the {m} rows of its codes")
        self.codes = Codes(_kernels.prepare(jnp.asarray(ql.codes), ql.codebook, backend))
        self.SU = QuantVector(jnp.asarray(ql.SU, jnp.float32))
        # SV times each member's fuse scale, per output row: fixed at load, not per token
        self.row_scale = QuantVector(jnp.asarray(ql.SV, jnp.float32) * jnp.repeat(
            jnp.asarray(group.scales, jnp.float32), np.asarray(group.rows), total_repeat_length=m))
        self.rows = tuple(int(r) for r in group.rows)
        self.rot_m, self.rot_n = ql.rotations            # quipjax.rht.Rotation, static
        self.shape = (int(m), int(n))
        self.dtype = jnp.dtype(dtype)

    @property
    def backend(self) -> str:
        return self.codes.get_value().backend

    def row_ranges(self) -> list:
        """[(r0, r1)] of each member."""
        ends = np.cumsum((0,) + self.rows)
        return [(int(a), int(b)) for a, b in zip(ends[:-1], ends[1:])]

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (..., n) float -> (..., m) float32: x @ What^T for the whole group, each member's
        rows times its fuse scale (the concatenation of the members' outputs, no biases)."""
        n = self.shape[1]
        if x.shape[-1] != n:
            raise ValueError(f"quantized group of shape {self.shape} applied to inputs with last "
                             f"dimension {x.shape[-1]}")
        x = jnp.asarray(x, jnp.float32)
        # the math of QuantizedLinear.apply, with the codes prepared once at load
        t = self.rot_n.apply(x * self.SU[...], axis=-1, transpose=True)      # M_n^T diag(SU) x
        y = _kernels.prepared_matmul(t.astype(self.dtype), self.codes.get_value())   # t Q^T
        return self.rot_m.apply(y, axis=-1) * self.row_scale[...]          # diag(SV) M_m (.)


class QuantMember(nnx.Module):
    """Stands in for one member `Linear` of a group: rows [r0, r1) of the group's product.

    Args:
      group: the shared `QuantGroup`.
      index: which member (order of `QuantizedGroup.members`).
      bias: the member's bias `nnx.Param` (out,) or None.
    """

    def __init__(self, group: QuantGroup, index: int, bias: Optional[nnx.Param] = None):
        self.group = group
        self.index = int(index)
        self.r0, self.r1 = group.row_ranges()[index]
        self.bias = bias

    @property
    def matmul_dtype(self):
        """The compute dtype the attention of `models.llama` reads from q_proj."""
        return self.group.dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (..., n) -> (..., r1 - r0) float32."""
        y = self.group(x)[..., self.r0:self.r1]
        return y if self.bias is None else y + self.bias[...]


def attach_inference_group(block, group: QuantizedGroup, backend: str = "auto",
                           dtype=jnp.bfloat16) -> QuantGroup:
    """Replace the members of `group` in `block` by `QuantMember`s of one shared `QuantGroup`
    (their biases are kept). Returns the group module."""
    qg = QuantGroup(group, backend, dtype)
    for i, (path, rows) in enumerate(zip(group.members, group.rows)):
        old = get_path(block, path)
        w = getattr(old, "weight", None)
        if w is not None and tuple(w.shape) != (rows, qg.shape[1]):
            raise ValueError(f"{path}: quantized shape {(rows, qg.shape[1])} != model {tuple(w.shape)}")
        set_path(block, path, QuantMember(qg, i, getattr(old, "bias", None)))
    return qg


def _is_abstract(v) -> bool:
    return isinstance(v, jax.ShapeDtypeStruct)


def build_inference_model(ckpt_dir: str, *, backend: str = "auto", dtype=jnp.bfloat16,
                          meta: Optional[dict] = None) -> Llama:
    """A `Llama` whose quantized linears compute from the codes of the checkpoint.

    Args:
      ckpt_dir: a quantized checkpoint (the --output_dir of experiments/quantize.py).
      backend: decode-matmul backend for `quipjax.kernels.prepare` ("auto": Pallas on GPU,
        the XLA path elsewhere; "reference" decodes the whole table then one matmul).
      dtype: embedding / unquantized linears (lm_head), the decode-matmul input and the
        attention compute dtype; norms, rotations and accumulations stay float32.
      meta: the checkpoint's quipjax.json (read when None).
    Returns:
      A `Llama` (the same module tree as the FP model, with `QuantMember`s in place of the
      quantized `Linear`s); the dense quantized weights are never formed. Logits match
      `build_quantized_model(ckpt_dir, meta, dtype)` up to float rounding.
    """
    meta = _ckpt.read_meta(ckpt_dir) if meta is None else meta
    spec = LlamaSpec.from_dict(meta["model"])
    dtype = jnp.dtype(dtype)
    # the skeleton without allocating the dense linears; blocks are built one at a time
    model = nnx.eval_shape(lambda: Llama(spec, dtype))
    glob = _ckpt.load_globals(ckpt_dir)
    e2e = _ckpt.load_e2e(ckpt_dir)         # end-to-end tuned su/sv and norms override the layers'
    if e2e is not None:
        glob.update(e2e[1])
    model.embed_tokens = nnx.Param(jnp.asarray(glob["embed_tokens"], dtype))
    model.norm.weight = nnx.Param(jnp.asarray(glob["norm"], jnp.float32))
    if model.lm_head is not None:
        head = Linear(spec.hidden_size, spec.vocab_size, dtype=dtype)
        head.weight[...] = jnp.asarray(glob["lm_head"], dtype)
        model.lm_head = head
    for i in range(spec.num_layers):
        groups, norms = _ckpt.load_layer_tuned(ckpt_dir, i, e2e)
        missing = [m for m in meta["quantized_linears"]
                   if not any(m in g.members for g in groups.values())]
        if missing:
            raise ValueError(f"layer {i} of {ckpt_dir} lacks {missing}")
        block = Block(spec, dtype)          # transient dense linears: one block at a time
        for name, v in norms.items():
            set_param(block, name, v)
        for g in groups.values():
            attach_inference_group(block, g, backend, dtype)
        dense = [".".join(map(str, p)) for p, m in nnx.iter_graph(block) if isinstance(m, Linear)]
        if dense:       # the checkpoint stores no dense weights for them: they would be zeros
            raise ValueError(f"layer {i} of {ckpt_dir}: {dense} are not quantized in the checkpoint")
        model.layers[i] = block
    left = [".".join(map(str, p)) for p, v in nnx.to_flat_state(nnx.state(model))
            if _is_abstract(v.get_value() if hasattr(v, "get_value") else v)]
    if left:
        raise ValueError(f"the checkpoint {ckpt_dir} does not fill {left[:5]} ...")
    return model
