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


def norm_rows(
    resid: torch.Tensor,
    layer_of_row: torch.Tensor,
    norm_plan: list[NormSpec | None],
    keep_bias: bool = True,
) -> torch.Tensor:
    """float32 residual rows [n, d_model] normalised as the lens decodes them: row r with
    norm_plan[layer_of_row[r]], one call per distinct spec (not per row)."""
    resid = resid.float()
    groups: dict[int, list[int]] = {}
    specs: dict[int, NormSpec | None] = {}
    for layer, spec in enumerate(norm_plan):
        groups.setdefault(id(spec), []).append(layer)
        specs[id(spec)] = spec
    if len(groups) == 1:
        return apply_norm(resid, norm_plan[0], keep_bias)
    group_of_layer = torch.empty(len(norm_plan), dtype=torch.long)
    for g, layers in enumerate(groups.values()):
        group_of_layer[layers] = g
    row_group = group_of_layer.to(layer_of_row.device)[layer_of_row]
    normed = torch.empty_like(resid)
    for g, key in enumerate(groups):
        rows = (row_group == g).nonzero(as_tuple=True)[0]
        if rows.numel():
            normed[rows] = apply_norm(resid[rows], specs[key], keep_bias)
    return normed


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


def _rows_per_chunk(d_vocab: int, chunk_bytes: int, exact: bool = True) -> int:
    """Rows of one matmul: the budget holds its [rows, V] float32 logits (what the reads after
    it allocate is cache-sized). A lens faster than float32 also holds the matmul's bf16 product
    and the audit's float32 raw rows beside it: a third as many rows then. Few large matmuls
    beat many small ones: on a CPU a 262k vocabulary's matmuls ran 20% faster at 512 rows than
    at 128 (measured once on Gemma-3-270M's next-token batches)."""
    return max(1, chunk_bytes // (4 * d_vocab * (1 if exact else 3)))


def _cat_rows(parts: list[RowStats]) -> RowStats:
    return RowStats(
        torch.cat([p.entropy_bits for p in parts]),
        torch.cat([p.top_ids for p in parts]),
        torch.cat([p.top_probs for p in parts]),
        torch.cat([p.rest_mass for p in parts]),
    )


@dataclass(frozen=True)
class _Segment:
    """Rows of one unembedding matmul: ``kind`` "ref" (the reference rows, one per prompt),
    "next" (prompts [start, stop): each prompt's layers, then with the audit the same rows
    raw) or "all" (all-positions rows [start, stop)); ``offset`` is its first row there."""

    kind: str
    start: int
    stop: int
    offset: int
    rows: int


def _pack(
    n_ref: int, batch: int, per_prompt: int, n_all: int, capacity: int
) -> list[list[_Segment]]:
    """Every row the pass decodes, packed in order into matmuls of at most ``capacity`` rows:
    each matmul reads W_U once, so few large ones beat one per kind (at batch 1 the reads of
    a big vocabulary's W_U were a fifth of the pass). A prompt's next-token rows stay in one
    matmul (read together with its raw rows); a unit larger than the capacity (the reference,
    one prompt) gets a matmul to itself."""
    chunks: list[list[_Segment]] = [[]]
    used = 0

    def add(kind: str, start: int, stop: int, rows: int) -> None:
        nonlocal used
        chunks[-1].append(_Segment(kind, start, stop, used, rows))
        used += rows

    def close() -> None:
        nonlocal used
        if chunks[-1]:
            chunks.append([])
            used = 0

    if n_ref:
        add("ref", 0, n_ref, n_ref)
    b = 0
    while b < batch:
        n = min(batch - b, (capacity - used) // per_prompt)
        if n <= 0 and used:
            close()
            continue
        n = max(n, 1)
        add("next", b, b + n, n * per_prompt)
        b += n
    r = 0
    while r < n_all:
        if used >= capacity:
            close()
        n = min(n_all - r, capacity - used)
        add("all", r, r + n, n)
        r += n
    return [c for c in chunks if c]


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

    Rows are decoded in as few float32 matmuls as ``chunk_bytes`` allows (``_pack``), into one
    reused logits buffer; what follows the matmul reads cache-sized slices of it.
    """
    rule = rule or CollapseRule()
    if audit is not None and top_k < 2:
        raise ValueError(f"the audit reads p1 - p2 from the top-k: top_k must be >= 2, got {top_k}")
    n_rows_layers, batch, d_model = inputs.resid_next.shape
    if n_rows_layers != len(norm_plan):
        raise ValueError(
            f"residuals have {n_rows_layers} layers but the norm plan has {len(norm_plan)}"
        )
    if inputs.resid_all is not None and inputs.positions is None:
        raise ValueError("resid_all needs a positions mask")
    device = inputs.resid_next.device
    vocab = unembed.d_vocab
    layer_ids = torch.arange(n_rows_layers, device=device)

    # The reference: the model's output from its last residual, float32 whatever the lens
    # precision. Where the lens rows are float32 too it rides in the first matmul.
    if isinstance(final_norm, NormSpec) or final_norm is None:
        ref_norm, ref_bias = final_norm, True
    else:
        ref_norm, ref_bias = norm_plan[-1], keep_bias
    final_logits = reference_logits
    # The reference and the audit's raw rows are float32 whatever the lens rows' precision (a
    # bf16 raw decode changes the raw ranks: bench/raw_precision.py); with float32 lens rows
    # they share its matmuls.
    exact_lens = unembed.effective_precision == "float32"
    ref_in_matmul = reference_logits is None and exact_lens
    raw_in_matmul = audit is not None and exact_lens
    if final_logits is None and not ref_in_matmul:
        final_logits = unembed.reference(apply_norm(inputs.resid_next[-1], ref_norm, ref_bias))
    final_log_probs = None if final_logits is None else torch.log_softmax(final_logits, dim=-1)

    # All-positions rows, ordered by (prompt, layer, position): prompt b owns counts[b] * layers
    # rows, layer-major over its requested positions.
    row_b = row_layer = row_pos = None
    n_all = 0
    if inputs.resid_all is not None:
        assert inputs.positions is not None
        b_idx, t_idx = inputs.positions.nonzero(as_tuple=True)  # by prompt, then position
        counts = torch.bincount(b_idx, minlength=batch)
        starts = torch.cumsum(counts, 0) - counts
        rows_per_prompt = counts * n_rows_layers
        row_b = torch.repeat_interleave(torch.arange(batch, device=device), rows_per_prompt)
        offset = torch.arange(row_b.numel(), device=device) - torch.repeat_interleave(
            starts * n_rows_layers, rows_per_prompt
        )
        row_layer = offset // counts[row_b]
        row_pos = t_idx[starts[row_b] + offset % counts[row_b]]
        n_all = row_b.numel()

    per_prompt = n_rows_layers * (2 if raw_in_matmul else 1)
    capacity = _rows_per_chunk(vocab, chunk_bytes, exact_lens)
    chunks = _pack(batch if ref_in_matmul else 0, batch, per_prompt, n_all, capacity)

    # The softmax passes run on slices of at most `sub` rows (see CACHE_BYTES), in these buffers.
    cache_rows = max(1, CACHE_BYTES // (4 * vocab))
    sub_next = min(n_rows_layers, cache_rows)
    sub_all = min(capacity, cache_rows)
    sub = max(sub_next, sub_all if n_all else 1)
    probs_buf, scratch_buf = (torch.zeros(sub, vocab, device=device) for _ in range(2))
    k_next = min(max(top_k, 2, 0 if audit is None else audit.jaccard_k), vocab)
    if audit is not None:
        echo_ids = unique_ids(inputs.prompt_ids if inputs.echo_ids is None else inputs.echo_ids)
        foil_ids = (
            torch.full_like(inputs.answer_ids, -1) if inputs.foil_ids is None else inputs.foil_ids
        )
        raw_probs_buf, spare_buf = (torch.zeros(sub_next, vocab, device=device) for _ in range(2))
    # The audit's last-layer check reads the head's own log-probs (default: the reference's).
    head_log_probs = (
        None if audit is None or head_logits is None else torch.log_softmax(head_logits.float(), -1)
    )
    prompt_stats: list[NextTokenStats] = []
    audits: list[AuditRows] = []
    all_parts: list[RowStats] = []

    def _next_rows(seg: _Segment) -> torch.Tensor:
        """Prompts seg.start..stop's next-token residuals, prompt-major: [prompts x layers, d]."""
        rows = inputs.resid_next[:, seg.start : seg.stop].transpose(0, 1)
        return rows.reshape(-1, d_model)

    def read_next(seg: _Segment, block: torch.Tensor) -> None:
        """The next-token metrics (and audit) of prompts seg.start..stop from their logits."""
        assert final_logits is not None and final_log_probs is not None
        head = final_log_probs if head_log_probs is None else head_log_probs
        n_norm = (seg.stop - seg.start) * n_rows_layers
        logits, raw = block[:n_norm], block[n_norm:]
        if audit is not None and not raw_in_matmul:
            raw = unembed.reference(_next_rows(seg))
        for b in range(seg.start, seg.stop):
            parts: list[NextTokenStats] = []
            audit_parts: list[AuditRows] = []
            for l0 in range(0, n_rows_layers, sub_next):
                l1 = min(n_rows_layers, l0 + sub_next)
                r0, m = (b - seg.start) * n_rows_layers + l0, l1 - l0
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
                            head[b : b + 1] if l1 == n_rows_layers else None,
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

    def read_all(block: torch.Tensor) -> None:
        for s0 in range(0, block.shape[0], sub_all):
            z = block[s0 : s0 + sub_all]
            m = z.shape[0]
            rows = softmax_rows(z, probs_buf[:m], scratch_buf[:m], top_k)
            all_parts.append(softmax_row_stats(rows, top_k))

    def matmul_input(seg: _Segment) -> list[torch.Tensor]:
        if seg.kind == "ref":
            return [apply_norm(inputs.resid_next[-1], ref_norm, ref_bias)]
        if seg.kind == "next":
            flat = _next_rows(seg)
            normed = norm_rows(flat, layer_ids.repeat(seg.stop - seg.start), norm_plan, keep_bias)
            return [normed, flat.float()] if raw_in_matmul else [normed]  # raw: no norm
        assert inputs.resid_all is not None and row_layer is not None
        assert row_b is not None and row_pos is not None
        sl = slice(seg.start, seg.stop)
        resid = inputs.resid_all[row_layer[sl], row_b[sl], row_pos[sl]]  # [rows, d]
        return [norm_rows(resid, row_layer[sl], norm_plan, keep_bias)]

    # One logits buffer serves every matmul (on the CPU a fresh [rows, V] tensor is page-faulted
    # in, about as costly as the matmul that fills it; not torch.empty: deterministic mode
    # NaN-fills it): the first matmul allocates it, a larger later one replaces it.
    logits_buf: torch.Tensor | None = None
    for chunk in chunks:
        parts = [x for seg in chunk for x in matmul_input(seg)]
        x = parts[0] if len(parts) == 1 else torch.cat(parts)
        n = x.shape[0]
        reuse = logits_buf[:n] if logits_buf is not None and logits_buf.shape[0] >= n else None
        logits = unembed(x, out=reuse)
        if reuse is None:
            logits_buf = logits
        for seg in chunk:
            block = logits[seg.offset : seg.offset + seg.rows]
            if seg.kind == "ref":
                final_logits = block.clone()
                final_log_probs = torch.log_softmax(final_logits, dim=-1)
            elif seg.kind == "next":
                read_next(seg, block)
            else:
                read_all(block)
    assert final_logits is not None

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
    if not all_parts:  # no position requested: empty [0] / [0, k] results rather than a crash
        all_parts.append(row_stats(torch.empty(0, vocab, device=device), top_k))
    out.all_rows = _cat_rows(all_parts)
    out.row_batch, out.row_layer, out.row_pos = row_b, row_layer, row_pos
    return out


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
