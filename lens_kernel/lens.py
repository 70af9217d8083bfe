"""The lens pass: residuals -> per-layer norm -> float32 unembed -> metrics, chunked by memory."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lens_kernel.audit import (
    AuditRows,
    AuditRule,
    PromptAudit,
    cat_rows,
    logit_agreement,
    prompt_audit,
    rows_audit,
    stack_layers,
    unique_ids,
)
from lens_kernel.collapse import CollapseRule, PromptCollapse, collapse_layers
from lens_kernel.metrics import (
    NextTokenStats,
    RowStats,
    next_token_rows,
    row_stats,
    softmax_row_stats,
    softmax_rows,
)
from lens_kernel.norms import NormSpec, apply_norm
from lens_kernel.unembed import UnembedSpec

DEFAULT_CHUNK_BYTES = 512 * 2**20
# Softmax passes run on row slices of about this many bytes of logits: within a last-level
# cache, so that the passes after the first read cache, not memory.
CACHE_BYTES = 4 * 2**20
_PLAN_LAST = object()  # lens_pass default: the reference uses the plan's last-layer norm


def decode_rows(
    resid: torch.Tensor,
    layer_of_row: torch.Tensor,
    norm_plan: list[NormSpec | None],
    unembed: UnembedSpec,
    keep_bias: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Lens logits [n, V] for residual rows [n, d_model]; row r uses norm_plan[layer_of_row[r]].

    Norms are applied per distinct spec (one call per group, not per row); one unembed matmul,
    written into ``out`` [n, V] float32 when given.
    """
    resid = resid.float()
    groups: dict[int, list[int]] = {}
    specs: dict[int, NormSpec | None] = {}
    for layer, spec in enumerate(norm_plan):
        groups.setdefault(id(spec), []).append(layer)
        specs[id(spec)] = spec
    if len(groups) == 1:
        normed = apply_norm(resid, norm_plan[0], keep_bias)
    else:
        group_of_layer = torch.empty(len(norm_plan), dtype=torch.long)
        for g, layers in enumerate(groups.values()):
            group_of_layer[layers] = g
        row_group = group_of_layer.to(layer_of_row.device)[layer_of_row]
        normed = torch.empty_like(resid)
        for g, key in enumerate(groups):
            rows = (row_group == g).nonzero(as_tuple=True)[0]
            if rows.numel():
                normed[rows] = apply_norm(resid[rows], specs[key], keep_bias)
    return unembed(normed, out=out)


@dataclass
class LensInputs:
    """One batch of prompts for the lens.

    resid_next: [layers, B, d_model] residuals at each prompt's next-token position.
    resid_all:  [layers, B, T, d_model] residuals at every position, or None (next-token only).
    positions:  [B, T] bool, which positions of resid_all to decode (real tokens only).
    prompt_ids: [B, T_prompt] int64 token ids, -1 padded (for the copy rule).
    answer_ids: [B] int64 gold first-token ids, -1 where no answer was given.
    foil_ids:   [B] int64 a control prompt's foil first-token ids, -1 for none (audit only).
    echo_ids:   [B, T] int64 prompt ids that count as echoes (audit: echo mass, strict copy,
                geometry), -1 padded; default: prompt_ids. The actor leaves out BOS and
                whitespace/punctuation-only tokens.
    """

    resid_next: torch.Tensor
    prompt_ids: torch.Tensor
    answer_ids: torch.Tensor
    resid_all: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    foil_ids: torch.Tensor | None = None
    echo_ids: torch.Tensor | None = None


@dataclass
class LensOutputs:
    """All lens results for one batch.

    all_rows / row_batch / row_layer / row_pos: every requested (prompt, layer, position), ordered
    by prompt, then layer, then position; None for a next-token-only batch.
    next: [layers, B] next-token metrics; final_logits: [B, V] reference logits (see lens_pass).
    audit / prompt_audit: the lens-artefact audit, when lens_pass ran with one.
    """

    next: NextTokenStats
    collapse: PromptCollapse
    final_logits: torch.Tensor
    audit: AuditRows | None = None
    prompt_audit: PromptAudit | None = None
    all_rows: RowStats | None = None
    row_batch: torch.Tensor | None = None
    row_layer: torch.Tensor | None = None
    row_pos: torch.Tensor | None = None


