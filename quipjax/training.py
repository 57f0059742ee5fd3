"""Training with optax: the loop both fine-tuning stages use, and their losses.

`tune` trains an NNX module in place: optax Adam with one learning rate for the sign vectors
su/sv (`quipjax.layers.TunableQuantLinear`) and another for every other trainable
(`optax.multi_transform`), gradient accumulation (`optax.MultiSteps`), jitted steps, a
validation pass per epoch, the best state kept, early stopping. The losses: `block_mse`
(in-block: the FP block's outputs on the FP inputs) and `distill_kl` (end to end: KL from the
FP model's next-token distribution, computed in chunks of positions).
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Iterable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from quipjax.layers.tunable import SUSV

__all__ = ["TuneConfig", "make_optimizer", "susv_labels", "tune", "block_mse", "distill_kl",
           "model_forward", "model_hidden", "StackedBlocks", "stacked_blocks", "loss_chunk"]


class TuneConfig(NamedTuple):
    """Hyperparameters of one tuning run (defaults: the paper's in-block settings)."""

    epochs: int = 5
    lr: float = 5e-5           # everything but su/sv
    susv_lr: float = 5e-4      # su and sv
    batch_size: int = 4
    update_freq: int = 2       # batches per optimizer step (gradient accumulation)
    early_stop: int = 3        # stop after this many epochs without a better validation loss
    seed: int = 0


def susv_labels(params) -> object:
    """A label tree for `optax.multi_transform`: "susv" for su/sv leaves, "other" elsewhere."""
    def label(path, _):
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        return "susv" if any(n in SUSV for n in names) else "other"
    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(params, lr: float, susv_lr: float, update_freq: int = 1):
    """Adam with lr for su/sv = susv_lr and lr elsewhere, stepping every `update_freq` calls."""
    tx = optax.multi_transform({"susv": optax.adam(susv_lr), "other": optax.adam(lr)},
                               susv_labels(params))
    return optax.MultiSteps(tx, every_k_schedule=update_freq) if update_freq > 1 else tx


def block_mse(block, batch) -> jax.Array:
    """Mean squared error of block(x) against the FP block's outputs. batch = (x, y) (B, T, d)."""
    x, y = batch
    out = block(x, jnp.arange(x.shape[1]))
    return jnp.mean(jnp.square(out - y))


class StackedBlocks(nnx.Module):
    """`n` blocks whose structure repeats with a period p (block i is shaped as block i mod p;
    p = 1 for blocks of one structure) in the form `model_hidden` scans over: `blocks[i]`
    holds block i's `nnx.Param`s (its other variables emptied to (0,) placeholders),
    `rests[j]` one block whose other variables are those of blocks j, j + p, ... stacked on a
    leading axis (its Params emptied). Made by `stacked_blocks`."""

    def __init__(self, blocks: list, rests: list):
        self.blocks, self.rests = nnx.List(blocks), nnx.List(rests)

    def __len__(self) -> int:
        return len(self.blocks)

    def parts(self) -> tuple:
        """(graphdefs, Params, rests): per position j of the period, its graphdef, the Params
        of blocks j, j + p, ... stacked, and the stacked rest."""
        p = len(self.rests)
        split = [nnx.split(b, nnx.Param, ...) for b in self.blocks]
        return ([split[j][0] for j in range(p)], _period_stacks(split, p, 1),
                [nnx.split(r, nnx.Param, ...)[2] for r in self.rests])


def _periodic(layers) -> Optional[tuple]:
    """(p, [(graphdef, params, rest)] of each layer, `nnx.split(layer, nnx.Param, ...)`) for
    the smallest period p < len(layers) such that each layer i has the structure and shapes
    of layer i mod p (p = 1: one structure; Gemma 3: 5 local layers and a global one), else
    None."""
    split = [nnx.split(layer, nnx.Param, ...) for layer in layers]
    keys = [(g, jax.tree.map(jnp.shape, (pa, r))) for g, pa, r in split]
    n = len(layers)
    for p in range(1, n):
        if n % p == 0 and all(keys[i] == keys[i % p] for i in range(p, n)):
            return p, split
    return None


def _stacked(states: list):
    """One state whose arrays are those of `states` (one structure) stacked on a new axis 0."""
    return jax.tree.map(lambda *a: jnp.stack(a), *states)


def _period_stacks(split: list, p: int, k: int) -> list:
    """Per position j of the period p: part k (1: Params, 2: the rest) of the splits of
    blocks j, j + p, ... stacked (`_stacked`)."""
    return [_stacked([sp[k] for sp in split[j::p]]) for j in range(p)]


def _emptied(state):
    return jax.tree.map(lambda a: jnp.zeros((0,), a.dtype), state)


@contextlib.contextmanager
def stacked_blocks(model):
    """Hold `model.layers` as one `StackedBlocks` inside the `with` (blocks whose structure
    repeats with a period, see `StackedBlocks`; otherwise nothing changes): every variable
    but the Params stacked once, the Params left per block; at exit, the blocks as they were,
    with the values they have then (trained ones too).

    Why: `model_hidden` scans such blocks over their stacked variables. Stacked inside a
    jitted step, the stack is a copy of every block's weights made at every step (SmolLM2's
    tunable model: 0.48 GB of float32 R); stacked here, the blocks' own copies are dropped.
    The Params stay per block so that an optimizer sees the leaves it saw before (XLA rounds
    Adam's update of a (L, n) array and of L (n,) arrays differently in a few elements). Same
    values and the same step otherwise: the same bits."""
    layers = list(model.layers)
    found = _periodic(layers) if len(layers) > 1 else None
    if found is None:
        yield model
        return
    p, split = found
    del layers, found         # no reference to the blocks' own arrays may outlive the stacking
    rests = [nnx.merge(split[j][0], _emptied(split[j][1]), r)
             for j, r in enumerate(_period_stacks(split, p, 2))]
    model.layers = StackedBlocks([nnx.merge(g, pa, _emptied(r)) for g, pa, r in split], rests)
    del split, rests
    try:
        yield model
    finally:
        stacked = model.layers
        p = len(stacked.rests)
        rests = [nnx.split(r, nnx.Param, ...)[2] for r in stacked.rests]
        blocks = []
        for i, b in enumerate(stacked.blocks):
            g, pa, _ = nnx.split(b, nnx.Param, ...)
            blocks.append(nnx.merge(g, pa, jax.tree.map(lambda a, k=i // p: a[k], rests[i % p])))
        model.layers = nnx.List(blocks)


def model_hidden(model, tokens, remat: bool = True) -> jax.Array:
    """Last hidden states (B, T, d) float32 of a `Llama` (before the final norm), each block
    rematerialized in the backward pass (memory: one block's activations plus block inputs).

    Blocks whose structure repeats with a period p (p = 1: one structure; Gemma 3's five
    local layers and one global one: p = 6) run as a `lax.scan` over their stacked variables
    (pre-stacked by `stacked_blocks`, or stacked here), p blocks per step, the step
    rematerialized: unrolled, XLA may schedule every block's recomputation at once (measured
    on CPU: SmolLM2's 30 blocks at 4 x 512 tokens kept 6.1 GB of temporaries, as without
    remat; scanned 0.9 GB). Other blocks, and every block without remat, run one after
    another."""
    pos = jnp.arange(tokens.shape[1])
    x = model.embed(tokens)
    if isinstance(model.layers, StackedBlocks):
        gdefs, params, rests = model.layers.parts()
    else:
        layers = list(model.layers)
        found = _periodic(layers) if remat and len(layers) > 1 else None
        if found is None:
            for layer in layers:
                if remat:
                    gdef, state = nnx.split(layer)
                    x = jax.checkpoint(lambda s, h, gdef=gdef: nnx.merge(gdef, s)(h, pos))(state, x)
                else:
                    x = layer(x, pos)
            return x
        p, split = found
        gdefs = [split[j][0] for j in range(p)]
        params, rests = _period_stacks(split, p, 1), _period_stacks(split, p, 2)

    def body(h, pr):
        for g, pa, r in zip(gdefs, *pr):
            h = nnx.merge(g, pa, r)(h, pos)
        return h, None
    return jax.lax.scan(jax.checkpoint(body) if remat else body, x, (params, rests))[0]


def model_forward(model, tokens, remat: bool = True) -> jax.Array:
    """Logits (B, T, vocab) float32 of a `Llama` (see `model_hidden`)."""
    return model.head(model_hidden(model, tokens, remat))


def loss_chunk(batch: int, vocab: int, most: int = 128, logits: int = 1 << 26) -> int:
    """Positions per chunk of `distill_kl`: `most`, halved while a chunk's (batch, chunk,
    vocab) float32 logits exceed `logits` elements (256 MB): 128 for SmolLM2 at batch 4
    (vocabulary 49,152), 64 for Gemma 3 (262,144)."""
    chunk = most
    while chunk > 1 and batch * chunk * vocab > logits:
        chunk //= 2
    return chunk


def distill_kl(model, batch, chunk: Optional[int] = None, teacher_head=None) -> jax.Array:
    """Mean over tokens of KL(p_fp || p_model). Same gradient as the official soft
    cross-entropy, but 0 at a perfect student, so its value reads directly.

    batch = (tokens (B, T), teacher): the FP model's log-probs (B, T, V) float32, or, with
    `teacher_head` (the graphdef of the FP model's `models.parts.Head`), (its last hidden
    states (B, T, d) float32, that head's state). The head(s) and the loss run over `chunk`
    positions at a time (default `loss_chunk(B, V)`), rematerialized, so only (B, chunk, V)
    logits are live at once; with `teacher_head` the teacher's log-probs are never whole
    either.
    """
    tokens, teacher = batch
    B, T = tokens.shape
    if chunk is None:
        chunk = loss_chunk(B, model.embed_tokens[...].shape[0])
    h = model_hidden(model, tokens)
    gdef, state = nnx.split(model)
    nc = -(-T // chunk)

    def chunks(a):
        """(B, T, ...) -> (nc, B, chunk, ...), zero-padded to nc * chunk positions."""
        a = jnp.pad(a, [(0, 0), (0, nc * chunk - T)] + [(0, 0)] * (a.ndim - 2))
        return jnp.moveaxis(a.reshape((B, nc, chunk) + a.shape[2:]), 1, 0)

    def teacher_logp(t_c):
        if teacher_head is None:
            return t_c
        return jax.lax.stop_gradient(
            jax.nn.log_softmax(nnx.merge(teacher_head, teacher[1]).head(t_c), -1))

    @jax.checkpoint
    def part(state, h_c, t_c, m_c):
        lp_c = teacher_logp(t_c)
        logq = jax.nn.log_softmax(nnx.merge(gdef, state).head(h_c), -1)
        return jnp.sum(m_c[..., None] * jnp.exp(lp_c) * (lp_c - logq))

    # a scan, so that one chunk's logits are live at a time (unrolled, XLA may run every
    # chunk's head at once)
    def step(total, xs):
        return total + part(state, *xs), None
    t = teacher if teacher_head is None else teacher[0]
    xs = (chunks(h), chunks(t), chunks(jnp.ones((B, T), jnp.float32)))
    total, _ = jax.lax.scan(step, jnp.float32(0), xs)
    return total / (B * T)


def tune(module, loss_fn: Callable, train_batches: Callable[[int], Iterable],
         valid_batches: Callable[[], Iterable], cfg: TuneConfig, trainable=nnx.Param,
         progress: Optional[Callable] = None) -> list:
    """Train `module` in place; keep the parameters with the best validation loss.

    Args:
      module: an NNX module; its `trainable` variables are trained, the rest held fixed.
      loss_fn: (module, batch) -> scalar loss; must be jit-traceable.
      train_batches: epoch -> iterable of batches (shuffled by the caller, from cfg.seed).
      valid_batches: () -> iterable of batches.
      cfg: `TuneConfig`.
      trainable: an NNX filter (default: every `nnx.Param`).
      progress: optional callable(dict) after each epoch.
    Returns:
      The curve: one dict per epoch (epoch 0 is the starting point) with the mean train loss,
      the validation loss, whether it was the best so far, and the seconds it took.
    """
    graphdef, params, rest = nnx.split(module, trainable, ...)
    tx = make_optimizer(params, cfg.lr, cfg.susv_lr, cfg.update_freq)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, rest, batch):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(nnx.merge(graphdef, p, rest), batch))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def evaluate(params, rest, batch):
        return loss_fn(nnx.merge(graphdef, params, rest), batch)

    def valid_loss(params):
        ls = [float(evaluate(params, rest, b)) for b in valid_batches()]
        return float(np.mean(ls))

    t0 = time.perf_counter()
    best = valid_loss(params)
    if not math.isfinite(best):
        raise FloatingPointError("the validation loss is not finite before tuning: check the inputs")
    best_params = params
    curve = [{"epoch": 0, "train": None, "valid": best, "best": True,
              "seconds": time.perf_counter() - t0}]
    if progress:
        progress(curve[-1])
    worse = 0
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        losses = []
        for b in train_batches(epoch):
            params, opt_state, loss = step(params, opt_state, rest, b)
            losses.append(loss)
        v = valid_loss(params)
        better = v < best
        curve.append({"epoch": epoch, "train": float(np.mean(jax.device_get(losses))), "valid": v,
                      "best": better, "seconds": time.perf_counter() - t0})
        if progress:
            progress(curve[-1])
        if better:
            best, best_params, worse = v, params, 0
        else:
            worse += 1
            if worse >= cfg.early_stop:
                break
    nnx.update(module, best_params)
    return curve
