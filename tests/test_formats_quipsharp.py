"""quip-sharp's packed E8P format: packing, layers, and whole Hugging Face folders."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from quipjax import codebooks
from quipjax.formats import quipsharp as qs
from quipjax.group import QuantizedGroup
from quipjax.models.adapter import LLAMA
from quipjax.models.llama import LlamaSpec
from quipjax.pipeline import checkpoint as ckpt
from quipjax.quantize import QuantizedLinear

CODEBOOKS = ("E8P12", "E8P12RVQ3B", "E8P12RVQ4B")


def random_codes(rng, codebook, m, n):
    if codebook == "E8P12":
        return rng.integers(0, 1 << 16, (m, n // 8)).astype(np.uint16)
    c = rng.integers(0, 1 << 16, (m, n // 8, 2)).astype(np.uint16)
    if codebook == "E8P12RVQ3B":
        c[..., 1] = rng.integers(0, 256, (m, n // 8))
    return c


def u64(qidxs):
    assert qidxs.dtype == np.int64
    return qidxs.view(np.uint64)


# ----------------------------------------------------------------------------- packing

@pytest.mark.parametrize("codebook", CODEBOOKS)
@pytest.mark.parametrize("shape", [(16, 64), (32, 128), (48, 192), (960, 576), (576, 1536)])
def test_pack_unpack_identity(codebook, shape):
    m, n = shape
    rng = np.random.default_rng(m + n)
    codes = random_codes(rng, codebook, m, n)
    q = qs.pack_qidxs(codes, codebook)
    assert q.dtype == np.int64 and q.shape == qs.qidxs_shape(codebook, m, n)
    assert q.shape[1] == {"E8P12": n // 32, "E8P12RVQ4B": n // 16, "E8P12RVQ3B": 3 * n // 64}[codebook]
    if m * n >= 32768:
        assert 0.4 < np.mean(q < 0) < 0.6           # unsigned bit fields: about half negative
    for arg in (q, q.view(np.uint64)):             # int64 as stored, or the words as uint64
        back = qs.unpack_qidxs(arg, qs.CODEBOOK_IDS[codebook], m, n)
        assert back.dtype == np.uint16 and np.array_equal(back, codes)
    # the words decode straight to the codebook's values (kernel-style reader)
    ref = qs.reference_decode(q, codebook, m, n)
    ours = np.asarray(codebooks.get(codebook).decode(codes), np.float64).reshape(m, n)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


def test_hand_built_e8p_words():
    """16 x 64 weight: 8 codes per row, words (16, 2). Word (row pair p, code pair q) has
    codes 0..3 = (2p, 2q), (2p+1, 2q), (2p, 2q+1), (2p+1, 2q+1); low bytes = code >> 8 in
    that order; high bit 4j + i = sign bit j of code i. The (8, 4) words [p, q] are
    (m/16, 8, n/64, 4) -> (m/16, n/64, 8, 4): flat position 4 p + q of the (16, 2) tensor."""
    codes = np.zeros((16, 8), np.uint16)
    # word p=0, q=0 (flat 0 -> [0, 0]):
    codes[0, 0] = 0x1234   # code 0: byte0 0x12; signs 0x34 = bits 2,4,5 -> nibbles 2,4,5 bit 0
    codes[1, 0] = 0xFF80   # code 1: byte1 0xFF; signs 0x80 = bit 7      -> nibble 7 bit 1
    codes[0, 1] = 0x0201   # code 2: byte2 0x02; signs 0x01 = bit 0      -> nibble 0 bit 2
    codes[1, 1] = 0xABFF   # code 3: byte3 0xAB; signs 0xFF              -> every nibble bit 3
    # low = 0xAB_02_FF_12; nibbles 7..0 of high = A(2+8) 8 9(1+8) 9 8 9 8 C(4+8)
    w00 = 0xA899898C_AB02FF12
    # row 15 = pair 7 (second row), column 7 = pair 3 (second code): code 3 of word p=7, q=3,
    # flat 31 -> [15, 1]; byte3 0x01; signs 0x02 = bit 1 -> nibble 1 bit 3 = 0x80
    codes[15, 7] = 0x0102
    w15_1 = 0x00000080_01000000
    # row 2 = pair 1 (first row), column 4 = pair 2 (first code): code 0 of word p=1, q=2,
    # flat 6 -> [3, 0]; byte0 0x00; signs 0xFF -> bit 0 of every nibble
    codes[2, 4] = 0x00FF
    w3_0 = 0x11111111_00000000
    # row 5 = pair 2 (second row), column 3 = pair 1 (second code): code 3 of word p=2, q=1,
    # flat 9 -> [4, 1]; byte3 0x07, no signs
    codes[5, 3] = 0x0700
    w4_1 = 0x00000000_07000000
    expect = np.zeros((16, 2), np.uint64)
    expect[0, 0], expect[15, 1], expect[3, 0], expect[4, 1] = w00, w15_1, w3_0, w4_1
    q = qs.pack_qidxs(codes, "E8P12")
    assert np.array_equal(u64(q), expect)
    assert q[0, 0] == w00 - (1 << 64)          # as stored: a negative int64
    assert np.array_equal(qs.unpack_qidxs(q, 7, 16, 64), codes)


def test_hand_built_transpose_32x128():
    """32 x 128: words [p, q] (16, 8) viewed (2, 8, 2, 4) = [a, b, c, d] (p = 8a + b,
    q = 4c + d), stored in the order (a, c, b, d): flat 64 a + 32 c + 4 b + d of (32, 4)."""
    codes = np.zeros((32, 16), np.uint16)
    codes[0, 8] = 0x0100    # p=0 (a0 b0), q=4 (c1 d0), code 0: flat 32 -> [8, 0]; byte0 1
    codes[16, 0] = 0x0001   # p=8 (a1 b0), q=0, code 0: flat 64 -> [16, 0]; sign bit 0 -> bit 32
    codes[31, 15] = 0xFFFF  # p=15 (a1 b7), q=7 (c1 d3), code 3: flat 127 -> [31, 3]
    codes[9, 5] = 0x2A81    # p=4 (a0 b4), q=2 (c0 d2), code 3: flat 18 -> [4, 2]
    expect = np.zeros((32, 4), np.uint64)
    expect[8, 0] = 0x00000000_00000001
    expect[16, 0] = 0x00000001_00000000
    expect[31, 3] = 0x88888888_FF000000   # all 8 sign bits of code 3 -> bit 3 of each nibble
    expect[4, 2] = 0x80000008_2A000000    # signs 0x81: bits 0, 7 -> nibbles 0, 7 bit 3
    q = qs.pack_qidxs(codes, "E8P12")
    assert np.array_equal(u64(q), expect)
    assert np.array_equal(qs.unpack_qidxs(q, "E8P12", 32, 128), codes)


def test_hand_built_rvq_concatenations():
    # 3 bits: [E8P words of stage 1 (16, 2) | E81B words (16, 1)], byte i = index of code i
    codes = np.zeros((16, 8, 2), np.uint16)
    codes[0, 0, 0] = 0x1234                        # -> [0, 0] = 0x00110100_00000012
    codes[0, :, 1] = [1, 2, 3, 4, 5, 6, 7, 255]    # -> [0, 2] = 0xFF07060504030201
    codes[3, 7, 1] = 128                           # -> [3, 2] = 0x80000000_00000000
    expect = np.zeros((16, 3), np.uint64)
    expect[0, 0] = 0x00110100_00000012
    expect[0, 2] = 0xFF070605_04030201
    expect[3, 2] = 0x80000000_00000000
    q = qs.pack_qidxs(codes, 18)
    assert q.shape == (16, 3) and np.array_equal(u64(q), expect)
    assert q[3, 2] == np.iinfo(np.int64).min
    assert np.array_equal(qs.unpack_qidxs(q, "E8P12RVQ3B", 16, 64), codes)
    # 4 bits: [stage 1 (16, 2) | stage 2 (16, 2)]
    codes = np.zeros((16, 8, 2), np.uint16)
    codes[2, 4, 0] = 0x00FF                        # stage 1 -> [3, 0] (see the E8P test)
    codes[15, 7, 1] = 0x0102                       # stage 2 -> [15, 2 + 1]
    expect = np.zeros((16, 4), np.uint64)
    expect[3, 0] = 0x11111111_00000000
    expect[15, 3] = 0x00000080_01000000
    q = qs.pack_qidxs(codes, "E8P12RVQ4B")
    assert np.array_equal(u64(q), expect)
    assert np.array_equal(qs.unpack_qidxs(q, 17, 16, 64), codes)


def test_dimension_and_codebook_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="m % 16 == 0 and n % 64 == 0"):
        qs.pack_qidxs(random_codes(rng, "E8P12", 24, 64), "E8P12")
    with pytest.raises(ValueError, match="n % 64 = 32"):
        qs.unpack_qidxs(np.zeros((16, 3), np.int64), "E8P12", 16, 96)
    with pytest.raises(ValueError, match="must have shape"):
        qs.unpack_qidxs(np.zeros((16, 3), np.int64), "E8P12", 16, 64)
    with pytest.raises(TypeError, match="int64"):
        qs.unpack_qidxs(np.zeros((16, 2), np.int32), "E8P12", 16, 64)
    with pytest.raises(ValueError, match="unknown quip-sharp codebook id"):
        qs.codebook_name(8)
    with pytest.raises(ValueError, match="no quip-sharp packed format"):
        qs.pack_qidxs(np.zeros((16, 64), np.uint8), "HI2")
    with pytest.raises(ValueError, match="0..255"):
        c = random_codes(rng, "E8P12RVQ4B", 16, 64)
        qs.pack_qidxs(c, "E8P12RVQ3B")


def test_official_hadamard_factors():
    # SmolLM2-135M: n = 576 (hidden), 1536 (down); m = 576, 960 (qkv), 3072 (up/gate)
    assert [qs.official_hadamard_k(d) for d in (576, 960, 1536, 3072)] == [36, 60, 12, 12]
    assert [qs.official_hadamard_k(d) for d in (4096, 11008, 5120, 13824, 28672, 22016)] == \
        [1, 172, 20, 108, 28, 172]
    # every linear of SmolLM2-135M and Llama-2-7B fits the packed layout (m, n) = (out, in)
    for m, n in ((960, 576), (576, 576), (3072, 576), (576, 1536),
                 (12288, 4096), (4096, 4096), (22016, 4096), (4096, 11008)):
        qs.check_shape(m, n)
    with pytest.raises(ValueError, match="not a power of two"):
        qs.official_hadamard_k(172 * 3)
    with pytest.raises(ValueError, match="no Hadamard transform"):
        qs.official_hadamard_k(44 * 16)        # quipjax has K = 44, the official code has not


# ----------------------------------------------------------------------------- layers

@pytest.mark.parametrize("codebook", CODEBOOKS)
def test_to_quantized_linear_is_the_official_weight(codebook):
    m, n = 320, 192                      # K = 20 (output side), 12 (input side)
    rng = np.random.default_rng(1)
    codes = random_codes(rng, codebook, m, n)
    q = qs.pack_qidxs(codes, codebook)
    su = rng.choice([-1.0, 1.0], n).astype(np.float16)
    sv = (rng.uniform(0.01, 0.1, m) * rng.choice([-1, 1], m)).astype(np.float16)
    ql = qs.to_quantized_linear(q, su, sv, qs.CODEBOOK_IDS[codebook], m, n)
    assert ql.transforms == ("hadamard", "hadamard") and ql.codebook == codebook
    ref = qs.reference_dequantize(q, su, sv, codebook, m, n)
    W = np.asarray(ql.dequantize(), np.float64)
    assert np.linalg.norm(W - ref) / np.linalg.norm(ref) < 2e-6
    # legacy Wscale is folded into SV the way the runtime does (fp16 product)
    ql2 = qs.to_quantized_linear(q, su, sv, codebook, m, n, Wscale=np.float16(2.0))
    np.testing.assert_array_equal(np.asarray(ql2.SV), 2 * np.asarray(ql.SV))
    # and back: identical official tensors
    t = qs.from_quantized_linear(ql)
    assert np.array_equal(t["Qidxs"], q) and t["Qidxs"].dtype == np.int64
    assert t["SU"].dtype == np.float16 and np.array_equal(t["SU"], su)
    assert np.array_equal(t["SV"], sv) and t["Wscale"] == 1 and t["Wscale"].shape == ()
    assert int(t["codebook_id"]) == qs.CODEBOOK_IDS[codebook] and t["codebook_id"].dtype == np.int64


def test_export_rejects_layers_the_official_code_cannot_run():
    rng = np.random.default_rng(2)
    base = dict(codes=jnp.asarray(random_codes(rng, "E8P12", 64, 128)), SU=jnp.ones(128),
                SV=jnp.ones(64), codebook="E8P12", shape=(64, 128),
                transforms=("hadamard", "hadamard"))
    qs.from_quantized_linear(QuantizedLinear(**base))
    with pytest.raises(ValueError, match="Hadamard transforms on both sides"):
        qs.from_quantized_linear(QuantizedLinear(**dict(base, transforms=("rfft", "hadamard"))))
    with pytest.raises(ValueError, match="no quip-sharp packed format"):
        qs.from_quantized_linear(QuantizedLinear(**dict(base, codebook="HI2")))
    with pytest.raises(ValueError, match="m % 16 == 0"):
        qs.from_quantized_linear(QuantizedLinear(**dict(
            base, codes=jnp.zeros((8, 16), jnp.uint16), SV=jnp.ones(8), shape=(8, 128))))


@pytest.mark.parametrize("codebook,packsz,version", [("E8P12", 4, 1),
                                                     ("E8P12RVQ3B", 2.6666666666666665, 0),
                                                     ("E8P12RVQ4B", 2, 1)])
def test_quip_params(codebook, packsz, version):
    assert qs.quip_params(codebook) == {
        "codebook": codebook, "codebook_version": version, "codesz": 8,
        "idx_dtype": "torch.int64", "lora_rank": 0, "model_version": 1, "packsz": packsz,
        "rescale_WH": False, "resid_scale_override": -1}


# ----------------------------------------------------------------------------- folders

# 2 layers; hidden 192 (K 12), qkv rows 192 + 64 + 64 = 320 (K 20), up/gate 2 x 384 = 768
SPEC = LlamaSpec(vocab_size=256, hidden_size=192, intermediate_size=384, num_layers=2,
                 num_heads=3, num_kv_heads=1, head_dim=64, rms_eps=1e-5, max_position=512,
                 bos_token_id=1, eos_token_id=2)


def _fp16(x):
    return np.asarray(x, np.float16).astype(np.float32)


def make_checkpoint(path, spec, codebook, seed=0, exact16=True, up_order=None):
    """A quipjax checkpoint with random codes (exact16: every float fp16-representable)."""
    rng = np.random.default_rng(seed)
    rnd = _fp16 if exact16 else (lambda x: np.asarray(x, np.float32))
    meta = {"model": spec.to_dict(), "tokenizer": {"kind": "hf", "path": "/nonexistent"},
            "adapter": "llama", "quantized_linears": LLAMA.linear_paths(),
            "settings": {"codebook": codebook, "seed": 0}}
    ckpt.write_meta(path, meta)
    g = {"embed_tokens": rnd(rng.normal(0, 0.5, (spec.vocab_size, spec.hidden_size))),
         "norm": rnd(rng.uniform(0.8, 1.2, spec.hidden_size))}
    if not spec.tie_embeddings:
        g["lm_head"] = rnd(rng.normal(0, 0.1, (spec.vocab_size, spec.hidden_size)))
    ckpt.save_globals(path, g)
    d, f = spec.hidden_size, spec.intermediate_size
    kv = spec.num_kv_heads * spec.head_dim
    layout = {"qkv": ((d, kv, kv), d), "o": ((d,), d), "up": ((f, f), d), "down": ((d,), f)}
    for i in range(spec.num_layers):
        groups = {}
        for gr in LLAMA.groups:
            rows, n = layout[gr.name]
            m = sum(rows)
            ql = QuantizedLinear(codes=jnp.asarray(random_codes(rng, codebook, m, n)),
                                 SU=jnp.asarray(rng.choice([-1.0, 1.0], n), jnp.float32),
                                 SV=jnp.asarray(rnd(rng.uniform(0.01, 0.03, m)
                                                    * rng.choice([-1, 1], m))),
                                 codebook=codebook, shape=(m, n),
                                 transforms=("hadamard", "hadamard"))
            members = up_order if (gr.name == "up" and up_order) else gr.members
            scales = rnd(rng.uniform(0.5, 1.5, len(rows))) if len(rows) > 1 else np.ones(1)
            groups[gr.name] = QuantizedGroup(ql=ql, scales=jnp.asarray(scales, jnp.float32),
                                                  members=tuple(members), rows=rows)
        norms = {"input_layernorm.weight": rnd(rng.uniform(0.8, 1.2, d)),
                 "post_attention_layernorm.weight": rnd(rng.uniform(0.8, 1.2, d))}
        ckpt.save_layer(path, i, groups, norms, {})


def _read_folder(path):
    from safetensors import safe_open
    out = {}
    files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    for fn in files:
        with safe_open(os.path.join(path, fn), framework="numpy") as h:
            assert h.metadata() == {"format": "pt"}
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


TOKENS = np.array([1, 5, 17, 200, 3, 99, 42, 7], np.int32)


@pytest.mark.parametrize("codebook", ["E8P12", "E8P12RVQ3B"])
def test_export_import_round_trip(tmp_path, codebook):
    src, hf, back = (str(tmp_path / s) for s in ("src", "hf", "back"))
    make_checkpoint(src, SPEC, codebook)
    qs.export_checkpoint(src, hf, log=None)

    # the official layout: names, dtypes, shapes, config
    with open(os.path.join(hf, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["quip_params"] == qs.quip_params(codebook)
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["torch_dtype"] == "float16" and cfg["num_key_value_heads"] == 1
    t = _read_folder(hf)
    p = "model.layers.1."
    cid = qs.CODEBOOK_IDS[codebook]
    for mod, m, n, fused in (("self_attn.qkv_proj", 320, 192, 3), ("self_attn.o_proj", 192, 192, 0),
                             ("mlp.upgate_proj", 768, 192, 2), ("mlp.down_proj", 192, 384, 0)):
        assert t[p + mod + ".Qidxs"].dtype == np.int64
        assert t[p + mod + ".Qidxs"].shape == qs.qidxs_shape(codebook, m, n)
        assert t[p + mod + ".SU"].dtype == np.float16 and t[p + mod + ".SU"].shape == (n,)
        assert t[p + mod + ".SV"].dtype == np.float16 and t[p + mod + ".SV"].shape == (m,)
        assert t[p + mod + ".Wscale"].shape == () and t[p + mod + ".Wscale"] == 1
        assert t[p + mod + ".codebook_id"].shape == () and t[p + mod + ".codebook_id"] == cid
        assert (p + mod + ".fuse_scales" in t) == bool(fused)
        if fused:
            assert t[p + mod + ".fuse_scales"].shape == (fused,)
    per_layer = {k[len(p):] for k in t if k.startswith(p)}
    assert len(per_layer) == 4 * 5 + 2 + 2
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= set(t)
    assert all(v.dtype == np.float16 for k, v in t.items()
               if not k.endswith((".Qidxs", ".codebook_id")))

    # import: bit-identical checkpoint, identical logits
    info = qs.import_folder(hf, back, log=None)
    assert info["dense_checked_groups"] == info["groups"] == 8
    a, _, _ = ckpt.load_layer(src, 1)
    b, _, _ = ckpt.load_layer(back, 1)
    for name in a:
        assert a[name].members == b[name].members and a[name].rows == b[name].rows
        for x, y in ((a[name].ql.codes, b[name].ql.codes), (a[name].ql.SU, b[name].ql.SU),
                     (a[name].ql.SV, b[name].ql.SV), (a[name].scales, b[name].scales)):
            assert np.array_equal(np.asarray(x), np.asarray(y))
    la, lb = qs.checkpoint_logits(src, TOKENS), qs.checkpoint_logits(back, TOKENS)
    assert np.isfinite(la).all() and la.std() > 0.1
    assert np.array_equal(la, lb)

    # and out again: the same official tensors
    qs.export_checkpoint(back, str(tmp_path / "hf2"), log=None)
    t2 = _read_folder(str(tmp_path / "hf2"))
    assert set(t2) == set(t) and all(np.array_equal(t[k], t2[k]) for k in t)


def test_float32_export_is_lossless_and_fp16_rounds(tmp_path):
    src = str(tmp_path / "src")
    make_checkpoint(src, SPEC, "E8P12RVQ4B", seed=3, exact16=False)
    qs.export_checkpoint(src, str(tmp_path / "hf32"), float_dtype="float32", log=None)
    qs.import_folder(str(tmp_path / "hf32"), str(tmp_path / "b32"), log=None)
    la = qs.checkpoint_logits(src, TOKENS)
    assert np.array_equal(la, qs.checkpoint_logits(str(tmp_path / "b32"), TOKENS))
    qs.export_checkpoint(src, str(tmp_path / "hf16"), log=None)       # official fp16
    qs.import_folder(str(tmp_path / "hf16"), str(tmp_path / "b16"), verify=False, log=None)
    l16 = qs.checkpoint_logits(str(tmp_path / "b16"), TOKENS)
    assert 0 < np.abs(l16 - la).max() < 1e-2 * np.abs(la).max()


def test_export_refuses_gate_up_order_and_import_reads_shards(tmp_path):
    spec = LlamaSpec(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=1,
                     num_heads=2, num_kv_heads=2, head_dim=32, tie_embeddings=True)
    src = str(tmp_path / "old")
    make_checkpoint(src, spec, "E8P12", up_order=("mlp.gate_proj", "mlp.up_proj"))
    with pytest.raises(ValueError, match="cannot be reordered"):
        qs.export_checkpoint(src, str(tmp_path / "x"), log=None)
    assert not os.path.exists(str(tmp_path / "x"))

    # an official-format folder written tensor by tensor: sharded, legacy Wscale != 1
    from safetensors.numpy import save_file
    good = str(tmp_path / "good")
    make_checkpoint(good, spec, "E8P12", seed=5)
    hf = str(tmp_path / "hf")
    info = qs.export_checkpoint(good, hf, max_shard_bytes=20000, log=None)
    assert len(info["files"]) > 1 and os.path.exists(os.path.join(hf, "model.safetensors.index.json"))
    t = _read_folder(hf)
    assert "lm_head.weight" not in t                   # tied, as save_pretrained drops it
    name = "model.layers.0.mlp.down_proj."
    t[name + "SV"] = (t[name + "SV"].astype(np.float32) / 4).astype(np.float16)
    t[name + "Wscale"] = np.array(4.0, np.float16)
    with open(os.path.join(hf, "model.safetensors.index.json")) as f:
        wm = json.load(f)["weight_map"]
    for fn in set(wm.values()):
        save_file({k: t[k] for k in wm if wm[k] == fn}, os.path.join(hf, fn),
                  metadata={"format": "pt"})
    back = str(tmp_path / "back")
    qs.import_folder(hf, back, log=None)
    g0, _, _ = ckpt.load_layer(good, 0)
    g1, _, _ = ckpt.load_layer(back, 0)
    assert g1["up"].members == ("mlp.up_proj", "mlp.gate_proj")
    np.testing.assert_array_equal(np.asarray(g1["down"].ql.SV), np.asarray(g0["down"].ql.SV))
    assert np.array_equal(qs.checkpoint_logits(good, TOKENS[:4] % 64),
                          qs.checkpoint_logits(back, TOKENS[:4] % 64))
    with pytest.raises(FileExistsError):
        qs.import_folder(hf, back, log=None)


# ----------------------------------------------------------------------------- official code

_OFFICIAL_SCRIPT = r'''
import sys, numpy as np, torch
official_dir, in_path, out_path = sys.argv[1:4]
sys.path.insert(0, official_dir); sys.argv = sys.argv[:1]
import run_official  # stubs the CUDA-only imports, puts the unmodified official lib on the path
from lib.codebook import latticee8_padded12 as e8, latticee8_padded12_rvq4bit as r4
from lib.codebook import latticee8_padded12_rvq3bit as r3
d = dict(np.load(in_path))
out = {}
for key, c in d.items():
    c = torch.from_numpy(c)
    if c.ndim == 2:
        out[key] = e8.E8P12_codebook.maybe_pack_idxs(None, c.clone()).numpy()
    else:
        cls = r4.E8P12RVQ4B_codebook if key.startswith("E8P12RVQ4B") else r3.E8P12RVQ3B_codebook
        out[key] = cls.maybe_pack_idxs(None, ((c[..., 0] << 16) + c[..., 1]).clone()).numpy()
np.savez(out_path, **out)
'''


@pytest.mark.skipif(not os.environ.get("QUIPSHARP_OFFICIAL_PYTHON"),
                    reason="set QUIPSHARP_OFFICIAL_PYTHON (a python with torch) and "
                    "QUIPSHARP_OFFICIAL_DIR (holding run_official.py and src/lib) to compare "
                    "with the official packer")
def test_pack_matches_official_code(tmp_path):
    import subprocess
    rng = np.random.default_rng(7)
    codes = {f"{cb}_{m}_{n}": random_codes(rng, cb, m, n).astype(np.int64)
             for cb in CODEBOOKS for m, n in ((32, 128), (960, 576))}
    np.savez(tmp_path / "in.npz", **codes)
    (tmp_path / "run.py").write_text(_OFFICIAL_SCRIPT)
    subprocess.run([os.environ["QUIPSHARP_OFFICIAL_PYTHON"], str(tmp_path / "run.py"),
                    os.environ.get("QUIPSHARP_OFFICIAL_DIR", "/work/baseline_official"),
                    str(tmp_path / "in.npz"), str(tmp_path / "out.npz")], check=True)
    official = dict(np.load(tmp_path / "out.npz"))
    for key, c in codes.items():
        cb = key.split("_")[0]
        assert np.array_equal(qs.pack_qidxs(c.astype(np.uint16), cb), official[key]), key
