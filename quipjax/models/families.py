"""The families quipjax runs, and how a checkpoint finds its family.

    fam = family_for_model_type(cfg["model_type"])     # HF config.json
    fam, layout = family_for_gguf(arch, field)          # GGUF general.architecture + header
    fam = family_of(spec)                               # any spec of a family
    spec = spec_from_dict(meta["model"])                # a quipjax checkpoint's spec

| family | HF model_type | GGUF architecture | default groups |
|---|---|---|---|
| llama | llama, mistral, qwen2, qwen3, phi3 | llama, qwen2, qwen3, phi3 | qkv, o, up/gate, down |
| gemma3 | gemma3_text | gemma3 | qkv, o, up/gate, down |
| moe | mixtral, qwen3_moe | llama with experts, qwen3moe | qkv, o, per expert up/gate, down |
"""
from __future__ import annotations


import math

from quipjax.models import gemma3, llama, moe
from quipjax.models.adapter import ModelAdapter
from quipjax.models.family import Family, GGUFLayout
from quipjax.rule import Rule

__all__ = ["FAMILIES", "LLAMA_FAMILY", "MOE_FAMILY", "GEMMA3_FAMILY", "LLAMA_RULES",
           "PHI3_RULES", "ATTENTION_RULES", "family_for_model_type", "family_for_gguf",
           "family_of", "spec_from_dict", "adapter_of"]


def _r(pattern, group, **kw):
    return Rule(pattern, group=group, **kw)


# the attention of every Llama-like block: q, k, v read one input (fused, rows q | k | v)
ATTENTION_RULES = (_r(r"self_attn\.q_proj", "qkv"), _r(r"self_attn\.k_proj", "qkv"),
                   _r(r"self_attn\.v_proj", "qkv"), _r(r"self_attn\.o_proj", "o"))
# up before gate: the official fused upgate_proj row order, so that checkpoints export to
# quip-sharp (rows cannot be reordered after the RHT; quipjax.formats.quipsharp)
LLAMA_RULES = ATTENTION_RULES + (_r(r"mlp\.up_proj", "up"), _r(r"mlp\.gate_proj", "up"),
                                 _r(r"mlp\.down_proj", "down"))
# Phi-3's checkpoints fuse q/k/v and gate/up into single linears: each is a group of one
PHI3_RULES = (_r(r"self_attn\.qkv_proj", "qkv"), _r(r"self_attn\.o_proj", "o"),
              _r(r"mlp\.gate_up_proj", "up"), _r(r"mlp\.down_proj", "down"))


def _llama_rules(spec) -> tuple:
    if spec.fused_qkv != spec.fused_gate_up:
        raise ValueError("a Llama-family spec fuses both q/k/v and gate/up (Phi-3) or neither")
    return PHI3_RULES if spec.fused_qkv else LLAMA_RULES


def _unpermute(w, heads):
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _llama_gguf_fixup(spec, name, w):
    # llama.cpp permutes the rows of Q and K of the llama architecture for its interleaved
    # RoPE; undo it for the rotate-half RoPE of the HF layout
    if name.endswith("self_attn.q_proj.weight"):
        return _unpermute(w, spec.num_heads)
    if name.endswith("self_attn.k_proj.weight"):
        return _unpermute(w, spec.num_kv_heads)
    return w


_GGUF_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
               "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_GGUF_PHI3 = dict(_GGUF_BLOCK, attn_qkv="self_attn.qkv_proj", ffn_up="mlp.gate_up_proj")


def _dense(field):
    return not field("llama.expert_count", 0)


def _gguf(arch, block, fixup=lambda spec, name, w: w, when=lambda field: True):
    return GGUFLayout(archs=(arch,), block=block, fixup=fixup, when=when,
                      spec=lambda field, shapes: llama.spec_from_gguf(field, arch, shapes))


LLAMA_FAMILY = Family(
    name="llama", model_types=llama.MODEL_TYPES, spec_from_hf=llama.LlamaSpec.from_hf,
    spec_from_dict=llama.LlamaSpec.from_dict, model=llama.Llama, block=llama.Block,
    rules=_llama_rules,
    gguf=(_gguf("llama", _GGUF_BLOCK, _llama_gguf_fixup, _dense), _gguf("qwen2", _GGUF_BLOCK),
          _gguf("qwen3", _GGUF_BLOCK), _gguf("phi3", _GGUF_PHI3)))

