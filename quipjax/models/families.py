"""The families quipjax runs, and how a checkpoint finds its family.

    fam = family_for_model_type(cfg["model_type"])     # HF config.json
    fam = family_for_gguf(arch)                         # GGUF general.architecture
    fam = family_of(spec)                               # any spec of a family
    spec = spec_from_dict(meta["model"])                # a quipjax checkpoint's spec

| family | HF model_type | GGUF architecture | default groups |
|---|---|---|---|
| llama | llama, mistral, qwen2, qwen3, phi3 | llama, qwen2, qwen3, phi3 | qkv, o, up/gate, down |
| moe | mixtral, qwen3_moe | (none yet: llama.cpp stores experts fused) | qkv, o, per expert up/gate, down |
"""
from __future__ import annotations


from quipjax.group import LinearGroup
from quipjax.models import llama, moe
from quipjax.models.adapter import LLAMA, ModelAdapter
from quipjax.models.family import Family, GGUFLayout

__all__ = ["FAMILIES", "LLAMA_FAMILY", "MOE_FAMILY", "PHI3", "family_for_model_type", "family_for_gguf",
           "family_of", "spec_from_dict", "adapter_of"]

# Phi-3's checkpoints fuse q/k/v and gate/up into single linears: each is a group of one
PHI3 = ModelAdapter(name="phi3", groups=(
    LinearGroup("qkv", ("self_attn.qkv_proj",)), LinearGroup("o", ("self_attn.o_proj",)),
    LinearGroup("up", ("mlp.gate_up_proj",)), LinearGroup("down", ("mlp.down_proj",))))


def _llama_adapter(spec) -> ModelAdapter:
    if spec.fused_qkv != spec.fused_gate_up:
        raise ValueError("a Llama-family spec fuses both q/k/v and gate/up (Phi-3) or neither")
    return PHI3 if spec.fused_qkv else LLAMA


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


def _gguf(arch, block, fixup=lambda spec, name, w: w):
    return GGUFLayout(archs=(arch,), block=block, fixup=fixup,
                      spec=lambda field, shapes: llama.spec_from_gguf(field, arch, shapes))


LLAMA_FAMILY = Family(
    name="llama", model_types=llama.MODEL_TYPES, spec_from_hf=llama.LlamaSpec.from_hf,
    spec_from_dict=llama.LlamaSpec.from_dict, model=llama.Llama, block=llama.Block,
    adapter=_llama_adapter,
    gguf=(_gguf("llama", _GGUF_BLOCK, _llama_gguf_fixup), _gguf("qwen2", _GGUF_BLOCK),
          _gguf("qwen3", _GGUF_BLOCK), _gguf("phi3", _GGUF_PHI3)))

def _moe_adapter(spec) -> ModelAdapter:
    """q/k/v, o, then each expert's (up, gate) and down, pooled per kind for the experts
    that receive too few tokens."""
    attr, g, u, dn = spec.style
    attn = LLAMA.groups[:2]
    experts, pools = [], []
    for e in range(spec.num_experts):
        p = f"{attr}.experts.{e}."
        experts += [LinearGroup(f"e{e}_up", (p + u, p + g)), LinearGroup(f"e{e}_down", (p + dn,))]
        pools += [(f"e{e}_up", "experts_up"), (f"e{e}_down", "experts_down")]
    return ModelAdapter(name=spec.model_type, groups=tuple(attn) + tuple(experts),
                        pools=tuple(pools))


MOE_FAMILY = Family(
    name="moe", model_types=moe.MODEL_TYPES, spec_from_hf=moe.MoESpec.from_hf,
    spec_from_dict=moe.MoESpec.from_dict, model=moe.MoEModel, block=moe.Block,
    adapter=_moe_adapter)

FAMILIES = (LLAMA_FAMILY, MOE_FAMILY)


def family_for_model_type(model_type: str) -> Family:
    """The family of an HF config's model_type; an error listing the supported ones."""
    for f in FAMILIES:
        if model_type in f.model_types:
            return f
    known = sorted(t for f in FAMILIES for t in f.model_types)
    raise ValueError(f"model_type {model_type!r} is not supported; quipjax runs {known}")


def family_for_gguf(arch: str) -> tuple:
    """(family, GGUFLayout) of a GGUF general.architecture."""
    for f in FAMILIES:
        for g in f.gguf or ():
            if arch in g.archs:
                return f, g
    known = sorted(a for f in FAMILIES for g in f.gguf or () for a in g.archs)
    raise ValueError(f"GGUF architecture {arch!r} is not supported; quipjax reads {known}")


def family_of(spec) -> Family:
    return family_for_model_type(spec.model_type)


def spec_from_dict(d: dict):
    """A spec from its `to_dict()` (checkpoints of earlier releases have no model_type: llama)."""
    return family_for_model_type(d.get("model_type", "llama")).spec_from_dict(d)


def adapter_of(spec) -> ModelAdapter:
    return family_of(spec).adapter(spec)


