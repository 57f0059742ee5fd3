"""Text generation with a KV cache for the models of `quipjax.models` (FP or codes-based).

    out = generate(model, prompt_ids, 64)                         # greedy
    out = generate(model, prompt_ids, 64, temperature=0.7, top_p=0.9, seed=1,
                   callback=lambda i, tok: print(tok))            # sampled, streamed
    out.tokens                                                    # (B, n) int32, numpy
    tokens_per_second(model, prompt_ids, 64)                      # decode speed, compile excluded

The cache is preallocated: per layer k and v of shape (B, max_len, kv_heads, head_dim) in the
model's attention compute dtype, plus one int32 length shared by the batch (every row of a
batch has the same prompt length). Two functions are compiled once per model structure,
batch, cache length and sampling mode, and reused for every token and every call:

  * prefill: the prompt, right-padded to a multiple of `prefill_bucket` tokens (so prompts of
    similar lengths share one compilation; the padded keys sit after the real ones and are
    overwritten by the decode steps before any query can see them), writes the cache and
    samples the first new token from the logits at the last real prompt position;
  * decode step: one token per row at position `length`, writes its k/v, samples the next.

Both take the model as its `nnx.split` state leaves, with the graph definition and tree
structure as one static argument whose hash is computed once per model (hashing a GraphDef
walks the whole graph: ~20 ms per token for a 30-layer model otherwise), and donate the cache
buffers, so a step updates the cache in place. The host loop dispatches
step i + 1 before it reads token i (JAX's asynchronous dispatch), so the EOS check and the
streaming callback overlap with the computation of the next token.

Sampling: temperature 0 is greedy (argmax); otherwise logits / temperature, then top-k (k > 0)
and top-p (nucleus: the smallest set of most likely tokens whose probability reaches p), then a
categorical draw with the key fold_in(key(seed), step): the same seed gives the same tokens.

Speed note (XLA:CPU, jax 0.10): at batch 1 a bfloat16 matrix-vector product is much slower
than a float32 one (SmolLM2's tied 49152 x 576 head: ~110 ms vs ~8 ms on 2 EPYC cores), the
opposite of batched prefill; decode on CPU with float32 models.
"""
from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["KVCache", "init_cache", "forward_cached", "sample_logits", "GenerationResult",
           "generate", "tokens_per_second", "cache_dtype_of", "check_sampling"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Per-layer keys and values and the number of positions written.

    k, v: tuples (one per layer) of (B, max_len, kv_heads, head_dim) arrays (cache dtype).
    length: () int32, positions [0, length) hold the keys/values of the tokens so far.
    """

    k: tuple
    v: tuple
    length: jax.Array

    @property
    def max_len(self) -> int:
        return int(self.k[0].shape[1])


def cache_dtype_of(model) -> jnp.dtype:
    """The dtype the model's attention computes in (what `models.llama.Attention` casts k/v
    to): the cache stores k/v in it, so caching loses nothing."""
    return jnp.dtype(model.layers[0].self_attn.compute_dtype)


def init_cache(model, batch: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache for `model` (zeros, length 0). dtype: default `cache_dtype_of(model)`."""
    s = model.spec
    dtype = cache_dtype_of(model) if dtype is None else jnp.dtype(dtype)
    shape = (batch, max_len, s.num_kv_heads, s.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(s.num_layers))
    return KVCache(zeros, tuple(jnp.zeros(shape, dtype) for _ in range(s.num_layers)),
                   jnp.zeros((), jnp.int32))


def forward_cached(model, tokens: jax.Array, cache: KVCache):
    """Run `tokens` (B, T) int32 at positions length .. length + T - 1 through the blocks.

    Returns (x, cache): the final hidden states (B, T, d) float32 (before the final norm; apply
    `model.head`) and the cache with the T new positions written and length + T. The caller
    must keep length + T <= cache.max_len (the cache update would clamp, not grow).
    """
    T = tokens.shape[1]
    positions = cache.length + jnp.arange(T, dtype=jnp.int32)
    x = model.embed(tokens)
    ks, vs = [], []
    for layer, k, v in zip(model.layers, cache.k, cache.v):
        x, (k, v, _) = layer(x, positions, (k, v, cache.length))
        ks.append(k)
        vs.append(v)
    return x, KVCache(tuple(ks), tuple(vs), cache.length + T)


