"""Placement: where parameters and batches live, declared once by rules over parameter paths.

    placement = Placement(parse_mesh("data:2,model:4"))   # or Placement() for one device
    placement.module(block)          # every variable placed by RULES (in place)
    placement.batch((x, y))          # leading batch axis split over the devices
    placement.program_mesh           # the mesh the distributed programs run on

Without a mesh every method is a no-op (arrays stay where they are, batches become jax
arrays) and the programs of `quipjax.distributed.programs` run on a mesh of the first device,
so one code path serves 1 or N devices, as flax's FSDP example does with its mesh rules.

Rules: weights are (out, in), sharded by output rows over "model" (storage only: a block
gathers its weights to run, so each device computes exactly the one-device program on its
own windows and results do not depend on the mesh); everything else is replicated.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Optional

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from quipjax.distributed import processes
from quipjax.distributed.mesh import BATCH, describe, one_device_mesh
from quipjax.models.adapter import path_str

__all__ = ["RULES", "spec_for", "Placement"]

# (regex on the parameter path, spec). First match wins.
RULES = (
    (r"(.*\.)?(q|k|v|o|gate|up|down)_proj\.weight", P("model", None)),
    (r"(.*\.)?(q|k|v|o|gate|up|down)_proj\.R", P("model", None)),     # TunableQuantLinear
    (r"(.*\.)?lm_head\.weight", P("model", None)),
    (r"embed_tokens", P("model", None)),
    (r".*", P()),                                                        # norms, su/sv, biases
)


def spec_for(path: str, shape, mesh: Mesh, rules=RULES) -> P:
    """The PartitionSpec of the parameter at `path` ("layers.3.mlp.up_proj.weight"):
    the first matching rule, replicated where a sharded dimension is not divisible."""
    for rx, spec in rules:
        if re.fullmatch(rx, path):
            for dim, ax in enumerate(spec):
                if ax is None:
                    continue
                size = int(np.prod([mesh.shape[a] for a in (ax if isinstance(ax, tuple) else (ax,))]))
                if dim >= len(shape) or shape[dim] % size:
                    return P()
            return spec
    return P()


@dataclasses.dataclass(frozen=True)
class Placement:
    """Places modules, parameters and batches on `mesh` by `rules`; a no-op without a mesh."""

    mesh: Optional[Mesh] = None
    rules: tuple = RULES

    @property
    def devices(self) -> int:
        return 1 if self.mesh is None else self.mesh.size

    @property
    def program_mesh(self) -> Mesh:
        """The mesh the distributed programs run on: `mesh`, or the first device alone."""
        return self.mesh if self.mesh is not None else one_device_mesh()

    def describe(self) -> str:
        return describe(self.mesh)

    def specs(self, state, mesh: Optional[Mesh] = None) -> list:
        """PartitionSpecs of the leaves of an nnx State (in `jax.tree.leaves` order) on `mesh`
        (default: `program_mesh`)."""
        mesh = mesh or self.program_mesh
        leaves = jax.tree_util.tree_flatten_with_path(state)[0]
        return [spec_for(path_str(p), np.shape(x), mesh, self.rules) for p, x in leaves]

    def module(self, module):
        """Place a module's variables by the rules (in place; shape-only variables of an
        `nnx.eval_shape` skeleton are left alone); returns the module."""
        if self.mesh is None:
            return module
        state = nnx.state(module)
        leaves, tdef = jax.tree.flatten(state)
        specs = self.specs(state)
        out = [x if isinstance(x, jax.ShapeDtypeStruct)
               else jax.device_put(x, NamedSharding(self.mesh, s)) for x, s in zip(leaves, specs)]
        nnx.update(module, jax.tree.unflatten(tdef, out))
        return module

    def batch_spec(self, n: int) -> P:
        """Split a leading batch of n over every device if possible, else over "data", else
        none."""
        mesh = self.program_mesh
        if n % mesh.size == 0:
            return P(BATCH)
        if n % mesh.shape["data"] == 0 and mesh.shape["data"] > 1:
            return P("data")
        return P()

    def local_rows(self, n: int) -> tuple:
        """(start, stop): the rows of a leading batch of n split over every device that this
        process's devices hold (all n with one process; `processes.local_rows`)."""
        return processes.local_rows(NamedSharding(self.program_mesh, P(BATCH)), n)

    def batch(self, tree):
        """Arrays with a leading batch dimension, split across the mesh (see `batch_spec`);
        without a mesh, the same arrays as jax arrays."""
        if self.mesh is None:
            return jax.tree.map(jax.numpy.asarray, tree)
        return jax.tree.map(lambda a: jax.device_put(
            a, NamedSharding(self.mesh, self.batch_spec(np.shape(a)[0]))), tree)
