"""The dry-run planner: the plans of issue 6 (computed before the planner moved to
quipjax.pipeline.plan) are unchanged, and every cost it uses says where it was measured."""
import json
import os
import subprocess
import sys

import pytest

from absl import flags

from quipjax.pipeline.plan import (MEASURED, MEASURED_ON, RVQ_BEAM_WEIGHT_S, TRELLIS_TILE_S,
                                   PlanCosts, plan, read_spec)
from quipjax.pipeline.settings import RunConfig

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = os.path.join(HERE, "data", "configs")


def _paper_config():
    """experiments/configs/llama7b_2bit.cfg: the paper's settings (6144 x 2048 calibration
    windows, in-block and end-to-end fine-tuning at 4096 tokens)."""
    fv = flags.FlagValues()
    RunConfig.define_flags(fv)
    cfg = os.path.join(HERE, "..", "experiments", "configs", "llama7b_2bit.cfg")
    fv(["prog", f"--flagfile={cfg}"])
    return RunConfig.from_flags(fv)


@pytest.mark.parametrize("model,mesh,want", [
    # GB per device of: Hessians, quantization, in-block FT, end-to-end FT, perplexity (issue
    # 17: the perplexity was 14.6 / 20.5 with the whole model in memory, now block by block;
    # the Hessians 5.5 / 34.7 with every group's reduction at once, now a group at a time;
    # the end-to-end stage 40.4 / 66.0 with the teacher's weights and whole log-probs on the
    # devices, now its hidden states made once on disk and its log-probs a chunk at a time)
    ("llama2_7b", {"data": 8, "model": 1}, [5.1, 2.3, 7.7, 28.1, 3.0]),
    ("llama2_70b", {"data": 1, "model": 8}, [33.2, 14.9, 12.6, 48.0, 4.9]),
])
def test_plans_of_issue_6_unchanged(model, mesh, want):
    spec, _ = read_spec(os.path.join(CONFIGS, f"{model}.json"))
    stages = plan(spec, mesh, PlanCosts.builtin(), _paper_config())
    assert [s["name"] for s in stages] == ["Hessian collection",
                                           "quantization (inside in-block fine-tuning)",
                                           "in-block fine-tuning", "end-to-end fine-tuning",
                                           "perplexity (each of FP and quantized)"]
    assert [round(s["memory_gb"], 1) for s in stages] == want
    assert all(s["fits"] for s in stages)


def test_every_cost_names_its_machine(tmp_path):
    built = PlanCosts.builtin()
    assert len(built.sources()) == 4
    assert all(src == MEASURED_ON and "measured" not in unit for unit, src in built.sources())
    line = {k: v for k, v in MEASURED[0].items() if k != "source"}
    f = tmp_path / "costs.jsonl"
    f.write_text(json.dumps(line) + "\n")
    mine = PlanCosts.from_jsonl(str(f))
    assert mine.sources() == [(f"matrix {line['shape']}", f"{f} (your measurement)")]


