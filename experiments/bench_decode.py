"""Decode-matmul speed on this CPU: the XLA path against dense float32 / bf16 and the reference.

    python experiments/bench_decode.py [--shapes=576x1536,4096x4096,4096x11008] [--batches=1,16]
        [--codebooks=E8P12,E8P12RVQ4B] [--repeats=7] [--rounds=3] [--json_out=results.json]
        [--no_reference] [--xdtype=float32]
    python experiments/bench_decode.py --nomatmuls --checkpoint=runs/smollm2_135m_2bit \
        [--model_batches=1,16] [--new_tokens=32] [--model_repeats=3]

For every shape (m x n: y = x @ Q^T, Q (m, n)), batch (rows of x) and codebook, times (jit,
compilation excluded; `--rounds` interleaved rounds of `--repeats` calls each, median of all):
  * dense f32:  x @ W^T with W float32 already in memory. The fastest of three formulations
    is reported (its name in the `dense f32 form` column): `einsum(bn,mn)` (x @ W.T, W (m, n)),
    `W@x` (dot(W, x^T)^T, W (m, n)) and `x@Wt` (W stored transposed (n, m));
  * dense bf16: bf16 weights, bf16 x, preferred_element_type=float32 (fastest of the same forms);
  * xla:        `quipjax.kernels.prepared_matmul` with the "xla" backend (codes prepared once);
  * reference:  `quipjax.kernels.reference_decode_matmul` (table decode, then a matmul).
Prints a markdown table of milliseconds and ratios to dense f32. Timings on a shared machine
are noisy: compare ratios from the same run.

Section 2 (`--checkpoint`, `bench_model`): whole-model KV-cache decoding of a quantized
checkpoint against its FP model, tokens/s and time ratios to FP float32 at batch 1 and 16.
"""
from __future__ import annotations

import json
import statistics
import time

from absl import flags

import jax
import jax.numpy as jnp
import numpy as np

from quipjax import codebooks, kernels
from quipjax.kernels import xla_decode
from quipjax.pipeline import cli

FLAGS = flags.FLAGS
flags.DEFINE_list("shapes", ["576x1536", "4096x4096", "4096x11008"], "m x n of Q (y = x @ Q^T).")
flags.DEFINE_list("batches", ["1", "16"], "Rows of x.")
flags.DEFINE_list("codebooks", ["E8P12", "E8P12RVQ4B"], "Codebooks (E8P12, E8P12RVQ4B, "
                  "E8P12RVQ3B; the trellis codes HYB2, 1MAD2, 3INST2, ... on their xla decoder).")
flags.DEFINE_integer("repeats", 7, "Timed calls per round.")
flags.DEFINE_integer("rounds", 3, "Interleaved rounds (every candidate once per round).")
flags.DEFINE_bool("reference", True, "Also time the reference (table decode) path.")
flags.DEFINE_enum("xdtype", "float32", ["float32", "bfloat16"], "dtype of x fed to the xla path.")
flags.DEFINE_string("json_out", "", "Write the results (list of dicts) here.")
flags.DEFINE_string("checkpoint", "", "A quantized checkpoint (experiments/quantize.py's "
                    "--output_dir) for the whole-model section; empty: skip it.")
flags.DEFINE_string("model", "", "FP source of --checkpoint (default: the one it names).")
flags.DEFINE_list("model_batches", ["1", "16"], "Batch sizes of the whole-model section.")
flags.DEFINE_integer("new_tokens", 32, "Tokens generated per row in the whole-model section.")
flags.DEFINE_integer("model_repeats", 3, "Timed generations per candidate (median).")
flags.DEFINE_string("prompt", "The capital of France is", "Prompt of the whole-model section.")
flags.DEFINE_bool("matmuls", True, "Run the matmul section.")


def _time_calls(fn, args, repeats):
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        out.append(time.perf_counter() - t)
    return out


def time_interleaved(cands: dict, repeats: int, rounds: int) -> dict:
    """{name: (jitted fn, args)} -> {name: median ms}; every candidate once per round."""
    for fn, args in cands.values():                      # compile + warm up
        jax.block_until_ready(fn(*args))
        jax.block_until_ready(fn(*args))
    samples = {k: [] for k in cands}
    for _ in range(rounds):
        for k, (fn, args) in cands.items():
            samples[k] += _time_calls(fn, args, repeats)
    return {k: 1e3 * statistics.median(v) for k, v in samples.items()}


