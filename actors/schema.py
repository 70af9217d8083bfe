"""The one contract between lens actors and the driver: Arrow schemas of what an actor returns.

Bump SCHEMA_VERSION on any change of field name, type or meaning; it is stored in every
schema's metadata and written into every artefact.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 4
_META = {b"lens_sweep.schema_version": str(SCHEMA_VERSION).encode()}

# One row per (prompt, lens, layer, position) decoded; a prompt's rows are together, its lenses
# in the sweep's order (the primary lens first).
RECORDS_SCHEMA = pa.schema(
    [
        pa.field("model", pa.string(), nullable=False),  # artefact name of the model
        # final, next_ln1, raw (norm modes) or tuned, prism (trained translators)
        pa.field("lens", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),  # manifest prompt id
        pa.field("layer", pa.int16(), nullable=False),  # 0 = input to block 0, i = after block i-1
        pa.field("pos", pa.int32(), nullable=False),  # token position, 0-based, BOS included
        pa.field("token_id", pa.int32(), nullable=False),  # input token id at pos
        pa.field("token", pa.string(), nullable=False),  # input token text at pos
        pa.field("is_next_token", pa.bool_(), nullable=False),  # pos is the last prompt token
        pa.field("entropy_bits", pa.float32(), nullable=False),  # full-softmax entropy, bits
        pa.field("top_ids", pa.list_(pa.int32()), nullable=False),  # top-k ids, most probable first
        pa.field("top_tokens", pa.list_(pa.string()), nullable=False),  # their decoded texts
        pa.field("top_probs", pa.list_(pa.float32()), nullable=False),  # their probabilities
        pa.field("rest_mass", pa.float32(), nullable=False),  # 1 - sum(top_probs)
        # Next-token rows only (null elsewhere):
        pa.field("answer_prob", pa.float32()),  # p(gold answer's first token); null w/o answer
        pa.field("answer_rank", pa.int32()),  # 1-based rank of that token; null w/o answer
        pa.field("kl_to_final_bits", pa.float32()),  # KL(layer || model output), bits
        pa.field("copy_collapse", pa.bool_()),  # top-1 in prompt, p1 > thr, p1 - p2 > margin
        pa.field("entropy_collapse", pa.bool_()),  # entropy <= 1 bit
        pa.field("is_answer", pa.bool_()),  # top-1 == gold answer's first token
        # The lens-artefact audit (lens_kernel/audit.py), next-token rows only; null elsewhere and
        # when the sweep runs with audit = false. Raw = the same residual decoded with no norm.
        # Agreement with the model's output:
        pa.field("p_top5", pa.float32()),  # probability mass of the top 5 tokens
        pa.field("cos_to_final", pa.float32()),  # cosine(layer logits, model's final logits)
        # Raw vs norm:
        pa.field("answer_prob_raw", pa.float32()),  # p(answer) under the raw lens
        pa.field("answer_rank_raw", pa.int32()),  # its rank under the raw lens
        pa.field("top1_id_raw", pa.int32()),  # raw lens top-1 id
        pa.field("entropy_raw_bits", pa.float32()),  # raw lens entropy, bits
        pa.field("entropy_gap_bits", pa.float32()),  # entropy(norm) - entropy(raw), bits
        pa.field("kl_norm_raw_bits", pa.float32()),  # KL(norm || raw), bits
        pa.field("js_norm_raw_bits", pa.float32()),  # Jensen-Shannon(norm, raw), bits, in [0, 1]
        pa.field("l1_norm_raw", pa.float32()),  # sum |p_norm - p_raw|, in [0, 2]
        pa.field("jaccard_top50_raw_norm", pa.float32()),  # |top50 n & top50 r| / |union|
        pa.field("norm_only_semantics", pa.bool_()),  # answer top-1 under norm, not under raw
        # Copy detectors on token ids (no string matching):
        pa.field("copy_strict@0.7", pa.bool_()),  # top-1 a prompt token*, p1 > 0.7, p1-p2 > 0.1
        pa.field("copy_strict@0.8", pa.bool_()),
        pa.field("copy_strict@0.9", pa.bool_()),
        pa.field("copy_strict@0.95", pa.bool_()),
        pa.field("copy_soft_k1", pa.bool_()),  # last k top-1 ids a run of the prompt, p1 > 0.33
        pa.field("copy_soft_k2", pa.bool_()),
        pa.field("copy_soft_k3", pa.bool_()),
        # Semantic gates:
        pa.field("answer_minus_uniform", pa.float32()),  # p(answer) - 1/V
        pa.field("answer_logit_gap", pa.float32()),  # answer logit - best other logit
        pa.field("semantic_margin_ok", pa.bool_()),  # rank 1 and p(answer) - 1/V >= 0.002
        pa.field("semantic_strong", pa.bool_()),  # margin ok and gap >= 0.5, here and next layer
        # Control prompts:
        pa.field("foil_prob", pa.float32()),  # p(foil answer) on a control prompt
        pa.field("control_margin", pa.float32()),  # p(answer) - p(foil)
        # Surface vs meaning:
        pa.field("echo_mass", pa.float32()),  # probability on the prompt's own tokens*
        pa.field("top50_prompt_share", pa.float32()),  # prompt tokens' share of the top-50 mass
        pa.field("cos_resid_answer", pa.float32()),  # cos(normed residual, answer's W_U column)
        pa.field("cos_resid_prompt_max", pa.float32()),  # the best prompt token's* cosine
        # Numeric health:
        pa.field("nonfinite", pa.bool_()),  # NaN/inf in the residual or the lens logits
        pa.field("resid_norm_ratio", pa.float32()),  # |resid(layer)| / |resid(layer - 1)|
        # * prompt tokens = distinct prompt ids, BOS and whitespace/punctuation-only ones excluded
    ],
    metadata=_META,
)

# One row per prompt and lens: its tokenisation, collapse layers and the model's own final
# prediction (the same for every lens); the audit's fields on the primary lens's row only.
PROMPT_SUMMARY_SCHEMA = pa.schema(
    [
        pa.field("model", pa.string(), nullable=False),
        pa.field("lens", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("role", pa.string(), nullable=False),  # primary, test, control or ablation
        pa.field("reference", pa.string()),  # prompt a control or ablation is read against
        pa.field("suite", pa.string()),  # fact suite the prompt belongs to
        pa.field("prompt_set", pa.string()),  # [[prompt_sets]] name; null for [[prompts]]
        pa.field("template", pa.string()),  # the prompt's template label, if given
        pa.field("group", pa.string()),  # the prompt's group label, if given
        pa.field("n_tokens", pa.int32(), nullable=False),  # prompt length incl. BOS
        pa.field("next_token_pos", pa.int32(), nullable=False),  # = n_tokens - 1
        pa.field("n_layers", pa.int16(), nullable=False),  # L; lens layers are 0..L
        pa.field("answer", pa.string()),  # gold answer text as given; null if none
        pa.field("answer_token_id", pa.int32()),  # its first token id
        pa.field("answer_token", pa.string()),  # its first token text
        pa.field("L_copy", pa.int16()),  # first layer with copy_collapse; null if never
        pa.field("L_copy_H", pa.int16()),  # first layer with entropy_collapse; null if never
        pa.field("L_semantic", pa.int16()),  # first layer with is_answer; null if never
        pa.field("delta_layers", pa.int16()),  # L_semantic - L_copy; null unless both exist
        pa.field("final_top_ids", pa.list_(pa.int32()), nullable=False),  # model's own top-k
        pa.field("final_top_tokens", pa.list_(pa.string()), nullable=False),
        pa.field("final_top_probs", pa.list_(pa.float32()), nullable=False),
        pa.field("final_answer_prob", pa.float32()),  # model's own p(answer); null w/o answer
        pa.field("final_answer_rank", pa.int32()),  # model's own rank of the answer
        pa.field("parity_max_abs", pa.float32(), nullable=False),  # max|lens(L) - model logits|
        # The audit (null when off); layers are first layers where a per-layer flag holds, null
        # if never.
        pa.field("foil_token", pa.string()),  # a control prompt's foil first token
        pa.field("L_copy_strict@0.7", pa.int16()),
        pa.field("L_copy_strict@0.8", pa.int16()),
        pa.field("L_copy_strict@0.9", pa.int16()),
        pa.field("L_copy_strict@0.95", pa.int16()),
        pa.field("L_copy_soft_k1", pa.int16()),
        pa.field("L_copy_soft_k2", pa.int16()),
        pa.field("L_copy_soft_k3", pa.int16()),
        pa.field("delta_layers_strict", pa.int16()),  # L_semantic - earliest L_copy_strict@t
        pa.field("delta_layers_soft", pa.int16()),  # L_semantic - earliest L_copy_soft_k
        pa.field("L_cos@0.2", pa.int16()),  # cos_to_final >= 0.2
        pa.field("L_cos@0.4", pa.int16()),
        pa.field("L_cos@0.6", pa.int16()),
        pa.field("L_kl@1.0", pa.int16()),  # kl_to_final_bits <= 1.0
        pa.field("L_kl@0.5", pa.int16()),
        pa.field("L_rank@10", pa.int16()),  # answer_rank <= 10
        pa.field("L_rank@5", pa.int16()),
        pa.field("L_rank@1", pa.int16()),
        pa.field("L_semantic_margin", pa.int16()),  # semantic_margin_ok
        pa.field("L_semantic_strong", pa.int16()),  # semantic_strong
        pa.field("L_semantic_raw", pa.int16()),  # answer_rank_raw == 1
        pa.field("L_semantic_confirmed", pa.int16()),  # L_semantic, if raw/tuned rank 1 within +-2
        pa.field("confirmed_source", pa.string()),  # "raw", "tuned", "both" or null
        pa.field("L_semantic_margin@x0.9", pa.int16()),  # the gates with logits scaled by 0.9
        pa.field("L_semantic_margin@x1.1", pa.int16()),
        pa.field("L_semantic_strong@x0.9", pa.int16()),
        pa.field("L_semantic_strong@x1.1", pa.int16()),
        pa.field("gates_stable", pa.bool_()),  # no gate layer moved under either scale
        pa.field("L_control_wins", pa.int16()),  # control prompt: p(answer) > p(foil)
        pa.field("L_answer_over_echo", pa.int16()),  # p(answer) > echo_mass
        pa.field("L_geom_crossover", pa.int16()),  # cos_resid_answer > cos_resid_prompt_max
        pa.field("n_norm_only_layers", pa.int16()),  # layers with norm_only_semantics
        pa.field("L_norm_only_first", pa.int16()),
        pa.field("kl_norm_raw_max_bits", pa.float32()),
        pa.field("frac_layers_kl_norm_raw_ge_1", pa.float32()),
        pa.field("frac_layers_kl_norm_raw_ge_0.5", pa.float32()),
        pa.field("js_norm_raw_p50_bits", pa.float32()),
        pa.field("l1_norm_raw_p50", pa.float32()),
        pa.field("jaccard_top50_p50", pa.float32()),
        pa.field("lens_artefact_score", pa.float32()),  # in [0, 1], formula in README
        pa.field("lens_artefact_tier", pa.string()),  # low, medium or high
        pa.field("n_nonfinite_layers", pa.int16()),
        pa.field("max_resid_norm_ratio", pa.float32()),
        pa.field("last_kl_lens_to_head_bits", pa.float32()),  # KL(lens at L || model head)
        pa.field("last_temperature", pa.float32()),  # s minimising KL(softmax(z/s) || head)
        pa.field("last_kl_after_temperature_bits", pa.float32()),
    ],
    metadata=_META,
)


# Lens-artefact risk tiers from a score in [0, 1] (lens_kernel.audit.artefact_score); the same
# cut-offs for a prompt and for a model (the mean of its prompts' scores).
ARTEFACT_TIER_CUTS = ((0.2, "low"), (0.5, "medium"))


def artefact_tier(score: float | None) -> str | None:
    """low below 0.2, medium up to 0.5, high above; None for no score."""
    if score is None or score != score:  # None or nan
        return None
    for cut, tier in ARTEFACT_TIER_CUTS:
        if score < cut or (tier == "medium" and score <= cut):
            return tier
    return "high"


class SchemaMismatch(ValueError):
    """A record batch does not match the schema this build of the driver expects."""


def check_batch(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """Return ``batch`` if it matches ``schema`` (fields and version), else raise SchemaMismatch."""
    found = (batch.schema.metadata or {}).get(b"lens_sweep.schema_version", b"?").decode()
    if found != str(SCHEMA_VERSION):
        raise SchemaMismatch(
            f"record batch has schema version {found}, this driver reads {SCHEMA_VERSION}: "
            "run the driver and the workers from the same checkout"
        )
    if not batch.schema.equals(schema, check_metadata=False):
        raise SchemaMismatch(
            f"record batch fields differ from the schema:\n{batch.schema}\nexpected:\n{schema}"
        )
    return batch
