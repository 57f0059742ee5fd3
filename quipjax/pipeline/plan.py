"""Dry-run planner: memory per device and time of each stage of a quantization run on a mesh,
from a model's configuration alone (experiments/plan.py).

Memory is computed from the shapes (each term is returned); times scale per-unit costs
measured by experiments/bench_sharding_costs.py (quantize_linear stage by stage on two matrix
shapes, one Hessian-collection step and one forward of 7B- and 70B-shaped blocks) to the
model's shapes. Every cost carries the machine it was measured on (`PlanCosts.sources`);
`speedup` divides all times (a device that much faster).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Callable

import numpy as np

from quipjax import codebooks
from quipjax.training import loss_chunk
from quipjax.models.families import family_for_model_type
from quipjax.models.llama import LlamaSpec
from quipjax.pipeline.settings import RunConfig

__all__ = ["PlanCosts", "MEASURED", "MEASURED_ON", "plan", "matrix_seconds", "read_spec"]

# where the built-in costs come from (BUILD_NOTES.md, issue 6): experiments/bench_sharding_costs.py
# with jax 0.10.2 on the CPU, machine otherwise idle, one device = 2 cores
MEASURED_ON = ("2-core Intel Xeon with AMX / AVX-512 bf16 (an earlier machine of this class, "
               "2026-11; an AVX2-only AMD Zen 2 measured 2.4-2.7x slower per matrix)")
# Matrix: --what=matrix --shapes=4096x11008,8192x28672 (E8P12, random SPD H) and --what=proxy
# (same shapes); block: --what=block --blocks=llama2_7b,llama2_70b --ctx=2048 --repeats=3
# (bf16 weights, one window)
MEASURED = [
    {"kind": "matrix", "shape": "4096x11008", "check_s": 0.46, "hessian_rht_s": 1.27,
     "weight_rht_s": 0.46, "block_ldl_s": 2.73, "block_ldlq_s": 3.51, "proxy_s": 5.4,
     "peak_rss_mb": 2342, "source": MEASURED_ON},
    {"kind": "matrix", "shape": "8192x28672", "check_s": 6.13, "hessian_rht_s": 10.35,
     "weight_rht_s": 1.90, "block_ldl_s": 51.79, "block_ldlq_s": 40.59, "proxy_s": 93.8,
     "peak_rss_mb": 13786, "source": MEASURED_ON},
    {"kind": "block", "block": "llama2_7b", "hidden": 4096, "intermediate": 11008, "ctx": 2048,
     "params": 202375168, "hessian_step_s": 3.33, "forward_s": 1.15, "peak_rss_mb": 3334,
     "source": MEASURED_ON},
    {"kind": "block", "block": "llama2_70b", "hidden": 8192, "intermediate": 28672, "ctx": 2048,
     "params": 855638016, "hessian_step_s": 24.34, "forward_s": 4.72, "peak_rss_mb": 16706,
     "source": MEASURED_ON},
]
# Tail-biting Viterbi search (both passes) per 256-weight tile at L = 16, one device, by
# (code, K): mean of two runs of experiments/bench_trellis.py --samples=16384 --bits=2,3,4
# --scales=1.0 --speed_tiles=64 (BUILD_NOTES.md, issue 16). V = 1 codes cost about the same at
# every K; HYB (V = 2) compares 2^(KV) predecessors per state, so it grows with K.
TRELLIS_TILE_S = {("1MAD", 2): 0.0092, ("1MAD", 3): 0.0078, ("1MAD", 4): 0.0092,
                  ("3INST", 2): 0.0108, ("3INST", 3): 0.0076, ("3INST", 4): 0.0078,
                  ("HYB", 2): 0.0080, ("HYB", 3): 0.0116, ("HYB", 4): 0.0123}
# The RVQ beam search per weight (seconds of `quantize_with_values` on 10^5 Gaussian 8-dim
# vectors / 8e5 weights), by (codebook, beam): experiments/bench_rvq_search.py
# (BUILD_NOTES.md, issue 16). It replaces the greedy rounding, whose cost is already in
# E8P12's measured BlockLDLQ time (greedy: 0.09 / 0.04 s per 10^5 vectors).
RVQ_BEAM_WEIGHT_S = {("E8P12RVQ4B", 4): 2.338 / 8e5, ("E8P12RVQ4B", 16): 4.183 / 8e5,
                     ("E8P12RVQ4B", 64): 13.103 / 8e5, ("E8P12RVQ3B", 4): 2.139 / 8e5,
                     ("E8P12RVQ3B", 16): 3.908 / 8e5, ("E8P12RVQ3B", 64): 10.146 / 8e5}
GB = 1024 ** 3


def read_spec(path) -> tuple:
    """(spec, where) from a model's configuration only: a Hugging Face folder's
    config.json, the json file itself, or a .gguf's header (weights are not read)."""
    from quipjax.models.loaders import GGUFFile, default_model_path
    path = path or default_model_path()
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{os.path.dirname(path)} has no config.json")
    if path.endswith(".json"):
        from quipjax.models.loaders import read_config_json
        cfg = read_config_json(os.path.dirname(path) or ".", os.path.basename(path))
        try:
            return family_for_model_type(cfg.get("model_type", "llama")).spec_from_hf(cfg), path
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: {' '.join(str(e).split())}") from e
    return GGUFFile(path).spec, path


