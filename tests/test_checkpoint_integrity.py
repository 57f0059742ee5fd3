"""Integrity of the stored arrays: every array of a checkpoint has a checksum in the json
written after its orbax save, checked on every load. The corruption tests flip one byte of an
orbax data file and first make sure (reading it with orbax directly) that the flip really
changes an array, or really makes it unreadable."""
import os
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY_GEN as SPEC

from quipjax.group import QuantizedGroup
from quipjax.models.adapter import LLAMA
from quipjax.pipeline import checkpoint as ckpt
from quipjax.quantize import QuantizedLinear

OLD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "checkpoint_v2_tiny")


def _group(rng, rows, n, codebook="E8P12", signs=True):
    m = sum(rows)
    codes = rng.integers(0, 1 << 16, (m, n // 8) + ((2,) if codebook == "E8P12RVQ3B" else ()))
    if codebook == "E8P12RVQ3B":
        codes[..., 1] %= 256
    su = rng.choice([-1.0, 1.0], n) if signs else rng.uniform(0.5, 1.5, n)
    ql = QuantizedLinear(codes=jnp.asarray(codes.astype(np.uint16)),
                         SU=jnp.asarray(su, jnp.float32),
                         SV=jnp.asarray(rng.standard_normal(m), jnp.float32), codebook=codebook,
                         shape=(m, n), transforms=("hadamard", "hadamard"))
    return QuantizedGroup(ql=ql, scales=jnp.asarray(rng.uniform(0.5, 2, len(rows)), jnp.float32),
                          members=tuple(f"m{j}" for j in range(len(rows))), rows=tuple(rows))


def _write(path):
    """A 2-layer checkpoint of random groups (plain, 3-bit with codes2, real-valued SU) and an
    e2e stage, written with the pipeline's writers; returns what was saved. (OCDBT keeps values
    under 1 KiB inline in its CRC-32C-checked b-tree nodes: each part has larger arrays.)"""
    rng = np.random.default_rng(0)
    h, f = SPEC.hidden_size, SPEC.intermediate_size
    ckpt.write_meta(path, {"model": SPEC.to_dict(), "tokenizer": {"kind": "none", "path": ""},
                           "adapter": LLAMA.name, "quantized_linears": LLAMA.linear_paths(),
                           "settings": {"codebook": "E8P12", "seed": 0}})
    glob = {"embed_tokens": rng.standard_normal((SPEC.vocab_size, h)).astype(np.float32),
            "norm": rng.uniform(0.9, 1.1, h).astype(np.float32),
            "lm_head": rng.standard_normal((SPEC.vocab_size, h)).astype(np.float32)}
    ckpt.save_globals(path, glob)
    layers = []
    for i in range(SPEC.num_layers):
        groups = {"qkv": _group(rng, (64, 32, 32), h), "o": _group(rng, (h,), h),
                  "up": _group(rng, (f, f), h, "E8P12RVQ3B"),
                  "down": _group(rng, (h,), f, signs=False)}
        norms = {"input_layernorm.weight": rng.uniform(0.9, 1.1, h).astype(np.float32),
                 "post_attention_layernorm.weight": rng.uniform(0.9, 1.1, h).astype(np.float32)}
        ckpt.save_layer(path, i, groups, norms, {"proxy": {}})
        layers.append((groups, norms))
    e2e = [{"groups": {k: (rng.uniform(0.5, 1.5, g.ql.shape[1]).astype(np.float32),
                           rng.standard_normal(g.ql.shape[0]).astype(np.float32))
                       for k, g in groups.items()},
            "norms": {"input_layernorm.weight": rng.uniform(0.9, 1.1, h).astype(np.float32)}}
           for groups, _ in layers]
    e2e_glob = {"norm": rng.uniform(0.9, 1.1, h).astype(np.float32),      # a trained head:
                "lm_head": rng.standard_normal((SPEC.vocab_size, h)).astype(np.float32)}
    ckpt.save_e2e(path, e2e, e2e_glob, {"curve": []})
    return glob, layers, e2e, e2e_glob


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("integrity") / "ckpt")
    return path, _write(path)


@pytest.fixture
def copy(written, tmp_path):
    """A fresh copy of the written checkpoint, free to corrupt."""
    dst = str(tmp_path / "ckpt")
    shutil.copytree(written[0], dst)
    return dst


def _flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {prefix + k: v})
    return out


def _raw(part):
    """{array path: array} of an orbax directory read directly, or the exception."""
    import orbax.checkpoint as ocp
    try:
        tree = ocp.StandardCheckpointer().restore(os.path.abspath(part))
    except Exception as e:        # noqa: BLE001 (undecodable: whatever orbax raises)
        return e
    return _flat(tree)


