"""The trellis codebooks through the whole pipeline: quantize, resume, reload, fine-tune."""
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from quipjax import codebooks
from quipjax.pipeline import checkpoint as ckpt
from quipjax.pipeline import evaluate
from quipjax.pipeline.build import build_model
from quipjax.pipeline.quantization import check_model
from quipjax.pipeline.run import quantize_model
from quipjax.pipeline.settings import BlockTuneSettings, E2ESettings, QuantSettings, RunConfig

from helpers import TINY as SPEC, make_hf_folder, needs_text, quantized_in_memory

HERE = os.path.dirname(os.path.abspath(__file__))


@needs_text
def test_trellis_run_resumes_reloads_and_tunes(tmp_path, monkeypatch, run_killed):
    path = str(tmp_path / "tiny_hf")
    make_hf_folder(path, SPEC)
    monkeypatch.setenv("QUIPJAX_CACHE", str(tmp_path / "cache"))
    cfg = RunConfig(model=path, output_dir=str(tmp_path / "a"),
                    settings=QuantSettings(codebook="HYB2", seed=2), devset_size=4, ctx_size=64,
                    eval_ctx_size=64, eval_datasets=("c4",), dtype="float32", batch_size=2)
    m = quantize_model(cfg, log=lambda *a: None)
    assert m["ppl"]["quantized"]["c4"] > 1
    cb = codebooks.get("HYB2")
    g0, _, _ = ckpt.load_layer(cfg.output_dir, 0)
    qkv = g0["qkv"].ql
    assert qkv.codebook == "HYB2" and qkv.codes.dtype == np.uint16
    assert qkv.codes.shape == cb.codes_shape(*qkv.shape) == (qkv.shape[0] // 16,
                                                                qkv.shape[1] // 16, 32)
    # 2 bits per weight for the codes; SU / SV (and the fuse scales) on top
    assert 2.0 < m["bits_per_weight"] < 3.0

    # killed after one layer, resumed: the same codes
    cfg_b = RunConfig(**{**cfg.__dict__, "output_dir": str(tmp_path / "b"), "evaluate": False})
    run_killed(quantize_model, cfg_b)
    assert ckpt.layer_done(cfg_b.output_dir, 0) and not ckpt.layer_done(cfg_b.output_dir, 1)
    quantize_model(cfg_b, log=lambda *a: None)
    for i in range(SPEC.num_layers):
        ga, _, _ = ckpt.load_layer(cfg.output_dir, i)
        gb, _, _ = ckpt.load_layer(cfg_b.output_dir, i)
        for name in ga:
            np.testing.assert_array_equal(np.asarray(ga[name].ql.codes),
                                          np.asarray(gb[name].ql.codes))

    # the reloaded checkpoint is the model quantized in memory (quantize_group, same keys)
    mem = quantized_in_memory(path, str(tmp_path / "cache"), cfg.settings)
    disk = build_model(cfg.output_dir, dtype=jnp.float32)
    tok = jnp.asarray(np.random.default_rng(4).integers(0, SPEC.vocab_size, (2, 30)))
    np.testing.assert_allclose(np.asarray(evaluate.forward_logits(disk, tok)),
                               np.asarray(evaluate.forward_logits(mem, tok)), atol=1e-5)

    # in-block and end-to-end fine-tuning run on trellis codes (the codes stay fixed), the
    # HYB tables tuned too (--ft_train_table, --e2e_train_table)
    cfg_c = RunConfig(**{**cfg.__dict__, "output_dir": str(tmp_path / "c"), "evaluate": False,
                         "ft": BlockTuneSettings(epochs=1, lr=1e-3, susv_lr=5e-3, bs=2,
                                                 train_size=6, valid_size=2, ctx_size=64,
                                                 train_table=True),
                         "e2e": E2ESettings(epochs=3, lr=1e-3, susv_lr=5e-3, bs=2,
                                            train_size=6, valid_size=2, ctx_size=64,
                                            train_table=True),
                         "tune_dtype": "float32"})
    quantize_model(cfg_c, log=lambda *a: None)
    e2e = json.load(open(os.path.join(cfg_c.output_dir, "ft_curves.json")))["e2e"]
    assert len(e2e) >= 2 and os.path.exists(os.path.join(cfg_c.output_dir, "e2e.json"))
    gc, _, _ = ckpt.load_layer(cfg_c.output_dir, 0)
    assert not gc["qkv"].su_is_signs                      # the tuned SU was saved
    np.testing.assert_array_equal(np.asarray(gc["qkv"].ql.codes), np.asarray(qkv.codes))
    # the in-block stage tuned and saved the qkv table (it tunes after qkv, o and up)
    assert gc["qkv"].ql.table is not None and gc["down"].ql.table is None
    assert np.abs(np.asarray(gc["qkv"].ql.table) - np.asarray(cb.default_table())).max() > 0
    over = ckpt.load_e2e(cfg_c.output_dir)[0][0]["groups"]
    assert len(over["qkv"]) == 3                          # (SU, SV, table): tuned ones kept
    # the tables reach every stand-in alike: the codes path = the dequantized weights
    by_codes = build_model(cfg_c.output_dir, linears="codes", dtype=jnp.float32)
    dense = build_model(cfg_c.output_dir, linears="dequantized", dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(evaluate.forward_logits(by_codes, tok)),
                               np.asarray(evaluate.forward_logits(dense, tok)), atol=1e-4)

    # experiments/proxy_table.py reads the per-layer records of both runs side by side
    p = subprocess.run([sys.executable, os.path.join(HERE, "..", "experiments", "proxy_table.py"),
                        f"--runs={cfg.output_dir},{cfg_c.output_dir}", "--layers=1"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    pa, pc = ckpt.layer_info(cfg.output_dir, 1)["proxy"], ckpt.layer_info(cfg_c.output_dir, 1)["proxy"]
    for g in pa:
        assert (f"| 1 | {g} | {pa[g]:.5f} | {pc[g]:.5f} ({pc[g] / pa[g]:.2f}x) |"
                in p.stdout.splitlines()), p.stdout


def test_train_table_needs_a_table():
    cfg = RunConfig(settings=QuantSettings(codebook="E8P12"),
                    ft=BlockTuneSettings(epochs=1, train_table=True))
    with pytest.raises(ValueError, match="--ft_train_table tunes the value table .* HYB2"):
        cfg.check()
    RunConfig(settings=QuantSettings(codebook="HYB3"),
              ft=BlockTuneSettings(epochs=1, train_table=True)).check()
    # recorded in the checkpoint's identity only when on (earlier checkpoints still resume)
    assert "train_table" not in RunConfig().finetune_meta()
    assert RunConfig(e2e=E2ESettings(train_table=True)).finetune_meta()["e2e_train_table"]


def test_trellis_needs_16_row_tiles():
    """A model whose output dimension is no multiple of 16 is refused before any work."""
    spec = SPEC.__class__(**{**SPEC.__dict__, "num_kv_heads": 1, "head_dim": 8, "num_heads": 3,
                             "hidden_size": 48})           # fused q, k, v: 24 + 8 + 8 = 40 rows
    check_model(spec, "E8P12")
    with pytest.raises(ValueError, match="group qkv .* 40 output rows, not a multiple of 16"):
        check_model(spec, "HYB2")
    cb = codebooks.get("1MAD2")
    assert cb.shape_multiple == (16, 16) and codebooks.get("E8P12").shape_multiple == (1, 8)
    with pytest.raises(ValueError, match="multiple of 16"):
        cb.check_shape(24, 32)