@dataclasses.dataclass(frozen=True)
class PlanCosts:
    """Measured per-unit costs (seconds on one device of the machine that measured them) and
    the shapes they were measured on; `plan` scales them to other shapes.

    matrix: {"m x n": {"hessian_rht_s", "weight_rht_s", "block_ldl_s", "block_ldlq_s",
    "check_s", "peak_rss_mb", "rss_after_inputs_mb"}} (experiments/bench_sharding_costs.py
    --what=matrix); block: {name: {"hidden", "intermediate", "ctx", "hessian_step_s",
    "forward_s"}} (--what=block)."""

    matrix: dict
    block: dict
    source: str = ""

    def sources(self) -> list:
        """(unit, where it was measured) of every cost, for printing beside the plan."""
        return ([(f"matrix {k}", r.get("source", self.source)) for k, r in self.matrix.items()]
                + [(f"block {k}", r.get("source", self.source)) for k, r in self.block.items()])

    @staticmethod
    def from_jsonl(path: str) -> "PlanCosts":
        matrix, block = {}, {}
        with open(path) as f:
            for line in f:
                if not line.strip():
                    continue
                r = json.loads(line)
                if r.get("kind") == "matrix":
                    matrix.setdefault(r["shape"], {}).update(r)
                elif r.get("kind") == "proxy":
                    matrix.setdefault(r["shape"], {})["proxy_s"] = r["proxy_s"]
                elif r.get("kind") == "block":
                    block[r["block"]] = r
        return PlanCosts(matrix, block, f"{path} (your measurement)")

    @staticmethod
    def builtin() -> "PlanCosts":
        """The costs shipped with quipjax (`MEASURED`, each labelled with its machine)."""
        matrix = {r["shape"]: r for r in MEASURED if r["kind"] == "matrix"}
        block = {r["block"]: r for r in MEASURED if r["kind"] == "block"}
        return PlanCosts(matrix, block, "built-in MEASURED (quipjax.pipeline.plan)")


def _group_shapes(spec) -> dict:
    """{group: (m, n, count per layer)} of a Llama block's quantized groups."""
    d, f, hd = spec.hidden_size, spec.intermediate_size, spec.head_dim
    return {"qkv": (spec.num_heads * hd + 2 * spec.num_kv_heads * hd, d),
            "o": (d, spec.num_heads * hd),
            "up": (2 * f, d),
            "down": (d, f)}


def _fit(costs: PlanCosts, key: str, work: Callable[[int, int], float]) -> float:
    """Seconds per unit of `work(m, n)` for a stage: the least-squares ratio over the
    measured shapes, weighted toward large ones (sum t / sum work)."""
    num = den = 0.0
    for shape, r in costs.matrix.items():
        m, n = (int(v) for v in shape.split("x"))
        num += r[key]
        den += work(m, n)
    if den == 0:
        raise ValueError("no measured per-matrix costs: run experiments/bench_sharding_costs.py")
    return num / den


# stage work models (arbitrary units; the measured shapes calibrate them)
_WORK = {
    "check_s": lambda m, n: n * n + m * n,
    "hessian_rht_s": lambda m, n: n * n * math.log2(n),
    "weight_rht_s": lambda m, n: m * n * (math.log2(m) + math.log2(n)),
    "block_ldl_s": lambda m, n: n ** 3,
    "block_ldlq_s": lambda m, n: m * n * n,
}