def _moe_rules(spec) -> tuple:
    """q/k/v, o, then every expert's (up, gate), then every expert's down; the experts'
    inputs are routed (pooled per kind for experts that receive too few tokens). The
    router (`gate`) matches no rule: it stays in floating point."""
    attr, g, u, dn = spec.style
    e = rf"{attr}\.experts\.(\d+)\."
    return ATTENTION_RULES + (_r(e + u, r"e\1_up", pool="experts_up"),
                              _r(e + g, r"e\1_up", pool="experts_up"),
                              _r(e + dn, r"e\1_down", pool="experts_down"))


def _moe_gguf(model_type, fixup=lambda spec, name, w: w):
    attr, g, u, dn = moe.STYLES[model_type]
    arch = moe.GGUF_ARCHS[model_type]
    block = dict(_GGUF_BLOCK, ffn_gate_inp=f"{attr}.gate")
    experts = {"ffn_gate_exps": f"{attr}.experts.{{e}}.{g}",
               "ffn_up_exps": f"{attr}.experts.{{e}}.{u}",
               "ffn_down_exps": f"{attr}.experts.{{e}}.{dn}"}
    return GGUFLayout(archs=(arch,), block=block, fixup=fixup, experts=experts,
                      when=lambda field: bool(field(f"{arch}.expert_count", 0)),
                      spec=lambda field, shapes: moe.spec_from_gguf(field, model_type, shapes))


MOE_FAMILY = Family(
    name="moe", model_types=moe.MODEL_TYPES, spec_from_hf=moe.MoESpec.from_hf,
    spec_from_dict=moe.MoESpec.from_dict, model=moe.MoEModel, block=moe.Block,
    rules=_moe_rules,
    # llama.cpp converts Mixtral as its llama architecture: the same Q/K permutation
    gguf=(_moe_gguf("mixtral", _llama_gguf_fixup), _moe_gguf("qwen3_moe")))

def _gemma3_gguf_spec(field, shapes):
    return gemma3.spec_from_gguf(field, ["output.weight"] if "lm_head.weight" in shapes else [])


# Gemma 3 text (Gemma3ForCausalLM folders; the multimodal checkpoints name their tensors
# otherwise): the Llama groups under the same names
GEMMA3_FAMILY = Family(
    name="gemma3", model_types=("gemma3_text",), spec_from_hf=gemma3.Gemma3Spec.from_hf,
    spec_from_dict=gemma3.Gemma3Spec.from_dict, model=gemma3.Gemma3, block=gemma3.Block,
    rules=lambda spec: LLAMA_RULES, hf_transform=gemma3.hf_tensor_transform,
    gguf=(GGUFLayout(archs=("gemma3",), spec=_gemma3_gguf_spec, block=gemma3.GGUF_BLOCK_NAMES),),
    embed_scale=lambda spec: math.sqrt(spec.hidden_size))

FAMILIES = (LLAMA_FAMILY, MOE_FAMILY, GEMMA3_FAMILY)


def family_for_model_type(model_type: str) -> Family:
    """The family of an HF config's model_type; an error listing the supported ones."""
    for f in FAMILIES:
        if model_type in f.model_types:
            return f
    known = sorted(t for f in FAMILIES for t in f.model_types)
    raise ValueError(f"model_type {model_type!r} is not supported; quipjax runs {known}")


def family_for_gguf(arch: str, field=lambda key, default=None: default) -> tuple:
    """(family, GGUFLayout) of a GGUF general.architecture; field(key, default): the file's
    header (architectures several families share, "llama" with experts or without)."""
    for f in FAMILIES:
        for g in f.gguf or ():
            if arch in g.archs and g.when(field):
                return f, g
    known = sorted(a for f in FAMILIES for g in f.gguf or () for a in g.archs)
    raise ValueError(f"GGUF architecture {arch!r} is not supported; quipjax reads {known}")


def family_of(spec) -> Family:
    return family_for_model_type(spec.model_type)


def spec_from_dict(d: dict):
    """A spec from its `to_dict()` (checkpoints of earlier releases have no model_type: llama)."""
    return family_for_model_type(d.get("model_type", "llama")).spec_from_dict(d)


def adapter_of(spec, user_rules=()) -> ModelAdapter:
    """The linear groups of `spec`'s blocks under `user_rules`, then the family's rules."""
    return family_of(spec).adapter(spec, user_rules)


