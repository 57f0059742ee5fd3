"""Block LDL decomposition and BlockLDLQ rounding (QuIP#'s adaptive rounding).

With H = L D L^T, L unit block-lower-triangular (b x b blocks: the codebook's `block`, 8 for
the E8P codebooks, 16 for the trellis tiles), BlockLDLQ rounds the column blocks of W (m, n)
from the LAST to the FIRST:

    What_k = Q(W_k + (W_{>k} - What_{>k}) L_{>k,k})

(GPTQ with the column order reversed). Optional tune passes are block coordinate descent on the
proxy loss: What_k <- Q(What_k + (W - What) H[:, k] H[k, k]^-1), also last block first.

Implementation: transposed layout (columns of W leading, so a block is a (b, m) slab that the
codebook rounds with `quantize_block`), `lax.scan` over buffers of `buf_cols` columns and an
inner scan over the b-column blocks of a buffer. The error feedback from finished buffers is
one (buf_cols x n) @ (n x m) matmul per buffer; inside a buffer it is (b x buf_cols) @
(buf_cols x m) per block. n is padded at the front to a multiple of `buf_cols` with
decoupled (identity) columns, which are rounded last and dropped, so every buffer has the
same shape. Everything is jit/vmap friendly; no Python loop over blocks or rows.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from quipjax import codebooks as _codebooks

__all__ = ["block_ldl", "block_ldlq", "proxy_loss", "BLOCK"]

BLOCK = 8
_HI = jax.lax.Precision.HIGHEST


def block_ldl(H: jax.Array, block: int = BLOCK):
    """Block LDL^T of a symmetric positive definite H (n, n).

    Returns (L, D): L (n, n) unit block-lower-triangular (identity diagonal blocks, zeros above)
    and D (n // block, block, block) the diagonal blocks, with H = L blockdiag(D) L^T.
    If H is not positive definite, L and D contain NaN (check with jnp.isfinite).
    """
    n = H.shape[0]
    if n % block:
        raise ValueError(f"block_ldl: dimension {n} is not a multiple of the block size {block}")
    nb = n // block
    C = jnp.linalg.cholesky(H)
    Cb = C.reshape(nb, block, nb, block)
    diag = Cb[jnp.arange(nb), :, jnp.arange(nb), :]                # (nb, b, b) lower
    eye = jnp.broadcast_to(jnp.eye(block, dtype=H.dtype), diag.shape)
    dinv = jax.scipy.linalg.solve_triangular(diag, eye, lower=True)
    L = jnp.einsum("xaic,icd->xaid", Cb, dinv, precision=_HI)
    blk = jnp.arange(nb)
    mask = (blk[:, None] > blk[None, :])[:, None, :, None]          # strictly below diagonal
    L = jnp.where(mask, L, 0.0) + jnp.where(blk[:, None] == blk[None, :], 1.0, 0.0)[:, None, :, None] \
        * jnp.eye(block, dtype=H.dtype)[None, :, None, :]
    D = jnp.einsum("ibc,idc->ibd", diag, diag, precision=_HI)
    return L.reshape(n, n), D


def proxy_loss(W: jax.Array, What: jax.Array, H: jax.Array) -> jax.Array:
    """tr((What - W) H (What - W)^T) / tr(W H W^T), a float32 scalar."""
    E = What - W
    num = jnp.sum(jnp.dot(E, H, precision=_HI) * E)
    den = jnp.sum(jnp.dot(W, H, precision=_HI) * W)
    return num / den


def _pad_front(A, p, fill_identity):
    """Prepend p decoupled rows/columns to a square matrix (identity block) or rows to a slab."""
    if p == 0:
        return A
    if fill_identity:
        n = A.shape[0]
        out = jnp.zeros((n + p, n + p), A.dtype)
        out = out.at[p:, p:].set(A)
        return out.at[:p, :p].set(jnp.eye(p, dtype=A.dtype))
    return jnp.pad(A, ((p, 0), (0, 0)))


def _row_chunks(N, bs, target=8):
    """Static row ranges, multiples of bs, about `target` of them."""
    step = bs * -(-(N // bs) // target)
    return [(a, min(a + step, N)) for a in range(0, N, step)]


def _feedback(Lp, err, s, bs):
    """L[:, s:s+bs]^T @ err, skipping row chunks that hold no finished rows yet.

    err is zero on rows < s + bs (not yet rounded), so only rows >= s + bs contribute: the
    contraction is split into static row chunks and each runs only if it reaches past
    s + bs (a cond on the loop index, which stays a cond under vmap). This halves the
    dominant cost of BlockLDLQ (the triangular part of an (n x n) @ (n x m) product).
    """
    N, m = err.shape
    acc = jnp.zeros((bs, m), err.dtype)
    for a, b in _row_chunks(N, bs):
        def chunk(a=a, b=b):
            lc = jax.lax.dynamic_slice(Lp, (a, s), (b - a, bs))
            return jnp.dot(lc.T, err[a:b], precision=_HI)
        acc = acc + jax.lax.cond(b > s + bs, chunk, lambda: jnp.zeros((bs, m), err.dtype))
    return acc


def _ldlq_pass(cb, Wt, Lp, bs):
    """One BlockLDLQ pass in transposed, padded layout. Wt (N, m), Lp (N, N)."""
    N, m = Wt.shape
    bk = cb.block

    def outer(err, b):
        s = b * bs
        wb = jax.lax.dynamic_slice(Wt, (s, 0), (bs, m))
        acc = wb + _feedback(Lp, err, s, bs)                        # feedback of later buffers
        lbb = jax.lax.dynamic_slice(Lp, (s, s), (bs, bs))

        def inner(eb, kk):
            r = kk * bk
            lk = jax.lax.dynamic_slice(lbb, (0, r), (bs, bk))
            x = jax.lax.dynamic_slice(acc, (r, 0), (bk, m)) + jnp.dot(lk.T, eb, precision=_HI)
            codes, xh = cb.quantize_block(x)
            eb = jax.lax.dynamic_update_slice(
                eb, jax.lax.dynamic_slice(wb, (r, 0), (bk, m)) - xh, (r, 0))
            return eb, (codes, xh)

        eb, (codes, xh) = jax.lax.scan(inner, jnp.zeros((bs, m), Wt.dtype),
                                       jnp.arange(bs // bk), reverse=True)
        return jax.lax.dynamic_update_slice(err, eb, (s, 0)), (codes, xh)

    _, (codes, xh) = jax.lax.scan(outer, jnp.zeros_like(Wt), jnp.arange(N // bs), reverse=True)
    return codes.reshape((N // bk,) + codes.shape[2:]), xh.reshape(N, m)


def _tune_pass(cb, Wt, Hp, What_t, bs):
    """One block coordinate descent pass on the proxy loss, last block first."""
    N, m = Wt.shape
    bk = cb.block
    nb = N // bk
    Hb = Hp.reshape(nb, bk, nb, bk)
    hinv = jnp.linalg.inv(Hb[jnp.arange(nb), :, jnp.arange(nb), :])    # (nb, 8, 8)

    def outer(carry, b):
        err, what = carry
        s = b * bs
        hrows = jax.lax.dynamic_slice(Hp, (s, 0), (bs, N))
        g = jnp.dot(hrows, err, precision=_HI)                        # H[buf, :] (W - What)
        hbb = jax.lax.dynamic_slice(hrows, (0, s), (bs, bs))
        wh_b = jax.lax.dynamic_slice(what, (s, 0), (bs, m))
        er_b = jax.lax.dynamic_slice(err, (s, 0), (bs, m))

        def inner(c, kk):
            g, wh_b, er_b = c
            r = kk * bk
            old = jax.lax.dynamic_slice(wh_b, (r, 0), (bk, m))
            hk = jax.lax.dynamic_index_in_dim(hinv, s // bk + kk, keepdims=False)
            x = old + jnp.dot(hk, jax.lax.dynamic_slice(g, (r, 0), (bk, m)), precision=_HI)
            codes, new = cb.quantize_block(x)
            delta = old - new                                          # change of W - What
            g = g + jnp.dot(jax.lax.dynamic_slice(hbb, (0, r), (bs, bk)), delta, precision=_HI)
            wh_b = jax.lax.dynamic_update_slice(wh_b, new, (r, 0))
            er_b = jax.lax.dynamic_update_slice(
                er_b, jax.lax.dynamic_slice(er_b, (r, 0), (bk, m)) + delta, (r, 0))
            return (g, wh_b, er_b), codes

        (_, wh_b, er_b), codes = jax.lax.scan(inner, (g, wh_b, er_b), jnp.arange(bs // bk),
                                              reverse=True)
        err = jax.lax.dynamic_update_slice(err, er_b, (s, 0))
        what = jax.lax.dynamic_update_slice(what, wh_b, (s, 0))
        return (err, what), codes

    (_, what), codes = jax.lax.scan(outer, (Wt - What_t, What_t), jnp.arange(N // bs),
                                    reverse=True)
    return codes.reshape((nb,) + codes.shape[2:]), what


@functools.partial(jax.jit, static_argnames=("codebook", "tune_iters", "buf_cols"))
def _block_ldlq(W, L, H, codebook, tune_iters, buf_cols):
    cb = _codebooks.get(codebook)
    m, n = W.shape
    work = jnp.promote_types(W.dtype, jnp.float32)
    bs = min(buf_cols, n)
    N = -(-n // bs) * bs
    p = N - n
    Wt = _pad_front(W.T.astype(work), p, False)
    Lp = _pad_front(L.astype(work), p, True)
    codes, what_t = _ldlq_pass(cb, Wt, Lp, bs)
    if tune_iters:
        Hp = _pad_front(H.astype(work), p, True)
        for _ in range(tune_iters):
            codes, what_t = _tune_pass(cb, Wt, Hp, what_t, bs)
    # codes: one entry per block, (N / block, ...) -> the codebook's layout of an (m, n) weight
    codes = jnp.moveaxis(codes[p // cb.block:], 1, 0)
    return codes.reshape(cb.codes_shape(m, n)), what_t[p:].T


def block_ldlq(W: jax.Array, L: jax.Array, codebook="E8P12", tune_iters: int = 0, *,
               H: jax.Array | None = None, buf_cols: int = 128):
    """BlockLDLQ rounding of W with the block LDL factor L of its (rotated) Hessian.

    Args:
      W: (m, n) float weights, already rotated and divided by the scale; n a multiple of
        the codebook's `block` (8 for E8P; 16 for the trellis codes, with m too).
      L: (n, n) unit block-lower-triangular factor from `block_ldl(H)`.
      codebook: a codebook name or `Codebook`.
      tune_iters: block coordinate descent passes after LDLQ (needs H).
      H: (n, n) the Hessian L came from (only for tune_iters > 0).
      buf_cols: columns per buffer (a multiple of the block); changes speed, not results beyond float
        rounding.
    Returns:
      (codes, What): codes of shape `codebook.codes_shape(m, n)` ((m, n // dim) + code_shape
      for the vector codebooks) of the codebook's dtype, What (m, n) the decoded values
      (float32, or W's dtype if wider).
    """
    cb = _codebooks.get(codebook)
    W = jnp.asarray(W)
    m, n = W.shape
    b = cb.block
    if n % b:
        raise ValueError(f"block_ldlq: the input dimension {n} is not a multiple of {b} (the "
                         f"column block of {cb.name})")
    if L.shape != (n, n):
        raise ValueError(f"block_ldlq: L has shape {L.shape}, expected {(n, n)} for W of shape {W.shape}")
    if buf_cols % b or buf_cols <= 0:
        raise ValueError(f"buf_cols must be a positive multiple of {b} ({cb.name}'s block), "
                         f"got {buf_cols}")
    if tune_iters and H is None:
        raise ValueError("block_ldlq: tune_iters > 0 needs the Hessian: pass H=")
    if H is None:
        H = jnp.zeros((0, 0), W.dtype)
    return _block_ldlq(W, L, H, cb, int(tune_iters), int(buf_cols))