def matrix_seconds(costs: PlanCosts, m: int, n: int) -> dict:
    """Estimated seconds of each quantize_linear stage for an (m, n) matrix, plus the proxy
    loss the pipeline records (two (m, n) x (n, n) products; measured when the costs have
    "proxy_s", else 2x BlockLDLQ)."""
    out = {k: _fit(costs, k, w) * w(m, n) for k, w in _WORK.items()}
    if all("proxy_s" in r for r in costs.matrix.values()):
        out["proxy_s"] = _fit(costs, "proxy_s", lambda m, n: m * n * n) * m * n * n
    else:
        out["proxy_s"] = 2.0 * out["block_ldlq_s"]
    out["total_s"] = sum(out.values())
    return out


def _block_seconds(costs: PlanCosts, spec, ctx: int, key: str) -> float:
    """Seconds of one block step on one window of `ctx` tokens, scaled from the measured
    block nearest in size by parameter count (linear part) and ctx^2 (attention)."""
    d = spec.hidden_size
    params = _block_params(spec)
    best = None
    for r in costs.block.values():
        rp = r.get("params") or (4 * r["hidden"] ** 2 + 3 * r["hidden"] * r["intermediate"])
        score = abs(math.log(params / rp))
        if best is None or score < best[0]:
            best = (score, r, rp)
    if best is None:
        raise ValueError("no measured block costs: run experiments/bench_sharding_costs.py --what=block")
    _, r, rp = best
    lin = params / rp * ctx / r["ctx"]
    att = (d / r["hidden"]) * (ctx / r["ctx"]) ** 2
    # the attention share of a block step at the measured ctx: 4 T^2 d of 2 T P + 4 T^2 d
    share = 4 * r["ctx"] * r["hidden"] / (2 * rp + 4 * r["ctx"] * r["hidden"])
    return r[key] * ((1 - share) * lin + share * att)


def _block_params(spec) -> int:
    sh = _group_shapes(spec)
    return sum(m * n for m, n in sh.values())




@dataclasses.dataclass(frozen=True)
class _Setup:
    """What every stage estimate needs: the model, the mesh and the run's settings."""

    spec: LlamaSpec
    mesh: dict
    costs: PlanCosts
    cfg: RunConfig
    dtype_bytes: int
    speedup: float
    hosts: int = 1

    @property
    def D(self) -> int:
        return int(np.prod(list(self.mesh.values())))

    @property
    def per_host(self) -> int:
        """Devices of one host (process)."""
        return self.D // self.hosts

    @property
    def ring(self) -> float:
        """Bytes one host sends (and receives) per byte of an all-reduce over the hosts, after
        its devices reduced among themselves: 2 (H - 1) / H (ring)."""
        return 2 * (self.hosts - 1) / self.hosts

    @property
    def M(self) -> int:
        return self.mesh.get("model", 1)

    @property
    def block_w(self) -> float:
        return _block_params(self.spec) * self.dtype_bytes

    @property
    def gathered(self) -> float:     # one block's weights gathered from the model axis
        return self.block_w if self.M > 1 else 0.0

    def batch_par(self, b: int) -> int:
        """Devices a batch of b windows is split over (`Placement.batch_spec`)."""
        if b % self.D == 0:
            return self.D
        data = self.mesh.get("data", 1)
        return data if b % data == 0 else 1


