"""Arrow record batches from lens outputs, in the shared schema; token texts decoded once per id."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

from actors.prompts import TokenisedBatch
from actors.schema import PROMPT_SUMMARY_SCHEMA, RECORDS_SCHEMA
from lens_kernel import LensOutputs, RowStats


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
    model: str, batch: TokenisedBatch, out: LensOutputs, texts: TokenTexts
) -> pa.RecordBatch:
    """All decoded rows of one batch, ordered by prompt, layer, position."""
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
    return pa.RecordBatch.from_arrays(list(columns.values()), schema=RECORDS_SCHEMA)


def summary_batch(
    model: str,
    batch: TokenisedBatch,
    out: LensOutputs,
    model_top: RowStats,
    model_answer_prob: torch.Tensor,
    model_answer_rank: torch.Tensor,
    parity: torch.Tensor,
    texts: TokenTexts,
) -> pa.RecordBatch:
    """One row per prompt: collapse layers and the model's own final prediction."""
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
    return pa.RecordBatch.from_arrays(list(columns.values()), schema=PROMPT_SUMMARY_SCHEMA)
