"""The run's settings define their own flags: every flagfile parses into the dataclasses, and
the checkpoint's fine-tuning record keeps the layout of earlier releases."""
import dataclasses
import glob
import os

import pytest
from absl import flags

from quipjax.pipeline.settings import BlockTuneSettings, E2ESettings, QuantSettings, RunConfig

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments", "configs")


def _parse(argv):
    fv = flags.FlagValues()
    RunConfig.define_flags(fv)
    fv(["prog"] + argv)
    return RunConfig.from_flags(fv), fv


def test_defaults_are_the_dataclass_defaults():
    cfg, fv = _parse([])
    assert dataclasses.replace(cfg, output_dir=None) == RunConfig()
    assert cfg.output_dir == os.path.join("runs", "smollm2_135m_E8P12")
    # every field has a documented flag (nested settings with their prefixes)
    names = set(fv)
    for f in dataclasses.fields(QuantSettings):
        assert f.name in names and fv[f.name].help
    for cls, prefix in ((BlockTuneSettings, "ft_"), (E2ESettings, "e2e_")):
        for f in dataclasses.fields(cls):
            assert prefix + f.name in names and fv[prefix + f.name].help
    assert {"eval", "ft_dtype", "mesh", "hessian_shards", "eval_datasets", "calibration",
            "calibration_files", "calibration_field", "allow_repeats"} <= names


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONFIGS, "*.cfg"))),
                         ids=os.path.basename)
def test_every_flagfile_parses(path):
    cfg, _ = _parse([f"--flagfile={path}"])
    lines = [l.strip() for l in open(path) if l.strip().startswith("--")]
    for line in lines:                       # every value set in the file reached the config
        name, _, value = line[2:].partition("=")
        got = {"codebook": cfg.settings.codebook, "output_dir": cfg.output_dir,
               "ft_epochs": cfg.ft.epochs, "e2e_epochs": cfg.e2e.epochs,
               "ft_ctx_size": cfg.ft.ctx_size, "e2e_bs": cfg.e2e.bs,
               "devset_size": cfg.devset_size, "mesh": cfg.mesh,
               "allow_repeats": "" if cfg.calibration.allow_repeats else None}.get(name)
        if got is not None:
            assert str(got) == value, (name, got, value)


def test_values_land_in_the_right_dataclass_and_meta_layout():
    cfg, _ = _parse(["--ft_epochs=3", "--ft_lr=5e-4", "--e2e_epochs=4", "--e2e_lr=5e-5",
                     "--e2e_train_head", "--ft_dtype=float32", "--codebook=E8P12RVQ4B",
                     "--noeval", "--eval_datasets=c4", "--scale=1.1"])
    assert cfg.ft == BlockTuneSettings(epochs=3, lr=5e-4)
    assert cfg.e2e == E2ESettings(epochs=4, lr=5e-5, train_head=True)
    assert cfg.settings == QuantSettings(codebook="E8P12RVQ4B", scale=1.1)
    assert cfg.tune_dtype == "float32" and not cfg.evaluate and cfg.eval_datasets == ("c4",)
    meta = cfg.finetune_meta()           # the flat record checkpoints have always stored
    assert meta["epochs"] == 3 and meta["e2e_epochs"] == 4 and meta["e2e_train_head"] is True
    assert meta["compute_dtype"] == "float32" and "train_head" not in meta
    assert len(meta) == 20


@pytest.mark.parametrize("argv,match", [
    (["--ft_bs=0"], "--ft_bs must be >= 1"),
    (["--e2e_update_freq=0"], "--e2e_update_freq must be >= 1"),
    (["--ft_epochs=1", "--ft_train_size=2", "--ft_bs=4"], "in-block fine-tuning needs"),
    (["--e2e_epochs=1", "--e2e_valid_size=0"], "end-to-end fine-tuning needs"),
])
def test_stage_checks(argv, match):
    cfg, _ = _parse(argv)
    stage = cfg.ft if argv[0].startswith("--ft") else cfg.e2e
    with pytest.raises(ValueError, match=match):
        stage.check()


def test_default_output_dir_ignores_a_trailing_slash():
    from quipjax.pipeline.settings import default_output_dir
    assert default_output_dir("/models/Llama-2-7b-hf/", "E8P12") == "runs/Llama-2-7b-hf_E8P12"
    assert default_output_dir("/m/smollm.Q4.gguf", "HI2") == "runs/smollm_HI2"
    assert default_output_dir(None, "E8P12") == "runs/smollm2_135m_E8P12"
