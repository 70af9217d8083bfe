"""A plain float64 reference of the logit lens, written from the formulas.

It shares no code with ``lens_kernel``: every quantity is computed row by row with numpy in
float64, the way a reader would check it by hand. Inputs are numpy arrays (cast to float64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LN2 = math.log(2.0)


@dataclass(frozen=True)
class RefNorm:
    """One norm: kind 'layernorm' or 'rmsnorm', weight/bias [d] or None, eps, weight offset."""

    kind: str
    weight: np.ndarray | None
    bias: np.ndarray | None
    eps: float
    offset: float = 0.0


@dataclass(frozen=True)
class RefUnembed:
    """logits = cap * tanh((x @ W + b) / cap), the cap step only when cap is not None."""

    W: np.ndarray  # [d, V]
    b: np.ndarray | None = None  # [V]
    cap: float | None = None


def layernorm(x, weight, bias, eps):
    """(x - mean) / sqrt(var + eps) * weight + bias, with the biased variance."""
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    mean = sum(float(v) for v in x) / n
    var = sum((float(v) - mean) ** 2 for v in x) / n
    y = (x - mean) / math.sqrt(var + eps)
    if weight is not None:
        y = y * np.asarray(weight, dtype=np.float64)
    if bias is not None:
        y = y + np.asarray(bias, dtype=np.float64)
    return y


def rmsnorm(x, weight, eps, offset=0.0):
    """x / sqrt(mean(x^2) + eps) * (offset + weight); eps inside the square root."""
    x = np.asarray(x, dtype=np.float64)
    ms = sum(float(v) ** 2 for v in x) / x.shape[0]
    y = x / math.sqrt(ms + eps)
    if weight is not None:
        y = y * (offset + np.asarray(weight, dtype=np.float64))
    return y


def apply_norm(x, norm: RefNorm | None, keep_bias: bool = True):
    """The reference norm of one residual vector; None is the identity (raw lens)."""
    if norm is None:
        return np.asarray(x, dtype=np.float64)
    if norm.kind == "layernorm":
        weight = None if norm.weight is None else norm.offset + np.asarray(norm.weight, np.float64)
        return layernorm(x, weight, norm.bias if keep_bias else None, norm.eps)
    if norm.kind == "rmsnorm":
        return rmsnorm(x, norm.weight, norm.eps, norm.offset)
    raise ValueError(f"unknown norm kind {norm.kind!r}")


def norm_plan(mode: str, n_layers: int, final, ln1, ln2=None, pre_norm: bool = True) -> list:
    """Which norm decodes lens layer 0..n_layers under each lens mode.

    raw applies no norm at all; the KL / parity reference is decoded separately (next_token).
    """
    if mode == "raw":
        return [None for _ in range(n_layers + 1)]
    if mode == "final":
        return [final for _ in range(n_layers + 1)]
    if mode == "next_ln1":
        blocks = ln1 if pre_norm else ln2
        return [blocks[i] for i in range(n_layers)] + [final]
    raise ValueError(mode)


def unembed(x, spec: RefUnembed):
    """Logits [V] of one normalised vector [d]."""
    z = np.asarray(x, dtype=np.float64) @ np.asarray(spec.W, dtype=np.float64)
    if spec.b is not None:
        z = z + np.asarray(spec.b, dtype=np.float64)
    if spec.cap is not None:
        z = spec.cap * np.tanh(z / spec.cap)
    return z


def log_softmax(z):
    """z_v - log sum_u exp(z_u), shifted by max(z) for stability."""
    z = np.asarray(z, dtype=np.float64)
    m = float(np.max(z))
    return z - m - math.log(sum(math.exp(float(v) - m) for v in z))


def entropy_bits(logp) -> float:
    """-sum_v p_v log2 p_v, zero-probability terms count 0."""
    total = 0.0
    for lp in logp:
        p = math.exp(lp)
        if p > 0:
            total -= p * lp
    return total / LN2


def top_k(probs, k: int):
    """(ids, probs) of the k most probable tokens, descending (ties: lower id first)."""
    order = sorted(range(len(probs)), key=lambda v: (-probs[v], v))[:k]
    return np.array(order, dtype=np.int64), np.array([probs[v] for v in order])


def rest_mass(top_probs) -> float:
    return 1.0 - float(sum(top_probs))


def answer_prob(probs, answer_id: int) -> float:
    return float(probs[answer_id]) if answer_id >= 0 else math.nan


def answer_rank(probs, answer_id: int) -> int:
    """1 + the number of tokens strictly more probable than the answer; -1 without answer."""
    if answer_id < 0:
        return -1
    pa = probs[answer_id]
    return 1 + sum(1 for p in probs if p > pa)


def kl_bits(logp, logq) -> float:
    """sum_v p_v (log2 p_v - log2 q_v)."""
    total = 0.0
    for lp, lq in zip(logp, logq, strict=True):
        p = math.exp(lp)
        if p > 0:
            total += p * (lp - lq)
    return total / LN2


def copy_collapse(top1: int, p1: float, p2: float, prompt_ids, threshold, margin) -> bool:
    """Top-1 is one of the prompt's ids, p1 > threshold and p1 - p2 > margin."""
    in_prompt = any(int(t) == top1 for t in prompt_ids if int(t) >= 0)
    return in_prompt and p1 > threshold and (p1 - p2) > margin


