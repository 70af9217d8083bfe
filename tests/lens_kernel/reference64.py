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
