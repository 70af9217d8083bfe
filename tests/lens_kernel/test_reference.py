"""lens_pass against the plain float64 reference, over lens modes, norms, unembeds and chunkings."""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import lens_kernel.lens as lens_module
from lens_kernel import (
    CollapseRule,
    LensInputs,
    LensOutputs,
    NormSpec,
    UnembedSpec,
    build_norm_plan,
    lens_pass,
)

from . import reference64 as ref

# float32 kernel vs float64 reference. A probability's relative error is the absolute error of
# its log, about eps32 * |logit|, so the planted logits below stay within |z| < ~11; the worst
# case then uses about two thirds of RTOL. Small probabilities get one float32 eps absolute.
RTOL = 1e-6
PROB_ATOL = float(torch.finfo(torch.float32).eps)
BITS_ATOL = 1e-6  # entropies and KL near zero
MASS_ATOL = 1e-6  # rest mass is 1 - sum(top-k), an absolute quantity
TIE = 1e-5  # reference values closer than this are treated as tied: ids and flags not compared

HOT = 10.0  # logit a planted direction gives its hot token (times the normalised component)
SHIFT = 0.5  # planted rows also lower every logit alike (a softmax no-op) to keep |z| small


DEFAULT_RULE = CollapseRule()
LOOSE = CollapseRule(copy_threshold=0.5, copy_margin=0.1, entropy_collapse_bits=2.5)


@dataclass(frozen=True)
class Case:
    name: str
    mode: str
    norm_kind: str = "layernorm"
    keep_bias: bool = True
    with_beta: bool = True  # layernorm has a bias vector at all
    offset: float = 0.0  # weight offset; 1.0 is Gemma's (1 + w) RMSNorm
    softcap: float | None = None
    unembed_bias: bool = False
    pre_norm: bool = True
    top_k: int = 5
    rule: CollapseRule = DEFAULT_RULE
    seed: int = 0


CASES = [
    Case("final-ln", "final", keep_bias=True, unembed_bias=True, seed=1),
    Case("final-ln-dropbias-cap", "final", keep_bias=False, softcap=3.0, seed=2),
    Case("final-ln-nobeta", "final", with_beta=False, unembed_bias=True, top_k=1, seed=3),
    Case("final-rms", "final", norm_kind="rmsnorm", unembed_bias=True, seed=4),
    Case("final-rms-gemma-cap", "final", norm_kind="rmsnorm", offset=1.0, softcap=3.0, seed=5),
    Case("next-ln-pre", "next_ln1", unembed_bias=True, top_k=20, seed=6),
    Case("next-ln-pre-dropbias-cap", "next_ln1", keep_bias=False, softcap=30.0, seed=7),
    Case("next-ln-post", "next_ln1", pre_norm=False, unembed_bias=True, seed=8),
    Case("next-ln-post-dropbias", "next_ln1", pre_norm=False, keep_bias=False, seed=9),
    Case("next-rms-pre", "next_ln1", norm_kind="rmsnorm", rule=LOOSE, seed=10),
    Case("next-rms-gemma-cap", "next_ln1", norm_kind="rmsnorm", offset=1.0, softcap=30.0, seed=11),
    Case(
        "next-rms-post-gemma", "next_ln1", norm_kind="rmsnorm", offset=1.0, pre_norm=False, seed=12
    ),
    Case("raw-bias", "raw", unembed_bias=True, top_k=20, seed=13),
    Case("raw-cap", "raw", softcap=3.0, rule=LOOSE, seed=14),
]


@dataclass
class Built:
    n_blocks: int
    vocab: int
    kernel_plan: list
    ref_plan: list
    final_kernel: NormSpec
    final_ref: ref.RefNorm
    unembed: UnembedSpec
    ref_unembed: ref.RefUnembed
    resid_next: torch.Tensor  # [layers, B, d]
    resid_all: torch.Tensor  # [layers, B, T, d]
    positions: torch.Tensor  # [B, T] bool
    prompt_ids: torch.Tensor  # [B, T] -1 padded
    answer_ids: torch.Tensor  # [B]


