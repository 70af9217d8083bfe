"""The parity gate: lens at the last layer vs the model's own logits, judged as distributions."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lens_kernel import KL_BOUND_BITS, REL_BOUND, parity_failures, parity_stats

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


def _logits(seed: int, rows: int = 4, vocab: int = 512, scale: float = 8.0) -> torch.Tensor:
    return scale * torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))


def _rounded(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """What storing float32 logits in ``dtype`` does to them."""
    return x.to(dtype).float()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_identical_logits_pass_with_zero_kl(dtype):
    x = _logits(0)
    stats = parity_stats(x, x.clone())
    assert torch.equal(stats.kl_bits, torch.zeros(4))
    assert stats.top1_agree.all() and stats.model_finite.all()
    assert not parity_failures(stats, dtype).any()


@pytest.mark.parametrize(
    ("dtype", "torch_dtype"), [("float16", torch.float16), ("bfloat16", torch.bfloat16)]
)
@pytest.mark.parametrize("scale", [8.0, 30.0, 60.0])
def test_half_precision_rounding_of_large_logits_passes(dtype, torch_dtype, scale):
    # A max-abs bound fails here: bfloat16 stores a logit of 60 to within 0.25.
    lens = _logits(1, scale=scale)
    model = _rounded(lens, torch_dtype)
    stats = parity_stats(model, lens)
    assert not parity_failures(stats, dtype).any()
    assert (stats.relative_error(dtype) <= 1.0).all()  # storing rounds by half an epsilon
    if dtype == "bfloat16" and scale == 60.0:
        assert float(stats.max_abs.max()) > 0.1


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_a_lens_that_misses_a_norm_scale_fails(dtype):
    # Forgetting Gemma's (1 + w) offset or a norm weight scales the logits: a different
    # temperature, off by far more than any rounding.
    model = _logits(2)
    stats = parity_stats(model, 0.8 * model)
    assert parity_failures(stats, dtype).all()
    # KL alone would let a 0.8 temperature pass in bfloat16; the error at the logits' scale
    # does not.
    assert (stats.relative_error(dtype) > REL_BOUND[dtype]).all()
    if dtype == "bfloat16":
        assert (stats.kl_bits <= KL_BOUND_BITS[dtype]).any()


def test_a_flipped_top1_with_a_clear_margin_fails():
    model = torch.zeros(1, 1000)
    model[0, 0], model[0, 1] = 2.0, 1.0  # the model's top-1 by a margin of 1.0
    lens = model.clone()
    lens[0, 0], lens[0, 1] = 1.0, 2.0
    stats = parity_stats(model, lens)
    assert not bool(stats.top1_agree[0]) and float(stats.model_margin[0]) == 1.0
    for dtype in ("float32", "float16", "bfloat16"):
        assert bool(parity_failures(stats, dtype)[0])


def test_a_near_tie_may_flip_within_rounding():
    # bfloat16 at logits of ~20: the noise allowed is 8 * 2**-7 * 20 = 1.25.
    model = torch.zeros(1, 100)
    model[0, 0], model[0, 1], model[0, 2] = 20.05, 20.0, -20.0
    lens = model.clone()
    lens[0, 0], lens[0, 1] = 20.0, 20.05
    stats = parity_stats(model, lens)
    assert not bool(stats.top1_agree[0])
    assert not parity_failures(stats, "bfloat16").any()
    assert parity_failures(stats, "float32").all()  # no tie that wide in float32


def test_non_finite_model_logits_are_flagged_not_judged():
    model = _logits(3)
    model[1, 7] = float("inf")
    model[2, 3] = float("nan")
    stats = parity_stats(model, _logits(3))
    assert stats.model_finite.tolist() == [True, False, False, True]
    assert parity_failures(stats, "float16").tolist() == [False, False, False, False]


@SETTINGS
@given(seed=st.integers(0, 2**16), scale=st.sampled_from([0.1, 1.0, 10.0, 50.0]))
def test_kl_is_non_negative_and_zero_only_for_equal_distributions(seed, scale):
    x = _logits(seed, rows=2, vocab=64, scale=scale)
    assert (parity_stats(x, x + 3.0).kl_bits.abs() < 1e-5).all()  # a shift is the same softmax
    y = _logits(seed + 1, rows=2, vocab=64, scale=scale)
    assert (parity_stats(x, y).kl_bits >= 0).all()
