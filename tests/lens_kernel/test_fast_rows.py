"""The lens's fast row kernels against plain torch and float64: block top-k, one-pass softmax
statistics, counting above a value."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lens_kernel.metrics import count_above, softmax_rows, topk_by_blocks


def _rows(seed: int, n: int, vocab: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, vocab, generator=g)


@pytest.mark.parametrize("vocab", [49152, 50257, 1000, 97])
@pytest.mark.parametrize("k", [1, 2, 20, 50])
def test_block_topk_equals_torch_topk(vocab: int, k: int) -> None:
    x = _rows(vocab + k, 12, vocab)
    values, ids = topk_by_blocks(x, min(k, vocab))
    want_values, want_ids = torch.topk(x, min(k, vocab), dim=-1, sorted=True)
    assert torch.equal(values, want_values)
    assert torch.equal(ids, want_ids)  # random floats: no ties


def test_block_topk_with_nan_inf_and_ties() -> None:
    x = _rows(0, 6, 4096)
    x[0, 17] = math.nan  # NaN ranks first, as in torch.topk
    x[1, :100] = -math.inf
    x[2] = 1.0  # every entry tied
    x[3, 4090:] = 50.0  # the winners in the short tail of a row not a multiple of the block
    x[4, ::64] = 9.0  # ties spread over many blocks
    x[5, :] = -math.inf
    values, ids = topk_by_blocks(x, 20)
    want_values, _ = torch.topk(x, 20, dim=-1, sorted=True)
    assert torch.equal(values.isnan(), want_values.isnan())
    assert torch.equal(values.nan_to_num(), want_values.nan_to_num())
    # The ids point at entries with the reported values, each once per row.
    got = x.gather(-1, ids)
    assert torch.equal(got.nan_to_num(), values.nan_to_num())
    assert all(len(set(row.tolist())) == 20 for row in ids)
    assert ids[0, 0] == 17
    assert set(ids[3, :6].tolist()) == set(range(4090, 4096))


@settings(max_examples=60, deadline=None)
@given(
    vocab=st.integers(8, 3000),
    k=st.integers(1, 40),
    levels=st.integers(2, 50),
    seed=st.integers(0, 2**31 - 1),
)
def test_block_topk_values_match_on_coarse_values(
    vocab: int, k: int, levels: int, seed: int
) -> None:
    """Few distinct values, so ties everywhere: the values still match torch.topk exactly."""
    k = min(k, vocab)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, levels, (3, vocab), generator=g).float()
    values, ids = topk_by_blocks(x, k)
    assert torch.equal(values, torch.topk(x, k, dim=-1).values)
    assert torch.equal(x.gather(-1, ids), values)
    assert all(len(set(row.tolist())) == k for row in ids)


@pytest.mark.parametrize("scale", [0.5, 3.0, 12.0])
def test_softmax_rows_against_float64(scale: float) -> None:
    z = _rows(1, 16, 5000, scale)
    z[0, :7] = -math.inf  # zero-probability entries add nothing to the entropy
    lp64 = torch.log_softmax(z.double(), dim=-1)
    p64 = lp64.exp()
    h64 = -(p64 * lp64.nan_to_num(neginf=0.0)).sum(-1)
    shifted = z.clone()
    rows = softmax_rows(shifted, torch.zeros_like(z), torch.zeros_like(z), 10)
    assert rows.shifted.data_ptr() == shifted.data_ptr()  # shifted in place
    assert torch.equal(rows.top_ids, torch.topk(z, 10).indices)
    torch.testing.assert_close(rows.probs.double(), p64, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(rows.entropy_nats.double(), h64, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(
        rows.top_log_probs.double(), lp64.gather(-1, rows.top_ids), rtol=0, atol=5e-6 * scale
    )
    lse64 = torch.logsumexp(z.double(), -1) - z.double().amax(-1)
    torch.testing.assert_close(rows.log_norm.double(), lse64, rtol=0, atol=1e-6)
    assert bool((rows.entropy_nats >= 0).all())


def test_one_hot_row_has_zero_entropy() -> None:
    z = torch.full((1, 300), -1e4)
    z[0, 5] = 0.0
    rows = softmax_rows(z, torch.zeros_like(z), torch.zeros_like(z), 3)
    assert float(rows.entropy_nats[0]) == 0.0
    assert float(rows.log_norm[0]) == 0.0


@pytest.mark.parametrize("pick", [0, 3, 400, 4999])  # inside the top-k, and far below it
def test_count_above_matches_brute_force(pick: int) -> None:
    z = _rows(2, 9, 5000)
    z[1] = torch.round(z[1])  # ties with the value itself are not counted
    shifted = z.clone()
    rows = softmax_rows(shifted, torch.zeros_like(z), torch.zeros_like(z), 8)
    order = torch.argsort(rows.shifted, dim=-1, descending=True)
    value = rows.shifted.gather(-1, order[:, pick : pick + 1]).squeeze(-1)
    want = (rows.shifted > value.unsqueeze(-1)).sum(-1)
    assert torch.equal(count_above(rows.shifted, rows.top_shifted, value), want)
