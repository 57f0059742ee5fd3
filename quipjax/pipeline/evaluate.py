"""Perplexity by the protocol: exp(mean next-token NLL over every predicted position).

The forward runs block by block through one compiled block program (all blocks share a
structure, so XLA compiles it once), with the windows split over the devices of a
`distributed.Placement` (one device without a mesh): each device runs the one-device program
on its windows and the per-window losses are added in window order, so the value is the same
on any mesh.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Iterable, Optional

import jax.numpy as jnp
import numpy as np
from flax import nnx

from quipjax.distributed import EvalPrograms, Placement
from quipjax.distributed.processes import to_host

__all__ = ["perplexity", "forward_logits", "check_windows"]


def forward_logits(model, tokens, blocks: Optional[Iterable] = None) -> jnp.ndarray:
    """Logits (B, T, vocab) float32 of tokens (B, T) int32, running the blocks one at a time
    (one device)."""
    ev = EvalPrograms(model, blocks=blocks)
    x = ev.blocks(ev.embed(ev.put(np.asarray(tokens, np.int32))))
    return _logits(model, x)


@nnx.jit
def _logits(model, x):
    return model.head(x)


def perplexity(model, windows: np.ndarray, *, placement: Placement = Placement(),
               batch: int = 1, progress: Optional[Callable] = None,
               blocks: Optional[Iterable] = None) -> dict:
    """{"ppl", "tokens", "seconds"} over windows (k, T) int32 (T - 1 predictions each).

    placement: the devices the windows are split over (`batch` windows per device) and where
    the weights live. progress(done, total, ppl so far) after each step.
    """
    windows = np.asarray(windows, np.int32)
    check_windows(windows, model.spec.vocab_size)
    ev = EvalPrograms(model, placement, blocks)
    D = placement.devices
    G = D * batch
    total, count = 0.0, 0
    t0 = time.perf_counter()
    N, T = windows.shape
    for s in range(0, N, G):
        real = windows[s:s + G]
        # one device takes a short last batch; several pad it (and refuse a ragged device)
        tok = np.zeros((G if D > 1 else len(real), T), np.int32)
        tok[:len(real)] = real
        lo, hi = placement.local_rows(len(tok))      # this process's windows (all, with one)
        tok_d = ev.put(tok[lo:hi], len(tok))
        per_dev = to_host(ev.nll(ev.blocks(ev.embed(tok_d)), tok_d))   # (D,)
        n_real = len(real)
        for d in range(D):
            w = d * batch
            if w >= n_real:
                break
            if w + batch > n_real:
                raise ValueError(f"{N} windows with batch {batch} on {D} devices: the last "
                                 "device batch is ragged; use batch=1")
            total += float(per_dev[d])
            count += batch * (T - 1)
        if not math.isfinite(total):
            raise FloatingPointError(f"the loss of windows {s}..{s + len(real) - 1} is not finite "
                                     "(the model's activations overflow in this dtype, or its "
                                     "weights hold NaN/Inf): try --dtype=float32")
        if progress is not None:
            progress(min(s + G, N), N, math.exp(total / count))
    return {"ppl": math.exp(total / count), "tokens": count, "seconds": time.perf_counter() - t0}


def check_windows(windows: np.ndarray, vocab_size: int) -> None:
    """Windows (k, T) int32 with k >= 1, T >= 2 and every id in [0, vocab_size): a tokenizer that
    does not belong to the model would otherwise give a NaN or wrong perplexity."""
    if windows.ndim != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise ValueError(f"perplexity needs at least one window of at least 2 tokens, got "
                         f"windows of shape {windows.shape} (check --ctx_size)")
    lo, hi = int(windows.min()), int(windows.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"token ids span [{lo}, {hi}] but the model's vocabulary has "
                         f"{vocab_size} entries: the tokenizer does not belong to this model")
