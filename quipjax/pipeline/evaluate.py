"""Perplexity by the protocol: exp(mean next-token NLL over every predicted position).

The forward runs block by block through one compiled block program (all blocks share a
structure, so XLA compiles it once), with the windows split over the devices of a
`distributed.Placement` (one device without a mesh): each device runs the one-device program
on its windows and the per-window losses are added in window order, so the value is the same
on any mesh. With `stream` (one loader per block) the pass is layer-major instead, one block in
memory at a time, and gives the same float.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Iterable, Optional, Sequence

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
               blocks: Optional[Iterable] = None, stream: Optional[Sequence[Callable]] = None,
               stream_gb: float = 1.0) -> dict:
    """{"ppl", "tokens", "seconds"} over windows (k, T) int32 (T - 1 predictions each).

    placement: the devices the windows are split over (`batch` windows per device) and where
    the weights live. blocks: the blocks to run instead of model.layers. stream: instead, one
    loader per block (`models.load_model_streamed`, `pipeline.build.build_model_streamed`):
    the pass goes layer-major over chunks of windows (hidden states of at most `stream_gb`
    GB), so one block is in memory at a time and `model` can be a skeleton without layers;
    the value is the same float as the model-in-memory pass. progress(done, total, ppl so far
    or None) after each step: done and total count windows, with `stream` windows x blocks.
    """
    windows = np.asarray(windows, np.int32)
    check_windows(windows, model.spec.vocab_size)
    ev = EvalPrograms(model, placement, () if stream is not None else blocks)
    D = placement.devices
    G = D * batch
    N, T = windows.shape
    t0 = time.perf_counter()
    acc = _NLL(N, D, batch, T)
    starts = list(range(0, N, G))
    if stream is None:
        for s in starts:
            tok_d = _put(ev, placement, windows[s:s + G], G, D, T)
            acc.add(s, to_host(ev.nll(ev.blocks(ev.embed(tok_d)), tok_d)))
            if progress is not None:
                progress(min(s + G, N), N, acc.ppl())
        return {"ppl": acc.ppl(), "tokens": acc.count, "seconds": time.perf_counter() - t0}
    step_bytes = G * T * model.spec.hidden_size * 4
    per_chunk = max(1, int(stream_gb * 2 ** 30) // step_bytes)
    L, done = len(stream), 0
    for c in range(0, len(starts), per_chunk):
        chunk = starts[c:c + per_chunk]
        toks = [_put(ev, placement, windows[s:s + G], G, D, T) for s in chunk]
        xs = [ev.embed(t) for t in toks]
        n_win = min(chunk[-1] + G, N) - chunk[0]
        for load in stream:
            prog, leaves = ev.program(load())
            xs = [prog(leaves, x) for x in xs]
            del prog, leaves
            done += n_win
            if progress is not None:
                progress(done, N * L, None)
        for s, x, t in zip(chunk, xs, toks):
            acc.add(s, to_host(ev.nll(x, t)))
        if progress is not None:
            progress(done, N * L, acc.ppl())
    return {"ppl": acc.ppl(), "tokens": acc.count, "seconds": time.perf_counter() - t0}


def _put(ev, placement, real, G, D, T):
    """The step's windows (one device takes a short last batch; several pad it), this
    process's rows put on the devices."""
    tok = np.zeros((G if D > 1 else len(real), T), np.int32)
    tok[:len(real)] = real
    lo, hi = placement.local_rows(len(tok))      # this process's windows (all, with one)
    return ev.put(tok[lo:hi], len(tok))


class _NLL:
    """The summed NLL of steps added in window order (the same float whatever the pass)."""

    def __init__(self, N, D, batch, T):
        self.N, self.D, self.batch, self.T = N, D, batch, T
        self.total, self.count = 0.0, 0

    def add(self, s, per_dev):
        """per_dev (D,): the summed NLL of each device's windows of the step at window s."""
        n_real = min(self.N - s, self.D * self.batch)
        for d in range(self.D):
            w = d * self.batch
            if w >= n_real:
                break
            if w + self.batch > n_real:
                raise ValueError(f"{self.N} windows with batch {self.batch} on {self.D} devices: "
                                 "the last device batch is ragged; use batch=1")
            self.total += float(per_dev[d])
            self.count += self.batch * (self.T - 1)
        if not math.isfinite(self.total):
            raise FloatingPointError(f"the loss of windows {s}..{s + n_real - 1} is not finite "
                                     "(the model's activations overflow in this dtype, or its "
                                     "weights hold NaN/Inf): try --dtype=float32")

    def ppl(self):
        return math.exp(self.total / self.count)


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
