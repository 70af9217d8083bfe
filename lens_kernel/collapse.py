"""Per-prompt collapse layers: the first layer at which each next-token flag holds."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CollapseRule:
    """Thresholds of the copy and entropy collapse flags (the seed's defaults)."""

    copy_threshold: float = 0.90
    copy_margin: float = 0.05
    entropy_collapse_bits: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.copy_threshold <= 1.0:
            raise ValueError(f"copy_threshold must be in [0, 1], got {self.copy_threshold}")
        if not 0.0 <= self.copy_margin <= 1.0:
            raise ValueError(f"copy_margin must be in [0, 1], got {self.copy_margin}")
        if self.entropy_collapse_bits < 0:
            raise ValueError(
                f"entropy_collapse_bits must be >= 0, got {self.entropy_collapse_bits}"
            )


@dataclass
class PromptCollapse:
    """Per prompt [B] int64 layer indices; -1 where the flag never holds."""

    L_copy: torch.Tensor  # first layer with copy_collapse
    L_copy_H: torch.Tensor  # first layer with entropy_collapse
    L_semantic: torch.Tensor  # first layer with is_answer
    delta_layers: torch.Tensor  # L_semantic - L_copy; -1 unless both exist (check has_delta)
    has_delta: torch.Tensor  # [B] bool


def first_true_layer(flags: torch.Tensor) -> torch.Tensor:
    """Index of the first True along dim 0 of [layers, B] flags; -1 where none is True."""
    n_layers = flags.shape[0]
    layer_idx = torch.arange(n_layers, device=flags.device).unsqueeze(1).expand_as(flags)
    sentinel = torch.full_like(layer_idx, n_layers)
    first = torch.where(flags, layer_idx, sentinel).min(dim=0).values
    return torch.where(first == n_layers, torch.full_like(first, -1), first)


def collapse_layers(
    copy_collapse: torch.Tensor, entropy_collapse: torch.Tensor, is_answer: torch.Tensor
) -> PromptCollapse:
    """L_copy, L_copy_H, L_semantic and delta_layers from [layers, B] flags."""
    l_copy = first_true_layer(copy_collapse)
    l_copy_h = first_true_layer(entropy_collapse)
    l_sem = first_true_layer(is_answer)
    has_delta = (l_copy >= 0) & (l_sem >= 0)
    delta = torch.where(has_delta, l_sem - l_copy, torch.full_like(l_sem, -1))
    return PromptCollapse(l_copy, l_copy_h, l_sem, delta, has_delta)