def entropy_collapse(h_bits: float, limit_bits: float = 1.0) -> bool:
    return h_bits <= limit_bits


def is_answer(top1: int, answer_id: int) -> bool:
    return answer_id >= 0 and top1 == answer_id


def first_layer(flags) -> int:
    """The first index whose flag holds; -1 where none does."""
    for i, f in enumerate(flags):
        if f:
            return i
    return -1


def collapse_summary(copy_flags, entropy_flags, answer_flags) -> dict:
    """L_copy, L_copy_H, L_semantic and delta_layers (None unless both L_copy and L_semantic)."""
    l_copy = first_layer(copy_flags)
    l_copy_h = first_layer(entropy_flags)
    l_sem = first_layer(answer_flags)
    delta = l_sem - l_copy if (l_copy >= 0 and l_sem >= 0) else None
    return {"L_copy": l_copy, "L_copy_H": l_copy_h, "L_semantic": l_sem, "delta_layers": delta}


@dataclass
class RefRow:
    """Everything the lens reports about one decoded residual vector."""

    logp: np.ndarray  # [V] float64 log-probabilities
    entropy_bits: float
    top_ids: np.ndarray
    top_probs: np.ndarray
    rest_mass: float


def decode(x, norm: RefNorm | None, spec: RefUnembed, k: int, keep_bias: bool = True) -> RefRow:
    logp = log_softmax(unembed(apply_norm(x, norm, keep_bias), spec))
    probs = np.exp(logp)
    ids, tp = top_k(probs, k)
    return RefRow(logp, entropy_bits(logp), ids, tp, rest_mass(tp))


@dataclass
class RefNextToken:
    """Next-token metrics; every list is indexed [layer][prompt]."""

    rows: list
    answer_prob: list
    answer_rank: list
    kl_bits: list
    copy_collapse: list
    entropy_collapse: list
    is_answer: list
    summary: list  # per prompt: collapse_summary(...)


_PLAN_LAST = object()


def next_token(
    resid_next,
    plan,
    spec: RefUnembed,
    answer_ids,
    prompt_ids,
    k: int,
    threshold: float = 0.90,
    margin: float = 0.05,
    entropy_limit_bits: float = 1.0,
    keep_bias: bool = True,
    final=_PLAN_LAST,
) -> RefNextToken:
    """The lens at each prompt's next-token position; resid_next is [layers, B, d].

    The KL reference is the last layer decoded with ``final`` (the model's final norm, bias always
    kept), or with the plan's last norm when ``final`` is not given.
    """
    n_layers, batch = resid_next.shape[0], resid_next.shape[1]
    out = RefNextToken([], [], [], [], [], [], [], [])
    if final is _PLAN_LAST:
        finals = [decode(resid_next[-1, b], plan[-1], spec, k, keep_bias) for b in range(batch)]
    else:
        finals = [decode(resid_next[-1, b], final, spec, k, True) for b in range(batch)]
    for layer in range(n_layers):
        fields = [[] for _ in range(7)]
        for b in range(batch):
            row = decode(resid_next[layer, b], plan[layer], spec, max(k, 2), keep_bias)
            probs = np.exp(row.logp)
            top1, p1, p2 = int(row.top_ids[0]), float(row.top_probs[0]), float(row.top_probs[1])
            ans = int(answer_ids[b])
            ids, tp = row.top_ids[:k], row.top_probs[:k]
            shown = RefRow(row.logp, row.entropy_bits, ids, tp, rest_mass(tp))
            values = (
                shown,
                answer_prob(probs, ans),
                answer_rank(probs, ans),
                kl_bits(row.logp, finals[b].logp),
                copy_collapse(top1, p1, p2, prompt_ids[b], threshold, margin),
                entropy_collapse(row.entropy_bits, entropy_limit_bits),
                is_answer(top1, ans),
            )
            for field, value in zip(fields, values, strict=True):
                field.append(value)
        out.rows.append(fields[0])
        out.answer_prob.append(fields[1])
        out.answer_rank.append(fields[2])
        out.kl_bits.append(fields[3])
        out.copy_collapse.append(fields[4])
        out.entropy_collapse.append(fields[5])
        out.is_answer.append(fields[6])
    for b in range(batch):
        out.summary.append(
            collapse_summary(
                [out.copy_collapse[i][b] for i in range(n_layers)],
                [out.entropy_collapse[i][b] for i in range(n_layers)],
                [out.is_answer[i][b] for i in range(n_layers)],
            )
        )
    return out


