r"""Convert between quipjax checkpoints and quip-sharp's official packed format (HF folders).

    # an official QuIP# model (e.g. a downloaded relaxml/Llama-2-7b-E8P-2Bit folder) -> quipjax
    python experiments/convert.py --to=quipjax --input=/models/Llama-2-7b-E8P-2Bit \
        --output=runs/llama2_7b_e8p_official
    python experiments/eval_ppl.py --checkpoint=runs/llama2_7b_e8p_official --dataset=wiki

    # a quipjax checkpoint -> an official folder (loadable by quip-sharp's model/llama.py),
    # then read it back and compare the logits with the source checkpoint on 64 tokens
    python experiments/convert.py --to=quipsharp --input=runs/smollm2_135m_2bit \
        --output=/tmp/smollm2_e8p_hf --check_logits=64

Import checks every layer by dequantizing it (see quipjax.formats.quipsharp.import_folder).
Export needs Llama models quantized with E8P12 / E8P12RVQ3B / E8P12RVQ4B, Hadamard transforms
on both sides, dimensions with m % 16 == 0 and n % 64 == 0, and the official row order of the
fused layers (q, k, v and up, gate). The last line of standard output is a JSON summary.
"""
from __future__ import annotations

import json
import shutil
import tempfile

from absl import flags, logging

from quipjax.formats import quipsharp as qs
from quipjax.pipeline import cli

FLAGS = flags.FLAGS
flags.DEFINE_enum("to", None, ["quipjax", "quipsharp"], "Direction: 'quipjax' reads an official "
                  "folder (--input) into a quipjax checkpoint (--output); 'quipsharp' writes a "
                  "quipjax checkpoint (--input) as an official folder (--output).")
flags.DEFINE_string("input", None, "Source: an official-format Hugging Face folder (config.json "
                    "with quip_params, *.safetensors) or a quipjax checkpoint directory.")
flags.DEFINE_string("output", None, "Destination directory (created; must be empty unless "
                    "--overwrite).")
flags.DEFINE_boolean("overwrite", False, "Replace an existing --output written by this tool.")
flags.DEFINE_enum("float_dtype", "float16", ["float16", "float32"], "Export: dtype of SU, SV, "
                  "fuse scales, norms and embeddings. float16 is the official format; float32 "
                  "(same names and layout) is lossless, for quipjax-to-quipjax transfer.")
flags.DEFINE_string("name_or_path", None, "Export: config _name_or_path, where the official "
                    "loader reads the tokenizer. Default: the output folder when tokenizer files "
                    "could be copied from the source model, else the source model path.")
flags.DEFINE_float("max_shard_gb", 5.0, "Export: largest safetensors shard, in GB (10^9 bytes); "
                   "bigger models get model-0000k-of-0000N files and an index.")
flags.DEFINE_boolean("verify", True, "Import: read every written layer back and check it "
                     "against the official words and (small layers) the official dequantization "
                     "formula in float64.")
flags.DEFINE_float("verify_flops", 2e10, "Import: layers with m*n*(m+n) above this skip the "
                   "dense float64 dequantization check (the exact code check always runs).")
flags.DEFINE_integer("check_logits", 0, "Export: if > 0, import the written folder into a "
                     "temporary checkpoint and compare its logits with the source checkpoint's "
                     "on this many random tokens (seed 0), float32.")


def _logit_report(a, b) -> dict:
    import numpy as np
    d = np.abs(a - b)
    return {"identical": bool(np.array_equal(a, b)), "max_abs_diff": float(d.max()),
            "max_abs_logit": float(np.abs(a).max()),
            "rel_diff": float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30)),
            "argmax_agree": float(np.mean(a.argmax(-1) == b.argmax(-1))), "tokens": int(a.shape[0])}


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    if not (FLAGS.to and FLAGS.input and FLAGS.output):
        raise cli.UserError("--to, --input and --output are required")
    if FLAGS.to == "quipjax":
        out = qs.import_folder(FLAGS.input, FLAGS.output, verify=FLAGS.verify,
                               overwrite=FLAGS.overwrite, verify_flops=FLAGS.verify_flops,
                               log=print)
    else:
        out = qs.export_checkpoint(FLAGS.input, FLAGS.output, float_dtype=FLAGS.float_dtype,
                                   name_or_path=FLAGS.name_or_path,
                                   max_shard_bytes=FLAGS.max_shard_gb * 1e9,
                                   overwrite=FLAGS.overwrite, log=print)
        if FLAGS.check_logits > 0:
            import numpy as np
            from quipjax.pipeline.checkpoint import read_meta
            vocab = read_meta(FLAGS.input)["model"]["vocab_size"]
            tokens = np.random.default_rng(0).integers(0, vocab, FLAGS.check_logits)
            tmp = tempfile.mkdtemp(prefix="quipjax_reimport_")
            try:
                qs.import_folder(FLAGS.output, tmp, verify=FLAGS.verify, overwrite=True,
                                 verify_flops=FLAGS.verify_flops, log=None)
                rep = _logit_report(qs.checkpoint_logits(FLAGS.input, tokens),
                                    qs.checkpoint_logits(tmp, tokens))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            print(f"logits of the re-imported export vs the source: {json.dumps(rep)}")
            out["check_logits"] = rep
    print(json.dumps(out))


if __name__ == "__main__":
    cli.run(main, positional="input")
