import copy
import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from quipjax import layers, training
from quipjax.distributed import HessianEngine, block_forward_fn
from quipjax.group import quantize_group
from quipjax.models import llama, loaders
from quipjax.models.adapter import get_path, set_path
from quipjax.pipeline import checkpoint as ckpt
from quipjax.pipeline import data, evaluate, hessians
from quipjax.pipeline.build import build_model
from quipjax.pipeline.quantization import BlockLayers, quantize_layers
from quipjax.pipeline.run import quantize_model
from quipjax.pipeline.settings import (BlockTuneSettings, E2ESettings, QuantSettings,
                                       RunConfig)
from quipjax.pipeline.tuning import BlockTuner
from quipjax.quantize import quantize_linear

from helpers import TINY as SPEC, make_hf_folder, needs_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _group(m=48, n=64, seed=0):
    rng = np.random.default_rng(seed)
    W = [rng.standard_normal((m, n)).astype(np.float32),
         0.5 * rng.standard_normal((m // 2, n)).astype(np.float32)]
    X = rng.standard_normal((512, n)) @ rng.standard_normal((n, n)) * 0.3
    H = (X.T @ X / len(X)).astype(np.float32)
    g = quantize_group(W, H, key=jax.random.key(seed))
    return g, W


class _Two(nnx.Module):
    def __init__(self, n, m1, m2):
        self.a = llama.Linear(n, m1)
        self.b = llama.Linear(n, m2)


def test_tunable_linear_equals_quantized_apply():
    g, _ = _group()
    host = _Two(64, 48, 24)
    host_paths = dict(g.__dict__, members=("a", "b"))
    g = type(g)(**host_paths)
    layers.attach_tunable(host, g, jnp.float32)
    assert host.a.su is host.b.su                     # one shared input-sign vector
    x = jnp.asarray(np.random.default_rng(1).standard_normal((5, 64)), jnp.float32)
    y = jnp.concatenate([host.a(x), host.b(x)], -1)
    ref = g.ql.apply(x) * jnp.repeat(g.scales, jnp.asarray(g.rows), total_repeat_length=72)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=2e-4, atol=2e-4)
    # detaching without training gives the same group back, bit for bit (SV * scale / scale
    # is not the identity in float32: it was off by an ulp for some entries). Real-valued SV,
    # as after an in-block stage (a +-1 entry would round-trip anyway)
    sv = np.random.default_rng(3).uniform(0.5, 1.5, 72).astype(np.float32) * np.asarray(g.ql.SV)
    g = dataclasses.replace(g, ql=dataclasses.replace(g.ql, SV=jnp.asarray(sv)))
    layers.attach_tunable(host, g, jnp.float32)
    back = layers.detach_tunable(host, g)
    np.testing.assert_array_equal(np.asarray(back.ql.codes), np.asarray(g.ql.codes))
    np.testing.assert_array_equal(np.asarray(back.ql.SU), np.asarray(g.ql.SU))
    np.testing.assert_array_equal(np.asarray(back.ql.SV), np.asarray(g.ql.SV))
    # a tuned entry comes back as sv / scale
    host.b.sv[...] = host.b.sv[...] * 1.5
    back = layers.detach_tunable(host, g)
    want = np.asarray(host.b.sv[...]) / np.asarray(g.scales[1])
    np.testing.assert_array_equal(np.asarray(back.ql.SV[48:]), want)
    np.testing.assert_array_equal(np.asarray(back.ql.SV[:48]), np.asarray(g.ql.SV[:48]))


def test_susv_gradient_matches_finite_differences():
    """d loss / d(su, sv) through the decoded codes is exact: compare with central differences
    of the same loss computed by `QuantizedLinear.apply` in float64."""
    rng = np.random.default_rng(2)
    W = rng.standard_normal((32, 64)).astype(np.float32)
    H = np.eye(64, dtype=np.float32)
    ql = quantize_linear(W, H, key=jax.random.key(0))
    x = rng.standard_normal((6, 64))
    t = rng.standard_normal((6, 32))
    with jax.enable_x64(True):
        ql64 = type(ql)(**{**ql.__dict__, "SU": jnp.asarray(ql.SU, jnp.float64),
                           "SV": jnp.asarray(ql.SV, jnp.float64)})
        R = jnp.asarray(np.asarray(layers.rotated_back(ql)), jnp.float64)
        x64, t64 = jnp.asarray(x), jnp.asarray(t)

        def loss_tunable(su, sv):        # the training path
            w = sv[:, None] * R * su[None, :]
            return jnp.sum(jnp.square(x64 @ w.T - t64))

        def loss_apply(su, sv):          # the inference path, rotated basis
            q = type(ql64)(**{**ql64.__dict__, "SU": su, "SV": sv})
            y = q.apply(x64.astype(jnp.float32)).astype(jnp.float64)
            return jnp.sum(jnp.square(y - t64))

        su, sv = ql64.SU, ql64.SV
        gsu, gsv = jax.grad(loss_tunable, argnums=(0, 1))(su, sv)
        eps = 1e-3
        for idx in (0, 7, 33, 63):
            e = jnp.zeros(64).at[idx].set(eps)
            fd = (loss_tunable(su + e, sv) - loss_tunable(su - e, sv)) / (2 * eps)
            np.testing.assert_allclose(float(gsu[idx]), float(fd), rtol=1e-6, atol=1e-8)
        for idx in (0, 5, 31):
            e = jnp.zeros(32).at[idx].set(eps)
            fd = (loss_tunable(su, sv + e) - loss_tunable(su, sv - e)) / (2 * eps)
            np.testing.assert_allclose(float(gsv[idx]), float(fd), rtol=1e-6, atol=1e-8)
        # the training loss is the inference layer's loss
        np.testing.assert_allclose(float(loss_tunable(su, sv)), float(loss_apply(su, sv)),
                                   rtol=1e-4)


def test_optimizer_groups_learning_rates():
    g, _ = _group()
    host = _Two(64, 48, 24)
    g = type(g)(**dict(g.__dict__, members=("a", "b")))
    layers.attach_tunable(host, g, jnp.float32)
    _, params, _ = nnx.split(host, nnx.Param, ...)
    labels = training.susv_labels(params)
    flat = {".".join(map(str, p)): v.get_value() if hasattr(v, "get_value") else v
            for p, v in nnx.to_flat_state(labels)}
    assert flat == {"a.su": "susv", "a.sv": "susv", "b.sv": "susv"}


def _tiny_block_data(seed=0, n=48, T=32):
    spec = llama.LlamaSpec(vocab_size=32, hidden_size=64, intermediate_size=96, num_layers=1,
                           num_heads=4, num_kv_heads=2, head_dim=16)
    model = llama.init_random(spec, jax.random.key(seed), scale=0.15)
    fp = model.layers[0]
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((64, 64)) * 0.5 + np.eye(64)
    x = (rng.standard_normal((n, T, 64)) @ mix).astype(np.float32)
    y = np.asarray(block_forward_fn(fp)(x))
    return spec, model, x, y


def _block_hessians(block, x):
    """{group: H} of the inputs of each linear group of `block` over windows x (B, T, d)."""
    eng = HessianEngine(copy.deepcopy(block))
    for t in range(len(x)):
        eng.step(x[t:t + 1], t)
    return {k: st.H for k, st in eng.finalize().items()}


def _quantize_block(block_or_tuner, hess, settings, tmp, name):
    """One layer through the quantization loop (Hessians and checkpoint in tmp); its groups
    and info as saved."""
    hdir, out = os.path.join(tmp, name + "_h"), os.path.join(tmp, name)
    os.makedirs(hdir, exist_ok=True)
    hessians.save_npz(hessians.layer_file(hdir, 0), **{f"H_{k}": v for k, v in hess.items()})
    hook = block_or_tuner if isinstance(block_or_tuner, BlockTuner) else BlockLayers({0: block_or_tuner})
    quantize_layers(out, hdir, settings, hook, [0])
    groups, _, info = ckpt.load_layer(out, 0)
    return groups, info


def test_inblock_tuning_lowers_heldout_block_mse(tmp_path):
    spec, model, x, y = _tiny_block_data()
    fp = model.layers[0]
    hess = _block_hessians(fp, x)
    train, valid, held = slice(0, 24), slice(24, 36), slice(36, 48)

    def train_b(epoch, stage):
        perm = np.random.default_rng([epoch, stage]).permutation(24)
        for b in range(0, 24, 4):
            i = perm[b:b + 4]
            yield jnp.asarray(x[train][i]), jnp.asarray(y[train][i])

    def valid_b():
        yield jnp.asarray(x[valid]), jnp.asarray(y[valid])

    def held_mse(block):
        return float(training.block_mse(block, (jnp.asarray(x[held]), jnp.asarray(y[held]))))

    settings = QuantSettings(codebook="E8P12")
    # the untuned quantized block, rebuilt from its codes
    groups0, _ = _quantize_block(copy.deepcopy(fp), hess, settings, str(tmp_path), "plain")
    untuned = copy.deepcopy(fp)
    for g in groups0.values():
        layers.attach_dequantized(untuned, g, jnp.float32)

    tuned = copy.deepcopy(fp)
    cfg = BlockTuneSettings(epochs=4, lr=1e-3, susv_lr=5e-3, bs=4, update_freq=1)
    tuner = BlockTuner(cfg, "float32", lambda i: (tuned, train_b, valid_b), seed=0)
    groups, info = _quantize_block(tuner, hess, settings, str(tmp_path), "tuned")
    assert set(info["curves"]) == {"qkv", "o", "up"}            # no tuning after the last group
    for c in info["curves"].values():
        assert min(e["valid"] for e in c) <= c[0]["valid"]
    # the first group's codes are those of plain quantization (same key, same FP weights)
    np.testing.assert_array_equal(np.asarray(groups["qkv"].ql.codes),
                                  np.asarray(groups0["qkv"].ql.codes))
    # the tuned block, rebuilt from its saved groups, beats the untuned one on held-out windows
    rebuilt = copy.deepcopy(tuned)
    for g in groups.values():      # back to plain Linears holding the dequantized weights
        for p in g.members:
            set_path(rebuilt, p, llama.Linear(*get_path(untuned, p).weight.shape[::-1]))
        layers.attach_dequantized(rebuilt, g, jnp.float32)
    e_untuned, e_tuned = held_mse(untuned), held_mse(rebuilt)
    assert e_tuned < 0.95 * e_untuned, (e_tuned, e_untuned)     # measured: 0.91
    np.testing.assert_allclose(held_mse(tuned), e_tuned, rtol=1e-3)


def test_inblock_tuning_that_never_improves_says_so(tmp_path):
    """A learning rate that makes every epoch worse keeps the untuned values and says so
    (Gemma 3 at SmolLM2's learning rates did this silently)."""
    spec, model, x, y = _tiny_block_data(n=16)
    fp = model.layers[0]
    hess = _block_hessians(fp, x)

    def train_b(epoch, stage):
        for b in range(0, 12, 4):
            yield jnp.asarray(x[b:b + 4]), jnp.asarray(y[b:b + 4])

    def valid_b():
        yield jnp.asarray(x[12:]), jnp.asarray(y[12:])

    logs = []
    cfg = BlockTuneSettings(epochs=2, lr=10.0, susv_lr=10.0, bs=4, update_freq=1, early_stop=2)
    tuner = BlockTuner(cfg, "float32", lambda i: (copy.deepcopy(fp), train_b, valid_b), seed=0,
                       log=logs.append)
    _, info = _quantize_block(tuner, hess, QuantSettings(codebook="E8P12"), str(tmp_path), "bad")
    assert all(not any(e["best"] for e in c[1:]) for c in info["curves"].values())
    assert len(logs) == 3 and all("no epoch lowered it" in m and "--ft_lr" in m for m in logs)


@needs_text
def test_pipeline_finetune_resume_and_e2e_lowers_kl(tmp_path, monkeypatch, run_killed):
    path = str(tmp_path / "tiny_hf")
    make_hf_folder(path, SPEC)
    monkeypatch.setenv("QUIPJAX_CACHE", str(tmp_path / "cache"))
    ftc = BlockTuneSettings(epochs=2, lr=1e-3, susv_lr=5e-3, bs=2, update_freq=1, train_size=6,
                            valid_size=2, ctx_size=64)
    e2e_cfg = E2ESettings(epochs=3, lr=1e-3, susv_lr=5e-3, bs=2, train_size=6, valid_size=2,
                          ctx_size=64)
    cfg = RunConfig(model=path, output_dir=str(tmp_path / "a"), settings=QuantSettings(seed=1),
                    devset_size=4, ctx_size=64, eval_ctx_size=64, eval_datasets=("c4",),
                    dtype="float32", ft=ftc, e2e=e2e_cfg, tune_dtype="float32")
    m = quantize_model(cfg, log=lambda *a: None)
    out = cfg.output_dir
    assert os.path.exists(os.path.join(out, "ft_curves.png"))
    curves = json.load(open(os.path.join(out, "ft_curves.json")))
    assert len(curves["in_block"]) == SPEC.num_layers
    e2e = curves["e2e"]
    assert min(c["valid"] for c in e2e[1:]) < e2e[0]["valid"]       # e2e lowers the KL
    assert "before_e2e" in m["ppl"] and "e2e_finetune" in m["seconds"]
    # tuned SU is real-valued now and is counted as float32
    g, _, _ = ckpt.load_layer(out, 0)
    assert not g["qkv"].su_is_signs

    # a run killed after one in-block layer resumes and ends with the same codes and signs
    cfg_b = RunConfig(**{**cfg.__dict__, "output_dir": str(tmp_path / "b"), "evaluate": False,
                         "e2e": E2ESettings(**{**e2e_cfg.__dict__, "epochs": 0})})
    run_killed(quantize_model, cfg_b)
    assert ckpt.layer_done(cfg_b.output_dir, 0) and not ckpt.layer_done(cfg_b.output_dir, 1)
    assert os.path.exists(os.path.join(cfg_b.output_dir, "ft_acts", "acts_001.npy"))
    quantize_model(cfg_b, log=lambda *a: None)
    for i in range(SPEC.num_layers):
        ga, na, _ = ckpt.load_layer(out, i)
        gb, nb, _ = ckpt.load_layer(cfg_b.output_dir, i)
        for name in ga:
            for f in ("codes", "SU", "SV"):
                np.testing.assert_array_equal(np.asarray(getattr(ga[name].ql, f)),
                                              np.asarray(getattr(gb[name].ql, f)))
        for k in na:
            np.testing.assert_array_equal(na[k], nb[k])

    # the e2e override is what the reloaded model uses
    with_e2e = build_model(out, dtype=jnp.float32)
    without = build_model(cfg_b.output_dir, dtype=jnp.float32)
    # ... and it is closer to the FP model on held-out windows (the c4 evaluation text)
    src = loaders.open_checkpoint(path)
    fp = loaders.load_model(src, jnp.float32)
    tok = jnp.asarray(data.eval_windows(src.tokenizer, "c4", 64)[:4])

    def kl(model):
        lp = jax.nn.log_softmax(evaluate.forward_logits(fp, tok), -1)
        lq = jax.nn.log_softmax(evaluate.forward_logits(model, tok), -1)
        return float(jnp.mean(jnp.sum(jnp.exp(lp) * (lp - lq), -1)))
    assert kl(with_e2e) < kl(without)

    # changing only the e2e settings redoes just the end-to-end stage
    cfg_c = RunConfig(**{**cfg.__dict__, "evaluate": False,
                         "e2e": E2ESettings(**{**e2e_cfg.__dict__, "epochs": 1})})
    quantize_model(cfg_c, log=lambda *a: None)
    assert len(json.load(open(os.path.join(out, "e2e.json")))["curve"]) <= 2
    np.testing.assert_array_equal(np.asarray(ckpt.load_layer(out, 0)[0]["qkv"].ql.SU),
                                  np.asarray(g["qkv"].ql.SU))


def test_chunked_distill_kl_equals_direct():
    spec = llama.LlamaSpec(vocab_size=40, hidden_size=32, intermediate_size=64, num_layers=2,
                           num_heads=4, num_kv_heads=2, head_dim=8)
    student = llama.init_random(spec, jax.random.key(0))
    teacher = llama.init_random(spec, jax.random.key(1))
    tok = jnp.asarray(np.random.default_rng(0).integers(0, 40, (2, 20)))
    lp = jax.nn.log_softmax(training.model_forward(teacher, tok, remat=False), -1)
    lq = jax.nn.log_softmax(training.model_forward(student, tok, remat=False), -1)
    direct = float(jnp.mean(jnp.sum(jnp.exp(lp) * (lp - lq), -1)))
    np.testing.assert_allclose(float(training.distill_kl(student, (tok, lp), chunk=8)), direct, rtol=1e-5)
    g = nnx.grad(lambda m: training.distill_kl(m, (tok, lp), chunk=8))(student)
    g_ref = nnx.grad(lambda m: jnp.mean(jnp.sum(jnp.exp(lp) * (lp - jax.nn.log_softmax(
        training.model_forward(m, tok, remat=False), -1)), -1)))(student)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6)
    # the teacher as hidden states and its head: its log-probs made a chunk at a time too
    from quipjax.models.parts import Head
    hd, hs = nnx.split(Head(teacher))
    hid = (training.model_hidden(teacher, tok, remat=False), hs)
    np.testing.assert_allclose(float(training.distill_kl(student, (tok, hid), chunk=8,
                                                         teacher_head=hd)), direct, rtol=1e-5)
    g2 = nnx.grad(lambda m: training.distill_kl(m, (tok, hid), chunk=8, teacher_head=hd))(student)
    for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=1e-6)