def random_codes(rng, codebook, m, n):
    if codebook in kernels.TRELLIS_CODEBOOKS:      # a trellis: any words are a bitstream
        shape = codebooks.get(codebook).codes_shape(m, n)
        return jnp.asarray(rng.integers(0, 1 << 16, shape).astype(np.uint16))
    kc = n // 8
    if codebook == "E8P12":
        return jnp.asarray(rng.integers(0, 1 << 16, (m, kc)).astype(np.uint16))
    c = rng.integers(0, 1 << 16, (m, kc, 2))
    if codebook == "E8P12RVQ3B":
        c[..., 1] = rng.integers(0, 256, (m, kc))
    return jnp.asarray(c.astype(np.uint16))


def _dense_forms(prec_kw):
    return {
        "einsum(bn,mn)": (lambda x, W, Wt: jnp.einsum("bn,mn->bm", x, W, **prec_kw), "W"),
        "W@x": (lambda x, W, Wt: jnp.einsum("mn,bn->bm", W, x, **prec_kw), "W"),
        "x@Wt": (lambda x, W, Wt: jnp.einsum("bn,nm->bm", x, Wt, **prec_kw), "Wt"),
    }


def bench_shape(m, n, batch, codebook_list, rng):
    """Time every candidate for one (m, n, batch); returns a list of result rows."""
    W = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
    Wt = W.T.copy()
    Wb, Wtb = W.astype(jnp.bfloat16), Wt.astype(jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((batch, n)), jnp.float32)
    xb = x.astype(jnp.bfloat16)
    cands = {}
    for name, (f, _) in _dense_forms({}).items():
        cands[("f32", name)] = (jax.jit(f), (x, W, Wt))
    for name, (f, _) in _dense_forms({"preferred_element_type": jnp.float32}).items():
        cands[("bf16", name)] = (jax.jit(f), (xb, Wb, Wtb))
    xq = x.astype(FLAGS.xdtype)
    codes = {}
    for cb in codebook_list:
        codes[cb] = random_codes(rng, cb, m, n)
        prep = kernels.prepare(codes[cb], cb, backend="xla")
        cands[("xla", cb)] = (jax.jit(kernels.prepared_matmul), (xq, prep))
        if FLAGS.reference:
            cands[("ref", cb)] = (jax.jit(lambda x, c, cb=cb: kernels.reference_decode_matmul(
                x, c, cb)), (x, codes[cb]))
    del W, Wt, Wb, Wtb
    ms = time_interleaved(cands, FLAGS.repeats, FLAGS.rounds)
    f32_form = min((k[1] for k in ms if k[0] == "f32"), key=lambda k: ms[("f32", k)])
    bf_form = min((k[1] for k in ms if k[0] == "bf16"), key=lambda k: ms[("bf16", k)])
    d32, d16 = ms[("f32", f32_form)], ms[("bf16", bf_form)]
    rows = []
    for cb in codebook_list:
        row = {"m": m, "n": n, "batch": batch, "codebook": cb,
               "dense_f32_ms": d32, "dense_f32_form": f32_form,
               "dense_f32_all_ms": {k[1]: v for k, v in ms.items() if k[0] == "f32"},
               "dense_bf16_ms": d16, "dense_bf16_form": bf_form,
               "xla_ms": ms[("xla", cb)], "xla_x_dtype": FLAGS.xdtype,
               "xla_bits_per_weight": (codebooks.get(cb).bits_per_weight
                                       if cb in kernels.TRELLIS_CODEBOOKS
                                       else xla_decode.bits_per_weight(cb)),
               "reference_ms": ms.get(("ref", cb))}
        row["xla_vs_dense_f32"] = row["xla_ms"] / d32
        row["bf16_vs_dense_f32"] = d16 / d32
        row["reference_vs_dense_f32"] = (row["reference_ms"] / d32
                                         if row["reference_ms"] is not None else None)
        rows.append(row)
    return rows


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def bench_matmuls():
    """Section 1: decode-matmul kernels against dense matmuls; prints the table."""
    rng = np.random.default_rng(0)
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in FLAGS.shapes]
    batches = [int(b) for b in FLAGS.batches]
    print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, x dtype of the xla path: "
          f"{FLAGS.xdtype}; median of {FLAGS.rounds} x {FLAGS.repeats} calls")
    print("| m x n | batch | codebook | dense f32 ms (form) | dense bf16 ms (x) | xla ms (x) "
          "| bits/w | reference ms (x) |")
    print("|---|---|---|---|---|---|---|---|")
    results = []
    for m, n in shapes:
        for b in batches:
            for row in bench_shape(m, n, b, FLAGS.codebooks, rng):
                results.append(row)
                print(f"| {m}x{n} | {b} | {row['codebook']} | {row['dense_f32_ms']:.3f} "
                      f"({row['dense_f32_form']}) | {row['dense_bf16_ms']:.3f} "
                      f"({row['bf16_vs_dense_f32']:.2f}) | **{row['xla_ms']:.3f}** "
                      f"(**{row['xla_vs_dense_f32']:.2f}**) | {row['xla_bits_per_weight']} | "
                      f"{_fmt(row['reference_ms'], '.2f')} "
                      f"({_fmt(row['reference_vs_dense_f32'], '.1f')}) |", flush=True)
    return results


