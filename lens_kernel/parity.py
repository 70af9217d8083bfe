"""Parity between the lens at the last layer and the model's own logits, scaled to the dtype.

In half precision the model applies its final norm and unembedding in that dtype and stores its
logits in it, while the lens does both in float32: the two differ by the dtype's rounding, which
grows with the logits' magnitude (bfloat16 keeps 8 significant bits: a logit of 30 is stored to
within 0.06). A fixed max-abs bound therefore fails large healthy models, or is too loose for
small ones. The gate instead measures the difference in units of the dtype's epsilon at the
logits' scale, and compares the distributions a researcher reads:

- relative error = max|lens - model| / (eps(dtype) * max(1, max|model logits|)) <= REL_BOUND;
- KL(model || lens) <= KL_BOUND_BITS;
- the same top-1 token, unless the model's own top two lie within the rounding noise.

Rows whose model logits are not finite are the model overflowing, not a lens error: they are
flagged (``model_finite``) and left to the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lens_kernel.metrics import kl_bits

# torch.finfo(dtype).eps: the spacing of numbers near 1.
EPS = {"float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}
# Bounds per compute dtype, set well above the worst measured on real and random weights and on
# CPU and CUDA (README, "Parity gate"), and well below what a lens that mis-applies the final
# norm gives. Float32 differs from the model only by the order of float32 reductions.
REL_BOUND = {"float32": 64.0, "float16": 16.0, "bfloat16": 8.0}
KL_BOUND_BITS = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 2e-2}


@dataclass
class ParityStats:
    """Per-row comparison of lens and model logits at the next-token position, shape [B]."""

    max_abs: torch.Tensor  # float32, max_v |lens_v - model_v|
    kl_bits: torch.Tensor  # float32, KL(model || lens) in bits, >= 0
    top1_agree: torch.Tensor  # bool, argmax equal
    model_margin: torch.Tensor  # float32, the model's top-1 minus top-2 logit
    logit_scale: torch.Tensor  # float32, max(1, max_v |model_v|)
    model_finite: torch.Tensor  # bool, every model logit finite

    def relative_error(self, dtype: str) -> torch.Tensor:
        """max_abs in units of ``dtype``'s epsilon at the logits' scale, [B]."""
        return self.max_abs / (EPS[dtype] * self.logit_scale)


def parity_stats(model_logits: torch.Tensor, lens_logits: torch.Tensor) -> ParityStats:
    """Compare [B, V] model logits with [B, V] lens logits (both cast to float32)."""
    model = model_logits.float()
    lens = lens_logits.float()
    finite = torch.isfinite(model).all(dim=-1)
    top2 = torch.topk(model, k=2, dim=-1).values
    kl = kl_bits(torch.log_softmax(model, dim=-1), torch.log_softmax(lens, dim=-1))
    return ParityStats(
        max_abs=(lens - model).abs().amax(dim=-1),
        kl_bits=kl,
        top1_agree=model.argmax(dim=-1) == lens.argmax(dim=-1),
        model_margin=top2[:, 0] - top2[:, 1],
        logit_scale=model.abs().amax(dim=-1).clamp_min(1.0),
        model_finite=finite,
    )


def parity_failures(stats: ParityStats, dtype: str) -> torch.Tensor:
    """Rows [B] (bool) with finite model logits that fail the gate for ``dtype``."""
    noise = REL_BOUND[dtype] * EPS[dtype] * stats.logit_scale  # largest allowed |diff|
    near_tie = stats.model_margin <= noise
    ok = (
        (stats.max_abs <= noise)
        & (stats.kl_bits <= KL_BOUND_BITS[dtype])
        & (stats.top1_agree | near_tie)
    )
    return stats.model_finite & ~ok