@needs_text
def test_probe_ft_lr_script_tuning_lowers_heldout_mse(tmp_path):
    """experiments/probe_ft_lr.py on a tiny model: one line per setting, and the block tuned
    in-block is closer to the FP block on the held-out windows than the untuned one."""
    path = str(tmp_path / "tiny_hf")
    make_hf_folder(path, SPEC)
    env = dict(os.environ, QUIPJAX_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "probe.json"
    args = ["--model", path, "--output_dir", str(tmp_path / "probe"), "--devset_size=4",
            "--ctx_size=64", "--eval_ctx_size=64", "--dtype=float32", "--ft_epochs=2",
            "--ft_bs=2", "--ft_update_freq=1", "--ft_train_size=6", "--ft_valid_size=2",
            "--ft_ctx_size=64", "--ft_dtype=float32", "--probe_layer=1",
            "--probe_lrs=0,1e-3/5e-3", "--probe_heldout=4", f"--json_out={out}"]
    r = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "probe_ft_lr.py")]
                       + args, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {row["setting"]: row for row in json.load(open(out))["rows"]}
    assert set(rows) == {"0", "1e-3/5e-3"}
    assert rows["1e-3/5e-3"]["heldout_block_mse"] < rows["0"]["heldout_block_mse"]
    assert all("0 epochs" in ln for ln in rows["0"]["stages"])


