"""The raw-precision bench's pure parts: the raw-lens metrics against a direct float64
computation, the comparison, the bf16 decode and the float32 refinement. No models."""

from __future__ import annotations

import math

import pytest
import torch

from bench.audit_bench import parse_args
from bench.raw_precision import (
    CONTINUOUS,
    DISCRETE,
    VARIANTS,
    ModelReport,
    bf16_product,
    compare,
    conclusion,
    raw_metrics,
    refine,
    refine_ids,
    render,
)
from lens_kernel import UnembedSpec

INF = math.inf


def direct(zn: list[float], zr: list[float], answer: int, top: int) -> dict[str, float]:
    """The metrics of one row with Python floats, term by term."""

    def log_probs(z: list[float]) -> list[float]:
        m = max(z)
        log_norm = m + math.log(sum(math.exp(v - m) for v in z if v > -INF))
        return [v - log_norm if v > -INF else -INF for v in z]

    ln, lr = log_probs(zn), log_probs(zr)
    pn, pr = [math.exp(v) for v in ln], [math.exp(v) for v in lr]
    lm = [math.log(0.5 * (a + b)) if a + b > 0 else -INF for a, b in zip(pn, pr, strict=True)]

    def p_log_ratio(p: list[float], a: list[float], b: list[float]) -> float:
        return sum(pi * (ai - bi) for pi, ai, bi in zip(p, a, b, strict=True) if pi > 0)

    def top_set(z: list[float]) -> set[int]:
        return set(sorted(range(len(z)), key=lambda i: -z[i])[:top])

    inter = len(top_set(zn) & top_set(zr))
    return {
        "entropy_bits": -sum(p * v for p, v in zip(pr, lr, strict=True) if p > 0) / math.log(2),
        "kl_bits": p_log_ratio(pn, ln, lr) / math.log(2),
        "js_bits": 0.5 * (p_log_ratio(pn, ln, lm) + p_log_ratio(pr, lr, lm)) / math.log(2),
        "l1": sum(abs(a - b) for a, b in zip(pn, pr, strict=True)),
        "p_answer": pr[answer],
        "jaccard": inter / (2 * top - inter),
        "top1": max(range(len(zr)), key=lambda i: zr[i]),
        "rank": 1 + sum(v > zr[answer] for v in zr),
    }


def test_metrics_match_a_direct_float64_computation():
    g = torch.Generator().manual_seed(3)
    zn = torch.randn(6, 9, generator=g) * 3
    zr = torch.randn(6, 9, generator=g) * 5
    zr[1, 4] = -INF  # raw alone rules a token out: KL(norm || raw) is infinite, JS is not
    zn[2, 7] = zr[2, 7] = -INF  # both do: it adds nothing
    zn[3], zr[3] = torch.randn(9, generator=g) * 1e4, torch.randn(9, generator=g) * 1e4
    zr[4] = zr[4] * 1e3 + 2e4  # huge and shifted: probabilities underflow to exactly 0
    answer = torch.tensor([0, 3, 5, 8, 2, 6])
    got = raw_metrics(zn, zr, answer, top=3, chunk=4)  # two chunks
    for row in range(6):
        want = direct(zn[row].double().tolist(), zr[row].double().tolist(), int(answer[row]), 3)
        for k in CONTINUOUS:
            assert float(got[k][row]) == pytest.approx(want[k], rel=1e-9, abs=1e-12), (row, k)
        for k in DISCRETE:
            assert int(got[k][row]) == want[k], (row, k)
    assert math.isinf(float(got["kl_bits"][1])) and math.isfinite(float(got["js_bits"][1]))
    assert float(got["js_bits"].max()) <= 1.0 + 1e-12 and float(got["l1"].max()) <= 2.0 + 1e-12


def test_identical_logits_give_zero_errors():
    g = torch.Generator().manual_seed(0)
    zn, zr = torch.randn(5, 80, generator=g), torch.randn(5, 80, generator=g) * 20
    zr[0, 3] = -INF  # an infinite KL equal on both sides is no error
    answer = torch.randint(0, 80, (5,), generator=g)
    errors = compare(raw_metrics(zn, zr, answer), raw_metrics(zn, zr.clone(), answer))
    assert errors == dict.fromkeys((*CONTINUOUS, *DISCRETE, "rank_shift", "rank_head"), 0)


def test_swapping_logits_changes_exactly_the_expected_ranks_and_top1():
    zr = torch.arange(10, 0, -1).float().repeat(4, 1)  # id i has rank i + 1 in every row
    zn = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))
    answer = torch.tensor([2, 1, 5, 7])
    swapped = zr.clone()
    for row, (i, j) in enumerate([(2, 4), (0, 1), (0, 3)]):
        swapped[row, [i, j]] = swapped[row, [j, i]]
    # row 0: the answer drops from 3rd to 5th; row 1: it becomes the top-1; row 2: another
    # token becomes the top-1, the answer keeps its rank; row 3: untouched.
    ref, got = raw_metrics(zn, zr, answer, top=3), raw_metrics(zn, swapped, answer, top=3)
    assert ref["rank"].tolist() == [3, 2, 6, 8] and got["rank"].tolist() == [5, 1, 6, 8]
    assert got["top1"].tolist() == [0, 1, 3, 0]
    errors = compare(ref, got)
    assert (errors["top1"], errors["rank"], errors["rank_shift"]) == (2, 2, 2)
    assert errors["rank_head"] == 2  # both changed ranks are <= 256
    assert errors["entropy_bits"] < 1e-12  # a permutation keeps the raw entropy
    assert errors["p_answer"] > 0.1 and errors["kl_bits"] > 0.1


