"""Per-architecture lens facts, as data: one row per supported HF model class."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from actors.errors import UnsupportedArchitecture
from lens_kernel import NormSpec


@dataclass(frozen=True)
class ArchitectureFacts:
    """What the lens needs to know beyond what TransformerLens exposes."""

    family: str
    norm_kind: Literal["layernorm", "rmsnorm"]
    norm_weight_offset: float  # 1.0 for Gemma's (1 + w) RMSNorm
    positional: Literal["rotary", "additive"]
    pre_norm: bool = True
    softcap_config_key: str | None = None  # HF config key of the final-logit soft cap
    # Half dtypes in which the family's own forward is known to overflow (Gemma's activations
    # exceed float16's 65504: Gemma-3-270M gives inf logits); the dtype policy avoids them.
    overflows_in: tuple[str, ...] = ()


ARCHITECTURES: dict[str, ArchitectureFacts] = {
    "LlamaForCausalLM": ArchitectureFacts("llama", "rmsnorm", 0.0, "rotary"),
    "MistralForCausalLM": ArchitectureFacts("mistral", "rmsnorm", 0.0, "rotary"),
    "Qwen2ForCausalLM": ArchitectureFacts("qwen2", "rmsnorm", 0.0, "rotary"),
    "Qwen3ForCausalLM": ArchitectureFacts("qwen3", "rmsnorm", 0.0, "rotary"),
    "Gemma2ForCausalLM": ArchitectureFacts(
        "gemma2",
        "rmsnorm",
        1.0,
        "rotary",
        softcap_config_key="final_logit_softcapping",
        overflows_in=("float16",),
    ),
    "Gemma3ForCausalLM": ArchitectureFacts(
        "gemma3",
        "rmsnorm",
        1.0,
        "rotary",
        softcap_config_key="final_logit_softcapping",
        overflows_in=("float16",),
    ),
    "GPT2LMHeadModel": ArchitectureFacts("gpt2", "layernorm", 0.0, "additive"),
}


def architecture_facts(architecture: str) -> ArchitectureFacts:
    """Facts for an HF class name, or a clear error listing what is supported."""
    try:
        return ARCHITECTURES[architecture]
    except KeyError:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedArchitecture(
            f"architecture {architecture!r} is not supported by the lens; supported: {supported}"
        ) from None


def norm_spec(module: Any, facts: ArchitectureFacts, name: str) -> NormSpec:
    """Read an HF norm module into a float32 NormSpec, checking it is the kind the table says."""
    is_layernorm = isinstance(module, torch.nn.LayerNorm)
    kind = "layernorm" if is_layernorm else "rmsnorm"
    if kind != facts.norm_kind or (not is_layernorm and "RMSNorm" not in type(module).__name__):
        raise UnsupportedArchitecture(
            f"{name} is a {type(module).__name__}, expected a {facts.norm_kind} for {facts.family}"
        )
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    if eps is None:
        raise UnsupportedArchitecture(f"{name} ({type(module).__name__}) has no eps attribute")
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None) if is_layernorm else None
    return NormSpec(
        kind=kind,
        weight=None if weight is None else weight.detach().float().clone(),
        bias=None if bias is None else bias.detach().float().clone(),
        eps=float(eps),
        weight_offset=facts.norm_weight_offset,
        name=f"{name}:{type(module).__name__}",
    )


def softcap_of(hf_config: Any, facts: ArchitectureFacts) -> float | None:
    """The final-logit soft cap, or None where the model has none."""
    if facts.softcap_config_key is None:
        return None
    cap = getattr(hf_config, facts.softcap_config_key, None)
    return float(cap) if cap else None


def default_dtype(device_kind: str, facts: ArchitectureFacts) -> torch.dtype:
    """The seed's dtype policy: fp32 on CPU; fp16 on CUDA and MPS, bf16 for a family that
    overflows in fp16 (Gemma)."""
    if device_kind == "cpu":
        return torch.float32
    return torch.bfloat16 if "float16" in facts.overflows_in else torch.float16
