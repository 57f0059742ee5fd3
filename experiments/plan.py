"""Dry-run planner: memory per device and time of each stage of experiments/quantize.py.

    python experiments/plan.py --model=tests/data/configs/llama2_7b.json --mesh=data:8
    python experiments/plan.py --model=/path/to/Llama-2-70b-hf --mesh=data:2,model:4 \
        --flagfile=experiments/configs/llama7b_2bit.cfg
    python experiments/plan.py --mesh=data:8          # the shipped SmolLM2 (its GGUF header)

Reads only the model's configuration: a Hugging Face folder's config.json (or the json file
itself), a .gguf's header, or the default SmolLM2. Takes quantize.py's flags (so its flagfiles
work: calibration size, fine-tuning, evaluation settings) plus --device_memory_gb, --speedup
and --costs. Memory is computed from the shapes (quipjax.sharding.plan documents each term);
times scale per-unit costs measured by experiments/bench_sharding_costs.py (quantize_linear
stage by stage on 4096x11008 and 8192x28672, one Hessian-collection block step and one block
forward for 7B- and 70B-shaped blocks) to the model's shapes. The built-in costs were measured
on one 2-core CPU (see MEASURED); --speedup divides every time (a device that much faster),
--costs reads another measurement (the JSON lines of bench_sharding_costs.py --out).
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

import quantize as _quantize_flags  # noqa: E402,F401  (defines quantize.py's flags)

FLAGS = flags.FLAGS
flags.DEFINE_float("device_memory_gb", 80.0, "Memory of one device (GB, 2^30 bytes).")
flags.DEFINE_float("speedup", 1.0, "Divide the measured times by this (a device this much faster "
                   "than one device of the measuring machine).")
flags.DEFINE_string("costs", None, "JSON lines from bench_sharding_costs.py --out (default: the "
                    "built-in MEASURED figures).")
flags.DEFINE_boolean("json", False, "Print the plan as one JSON object instead of tables.")

# experiments/bench_sharding_costs.py on this machine class (2-core AMD EPYC, 24 GiB,
# jax 0.10.2, CPU), machine otherwise idle; one device = these 2 cores. Matrix: --what=matrix
# --shapes=4096x11008,8192x28672 (E8P12, random SPD H) and --what=proxy (same shapes); block:
# --what=block --blocks=llama2_7b,llama2_70b --ctx=2048 --repeats=3 (bf16 weights, one window).
MEASURED = [
    {"kind": "matrix", "shape": "4096x11008", "check_s": 0.46, "hessian_rht_s": 1.27,
     "weight_rht_s": 0.46, "block_ldl_s": 2.73, "block_ldlq_s": 3.51, "proxy_s": 5.4,
     "peak_rss_mb": 2342},
    {"kind": "matrix", "shape": "8192x28672", "check_s": 6.13, "hessian_rht_s": 10.35,
     "weight_rht_s": 1.90, "block_ldl_s": 51.79, "block_ldlq_s": 40.59, "proxy_s": 93.8,
     "peak_rss_mb": 13786},
    {"kind": "block", "block": "llama2_7b", "hidden": 4096, "intermediate": 11008, "ctx": 2048,
     "params": 202375168, "hessian_step_s": 3.33, "forward_s": 1.15, "peak_rss_mb": 3334},
    {"kind": "block", "block": "llama2_70b", "hidden": 8192, "intermediate": 28672, "ctx": 2048,
     "params": 855638016, "hessian_step_s": 24.34, "forward_s": 4.72, "peak_rss_mb": 16706},
]


def read_spec(path):
    from quipjax.models.llama import LlamaSpec
    from quipjax.models.loaders import GGUFFile, default_model_path
    path = path or default_model_path()
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{os.path.dirname(path)} has no config.json")
    if path.endswith(".json"):
        with open(path) as f:
            return LlamaSpec.from_hf(json.load(f)), path
    return GGUFFile(path).spec, path


def costs():
    from quipjax.sharding import PlanCosts
    if FLAGS.costs:
        return PlanCosts.from_jsonl(FLAGS.costs)
    matrix = {r["shape"]: r for r in MEASURED if r["kind"] == "matrix"}
    block = {r["block"]: r for r in MEASURED if r["kind"] == "block" and r["forward_s"]}
    return PlanCosts(matrix, block, "built-in MEASURED (plan.py)")


def _hms(s):
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def main(argv):
    del argv
    from quipjax import sharding
    spec, where = read_spec(FLAGS.model)
    shape = sharding.mesh_shape(FLAGS.mesh)
    D = shape["data"] * shape["model"]
    ft = {"epochs": FLAGS.ft_epochs, "train_size": FLAGS.ft_train_size,
          "valid_size": FLAGS.ft_valid_size, "ctx": FLAGS.ft_ctx_size, "bs": FLAGS.ft_bs,
          "e2e_epochs": FLAGS.e2e_epochs, "e2e_train_size": FLAGS.e2e_train_size,
          "e2e_valid_size": FLAGS.e2e_valid_size, "e2e_ctx": FLAGS.e2e_ctx_size,
          "e2e_bs": FLAGS.e2e_bs}
    c = costs()

    def run(shape):
        return sharding.plan(spec, shape, c, devset=FLAGS.devset_size, ctx=FLAGS.ctx_size,
                             batch=FLAGS.batch_size, hessian_shards=FLAGS.hessian_shards,
                             dtype_bytes=2 if FLAGS.dtype == "bfloat16" else 4,
                             eval_windows=24 * len(FLAGS.eval_datasets) if FLAGS.eval else 0,
                             eval_ctx=FLAGS.eval_ctx_size, ft=ft,
                             device_gb=FLAGS.device_memory_gb, speedup=FLAGS.speedup)

    def total(stages):
        return sum((2 if s["name"].startswith("perplexity") else 1) * s["seconds"] for s in stages)
    stages = run(shape)
    if FLAGS.json:
        print(json.dumps({"model": where, "mesh": shape, "stages": stages}, default=str))
        return
    print(f"model {where}: {spec.num_layers} layers, hidden {spec.hidden_size}, intermediate "
          f"{spec.intermediate_size}, heads {spec.num_heads}/{spec.num_kv_heads} kv, vocab "
          f"{spec.vocab_size}")
    print(f"mesh {FLAGS.mesh or 'none'}: {D} device(s) of {FLAGS.device_memory_gb:g} GB; "
          f"times = measured costs ({c.source}) / speedup {FLAGS.speedup:g}")
    print()
    print("| stage | memory per device (GB) | fits | time (h:mm:ss) |")
    print("|---|---|---|---|")
    for s in stages:
        n = 2 if s["name"].startswith("perplexity") else 1
        print(f"| {s['name']} | {s['memory_gb']:.1f} | {'yes' if s['fits'] else 'NO'} | "
              f"{_hms(s['seconds'])}{' (x2)' if n == 2 else ''} |")
    print(f"| total | | | {_hms(total(stages))} |")
    print()
    for s in stages:
        parts = ", ".join(f"{k} {v / 1024 ** 3:.2f}" for k, v in s["memory"].items())
        print(f"- {s['name']}: {parts} GB. {s['notes']}")
    if not all(s["fits"] for s in stages):
        print()
        print("Some stage does not fit: a larger model axis (--mesh=data:a,model:b) shards the "
              "weights further (evaluation, end-to-end tuning).")
    print()
    print(f"Other meshes of {D} devices:")
    print("| mesh | largest stage memory (GB) | fits | total time |")
    print("|---|---|---|---|")
    for k in [k for k in range(1, D + 1) if D % k == 0]:
        alt = {"data": D // k, "model": k}
        try:
            st = run(alt)
        except ValueError as e:
            print(f"| data:{D // k},model:{k} | - | {e} | - |")
            continue
        mem = max(s["memory_gb"] for s in st)
        print(f"| data:{D // k},model:{k} | {mem:.1f} | {'yes' if all(s['fits'] for s in st) else 'NO'} "
              f"| {_hms(total(st))} |")


if __name__ == "__main__":
    app.run(main)