def _norm_pair(case: Case, g: torch.Generator, d: int, eps: float):
    """A random norm of the case's kind as (kernel NormSpec, reference RefNorm)."""
    if case.offset:  # Gemma stores w with the scale being (1 + w), so w is small
        weight = 0.3 * torch.randn(d, generator=g)
    else:
        weight = 1.0 + 0.3 * torch.randn(d, generator=g)
    bias = None
    if case.norm_kind == "layernorm" and case.with_beta:
        bias = 0.2 * torch.randn(d, generator=g)
    spec = NormSpec(case.norm_kind, weight, bias, eps, weight_offset=case.offset)
    as64 = None if bias is None else bias.double().numpy()
    return spec, ref.RefNorm(case.norm_kind, weight.double().numpy(), as64, eps, case.offset)


@functools.cache
def build(case: Case) -> Built:
    """Seeded random model pieces and residuals, with planted copy and answer directions."""
    rnd = random.Random(case.seed)
    g = torch.Generator().manual_seed(case.seed)
    vocab, d = rnd.choice([50, 97, 300]), rnd.choice([8, 16, 32])
    n_blocks, batch, seq = rnd.randint(3, 5), rnd.randint(2, 4), rnd.randint(3, 6)
    layers = n_blocks + 1

    final_k, final_r = _norm_pair(case, g, d, 1e-5)
    ln1 = [_norm_pair(case, g, d, 1e-6) for _ in range(n_blocks)]
    ln2 = [_norm_pair(case, g, d, 1e-5) for _ in range(n_blocks)]
    kernel_plan = build_norm_plan(
        case.mode, n_blocks, final_k, [k for k, _ in ln1], [k for k, _ in ln2], case.pre_norm
    )
    ref_plan = ref.norm_plan(
        case.mode, n_blocks, final_r, [r for _, r in ln1], [r for _, r in ln2], case.pre_norm
    )

    # Two "hot" tokens read off basis directions 0 and 1, so a residual pointing there makes
    # them the confident top-1 (copy / answer); direction 2 lowers every logit alike; the rest
    # of the vocabulary is random.
    hot_copy, hot_answer = 3, 7
    W_U = torch.randn(d, vocab, generator=g) / math.sqrt(d)
    W_U[:, [hot_copy, hot_answer]] = 0.0
    W_U[0, hot_copy] = W_U[1, hot_answer] = HOT / math.sqrt(d)
    W_U[2, :] = -HOT / math.sqrt(d)
    b_U = 0.3 * torch.randn(vocab, generator=g) if case.unembed_bias else None
    unembed = UnembedSpec(W_U, b_U, case.softcap)
    ref_unembed = ref.RefUnembed(
        W_U.double().numpy(), None if b_U is None else b_U.double().numpy(), case.softcap
    )

    resid_all = 0.7 * torch.randn(layers, batch, seq, d, generator=g) + 0.3  # [layers, B, T, d]
    resid_all[..., 2] = 0.3  # the shift direction is planted only
    positions = torch.ones(batch, seq, dtype=torch.bool)
    prompt_ids = torch.randint(10, vocab, (batch, seq), generator=g)
    # Ragged prompts: prompt 1 left-padded, prompt 2 right-padded, prompt 3 with a hole.
    if batch > 1:
        positions[1, :2] = False
    if batch > 2:
        positions[2, -1] = False
    if batch > 3:
        positions[3, 1] = False
    prompt_ids[~positions] = -1
    last = torch.tensor([int(positions[b].nonzero().max()) for b in range(batch)])
    resid_next = resid_all[:, torch.arange(batch), last].clone()  # [layers, B, d]

    # Prompt 0 copies hot_copy (it is in its prompt) from layer 1, then answers from mid-depth.
    mid = max(2, layers // 2 + 1)
    prompt_ids[0, 0] = hot_copy
    resid_next[1:mid, 0, 0] += math.sqrt(d)
    resid_next[mid:, 0, 1] += math.sqrt(d)
    resid_next[1:, 0, 2] += SHIFT * math.sqrt(d)
    # Prompt 1 drifts towards the answer without copying; prompt 2 has no answer.
    if batch > 1:
        resid_next[2:, 1, 1] += 0.6 * math.sqrt(d)
        resid_next[2:, 1, 2] += 0.6 * SHIFT * math.sqrt(d)
    answer_ids = torch.tensor([hot_answer, hot_answer, -1, 11][:batch])
    resid_all[:, torch.arange(batch), last] = resid_next
    return Built(
        n_blocks,
        vocab,
        kernel_plan,
        ref_plan,
        final_k,
        final_r,
        unembed,
        ref_unembed,
        resid_next,
        resid_all,
        positions,
        prompt_ids,
        answer_ids,
    )


@functools.cache
def reference(case: Case):
    b = build(case)
    rule = case.rule
    nxt = ref.next_token(
        b.resid_next.double().numpy(),
        b.ref_plan,
        b.ref_unembed,
        b.answer_ids.tolist(),
        b.prompt_ids.tolist(),
        case.top_k,
        rule.copy_threshold,
        rule.copy_margin,
        rule.entropy_collapse_bits,
        case.keep_bias,
        final=b.final_ref,
    )
    rows = ref.all_positions(
        b.resid_all.double().numpy(),
        b.positions.numpy(),
        b.ref_plan,
        b.ref_unembed,
        case.top_k,
        case.keep_bias,
    )
    return nxt, rows


def run_kernel(case: Case, chunk_rows: int | None, all_positions: bool) -> LensOutputs:
    b = build(case)
    inputs = LensInputs(
        b.resid_next,
        b.prompt_ids,
        b.answer_ids,
        resid_all=b.resid_all if all_positions else None,
        positions=b.positions if all_positions else None,
    )
    # The kernel budgets four float32 [rows, V] buffers per chunk, so this gives chunk_rows rows.
    kwargs = {} if chunk_rows is None else {"chunk_bytes": chunk_rows * 4 * b.vocab}
    return lens_pass(
        inputs, b.kernel_plan, b.unembed, case.top_k, case.rule, case.keep_bias,
        final_norm=b.final_kernel, **kwargs,
    )  # fmt: skip


def _sorted_probs(logp: np.ndarray) -> np.ndarray:
    return np.sort(np.exp(logp))[::-1]


def _decisive_ranks(logp: np.ndarray, k: int) -> np.ndarray:
    """[k] bool: the j-th most probable token is separated from its neighbours by more than TIE."""
    p = _sorted_probs(logp)
    gaps = -np.diff(p)  # p_j - p_{j+1}
    before = np.concatenate([[np.inf], gaps])[:k]
    after = gaps[:k] if len(gaps) >= k else np.concatenate([gaps, [np.inf]])[:k]
    return (np.minimum(before, after) > TIE * p[:k]).astype(bool)


def assert_rows_match(ent, top_ids, top_probs, rest, rows: list) -> None:
    """Kernel row stats [n] / [n, k] against a list of reference rows."""
    assert ent.shape[0] == len(rows)
    np.testing.assert_allclose(ent.numpy(), [r.entropy_bits for r in rows], RTOL, BITS_ATOL)
    np.testing.assert_allclose(
        top_probs.numpy(), np.stack([r.top_probs for r in rows]), RTOL, PROB_ATOL
    )
    np.testing.assert_allclose(rest.numpy(), [r.rest_mass for r in rows], RTOL, MASS_ATOL)
    ref_ids = np.stack([r.top_ids for r in rows])
    decisive = np.stack([_decisive_ranks(r.logp, ref_ids.shape[1]) for r in rows])
    assert decisive.mean() > 0.9, "seeded data should be mostly untied"
    np.testing.assert_array_equal(top_ids.numpy()[decisive], ref_ids[decisive])


def _flag_decisive(row: ref.RefRow, rule: CollapseRule) -> tuple[bool, bool, bool]:
    """Whether the reference's copy / entropy / answer flags are far from their thresholds."""
    p = _sorted_probs(row.logp)
    p1, p2 = p[0], p[1]
    top1_clear = p1 - p2 > TIE
    copy = top1_clear and abs(p1 - rule.copy_threshold) > TIE
    copy = copy and abs(p1 - p2 - rule.copy_margin) > TIE
    entropy = abs(row.entropy_bits - rule.entropy_collapse_bits) > TIE
    return copy, entropy, top1_clear


def assert_next_matches(case: Case, out: LensOutputs, expected: ref.RefNextToken) -> None:
    b = build(case)
    layers, batch = b.n_blocks + 1, b.answer_ids.shape[0]
    nxt = out.next
    assert nxt.rows.entropy_bits.shape == (layers, batch)
    assert nxt.rows.top_ids.shape == (layers, batch, case.top_k)
    flat = [expected.rows[i][j] for i in range(layers) for j in range(batch)]
    assert_rows_match(
        nxt.rows.entropy_bits.reshape(-1),
        nxt.rows.top_ids.reshape(layers * batch, -1),
        nxt.rows.top_probs.reshape(layers * batch, -1),
        nxt.rows.rest_mass.reshape(-1),
        flat,
    )
    np.testing.assert_allclose(
        nxt.answer_prob.numpy(), np.array(expected.answer_prob), RTOL, PROB_ATOL
    )  # nan == nan where no answer was given
    np.testing.assert_allclose(
        nxt.kl_to_final_bits.numpy(), np.array(expected.kl_bits), RTOL, BITS_ATOL
    )
    np.testing.assert_allclose(out.final_logits.numpy()[:, 0], _final_logit0(case), 1e-5, 1e-5)

    decisive = np.zeros((layers, batch, 3), dtype=bool)
    for i in range(layers):
        for j in range(batch):
            row = expected.rows[i][j]
            decisive[i, j] = _flag_decisive(row, case.rule)
            ans = int(b.answer_ids[j])
            if ans >= 0:
                others = np.delete(row.logp, ans)
                if np.min(np.abs(others - row.logp[ans])) > TIE:
                    assert int(nxt.answer_rank[i, j]) == expected.answer_rank[i][j]
            else:
                assert int(nxt.answer_rank[i, j]) == -1
                assert math.isnan(float(nxt.answer_prob[i, j]))
            if decisive[i, j, 0]:
                assert bool(nxt.copy_collapse[i, j]) == expected.copy_collapse[i][j]
            if decisive[i, j, 1]:
                assert bool(nxt.entropy_collapse[i, j]) == expected.entropy_collapse[i][j]
            if decisive[i, j, 2]:
                assert bool(nxt.is_answer[i, j]) == expected.is_answer[i][j]

    col = out.collapse
    for j, summary in enumerate(expected.summary):
        if decisive[:, j, 0].all():
            assert int(col.L_copy[j]) == summary["L_copy"]
        if decisive[:, j, 1].all():
            assert int(col.L_copy_H[j]) == summary["L_copy_H"]
        if decisive[:, j, 2].all():
            assert int(col.L_semantic[j]) == summary["L_semantic"]
        if decisive[:, j, 0].all() and decisive[:, j, 2].all():
            has = summary["delta_layers"] is not None
            assert bool(col.has_delta[j]) == has
            assert int(col.delta_layers[j]) == (summary["delta_layers"] if has else -1)


def _final_logit0(case: Case) -> np.ndarray:
    """Reference final-layer logit of token 0 for each prompt (spot check of final_logits)."""
    b = build(case)
    resid = b.resid_next.double().numpy()[-1]
    return np.array(
        [ref.unembed(ref.apply_norm(x, b.final_ref, True), b.ref_unembed)[0] for x in resid]
    )


def assert_all_rows_match(case: Case, out: LensOutputs, expected_rows: list) -> None:
    assert out.all_rows is not None
    got_order = list(
        zip(out.row_batch.tolist(), out.row_layer.tolist(), out.row_pos.tolist(), strict=True)
    )
    assert got_order == [(b, layer, t) for b, layer, t, _ in expected_rows]
    rows = out.all_rows
    assert_rows_match(
        rows.entropy_bits,
        rows.top_ids,
        rows.top_probs,
        rows.rest_mass,
        [r for *_, r in expected_rows],
    )


def _check_against_reference(case: Case, chunk_rows: int | None, next_only: bool = True) -> None:
    expected_next, expected_rows = reference(case)
    if next_only:
        out = run_kernel(case, chunk_rows, all_positions=False)
        assert out.all_rows is None and out.row_batch is None
        assert_next_matches(case, out, expected_next)

    out = run_kernel(case, chunk_rows, all_positions=True)
    assert_next_matches(case, out, expected_next)
    assert_all_rows_match(case, out, expected_rows)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_lens_pass_matches_float64_reference(case: Case) -> None:
    _check_against_reference(case, None)
    # 7-row chunks cut across prompts and layers (and give one prompt per next-token chunk).
    _check_against_reference(case, 7, next_only=False)


def test_planted_flags_are_not_vacuous() -> None:
    """Across the cases each flag is both True and False somewhere, so the comparisons bite."""
    seen = {name: set() for name in ("copy", "entropy", "answer", "L_copy", "L_semantic")}
    for case in CASES:
        nxt, _ = reference(case)
        for i in range(len(nxt.copy_collapse)):
            seen["copy"].update(nxt.copy_collapse[i])
            seen["entropy"].update(nxt.entropy_collapse[i])
            seen["answer"].update(nxt.is_answer[i])
        seen["L_copy"].update(s["L_copy"] >= 0 for s in nxt.summary)
        seen["L_semantic"].update(s["L_semantic"] >= 0 for s in nxt.summary)
    assert all(values == {True, False} for values in seen.values()), seen


def count_matmuls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The rows of every unembedding matmul from now on (the lens's reads of W_U), in order."""
    calls: list[int] = []
    real = UnembedSpec.__call__

    def counting(self, x, *args, **kwargs):
        calls.append(x.shape[0])
        return real(self, x, *args, **kwargs)

    monkeypatch.setattr(UnembedSpec, "__call__", counting)
    return calls


ONE_ROW_CASES = [c for c in CASES if c.name in ("final-rms-gemma-cap", "next-ln-pre", "raw-bias")]


@pytest.mark.parametrize("case", ONE_ROW_CASES, ids=[c.name for c in ONE_ROW_CASES])
def test_one_row_chunks_match_reference(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    """chunk_bytes too small for one row: the reference rows, each prompt's next-token rows and
    each all-positions row get a matmul of their own."""
    b = build(case)
    calls = count_matmuls(monkeypatch)
    _check_against_reference(case, 1)
    n_all = int(b.positions.sum()) * (b.n_blocks + 1)
    batch = b.answer_ids.shape[0]
    next_run = [batch] + [b.n_blocks + 1] * batch
    assert calls == next_run + next_run + [1] * n_all  # next-token only, then all positions


def test_one_matmul_when_everything_fits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Within the budget the reference, next-token and all-positions rows share one matmul (one
    read of W_U), and the results are the float64 reference's."""
    case = CASES[0]
    b = build(case)
    calls = count_matmuls(monkeypatch)
    _check_against_reference(case, None, next_only=False)
    batch, layers = b.answer_ids.shape[0], b.n_blocks + 1
    all_rows = int(b.positions.sum()) * layers
    assert calls == [batch + batch * layers + all_rows]


def test_positions_mask_selects_rows_in_prompt_layer_position_order() -> None:
    case = CASES[0]
    b = build(case)
    layers, batch, seq = b.n_blocks + 1, b.answer_ids.shape[0], b.positions.shape[1]
    positions = torch.zeros(batch, seq, dtype=torch.bool)
    positions[0, [2, 0]] = True  # set out of order: output still sorted by position
    positions[-1, -1] = True  # prompt(s) in between request nothing
    inputs = LensInputs(
        b.resid_next, b.prompt_ids, b.answer_ids, resid_all=b.resid_all, positions=positions
    )
    out = lens_pass(inputs, b.kernel_plan, b.unembed, case.top_k, keep_bias=case.keep_bias)
    expected = [(0, i, t) for i in range(layers) for t in (0, 2)]
    expected += [(batch - 1, i, seq - 1) for i in range(layers)]
    got = list(
        zip(out.row_batch.tolist(), out.row_layer.tolist(), out.row_pos.tolist(), strict=True)
    )
    assert got == expected
    assert out.all_rows.top_ids.shape == (len(expected), case.top_k)
    # Each returned row is the decode of exactly that (prompt, layer, position) residual.
    for r, (bi, layer, t) in enumerate(expected):
        row = ref.decode(
            b.resid_all[layer, bi, t].double().numpy(),
            b.ref_plan[layer],
            b.ref_unembed,
            case.top_k,
            case.keep_bias,
        )
        assert float(out.all_rows.entropy_bits[r]) == pytest.approx(
            row.entropy_bits, RTOL, BITS_ATOL
        )


def test_all_false_positions_mask_returns_empty_rows() -> None:
    """Regression: a batch requesting no positions crashed in torch.cat on an empty list."""
    case = CASES[0]
    b = build(case)
    positions = torch.zeros_like(b.positions)
    inputs = LensInputs(
        b.resid_next, b.prompt_ids, b.answer_ids, resid_all=b.resid_all, positions=positions
    )
    out = lens_pass(inputs, b.kernel_plan, b.unembed, case.top_k, chunk_bytes=1)
    assert out.all_rows.entropy_bits.shape == (0,)
    assert out.all_rows.top_ids.shape == (0, case.top_k)
    assert out.row_batch.numel() == out.row_layer.numel() == out.row_pos.numel() == 0


def test_mixed_norm_plan_with_shared_specs() -> None:
    """norm_rows groups rows by spec object: repeated, None and distinct specs in one plan."""
    case = CASES[0]
    b = build(case)
    a_k, a_r = b.kernel_plan[0], b.ref_plan[0]
    g = torch.Generator().manual_seed(99)
    d = b.resid_next.shape[-1]
    c_k, c_r = _norm_pair(Case("rms", "final", norm_kind="rmsnorm", offset=1.0), g, d, 1e-6)
    layers = b.n_blocks + 1
    kernel_plan = [[a_k, None, c_k][i % 3] for i in range(layers)]
    ref_plan = [[a_r, None, c_r][i % 3] for i in range(layers)]
    inputs = LensInputs(
        b.resid_next, b.prompt_ids, b.answer_ids, resid_all=b.resid_all, positions=b.positions
    )
    for chunk_bytes in (lens_module.DEFAULT_CHUNK_BYTES, 3 * 4 * b.vocab):
        out = lens_pass(inputs, kernel_plan, b.unembed, case.top_k, chunk_bytes=chunk_bytes)
        rows = ref.all_positions(
            b.resid_all.double().numpy(), b.positions.numpy(), ref_plan, b.ref_unembed, case.top_k
        )
        assert_all_rows_match(case, out, rows)


def test_layer_count_mismatch_raises() -> None:
    b = build(CASES[0])
    inputs = LensInputs(b.resid_next, b.prompt_ids, b.answer_ids)
    with pytest.raises(ValueError, match="norm plan"):
        lens_pass(inputs, b.kernel_plan[:-1], b.unembed)


def test_resid_all_without_positions_raises() -> None:
    b = build(CASES[0])
    inputs = LensInputs(b.resid_next, b.prompt_ids, b.answer_ids, resid_all=b.resid_all)
    with pytest.raises(ValueError, match="positions"):
        lens_pass(inputs, b.kernel_plan, b.unembed)
