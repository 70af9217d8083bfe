"""The lens-artefact audit: is an early "semantic" layer real, or an artefact of the lens?

Computed in the lens pass from the same next-token residuals (no second forward): each row is
decoded a second time with no norm (the raw lens) and compared with the normalised one; the
layer's distribution is compared with the model's output; copy detectors run on token ids;
the semantic gates are recomputed under small rescalings of the logits. All in float32, bits
for entropies and divergences. Definitions follow forms-and-features/logos-in-layers
(``001_layers_baseline``), which this project re-implements; README lists every formula.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from lens_kernel.collapse import first_true_layer
from lens_kernel.metrics import LN2, SoftmaxRows, count_above, softmax_rows


@dataclass(frozen=True)
class AuditRule:
    """Thresholds of the audit (the reference experiment's defaults)."""

    strict_thresholds: tuple[float, ...] = (0.70, 0.80, 0.90, 0.95)
    strict_margin: float = 0.10
    soft_threshold: float = 0.33
    soft_windows: tuple[int, ...] = (1, 2, 3)
    uniform_margin: float = 0.002  # p(answer) - 1/V at least this
    top2_gap_logits: float = 0.5  # answer logit - best other logit at least this
    confirm_window: int = 2  # raw rank 1 within +-this many layers confirms L_semantic
    jaccard_k: int = 50
    top_mass_k: int = 5
    cos_milestones: tuple[float, ...] = (0.2, 0.4, 0.6)
    kl_milestones: tuple[float, ...] = (1.0, 0.5)
    rank_milestones: tuple[int, ...] = (10, 5, 1)
    gate_scales: tuple[float, ...] = (0.9, 1.1)
    # Last layer: below this KL(lens || head) the best temperature is not searched (it is 1).
    temperature_search_above_bits: float = 1e-3


@dataclass
class AuditRows:
    """Per (layer, prompt) audit metrics; every tensor [layers, B] unless noted."""

    p_top5: torch.Tensor
    cos_to_final: torch.Tensor
    answer_prob_raw: torch.Tensor  # nan without an answer
    answer_rank_raw: torch.Tensor  # int64, -1 without an answer
    top1_id_raw: torch.Tensor  # int64
    entropy_raw_bits: torch.Tensor
    entropy_gap_bits: torch.Tensor  # H(norm) - H(raw)
    kl_norm_raw_bits: torch.Tensor
    js_norm_raw_bits: torch.Tensor
    l1_norm_raw: torch.Tensor
    jaccard_top_raw_norm: torch.Tensor
    answer_minus_uniform: torch.Tensor  # nan without an answer
    answer_logit_gap: torch.Tensor  # nan without an answer
    answer_prob_scaled: torch.Tensor  # [scales, layers, B]; nan unless the answer is rank 1
    foil_prob: torch.Tensor  # nan without a foil
    echo_mass: torch.Tensor
    top_prompt_share: torch.Tensor
    nonfinite_logits: torch.Tensor  # bool
    last_kl_to_head_bits: torch.Tensor  # [B], last layer only
    last_temperature: torch.Tensor  # [B]
    last_kl_after_temperature_bits: torch.Tensor  # [B]
    # Filled by prompt_audit (they need every layer or the residuals):
    copy_strict: torch.Tensor | None = None  # [thresholds, layers, B] bool
    copy_soft: torch.Tensor | None = None  # [windows, layers, B] bool
    norm_only_semantics: torch.Tensor | None = None  # bool
    semantic_margin_ok: torch.Tensor | None = None  # bool
    semantic_strong: torch.Tensor | None = None  # bool
    cos_resid_answer: torch.Tensor | None = None  # nan without an answer
    cos_resid_prompt_max: torch.Tensor | None = None  # nan without an eligible prompt token
    nonfinite: torch.Tensor | None = None  # bool: residual or logits
    resid_norm_ratio: torch.Tensor | None = None  # nan at layer 0


@dataclass
class PromptAudit:
    """Per prompt [B]: first layers (int64, -1 for never) and summaries of the audit."""

    L_copy_strict: torch.Tensor  # [thresholds, B]
    L_copy_soft: torch.Tensor  # [windows, B]
    L_cos: torch.Tensor  # [cos milestones, B]
    L_kl: torch.Tensor  # [kl milestones, B]
    L_rank: torch.Tensor  # [rank milestones, B]
    L_semantic_margin: torch.Tensor
    L_semantic_strong: torch.Tensor
    L_semantic_raw: torch.Tensor
    L_semantic_confirmed: torch.Tensor
    L_semantic_margin_scaled: torch.Tensor  # [scales, B]
    L_semantic_strong_scaled: torch.Tensor  # [scales, B]
    gates_stable: torch.Tensor  # bool
    L_control_wins: torch.Tensor
    L_answer_over_echo: torch.Tensor
    L_geom_crossover: torch.Tensor
    n_norm_only_layers: torch.Tensor
    L_norm_only_first: torch.Tensor
    kl_norm_raw_max_bits: torch.Tensor
    frac_layers_kl_ge_1: torch.Tensor
    frac_layers_kl_ge_half: torch.Tensor
    js_p50_bits: torch.Tensor
    l1_p50: torch.Tensor
    jaccard_p50: torch.Tensor
    lens_artefact_score: torch.Tensor  # in [0, 1]
    n_nonfinite_layers: torch.Tensor
    max_resid_norm_ratio: torch.Tensor
    # Which lens backed L_semantic within +-window layers (bool [B]); tuned: None until a tuned
    # lens was decoded in the same pass (confirm_with_tuned).
    confirmed_raw: torch.Tensor
    confirmed_tuned: torch.Tensor | None = None


def unique_ids(ids: torch.Tensor) -> torch.Tensor:
    """[B, T] ids, -1 padded -> the same shape with each row's repeats set to -1 (sorted)."""
    if ids.shape[-1] == 0:
        return ids
    s = ids.sort(dim=-1).values
    repeat = torch.zeros_like(s, dtype=torch.bool)
    repeat[:, 1:] = s[:, 1:] == s[:, :-1]
    return s.masked_fill(repeat, -1)


def logit_agreement(
    logits: torch.Tensor, final_logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """cosine(row logits, the model's final logits) and whether a logit is NaN or inf, for
    [n, V] logits of one prompt and its final logits [V] (read before the logits are shifted)."""
    lens_norm = torch.linalg.vector_norm(logits, dim=-1)  # inf / nan where a logit is
    dots = torch.mv(logits, final_logits)
    final_norm = torch.linalg.vector_norm(final_logits)
    cos = dots / (lens_norm * final_norm).clamp_min(torch.finfo(torch.float32).tiny)
    # Logits below ~1e-19 square to zero in the norms (not in the dot): keep cos in [-1, 1].
    return cos.clamp_(-1.0, 1.0), ~torch.isfinite(lens_norm)


def rows_audit(
    norm: SoftmaxRows,
    raw_logits: torch.Tensor,
    raw_probs: torch.Tensor,
    scratch: torch.Tensor,
    spare: torch.Tensor,
    cos_to_final: torch.Tensor,
    lens_nonfinite: torch.Tensor,
    head_log_probs: torch.Tensor | None,
    answer_rank: torch.Tensor,
    entropy_bits: torch.Tensor,
    answer_id: torch.Tensor,
    foil_id: torch.Tensor,
    echo_ids: torch.Tensor,
    rule: AuditRule,
) -> AuditRows:
    """The audit of m consecutive layers' next-token rows of one prompt; fields [m, 1].

    norm: the lens decode (``softmax_rows``, top-k of at least rule.jaccard_k or the
    vocabulary); raw_logits [m, V]: the raw decode (shifted in place); raw_probs, scratch,
    spare: [m, V] float32 buffers (overwritten); cos_to_final / lens_nonfinite [m] from
    ``logit_agreement``; head_log_probs [1, V]: the model head's log-probs when the last row is
    the last layer (its consistency check), else None; answer_rank / entropy_bits [m] of the
    lens; answer_id / foil_id [1] (-1: none); echo_ids [1, T] distinct prompt ids eligible as
    echoes (-1 padded).
    """
    m, vocab = norm.shifted.shape
    k = min(rule.jaccard_k, norm.top_ids.shape[1])
    answer = answer_id.expand(m)
    has_answer = answer >= 0
    safe_answer = answer.clamp_min(0).unsqueeze(-1)
    nan = torch.full((m,), math.nan, device=norm.shifted.device)

    # Gates: margin over uniform, logit gap to the best other token, and under rescaled logits.
    answer_logp = norm.log_probs_at(safe_answer).squeeze(-1)
    top_logp, top_ids = norm.top_log_probs, norm.top_ids
    top1_is_answer = top_ids[:, 0] == answer
    rival = torch.where(top1_is_answer, top_logp[:, 1], top_logp[:, 0])
    gap = torch.where(has_answer, answer_logp - rival, nan)  # log-prob gaps are logit gaps
    minus_uniform = torch.where(has_answer, answer_logp.exp() - 1.0 / vocab, nan)
    scaled = torch.full((len(rule.gate_scales), m), math.nan, device=nan.device)
    at_top = ((answer_rank == 1) & has_answer).nonzero(as_tuple=True)[0]
    if at_top.numel():
        # softmax(s z) = softmax(s log p): the rows' log-probs, rescaled.
        rows = norm.shifted[at_top] - norm.log_norm[at_top].unsqueeze(-1)
        ans = answer_logp[at_top]
        for i, s in enumerate(rule.gate_scales):
            scaled[i, at_top] = torch.exp(s * ans - torch.logsumexp(rows * s, dim=-1))

    # Surface: mass on the prompt's own tokens, their share of the top mass, the foil.
    echo_idx = echo_ids.clamp_min(0).expand(m, -1)
    echo = norm.probs.gather(-1, echo_idx).masked_fill_(echo_ids < 0, 0.0).sum(dim=-1)
    norm_top = top_ids[:, :k]
    top_p = top_logp[:, :k].exp()
    in_prompt = (norm_top.unsqueeze(-1) == echo_ids.view(1, 1, -1)).any(dim=-1)
    share = (top_p * in_prompt).sum(dim=-1) / top_p.sum(dim=-1)
    foil_p = norm.probs.gather(-1, foil_id.clamp_min(0).expand(m).unsqueeze(-1)).squeeze(-1)
    foil = torch.where(foil_id >= 0, foil_p, nan)
    if head_log_probs is None:
        last_kl = last_t = last_after = nan[:1]
    else:
        last = norm.shifted[-1:] - norm.log_norm[-1:].unsqueeze(-1)
        last_kl, last_t, last_after = fit_temperature(last, head_log_probs, rule)

    # Raw lens: its own softmax, rank and top-k, then its divergences from the lens. Every
    # [m, V] step writes into one of the given buffers: a fresh one costs more than the
    # arithmetic in it. Terms are formed before the sums; nansum drops 0 * inf (p = 0).
    nonfinite = lens_nonfinite | ~torch.isfinite(torch.linalg.vector_norm(raw_logits, dim=-1))
    raw = softmax_rows(raw_logits, raw_probs, scratch, k)
    raw_answer = raw.shifted.gather(-1, safe_answer).squeeze(-1)
    raw_answer_logp = raw_answer - raw.log_norm
    raw_rank = 1 + count_above(raw.shifted, raw.top_shifted, raw_answer)
    raw_top_ids = raw.top_ids[:, :k]
    p_n, p_r = norm.probs, raw.probs
    ln_n, ln_r = norm.log_norm.unsqueeze(-1), raw.log_norm.unsqueeze(-1)
    kl_nr = torch.sub(norm.shifted, raw.shifted, out=scratch).sub_(ln_n - ln_r)
    kl_nr = kl_nr.mul_(p_n).nansum(dim=-1)
    log_mid = torch.add(p_n, p_r, out=spare).mul_(0.5).log_()
    js_n = torch.sub(norm.shifted, log_mid, out=scratch).sub_(ln_n).mul_(p_n).nansum(dim=-1)
    js_r = torch.sub(raw.shifted, log_mid, out=scratch).sub_(ln_r).mul_(p_r).nansum(dim=-1)
    l1 = torch.sub(p_n, p_r, out=scratch).abs_().sum(dim=-1).clamp_max(2.0)
    entropy_raw = raw.entropy_nats / LN2
    inter = (norm_top.unsqueeze(-1) == raw_top_ids.unsqueeze(-2)).any(dim=-1).sum(dim=-1)
    jaccard = inter.float() / (norm_top.shape[-1] + raw_top_ids.shape[-1] - inter).float()

    def col(x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(-1)

    return AuditRows(
        p_top5=col(top_logp[:, : rule.top_mass_k].exp().sum(dim=-1)),
        cos_to_final=col(cos_to_final),
        answer_prob_raw=col(torch.where(has_answer, raw_answer_logp.exp(), nan)),
        answer_rank_raw=col(torch.where(has_answer, raw_rank, torch.full_like(raw_rank, -1))),
        top1_id_raw=col(raw_top_ids[:, 0]),
        entropy_raw_bits=col(entropy_raw),
        entropy_gap_bits=col(entropy_bits - entropy_raw),
        kl_norm_raw_bits=col((kl_nr / LN2).clamp_min(0.0)),
        js_norm_raw_bits=col((0.5 * (js_n + js_r) / LN2).clamp(0.0, 1.0)),
        l1_norm_raw=col(l1),
        jaccard_top_raw_norm=col(jaccard),
        answer_minus_uniform=col(minus_uniform),
        answer_logit_gap=col(gap),
        answer_prob_scaled=col(scaled),
        foil_prob=col(foil),
        echo_mass=col(echo),
        top_prompt_share=col(share),
        nonfinite_logits=col(nonfinite),
        last_kl_to_head_bits=last_kl,
        last_temperature=last_t,
        last_kl_after_temperature_bits=last_after,
    )


def stack_layers(parts: list[AuditRows]) -> AuditRows:
    """One prompt's ``rows_audit`` parts, in layer order -> one AuditRows [layers, 1]; the
    last-layer fields come from the last part."""
    if len(parts) == 1:
        return parts[0]
    out: dict[str, torch.Tensor | None] = {}
    for f in fields(AuditRows):
        values = [getattr(p, f.name) for p in parts]
        if values[0] is None:
            out[f.name] = None
        elif f.name.startswith("last_"):
            out[f.name] = values[-1]
        else:
            out[f.name] = torch.cat(values, dim=-2)
    return AuditRows(**out)  # type: ignore[arg-type]


def _xlogy_diff_sum(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum_v p_v (log p_v - log q_v) in nats; a term is 0 where p_v is 0."""
    terms = torch.sub(log_p, log_q).mul_(p)
    return terms.masked_fill_(~(p > 0), 0.0).sum(dim=-1)


def fit_temperature(
    lens_log_probs: torch.Tensor, head_log_probs: torch.Tensor, rule: AuditRule
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KL(lens || head) at the last layer, the s in [0.1, 10] minimising KL(softmax(z / s) ||
    head) and that KL, per row of [B, V] log-probs. Rows already within
    ``rule.temperature_search_above_bits`` keep s = 1 (no search: it would not move)."""

    def kl_at(s: torch.Tensor, rows: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        q = torch.log_softmax(rows / s.unsqueeze(-1), dim=-1)
        return (_xlogy_diff_sum(q.exp(), q, head) / LN2).clamp_min(0.0)

    ones = torch.ones(lens_log_probs.shape[0], device=lens_log_probs.device)
    kl = kl_at(ones, lens_log_probs, head_log_probs)
    best_s, best_kl = ones.clone(), kl.clone()
    search = (kl > rule.temperature_search_above_bits).nonzero(as_tuple=True)[0]
    if search.numel():
        rows, head = lens_log_probs[search], head_log_probs[search]
        # A coarse log-spaced grid, then golden-section search around its best point.
        grid = torch.logspace(-1, 1, 21, device=rows.device)
        kls = torch.stack([kl_at(s.expand(len(search)), rows, head) for s in grid])
        i = kls.argmin(dim=0)
        lo = torch.log(grid[(i - 1).clamp_min(0)])
        hi = torch.log(grid[(i + 1).clamp_max(len(grid) - 1)])
        inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
        for _ in range(12):
            a, b = hi - inv_phi * (hi - lo), lo + inv_phi * (hi - lo)
            left = kl_at(a.exp(), rows, head) <= kl_at(b.exp(), rows, head)
            hi, lo = torch.where(left, b, hi), torch.where(left, lo, a)
        s = ((lo + hi) / 2).exp()
        kl_s = kl_at(s, rows, head)
        grid_best = kls.min(dim=0).values
        use_grid = grid_best < kl_s
        best_s[search] = torch.where(use_grid, grid[i], s)
        best_kl[search] = torch.minimum(kl_s, grid_best)
    return kl, best_s, best_kl


def soft_copy_flags(
    top1: torch.Tensor, p1: torch.Tensor, prompt_ids: torch.Tensor, rule: AuditRule
) -> torch.Tensor:
    """[windows, layers, B]: the top-1 ids of the last k layers, in order, are k consecutive
    prompt tokens, and p1 > rule.soft_threshold at this layer (a layer < k - 1 has no window).

    prompt_ids [B, T]: the prompt in order, with padding and tokens that may not count as a
    copy (BOS, whitespace, punctuation) set to -1: no window runs through those.
    """
    n_layers, batch = top1.shape
    out = torch.zeros((len(rule.soft_windows), n_layers, batch), dtype=torch.bool, device=p1.device)
    t = prompt_ids.shape[1]
    for w, k in enumerate(rule.soft_windows):
        if k > n_layers or k > t:
            continue
        # windows[l, b, j] = top1[l - k + 1 + j, b] for l >= k - 1; grams[b, i, j] = ids[b, i + j]
        windows = top1.unfold(0, k, 1)  # [layers - k + 1, B, k]
        grams = prompt_ids.unfold(1, k, 1)  # [B, T - k + 1, k]
        valid = (grams >= 0).all(dim=-1)  # no padding inside a prompt k-gram
        match = (windows.unsqueeze(2) == grams.unsqueeze(0)).all(dim=-1) & valid.unsqueeze(0)
        out[w, k - 1 :] = match.any(dim=-1)
    return out & (p1 > rule.soft_threshold).unsqueeze(0)


def strict_copy_flags(
    top1: torch.Tensor,
    p1: torch.Tensor,
    p2: torch.Tensor,
    echo_ids: torch.Tensor,
    rule: AuditRule,
) -> torch.Tensor:
    """[thresholds, layers, B]: top-1 is an eligible prompt id, p1 > t, p1 - p2 > margin."""
    in_prompt = (top1.unsqueeze(-1) == echo_ids.unsqueeze(0)).any(dim=-1) & (top1 >= 0)
    margin = (p1 - p2) > rule.strict_margin
    return torch.stack([in_prompt & margin & (p1 > t) for t in rule.strict_thresholds])


def artefact_score(
    frac_kl_ge_1: torch.Tensor,
    any_norm_only: torch.Tensor,
    max_kl_bits: torch.Tensor,
    js_p50_bits: torch.Tensor,
    l1_p50: torch.Tensor,
) -> torch.Tensor:
    """0.6 frac(KL >= 1 bit) + 0.3 [any norm-only semantics] + 0.1 min(1, max KL / 5 bits)
    + 0.1 min(1, median JS / 0.1 bit) + 0.05 min(1, median L1 / 0.5), clipped to [0, 1]."""
    score = (
        0.6 * frac_kl_ge_1
        + 0.3 * any_norm_only.float()
        + 0.1 * (max_kl_bits / 5.0).clamp(0.0, 1.0)
        + 0.1 * (js_p50_bits / 0.1).clamp(0.0, 1.0)
        + 0.05 * (l1_p50 / 0.5).clamp(0.0, 1.0)
    )
    return score.clamp(0.0, 1.0)


def _strong(margin_ok: torch.Tensor, gap: torch.Tensor, rule: AuditRule) -> torch.Tensor:
    """Margin and top-2 gap hold here and at the next layer (never at the last layer)."""
    here = margin_ok & (gap >= rule.top2_gap_logits)
    out = torch.zeros_like(here)
    out[:-1] = here[:-1] & here[1:]
    return out


def prompt_audit(
    rows: AuditRows,
    answer_prob: torch.Tensor,
    answer_rank: torch.Tensor,
    kl_to_final_bits: torch.Tensor,
    top_ids: torch.Tensor,
    top_probs: torch.Tensor,
    l_semantic: torch.Tensor,
    prompt_ids: torch.Tensor,
    echo_ids: torch.Tensor,
    normed_next: torch.Tensor,
    resid_next: torch.Tensor,
    W_U: torch.Tensor,
    answer_ids: torch.Tensor,
    rule: AuditRule,
) -> PromptAudit:
    """Fills the cross-layer fields of ``rows`` and returns the per-prompt audit.

    answer_prob / answer_rank / kl_to_final_bits [layers, B] and top_ids / top_probs
    [layers, B, >= 2] are the lens's next-token stats; l_semantic [B] its L_semantic;
    prompt_ids [B, T] the prompt in order with non-copyable tokens -1 (soft copy); echo_ids
    [B, T] the distinct copyable ids (strict copy, geometry);
    normed_next / resid_next [layers, B, d] the normalised and raw next-token residuals.
    """
    batch = answer_rank.shape[1]
    vocab = W_U.shape[1]
    top1, p1, p2 = top_ids[..., 0], top_probs[..., 0], top_probs[..., 1]
    has_answer = (answer_ids >= 0).view(1, batch)
    rows.copy_strict = strict_copy_flags(top1, p1, p2, echo_ids, rule)
    rows.copy_soft = soft_copy_flags(top1, p1, prompt_ids, rule)
    rank1 = (answer_rank == 1) & has_answer
    raw_rank1 = rows.answer_rank_raw == 1
    # Not at the last layer: there the normalised lens is the model's own head, not an artefact.
    rows.norm_only_semantics = rank1 & ~raw_rank1
    rows.norm_only_semantics[-1] = False
    rows.semantic_margin_ok = rank1 & (rows.answer_minus_uniform >= rule.uniform_margin)
    rows.semantic_strong = _strong(rows.semantic_margin_ok, rows.answer_logit_gap, rule)

    # Geometry: the normalised residual against the answer's and the prompt tokens' columns.
    x = torch.nn.functional.normalize(normed_next.float(), dim=-1)  # [layers, B, d]
    cols = torch.nn.functional.normalize(W_U[:, answer_ids.clamp_min(0)].T, dim=-1)  # [B, d]
    cos_answer = (x * cols.unsqueeze(0)).sum(dim=-1)
    rows.cos_resid_answer = torch.where(
        has_answer, cos_answer, torch.full_like(cos_answer, math.nan)
    )
    echo_cols = W_U[:, echo_ids.clamp_min(0).reshape(-1)].T.reshape(*echo_ids.shape, -1)
    echo_cols = torch.nn.functional.normalize(echo_cols, dim=-1)  # [B, T, d]
    cos_prompt = torch.einsum("lbd,btd->lbt", x, echo_cols)
    cos_prompt = cos_prompt.masked_fill((echo_ids < 0).unsqueeze(0), -math.inf).amax(dim=-1)
    rows.cos_resid_prompt_max = torch.where(
        torch.isfinite(cos_prompt), cos_prompt, torch.full_like(cos_prompt, math.nan)
    )

    # Numeric health of the residual stream.
    resid = resid_next.float()
    finite_resid = torch.isfinite(resid).all(dim=-1)
    rows.nonfinite = rows.nonfinite_logits | ~finite_resid
    norms = torch.linalg.vector_norm(resid, dim=-1)
    ratio = torch.full_like(norms, math.nan)
    ratio[1:] = norms[1:] / norms[:-1]
    rows.resid_norm_ratio = ratio

    # Gates under rescaled logits: rank is unchanged, the margin and the gap are not.
    margin_scaled, strong_scaled = [], []
    for i, s in enumerate(rule.gate_scales):
        ok = rank1 & (rows.answer_prob_scaled[i] - 1.0 / vocab >= rule.uniform_margin)
        margin_scaled.append(first_true_layer(ok))
        strong_scaled.append(first_true_layer(_strong(ok, s * rows.answer_logit_gap, rule)))
    l_margin = first_true_layer(rows.semantic_margin_ok)
    l_strong = first_true_layer(rows.semantic_strong)
    margin_scaled_t = torch.stack(margin_scaled)
    strong_scaled_t = torch.stack(strong_scaled)
    stable = (margin_scaled_t == l_margin).all(dim=0) & (strong_scaled_t == l_strong).all(dim=0)

    # L_semantic confirmed by the raw lens within +-window layers (and later by a tuned lens).
    confirmed = confirmed_by(l_semantic, raw_rank1, rule.confirm_window)
    l_confirmed = torch.where(confirmed, l_semantic, torch.full_like(l_semantic, -1))

    kl_nr = rows.kl_norm_raw_bits
    norm_only_any = rows.norm_only_semantics.any(dim=0)
    js_p50 = torch.quantile(rows.js_norm_raw_bits, 0.5, dim=0)
    l1_p50 = torch.quantile(rows.l1_norm_raw, 0.5, dim=0)
    frac_ge_1 = (kl_nr >= 1.0).float().mean(dim=0)
    max_kl = kl_nr.amax(dim=0)

    return PromptAudit(
        L_copy_strict=torch.stack([first_true_layer(f) for f in rows.copy_strict]),
        L_copy_soft=torch.stack([first_true_layer(f) for f in rows.copy_soft]),
        L_cos=torch.stack([first_true_layer(rows.cos_to_final >= c) for c in rule.cos_milestones]),
        L_kl=torch.stack([first_true_layer(kl_to_final_bits <= c) for c in rule.kl_milestones]),
        L_rank=torch.stack(
            [first_true_layer((answer_rank <= r) & has_answer) for r in rule.rank_milestones]
        ),
        L_semantic_margin=l_margin,
        L_semantic_strong=l_strong,
        L_semantic_raw=first_true_layer(raw_rank1),
        L_semantic_confirmed=l_confirmed,
        L_semantic_margin_scaled=margin_scaled_t,
        L_semantic_strong_scaled=strong_scaled_t,
        gates_stable=stable,
        L_control_wins=first_true_layer(answer_prob > rows.foil_prob),
        L_answer_over_echo=first_true_layer(answer_prob > rows.echo_mass),  # nan: never
        L_geom_crossover=first_true_layer(rows.cos_resid_answer > rows.cos_resid_prompt_max),
        n_norm_only_layers=rows.norm_only_semantics.sum(dim=0),
        L_norm_only_first=first_true_layer(rows.norm_only_semantics),
        kl_norm_raw_max_bits=max_kl,
        frac_layers_kl_ge_1=frac_ge_1,
        frac_layers_kl_ge_half=(kl_nr >= 0.5).float().mean(dim=0),
        js_p50_bits=js_p50,
        l1_p50=l1_p50,
        jaccard_p50=torch.quantile(rows.jaccard_top_raw_norm, 0.5, dim=0),
        lens_artefact_score=artefact_score(frac_ge_1, norm_only_any, max_kl, js_p50, l1_p50),
        n_nonfinite_layers=rows.nonfinite.sum(dim=0),
        max_resid_norm_ratio=torch.nan_to_num(rows.resid_norm_ratio, nan=-math.inf).amax(dim=0),
        confirmed_raw=confirmed,
    )


def confirmed_by(l_semantic: torch.Tensor, rank1: torch.Tensor, window: int) -> torch.Tensor:
    """bool [B]: another lens has the answer at rank 1 ([layers, B]) within +-window layers of
    L_semantic ([B], -1 for never)."""
    layer = torch.arange(rank1.shape[0], device=rank1.device).unsqueeze(1)
    near = (layer - l_semantic.unsqueeze(0)).abs() <= window
    return (l_semantic >= 0) & (rank1 & near).any(dim=0)


def confirm_with_tuned(
    audit: PromptAudit,
    l_semantic: torch.Tensor,
    tuned_answer_rank: torch.Tensor,
    answer_ids: torch.Tensor,
    window: int,
) -> None:
    """Adds the tuned lens as a second confirming lens (the seed's rule): L_semantic_confirmed
    is L_semantic when the raw or the tuned lens ([layers, B] answer ranks) has the answer at
    rank 1 within +-window layers of it. Not at the last layer: there the tuned lens is the
    final-norm lens by construction (its map is the identity), so it would confirm itself."""
    rank1 = (tuned_answer_rank == 1) & (answer_ids >= 0).view(1, -1)
    rank1[-1] = False
    tuned = confirmed_by(l_semantic, rank1, window)
    audit.confirmed_tuned = tuned
    audit.L_semantic_confirmed = torch.where(
        audit.confirmed_raw | tuned, l_semantic, torch.full_like(l_semantic, -1)
    )


def cat_rows(parts: list[AuditRows]) -> AuditRows:
    """Chunks of prompts -> one AuditRows, along the batch dim (always each tensor's last)."""
    if len(parts) == 1:
        return parts[0]
    out: dict[str, torch.Tensor | None] = {}
    for f in fields(AuditRows):
        values = [getattr(p, f.name) for p in parts]
        out[f.name] = None if values[0] is None else torch.cat(values, dim=-1)
    return AuditRows(**out)  # type: ignore[arg-type]
