"""Lens normalisation: which norm decodes which layer, and applying it exactly in float32."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

NormKind = Literal["layernorm", "rmsnorm"]
LensMode = Literal["final", "next_ln1", "raw"]
LENS_MODES: tuple[str, ...] = ("final", "next_ln1", "raw")


@dataclass(frozen=True, eq=False)
class NormSpec:
    """One normalisation layer as data, in float32.

    layernorm: y = (x - mean(x)) / sqrt(var(x) + eps) * (offset + w) + b
    rmsnorm:   y = x / sqrt(mean(x^2) + eps) * (offset + w)

    ``weight_offset`` is 1.0 for Gemma's ``(1 + w)`` RMSNorm and 0.0 elsewhere; eps always
    sits inside the square root. ``name`` says where the norm came from (for diagnostics).
    """

    kind: NormKind
    weight: torch.Tensor | None  # [d_model] float32, None for an affine-free norm
    bias: torch.Tensor | None  # [d_model] float32, layernorm only
    eps: float
    weight_offset: float = 0.0
    name: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm kind must be 'layernorm' or 'rmsnorm', got {self.kind!r}")
        if self.kind == "rmsnorm" and self.bias is not None:
            raise ValueError("an RMSNorm has no bias")


def apply_norm(x: torch.Tensor, spec: NormSpec | None, keep_bias: bool = True) -> torch.Tensor:
    """Normalise the last dimension of ``x`` in float32; ``spec=None`` is the identity (raw lens).

    ``keep_bias=False`` drops a LayerNorm's beta, the variant one seed note describes.
    """
    x = x.float()
    if spec is None:
        return x
    weight = None if spec.weight is None else spec.weight.float() + spec.weight_offset
    if spec.kind == "layernorm":
        bias = spec.bias.float() if (spec.bias is not None and keep_bias) else None
        # Same kernel as torch.nn.LayerNorm, so a float32 model's own norm is matched bit for bit.
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, spec.eps)
    y = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + spec.eps)
    return y if weight is None else y * weight


def build_norm_plan(
    mode: str,
    n_layers: int,
    final_norm: NormSpec | None,
    ln1: list[NormSpec | None],
    ln2: list[NormSpec | None] | None = None,
    pre_norm: bool = True,
) -> list[NormSpec | None]:
    """The norm for each lens layer 0..n_layers (layer 0 = input to block 0).

    final:    the final norm on every layer (the standard logit lens).
    next_ln1: layer i < L uses block i's input norm (ln1) on pre-norm models, block i's ln2 on
              post-norm models; layer L uses the final norm (the seed's rule).
    raw:      no normalisation anywhere.

    The parity check and KL(layer || final) do not depend on the mode: lens_pass decodes its
    reference from the model's final norm (its ``final_norm`` argument).
    """
    if mode not in LENS_MODES:
        raise ValueError(f"lens mode must be one of {', '.join(LENS_MODES)}; got {mode!r}")
    n_rows = n_layers + 1
    if mode == "raw":
        return [None] * n_rows
    if mode == "final":
        return [final_norm] * n_rows
    per_block = ln1 if pre_norm else ln2
    if per_block is None or len(per_block) != n_layers:
        which = "ln1" if pre_norm else "ln2"
        found = "none" if per_block is None else len(per_block)
        raise ValueError(f"next_ln1 needs one {which} per block: expected {n_layers}, got {found}")
    return [*per_block, final_norm]