def all_positions(resid_all, positions, plan, spec: RefUnembed, k: int, keep_bias: bool = True):
    """[(prompt, layer, pos, RefRow)] for every requested position, prompt- then layer-major."""
    n_layers, batch, seq = resid_all.shape[0], resid_all.shape[1], resid_all.shape[2]
    rows = []
    for b in range(batch):
        for layer in range(n_layers):
            for t in range(seq):
                if positions[b, t]:
                    row = decode(resid_all[layer, b, t], plan[layer], spec, k, keep_bias)
                    rows.append((b, layer, t, row))
    return rows


# The lens-artefact audit (lens_kernel.audit), from its definitions: every quantity for one
# residual vector of one prompt at one layer, every first layer by scanning the layers.


@dataclass(frozen=True)
class RefAuditRule:
    """The audit's thresholds, written down again (a test checks they match the kernel's)."""

    strict_thresholds: tuple = (0.70, 0.80, 0.90, 0.95)
    strict_margin: float = 0.10
    soft_threshold: float = 0.33
    soft_windows: tuple = (1, 2, 3)
    uniform_margin: float = 0.002
    top2_gap_logits: float = 0.5
    confirm_window: int = 2
    jaccard_k: int = 50
    top_mass_k: int = 5
    cos_milestones: tuple = (0.2, 0.4, 0.6)
    kl_milestones: tuple = (1.0, 0.5)
    rank_milestones: tuple = (10, 5, 1)
    gate_scales: tuple = (0.9, 1.1)
    temperature_search_above_bits: float = 1e-3


def js_bits(logp, logq) -> float:
    """0.5 KL(p || m) + 0.5 KL(q || m) with m = (p + q) / 2; in [0, 1] bits."""
    total = 0.0
    for lp, lq in zip(logp, logq, strict=True):
        p, q = math.exp(lp), math.exp(lq)
        log_m = math.log(0.5 * (p + q)) if p + q > 0 else 0.0
        if p > 0:
            total += 0.5 * p * (lp - log_m)
        if q > 0:
            total += 0.5 * q * (lq - log_m)
    return total / LN2


def l1_distance(logp, logq) -> float:
    """sum_v |p_v - q_v|, in [0, 2]."""
    return sum(abs(math.exp(lp) - math.exp(lq)) for lp, lq in zip(logp, logq, strict=True))


def jaccard(ids_a, ids_b) -> float:
    """|A & B| / |A | B| of two id sets."""
    a, b = {int(i) for i in ids_a}, {int(i) for i in ids_b}
    return len(a & b) / len(a | b)


def cosine(a, b) -> float:
    """a . b / (|a| |b|)."""
    dot = sum(float(x) * float(y) for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(float(x) ** 2 for x in a) * sum(float(y) ** 2 for y in b))


def vector_norm(x) -> float:
    return math.sqrt(sum(float(v) ** 2 for v in x))


def norm_ratio(x, prev) -> float:
    """|x| / |prev|: inf where only prev is zero, nan where both are."""
    a, b = vector_norm(x), vector_norm(prev)
    if b == 0:
        return math.nan if a == 0 else math.inf
    return a / b


