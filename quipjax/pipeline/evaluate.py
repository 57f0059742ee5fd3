"""Perplexity by the protocol: exp(mean next-token NLL over every predicted position).

The forward runs block by block through one compiled block function (all blocks share a
structure, so XLA compiles it once), which also lets a model too large for memory stream its
blocks from disk.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["run_block", "embed", "nll_sum", "nll_sum_fn", "perplexity", "forward_logits"]


@nnx.jit
def run_block(block, x):
    """x (B, T, d) float32 -> block(x) with positions 0..T-1."""
    return block(x, jnp.arange(x.shape[1]))


@nnx.jit
def embed(model, tokens):
    return model.embed(tokens)


def nll_sum_fn(model, x, tokens):
    """Sum of -log p(tokens[:, t+1] | ...) over t, from the last hidden states x (B, T, d).
    (`model` needs only `.head`.)"""
    logits = model.head(x[:, :-1])
    logz = jax.nn.logsumexp(logits, -1)
    tgt = jnp.take_along_axis(logits, tokens[:, 1:, None], -1)[..., 0]
    return jnp.sum(logz - tgt)


nll_sum = nnx.jit(nll_sum_fn)


@nnx.jit
def _logits(model, x):
    return model.head(x)


def forward_logits(model, tokens, blocks: Optional[Iterable] = None) -> jax.Array:
    """Logits (B, T, vocab) float32, running the blocks one at a time."""
    x = embed(model, jnp.asarray(tokens))
    for block in (blocks if blocks is not None else model.layers):
        x = run_block(block, x)
    return _logits(model, x)


def perplexity(model, windows: np.ndarray, *, batch: int = 1, progress: Optional[Callable] = None,
               blocks: Optional[Iterable] = None, mesh=None) -> dict:
    """{"ppl", "tokens", "seconds"} over windows (k, T) int32 (T - 1 predictions each).

    mesh: split the windows over the devices of a `jax.sharding.Mesh` (`batch` windows per
    device) with the weights placed by `quipjax.sharding.RULES`; same value as without."""
    if mesh is not None:
        from quipjax import sharding
        return sharding.perplexity(model, windows, mesh, batch=batch, progress=progress,
                                   blocks=blocks)
    windows = np.asarray(windows, np.int32)
    total, count = 0.0, 0
    t0 = time.perf_counter()
    layers = list(blocks) if blocks is not None else list(model.layers)
    for i in range(0, len(windows), batch):
        tok = jnp.asarray(windows[i:i + batch])
        x = embed(model, tok)
        for block in layers:
            x = run_block(block, x)
        total += float(nll_sum(model, x, tok))
        count += tok.shape[0] * (tok.shape[1] - 1)
        if progress is not None:
            progress(min(i + batch, len(windows)), len(windows), math.exp(total / count))
    return {"ppl": math.exp(total / count), "tokens": count,
            "seconds": time.perf_counter() - t0}