def test_an_answer_id_is_required():
    with pytest.raises(ValueError, match="answer"):
        raw_metrics(torch.zeros(2, 5), torch.zeros(2, 5), torch.tensor([1, -1]))


def dyadic(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """+-j / 512 with 256 <= j < 512: 9 significant bits, so bf16 (8) rounds the odd ones, while
    a product (18 bits) and a sum of 8 of them stay exact in float32 in any order."""
    g = torch.Generator().manual_seed(seed)
    j = torch.randint(256, 512, shape, generator=g).float()
    return j / 512 * (torch.randint(0, 2, shape, generator=g).float() * 2 - 1)


def test_bf16_product_is_bf16_operands_with_a_float32_result():
    x, w = dyadic((3, 8), 0), dyadic((8, 40), 1)
    spec = UnembedSpec(W_U=w)
    exact = (x.bfloat16().double() @ w.bfloat16().double()).float()  # 16-bit products: exact
    assert torch.equal(bf16_product(x, spec), exact)
    assert not torch.equal(exact, spec.reference(x))  # and bf16 did round something


@pytest.mark.parametrize(("bias", "softcap"), [(False, None), (True, 5.0)])
def test_refine_makes_the_refined_ids_float32_and_leaves_the_rest(bias, softcap):
    x, w = dyadic((5, 8), 3), dyadic((8, 40), 4)
    spec = UnembedSpec(W_U=w, b_U=dyadic((40,), 5) * 8 if bias else None, softcap=softcap)
    ref, product = spec.reference(x), bf16_product(x, spec)
    ids = torch.randint(0, 40, (5, 6), generator=torch.Generator().manual_seed(6))
    ids[0, 1] = ids[0, 0]  # a repeated id is recomputed alike
    fast = spec._finish(product.clone())
    refined = spec._finish(refine(product, x, spec, ids, chunk=2))
    picked = torch.zeros_like(ref, dtype=torch.bool).scatter_(1, ids, True)
    assert bool((fast[picked] != ref[picked]).any())  # there was something to fix
    if softcap is None:  # exact sums: float32 in any order is the reference bit for bit
        assert torch.equal(refined[picked], ref[picked])
    else:  # tanh may run its vector or its scalar path: an ulp or so
        torch.testing.assert_close(refined[picked], ref[picked], rtol=1e-6, atol=1e-6)
    assert torch.equal(refined[~picked], fast[~picked])


def test_refine_ids_are_both_top_ks_and_the_answer():
    raw = torch.tensor([[5.0, 1.0, 4.0, 0.0, 3.0]])
    norm = torch.tensor([[0.0, 9.0, 1.0, 8.0, 2.0]])
    ids = refine_ids(raw, norm, torch.tensor([3]), 2)
    assert ids.shape == (1, 5) and sorted(ids[0, :2].tolist()) == [0, 2]
    assert sorted(ids[0, 2:4].tolist()) == [1, 3] and int(ids[0, 4]) == 3


def report(name: str, rank_differs: tuple[int, int]) -> ModelReport:
    errors = {
        v: {**dict.fromkeys(CONTINUOUS, 0.5), "top1": 1, "rank": n, "rank_shift": 7, "rank_head": 1}
        for v, n in zip(VARIANTS, rank_differs, strict=True)
    }
    medians = dict.fromkeys((*CONTINUOUS, "rank"), 1.0)
    ratios = dict.fromkeys(VARIANTS, 0.5)
    return ModelReport(name, 10, 5, 1000, 700.0, 4.0, 5.0, medians, 3, errors, ratios)


def test_the_conclusion_is_computed_from_the_rows():
    reports = [report("a", (50, 10)), report("b", (40, 0))]  # 90 and 10 of 100 rows
    line = conclusion(reports)
    assert "90.0% of 100 rows" in line and "(10.0% with the top 256" in line
    assert "of the 6 rows ranked <= 256: 2 (bf16), 2 (bf16+refine256)" in line
    assert line.endswith("stays float32")
    assert "stays float32" not in conclusion([report("c", (3, 0))])
    table = render(reports)
    rank_lines = [s.split() for s in table.splitlines() if s.startswith("rank ")]
    assert rank_lines[0] == ["rank", "1", "50/50", "differ", "10/50", "differ"]
    assert len(rank_lines) == 2 and table.endswith(line)
    assert "rank_head" in table and "1/3 differ" in table


def test_audit_bench_can_skip_the_raw_precision_table():
    assert parse_args([]).raw_precision and not parse_args(["--no-raw-precision"]).raw_precision
