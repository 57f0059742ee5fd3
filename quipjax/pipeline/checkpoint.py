"""The quantized-model checkpoint: a directory written layer by layer (resumable).

    <dir>/quipjax.json          format version, model spec, tokenizer reference, settings
    <dir>/globals/              orbax: embed_tokens, norm, lm_head (float32)
    <dir>/globals.json          written after its orbax save completes: names, checksums
    <dir>/layers/layer_XXX/     orbax: norms and, per linear group, codes/SU/SV/scales
    <dir>/layers/layer_XXX.json written after its orbax save completes: the layer is done
    <dir>/metrics.json          written by experiments/quantize.py

    <dir>/e2e/, e2e.json        orbax: the end-to-end fine-tuned su/sv and norms, which override
                                the layers' when e2e.json exists (written last: atomic)

Each of globals.json, layer_XXX.json and e2e.json records under "sha256" the checksum of every
array of its orbax directory: {"groups/qkv/codes": hex sha256 of "<dtype.str> <shape>\n" and
the array's C-order bytes, ...}: orbax checks none of the array data it reads back (its zarr
v2 + zstd chunks carry no checksum; the opt-in zarr3 crc32c covers only the shard index).
Every load checks them and raises ValueError naming the directory, the array and how to
rewrite it; records written before the checksums have no "sha256" and load unchecked
(`verify` reports which parts were checked).

`Reader` reads a finished checkpoint with the end-to-end overrides resolved (the one place
they are applied: the model builder, the exporter and the metrics read through it).

Codes are stored as uint16 (the 3-bit codebook's second stage as uint8), SU as packed bits
while it holds signs (float32 once fine-tuning made it real-valued), SV and the fused-group
scales as float32, so loading gives back bit-identical weights. A layer's other FP parameters
(norm weights, biases) are stored by module path with "." written as "__".
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import jax.numpy as jnp
import numpy as np

from quipjax.group import QuantizedGroup
from quipjax.models.families import spec_from_dict
from quipjax.quantize import FORMAT_VERSION, QuantizedLinear

__all__ = ["CHECKPOINT_VERSION", "GLOBAL_PATHS", "Reader", "drop_e2e", "e2e_done", "e2e_info",
           "layer_done", "layer_info", "load_e2e", "load_globals", "load_layer",
           "load_layer_tuned", "read_meta", "save_e2e", "save_globals", "save_layer", "verify",
           "write_meta"]

# Version of the directory layout; bumped with any change that old readers cannot handle.
CHECKPOINT_VERSION = 2


def _ocp():
    import orbax.checkpoint as ocp
    return ocp


def _checkpointer():
    """An orbax checkpointer of this process alone: the trees are host numpy arrays that
    process 0 writes by itself (a run of several processes) and every process reads."""
    import jax
    ocp = _ocp()
    me = jax.process_index()
    return ocp.StandardCheckpointer(multiprocessing_options=ocp.options.MultiprocessingOptions(
        primary_host=me, active_processes={me}))


def _write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def write_meta(ckpt_dir: str, meta: dict) -> None:
    os.makedirs(ckpt_dir, exist_ok=True)
    _write_json(os.path.join(ckpt_dir, "quipjax.json"),
                dict(meta, checkpoint_version=CHECKPOINT_VERSION, format_version=FORMAT_VERSION))


def read_meta(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, "quipjax.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{ckpt_dir} is not a quipjax checkpoint (no quipjax.json)")
    with open(path) as f:
        try:
            meta = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is corrupt: {e}") from e
    v, fv = meta.get("checkpoint_version"), meta.get("format_version")
    if v != CHECKPOINT_VERSION or fv != FORMAT_VERSION:
        raise ValueError(
            f"{ckpt_dir} was written with checkpoint version {v} / format version {fv}; this "
            f"quipjax reads version {CHECKPOINT_VERSION} / {FORMAT_VERSION}: use the quipjax "
            "release that wrote it, or quantize again")
    return meta


def _layer_dir(ckpt_dir, i):
    return os.path.join(ckpt_dir, "layers", f"layer_{i:03d}")


def layer_done(ckpt_dir: str, i: int) -> bool:
    return os.path.exists(_layer_dir(ckpt_dir, i) + ".json")


def _save_tree(path, tree) -> dict:
    """Save a tree of numpy arrays; returns their checksums (computed while orbax writes)."""
    if os.path.exists(path):        # a partial save from a killed run
        shutil.rmtree(path)
    ck = _checkpointer()
    ck.save(os.path.abspath(path), tree)
    sums = _checksums(tree)
    ck.wait_until_finished()
    return sums


def _restore_tree(path, fix=""):
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path} is missing: the checkpoint is incomplete")
    try:
        return _checkpointer().restore(os.path.abspath(path))
    except Exception as e:
        raise ValueError(f"{path} could not be read (truncated or corrupt checkpoint){fix}: "
                         f"{e}") from e


def _leaves(tree, prefix=""):
    """(path "a/b/c", array) of every array of a nested dict."""
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}/")
        elif v is not None:
            yield prefix + k, v


def _sha256(a) -> str:
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str} {a.shape}\n".encode())
    h.update(a.reshape(-1).view(np.uint8).data if a.size else b"")
    return h.hexdigest()


def _checksums(tree) -> dict:
    """{array path: sha256} of a tree of numpy arrays (recorded in the json after its save)."""
    arrays = {k: np.asarray(v) for k, v in _leaves(tree)}
    if len(arrays) < 2 or sum(a.nbytes for a in arrays.values()) < 1 << 22:
        return {k: _sha256(a) for k, a in arrays.items()}
    order = sorted(arrays, key=lambda k: -arrays[k].nbytes)
    with ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as ex:   # hashlib releases the GIL
        return dict(zip(order, ex.map(_sha256, [arrays[k] for k in order])))


def _verify(tree, want: dict | None, path: str, fix: str) -> None:
    """Check a restored tree against its recorded checksums (None: written before them)."""
    if want is None:
        return
    have = _checksums(tree)
    if set(have) != set(want):
        raise ValueError(f"{path} holds the arrays {sorted(have)} but its record lists "
                         f"{sorted(want)}: the checkpoint is corrupt{fix}")
    for k in sorted(want):
        if have[k] != want[k]:
            raise ValueError(f"{path}: array '{k}' does not match its checksum (sha256 "
                             f"{have[k]} read, {want[k]} recorded): the checkpoint is "
                             f"corrupt{fix}")


def _read_json(path):
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is corrupt: {e}") from e


def _pack_group(g: QuantizedGroup) -> dict:
    codes = np.asarray(g.ql.codes)
    arrays = {"codes": codes, "SV": np.asarray(g.ql.SV, np.float32),
              "scales": np.asarray(g.scales, np.float32)}
    if g.su_is_signs:
        arrays["SU"] = np.packbits(np.asarray(g.ql.SU) < 0)
    else:
        arrays["SU_real"] = np.asarray(g.ql.SU, np.float32)
    if g.ql.table is not None:           # a fine-tuned HYB table
        arrays["table"] = np.asarray(g.ql.table, np.float32)
    if g.ql.codebook == "E8P12RVQ3B":   # second stage has 8 bits
        arrays["codes"] = codes[..., 0]
        arrays["codes2"] = codes[..., 1].astype(np.uint8)
    return arrays


def _unpack_group(arrays: dict, meta: dict) -> QuantizedGroup:
    m, n = meta["shape"]
    codes = np.asarray(arrays["codes"])
    if "codes2" in arrays:
        codes = np.stack([codes, np.asarray(arrays["codes2"]).astype(np.uint16)], -1)
    if "SU_real" in arrays:
        su = np.asarray(arrays["SU_real"], np.float32)
    else:
        su = np.where(np.unpackbits(np.asarray(arrays["SU"]))[:n].astype(bool), -1.0, 1.0)
    ql = QuantizedLinear(codes=jnp.asarray(codes), SU=jnp.asarray(su, jnp.float32),
                         SV=jnp.asarray(arrays["SV"], jnp.float32), codebook=meta["codebook"],
                         shape=(m, n), transforms=tuple(meta["transforms"]),
                         format_version=meta["format_version"],
                         table=None if "table" not in arrays else jnp.asarray(arrays["table"]))
    return QuantizedGroup(ql=ql, scales=jnp.asarray(arrays["scales"]),
                          members=tuple(meta["members"]), rows=tuple(meta["rows"]))


def _key(path: str) -> str:
    return path.replace(".", "__")


def _path(key: str) -> str:
    return key.replace("__", ".")


def save_layer(ckpt_dir: str, i: int, groups: dict, norms: dict, info: dict) -> None:
    """Save layer i, then mark it done: layers/layer_XXX.json holds `info`, the groups'
    metadata ("groups") and the checksums of the stored arrays ("sha256").

    groups: name -> QuantizedGroup; norms: the block's other FP parameters, module path (e.g.
    "input_layernorm.weight", "self_attn.q_proj.bias") -> array.
    """
    tree = {"norms": {_key(k): np.asarray(v, np.float32) for k, v in norms.items()},
            "groups": {k: _pack_group(g) for k, g in groups.items()}}
    sums = _save_tree(_layer_dir(ckpt_dir, i), tree)
    gmeta = {k: {"shape": list(g.ql.shape), "codebook": g.ql.codebook,
                 "transforms": list(g.ql.transforms), "format_version": g.ql.format_version,
                 "members": list(g.members), "rows": list(g.rows)} for k, g in groups.items()}
    _write_json(_layer_dir(ckpt_dir, i) + ".json",
                dict(info, groups=gmeta, sha256=sums))


def layer_info(ckpt_dir: str, i: int) -> dict:
    """The JSON record of finished layer i: its groups' metadata ("groups": {name: {shape,
    codebook, transforms, members, rows, ...}}), "proxy", "curves", "seconds", "sha256"
    ({array path: checksum}; absent in checkpoints written before it)."""
    jpath = _layer_dir(ckpt_dir, i) + ".json"
    if not os.path.exists(jpath):
        raise FileNotFoundError(f"layer {i} of {ckpt_dir} is missing: the checkpoint is "
                                "truncated (an interrupted run? rerun quantize.py to finish it)")
    return _read_json(jpath)


def load_layer(ckpt_dir: str, i: int) -> tuple[dict, dict, dict]:
    """(groups, norms, info) of layer i, its arrays checked against their checksums."""
    info = layer_info(ckpt_dir, i)
    path = _layer_dir(ckpt_dir, i)
    fix = (f"; quantize that layer again by deleting {path}.json and rerunning the same "
           "command (an imported checkpoint: import it again)")
    tree = _restore_tree(path, fix)
    _verify(tree, info.get("sha256"), path, fix)
    groups = {k: _unpack_group(tree["groups"][k], gm) for k, gm in info["groups"].items()}
    return groups, {_path(k): v for k, v in tree["norms"].items()}, info


def e2e_done(ckpt_dir: str) -> bool:
    return os.path.exists(os.path.join(ckpt_dir, "e2e.json"))


def e2e_info(ckpt_dir: str) -> dict | None:
    """The JSON record of the end-to-end stage ("curve", ..., "sha256": {array path:
    checksum}), None without one."""
    if not e2e_done(ckpt_dir):
        return None
    return _read_json(os.path.join(ckpt_dir, "e2e.json"))


def save_e2e(ckpt_dir: str, layers: list, globals_: dict, info: dict) -> None:
    """The end-to-end tuned parameters: layers[i] = {"groups": {name: (SU, SV) or (SU, SV,
    table) when a HYB table was tuned}, "norms": {path: array}}, globals_ = {name: array} (final
    norm, lm_head if tuned). e2e.json, written last, holds `info` and the checksums of the
    stored arrays ("sha256")."""
    def group(t):
        names = ("SU", "SV", "table")[:len(t)]
        return {n: np.asarray(a, np.float32) for n, a in zip(names, t)}
    tree = {"layers": {f"layer_{i:03d}": {
        "groups": {k: group(t) for k, t in l["groups"].items()},
        "norms": {_key(k): np.asarray(v, np.float32) for k, v in l["norms"].items()}}
        for i, l in enumerate(layers)},
        "globals": {k: np.asarray(v) for k, v in globals_.items()}}
    sums = _save_tree(os.path.join(ckpt_dir, "e2e"), tree)
    _write_json(os.path.join(ckpt_dir, "e2e.json"), dict(info, sha256=sums))


def drop_e2e(ckpt_dir: str) -> None:
    """Remove the end-to-end stage (marker first, so a kill midway leaves no half state)."""
    marker = os.path.join(ckpt_dir, "e2e.json")
    if os.path.exists(marker):
        os.remove(marker)
    shutil.rmtree(os.path.join(ckpt_dir, "e2e"), ignore_errors=True)


def load_e2e(ckpt_dir: str):
    """(layers, globals, info) as saved by `save_e2e` (arrays checked against their checksums),
    or None when there is no e2e stage."""
    info = e2e_info(ckpt_dir)
    if info is None:
        return None
    path = os.path.join(ckpt_dir, "e2e")
    fix = (f"; redo the end-to-end fine-tuning by deleting {path}.json and rerunning the same "
           "command")
    tree = _restore_tree(path, fix)
    _verify(tree, info.get("sha256"), path, fix)
    layers = []
    for i in range(len(tree["layers"])):
        l = tree["layers"][f"layer_{i:03d}"]
        layers.append({"groups": {k: (v["SU"], v["SV"]) + ((v["table"],) if "table" in v else ())
                                  for k, v in l["groups"].items()},
                       "norms": {_path(k): v for k, v in l["norms"].items()}})
    return layers, dict(tree["globals"]), info


def load_layer_tuned(ckpt_dir: str, i: int, e2e=None) -> tuple[dict, dict]:
    """(groups, norms) of layer i with the end-to-end overrides applied (`e2e` from
    `load_e2e`, or None for the layer as saved)."""
    groups, norms, _ = load_layer(ckpt_dir, i)
    if e2e is None:
        return groups, norms
    over = e2e[0][i]

    def tuned(ql, t):
        table = jnp.asarray(t[2]) if len(t) > 2 else ql.table
        return dataclasses.replace(ql, SU=jnp.asarray(t[0]), SV=jnp.asarray(t[1]), table=table)
    groups = {k: dataclasses.replace(g, ql=tuned(g.ql, over["groups"][k]))
              for k, g in groups.items()}
    return groups, dict(norms, **over["norms"])


def save_globals(ckpt_dir: str, arrays: dict) -> None:
    """globals/ holds `arrays` {name: array}; globals.json, written after, their names and
    checksums ("names", "sha256")."""
    tree = {k: np.asarray(v) for k, v in arrays.items()}
    sums = _save_tree(os.path.join(ckpt_dir, "globals"), tree)
    _write_json(os.path.join(ckpt_dir, "globals.json"), {"names": sorted(arrays), "sha256": sums})


def load_globals(ckpt_dir: str) -> dict:
    """{name: array} as saved by `save_globals`, checked against their checksums."""
    jpath = os.path.join(ckpt_dir, "globals.json")
    if not os.path.exists(jpath):
        raise FileNotFoundError(f"{ckpt_dir}/globals is missing: the checkpoint is incomplete")
    want = _read_json(jpath).get("sha256")
    path = os.path.join(ckpt_dir, "globals")
    fix = f"; write them again by deleting {jpath} and rerunning the same command"
    tree = dict(_restore_tree(path, fix))
    _verify(tree, want, path, fix)
    return tree


def verify(ckpt_dir: str) -> dict:
    """Read every stored array of a finished checkpoint, checking it against its checksum
    (ValueError naming the part and the array on a mismatch). Returns {part: checked}, part
    "globals", "layers/layer_XXX" or "e2e"; checked False for a part written before the
    checksums (loaded, nothing to check it against)."""
    meta = read_meta(ckpt_dir)
    load_globals(ckpt_dir)
    out = {"globals": "sha256" in _read_json(os.path.join(ckpt_dir, "globals.json"))}
    for i in range(meta["model"]["num_layers"]):
        out[f"layers/layer_{i:03d}"] = "sha256" in load_layer(ckpt_dir, i)[2]
    e2e = load_e2e(ckpt_dir)
    if e2e is not None:
        out["e2e"] = "sha256" in e2e[2]
    return out


# the checkpoint's names of the global parameters -> their module paths in the model
GLOBAL_PATHS = {"embed_tokens": "embed_tokens", "norm": "norm.weight", "lm_head": "lm_head.weight"}
GLOBAL_NAMES = {v: k for k, v in GLOBAL_PATHS.items()}      # module path -> stored name


class Reader:
    """A finished checkpoint, read with the end-to-end overrides applied (tuned su/sv, norms
    and, when trained, the head replace the layers' and the globals' stored values).

        r = Reader(ckpt_dir)
        r.spec, r.meta
        r.globals()          # {"embed_tokens": .., "norm.weight": .., ["lm_head.weight"]}
        groups, norms = r.layer(i)
    """

    def __init__(self, ckpt_dir: str, meta: dict | None = None):
        self.dir = ckpt_dir
        self.meta = read_meta(ckpt_dir) if meta is None else meta
        self.spec = spec_from_dict(self.meta["model"])
        self._e2e = load_e2e(ckpt_dir)

    @property
    def has_e2e(self) -> bool:
        return self._e2e is not None

    def globals(self) -> dict:
        """{module path: array} of the global parameters (float32 as stored)."""
        g = load_globals(self.dir)
        if self._e2e is not None:
            g.update(self._e2e[1])
        unknown = set(g) - set(GLOBAL_PATHS)
        if unknown:
            raise ValueError(f"{self.dir}/globals holds unknown parameters {sorted(unknown)}")
        return {GLOBAL_PATHS[k]: v for k, v in g.items()}

    def layer(self, i: int) -> tuple[dict, dict]:
        """(groups {name: QuantizedGroup}, norms {module path: array}) of layer i."""
        return load_layer_tuned(self.dir, i, self._e2e)

    def info(self, i: int) -> dict:
        return layer_info(self.dir, i)