def _assert_block_grads_equal(stacked, plain, n):
    """The per-block gradients of a `StackedBlocks` model = those of the plain blocks, bit for
    bit (pure dicts)."""
    for i in range(n):
        pa = dict(jax.tree_util.tree_leaves_with_path(stacked[i]))
        pb = dict(jax.tree_util.tree_leaves_with_path(plain[i]))
        assert pa.keys() == pb.keys() and len(pa) > 0
        for k in pa:
            np.testing.assert_array_equal(np.asarray(pa[k]), np.asarray(pb[k]))


def test_stacked_blocks_same_bits_and_restored_with_tuned_values():
    """`stacked_blocks` (the blocks' fixed variables stacked once, outside the step; Params
    per block) gives the loss and gradients of the step that stacks them itself, bit for bit;
    the blocks keep no copy of the stacked arrays; at exit each block has its values again,
    trained ones too."""
    spec = llama.LlamaSpec(vocab_size=40, hidden_size=32, intermediate_size=64, num_layers=3,
                           num_heads=4, num_kv_heads=2, head_dim=8)
    teacher = llama.init_random(spec, jax.random.key(1))
    tok = jnp.asarray(np.random.default_rng(0).integers(0, 40, (2, 20)))
    lp = jax.nn.log_softmax(training.model_forward(teacher, tok, remat=False), -1)

    def loss_and_grad(model):
        gdef, params, rest = nnx.split(model, nnx.Param, ...)
        f = jax.jit(jax.value_and_grad(
            lambda p, r: training.distill_kl(nnx.merge(gdef, p, r), (tok, lp), chunk=8)))
        return f(params, rest)

    student = llama.init_random(spec, jax.random.key(0))
    for b in student.layers:               # a fixed (not trained) weight, as a tunable R is
        b.mlp.up_proj.weight = layers.Frozen(b.mlp.up_proj.weight[...])
    want_loss, want_grad = loss_and_grad(student)
    up = [np.array(b.mlp.up_proj.weight[...], copy=True) for b in student.layers]
    down = [np.asarray(b.mlp.down_proj.weight[...]) for b in student.layers]
    import gc
    import weakref
    old = [weakref.ref(b.mlp.up_proj.weight[...]) for b in student.layers]
    del b                                                   # the loop's last block
    with training.stacked_blocks(student) as m:
        # the stack replaces the blocks' arrays: nothing keeps the old ones alive
        gc.collect()
        assert [r() for r in old] == [None] * 3
        assert isinstance(m.layers, training.StackedBlocks) and len(m.layers) == 3
        assert m.layers.rests[0].mlp.up_proj.weight[...].shape == (3,) + up[0].shape
        assert all(b.mlp.up_proj.weight[...].shape == (0,) for b in m.layers.blocks)
        loss, grad = loss_and_grad(m)
        assert float(loss) == float(want_loss)
        got, want = nnx.to_pure_dict(grad), nnx.to_pure_dict(want_grad)
        for k in ("embed_tokens", "norm"):
            for x, y in zip(jax.tree.leaves(got[k]), jax.tree.leaves(want[k]), strict=True):
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        _assert_block_grads_equal(got["layers"]["blocks"], want["layers"], 3)
        for b in m.layers.blocks:                                # "trained" Params
            b.mlp.down_proj.weight[...] = b.mlp.down_proj.weight[...] + 1.0
    assert isinstance(student.layers, nnx.List) and len(student.layers) == 3
    for b, u, d in zip(student.layers, up, down):
        assert isinstance(b.mlp.up_proj.weight, layers.Frozen)
        np.testing.assert_array_equal(np.asarray(b.mlp.up_proj.weight[...]), u)
        np.testing.assert_array_equal(np.asarray(b.mlp.down_proj.weight[...]), d + 1.0)
        b.mlp.down_proj.weight[...] = jnp.asarray(d)
    assert float(loss_and_grad(student)[0]) == float(want_loss)