def sample_logits(logits: jax.Array, key: jax.Array, temperature, top_p, *, greedy: bool,
                  top_k: int = 0, use_top_p: bool = False) -> jax.Array:
    """Next tokens (B,) int32 from logits (B, V) float32.

    greedy: argmax (temperature, top_k, top_p ignored). Otherwise sample from
    softmax(logits / temperature) restricted to the top_k most likely tokens (top_k > 0) and to
    the nucleus of mass top_p (use_top_p). temperature, top_p: float32 scalars (traced);
    greedy, top_k, use_top_p: static.
    """
    if greedy:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    l = logits.astype(jnp.float32) / temperature
    V = l.shape[-1]
    if 0 < top_k < V:
        vals = jax.lax.top_k(l, top_k)[0]                        # (B, k), descending
        l = jnp.where(l < vals[..., -1:], -jnp.inf, l)
    elif use_top_p:
        vals = -jnp.sort(-l, axis=-1)                            # (B, V), descending
    if use_top_p:
        p = jax.nn.softmax(vals, -1)
        before = jnp.cumsum(p, -1) - p                          # mass of the more likely ones
        keep = jnp.sum(before < top_p, -1, keepdims=True)       # >= 1: the top token stays
        thresh = jnp.take_along_axis(vals, keep - 1, -1)
        l = jnp.where(l < thresh, -jnp.inf, l)
    return jax.random.categorical(key, l, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class _Sampler:
    """The static part of the sampling configuration (a jit static argument)."""

    greedy: bool
    top_k: int
    use_top_p: bool


class _Structure:
    """The model's graph definition and state tree structure, a jit static argument.

    Hashing an `nnx.GraphDef` walks the whole graph (~20 ms for a 30-layer model): the hash is
    computed once here, and `_structure` hands out one object per structure, so the per-token
    cache lookup of the jitted step is an identity comparison.
    """

    __slots__ = ("graphdef", "treedef", "_hash")

    def __init__(self, graphdef, treedef):
        self.graphdef, self.treedef = graphdef, treedef
        self._hash = hash((graphdef, treedef))

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return self is other or (isinstance(other, _Structure) and self._hash == other._hash
                                 and self.treedef == other.treedef
                                 and self.graphdef == other.graphdef)


_STRUCTURES: dict = {}


def _structure(graphdef, treedef) -> _Structure:
    s = _Structure(graphdef, treedef)
    s = _STRUCTURES.setdefault(s, s)
    if len(_STRUCTURES) > 16:          # keep a few recent model structures
        _STRUCTURES.pop(next(iter(_STRUCTURES)))
    return s


def _merge(structure, leaves):
    return nnx.merge(structure.graphdef, jax.tree.unflatten(structure.treedef, leaves))


def _next(model, x, seed, step, temperature, top_p, sampler):
    logits = model.head(x)[:, 0]                                  # (B, V) float32
    key = jax.random.fold_in(jax.random.key(seed), step)
    return sample_logits(logits, key, temperature, top_p, greedy=sampler.greedy,
                         top_k=sampler.top_k, use_top_p=sampler.use_top_p), logits


@functools.partial(jax.jit, static_argnames=("structure", "sampler"), donate_argnames=("cache",))
def _prefill(structure, leaves, tokens, n_prompt, cache, seed, temperature, top_p,
             sampler):
    """tokens (B, P) int32 right-padded, n_prompt () int32 real length -> (next (B,) int32,
    logits (B, V) float32, cache with length n_prompt)."""
    model = _merge(structure, leaves)
    x, cache = forward_cached(model, tokens, cache)
    x = jax.lax.dynamic_slice_in_dim(x, n_prompt - 1, 1, axis=1)   # last real position
    cache = dataclasses.replace(cache, length=n_prompt)
    tok, logits = _next(model, x, seed, jnp.int32(0), temperature, top_p, sampler)
    return tok, logits, cache


@functools.partial(jax.jit, static_argnames=("structure", "sampler"), donate_argnames=("cache",))
def _decode_step(structure, leaves, token, cache, seed, step, temperature, top_p,
                 sampler):
    """token (B,) int32 at position cache.length -> (next (B,) int32, logits (B, V), cache)."""
    model = _merge(structure, leaves)
    x, cache = forward_cached(model, token[:, None], cache)
    tok, logits = _next(model, x, seed, step, temperature, top_p, sampler)
    return tok, logits, cache


@dataclasses.dataclass
class GenerationResult:
    """tokens: (B, n) int32 new tokens (a row that hit EOS keeps its EOS token, then repeats
    it until every row is done); finished: (B,) bool, the row produced EOS; prefill_seconds:
    prompt -> first new token on the host (includes compilation on a first call);
    decode_seconds: first -> last new token; steps: decode steps run (n - 1);
    logits: (B, n, V) float32 of each step when `return_logits`, else None."""

    tokens: np.ndarray
    finished: np.ndarray
    prefill_seconds: float
    decode_seconds: float
    steps: int
    logits: Optional[np.ndarray] = None


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def _eos_set(model, eos_id) -> tuple:
    if isinstance(eos_id, str) and eos_id == "auto":
        eos_id = model.spec.eos_token_id
    if eos_id is None:
        return ()
    if isinstance(eos_id, (int, np.integer)):
        return (int(eos_id),)
    return tuple(int(e) for e in eos_id)


def default_max_len(prompt_len: int, max_new_tokens: int, prefill_bucket: int = 64) -> int:
    """The cache length `generate` uses by default: room for the padded prompt and the new
    tokens, rounded up to a multiple of 128 (so nearby requests share compilations)."""
    return _round_up(max(_round_up(prompt_len, prefill_bucket), prompt_len + max_new_tokens), 128)


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    """A ValueError naming the first bad generation setting (before any model is loaded)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0: greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0: no limit), got {top_k}")


def _check_request(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, max_len,
                   prefill_bucket) -> tuple:
    """(prompt (B, T) int32, padded prompt length, cache length) of a valid request; a
    ValueError naming the bad argument otherwise."""
    prompt = np.asarray(prompt_ids, np.int32)
    if prompt.ndim == 1:
        prompt = prompt[None]
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt_ids must be (T,) or (B, T) with T >= 1, got shape {prompt.shape}")
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    T = prompt.shape[1]
    P = _round_up(T, prefill_bucket)
    max_len = default_max_len(T, max_new_tokens, prefill_bucket) if max_len is None else max_len
    if max_len < max(P, T + max_new_tokens):
        raise ValueError(f"max_len {max_len} is too short for a prompt of {T} tokens (padded to "
                         f"{P}) and {max_new_tokens} new tokens")
    if max_len > model.spec.max_position:
        import warnings
        warnings.warn(f"cache length {max_len} exceeds the model's max_position "
                      f"{model.spec.max_position}")
    return prompt, P, max_len


def generate(model, prompt_ids, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             eos_id: Union[str, int, Sequence[int], None] = "auto",
             callback: Optional[Callable[[int, np.ndarray], None]] = None,
             max_len: Optional[int] = None, cache_dtype=None, prefill_bucket: int = 64,
             return_logits: bool = False) -> GenerationResult:
    """Generate up to `max_new_tokens` tokens after `prompt_ids` with a KV cache.

    Args:
      model: a `Llama` (FP weights, or `quipjax.build_model(ckpt, linears="codes")`).
      prompt_ids: (T,) or (B, T) int token ids (every row the same length T >= 1).
      max_new_tokens: new tokens per row (>= 1); fewer if every row hits EOS.
      temperature: 0 = greedy; > 0 samples from softmax(logits / temperature).
      top_k: sample among the k most likely tokens (0 = all).
      top_p: nucleus sampling mass (1.0 = off).
      seed: the sampling key is fold_in(key(seed), step): same seed, same tokens.
      eos_id: "auto" (model.spec.eos_token_id), an id, a list of ids, or None (never stop).
      callback: called as callback(i, tokens) with the i-th new tokens (B,) int32 numpy, as
        soon as they are on the host (streaming).
      max_len: cache length (default `default_max_len`); must hold the padded prompt and
        T + max_new_tokens positions.
      cache_dtype: default the model's attention compute dtype (`cache_dtype_of`).
      prefill_bucket: the prompt is right-padded to a multiple of this (fewer compilations).
      return_logits: also return every step's logits (B, n, V) float32.
    Returns:
      A `GenerationResult`.
    """
    prompt, P, max_len = _check_request(model, prompt_ids, max_new_tokens, temperature, top_k,
                                        top_p, max_len, prefill_bucket)
    B, T = prompt.shape
    eos = _eos_set(model, eos_id)
    sampler = _Sampler(greedy=temperature == 0, top_k=int(top_k) if temperature else 0,
                       use_top_p=bool(temperature) and top_p < 1.0)
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    structure = _structure(graphdef, treedef)
    cache = init_cache(model, B, max_len, cache_dtype)
    padded = np.zeros((B, P), np.int32)
    padded[:, :T] = prompt
    seed_, temp, topp = jnp.uint32(seed), jnp.float32(temperature or 1.0), jnp.float32(top_p)

    t0 = time.perf_counter()
    tok, logits, cache = _prefill(structure, leaves, jnp.asarray(padded), jnp.int32(T),
                                  cache, seed_, temp, topp, sampler)
    out, all_logits = [], []
    finished = np.zeros((B,), bool)
    eos_arr = np.asarray(eos, np.int32)
    t_first = None
    pending = (tok, logits)
    for i in range(max_new_tokens):
        cur, cur_logits = pending
        if i + 1 < max_new_tokens:        # dispatch the next step before reading this token
            pending = _decode_step(structure, leaves, cur, cache, seed_, jnp.int32(i + 1),
                                   temp, topp, sampler)
            cache = pending[2]
            pending = pending[:2]
        host = np.asarray(cur)
        if t_first is None:
            t_first = time.perf_counter()
        if eos:
            host = np.where(finished, eos_arr[0], host).astype(np.int32)
            finished |= np.isin(host, eos_arr)
        out.append(host)
        if return_logits:
            all_logits.append(np.asarray(cur_logits))
        if callback is not None:
            callback(i, host)
        if eos and finished.all():
            break
    t_end = time.perf_counter()
    return GenerationResult(
        tokens=np.stack(out, 1), finished=finished, prefill_seconds=t_first - t0,
        decode_seconds=t_end - t_first, steps=len(out) - 1,
        logits=np.stack(all_logits, 1) if return_logits else None)


def tokens_per_second(model, prompt_ids, new_tokens: int, *, batch: int = 1, repeats: int = 3,
                      temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                      max_len: Optional[int] = None, prefill_bucket: int = 64) -> dict:
    """Prefill and decode speed of `generate` (compilation excluded), EOS ignored.

    Args:
      model: a `Llama`.
      prompt_ids: (T,) int token ids; the batch repeats it `batch` times.
      new_tokens: tokens generated per row per run (>= 2: one from the prefill, the rest from
        decode steps).
      batch: rows per run.
      repeats: timed runs after one warm-up run (which compiles); the medians are reported.
    Returns:
      {"batch", "prompt_tokens", "new_tokens", "repeats", "compile_seconds" (the warm-up run),
       "prefill_seconds", "decode_seconds", "prefill_tokens_per_s" (batch * T / prefill),
       "decode_tokens_per_s" (batch * (new_tokens - 1) / decode, all rows),
       "decode_ms_per_step", "decode_tokens_per_s_runs": every run's figure}.
    """
    if new_tokens < 2:
        raise ValueError("new_tokens must be >= 2 (the first comes from the prefill)")
    prompt = np.asarray(prompt_ids, np.int32).reshape(-1)
    ids = np.tile(prompt[None], (batch, 1))
    T = prompt.shape[0]
    max_len = default_max_len(T, new_tokens, prefill_bucket) if max_len is None else max_len
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, eos_id=None, max_len=max_len,
              prefill_bucket=prefill_bucket)
    t = time.perf_counter()
    generate(model, ids, 2, **kw)                       # compiles prefill and the decode step
    compile_s = time.perf_counter() - t
    runs = [generate(model, ids, new_tokens, **kw) for _ in range(repeats)]
    pre = statistics.median(r.prefill_seconds for r in runs)
    dec = statistics.median(r.decode_seconds for r in runs)
    steps = new_tokens - 1
    return {"batch": batch, "prompt_tokens": T, "new_tokens": new_tokens, "repeats": repeats,
            "compile_seconds": compile_s, "prefill_seconds": pre, "decode_seconds": dec,
            "prefill_tokens_per_s": batch * T / pre, "decode_tokens_per_s": batch * steps / dec,
            "decode_ms_per_step": 1e3 * dec / steps,
            "decode_tokens_per_s_runs": [batch * steps / r.decode_seconds for r in runs]}
