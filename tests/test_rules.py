"""quipjax.rules on a small NNX transformer quipjax has never seen (not its Llama): q/k/v
nnx.Linear, o an nnx.LinearGeneral over (heads, head_dim), the MLP nnx.Einsum (one kernel
stored transposed, one with a 2-D output), an nnx.Embed, nnx.RMSNorms, an nnx.Linear head.

Sizes are chosen so that only two (shape, codebook) configurations are quantized (q+k+v and
up+gate are both (64, 32) E8P12; o and down both (32, 32) E8P12RVQ4B): the cost of these tests
is the compilation of the quantization stages per configuration."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import quipjax
from quipjax import rules as qr
from quipjax.layers.generic import CodesMember

D, HEADS, KV, HD, F, V, T, B = 32, 4, 2, 8, 32, 64, 8, 2


class Attention(nnx.Module):
    def __init__(self, rngs):
        self.q_proj = nnx.Linear(D, HEADS * HD, rngs=rngs)
        self.k_proj = nnx.Linear(D, KV * HD, use_bias=False, rngs=rngs)
        self.v_proj = nnx.Linear(D, KV * HD, rngs=rngs)
        self.o_proj = nnx.LinearGeneral((HEADS, HD), D, axis=(-2, -1), rngs=rngs)

    def __call__(self, x):
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, HEADS, HD)
        k, v = (jnp.repeat(p(x).reshape(b, t, KV, HD), HEADS // KV, axis=2)
                for p in (self.k_proj, self.v_proj))
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(HD)
        s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -1e30)
        return self.o_proj(jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v))


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Einsum("btd,df->btf", (D, F), (F,), rngs=rngs)
        self.gate = nnx.Einsum("...d,fd->...f", (F, D), rngs=rngs)       # kernel (out, in)
        self.down = nnx.Einsum("...f,fhe->...he", (F, 2, D // 2), (2, D // 2), rngs=rngs)

    def __call__(self, x):
        y = self.down(jax.nn.silu(self.gate(x)) * self.up(x))
        return y.reshape(x.shape)


class Block(nnx.Module):
    def __init__(self, rngs):
        self.attn_norm = nnx.RMSNorm(D, rngs=rngs)
        self.attn = Attention(rngs)
        self.mlp_norm = nnx.RMSNorm(D, rngs=rngs)
        self.mlp = MLP(rngs)

    def __call__(self, x):
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class TinyLM(nnx.Module):
    def __init__(self, rngs):
        self.embed = nnx.Embed(V, D, rngs=rngs)
        self.layers = nnx.List([Block(rngs) for _ in range(2)])
        self.norm = nnx.RMSNorm(D, rngs=rngs)
        self.lm_head = nnx.Linear(D, V, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.norm(x))


def make_model():
    model = TinyLM(nnx.Rngs(0))
    # non-zero biases, so that keeping them is checked
    for _, m in nnx.iter_modules(model):
        if isinstance(getattr(m, "bias", None), nnx.Param):
            m.bias[...] = 0.1 * jax.random.normal(jax.random.key(7), m.bias.shape)
    return model


BATCHES = [np.random.default_rng(i).integers(0, V, (B, T)).astype(np.int32) for i in range(3)]

RULES = [
    quipjax.Rule(r".*attn\.(q|k|v)_proj", codebook="E8P12"),
    quipjax.Rule(r".*mlp\.down", codebook="E8P12RVQ4B"),
    quipjax.Rule(r"layers\.1\.mlp\.(up|gate)", skip=True),
    quipjax.Rule(r".*mlp\.(up|gate)", codebook="E8P12"),
    quipjax.Rule(r".*o_proj", codebook="E8P12RVQ4B", sigma_reg=2e-2),
    quipjax.Rule(r".*lm_head|.*embed.*|.*norm", skip=True),
]


@pytest.fixture(scope="module")
def setup():
    model = make_model()
    stats = quipjax.calibrate(model, RULES, BATCHES)
    groups = qr.quantize_groups(model, RULES, stats, key=jax.random.key(0))
    codes = qr.apply_groups(model, stats, groups, linears="codes")
    deq = qr.apply_groups(model, stats, groups, linears="dequantized")
    return model, stats, groups, codes, deq


class Spy(nnx.Module):
    """Test-only: keeps the concrete inputs of an eagerly called linear."""

    def __init__(self, inner, sink):
        self.inner = inner
        self.sink = nnx.static(sink)

    def __call__(self, x):
        self.sink.append(np.asarray(x, np.float64))
        return self.inner(x)


def test_groups_and_hessians(setup):
    model, stats, _, _, _ = setup
    plan = quipjax.find_groups(model, RULES, BATCHES[0])
    assert plan == stats.plan
    names = {g.name: g.paths for g in plan.groups}
    assert names == {
        "layers.0.attn.q_proj+k_proj+v_proj": ("layers.0.attn.q_proj", "layers.0.attn.k_proj",
                                              "layers.0.attn.v_proj"),
        "layers.1.attn.q_proj+k_proj+v_proj": ("layers.1.attn.q_proj", "layers.1.attn.k_proj",
                                              "layers.1.attn.v_proj"),
        "layers.0.attn.o_proj": ("layers.0.attn.o_proj",),
        "layers.1.attn.o_proj": ("layers.1.attn.o_proj",),
        "layers.0.mlp.gate+up": ("layers.0.mlp.gate", "layers.0.mlp.up"),   # call order
        "layers.0.mlp.down": ("layers.0.mlp.down",),
        "layers.1.mlp.down": ("layers.1.mlp.down",),
    }, names
    g = plan.group("layers.0.attn.o_proj")
    assert (g.members[0].in_shape, g.members[0].out_shape) == ((HEADS, HD), (D,))
    g = plan.group("layers.1.mlp.down")
    assert (g.members[0].in_shape, g.members[0].out_shape, g.rows) == ((F,), (2, D // 2), (D,))
    assert plan.group("layers.0.attn.q_proj+k_proj+v_proj").rows == (HEADS * HD, KV * HD, KV * HD)
    # independent reference: the inputs each group's first member saw, float64 NumPy
    spy = nnx.clone(model)
    sinks = {}
    for name, g in ((n, plan.group(n)) for n in names):
        sinks[name] = []
        qr.set_module(spy, g.paths[0], Spy(qr.get_module(spy, g.paths[0]), sinks[name]))
    for b in BATCHES:
        spy(b)
    for name, g in names.items():
        X = np.concatenate([x.reshape(-1, plan.group(name).n) for x in sinks[name]])
        assert X.shape[0] == len(BATCHES) * B * T
        H = X.T @ X / X.shape[0]
        got = stats.hessians[name]
        assert float(got.count) == X.shape[0]
        np.testing.assert_allclose(np.asarray(got.H, np.float64), H, rtol=0,
                                   atol=2e-6 * np.abs(H).max(), err_msg=name)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)


def jit_logits(model, tokens):
    """Logits of split/merge + jax.jit (one compilation per graphdef: the dequantized model
    shares the FP model's, a restored codes model the codes model's)."""
    return _forward(*nnx.split(model), tokens)


def test_mixed_precision_codes_equal_dequantized(setup):
    model, stats, groups, codes, deq = setup
    # the rules' codebooks, per group, in the codes model's kernels
    book = {p: codes.layers[i].attn.q_proj.group.codes.get_value().codebook
            for i, p in enumerate(("l0", "l1"))}
    assert book == {"l0": "E8P12", "l1": "E8P12"}
    assert codes.layers[0].mlp.down.group.codes.get_value().codebook == "E8P12RVQ4B"
    assert codes.layers[1].attn.o_proj.group.codes.get_value().codebook == "E8P12RVQ4B"
    assert codes.layers[0].mlp.up.group.codes.get_value().codebook == "E8P12"
    # q, k, v share one CodesGroup (one RHT of the input, one product)
    att = codes.layers[0].attn
    assert att.q_proj.group is att.k_proj.group is att.v_proj.group
    matched = {p for g in stats.plan.groups for p in g.paths}
    fp_state = nnx.to_flat_state(nnx.state(model))
    for name, dq in (("codes", codes), ("dequantized", deq)):
        for path, mod in nnx.iter_modules(dq):
            p = ".".join(map(str, path))
            assert isinstance(mod, CodesMember) == (name == "codes" and p in matched), p
        # skipped and unmatched linears (layers.1.mlp.up/gate, lm_head), the embedding and the
        # norms: the FP model's arrays, bit for bit
        flat = dict(nnx.to_flat_state(nnx.state(dq)))
        for key, v in fp_state:
            p = ".".join(map(str, key))
            if not any(p.startswith(m + ".") for m in matched):
                np.testing.assert_array_equal(np.asarray(flat[key][...]), np.asarray(v[...]),
                                              err_msg=f"{name}: {p}")
    assert isinstance(codes.layers[1].mlp.up, nnx.Einsum)
    # the input model is untouched
    assert isinstance(model.layers[0].attn.q_proj, nnx.Linear)
    x = BATCHES[0]
    fp, lc, ld = (np.asarray(jit_logits(m, x)) for m in (model, codes, deq))
    # Both sides compute in float32: the codes model rotates the input (Hadamard), multiplies
    # by the decoded codes and rotates back; the dense one multiplies by What formed in
    # float32. They differ by the float32 rounding of sums of <= 64 terms per linear,
    # ~1e-6 relative per linear through 2 blocks (1.2e-6 of max|logits| measured): 2e-5 of
    # max|logits| bounds it, far below the quantization error itself (checked > 1e-2).
    scale = np.abs(ld).max()
    np.testing.assert_allclose(lc, ld, rtol=0, atol=2e-5 * scale)
    assert np.abs(fp - ld).max() > 1e-2 * scale
    # the dequantized weights are those of the quantized groups, in the module's layout
    g = groups["layers.0.mlp.down"]
    W = np.asarray(g.dequantize_members()[0])                  # (D, F) = (out, in)
    k = np.asarray(deq.layers[0].mlp.down.kernel[...])         # (F, 2, D // 2)
    np.testing.assert_array_equal(k.reshape(F, D).T, W)
    g = groups["layers.0.mlp.gate+up"]
    np.testing.assert_array_equal(np.asarray(deq.layers[0].mlp.gate.kernel[...]),
                                  np.asarray(g.dequantize_members()[0]))   # kernel (F, D)


def test_jit_and_orbax_roundtrip(setup, tmp_path):
    import orbax.checkpoint as ocp
    _, stats, _, codes, _ = setup
    x = BATCHES[1]
    eager = np.asarray(codes(x))
    jitted = np.asarray(jit_logits(codes, x))
    # XLA may fuse the jitted program differently from the eager op-by-op one: float32
    # rounding only
    np.testing.assert_allclose(jitted, eager, rtol=0, atol=1e-6 * np.abs(eager).max())
    graphdef, state = nnx.split(codes)
    ck = ocp.StandardCheckpointer()
    ck.save(os.path.join(tmp_path, "q"), state)
    ck.wait_until_finished()
    # a fresh abstract model: the FP constructor, zero placeholder codes, no quantization
    abstract = nnx.eval_shape(lambda: qr.apply_groups(make_model(), stats, qr.empty_groups(stats)))
    gd2, target = nnx.split(abstract)
    restored = ck.restore(os.path.join(tmp_path, "q"), target)
    back = nnx.merge(gd2, restored)
    assert back.layers[0].mlp.down.group.codes.get_value().codebook == "E8P12RVQ4B"
    for (k1, a), (k2, b) in zip(nnx.to_flat_state(state), nnx.to_flat_state(nnx.state(back))):
        assert k1 == k2
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v), err_msg=str(k1))
    np.testing.assert_array_equal(np.asarray(jit_logits(back, x)), jitted)


def test_keys_and_errors(setup):
    model, stats, groups, _, _ = setup
    again = qr.quantize_groups(model, RULES, stats, key=jax.random.key(0))
    other = qr.quantize_groups(model, RULES, stats, key=jax.random.key(1))
    for name, g in groups.items():
        np.testing.assert_array_equal(np.asarray(again[name].ql.codes), np.asarray(g.ql.codes))
        np.testing.assert_array_equal(np.asarray(again[name].ql.SV), np.asarray(g.ql.SV))
        assert not np.array_equal(np.asarray(other[name].ql.SU), np.asarray(g.ql.SU)), name
    # a group's key depends on its name only: another rule set (layer 1 skipped) gives the
    # same codes for layer 0
    fewer = [quipjax.Rule(r"layers\.1\..*", skip=True)] + RULES
    st = quipjax.calibrate(model, fewer, BATCHES)
    assert {g.name for g in st.plan.groups} < set(groups)
    sub = qr.quantize_groups(model, fewer, st, key=jax.random.key(0))
    name = "layers.0.attn.q_proj+k_proj+v_proj"
    np.testing.assert_array_equal(np.asarray(sub[name].ql.codes), np.asarray(groups[name].ql.codes))

    x = BATCHES[0]
    with pytest.raises(ValueError, match=r"rule 1 .*\.\*nothing.* matches no module"):
        quipjax.find_groups(model, [RULES[0], quipjax.Rule(r".*nothing")], x)
    with pytest.raises(ValueError, match=r"rule 0 .*attn_norm.* matches layers\.0\.attn_norm, a "
                                         r"flax\.nnx.*RMSNorm.*not a supported linear"):
        quipjax.find_groups(model, [quipjax.Rule(r".*attn_norm")], x)
    with pytest.raises(ValueError, match=r"rule 0 .*matches embed, a .*Embed"):
        quipjax.find_groups(model, [quipjax.Rule(r"embed")], x)
    with pytest.raises(ValueError, match=r"matches layers\.0, a .*Block"):
        quipjax.find_groups(model, [quipjax.Rule(r"layers\.0")], x)
    mixed = [quipjax.Rule(r".*k_proj", codebook="E8P12RVQ4B"), quipjax.Rule(r".*(q|v)_proj")]
    with pytest.raises(ValueError, match=r"group layers\.0\.attn\.q_proj\+k_proj\+v_proj: .*"
                                         r"same codebook and settings"):
        quipjax.find_groups(model, mixed, x)
    # explicit groups separate them (and then each gets its own settings)
    split = [quipjax.Rule(r".*k_proj", codebook="E8P12RVQ4B", group="k"),
             quipjax.Rule(r".*(q|v)_proj", group="qv")]
    plan = quipjax.find_groups(model, split, x)
    assert {g.name: g.paths for g in plan.groups} == {
        f"layers.{i}.attn.{n}": tuple(f"layers.{i}.attn.{c}_proj" for c in n)
        for i in (0, 1) for n in ("qv", "k")}
    # calibrating with one rule set and quantizing with another grouping is refused
    with pytest.raises(ValueError, match="calibrate again"):
        qr.quantize_groups(model, RULES[:1] + [quipjax.Rule(r".*", skip=True)], stats,
                           key=jax.random.key(0))
    with pytest.raises(ValueError, match="not a valid regex"):
        quipjax.Rule("(")
    with pytest.raises(ValueError, match="unknown codebook"):
        quipjax.Rule(".*", codebook="E9")


def test_einsum_layouts():
    assert qr.einsum_layout("...d,fd->...f", (6, 4)) == ((4,), (6,), (1, 0))
    assert qr.einsum_layout("btd,dhk->bthk", (4, 2, 3)) == ((4,), (2, 3), (0, 1, 2))
    assert qr.einsum_layout("bthk,hkd->btd", (2, 3, 4)) == ((2, 3), (4,), (0, 1, 2))
    for eq in ("bhd,hdf->bhf",          # h shared by input, kernel and output (batched)
               "...d,df->f...",         # outputs not trailing
               "dt,df->tf",             # contracted axis not trailing
               "...d,dff->...f"):
        assert qr.einsum_layout(eq, (4, 5, 6)[:len(eq.split(",")[1].split("-")[0])]) is None, eq
    # shapes and attributes only: abstract modules (no initialization is run)
    m = nnx.eval_shape(lambda: nnx.Einsum("bhd,hdf->bhf", (2, 8, 4), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"nnx\.Einsum 'bhd,hdf->bhf' is not a plain matmul"):
        qr.linear_kind(m).layout("x", m)
    lg = nnx.eval_shape(lambda: nnx.LinearGeneral(8, 4, axis=0, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"axis=\(0,\).*needs axis=\(-1,\)"):
        qr.linear_kind(lg).layout("x", lg)
    e = nnx.eval_shape(lambda: nnx.Einsum("...hd,fhd->...f", (4, 2, 8), rngs=nnx.Rngs(1)))
    assert qr.linear_kind(e).layout("x", e) == ((2, 8), (4,))


def test_explicit_groups_calibrate(setup):
    model, stats, _, _, _ = setup
    split = [quipjax.Rule(r"layers\.0\.attn\.(q|v)_proj", group="qv"),
             quipjax.Rule(r".*", skip=True)]
    st = quipjax.calibrate(model, split, BATCHES[:1])
    assert [g.name for g in st.plan.groups] == ["layers.0.attn.qv"] and st.plan.groups[0].explicit
    # the Hessian of q and v's input: the first batch's part of the q+k+v group's input
    auto = quipjax.calibrate(model, [quipjax.Rule(r"layers\.0\.attn\.(q|k|v)_proj"),
                                     quipjax.Rule(r".*", skip=True)], BATCHES[:1])
    np.testing.assert_array_equal(np.asarray(st.hessians["layers.0.attn.qv"].H),
                                  np.asarray(auto.hessians["layers.0.attn.q_proj+k_proj+v_proj"].H))
    assert len(jax.tree.leaves(st)) == 3                 # a pytree: H, mean, count
    # an explicit group whose members read different values (up and down of one MLP)
    bad = [quipjax.Rule(r"layers\.0\.mlp\.(up|down)", group="ud"), quipjax.Rule(r".*", skip=True)]
    with pytest.raises(ValueError, match=r"explicit group\(s\) \['layers\.0\.mlp\.ud'\]: the "
                                         r"members' inputs differ"):
        quipjax.calibrate(model, bad, BATCHES[:1])
