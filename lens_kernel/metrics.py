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


def next_token_stats(
    logits: torch.Tensor,
    final_log_probs: torch.Tensor,
    answer_ids: torch.Tensor,
    prompt_ids: torch.Tensor,
    top_k: int,
    copy_threshold: float,
    copy_margin: float,
    entropy_collapse_bits: float = 1.0,
    scratch: torch.Tensor | None = None,
) -> NextTokenStats:
    """Metrics for logits [layers, B, V] at each prompt's next-token position.

    final_log_probs [B, V]: the reference distribution for KL (the model's own output).
    answer_ids [B]: gold first-token id, -1 for none. prompt_ids [B, T]: prompt ids, -1 padded.
    copy_collapse: top-1 id occurs in the prompt, p1 > copy_threshold and p1 - p2 > copy_margin.
    scratch: an optional float32 buffer shaped like ``logits``, overwritten (may be ``logits``
    itself when the caller is done with them).
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1)  # [layers, B, V]
    stats, _, _ = next_token_stats_from_log_probs(
        log_probs,
        final_log_probs,
        answer_ids,
        prompt_ids,
        top_k,
        copy_threshold,
        copy_margin,
        entropy_collapse_bits,
        scratch=scratch,
    )
    return stats


def next_token_stats_from_log_probs(
    log_probs: torch.Tensor,
    final_log_probs: torch.Tensor,
    answer_ids: torch.Tensor,
    prompt_ids: torch.Tensor,
    top_k: int,
    copy_threshold: float,
    copy_margin: float,
    entropy_collapse_bits: float = 1.0,
    scratch: torch.Tensor | None = None,
    top_k_extra: int = 0,
) -> tuple[NextTokenStats, torch.Tensor, torch.Tensor]:
    """``next_token_stats`` from log-probabilities [layers, B, V]; also returns the sorted top
    max(top_k, 2, top_k_extra) log-probs and ids (the audit reads a top-50 from the same call).
    """
    n_layers, batch, _ = log_probs.shape
    k = min(max(top_k, 2, top_k_extra), log_probs.shape[-1])
    top_logp, top_ids = torch.topk(log_probs, k=k, dim=-1, sorted=True)
    top_probs = top_logp[..., : max(top_k, 2)].exp()
    ent = entropy_bits(log_probs, out=scratch)
    rest = (1.0 - top_probs[..., :top_k].sum(dim=-1)).clamp(0.0, 1.0)
    rows = RowStats(ent, top_ids[..., :top_k], top_probs[..., :top_k], rest)

    has_answer = answer_ids >= 0  # [B]
    safe_answer = answer_ids.clamp_min(0).view(1, batch, 1).expand(n_layers, batch, 1)
    answer_logp = log_probs.gather(-1, safe_answer).squeeze(-1)  # [layers, B]
    # Rank = 1 + number of tokens strictly more probable than the answer.
    answer_rank = 1 + (log_probs > answer_logp.unsqueeze(-1)).sum(dim=-1)
    answer_prob = torch.where(has_answer, answer_logp.exp(), torch.full_like(answer_logp, math.nan))
    answer_rank = torch.where(has_answer, answer_rank, torch.full_like(answer_rank, -1))

    kl = kl_bits(log_probs, final_log_probs.float().unsqueeze(0), out=scratch)

    top1 = top_ids[..., 0]  # [layers, B]
    p1, p2 = top_probs[..., 0], top_probs[..., 1]
    in_prompt = (top1.unsqueeze(-1) == prompt_ids.unsqueeze(0)).any(dim=-1)  # [layers, B]
    copy = in_prompt & (p1 > copy_threshold) & ((p1 - p2) > copy_margin)
    ent_collapse = ent <= entropy_collapse_bits
    is_answer = has_answer.unsqueeze(0) & (top1 == answer_ids.unsqueeze(0))
    stats = NextTokenStats(rows, answer_prob, answer_rank, kl, copy, ent_collapse, is_answer)
    return stats, top_logp, top_ids


def temperature_topk(logits: torch.Tensor, temperature: float, top_k: int) -> RowStats:
    """Row stats of softmax(logits / T), the seed's temperature exploration."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return row_stats(logits.float() / temperature, top_k)
