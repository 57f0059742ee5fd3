"""Fixtures shared by the tests (helpers.py holds the plain functions they are built on)."""
import pytest

from quipjax.pipeline import checkpoint as ckpt

from helpers import make_hf_folder, write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """(path, in-memory model) of the tiny HF folder (session-wide: do not modify it)."""
    path = str(tmp_path_factory.mktemp("tiny_hf"))
    return path, make_hf_folder(path)


@pytest.fixture
def run_killed(monkeypatch):
    """run_killed(job, cfg): run job(cfg), interrupted as it saves its second layer; the
    checkpoint writer is restored afterwards."""
    def run(job, cfg):
        calls = {"n": 0}
        real_save = ckpt.save_layer

        def dying_save(*a, **k):
            if calls["n"] == 1:
                raise KeyboardInterrupt("killed")
            calls["n"] += 1
            return real_save(*a, **k)

        monkeypatch.setattr(ckpt, "save_layer", dying_save)
        with pytest.raises(KeyboardInterrupt):
            job(cfg, log=lambda *a: None)
        monkeypatch.setattr(ckpt, "save_layer", real_save)
    return run


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny_ckpt"))
    return path, write_tiny_checkpoint(path)


@pytest.fixture(scope="session")
def tiny_ckpt_e2e(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny_ckpt_e2e"))
    return path, write_tiny_checkpoint(path, seed=1, e2e=True)


# the longest tests first, so that with two xdist workers neither waits on one at the end
_FIRST = ("test_sharding.py", "test_finetune.py", "test_readme.py", "test_cli_errors.py",
          "test_trellis_pipeline.py", "test_kernels_pallas_trellis.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda it: next((i for i, f in enumerate(_FIRST) if it.nodeid.startswith(
        "tests/" + f)), len(_FIRST)))
