"""Distribution metrics over decoded logits, vectorised over rows.

All inputs are float32 logits of shape [..., vocab]; entropies and divergences are in bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

LN2 = math.log(2.0)


def entropy_bits(log_probs: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """H(p) = -sum_v p_v log2 p_v over the last dim; range [0, log2 V] bits.

    ``out``: an optional buffer shaped like ``log_probs`` for the p log p terms (overwritten).
    """
    # xlogy-style: a zero-probability token contributes 0, not 0 * -inf = nan. p * log p is nan
    # only where p is 0 or nan, so nansum gives the same sum as masking p > 0, in one buffer and
    # three passes instead of five buffers (the lens's costliest step on a [rows, vocab] chunk).
    return -torch.exp(log_probs, out=out).mul_(log_probs).nansum(dim=-1) / LN2


def kl_bits(
    log_p: torch.Tensor, log_q: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(p || q) = sum_v p_v (log2 p_v - log2 q_v) over the last dim; range [0, inf) bits.

    ``out``: an optional buffer shaped like ``log_p`` to hold p (overwritten).
    """
    p = torch.exp(log_p, out=out)
    # A term is 0 where p is 0 (or nan), not 0 * inf = nan; in place, the same values as
    # torch.where(p > 0, p * (log_p - log_q), 0) with fewer [.., V] buffers.
    terms = (log_p - log_q).mul_(p).masked_fill_(~(p > 0), 0.0)
    return (terms.sum(dim=-1) / LN2).clamp_min(0.0)


TOPK_BLOCK = 64  # vocabulary entries per block in topk_by_blocks


