"""Property tests of lens_kernel.metrics and the collapse-layer rule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lens_kernel import (
    collapse_layers,
    entropy_bits,
    first_true_layer,
    kl_bits,
    next_token_stats,
    row_stats,
    temperature_topk,
)

SETTINGS = settings(max_examples=50, deadline=None, derandomize=True)
# Entropy of a float32 softmax can overshoot log2 V by a few float32 ulps.
H_SLACK = 1e-5


@st.composite
def logit_rows(draw, min_vocab: int = 2, max_vocab: int = 32, allow_masked: bool = True):
    """[n, V] float32 logits; some entries -inf (masked tokens), never a whole row."""
    n = draw(st.integers(1, 3))
    vocab = draw(st.integers(min_vocab, max_vocab))
    scale = draw(st.sampled_from([1e-3, 1.0, 10.0, 60.0]))
    values = draw(
        hnp.arrays(np.float32, (n, vocab), elements=st.floats(-1.0, 1.0, width=32))
    ) * np.float32(scale)
    if allow_masked:
        mask = draw(hnp.arrays(np.bool_, (n, vocab)))
        mask[:, 0] = False
        values[mask] = -np.inf
    return torch.from_numpy(values)


@SETTINGS
@given(logits=logit_rows())
def test_entropy_is_between_zero_and_log2_vocab(logits: torch.Tensor) -> None:
    h = entropy_bits(torch.log_softmax(logits, dim=-1))
    assert torch.isfinite(h).all()
    assert (h >= -H_SLACK).all()
    assert (h <= math.log2(logits.shape[-1]) + H_SLACK).all()


@SETTINGS
@given(vocab=st.integers(2, 5000))
def test_uniform_distribution_has_log2_vocab_bits(vocab: int) -> None:
    h = entropy_bits(torch.log_softmax(torch.zeros(1, vocab), dim=-1))
    assert abs(float(h[0]) - math.log2(vocab)) <= 1e-5 * math.log2(vocab)


@SETTINGS
@given(logits=logit_rows(), k=st.integers(1, 8))
def test_row_stats_topk_rest_mass_and_argmax(logits: torch.Tensor, k: int) -> None:
    k = min(k, logits.shape[-1])
    stats = row_stats(logits, k)
    assert stats.top_ids.shape == stats.top_probs.shape == (logits.shape[0], k)
    assert (stats.rest_mass >= 0).all() and (stats.rest_mass <= 1).all()
    assert (stats.top_probs >= 0).all() and (stats.top_probs <= 1).all()
    # Sorted descending, distinct ids.
    assert (stats.top_probs[:, :-1] >= stats.top_probs[:, 1:]).all()
    for row in stats.top_ids:
        assert len(set(row.tolist())) == k
    # Top-1 is an argmax of the probabilities (ties allowed, including logits that differ by
    # less than float32 resolves after log_softmax, e.g. 0 and a denormal).
    log_probs = torch.log_softmax(logits, dim=-1)
    top1_logp = log_probs.gather(-1, stats.top_ids[:, :1]).squeeze(-1)
    assert torch.equal(top1_logp, log_probs.max(dim=-1).values)
    assert torch.equal(stats.top_probs[:, 0], top1_logp.exp())
    # Rest mass is what the top-k leave.
    probs = torch.softmax(logits.double(), dim=-1)
    expected_rest = 1 - probs.gather(-1, stats.top_ids).sum(-1)
    assert torch.allclose(stats.rest_mass.double(), expected_rest.clamp(0, 1), atol=1e-5)


@SETTINGS
@given(logits=logit_rows(allow_masked=False), temperature=st.floats(0.05, 20.0))
def test_temperature_topk_is_row_stats_of_scaled_logits(logits, temperature) -> None:
    k = min(3, logits.shape[-1])
    got = temperature_topk(logits, temperature, k)
    expected = row_stats(logits / temperature, k)
    assert torch.equal(got.top_probs, expected.top_probs)
    assert torch.equal(got.entropy_bits, expected.entropy_bits)


def test_temperature_must_be_positive() -> None:
    with pytest.raises(ValueError, match="temperature"):
        temperature_topk(torch.zeros(1, 4), 0.0, 2)


@st.composite
def logit_pairs(draw):
    p = draw(logit_rows(allow_masked=False))
    q = draw(hnp.arrays(np.float32, tuple(p.shape), elements=st.floats(-30.0, 30.0, width=32)))
    return p, torch.from_numpy(q)


@SETTINGS
@given(pair=logit_pairs())
def test_kl_is_non_negative_and_zero_on_itself(pair) -> None:
    p_logits, q_logits = pair
    log_p = torch.log_softmax(p_logits, dim=-1)
    log_q = torch.log_softmax(q_logits, dim=-1)
    kl = kl_bits(log_p, log_q)
    assert torch.isfinite(kl).all() and (kl >= 0).all()
    assert (kl_bits(log_p, log_p) <= 1e-6).all()
    # Against float64: KL(p||q) computed from the same float32 logits.
    lp, lq = torch.log_softmax(p_logits.double(), -1), torch.log_softmax(q_logits.double(), -1)
    expected = (lp.exp() * (lp - lq)).sum(-1) / math.log(2)
    assert torch.allclose(kl.double(), expected, rtol=1e-4, atol=1e-4)


@SETTINGS
@given(logits=logit_rows())
def test_kl_of_masked_p_against_itself_is_zero(logits: torch.Tensor) -> None:
    # Masked tokens (p = 0, log p = -inf) contribute 0, not nan.
    log_p = torch.log_softmax(logits, dim=-1)
    kl = kl_bits(log_p, log_p)
    assert torch.isfinite(kl).all() and (kl <= 1e-6).all()


def _first_true(column: list[bool]) -> int:
    return next((i for i, f in enumerate(column) if f), -1)


flag_grids = st.integers(1, 12).flatmap(
    lambda layers: st.integers(1, 6).flatmap(lambda batch: hnp.arrays(np.bool_, (layers, batch)))
)


@SETTINGS
@given(flags=flag_grids)
def test_first_true_layer_is_the_first_index_or_minus_one(flags: np.ndarray) -> None:
    got = first_true_layer(torch.from_numpy(flags))
    assert got.dtype == torch.int64
    assert got.tolist() == [_first_true(flags[:, b].tolist()) for b in range(flags.shape[1])]


@SETTINGS
@given(data=st.data(), layers=st.integers(1, 10), batch=st.integers(1, 5))
def test_collapse_layers_and_delta(data, layers: int, batch: int) -> None:
    grids = [data.draw(hnp.arrays(np.bool_, (layers, batch))) for _ in range(3)]
    col = collapse_layers(*(torch.from_numpy(g) for g in grids))
    for b in range(batch):
        l_copy, l_copy_h, l_sem = (_first_true(g[:, b].tolist()) for g in grids)
        assert (int(col.L_copy[b]), int(col.L_copy_H[b]), int(col.L_semantic[b])) == (
            l_copy,
            l_copy_h,
            l_sem,
        )
        both = l_copy >= 0 and l_sem >= 0
        assert bool(col.has_delta[b]) == both
        assert int(col.delta_layers[b]) == (l_sem - l_copy if both else -1)


@st.composite
def next_token_cases(draw):
    layers, batch = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    vocab = draw(st.integers(2, 24))
    logits = draw(
        hnp.arrays(np.float32, (layers, batch, vocab), elements=st.floats(-20, 20, width=32))
    )
    final = draw(hnp.arrays(np.float32, (batch, vocab), elements=st.floats(-20, 20, width=32)))
    answers = draw(hnp.arrays(np.int64, (batch,), elements=st.integers(-1, vocab - 1)))
    prompt = draw(hnp.arrays(np.int64, (batch, 5), elements=st.integers(-1, vocab - 1)))
    return torch.from_numpy(logits), torch.from_numpy(final), answers, prompt


@SETTINGS
@given(case=next_token_cases(), k=st.integers(1, 4))
def test_next_token_stats_invariants(case, k: int) -> None:
    logits, final, answers, prompt = case
    k = min(k, logits.shape[-1])
    final_logp = torch.log_softmax(final, dim=-1)
    stats = next_token_stats(
        logits, final_logp, torch.from_numpy(answers), torch.from_numpy(prompt), k, 0.9, 0.05
    )
    layers, batch, vocab = logits.shape
    assert (stats.kl_to_final_bits >= 0).all()
    h = stats.rows.entropy_bits
    assert (h >= -H_SLACK).all() and (h <= math.log2(vocab) + H_SLACK).all()
    assert torch.equal(stats.entropy_collapse, h <= 1.0)
    for b in range(batch):
        ans = int(answers[b])
        for i in range(layers):
            top1 = int(stats.rows.top_ids[i, b, 0])
            if ans < 0:
                assert int(stats.answer_rank[i, b]) == -1
                assert math.isnan(float(stats.answer_prob[i, b]))
                assert not bool(stats.is_answer[i, b])
                continue
            rank = int(stats.answer_rank[i, b])
            assert 1 <= rank <= vocab
            # Ranked on logits minus their maximum: rounding may merge values within a few
            # ulps (never reorder them), so a near-tie may count as a tie.
            z = logits[i, b].double()
            assert 1 + int((z > z[ans] + 1e-5).sum()) <= rank <= 1 + int((z > z[ans]).sum())
            assert float(stats.answer_prob[i, b]) <= float(stats.rows.top_probs[i, b, 0]) * (
                1 + 1e-6
            )
            assert bool(stats.is_answer[i, b]) == (top1 == ans)
            if bool(stats.is_answer[i, b]):
                assert rank == 1
            if bool(stats.copy_collapse[i, b]):
                assert top1 in prompt[b].tolist()
                assert float(stats.rows.top_probs[i, b, 0]) > 0.9