def test_teacher_hidden_states_are_each_windows_own_bits(tmp_path):
    """The e2e stage runs the teacher once per window (`teacher_hidden_states`, batches of bs
    in order) and builds its training batches from those rows in another order: exact only if
    a row's bits do not depend on the rest of its batch. Each row equals the teacher run on
    its window alone, and on shuffled batches of another size, bit for bit (bf16 matmuls)."""
    from quipjax.pipeline.tuning import set_compute_dtype, teacher_hidden_states
    spec = llama.LlamaSpec(vocab_size=40, hidden_size=32, intermediate_size=64, num_layers=2,
                           num_heads=4, num_kv_heads=2, head_dim=8)
    teacher = llama.init_random(spec, jax.random.key(1))
    set_compute_dtype(teacher, jnp.bfloat16)
    windows = np.random.default_rng(0).integers(0, 40, (7, 24)).astype(np.int32)
    f = teacher_hidden_states(teacher, windows, 3, str(tmp_path / "hidden.npy"))
    hid = np.load(f.path)
    assert hid.shape == (7, 24, 32) and hid.dtype == np.float32
    assert os.listdir(tmp_path) == ["hidden.npy"]
    run = jax.jit(lambda m, t: training.model_hidden(m, t, remat=False))
    for i in range(7):
        np.testing.assert_array_equal(np.asarray(run(teacher, windows[i:i + 1]))[0], hid[i])
    perm = np.random.default_rng(1).permutation(7)[:4]
    np.testing.assert_array_equal(np.asarray(run(teacher, windows[perm])), hid[perm])