def logit_gap(logp, answer_id: int) -> float:
    """The answer's logit minus the best other token's (log-probs differ from logits by a
    constant, so their gap is the same number)."""
    return float(logp[answer_id]) - max(float(v) for i, v in enumerate(logp) if i != answer_id)


def scaled_prob(logits, answer_id: int, scale: float) -> float:
    """p(answer) under softmax(scale * logits)."""
    return math.exp(log_softmax(scale * np.asarray(logits, dtype=np.float64))[answer_id])


def eligible(ids) -> set:
    """The distinct ids of a -1 padded list."""
    return {int(i) for i in ids if int(i) >= 0}


def echo_mass(logp, echo_ids) -> float:
    """Probability on the distinct eligible prompt ids, each id counted once."""
    return sum(math.exp(logp[i]) for i in eligible(echo_ids))


def top_prompt_share(logp, top_ids, echo_ids) -> float:
    """Of the probability on the top ids, the part on eligible prompt ids."""
    ok = eligible(echo_ids)
    total = sum(math.exp(logp[int(i)]) for i in top_ids)
    return sum(math.exp(logp[int(i)]) for i in top_ids if int(i) in ok) / total


def strict_copy(top1: int, p1: float, p2: float, echo_ids, threshold, margin) -> bool:
    """Top-1 is an eligible prompt id, p1 > threshold and p1 - p2 > margin."""
    return top1 in eligible(echo_ids) and p1 > threshold and (p1 - p2) > margin


def soft_copy(top1_by_layer, p1: float, layer: int, k: int, prompt_ids, threshold) -> bool:
    """The top-1 ids of layers layer-k+1 .. layer are, in order, k consecutive prompt tokens
    (none of them -1), and p1 > threshold at this layer."""
    if layer < k - 1 or not p1 > threshold:
        return False
    window = [int(t) for t in top1_by_layer[layer - k + 1 : layer + 1]]
    ids = [int(t) for t in prompt_ids]
    grams = (ids[i : i + k] for i in range(len(ids) - k + 1))
    return any(gram == window and min(gram) >= 0 for gram in grams)


def median(values) -> float:
    """The middle value, or the mean of the two middle ones."""
    v = sorted(float(x) for x in values)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def artefact_score(frac_kl_ge_1, any_norm_only, max_kl_bits, js_p50_bits, l1_p50) -> float:
    """0.6 frac(KL >= 1) + 0.3 [norm-only] + 0.1 min(1, max KL / 5) + 0.1 min(1, JS50 / 0.1)
    + 0.05 min(1, L1_50 / 0.5), clipped to [0, 1]."""
    score = (
        0.6 * frac_kl_ge_1
        + 0.3 * (1.0 if any_norm_only else 0.0)
        + 0.1 * min(1.0, max_kl_bits / 5.0)
        + 0.1 * min(1.0, js_p50_bits / 0.1)
        + 0.05 * min(1.0, l1_p50 / 0.5)
    )
    return min(1.0, max(0.0, score))


def _kl_at_temperature(lens_logp, head_logp, s: float) -> float:
    """KL(softmax(z / s) || head) in bits, with numpy sums (the temperature grid evaluates it
    thousands of times)."""
    z = lens_logp / s
    logq = z - z.max() - math.log(float(np.sum(np.exp(z - z.max()))))
    q = np.exp(logq)
    keep = q > 0
    return float(np.sum(q[keep] * (logq[keep] - head_logp[keep]))) / LN2


def temperature_fit(lens_logp, head_logp, lo=0.1, hi=10.0, skip_below_bits=1e-3, n_grid=2001):
    """(KL(lens || head), s, KL at s): the s in [lo, hi] minimising KL(softmax(z / s) || head).

    A dense log-spaced grid, then golden-section search between the best point's neighbours.
    At or below skip_below_bits there is no search: s = 1.
    """
    lens_logp = np.asarray(lens_logp, dtype=np.float64)
    head_logp = np.asarray(head_logp, dtype=np.float64)

    def kl_at(s: float) -> float:
        return _kl_at_temperature(lens_logp, head_logp, s)

    kl1 = kl_bits(lens_logp, head_logp)
    if kl1 <= skip_below_bits:
        return kl1, 1.0, kl1
    grid = np.exp(np.linspace(math.log(lo), math.log(hi), n_grid))
    kls = [kl_at(float(s)) for s in grid]
    i = int(np.argmin(kls))
    a, b = math.log(grid[max(i - 1, 0)]), math.log(grid[min(i + 1, n_grid - 1)])
    inv_phi = (math.sqrt(5.0) - 1.0) / 2.0
    for _ in range(60):
        c, d = b - inv_phi * (b - a), a + inv_phi * (b - a)
        if kl_at(math.exp(c)) <= kl_at(math.exp(d)):
            b = d
        else:
            a = c
    s = math.exp(0.5 * (a + b))
    kl_s, s = min((kl_at(s), s), (kls[i], float(grid[i])))
    return kl1, s, kl_s