def bench_model():
    """Section 2 (`--checkpoint`): whole-model SmolLM2 decoding, tokens/s in one process.

    Candidates (each a `Llama`, `quipjax.generate.tokens_per_second`, greedy, EOS ignored):
      * fp f32 / fp bf16: the checkpoint's FP source model;
      * dequantized f32: the quantized weights formed densely (build_model);
      * codes xla f32 / codes xla bf16: the codes, decoded inside every matmul by the xla
        backend (build_model(linears="codes"); its dtype is the embedding / lm_head /
        attention dtype, the decode matmuls accumulate in float32).
    Every candidate runs at every --model_batches size; ratios are to fp f32 at that batch.
    """
    if not FLAGS.checkpoint:
        return None
    from quipjax import build_model, load_model, open_checkpoint
    from quipjax import generate as gen
    from quipjax.pipeline import checkpoint as ckpt

    meta = ckpt.read_meta(FLAGS.checkpoint)
    src = open_checkpoint(FLAGS.model or meta["tokenizer"]["path"])
    ids = np.asarray(src.tokenizer.encode(FLAGS.prompt), np.int32)
    builders = {
        "fp f32": lambda: load_model(src, jnp.float32),
        "fp bf16": lambda: load_model(src, jnp.bfloat16),
        "dequantized f32": lambda: build_model(FLAGS.checkpoint, dtype=jnp.float32, meta=meta),
        "codes xla f32": lambda: build_model(FLAGS.checkpoint, linears="codes", backend="xla",
                                             dtype=jnp.float32, meta=meta),
        "codes xla bf16": lambda: build_model(FLAGS.checkpoint, linears="codes", backend="xla",
                                              dtype=jnp.bfloat16, meta=meta),
    }
    print(f"\n## whole model: {FLAGS.checkpoint} ({meta.get('settings', {}).get('codebook', '?')}), "
          f"prompt {len(ids)} tokens, {FLAGS.new_tokens} new tokens, median of "
          f"{FLAGS.model_repeats} runs")
    print("| model | batch | decode tok/s | ms / step | vs fp f32 (time) | prefill tok/s |")
    print("|---|---|---|---|---|---|")
    rows, base = [], {}
    for name, build in builders.items():          # "fp f32" first: the base of the ratios
        model = build()                            # each model loaded once for all batches
        for b in [int(v) for v in FLAGS.model_batches]:
            r = gen.tokens_per_second(model, ids, FLAGS.new_tokens, batch=b,
                                      repeats=FLAGS.model_repeats)
            base.setdefault(b, r["decode_ms_per_step"])
            r = dict(r, model=name, time_vs_fp_f32=r["decode_ms_per_step"] / base[b])
            rows.append(r)
            print(f"| {name} | {b} | {r['decode_tokens_per_s']:.1f} | "
                  f"{r['decode_ms_per_step']:.1f} | {r['time_vs_fp_f32']:.2f} | "
                  f"{r['prefill_tokens_per_s']:.0f} |", flush=True)
        del model
    return sorted(rows, key=lambda r: r["batch"])


def main(argv):
    del argv
    out = {"matmuls": bench_matmuls()} if FLAGS.matmuls else {}
    model = bench_model()
    if model is not None:
        out["model"] = model
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {FLAGS.json_out}")


if __name__ == "__main__":
    cli.run(main)