def _flip(part, decodes):
    """Flip one byte of an orbax data file (largest first) of the directory `part` such that
    orbax still reads it with some array changed (decodes=True; returns the changed array
    paths) or cannot read it at all (decodes=False)."""
    before = _raw(part)
    files = sorted((os.path.join(r, f) for r, _, fs in os.walk(part) for f in fs
                    if os.path.basename(r) == "d"), key=os.path.getsize, reverse=True)
    for target in files:
        with open(target, "rb") as fh:
            data = fh.read()
        for pos in sorted({0, *(len(data) * j // 8 for j in range(1, 8))}, reverse=True):
            b = bytearray(data)
            b[pos] ^= 0xA5
            with open(target, "wb") as fh:
                fh.write(b)
            after = _raw(part)
            if isinstance(after, Exception):
                if not decodes:
                    return []
            elif decodes:
                changed = sorted(k for k in before if not np.array_equal(before[k], after[k]))
                if changed:
                    return changed
        with open(target, "wb") as fh:
            fh.write(data)
    raise AssertionError(f"no flipped byte in {part} gives the wanted corruption")


def _layer(path, i):
    return os.path.join(path, "layers", f"layer_{i:03d}")


def _eq(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and np.array_equal(a, b)


def test_untouched_checkpoint_loads_bit_identical_and_verified(written):
    path, (glob, layers, e2e, e2e_glob) = written
    assert ckpt.verify(path) == {"globals": True, "layers/layer_000": True,
                                 "layers/layer_001": True, "e2e": True}
    for i, (groups, norms) in enumerate(layers):
        got, got_norms, info = ckpt.load_layer(path, i)
        assert len(info["sha256"]) == len(_raw(_layer(path, i)))
        for k, g in groups.items():
            h = got[k]
            assert _eq(h.ql.codes, g.ql.codes) and _eq(h.ql.SU, g.ql.SU)
            assert _eq(h.ql.SV, g.ql.SV) and _eq(h.scales, g.scales)
        assert set(got_norms) == set(norms)
        assert all(_eq(got_norms[k], v) for k, v in norms.items())
    g = ckpt.load_globals(path)
    assert set(g) == set(glob) and all(_eq(g[k], v) for k, v in glob.items())
    got_layers, got_glob, info = ckpt.load_e2e(path)
    assert info["curve"] == [] and len(info["sha256"]) == 2 * (2 * 4 + 1) + 2
    assert all(_eq(got_glob[k], v) for k, v in e2e_glob.items())
    for want, have in zip(e2e, got_layers):
        for k, (su, sv) in want["groups"].items():
            assert _eq(have["groups"][k][0], su) and _eq(have["groups"][k][1], sv)
    r = ckpt.Reader(path)
    assert _eq(r.globals()["lm_head.weight"], e2e_glob["lm_head"])
    assert _eq(r.layer(1)[0]["down"].ql.SU, e2e[1]["groups"]["down"][0])


def test_flipped_layer_bytes_raise_naming_layer_and_array(copy):
    part = _layer(copy, 1)
    changed = _flip(part, decodes=True)
    msg = (re.escape(f"{part}: array '{changed[0]}' does not match its checksum") +
           r".*corrupt.*" + re.escape(f"deleting {part}.json and rerunning the same command"))
    with pytest.raises(ValueError, match=msg):
        ckpt.load_layer(copy, 1)
    with pytest.raises(ValueError, match=msg):
        ckpt.Reader(copy).layer(1)
    with pytest.raises(ValueError, match=msg):
        ckpt.verify(copy)
    ckpt.load_layer(copy, 0)                      # the other layer is intact


def test_flipped_globals_bytes_raise_naming_globals_and_array(copy):
    part = os.path.join(copy, "globals")
    changed = _flip(part, decodes=True)
    msg = (re.escape(f"{part}: array '{changed[0]}' does not match its checksum") +
           r".*" + re.escape(f"deleting {part}.json and rerunning the same command"))
    with pytest.raises(ValueError, match=msg):
        ckpt.load_globals(copy)
    with pytest.raises(ValueError, match=msg):
        ckpt.Reader(copy).globals()


def test_flipped_e2e_bytes_raise_naming_e2e_and_array(copy):
    part = os.path.join(copy, "e2e")
    changed = _flip(part, decodes=True)
    msg = (re.escape(f"{part}: array '{changed[0]}' does not match its checksum") +
           r".*" + re.escape(f"deleting {part}.json and rerunning the same command"))
    with pytest.raises(ValueError, match=msg):
        ckpt.load_e2e(copy)
    with pytest.raises(ValueError, match=msg):
        ckpt.Reader(copy)


def test_undecodable_layer_file_raises_naming_path_and_fix(copy):
    part = _layer(copy, 0)
    _flip(part, decodes=False)
    with pytest.raises(ValueError, match=re.escape(f"{part} could not be read") + r".*" +
                       re.escape(f"deleting {part}.json and rerunning the same command")):
        ckpt.load_layer(copy, 0)


def test_checkpoint_written_before_checksums_loads_unchecked():
    assert ckpt.verify(OLD) == {"globals": False, "layers/layer_000": False,
                                "layers/layer_001": False, "layers/layer_002": False}
    r = ckpt.Reader(OLD)
    assert set(r.globals()) == {"embed_tokens", "norm.weight", "lm_head.weight"}
    groups, norms = r.layer(2)
    assert set(groups) == {"qkv", "o", "up", "down"} and "input_layernorm.weight" in norms
