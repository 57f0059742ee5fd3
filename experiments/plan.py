"""Dry-run planner: memory per device and time of each stage of experiments/quantize.py.

    python experiments/plan.py --model=tests/data/configs/llama2_7b.json --mesh=data:8
    python experiments/plan.py --model=/path/to/Llama-2-70b-hf --mesh=data:2,model:4 \
        --flagfile=experiments/configs/llama7b_2bit.cfg
    python experiments/plan.py --mesh=data:8          # the shipped SmolLM2 (its GGUF header)
    python experiments/plan.py --model=tests/data/configs/llama2_70b.json --mesh=data:2,model:8 --hosts=2

Reads only the model's configuration: a Hugging Face folder's config.json (or the json file
itself), a .gguf's header, or the default SmolLM2. Takes quantize.py's flags (so its flagfiles
work: calibration size, fine-tuning, evaluation settings) plus --device_memory_gb, --speedup
and --costs. Memory is computed from the shapes (quipjax.pipeline.plan documents each term);
times scale per-unit costs measured by experiments/bench_sharding_costs.py (quantize_linear
stage by stage on 4096x11008 and 8192x28672, one Hessian-collection block step and one block
forward for 7B- and 70B-shaped blocks) to the model's shapes. The output names the machine
each cost was measured on (the built-in ones: quipjax.pipeline.plan.MEASURED_ON); --speedup
divides every time (a device that much faster), --costs reads your own measurement (the JSON
lines of bench_sharding_costs.py --out on your device).
"""
from __future__ import annotations

import json

from absl import flags

import quipjax
from quipjax.distributed import mesh_shape
from quipjax.pipeline.plan import PlanCosts, plan, read_spec
from quipjax.pipeline.quantization import check_model
from quipjax.pipeline import cli

FLAGS = flags.FLAGS
quipjax.RunConfig.define_flags()        # quantize.py's flags, so its flagfiles work
flags.DEFINE_float("device_memory_gb", 80.0, "Memory of one device (GB, 2^30 bytes).")
flags.DEFINE_float("speedup", 1.0, "Divide the measured times by this (a device this much faster "
                   "than one device of the measuring machine).")
flags.DEFINE_string("costs", None, "JSON lines from bench_sharding_costs.py --out (default: the "
                    "built-in costs, quipjax.pipeline.plan.MEASURED, with their machine).")
flags.DEFINE_boolean("json", False, "Print the plan as one JSON object instead of tables.")
flags.DEFINE_integer("hosts", 1, "Hosts (processes of a --distributed run) the mesh's devices "
                     "are spread over, the same number each: adds each host's memory and "
                     "interconnect traffic.")


def _hms(s):
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def main(argv):
    del argv
    cfg = quipjax.RunConfig.from_flags(FLAGS)
    cfg.check_model_given()
    spec, where = read_spec(FLAGS.model)
    check_model(spec, cfg.settings.codebook)   # what quantize.py would refuse, plan refuses
    shape = mesh_shape(FLAGS.mesh)
    D = shape["data"] * shape["model"]
    c = PlanCosts.from_jsonl(FLAGS.costs) if FLAGS.costs else PlanCosts.builtin()

    def run(shape):
        return plan(spec, shape, c, cfg, device_gb=FLAGS.device_memory_gb, speedup=FLAGS.speedup,
                    hosts=FLAGS.hosts)

    def total(stages):
        return sum((2 if s["name"].startswith("perplexity") else 1) * s["seconds"]
                   for s in stages if s.get("counted", True))
    stages = run(shape)
    if FLAGS.json:
        print(json.dumps({"model": where, "mesh": shape, "stages": stages}, default=str))
        return
    print(f"model {where}: {spec.num_layers} layers, hidden {spec.hidden_size}, intermediate "
          f"{spec.intermediate_size}, heads {spec.num_heads}/{spec.num_kv_heads} kv, vocab "
          f"{spec.vocab_size}")
    print(f"mesh {FLAGS.mesh or 'none'}: {D} device(s) of {FLAGS.device_memory_gb:g} GB; "
          f"times = measured costs ({c.source}) / speedup {FLAGS.speedup:g}")
    by_source = {}
    for unit, source in c.sources():
        by_source.setdefault(source, []).append(unit)
    for source, units in by_source.items():
        print(f"  costs of {', '.join(units)}: measured on {source}")
    print()
    print("| stage | memory per device (GB) | fits | time (h:mm:ss) |")
    print("|---|---|---|---|")
    for s in stages:
        n = 2 if s["name"].startswith("perplexity") else 1
        print(f"| {s['name']} | {s['memory_gb']:.1f} | {'yes' if s['fits'] else 'NO'} | "
              f"{_hms(s['seconds'])}{' (x2)' if n == 2 else ''}"
              f"{'' if s.get('counted', True) else ' (not in the total)'} |")
    print(f"| total | | | {_hms(total(stages))} |")
    print()
    for s in stages:
        parts = ", ".join(f"{k} {v / 1024 ** 3:.2f}" for k, v in s["memory"].items())
        print(f"- {s['name']}: {parts} GB. {s['notes']}")
    if FLAGS.hosts > 1:
        print()
        print(f"Per host ({FLAGS.hosts} hosts x {D // FLAGS.hosts} devices):")
        print("| stage | device memory of a host (GB) | host RAM / disk of a process (GB) | "
              "interconnect out of a host (GB) |")
        print("|---|---|---|---|")
        for s in stages:
            print(f"| {s['name']} | {s['host_memory_gb']:.1f} | "
                  f"{sum(s['host'].values()) / 1024 ** 3:.2f} | "
                  f"{sum(s['network'].values()) / 1024 ** 3:.2f} |")
        for s in stages:
            parts = [f"{k} {v / 1024 ** 3:.2f} GB" for k, v in {**s["host"], **s["network"]}.items()]
            if parts:
                print(f"- {s['name']}: {', '.join(parts)}")
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
    cli.run(main, positional="model")