def _hessian_stage(s: _Setup) -> dict:
    """One block at a time; windows over all devices; slots per device."""
    spec, cfg, D, L = s.spec, s.cfg, s.D, s.spec.num_layers
    d, f = spec.hidden_size, spec.intermediate_size
    shapes = _group_shapes(spec)
    batch, ctx, devset = cfg.batch_size, cfg.ctx_size, cfg.devset_size
    state_b = sum(2 * (n * n + n + 1) * 4 for _, n in shapes.values())      # hi/lo pairs
    slots = cfg.hessian_shards // D
    acts = batch * ctx * (3 * d + 2 * f + 2 * spec.num_heads * spec.head_dim) * 4
    att = batch * spec.num_heads * min(ctx, 256) * ctx * 4 * 2           # chunked scores
    taps = batch * ctx * sum(n for _, n in shapes.values()) * 2
    hmax = max(n for _, n in shapes.values())
    # the end-of-layer reduction, a group at a time, smallest first (`HessianEngine.finalize`):
    # 8 n^2 float32 of temporaries for a group of input n (XLA's memory_analysis of the
    # reduction program), beside the slots of the groups not yet reduced and the H's done
    reduce_peak, left, done = 0.0, slots * state_b, 0.0
    for n in sorted(n for _, n in shapes.values()):
        reduce_peak = max(reduce_peak, left + done + 8 * n * n * 4)
        left -= slots * 2 * (n * n + n + 1) * 4
        done += n * n * 4
    step_tmp = acts + att + taps + hmax * hmax * 4                          # + one chunk's X^T X
    mem = {"block weights (1/model stored + one gathered copy)": s.block_w / s.M + s.gathered,
           f"accumulators ({slots} slot(s))": slots * state_b,
           "step temporaries (activations, one X^T X)": step_tmp,
           "end-of-layer reduction beyond the slots (not at the same time)":
               reduce_peak - slots * state_b}
    peak = s.block_w / s.M + s.gathered + max(slots * state_b + step_tmp, reduce_peak)
    n_steps = math.ceil(devset / (D * batch))
    t_step = _block_seconds(s.costs, spec, ctx, "hessian_step_s") * batch
    # the exact reduction per group: one pmax and three psums of n x n float32 (the H pair;
    # the mean and count pairs are small): 16 n^2 bytes of all-reduce per layer
    payload = sum(16 * (n * n + n + 1) for _, n in shapes.values())
    net = {"Hessian all-reduce": L * payload * s.ring}
    if s.M > s.per_host:        # the model axis crosses hosts: every step gathers weights
        net["weight all-gathers (model axis across hosts)"] = (
            L * n_steps * s.block_w * (1 - s.per_host / s.M))
    host = {"activation files on disk (2 layers)": 2 * math.ceil(devset / s.hosts) * ctx * d * 4}
    return dict(name="Hessian collection", memory=mem, peak=peak, network=net, host=host,
                seconds=L * n_steps * t_step / s.speedup,
                notes=f"{L} layers x {n_steps} steps of {D} x {batch} window(s) of {ctx} tokens; "
                      f"{t_step:.2f} s/step measured-scaled; one exact all-reduce per layer; host streams "
                      f"{devset} x {ctx} x {d} float32 activations per layer "
                      f"({devset * ctx * d * 4 / GB:.1f} GB on disk x 2)")


def _search_seconds(s: _Setup, rounds: int):
    """(seconds, note) of the codebook's own search beyond the timed rounding (the trellis
    Viterbi, the RVQ beam) for `rounds` matrices of every group type; (0, note) when it has
    no measured cost, (0, "") when there is none."""
    qs = s.cfg.settings
    cb = codebooks.get(qs.codebook)
    weights = sum(m * n for m, n in _group_shapes(s.spec).values())
    if cb.search == "tail-biting":
        tile_s = TRELLIS_TILE_S.get((cb.trellis.code, cb.trellis.K))
        if tile_s is None:
            return 0.0, f"{qs.codebook}: no measured search cost, not in this estimate"
        secs = rounds * weights / 256 * tile_s * 2 ** (cb.trellis.L - 16)
        return secs, (f"{qs.codebook} Viterbi search {secs:.0f} s ({tile_s * 1e3:.1f} ms per "
                      "256-weight tile at L = 16, experiments/bench_trellis.py)")
    if qs.rvq_beam > 1 and isinstance(cb, codebooks.RVQ):
        weight_s = RVQ_BEAM_WEIGHT_S.get((qs.codebook, qs.rvq_beam))
        if weight_s is None:
            # the measured costs are E8P12's; say so rather than underestimate silently
            return 0.0, (f"rounding timed for E8P12: {qs.codebook} with --rvq_beam="
                         f"{qs.rvq_beam} searches several times longer (measured for beams "
                         "4, 16, 64: BUILD_NOTES.md), not in this estimate")
        secs = rounds * weights * weight_s
        return secs, (f"{qs.codebook} beam {qs.rvq_beam} search {secs:.0f} s "
                      f"({weight_s * 1e6:.2f} us per weight, experiments/bench_rvq_search.py)")
    return 0.0, ""