def test_periodic_blocks_scan_with_the_unrolled_values_and_stack_in_place():
    """Gemma 3-like blocks (local, global, local, global: period 2) run under one scan of
    period-long steps (`model_hidden`), with the unrolled forward's loss and gradients (to
    float32 rounding: the scan is another XLA program); `stacked_blocks` holds one stacked
    rest per position of the period and gives the same bits as stacking inside the step; 3
    blocks of two structures (no period) run unrolled, unstacked."""
    from quipjax.models import gemma3
    spec = gemma3.Gemma3Spec(vocab_size=40, hidden_size=32, intermediate_size=64, num_layers=4,
                             num_heads=2, num_kv_heads=1, head_dim=16, sliding_window=6,
                             layer_types=("sliding_attention", "full_attention") * 2,
                             query_pre_attn_scalar=16.0)
    teacher = gemma3.init_random(spec, jax.random.key(1))
    student = gemma3.init_random(spec, jax.random.key(0))
    tok = jnp.asarray(np.random.default_rng(0).integers(0, 40, (2, 20)))
    lp = jax.nn.log_softmax(training.model_forward(teacher, tok, remat=False), -1)

    def loss_and_grad(model, remat=True):
        gdef, params, rest = nnx.split(model, nnx.Param, ...)

        def f(p, r):
            m = nnx.merge(gdef, p, r)
            lq = jax.nn.log_softmax(m.head(training.model_hidden(m, tok, remat=remat)), -1)
            return jnp.mean(jnp.sum(jnp.exp(lp) * (lp - lq), -1))
        loss, grad = jax.jit(jax.value_and_grad(f))(params, rest)
        return loss, nnx.to_pure_dict(grad)

    plain_loss, plain_grad = loss_and_grad(student, remat=False)
    loss, grad = loss_and_grad(student)
    np.testing.assert_allclose(float(loss), float(plain_loss), rtol=1e-6)
    for x, y in zip(jax.tree.leaves(grad), jax.tree.leaves(plain_grad), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-7)
    with training.stacked_blocks(student) as m:
        assert isinstance(m.layers, training.StackedBlocks) and len(m.layers.rests) == 2
        assert [r.self_attn.window for r in m.layers.rests] == [6, None]
        s_loss, s_grad = loss_and_grad(m)
        assert float(s_loss) == float(loss)
        _assert_block_grads_equal(s_grad["layers"]["blocks"], grad["layers"], 4)
    assert isinstance(student.layers, nnx.List)
    assert [b.self_attn.window for b in student.layers] == [6, None, 6, None]
    assert float(loss_and_grad(student)[0]) == float(loss)
    odd = gemma3.init_random(dataclasses.replace(spec, num_layers=3, layer_types=(
        "sliding_attention", "full_attention", "sliding_attention")), jax.random.key(2))
    assert training._periodic(list(odd.layers)) is None
    with training.stacked_blocks(odd) as m:
        assert isinstance(m.layers, nnx.List)


def test_loss_chunk_bounds_the_logits():
    assert training.loss_chunk(4, 49152) == 128          # SmolLM2: as before
    assert training.loss_chunk(4, 262144) == 64          # Gemma 3
    assert training.loss_chunk(1, 10 ** 9) == 1
    for b, v in [(4, 49152), (4, 262144), (16, 152064), (1, 32000)]:
        c = training.loss_chunk(b, v)
        assert b * c * v <= 1 << 26 or c == 1
        assert c == 128 or b * 2 * c * v > 1 << 26
