"""Arrow record batches from lens outputs, in the shared schema; token texts decoded once per id."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from actors.prompts import TokenisedBatch
from actors.schema import PROMPT_SUMMARY_SCHEMA, RECORDS_SCHEMA, artefact_tier
from lens_kernel import AuditRule, LensOutputs, PromptAudit, RowStats


class TokenTexts:
    """Decodes token ids to text, each distinct id once per actor, vectorised over arrays."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, ids: np.ndarray) -> pa.Array:
        uniq, inverse = np.unique(ids.reshape(-1), return_inverse=True)
        for i in uniq.tolist():
            if i not in self._cache:
                self._cache[i] = self._tokenizer.decode([i])
        texts = pa.array([self._cache[i] for i in uniq.tolist()], pa.string())
        return texts.take(pa.array(inverse.astype(np.int64)))


def _list_column(values: np.ndarray, arrow_type: pa.DataType) -> pa.ListArray:
    """[n, k] array -> list<arrow_type> column, k items a row."""
    n, k = values.shape
    offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(values.reshape(-1)).cast(arrow_type))


def _list_of_text(ids: np.ndarray, texts: TokenTexts) -> pa.ListArray:
    n, k = ids.shape
    offsets = pa.array(np.arange(0, n * k + 1, k, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, texts(ids))


def _masked(values: np.ndarray, valid: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
    return pa.array(values, mask=~valid).cast(arrow_type)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def records_batch(
    model: str, batch: TokenisedBatch, out: LensOutputs, texts: TokenTexts, lens: str = "final"
) -> pa.RecordBatch:
    """All decoded rows of one batch through one lens, ordered by prompt, layer, position."""
    n_layers, n_prompts = out.next.rows.entropy_bits.shape
    # Next-token rows come from the next-token stats, [layers, B] -> prompt-major.
    nb = np.repeat(np.arange(n_prompts), n_layers)
    nl = np.tile(np.arange(n_layers), n_prompts)
    npos = _np(batch.next_pos)[nb]

    def next_flat(t: torch.Tensor) -> np.ndarray:
        a = _np(t.transpose(0, 1))
        return a.reshape(n_prompts * n_layers, *a.shape[2:])

    parts_b, parts_l, parts_p, rows = [nb], [nl], [npos], [out.next.rows]
    if out.all_rows is not None:
        assert out.row_batch is not None and out.row_layer is not None and out.row_pos is not None
        parts_b.append(_np(out.row_batch))
        parts_l.append(_np(out.row_layer))
        parts_p.append(_np(out.row_pos))
        rows.append(out.all_rows)
    b = np.concatenate(parts_b)
    lay = np.concatenate(parts_l)
    pos = np.concatenate(parts_p)
    n_next = nb.size

    def cat(field: str) -> np.ndarray:
        first = next_flat(getattr(rows[0], field))
        rest = [_np(getattr(r, field)) for r in rows[1:]]
        return np.concatenate([first, *rest])

    order = np.lexsort((pos, lay, b))
    is_next = np.zeros(b.size, dtype=bool)
    is_next[:n_next] = True

    def next_only(t: torch.Tensor) -> np.ndarray:
        flat = next_flat(t)
        full = np.zeros(b.size, dtype=flat.dtype)
        full[:n_next] = flat
        return full[order]

    b, lay, pos, is_next = b[order], lay[order], pos[order], is_next[order]
    token_ids = _np(batch.input_ids)[b, pos]
    top_ids = cat("top_ids")[order]
    has_answer = (_np(batch.answer_ids) >= 0)[b]
    prompt_ids = pa.array([p.id for p in batch.prompts], pa.string())
    columns = {
        "model": pa.array([model], pa.string()).take(pa.array(np.zeros(b.size, dtype=np.int64))),
        "lens": pa.array([lens], pa.string()).take(pa.array(np.zeros(b.size, dtype=np.int64))),
        "prompt_id": prompt_ids.take(pa.array(b)),
        "layer": pa.array(lay.astype(np.int16)),
        "pos": pa.array(pos.astype(np.int32)),
        "token_id": pa.array(token_ids.astype(np.int32)),
        "token": texts(token_ids),
        "is_next_token": pa.array(is_next),
        "entropy_bits": pa.array(cat("entropy_bits")[order].astype(np.float32)),
        "top_ids": _list_column(top_ids, pa.int32()),
        "top_tokens": _list_of_text(top_ids, texts),
        "top_probs": _list_column(cat("top_probs")[order].astype(np.float32), pa.float32()),
        "rest_mass": pa.array(cat("rest_mass")[order].astype(np.float32)),
        "answer_prob": _masked(next_only(out.next.answer_prob), is_next & has_answer, pa.float32()),
        "answer_rank": _masked(next_only(out.next.answer_rank), is_next & has_answer, pa.int32()),
        "kl_to_final_bits": _masked(next_only(out.next.kl_to_final_bits), is_next, pa.float32()),
        "copy_collapse": _masked(next_only(out.next.copy_collapse), is_next, pa.bool_()),
        "entropy_collapse": _masked(next_only(out.next.entropy_collapse), is_next, pa.bool_()),
        "is_answer": _masked(next_only(out.next.is_answer), is_next, pa.bool_()),
    }
    audit = _audit_row_tensors(out, _np(batch.answer_ids))
    for f in RECORDS_SCHEMA:
        if f.name in columns:
            continue
        if audit is None:
            columns[f.name] = pa.nulls(b.size, f.type)
            continue
        values = next_only(audit[f.name])
        valid = is_next.copy()
        if values.dtype.kind == "f":
            valid &= ~np.isnan(values)
        elif f.name == "answer_rank_raw":
            valid &= values >= 0
        columns[f.name] = _masked(values, valid, f.type)
    return pa.RecordBatch.from_arrays(list(columns.values()), schema=RECORDS_SCHEMA)


def _audit_row_tensors(out: LensOutputs, answer_ids: np.ndarray) -> dict[str, torch.Tensor] | None:
    """The per-(layer, prompt) audit tensors [layers, B] by records column name."""
    a = out.audit
    if a is None:
        return None
    rule = AuditRule()
    cols = {
        "p_top5": a.p_top5,
        "cos_to_final": a.cos_to_final,
        "answer_prob_raw": a.answer_prob_raw,
        "answer_rank_raw": a.answer_rank_raw,
        "top1_id_raw": a.top1_id_raw,
        "entropy_raw_bits": a.entropy_raw_bits,
        "entropy_gap_bits": a.entropy_gap_bits,
        "kl_norm_raw_bits": a.kl_norm_raw_bits,
        "js_norm_raw_bits": a.js_norm_raw_bits,
        "l1_norm_raw": a.l1_norm_raw,
        "jaccard_top50_raw_norm": a.jaccard_top_raw_norm,
        "norm_only_semantics": a.norm_only_semantics,
        "answer_minus_uniform": a.answer_minus_uniform,
        "answer_logit_gap": a.answer_logit_gap,
        "semantic_margin_ok": a.semantic_margin_ok,
        "semantic_strong": a.semantic_strong,
        "foil_prob": a.foil_prob,
        "control_margin": out.next.answer_prob - a.foil_prob,  # nan without either
        "echo_mass": a.echo_mass,
        "top50_prompt_share": a.top_prompt_share,
        "cos_resid_answer": a.cos_resid_answer,
        "cos_resid_prompt_max": a.cos_resid_prompt_max,
        "nonfinite": a.nonfinite,
        "resid_norm_ratio": a.resid_norm_ratio,
    }
    assert a.copy_strict is not None and a.copy_soft is not None
    for t, flags in zip(rule.strict_thresholds, a.copy_strict, strict=True):
        cols[f"copy_strict@{t:g}"] = flags
    for k, flags in zip(rule.soft_windows, a.copy_soft, strict=True):
        cols[f"copy_soft_k{k}"] = flags
    return {k: v for k, v in cols.items() if v is not None}


def summary_batch(
    model: str,
    batch: TokenisedBatch,
    out: LensOutputs,
    model_top: RowStats,
    model_answer_prob: torch.Tensor,
    model_answer_rank: torch.Tensor,
    parity: torch.Tensor,
    texts: TokenTexts,
    lens: str = "final",
) -> pa.RecordBatch:
    """One row per prompt through one lens: collapse layers and the model's own prediction."""
    n = len(batch.prompts)
    n_layers = out.next.rows.entropy_bits.shape[0] - 1
    answer_ids = _np(batch.answer_ids)
    has_answer = answer_ids >= 0
    c = out.collapse

    def layer_col(t: torch.Tensor, valid: np.ndarray | None = None) -> pa.Array:
        a = _np(t)
        return _masked(a, (a >= 0) if valid is None else valid, pa.int16())

    top_ids = _np(model_top.top_ids)
    columns = {
        "model": pa.array([model] * n, pa.string()),
        "lens": pa.array([lens] * n, pa.string()),
        "prompt_id": pa.array([p.id for p in batch.prompts], pa.string()),
        "role": pa.array([p.role for p in batch.prompts], pa.string()),
        "n_tokens": pa.array(_np(batch.lengths).astype(np.int32)),
        "next_token_pos": pa.array(_np(batch.next_pos).astype(np.int32)),
        "n_layers": pa.array(np.full(n, n_layers, dtype=np.int16)),
        "answer": pa.array([p.answer for p in batch.prompts], pa.string()),
        "answer_token_id": _masked(answer_ids, has_answer, pa.int32()),
        "answer_token": pa.array(
            [
                t if ok else None
                for t, ok in zip(
                    texts(np.maximum(answer_ids, 0)).to_pylist(), has_answer, strict=True
                )
            ],
            pa.string(),
        ),
        "L_copy": layer_col(c.L_copy),
        "L_copy_H": layer_col(c.L_copy_H),
        "L_semantic": layer_col(c.L_semantic),
        "delta_layers": layer_col(c.delta_layers, _np(c.has_delta)),
        "final_top_ids": _list_column(top_ids, pa.int32()),
        "final_top_tokens": _list_of_text(top_ids, texts),
        "final_top_probs": _list_column(_np(model_top.top_probs).astype(np.float32), pa.float32()),
        "final_answer_prob": _masked(_np(model_answer_prob), has_answer, pa.float32()),
        "final_answer_rank": _masked(_np(model_answer_rank), has_answer, pa.int32()),
        "parity_max_abs": pa.array(_np(parity).astype(np.float32)),
    }
    columns["reference"] = pa.array([p.reference for p in batch.prompts], pa.string())
    for key in ("suite", "prompt_set", "template", "group"):
        columns[key] = pa.array([getattr(p, key) for p in batch.prompts], pa.string())
    foil_ids = _np(batch.foil_ids)
    foil_text = texts(np.maximum(foil_ids, 0)).to_pylist()
    columns["foil_token"] = pa.array(
        [t if f >= 0 else None for t, f in zip(foil_text, foil_ids, strict=True)], pa.string()
    )
    columns.update(_prompt_audit_columns(out, n))
    ordered = [columns[f.name] for f in PROMPT_SUMMARY_SCHEMA]
    return pa.RecordBatch.from_arrays(ordered, schema=PROMPT_SUMMARY_SCHEMA)


def _confirmed_source(audit: PromptAudit) -> list[str | None]:
    """Which lens confirmed each prompt's L_semantic: raw, tuned, both, or None (not confirmed)."""
    raw = _np(audit.confirmed_raw)
    tuned = np.zeros_like(raw) if audit.confirmed_tuned is None else _np(audit.confirmed_tuned)
    names = {(True, True): "both", (True, False): "raw", (False, True): "tuned"}
    return [names.get((bool(r), bool(t))) for r, t in zip(raw, tuned, strict=True)]


def interleave_by_prompt(batches: list[pa.RecordBatch], prompt_ids: list[str]) -> pa.RecordBatch:
    """One lens's batch each (rows grouped by prompt in ``prompt_ids`` order) -> one batch whose
    rows are grouped by prompt, a prompt's lenses in the order given: a prompt's rows stay
    together, as the driver's assembly by prompt expects."""
    table = pa.Table.from_batches(batches)
    if len(batches) == 1 or table.num_rows == 0:
        return (
            batches[0] if len(batches) == 1 else pa.RecordBatch.from_pylist([], batches[0].schema)
        )
    rank = pc.index_in(table.column("prompt_id"), value_set=pa.array(prompt_ids, pa.string()))
    order = np.argsort(rank.to_numpy(zero_copy_only=False), kind="stable")
    return table.take(pa.array(order)).combine_chunks().to_batches()[0]


def _prompt_audit_columns(out: LensOutputs, n: int) -> dict[str, pa.Array]:
    """The per-prompt audit fields of PROMPT_SUMMARY_SCHEMA (all null without an audit)."""
    first = PROMPT_SUMMARY_SCHEMA.get_field_index("foil_token") + 1
    audit_names = list(PROMPT_SUMMARY_SCHEMA)[first:]
    pa_ = out.prompt_audit
    if pa_ is None:
        return {f.name: pa.nulls(n, f.type) for f in audit_names}
    rule = AuditRule()
    sem = _np(out.collapse.L_semantic)

    def layers(t: torch.Tensor | np.ndarray) -> pa.Array:
        a = t if isinstance(t, np.ndarray) else _np(t)
        return _masked(a, a >= 0, pa.int16())

    def delta(first_copy: torch.Tensor) -> pa.Array:
        c = _np(first_copy)
        return _masked(sem - c, (sem >= 0) & (c >= 0), pa.int16())

    def floats(t: torch.Tensor) -> pa.Array:
        a = _np(t).astype(np.float32)
        return _masked(a, np.isfinite(a), pa.float32())

    score = _np(pa_.lens_artefact_score)
    confirmed = _np(pa_.L_semantic_confirmed)
    cols: dict[str, pa.Array] = {}
    for t, first in zip(rule.strict_thresholds, pa_.L_copy_strict, strict=True):
        cols[f"L_copy_strict@{t:g}"] = layers(first)
    for k, first in zip(rule.soft_windows, pa_.L_copy_soft, strict=True):
        cols[f"L_copy_soft_k{k}"] = layers(first)
    # Against the earliest variant: the loosest threshold / shortest window fires first.
    cols["delta_layers_strict"] = delta(pa_.L_copy_strict[0])
    cols["delta_layers_soft"] = delta(pa_.L_copy_soft[0])
    for c, first in zip(rule.cos_milestones, pa_.L_cos, strict=True):
        cols[f"L_cos@{c:g}"] = layers(first)
    for c, first in zip(rule.kl_milestones, pa_.L_kl, strict=True):
        cols[f"L_kl@{c:.1f}"] = layers(first)
    for r, first in zip(rule.rank_milestones, pa_.L_rank, strict=True):
        cols[f"L_rank@{r}"] = layers(first)
    cols["L_semantic_margin"] = layers(pa_.L_semantic_margin)
    cols["L_semantic_strong"] = layers(pa_.L_semantic_strong)
    cols["L_semantic_raw"] = layers(pa_.L_semantic_raw)
    cols["L_semantic_confirmed"] = layers(confirmed)
    cols["confirmed_source"] = pa.array(_confirmed_source(pa_), pa.string())
    for s, m, st in zip(
        rule.gate_scales, pa_.L_semantic_margin_scaled, pa_.L_semantic_strong_scaled, strict=True
    ):
        cols[f"L_semantic_margin@x{s:g}"] = layers(m)
        cols[f"L_semantic_strong@x{s:g}"] = layers(st)
    cols["gates_stable"] = pa.array(_np(pa_.gates_stable))
    cols["L_control_wins"] = layers(pa_.L_control_wins)
    cols["L_answer_over_echo"] = layers(pa_.L_answer_over_echo)
    cols["L_geom_crossover"] = layers(pa_.L_geom_crossover)
    cols["n_norm_only_layers"] = pa.array(_np(pa_.n_norm_only_layers).astype(np.int16))
    cols["L_norm_only_first"] = layers(pa_.L_norm_only_first)
    cols["kl_norm_raw_max_bits"] = floats(pa_.kl_norm_raw_max_bits)
    cols["frac_layers_kl_norm_raw_ge_1"] = floats(pa_.frac_layers_kl_ge_1)
    cols["frac_layers_kl_norm_raw_ge_0.5"] = floats(pa_.frac_layers_kl_ge_half)
    cols["js_norm_raw_p50_bits"] = floats(pa_.js_p50_bits)
    cols["l1_norm_raw_p50"] = floats(pa_.l1_p50)
    cols["jaccard_top50_p50"] = floats(pa_.jaccard_p50)
    cols["lens_artefact_score"] = floats(pa_.lens_artefact_score)
    cols["lens_artefact_tier"] = pa.array([artefact_tier(float(s)) for s in score], pa.string())
    cols["n_nonfinite_layers"] = pa.array(_np(pa_.n_nonfinite_layers).astype(np.int16))
    cols["max_resid_norm_ratio"] = floats(pa_.max_resid_norm_ratio)
    assert out.audit is not None
    cols["last_kl_lens_to_head_bits"] = floats(out.audit.last_kl_to_head_bits)
    cols["last_temperature"] = floats(out.audit.last_temperature)
    cols["last_kl_after_temperature_bits"] = floats(out.audit.last_kl_after_temperature_bits)
    missing = {f.name for f in audit_names} - set(cols)
    if missing:
        raise KeyError(f"audit fields without a value: {sorted(missing)}")
    return cols