def _rows_per_chunk(d_vocab: int, chunk_bytes: int) -> int:
    # A quarter of the budget per [rows, V] float32 logits buffer: the chunk's logits (twice with
    # the audit's raw decode) and the gathers and index copies of the reads stay within it.
    return max(1, chunk_bytes // (4 * 4 * d_vocab))


def _cat_rows(parts: list[RowStats]) -> RowStats:
    return RowStats(
        torch.cat([p.entropy_bits for p in parts]),
        torch.cat([p.top_ids for p in parts]),
        torch.cat([p.top_probs for p in parts]),
        torch.cat([p.rest_mass for p in parts]),
    )


def lens_pass(
    inputs: LensInputs,
    norm_plan: list[NormSpec | None],
    unembed: UnembedSpec,
    top_k: int = 20,
    rule: CollapseRule | None = None,
    keep_bias: bool = True,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    final_norm: NormSpec | object | None = _PLAN_LAST,
    audit: AuditRule | None = None,
    head_logits: torch.Tensor | None = None,
    reference_logits: torch.Tensor | None = None,
) -> LensOutputs:
    """Decode every requested row of a batch and compute all lens metrics.

    ``final_norm`` is the model's own final norm. With it, the reference distribution (the
    target of KL and of the parity check, ``final_logits``) is the model's output, whatever the
    lens mode: last layer -> final norm (bias kept) -> unembed. Default: the plan's last norm.
    ``audit``: also run the lens-artefact audit on the next-token rows (lens_kernel.audit);
    ``head_logits`` [B, V] are the model head's own logits for its last-layer consistency
    check (default: ``final_logits``). ``reference_logits`` [B, V]: the reference already
    computed (another lens of the same batch; a translated batch cannot make its own, since its
    last layer is no longer the model's residual).
    """
    rule = rule or CollapseRule()
    if audit is not None and top_k < 2:
        raise ValueError(f"the audit reads p1 - p2 from the top-k: top_k must be >= 2, got {top_k}")
    n_rows_layers, batch, _ = inputs.resid_next.shape
    if n_rows_layers != len(norm_plan):
        raise ValueError(
            f"residuals have {n_rows_layers} layers but the norm plan has {len(norm_plan)}"
        )
    device = inputs.resid_next.device
    layer_ids = torch.arange(n_rows_layers, device=device)

    # Next-token rows, prompt-major ([prompt, layer]), decoded in chunks of prompts whose logits
    # fit the budget (twice over with the audit: its raw decode), then read in cache-sized
    # slices of one prompt's layers (see CACHE_BYTES).
    vocab = unembed.d_vocab
    per_chunk = _rows_per_chunk(vocab, chunk_bytes) // (2 if audit else 1)
    per_chunk = max(1, per_chunk // n_rows_layers)
    sub = max(1, min(n_rows_layers, CACHE_BYTES // (4 * vocab)))
    if reference_logits is not None:
        final_logits = reference_logits
    elif isinstance(final_norm, NormSpec) or final_norm is None:
        final_logits = unembed.reference(
            apply_norm(inputs.resid_next[-1], final_norm, keep_bias=True)
        )
    else:
        final_logits = unembed.reference(
            apply_norm(inputs.resid_next[-1], norm_plan[-1], keep_bias)
        )
    final_log_probs = torch.log_softmax(final_logits, dim=-1)
    k_next = min(max(top_k, 2, 0 if audit is None else audit.jaccard_k), vocab)
    probs_buf, scratch_buf = (torch.zeros(sub, vocab, device=device) for _ in range(2))
    if audit is not None:
        echo_ids = unique_ids(inputs.prompt_ids if inputs.echo_ids is None else inputs.echo_ids)
        foil_ids = (
            torch.full_like(inputs.answer_ids, -1) if inputs.foil_ids is None else inputs.foil_ids
        )
        head_log_probs = (
            final_log_probs if head_logits is None else torch.log_softmax(head_logits.float(), -1)
        )
        raw_plan: list[NormSpec | None] = [None] * n_rows_layers
        raw_probs_buf, spare_buf = (torch.zeros(sub, vocab, device=device) for _ in range(2))
    prompt_stats: list[NextTokenStats] = []
    next_buf: torch.Tensor | None = None
    raw_buf: torch.Tensor | None = None
    audits: list[AuditRows] = []
    for b0 in range(0, batch, per_chunk):
        b1 = min(batch, b0 + per_chunk)
        flat = inputs.resid_next[:, b0:b1].transpose(0, 1).reshape(-1, inputs.resid_next.shape[-1])
        flat_layers = layer_ids.repeat(b1 - b0)
        # The first chunk's logits buffers serve every later chunk (see the all-positions loop).
        n = flat.shape[0]
        logits = decode_rows(
            flat, flat_layers, norm_plan, unembed, keep_bias, out=_head(next_buf, n)
        )
        next_buf = next_buf if next_buf is not None else logits
        if audit is not None:
            raw = decode_rows(
                flat, flat_layers, raw_plan, unembed, keep_bias, out=_head(raw_buf, n)
            )
            raw_buf = raw_buf if raw_buf is not None else raw
        for b in range(b0, b1):
            parts: list[NextTokenStats] = []
            audit_parts: list[AuditRows] = []
            for l0 in range(0, n_rows_layers, sub):
                l1 = min(n_rows_layers, l0 + sub)
                r0, m = (b - b0) * n_rows_layers + l0, l1 - l0
                z = logits[r0 : r0 + m]
                if audit is not None:
                    cos, nonfinite = logit_agreement(z, final_logits[b])
                rows = softmax_rows(z, probs_buf[:m], scratch_buf[:m], k_next)
                stats = next_token_rows(
                    rows,
                    final_log_probs[b : b + 1],
                    inputs.answer_ids[b : b + 1],
                    inputs.prompt_ids[b : b + 1],
                    top_k,
                    rule.copy_threshold,
                    rule.copy_margin,
                    rule.entropy_collapse_bits,
                    scratch_buf[:m],
                )
                parts.append(stats)
                if audit is not None:
                    audit_parts.append(
                        rows_audit(
                            rows,
                            raw[r0 : r0 + m],
                            raw_probs_buf[:m],
                            scratch_buf[:m],
                            spare_buf[:m],
                            cos,
                            nonfinite,
                            head_log_probs[b : b + 1] if l1 == n_rows_layers else None,
                            stats.answer_rank,
                            stats.rows.entropy_bits,
                            inputs.answer_ids[b : b + 1],
                            foil_ids[b : b + 1],
                            echo_ids[b : b + 1],
                            audit,
                        )
                    )
            prompt_stats.append(_cat_next(parts, dim=0).reshape(n_rows_layers, 1))
            if audit is not None:
                audits.append(stack_layers(audit_parts))
    nxt = _cat_next(prompt_stats, dim=1)
    collapse = collapse_layers(nxt.copy_collapse, nxt.entropy_collapse, nxt.is_answer)
    out = LensOutputs(next=nxt, collapse=collapse, final_logits=final_logits)
    if audit is not None:
        rows_all = cat_rows(audits)
        normed = torch.stack(
            [apply_norm(inputs.resid_next[i], spec, keep_bias) for i, spec in enumerate(norm_plan)]
        )
        out.audit = rows_all
        out.prompt_audit = prompt_audit(
            rows_all,
            nxt.answer_prob,
            nxt.answer_rank,
            nxt.kl_to_final_bits,
            nxt.rows.top_ids,
            nxt.rows.top_probs,
            collapse.L_semantic,
            inputs.prompt_ids if inputs.echo_ids is None else inputs.echo_ids,
            echo_ids,
            normed,
            inputs.resid_next,
            unembed.W_U,
            inputs.answer_ids,
            audit,
        )
    if inputs.resid_all is None:
        return out

    if inputs.positions is None:
        raise ValueError("resid_all needs a positions mask")
    # Rows ordered by (prompt, layer, position): prompt b owns counts[b] * layers rows,
    # layer-major over its requested positions.
    b_idx, t_idx = inputs.positions.nonzero(as_tuple=True)  # sorted by prompt, then position
    counts = torch.bincount(b_idx, minlength=batch)
    starts = torch.cumsum(counts, 0) - counts
    rows_per_prompt = counts * n_rows_layers
    row_b = torch.repeat_interleave(torch.arange(batch, device=device), rows_per_prompt)
    offset = torch.arange(row_b.numel(), device=device) - torch.repeat_interleave(
        starts * n_rows_layers, rows_per_prompt
    )
    row_layer = offset // counts[row_b]
    row_pos = t_idx[starts[row_b] + offset % counts[row_b]]

    per_chunk = _rows_per_chunk(unembed.d_vocab, chunk_bytes)
    sub = max(1, min(per_chunk, CACHE_BYTES // (4 * unembed.d_vocab)))
    # One buffer for a matmul chunk's logits, reused by every chunk (on the CPU a fresh
    # [rows, V] tensor is page-faulted in, about as costly as the matmul that fills it; not
    # torch.empty: deterministic mode NaN-fills it); the softmax passes then run on cache-sized
    # slices of it, with two cache-sized buffers, so that each pass after the first reads cache.
    logits_buf: torch.Tensor | None = None
    probs_buf = torch.zeros(sub, unembed.d_vocab, device=device)
    scratch_buf = torch.zeros_like(probs_buf)
    chunks: list[RowStats] = []
    for r0 in range(0, row_b.numel(), per_chunk):
        sl = slice(r0, r0 + per_chunk)
        resid = inputs.resid_all[row_layer[sl], row_b[sl], row_pos[sl]]  # [rows, d]
        n = resid.shape[0]
        out_logits = _head(logits_buf, n)
        logits = decode_rows(resid, row_layer[sl], norm_plan, unembed, keep_bias, out=out_logits)
        logits_buf = logits if logits_buf is None else logits_buf
        for s0 in range(0, n, sub):
            z = logits[s0 : s0 + sub]
            m = z.shape[0]
            rows = softmax_rows(z, probs_buf[:m], scratch_buf[:m], top_k)
            chunks.append(softmax_row_stats(rows, top_k))
    if not chunks:  # no position requested: empty [0] / [0, k] results rather than a crash
        chunks.append(row_stats(torch.empty(0, unembed.d_vocab, device=device), top_k))
    out.all_rows = _cat_rows(chunks)
    out.row_batch, out.row_layer, out.row_pos = row_b, row_layer, row_pos
    return out


def _head(buf: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """The first n rows of a reused buffer, or None to let the first call allocate it."""
    return None if buf is None else buf[:n]


def _cat_next(parts: list[NextTokenStats], dim: int) -> NextTokenStats:
    if len(parts) == 1:
        return parts[0]

    def cat(name: str) -> torch.Tensor:
        return torch.cat([getattr(p, name) for p in parts], dim=dim)

    def cat_rows(name: str) -> torch.Tensor:
        return torch.cat([getattr(p.rows, name) for p in parts], dim=dim)

    rows = RowStats(*(cat_rows(n) for n in ("entropy_bits", "top_ids", "top_probs", "rest_mass")))
    return NextTokenStats(
        rows,
        cat("answer_prob"),
        cat("answer_rank"),
        cat("kl_to_final_bits"),
        cat("copy_collapse"),
        cat("entropy_collapse"),
        cat("is_answer"),
    )