def topk_by_blocks(
    x: torch.Tensor, k: int, block: int = TOPK_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of each row of [n, V] ``x``, sorted descending: values, ids.

    The same values as ``torch.topk(x, k, sorted=True)`` (ids may differ only among exact ties
    at the k-th value), in about a third of the time on a large vocabulary: each k-th largest
    entry lies in one of the k blocks with the largest block maxima (every block holding an
    entry above the k-th value has its maximum above it), so one max pass over the row and a
    top-k over k * block candidates replace a top-k over V.
    """
    n, vocab = x.shape
    # Candidates at most a quarter of the row; smaller blocks on a small vocabulary, so that
    # the same path runs there (tests) as on a real one.
    block = min(block, vocab // (4 * k))
    if block < 2 or not x.is_contiguous():
        return torch.topk(x, k, dim=-1, sorted=True)
    full = vocab // block
    maxima = x[:, : full * block].view(n, full, block).amax(dim=-1)
    tail = vocab - full * block
    if tail:
        maxima = torch.cat([maxima, x[:, full * block :].amax(dim=-1, keepdim=True)], dim=1)
    blocks = torch.topk(maxima, k, dim=-1, sorted=False).indices  # [n, k]
    offsets = torch.arange(block, device=x.device)
    ids = (blocks.unsqueeze(-1) * block + offsets).view(n, k * block)
    past_end = ids >= vocab  # only in the short tail block
    candidates = x.gather(-1, ids.clamp_max(vocab - 1))
    if tail:
        candidates.masked_fill_(past_end, -math.inf)
    values, pos = torch.topk(candidates, k, dim=-1, sorted=True)
    return values, ids.gather(-1, pos)


@dataclass
class SoftmaxRows:
    """softmax of [n, V] logits and what the lens reads from it, from one softmax pass.

    ``shifted`` is the logits buffer itself, minus each row's maximum; log-probabilities are
    ``shifted - log_norm``. Entropy = log_norm - sum_v p_v shifted_v: two non-negative terms,
    so no cancellation between large logits.
    """

    shifted: torch.Tensor  # [n, V] z - max z (the caller's logits, shifted in place)
    probs: torch.Tensor  # [n, V] softmax, in the caller's buffer
    log_norm: torch.Tensor  # [n] log sum_v exp(shifted_v) = logsumexp(z) - max z, >= 0
    top_shifted: torch.Tensor  # [n, k] the top-k entries of ``shifted``, descending
    top_ids: torch.Tensor  # [n, k] int64
    entropy_nats: torch.Tensor  # [n]

    @property
    def top_log_probs(self) -> torch.Tensor:
        return self.top_shifted - self.log_norm.unsqueeze(-1)

    def log_probs_at(self, ids: torch.Tensor) -> torch.Tensor:
        """log p at [n, j] ids (all valid)."""
        return self.shifted.gather(-1, ids) - self.log_norm.unsqueeze(-1)


def softmax_rows(
    logits: torch.Tensor, probs_out: torch.Tensor, scratch: torch.Tensor, k: int
) -> SoftmaxRows:
    """Top-k, probabilities, normaliser and entropy of [n, V] float32 logits.

    ``logits`` is shifted in place; ``probs_out`` receives the probabilities and ``scratch``
    (same shape) is overwritten. Passes over the row: one max (inside the top-k), one shift,
    softmax's own, one product and one sum; no transcendental pass besides softmax's exp.
    """
    top, top_ids = topk_by_blocks(logits, k)
    row_max = top[:, :1]
    shifted = logits.sub_(row_max)
    probs = torch.softmax(shifted, dim=-1, out=probs_out)
    # softmax puts exp(0) / sum at the maximum: its log is -log_norm, to a float32 rounding.
    log_norm = probs.gather(-1, top_ids[:, :1]).squeeze(-1).log().neg_()
    # A zero-probability entry (logit -inf) adds 0, not 0 * -inf = nan.
    mean_shifted = torch.mul(probs, shifted, out=scratch).nansum(dim=-1)
    return SoftmaxRows(
        shifted, probs, log_norm, top - row_max, top_ids, (log_norm - mean_shifted).clamp_min(0.0)
    )


@dataclass
class RowStats:
    """Per-row summary of one decoded distribution. Shapes [n] or [n, k]."""

    entropy_bits: torch.Tensor  # [n] float32, full-softmax entropy in bits
    top_ids: torch.Tensor  # [n, k] int64, sorted by probability, descending
    top_probs: torch.Tensor  # [n, k] float32
    rest_mass: torch.Tensor  # [n] float32, 1 - sum(top_probs), in [0, 1]


def row_stats(logits: torch.Tensor, top_k: int) -> RowStats:
    """Entropy, top-k and rest mass of softmax(logits) for each row of [n, V] logits."""
    return log_prob_stats(torch.log_softmax(logits.float(), dim=-1), top_k)


def log_prob_stats(
    log_probs: torch.Tensor, top_k: int, scratch: torch.Tensor | None = None
) -> RowStats:
    """``row_stats`` from log-probabilities [n, V] (log_softmax already applied).

    ``scratch``: an optional buffer shaped like ``log_probs``, overwritten (the lens passes
    its spent logits, so that a chunk needs no new [rows, V] tensor).
    """
    top_logp, top_ids = torch.topk(log_probs, k=top_k, dim=-1, sorted=True)
    top_probs = top_logp.exp()
    rest = (1.0 - top_probs.sum(dim=-1)).clamp(0.0, 1.0)
    return RowStats(entropy_bits(log_probs, out=scratch), top_ids, top_probs, rest)


def softmax_row_stats(rows: SoftmaxRows, top_k: int) -> RowStats:
    """The RowStats of one ``softmax_rows`` result (its top-k holds at least ``top_k``)."""
    top_probs = rows.top_log_probs[:, :top_k].exp()
    rest = (1.0 - top_probs.sum(dim=-1)).clamp(0.0, 1.0)
    return RowStats(rows.entropy_nats / LN2, rows.top_ids[:, :top_k], top_probs, rest)


@dataclass
class NextTokenStats:
    """Lens metrics at the next-token position, shape [layers, batch] (plus k)."""

    rows: RowStats  # each field shaped [layers, batch] / [layers, batch, k]
    answer_prob: torch.Tensor  # [layers, batch] float32; nan where no answer was given
    answer_rank: torch.Tensor  # [layers, batch] int64, 1-based; -1 where no answer was given
    kl_to_final_bits: torch.Tensor  # [layers, batch] float32, KL(layer || final)
    copy_collapse: torch.Tensor  # [layers, batch] bool
    entropy_collapse: torch.Tensor  # [layers, batch] bool
    is_answer: torch.Tensor  # [layers, batch] bool

    def reshape(self, *shape: int) -> NextTokenStats:
        """Every field with its row dims as ``shape`` (top-k fields keep their last dim)."""
        rows = self.rows
        return NextTokenStats(
            RowStats(
                rows.entropy_bits.reshape(shape),
                rows.top_ids.reshape(*shape, -1),
                rows.top_probs.reshape(*shape, -1),
                rows.rest_mass.reshape(shape),
            ),
            *(getattr(self, f).reshape(shape) for f in _NEXT_FIELDS),
        )


_NEXT_FIELDS = (
    "answer_prob",
    "answer_rank",
    "kl_to_final_bits",
    "copy_collapse",
    "entropy_collapse",
    "is_answer",
)


def count_above(
    shifted: torch.Tensor, top_shifted: torch.Tensor, value: torch.Tensor
) -> torch.Tensor:
    """Per row of [n, V]: how many entries exceed ``value`` [n] (int64). Read off the sorted
    top-k [n, K] where the value reaches its last entry (every larger entry is then in it);
    counted over the row otherwise."""
    in_top = value >= top_shifted[:, -1]
    counts = (top_shifted > value.unsqueeze(-1)).sum(dim=-1)
    rest = (~in_top).nonzero(as_tuple=True)[0]
    if rest.numel():
        above = shifted[rest] > value[rest].unsqueeze(-1)
        counts[rest] = above.sum(dim=-1, dtype=torch.int32).long()
    return counts


def next_token_rows(
    rows: SoftmaxRows,
    final_log_probs: torch.Tensor,
    answer_ids: torch.Tensor,
    prompt_ids: torch.Tensor,
    top_k: int,
    copy_threshold: float,
    copy_margin: float,
    entropy_collapse_bits: float,
    scratch: torch.Tensor,
) -> NextTokenStats:
    """Next-token metrics of n decoded rows, every field shaped [n] (reshape to [layers, B]).

    final_log_probs [n or 1, V]: the reference distribution for KL (the model's own output);
    answer_ids [n or 1]: gold first-token ids, -1 for none; prompt_ids [n or 1, T]: the
    prompt's ids, -1 padded. copy_collapse: top-1 id occurs in the prompt, p1 > copy_threshold
    and p1 - p2 > copy_margin. scratch: a float32 [n, V] buffer, overwritten.
    """
    n = rows.shifted.shape[0]
    top_logp = rows.top_log_probs
    top_probs = top_logp[:, : max(top_k, 2)].exp()
    rest = (1.0 - top_probs[:, :top_k].sum(dim=-1)).clamp(0.0, 1.0)
    ent = rows.entropy_nats / LN2
    stats = RowStats(ent, rows.top_ids[:, :top_k], top_probs[:, :top_k], rest)

    answers = answer_ids.expand(n)
    has_answer = answers >= 0
    answer_shifted = rows.shifted.gather(-1, answers.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    # Rank = 1 + number of tokens strictly more probable than the answer.
    rank = 1 + count_above(rows.shifted, rows.top_shifted, answer_shifted)
    answer_prob = torch.where(
        has_answer, (answer_shifted - rows.log_norm).exp(), torch.full_like(ent, math.nan)
    )
    answer_rank = torch.where(has_answer, rank, torch.full_like(rank, -1))

    # KL(p || q) = sum_v p_v (log p_v - log q_v), each term formed before the sum; a term is
    # 0 where p_v is 0 (nansum drops 0 * inf).
    terms = torch.sub(rows.shifted, final_log_probs, out=scratch)
    terms.sub_(rows.log_norm.unsqueeze(-1)).mul_(rows.probs)
    kl = (terms.nansum(dim=-1) / LN2).clamp_min(0.0)

    top1 = rows.top_ids[:, 0]
    p1, p2 = top_probs[:, 0], top_probs[:, 1]
    in_prompt = (top1.unsqueeze(-1) == prompt_ids).any(dim=-1)
    copy = in_prompt & (p1 > copy_threshold) & ((p1 - p2) > copy_margin)
    is_answer = has_answer & (top1 == answers)
    return NextTokenStats(
        stats, answer_prob, answer_rank, kl, copy, ent <= entropy_collapse_bits, is_answer
    )


def next_token_stats(
    logits: torch.Tensor,
    final_log_probs: torch.Tensor,
    answer_ids: torch.Tensor,
    prompt_ids: torch.Tensor,
    top_k: int,
    copy_threshold: float,
    copy_margin: float,
    entropy_collapse_bits: float = 1.0,
) -> NextTokenStats:
    """Metrics for logits [layers, B, V] at each prompt's next-token position (not
    overwritten); final_log_probs [B, V], answer_ids [B], prompt_ids [B, T]: as in
    ``next_token_rows``, per prompt."""
    n_layers, batch, vocab = logits.shape
    z = logits.float().reshape(-1, vocab).clone()
    probs, scratch = torch.zeros_like(z), torch.zeros_like(z)
    rows = softmax_rows(z, probs, scratch, min(max(top_k, 2), vocab))
    stats = next_token_rows(
        rows,
        final_log_probs.float().repeat(n_layers, 1),
        answer_ids.repeat(n_layers),
        prompt_ids.repeat(n_layers, 1),
        top_k,
        copy_threshold,
        copy_margin,
        entropy_collapse_bits,
        scratch,
    )
    return stats.reshape(n_layers, batch)


def temperature_topk(logits: torch.Tensor, temperature: float, top_k: int) -> RowStats:
    """Row stats of softmax(logits / T), the seed's temperature exploration."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return row_stats(logits.float() / temperature, top_k)