def audit_prompt(
    x_layers,
    plan,
    spec: RefUnembed,
    answer_id: int,
    echo_ids,
    foil_id: int,
    head_logits=None,
    keep_bias: bool = True,
    final=_PLAN_LAST,
    rule: RefAuditRule | None = None,
) -> tuple[dict, dict]:
    """The audit of one prompt from its next-token residuals x_layers [layers, d].

    echo_ids [T]: the prompt in order, non-copyable tokens -1 (soft copy reads it in order;
    strict copy, echo mass, the top share and geometry read its distinct ids).
    head_logits [V]: the model head's logits (default: the final logits, the last layer decoded
    with ``final``, bias kept, or with the plan's last norm).
    Returns (rows, summary): rows maps a field to a list over layers ([lead][layers] for the
    stacks answer_prob_scaled / copy_strict / copy_soft; a number for last_*), summary maps
    each per-prompt field to a number (or a list over milestones).
    """
    rule = rule or RefAuditRule()
    xs = np.asarray(x_layers, dtype=np.float64)
    n_layers = xs.shape[0]
    W = np.asarray(spec.W, dtype=np.float64)
    vocab = W.shape[1]
    ans, foil, has = int(answer_id), int(foil_id), int(answer_id) >= 0
    nan = math.nan
    if final is _PLAN_LAST:
        final_logits = unembed(apply_norm(xs[-1], plan[-1], keep_bias), spec)
    else:
        final_logits = unembed(apply_norm(xs[-1], final, True), spec)
    final_logp = log_softmax(final_logits)
    prompt_cols = [W[:, i] for i in sorted(eligible(echo_ids))]

    r: dict = {}

    def add(name, value):
        r.setdefault(name, []).append(value)

    for layer, x in enumerate(xs):
        normed = apply_norm(x, plan[layer], keep_bias)
        logits = unembed(normed, spec)
        raw_logits = unembed(x, spec)  # the raw lens: no norm at all
        logp, raw_logp = log_softmax(logits), log_softmax(raw_logits)
        probs, raw_probs = np.exp(logp), np.exp(raw_logp)
        ids, top_p = top_k(probs, max(rule.jaccard_k, rule.top_mass_k, 2))
        raw_ids, _ = top_k(raw_probs, rule.jaccard_k)
        top_ids = ids[: rule.jaccard_k]
        # The lens's own next-token stats, which the gates read.
        add("top1", int(ids[0]))
        add("p1", float(top_p[0]))
        add("kl_to_final_bits", kl_bits(logp, final_logp))
        add("answer_prob", answer_prob(probs, ans))
        add("answer_rank", answer_rank(probs, ans))
        # Agreement with the model's output and the raw lens.
        add("p_top5", float(sum(top_p[: rule.top_mass_k])))
        add("cos_to_final", cosine(logits, final_logits))
        add("top1_id_raw", int(raw_ids[0]))
        add("entropy_raw_bits", entropy_bits(raw_logp))
        add("entropy_gap_bits", entropy_bits(logp) - entropy_bits(raw_logp))
        add("kl_norm_raw_bits", kl_bits(logp, raw_logp))
        add("js_norm_raw_bits", js_bits(logp, raw_logp))
        add("l1_norm_raw", l1_distance(logp, raw_logp))
        add("jaccard_top_raw_norm", jaccard(top_ids, raw_ids))
        # Surface: the prompt's own tokens and the foil.
        add("foil_prob", float(probs[foil]) if foil >= 0 else nan)
        add("echo_mass", echo_mass(logp, echo_ids))
        add("top_prompt_share", top_prompt_share(logp, top_ids, echo_ids))
        add(
            "copy_strict",
            [
                strict_copy(int(ids[0]), top_p[0], top_p[1], echo_ids, t, rule.strict_margin)
                for t in rule.strict_thresholds
            ],
        )
        # Geometry and numeric health.
        cos_prompt = [cosine(normed, col) for col in prompt_cols]
        add("cos_resid_prompt_max", max(cos_prompt) if cos_prompt else nan)
        add("cos_resid_answer", cosine(normed, W[:, ans]) if has else nan)
        finite_logits = bool(np.isfinite(logits).all() and np.isfinite(raw_logits).all())
        add("nonfinite_logits", not finite_logits)
        add("nonfinite", not (finite_logits and np.isfinite(x).all()))
        add("resid_norm_ratio", norm_ratio(x, xs[layer - 1]) if layer > 0 else nan)
        # The answer under the raw lens, and the semantic gates.
        raw_rank = answer_rank(raw_probs, ans)
        rank1 = has and answer_rank(probs, ans) == 1
        add("answer_prob_raw", answer_prob(raw_probs, ans))
        add("answer_rank_raw", raw_rank)
        add("answer_minus_uniform", float(probs[ans]) - 1.0 / vocab if has else nan)
        add("answer_logit_gap", logit_gap(logp, ans) if has else nan)
        # Never at the last layer: there the normalised lens is the model's own head.
        add("norm_only_semantics", rank1 and raw_rank != 1 and layer < n_layers - 1)
        add("semantic_margin_ok", rank1 and float(probs[ans]) - 1.0 / vocab >= rule.uniform_margin)
        add(
            "answer_prob_scaled",
            [scaled_prob(logits, ans, s) if rank1 else nan for s in rule.gate_scales],
        )
        if layer == n_layers - 1:
            head = final_logits if head_logits is None else head_logits
            kl1, s, kl_s = temperature_fit(
                logp, log_softmax(head), skip_below_bits=rule.temperature_search_above_bits
            )
            r["last_kl_to_head_bits"], r["last_temperature"] = kl1, s
            r["last_kl_after_temperature_bits"] = kl_s

    for name in ("copy_strict", "answer_prob_scaled"):
        r[name] = [list(column) for column in zip(*r[name], strict=True)]  # -> [lead][layers]
    r["copy_soft"] = [
        [
            soft_copy(r["top1"], r["p1"][i], i, k, echo_ids, rule.soft_threshold)
            for i in range(n_layers)
        ]
        for k in rule.soft_windows
    ]
    r["semantic_strong"] = _strong(
        [
            ok and gap >= rule.top2_gap_logits
            for ok, gap in zip(r["semantic_margin_ok"], r["answer_logit_gap"], strict=True)
        ]
    )
    return r, _summary(r, ans, foil >= 0, vocab, rule)


