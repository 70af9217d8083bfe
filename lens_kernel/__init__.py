"""Pure tensor maths of the logit lens: norms, unembedding, metrics, collapse rules.

Imports torch only: no Ray, no Arrow, no files, no tokenizer strings.
"""

from lens_kernel.audit import AuditRows, AuditRule, PromptAudit, artefact_score
from lens_kernel.collapse import CollapseRule, PromptCollapse, collapse_layers, first_true_layer
from lens_kernel.lens import LensInputs, LensOutputs, lens_pass, norm_rows
from lens_kernel.metrics import (
    NextTokenStats,
    RowStats,
    entropy_bits,
    kl_bits,
    next_token_rows,
    next_token_stats,
    row_stats,
    softmax_rows,
    temperature_topk,
    topk_by_blocks,
)
from lens_kernel.norms import LENS_MODES, NormSpec, apply_norm, build_norm_plan
from lens_kernel.parity import (
    EPS,
    KL_BOUND_BITS,
    REL_BOUND,
    ParityStats,
    parity_failures,
    parity_stats,
)
from lens_kernel.unembed import UnembedSpec

__all__ = [
    "EPS",
    "KL_BOUND_BITS",
    "LENS_MODES",
    "REL_BOUND",
    "AuditRows",
    "AuditRule",
    "CollapseRule",
    "LensInputs",
    "LensOutputs",
    "NextTokenStats",
    "NormSpec",
    "ParityStats",
    "PromptAudit",
    "PromptCollapse",
    "RowStats",
    "UnembedSpec",
    "apply_norm",
    "artefact_score",
    "build_norm_plan",
    "collapse_layers",
    "entropy_bits",
    "first_true_layer",
    "kl_bits",
    "lens_pass",
    "next_token_rows",
    "next_token_stats",
    "norm_rows",
    "parity_failures",
    "parity_stats",
    "row_stats",
    "softmax_rows",
    "temperature_topk",
    "topk_by_blocks",
]