def _quantize_stage(s: _Setup) -> dict:
    """Per group type, ceil(L / D) rounds of D matrices in parallel (one per device)."""
    L, D = s.spec.num_layers, s.D
    secs, mem_q, detail = 0.0, 0.0, []
    for g, (m, n) in _group_shapes(s.spec).items():
        c = matrix_seconds(s.costs, m, n)
        rounds = math.ceil(L / D)
        secs += rounds * c["total_s"]
        # W, fused copy, Ws: 3 m n; H, Hr, L, Cholesky temp: 4 n^2; codes m n / 8 * 2 bytes
        mem_q = max(mem_q, (3 * m * n + 4 * n * n) * 4 + m * n // 4)
        detail.append(f"{g} {m}x{n}: {c['total_s']:.1f} s/matrix x {rounds} rounds")
    # a process's share of a stack of W and H (its devices' matrices, `Lift.local`), twice
    # (the fused matrices, then the stacked copy), plus one member read at a time
    host = max((2 * s.per_host * (m * n + n * n) + m * n) * 4
               for m, n in _group_shapes(s.spec).values())
    search, note = _search_seconds(s, math.ceil(L / D))
    secs += search
    detail += [note] if note else []
    # every process gathers the codes, SU and SV of the matrices its devices did not quantize
    bits = codebooks.get(s.cfg.settings.codebook).bits_per_weight
    codes = L * sum(m * n * bits / 8 + 4 * (m + n) for m, n in _group_shapes(s.spec).values())
    net = {"codes gathered from the other hosts": codes * (1 - 1 / s.hosts)}
    return dict(name="quantization (no FT)", memory={"one matrix (W, H, Hr, L, temps)": mem_q},
                network=net, host={"this process's share of a stack of W and H": host},
                seconds=secs / s.speedup,
                notes="; ".join(detail) + f"; {L} layers x 4 groups, {D} at a time; host RAM "
                      f"for one stack of W and H: {host / GB:.1f} GB")


def _inblock_stage(s: _Setup) -> dict:
    spec, ft, L = s.spec, s.cfg.ft, s.spec.num_layers
    d, f = spec.hidden_size, spec.intermediate_size
    fw = _block_seconds(s.costs, spec, ft.ctx_size, "forward_s")
    n_tr, n_va, ep = ft.train_size, ft.valid_size, ft.epochs
    # per block: FP outputs of all windows, then 3 tunings of ep epochs (fwd+bwd ~ 3 fwd)
    # with a validation pass each epoch, plus the 4 quantizations (one device each)
    par = s.batch_par(ft.bs)
    per_block = (n_tr + n_va) * fw / s.D + 3 * (ep * (3 * n_tr + n_va) + n_va) * fw / par
    per_block += sum(matrix_seconds(s.costs, m, n)["total_s"]
                     for m, n in _group_shapes(spec).values())
    search, search_note = _search_seconds(s, 1)        # a block's 4 groups, each once
    per_block += search
    mem = {"block params + Adam + grads (float32)": 4 * _block_params(spec) * 4 / s.M,
           "activations (batch / devices)": ft.bs * ft.ctx_size * (8 * d + 4 * f) * 4 / par}
    return dict(name="in-block fine-tuning", memory=mem, seconds=L * per_block / s.speedup,
                notes=f"{L} blocks sequential; 3 tunings x {ep} epochs x {n_tr} windows of "
                      f"{ft.ctx_size} tokens, batch {ft.bs} split over {par} device(s) (a batch "
                      "not divisible by the device count or the data axis runs replicated); the "
                      "4 groups of a block are quantized one after the other on one device"
                      + (f"; {search_note} per block" if search_note else ""))


def _e2e_stage(s: _Setup) -> dict:
    spec, e2e, L = s.spec, s.cfg.e2e, s.spec.num_layers
    d, f, V = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    fw = _block_seconds(s.costs, spec, e2e.ctx_size, "forward_s")
    # the teacher runs once per window before tuning; per epoch: student fwd + remat fwd +
    # bwd (2x) per train window, 1 fwd per valid window
    n_win = e2e.train_size + e2e.valid_size
    teacher_s = L * fw * n_win / s.batch_par(e2e.bs)
    per_epoch = L * fw * (4 * e2e.train_size + e2e.valid_size) / s.batch_par(e2e.bs)
    R = sum(m * n for m, n in _group_shapes(spec).values()) * L * 4
    per_dev_b = e2e.bs / s.batch_par(e2e.bs)
    ctx = e2e.ctx_size
    chunk = loss_chunk(e2e.bs, V)          # positions per head / loss chunk (`distill_kl`)
    mem = {"student R (float32), 1/model": R / s.M,
           "gathered block (student R)": 2 * s.gathered,
           "block inputs kept for remat": L * per_dev_b * ctx * d * 4,
           "one block's backward activations": per_dev_b * ctx * (8 * d + 4 * f) * 4,
           "heads (student float32, teacher bf16) + a chunk's logits, log-probs, gradient":
               V * d * (4 + 2) / s.M + per_dev_b * chunk * V * 4 * 3}
    hidden_gb = n_win * ctx * d * 4 / 2 ** 30
    return dict(name="end-to-end fine-tuning", memory=mem,
                seconds=(teacher_s + e2e.epochs * per_epoch) / s.speedup,
                notes=f"{e2e.epochs} epochs x {e2e.train_size} windows of {ctx} tokens; batch "
                      f"{e2e.bs} (devices beyond the batch only hold shards); the teacher's "
                      f"hidden states of the {n_win} windows ({hidden_gb:.2f} GB float32) are "
                      "made once, before tuning, and written to each host's disk (read a batch at a time)")


def _eval_stage(s: _Setup) -> dict:
    """Block by block (`evaluate.perplexity(stream=...)`): one block at a time, sharded over
    the model axis, the hidden states of a chunk of windows (<= 1 GiB over all devices)
    between blocks; windows over the devices."""
    spec, cfg, L = s.spec, s.cfg, s.spec.num_layers
    d, f, V = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    windows = 24 * len(cfg.eval_datasets) if cfg.evaluate else 0
    ctx = cfg.eval_ctx_size
    head_w = V * d * s.dtype_bytes * (1 if spec.tie_embeddings else 2)
    fw = _block_seconds(s.costs, spec, ctx, "forward_s")
    step = s.D * ctx * d * 4                      # hidden states of one step (D windows)
    steps = min(max(1, math.ceil(windows / s.D)), max(1, 2 ** 30 // step))
    mem = {"embeddings and head (sharded over model)": head_w / s.M,
           "one block (sharded over model) + its gathered copy": s.block_w / s.M + s.gathered,
           "hidden states of a chunk of windows": steps * step / s.D,
           "activations + logits (one window)": ctx * (4 * d + 2 * f) * 4 + ctx * V * 4 * 3}
    net = {}
    if s.M > s.per_host:
        net["weight all-gathers (model axis across hosts)"] = (
            math.ceil(windows / s.D) * L * s.block_w * (1 - s.per_host / s.M))
    return dict(name="perplexity (each of FP and quantized)", memory=mem, network=net,
                seconds=math.ceil(windows / s.D) * L * fw / s.speedup,
                notes=f"{windows} windows of {ctx} tokens, {s.D} at a time; one block in "
                      "memory at a time (loaded once per chunk of windows)")


def plan(spec: LlamaSpec, mesh_shape: dict, costs: PlanCosts, cfg: RunConfig = RunConfig(), *,
         device_gb: float = 80.0, speedup: float = 1.0, hosts: int = 1) -> list:
    """Memory per device and time of each stage of `quantize_model(cfg)` on a mesh
    ({"data": a, "model": b}), from the model's spec alone. Returns a list of stage dicts
    (name, memory parts in bytes, memory_gb, fits, seconds, notes; counted: False for a stage
    whose time another stage holds, the quantization when in-block fine-tuning runs). Times are the measured
    costs (one device of the measuring machine, see `costs.sources()`) divided by `speedup`.

    hosts: processes the devices are spread over (`--distributed`), the same number of devices
    each. Every stage then also has "host_memory_gb" (its devices' memory on one host),
    "host" (host RAM and disk of one process, bytes) and "network" (bytes one host sends over
    the interconnect for the whole stage: the Hessian all-reduce, ring-style after a reduction
    inside the host; weight all-gathers when the model axis crosses hosts; the codes every
    process gathers)."""
    s = _Setup(spec, mesh_shape, costs, cfg, 2 if cfg.dtype == "bfloat16" else 4, speedup,
               int(hosts))
    if s.hosts < 1 or s.D % s.hosts:
        raise ValueError(f"{s.D} devices cannot be spread evenly over {hosts} hosts: --hosts "
                         "must divide the mesh's device count")
    if cfg.hessian_shards % s.D:
        raise ValueError(f"hessian_shards ({cfg.hessian_shards}) must be a multiple of the "
                         f"number of devices ({s.D})")
    stages = [_hessian_stage(s), _quantize_stage(s)]
    if cfg.ft.epochs > 0:
        # with in-block fine-tuning the layers are quantized inside that stage: the
        # quantization row stays for its memory, its time is not counted twice
        stages[1].update(name="quantization (inside in-block fine-tuning)", counted=False)
        stages.append(_inblock_stage(s))
    if cfg.e2e.epochs > 0:
        stages.append(_e2e_stage(s))
    stages.append(_eval_stage(s))
    for st in stages:
        st["memory_gb"] = st.get("peak", sum(st["memory"].values())) / GB
        st["fits"] = st["memory_gb"] <= device_gb
        st["host_memory_gb"] = st["memory_gb"] * s.per_host
        st.setdefault("network", {})
        st.setdefault("host", {})
    return stages
