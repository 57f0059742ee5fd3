"""quipjax: QuIP# (randomized Hadamard incoherence, E8P lattice codebooks, BlockLDLQ) in JAX.

The public API, flat. Layers, lowest first (a module imports only its own layer or lower):

    numerics     hadamard, rht, hessian, codebooks, ldlq, quantize, group, kernels,
                 formats.quipsharp.packing        arrays in, arrays out
    modules      models (Llama, loaders), layers (stand-ins: tap, dense, tunable, codes)
    distribution distributed (mesh, Placement, programs), training (optax loop), generate
                 (KV-cache generation: `quipjax.generate.generate`)
    pipeline     pipeline.* (the job: Hessians, the quantization loop, fine-tuning, ...)

Quantize one layer, with the default stages or your own:

    ql = quipjax.quantize_linear(W, H, key=jax.random.key(0))                # E8P12, RHT
    ql = quipjax.quantize_linear(W, H, key=k, codebook=quipjax.codebooks.get("E8P12RVQ4B"),
                                 rotation=(quipjax.rht.Rotation("rfft", m),
                                           quipjax.rht.Rotation("rfft", n)))
    ql = quipjax.quantize_linear(W, H, key=k, rounding=my_rounding)  # (Rotated, codebook) -> codes

Quantize the linears of any Flax NNX model by Qwix-style rules (`quipjax.rules`):

    rules = [quipjax.Rule(r".*attn\\.(q|k|v)_proj", codebook="E8P12"),
             quipjax.Rule(r".*lm_head|.*embed.*", skip=True)]
    stats = quipjax.calibrate(model, rules, batches)
    qmodel = quipjax.quantize_with_rules(model, rules, stats, key=jax.random.key(0))

Quantize a whole model: `quipjax.quantize_model(quipjax.RunConfig(model=..., output_dir=...))`,
then `quipjax.build_model(output_dir, linears="codes")` to run it from the codes.
"""
from quipjax import codebooks, generate, hadamard, hessian, kernels, ldlq, rht, rules
from quipjax.distributed import Placement, parse_mesh
from quipjax.group import LinearGroup, QuantizedGroup, fuse, group_key, quantize_group, unfuse
from quipjax.layers import attach
from quipjax.models.adapter import LLAMA, ModelAdapter
from quipjax.models.families import FAMILIES, adapter_of, family_of
from quipjax.models.family import Family
from quipjax.models.gemma3 import Gemma3, Gemma3Spec
from quipjax.models.llama import Llama, LlamaSpec
from quipjax.models.moe import MoEModel, MoESpec
from quipjax.models.loaders import load_model, load_model_streamed, open_checkpoint
from quipjax.pipeline.build import build_model, build_model_streamed
from quipjax.pipeline.evaluate import perplexity
from quipjax.pipeline.run import quantize_model
from quipjax.pipeline.settings import (BlockTuneSettings, CalibrationSettings, E2ESettings,
                                       QuantSettings, RunConfig)
from quipjax.quantize import (FORMAT_VERSION, Lift, QuantizedLinear, Rotated, SequentialLift, VmapLift,
                              assemble, check_inputs, check_settings, factor, proxy,
                              quantize_linear, quantize_stack, rotate_and_scale, rotations_for,
                              round_ldlq)
from quipjax.rules import Rule, calibrate, find_groups
from quipjax.rules import quantize as quantize_with_rules
from quipjax.training import TuneConfig, block_mse, distill_kl, tune

__version__ = "0.1.0"

__all__ = [
    # numerics
    "codebooks", "hadamard", "hessian", "kernels", "ldlq", "rht", "generate",
    "QuantizedLinear", "FORMAT_VERSION", "Rotated", "check_inputs", "check_settings",
    "rotations_for", "rotate_and_scale", "factor", "round_ldlq", "assemble", "proxy",
    "quantize_linear", "Lift", "SequentialLift", "VmapLift", "quantize_stack",
    "LinearGroup", "QuantizedGroup", "fuse", "unfuse", "group_key", "quantize_group",
    # models and stand-in layers
    "Llama", "LlamaSpec", "Gemma3", "Gemma3Spec", "MoEModel", "MoESpec", "FAMILIES", "Family",
    "family_of", "adapter_of", "ModelAdapter", "LLAMA", "open_checkpoint", "load_model",
    "load_model_streamed",
    "attach",
    # distribution, training, generation
    "Placement", "parse_mesh", "tune", "TuneConfig", "block_mse", "distill_kl",
    # rules: any NNX model (quipjax.rules.quantize is exported as quantize_with_rules)
    "rules", "Rule", "find_groups", "calibrate", "quantize_with_rules",
    # the job
    "RunConfig", "QuantSettings", "BlockTuneSettings", "E2ESettings", "CalibrationSettings",
    "quantize_model",
    "build_model", "build_model_streamed", "perplexity",
]