def _strong(here) -> list:
    """A gate is strong at a layer if it holds there and at the next (so never at the last)."""
    return [bool(h and i + 1 < len(here) and here[i + 1]) for i, h in enumerate(here)]


def _summary(r: dict, answer_id: int, has_foil: bool, vocab: int, rule: RefAuditRule) -> dict:
    """Per-prompt first layers and summaries of one prompt's per-layer audit ``r``."""
    layers = range(len(r["top1"]))
    has = answer_id >= 0
    rank, p_answer = r["answer_rank"], r["answer_prob"]
    rank1 = [has and rank[i] == 1 for i in layers]
    raw_rank1 = [has and r["answer_rank_raw"][i] == 1 for i in layers]
    l_semantic = first_layer([has and r["top1"][i] == answer_id for i in layers])  # the lens's
    near = [i for i in layers if abs(i - l_semantic) <= rule.confirm_window]
    confirmed = l_semantic >= 0 and any(raw_rank1[i] for i in near)
    out: dict = {
        "L_copy_strict": [first_layer(flags) for flags in r["copy_strict"]],
        "L_copy_soft": [first_layer(flags) for flags in r["copy_soft"]],
        "L_cos": [first_layer([c >= m for c in r["cos_to_final"]]) for m in rule.cos_milestones],
        "L_kl": [first_layer([k <= m for k in r["kl_to_final_bits"]]) for m in rule.kl_milestones],
        "L_rank": [first_layer([has and k <= m for k in rank]) for m in rule.rank_milestones],
        "L_semantic_margin": first_layer(r["semantic_margin_ok"]),
        "L_semantic_strong": first_layer(r["semantic_strong"]),
        "L_semantic_raw": first_layer(raw_rank1),
        "L_semantic_confirmed": l_semantic if confirmed else -1,
        "confirmed_raw": confirmed,
    }

    # The gates again with the logits scaled by s: p(answer) from softmax(s z), the gap times s.
    margins, strongs = [], []
    for p_scaled, s in zip(r["answer_prob_scaled"], rule.gate_scales, strict=True):
        ok = [rank1[i] and p_scaled[i] - 1.0 / vocab >= rule.uniform_margin for i in layers]
        here = [ok[i] and s * r["answer_logit_gap"][i] >= rule.top2_gap_logits for i in layers]
        margins.append(first_layer(ok))
        strongs.append(first_layer(_strong(here)))
    out["L_semantic_margin_scaled"] = margins
    out["L_semantic_strong_scaled"] = strongs
    out["gates_stable"] = all(m == out["L_semantic_margin"] for m in margins) and all(
        s == out["L_semantic_strong"] for s in strongs
    )

    # Comparisons with nan (no answer, no foil, no eligible prompt token) never hold.
    wins = [has and has_foil and p_answer[i] > r["foil_prob"][i] for i in layers]
    over_echo = [has and p_answer[i] > r["echo_mass"][i] for i in layers]
    cos_a, cos_p = r["cos_resid_answer"], r["cos_resid_prompt_max"]
    cross = [has and not math.isnan(cos_p[i]) and cos_a[i] > cos_p[i] for i in layers]
    out["L_control_wins"] = first_layer(wins)
    out["L_answer_over_echo"] = first_layer(over_echo)
    out["L_geom_crossover"] = first_layer(cross)
    norm_only = r["norm_only_semantics"]
    out["n_norm_only_layers"] = sum(1 for f in norm_only if f)
    out["L_norm_only_first"] = first_layer(norm_only)

    kl_nr = r["kl_norm_raw_bits"]
    frac_ge_1 = sum(1 for k in kl_nr if k >= 1.0) / len(kl_nr)
    js_p50, l1_p50 = median(r["js_norm_raw_bits"]), median(r["l1_norm_raw"])
    out["kl_norm_raw_max_bits"] = max(kl_nr)
    out["frac_layers_kl_ge_1"] = frac_ge_1
    out["frac_layers_kl_ge_half"] = sum(1 for k in kl_nr if k >= 0.5) / len(kl_nr)
    out["js_p50_bits"] = js_p50
    out["l1_p50"] = l1_p50
    out["jaccard_p50"] = median(r["jaccard_top_raw_norm"])
    out["lens_artefact_score"] = artefact_score(
        frac_ge_1, any(norm_only), max(kl_nr), js_p50, l1_p50
    )
    out["n_nonfinite_layers"] = sum(1 for f in r["nonfinite"] if f)
    ratios = [v for v in r["resid_norm_ratio"] if not math.isnan(v)]
    out["max_resid_norm_ratio"] = max(ratios) if ratios else -math.inf
    return out


def audit(
    resid_next,
    plan,
    spec: RefUnembed,
    answer_ids,
    echo_ids,
    foil_ids,
    head_logits=None,
    keep_bias: bool = True,
    final=_PLAN_LAST,
    rule: RefAuditRule | None = None,
) -> tuple[dict, dict]:
    """``audit_prompt`` for each prompt of resid_next [layers, B, d], as arrays with the prompt
    last: rows[field] is [layers, B] ([lead, layers, B] for the stacks, [B] for last_*),
    summary[field] is [B] ([milestones, B])."""
    resid_next = np.asarray(resid_next, dtype=np.float64)
    per_prompt = [
        audit_prompt(
            resid_next[:, b],
            plan,
            spec,
            int(answer_ids[b]),
            echo_ids[b],
            int(foil_ids[b]),
            None if head_logits is None else head_logits[b],
            keep_bias,
            final,
            rule,
        )
        for b in range(resid_next.shape[1])
    ]

    def stack(parts: list) -> dict:
        return {
            k: np.moveaxis(np.array([p[k] for p in parts], dtype=np.float64), 0, -1)
            for k in parts[0]
        }

    return stack([r for r, _ in per_prompt]), stack([s for _, s in per_prompt])