def test_plan_script_prints_the_source_of_its_costs():
    p = subprocess.run([sys.executable, os.path.join(HERE, "..", "experiments", "plan.py"),
                        f"--model={os.path.join(CONFIGS, 'llama2_7b.json')}", "--mesh=data:8"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"measured on {MEASURED_ON}" in p.stdout
    assert "| Hessian collection |" in p.stdout


@pytest.mark.parametrize("codebook,key", [("HYB2", ("HYB", 2)), ("HYB4", ("HYB", 4)),
                                         ("3INST4", ("3INST", 4))])
def test_trellis_search_is_in_the_quantize_estimate(codebook, key):
    """The trellis codes add their Viterbi search: (tiles of every group's matrix) x (seconds
    per tile of that code at that K) x (rounds of D matrices), on top of E8P12's stage time,
    counted here by hand."""
    tile_s = TRELLIS_TILE_S[key]
    import dataclasses
    spec, _ = read_spec(os.path.join(CONFIGS, "llama2_7b.json"))
    base = _paper_config()
    trellis = dataclasses.replace(
        base, settings=dataclasses.replace(base.settings, codebook=codebook))
    mesh = {"data": 8, "model": 1}
    e8p = plan(spec, mesh, PlanCosts.builtin(), base)[1]
    got = plan(spec, mesh, PlanCosts.builtin(), trellis)[1]
    d, f = spec.hidden_size, spec.intermediate_size
    weights = 3 * d * d + d * d + 2 * f * d + d * f        # qkv, o, up, down of Llama-2-7B
    want = 4 * weights / 256 * tile_s                      # 32 layers on 8 devices: 4 rounds
    assert got["seconds"] - e8p["seconds"] == pytest.approx(want, rel=1e-9)
    assert f"{codebook} Viterbi search" in got["notes"]


@pytest.mark.parametrize("codebook,beam", [("E8P12RVQ4B", 4), ("E8P12RVQ3B", 16)])
def test_rvq_beam_search_is_in_the_quantize_estimate(codebook, beam):
    """--rvq_beam adds its measured per-weight search time over every group's weights and
    rounds of D matrices (counted by hand); an unmeasured beam is named, not estimated."""
    import dataclasses
    spec, _ = read_spec(os.path.join(CONFIGS, "llama2_7b.json"))
    base = _paper_config()

    def with_beam(b):
        return dataclasses.replace(base, settings=dataclasses.replace(
            base.settings, codebook=codebook, rvq_beam=b))
    mesh = {"data": 8, "model": 1}
    greedy = plan(spec, mesh, PlanCosts.builtin(), with_beam(1))[1]
    got = plan(spec, mesh, PlanCosts.builtin(), with_beam(beam))[1]
    d, f = spec.hidden_size, spec.intermediate_size
    weights = 3 * d * d + d * d + 2 * f * d + d * f
    want = 4 * weights * RVQ_BEAM_WEIGHT_S[(codebook, beam)]
    assert got["seconds"] - greedy["seconds"] == pytest.approx(want, rel=1e-9)
    assert f"beam {beam} search" in got["notes"]
    other = plan(spec, mesh, PlanCosts.builtin(), with_beam(5))[1]
    assert other["seconds"] == greedy["seconds"] and "not in this estimate" in other["notes"]


def test_fine_tuning_counts_the_quantization_once():
    """With in-block fine-tuning the layers are quantized inside that stage: the quantization
    row is not counted, and the in-block stage holds the trellis search (L blocks x every
    group once x tiles x seconds per tile, counted by hand)."""
    import dataclasses
    spec, _ = read_spec(os.path.join(CONFIGS, "llama2_7b.json"))
    base = _paper_config()
    assert base.ft.epochs > 0
    hyb = dataclasses.replace(base, settings=dataclasses.replace(base.settings, codebook="HYB2"))
    mesh = {"data": 8, "model": 1}
    e8p, got = (plan(spec, mesh, PlanCosts.builtin(), c) for c in (base, hyb))
    assert e8p[1]["counted"] is False and got[1]["counted"] is False
    d, f = spec.hidden_size, spec.intermediate_size
    weights = 3 * d * d + d * d + 2 * f * d + d * f
    want = spec.num_layers * weights / 256 * TRELLIS_TILE_S[("HYB", 2)]
    assert got[2]["seconds"] - e8p[2]["seconds"] == pytest.approx(want, rel=1e-9)
    assert "HYB2 Viterbi search" in got[2]["notes"]
    nofit = dataclasses.replace(base, ft=dataclasses.replace(base.ft, epochs=0))
    assert plan(spec, mesh, PlanCosts.builtin(), nofit)[1].get("counted", True)


def test_hosts_add_per_host_memory_and_interconnect_traffic():
    """hosts=H: a stage's devices' memory on one host is per-device x D / H; the Hessian
    all-reduce sends 2 (H - 1) / H x (a pmax and 3 psums of every group's n x n float32, plus
    its mean and count pairs) per layer out of a host, counted here from the shapes by hand;
    the model axis inside a host moves no weight over the interconnect, across hosts it
    does; hosts must divide the device count."""
    import dataclasses
    spec, _ = read_spec(os.path.join(CONFIGS, "llama2_70b.json"))
    cfg = dataclasses.replace(_paper_config(), hessian_shards=16)
    costs = PlanCosts.builtin()
    one = plan(spec, {"data": 2, "model": 8}, costs, cfg)
    two = plan(spec, {"data": 2, "model": 8}, costs, cfg, hosts=2)
    assert [s["memory_gb"] for s in one] == [s["memory_gb"] for s in two]
    assert [s["seconds"] for s in one] == [s["seconds"] for s in two]
    assert all(s["host_memory_gb"] == s["memory_gb"] * 8 for s in two)
    assert all(sum(s["network"].values()) == 0 for s in one)
    d, f = spec.hidden_size, spec.intermediate_size
    ns = [d, spec.num_heads * spec.head_dim, d, f]          # inputs of qkv, o, up, down
    per_layer = sum(16 * (n * n + n + 1) for n in ns)
    h = two[0]["network"]
    assert h["Hessian all-reduce"] == pytest.approx(spec.num_layers * per_layer * 2 * 1 / 2)
    assert "weight all-gathers (model axis across hosts)" not in h      # model:8 inside a host
    four = plan(spec, {"data": 1, "model": 16}, costs, cfg, hosts=2)
    assert four[0]["network"]["Hessian all-reduce"] == pytest.approx(h["Hessian all-reduce"])
    assert four[0]["network"]["weight all-gathers (model axis across hosts)"] > 0
    assert four[-1]["network"]["weight all-gathers (model axis across hosts)"] > 0
    # a process builds its devices' share of a quantization stack (`Lift.local`): the fused
    # matrices and their stacked copy, plus one member matrix read at a time
    hd = spec.head_dim
    shapes = [((spec.num_heads + 2 * spec.num_kv_heads) * hd, d), (d, spec.num_heads * hd),
              (2 * f, d), (d, f)]

    def stack_bytes(devices):
        return max((2 * devices * (m * n + n * n) + m * n) * 4 for m, n in shapes)
    q1, q2 = (sum(p[1]["host"].values()) for p in (one, two))
    assert (q1, q2) == (stack_bytes(16), stack_bytes(8))
    with pytest.raises(ValueError, match="spread evenly"):
        plan(spec, {"data": 2, "model": 8}, costs, cfg, hosts=3)
