"""quipjax.distributed: mesh flags, the exact Hessian reduction, and (in a subprocess with 8
simulated CPU devices) bit-identical codes and perplexity on any mesh, plus the collectives
of the compiled programs."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quipjax import distributed as shd
from quipjax import hessian

from helpers import needs_text

HERE = os.path.dirname(os.path.abspath(__file__))


def test_mesh_flag_parsing_and_errors():
    assert shd.mesh_shape("data:8") == {"data": 8, "model": 1}
    assert shd.mesh_shape("data:2,model:4") == {"data": 2, "model": 4}
    assert shd.mesh_shape(" model : 8 ") == {"data": 1, "model": 8}
    assert shd.mesh_shape(None) == {"data": 1, "model": 1}
    assert shd.parse_mesh(None) is None and shd.parse_mesh("") is None
    for ok in ("data:8", "data:2,model:4", "model:8", "data:4,model:2"):
        shd.parse_mesh(ok, n_devices=8)                       # valid for 8 devices
    bad = {
        "data:3": r"needs 3 devices but 8 devices are visible.*multiply to the device count",
        "data:2,model:2": r"needs 4 devices but 8",
        "data:16": r"needs 16 devices",
        "dta:8": r"unknown axis 'dta'.*'data'.*'model'",
        "tensor:8": r"unknown axis 'tensor'",
        "data=8": r"name:size",
        "data": r"name:size",
        "data:0": r">= 1",
        "data:x": r"positive integer",
        "data:2,data:4": r"given twice",
    }
    for spec, msg in bad.items():
        with pytest.raises(ValueError, match=msg):
            shd.parse_mesh(spec, n_devices=8)
    # with the real devices of this process (1 CPU device unless simulated)
    n = len(jax.devices())
    with pytest.raises(ValueError, match=f"but {n} cpu devices are visible"):
        shd.parse_mesh(f"data:{n + 1}")
    assert shd.parse_mesh(f"data:{n}").shape == {"data": n, "model": 1}


SIMULATE = r'''
import json, os, sys
import jax, jax.numpy as jnp
from quipjax import distributed as shd
shd.simulate_cpu_devices(int(sys.argv[1]))
jnp.ones(2).block_until_ready()
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
try:
    shd.simulate_cpu_devices(2)
    late = None
except RuntimeError as e:
    late = str(e)
print("RESULT " + json.dumps({"devices": len(jax.devices()), "nproc": os.environ["PJRT_NPROC"],
                              "pool": names.count("tf_XLAEigen"), "late": late}))
'''


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc")
def test_simulated_cpu_devices_get_four_xla_threads_each(tmp_path):
    """XLA's CPU pool has max(cores, devices) threads unless PJRT_NPROC says otherwise; with
    one thread per device the scanned fine-tuning step on data:4,model:2 deadlocked (every
    thread waiting in a collective), so `simulate_cpu_devices` asks for 4 per device."""
    script = tmp_path / "simulate.py"
    script.write_text(SIMULATE)
    env = {k: v for k, v in os.environ.items() if k not in ("PJRT_NPROC", "XLA_FLAGS")}
    env["PYTHONPATH"] = os.pathsep.join([HERE, os.path.dirname(HERE), env.get("PYTHONPATH", "")])
    got = {}
    for n, preset in ((3, None), (2, "5")):
        e = dict(env, **({"PJRT_NPROC": preset} if preset else {}))
        p = subprocess.run([sys.executable, str(script), str(n)], env=e, capture_output=True,
                           text=True, timeout=300)
        lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
        assert p.returncode == 0 and lines, p.stderr[-2000:]
        got[n] = json.loads(lines[-1][len("RESULT "):])
    want = str(max(os.cpu_count() or 1, 12))
    assert got[3]["devices"] == 3 and got[3]["nproc"] == want and got[3]["pool"] == int(want)
    assert got[2]["devices"] == 2 and got[2]["nproc"] == "5" and got[2]["pool"] == 5  # kept
    assert "before backends are initialized" in got[3]["late"]


def _plain_exact_merge(hi, lo, n_terms):
    """exact_merge in NumPy, materializing each level's terms: grids 2^e1 > 2^e2 > 2^e3 set by
    the largest |hi|, each level's terms rounded to its grid and summed, the remainders passed
    down, the sums rounded to a float32 pair."""
    f32 = np.float32
    m = np.abs(hi).max(0)
    e = np.frexp(m)[1].astype(np.int64)
    c1 = max(1, int(np.ceil(np.log2(n_terms)))) if n_terms > 1 else 1
    c2 = max(1, int(np.ceil(np.log2(2 * n_terms))))
    e1 = e + c1 - 23
    e2 = e1 - 1 + c2 - 23
    e3 = e2 - 1 + c2 - 23

    def grid(t, ee):
        u = np.ldexp(f32(1), np.clip(ee, -126, 127)).astype(f32)
        inv = np.ldexp(f32(1), np.clip(-ee, -126, 127)).astype(f32)
        return (np.round(t * inv) * u).astype(f32)
    q1 = grid(hi, e1)
    r1 = hi - q1
    q2 = [grid(r1, e2), grid(lo, e2)]
    r2 = [r1 - q2[0], lo - q2[1]]
    q3 = [grid(r, e3) for r in r2]
    # every grid sum is exact, so float64 sums equal them; each fits float32 exactly
    s1 = q1.astype(np.float64).sum(0).astype(f32)
    s2 = (q2[0].astype(np.float64).sum(0) + q2[1].astype(np.float64).sum(0)).astype(f32)
    s3 = (q3[0].astype(np.float64).sum(0) + q3[1].astype(np.float64).sum(0)).astype(f32)
    h, l = (np.asarray(a) for a in hessian.two_sum(jnp.asarray(s1), jnp.zeros_like(s1), s2))
    return tuple(np.asarray(a) for a in hessian.two_sum(jnp.asarray(h), jnp.asarray(l), s3))


def test_exact_merge_is_order_independent_and_accurate():
    rng = np.random.default_rng(0)
    S, n = 8, 257
    # double-float pairs over a wide dynamic range, with cancellation between terms
    big = rng.standard_normal((S, n)) * 10.0 ** rng.integers(-6, 9, (1, n))
    hi = big.astype(np.float32)
    lo = (big - hi.astype(np.float64)).astype(np.float32)
    hi[:, :5] = 0.0
    lo[:, :5] = 0.0                                            # all-zero entries
    hi[3, 5:9] = np.float32(1e30)
    hi[4, 5:9] = np.float32(-1e30)                              # exact cancellation
    merge = jax.jit(lambda h, l: hessian.exact_merge(h, l, S))
    ref_h, ref_l = (np.asarray(a) for a in merge(hi, lo))
    for seed in range(4):
        p = np.random.default_rng(seed).permutation(S)
        h, l = (np.asarray(a) for a in merge(hi[p], lo[p]))
        np.testing.assert_array_equal(h, ref_h)
        np.testing.assert_array_equal(l, ref_l)
    # the same bits as the three grid sums written plainly over the whole stack (the loop
    # over the terms only bounds the temporaries)
    np.testing.assert_array_equal(ref_h, _plain_exact_merge(hi, lo, S)[0])
    np.testing.assert_array_equal(ref_l, _plain_exact_merge(hi, lo, S)[1])
    exact = hi.astype(np.float64).sum(0) + lo.astype(np.float64).sum(0)
    got = ref_h.astype(np.float64) + ref_l.astype(np.float64)
    # as accurate as the (hi, lo) float32 pair holding the result (~2^-48 of its value), on a
    # grid set by the largest term (exact cancellations keep 2^-57 of it)
    scale = np.maximum(np.abs(exact), np.abs(hi).max(0).astype(np.float64)) + 1e-300
    assert np.max(np.abs(got - exact) / scale) < 2.0 ** -47
    # a merged accumulator finalizes like hessian.merge of the same terms
    st = [hessian.update(hessian.init(16), jnp.asarray(rng.standard_normal((64, 16)), jnp.float32))
          for _ in range(S)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *st)
    merged = jax.jit(lambda s: hessian.merge_slots(s, S, ()))(stacked)
    seq = st[0]
    for s in st[1:]:
        seq = hessian.merge(seq, s)
    np.testing.assert_allclose(np.asarray(hessian.finalize(merged).H),
                               np.asarray(hessian.finalize(seq).H), rtol=1e-6, atol=1e-7)
    assert float(hessian.finalize(merged).count) == S * 64


SCRIPT = r'''
import json, os, sys, time
import jax, jax.numpy as jnp, numpy as np
from quipjax import codebooks, distributed as shd, rht
shd.simulate_cpu_devices(8)     # and 32 XLA CPU threads: see its docstring
assert len(jax.devices()) == 8, jax.devices()
from quipjax.group import group_key
from quipjax.models import loaders
from quipjax.pipeline import checkpoint as ckpt
from quipjax.pipeline.run import quantize_model
from quipjax.pipeline.settings import BlockTuneSettings, E2ESettings, QuantSettings, RunConfig
from quipjax.quantize import lifted_stages, quantize_linear, quantize_stack
from helpers import TINY as SPEC, make_hf_folder

tmp = sys.argv[1]
out = {{}}
make_hf_folder(os.path.join(tmp, "m"), SPEC)

# 1. the whole pipeline (FP ppl, Hessians, quantization, quantized ppl), each mesh with its
#    own cache, so every stage runs on that mesh
ppl = {{}}
for mesh in (None, "data:8", "data:2,model:4"):
    os.environ["QUIPJAX_CACHE"] = os.path.join(tmp, f"cache_{{mesh}}")
    cfg = RunConfig(model=os.path.join(tmp, "m"), output_dir=os.path.join(tmp, f"run_{{mesh}}"),
                    settings=QuantSettings(seed=3), devset_size=10, ctx_size=64,
                    eval_ctx_size=64, eval_datasets=("c4",), dtype="bfloat16", batch_size=1,
                    mesh=mesh)
    t = time.time()
    m = quantize_model(cfg, log=lambda *a: None)
    ppl[str(mesh)] = m["ppl"]
    out.setdefault("seconds", {{}})[str(mesh)] = time.time() - t
out["ppl"] = ppl

# 2. a run killed on one mesh resumes on another with the same result
class Killed(KeyboardInterrupt):
    pass
os.environ["QUIPJAX_CACHE"] = os.path.join(tmp, "cache_data:8")
real = ckpt.save_layer
calls = {{"n": 0}}
def dying(*a, **k):
    if calls["n"] == 1:
        raise Killed()
    calls["n"] += 1
    return real(*a, **k)
ckpt.save_layer = dying
cfg = RunConfig(model=os.path.join(tmp, "m"), output_dir=os.path.join(tmp, "run_resumed"),
                settings=QuantSettings(seed=3), devset_size=10, ctx_size=64, eval_ctx_size=64,
                eval_datasets=("c4",), dtype="bfloat16", evaluate=False, mesh="model:8")
try:
    quantize_model(cfg, log=lambda *a: None)
except Killed:
    pass
ckpt.save_layer = real
out["killed_layers_done"] = [ckpt.layer_done(cfg.output_dir, i) for i in range(SPEC.num_layers)]
quantize_model(RunConfig(**{{**cfg.__dict__, "mesh": "data:4,model:2"}}), log=lambda *a: None)

def arrays(d):
    res = {{}}
    for i in range(SPEC.num_layers):
        groups, norms, _ = ckpt.load_layer(d, i)
        for g, q in groups.items():
            for f in ("codes", "SU", "SV"):
                res[f"{{i}}.{{g}}.{{f}}"] = np.asarray(getattr(q.ql, f))
            res[f"{{i}}.{{g}}.scales"] = np.asarray(q.scales)
        for k, v in norms.items():
            res[f"{{i}}.{{k}}"] = np.asarray(v)
    return res
ref = arrays(os.path.join(tmp, "run_None"))
out["n_arrays"] = len(ref)
out["differ"] = {{}}
for name in ("data:8", "data:2,model:4", "resumed"):
    other = arrays(os.path.join(tmp, f"run_{{name}}"))
    out["differ"][name] = [k for k in ref if not np.array_equal(ref[k], other[k])]
hd = {{m: os.path.join(tmp, f"cache_{{m}}", "hessians") for m in ("None", "data:8", "data:2,model:4")}}
hs = {{}}
for m, d in hd.items():
    sub = os.path.join(d, os.listdir(d)[0])
    hs[m] = [dict(np.load(os.path.join(sub, f"layer_{{i:03d}}.npz"))) for i in range(SPEC.num_layers)]
out["hessians_equal"] = {{m: all(np.array_equal(hs["None"][i][k], hs[m][i][k])
                               for i in range(SPEC.num_layers) for k in hs["None"][i])
                         for m in ("data:8", "data:2,model:4")}}

# 3. collectives in the compiled programs
src = loaders.open_checkpoint(os.path.join(tmp, "m"))
out["hlo"] = {{}}
for name in ("data:8", "data:2,model:4"):
    mesh = shd.parse_mesh(name)
    eng = shd.HessianEngine(loaders.load_block(src, 0, jnp.bfloat16), shd.Placement(mesh), 8)
    out["hlo"][name] = {{
        "hessian_step": shd.collectives(eng.lower_step((8, 32, SPEC.hidden_size)).compile().as_text()),
        "hessian_reduce": shd.collectives(eng.lower_reduce().compile().as_text())}}
    rng = np.random.default_rng(0)
    Ws = [rng.standard_normal((96, 64)).astype(np.float32) for _ in range(3)]
    X = rng.standard_normal((256, 64))
    H = (X.T @ X / 256).astype(np.float32)
    lift = shd.ShardLift(mesh)
    st = lifted_stages(lift, (rht.rotation(96), rht.rotation(64)), codebooks.get("E8P12"), 0, 128)
    Wst, Hst = lift.put(np.stack(Ws[:1] * 8)), lift.put(np.stack([H] * 8))
    kd = lift.put(np.stack([np.asarray(jax.random.key_data(group_key(0, i, 0))) for i in range(8)]))
    low = {{"rotate": st["rotate"].lower(Wst, Hst, kd, jnp.float32(0.01), jnp.float32(0.9))}}
    r = st["rotate"](Wst, Hst, kd, jnp.float32(0.01), jnp.float32(0.9))
    low["ldl"] = st["ldl"].lower(r.H)
    low["round"] = st["round"].lower(r.W, st["ldl"](r.H))
    for k, l in low.items():
        out["hlo"][name]["quantize_" + k] = shd.collectives(l.compile().as_text())

# 4. quantize_stack == quantize_linear, also with tune passes, nearest rounding and the
#    float64 retry of an H that float32 cannot factor
mesh = shd.parse_mesh("data:4,model:2")
rng = np.random.default_rng(1)
Ws = [rng.standard_normal((48, 64)).astype(np.float32) for _ in range(3)]
X = rng.standard_normal((512, 64)) @ rng.standard_normal((64, 64))
H = (X.T @ X / 512).astype(np.float32)
Hbad = np.diag(np.r_[np.ones(63), 1e-9]).astype(np.float32)
keys = [jax.random.key(i) for i in range(3)]
import quipjax.quantize as qmod
real64 = qmod.factor_float64
retries = {{"n": 0}}
def counting(*a, **k):
    retries["n"] += 1
    return real64(*a, **k)
qmod.factor_float64 = counting
same = {{}}
for kw in ({{}}, {{"tune_iters": 1}}, {{"rounding": "nearest"}}, {{"sigma_reg": 0.0}}):
    # Hbad with key 0 fails the float32 Cholesky (tests/test_quantize.py::test_float64_retry)
    Hs = [Hbad, H, H] if kw.get("sigma_reg") == 0.0 else [H, H, H]
    got = quantize_stack(Ws, Hs, keys, lift=shd.ShardLift(mesh), **kw)
    ok = True
    for W, Hh, k, g in zip(Ws, Hs, keys, got):
        r = quantize_linear(W, Hh, key=k, **kw)
        ok &= all(np.array_equal(np.asarray(getattr(r, f)), np.asarray(getattr(g, f)))
                  for f in ("codes", "SU", "SV"))
    same[json.dumps(kw)] = bool(ok)
out["stack_equals_linear"] = same
out["float64_retries"] = retries["n"]      # once in quantize_stack, once in quantize_linear

# 5. fine-tuning with sharded parameters (model axis) and batches (data axis): runs, keeps the
#    codes of each layer's first group (quantized before any tuning), and tunes
os.environ["QUIPJAX_CACHE"] = os.path.join(tmp, "cache_None")
ft = BlockTuneSettings(epochs=1, train_size=8, valid_size=4, bs=4, update_freq=1, ctx_size=32)
e2e = E2ESettings(epochs=1, train_size=8, valid_size=4, bs=4, ctx_size=32)
out["ft_ppl"] = {{}}
for mesh in (None, "data:4,model:2"):
    cfg = RunConfig(model=os.path.join(tmp, "m"), output_dir=os.path.join(tmp, f"run_ft_{{mesh}}"),
                    settings=QuantSettings(seed=3), devset_size=10, ctx_size=64,
                    eval_ctx_size=64, eval_datasets=("c4",), dtype="bfloat16", mesh=mesh, ft=ft,
                    e2e=e2e)
    t = time.time()
    out["ft_ppl"][str(mesh)] = quantize_model(cfg, log=lambda *a: None)["ppl"]
    out["seconds"][f"ft_{{mesh}}"] = time.time() - t
ft_arr = arrays(cfg.output_dir)
out["ft_first_group_same"] = all(np.array_equal(ref[f"{{i}}.qkv.codes"], ft_arr[f"{{i}}.qkv.codes"])
                                 for i in range(SPEC.num_layers))
print("RESULT " + json.dumps(out))
'''


@needs_text
def test_eight_simulated_devices_identical_codes_and_collectives(tmp_path):
    script = tmp_path / "run8.py"
    script.write_text(textwrap.dedent(SCRIPT.format()))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    for k in ("PJRT_NPROC", "XLA_FLAGS"):    # the script's own simulate_cpu_devices decides
        env.pop(k, None)
    p = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True,
                       text=True, timeout=1200)
    lines = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stderr[-4000:]
    r = json.loads(lines[-1][len("RESULT "):])
    print(json.dumps({k: r[k] for k in ("ppl", "ft_ppl", "seconds", "hlo")}))   # with pytest -s

    # codes, SU, SV, fuse scales and norms of every layer: bit-identical on every mesh, and
    # after a run killed on one mesh and resumed on another
    assert r["n_arrays"] > 0
    assert r["differ"] == {"data:8": [], "data:2,model:4": [], "resumed": []}, r["differ"]
    assert r["killed_layers_done"] == [True, False, False]
    assert r["hessians_equal"] == {"data:8": True, "data:2,model:4": True}
    # FP and quantized perplexity: the same floats
    assert r["ppl"]["data:8"] == r["ppl"]["None"] and r["ppl"]["data:2,model:4"] == r["ppl"]["None"]
    assert r["ppl"]["None"]["quantized"]["c4"] > 1

    for mesh, h in r["hlo"].items():
        # the Hessian reduction is an all-reduce; the per-window step communicates nothing
        # but the model-sharded weights (all-gather)
        assert h["hessian_reduce"]["all-reduce"] >= 1, (mesh, h)
        step = h["hessian_step"]
        assert step["all-reduce"] == 0 and step["all-to-all"] == 0, (mesh, step)
        assert (step["all-gather"] > 0) == (mesh == "data:2,model:4"), (mesh, step)
        # independent per-matrix quantization: no collective at all
        for k in ("quantize_rotate", "quantize_ldl", "quantize_round"):
            assert sum(h[k].values()) == 0, (mesh, k, h[k])
    assert all(r["stack_equals_linear"].values()), r["stack_equals_linear"]
    assert r["float64_retries"] == 2
    # fine-tuning on data:4,model:2 (sharded parameters and batches): the codes of each
    # layer's first group (quantized before any tuning) are the one-device ones; the tuned
    # model is close to the one-device tuned model but not bit-equal (gradients are summed
    # over devices in another order)
    assert r["ft_first_group_same"]
    one, many = r["ft_ppl"]["None"], r["ft_ppl"]["data:4,model:2"]
    for stage in ("before_e2e", "quantized"):
        assert abs(many[stage]["c4"] / one[stage]["c4"] - 1) < 0.02, (one, many)
