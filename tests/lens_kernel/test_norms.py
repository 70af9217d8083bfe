"""apply_norm against torch's own norms and hand-written RMSNorm; build_norm_plan's lens modes."""

from __future__ import annotations

import pytest
import torch

from lens_kernel import LENS_MODES, NormSpec, apply_norm, build_norm_plan

D = 24


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(316)


def _x(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return 3.0 * torch.randn(*shape, D, generator=gen) + 0.7  # [..., d], off-centre on purpose


def _hand_rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
    """HF Llama / Gemma RMSNorm in float32: x * rsqrt(mean(x^2) + eps) * (offset + w)."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (offset + w.float())


@pytest.mark.parametrize("eps", [1e-5, 1e-12])
def test_layernorm_equals_torch_layernorm(gen: torch.Generator, eps: float) -> None:
    ln = torch.nn.LayerNorm(D, eps=eps)
    with torch.no_grad():
        ln.weight.copy_(1 + 0.3 * torch.randn(D, generator=gen))
        ln.bias.copy_(0.2 * torch.randn(D, generator=gen))
    spec = NormSpec("layernorm", ln.weight.detach(), ln.bias.detach(), eps)
    x = _x(gen, 2, 5)
    with torch.no_grad():
        expected = ln(x)
    torch.testing.assert_close(apply_norm(x, spec), expected, rtol=0, atol=0)


def test_layernorm_keep_bias_false_drops_beta_only(gen: torch.Generator) -> None:
    w, b = 1 + 0.3 * torch.randn(D, generator=gen), 0.5 * torch.randn(D, generator=gen)
    ln = torch.nn.LayerNorm(D, eps=1e-5, bias=False)
    with torch.no_grad():
        ln.weight.copy_(w)
    x = _x(gen, 7)
    with torch.no_grad():
        expected = ln(x)
    dropped = apply_norm(x, NormSpec("layernorm", w, b, 1e-5), keep_bias=False)
    torch.testing.assert_close(dropped, expected, rtol=0, atol=0)
    kept = apply_norm(x, NormSpec("layernorm", w, b, 1e-5))
    torch.testing.assert_close(kept - dropped, b.expand_as(x), rtol=1e-6, atol=1e-6)


def test_layernorm_without_affine_is_standardisation(gen: torch.Generator) -> None:
    x = _x(gen, 4)
    y = apply_norm(x, NormSpec("layernorm", None, None, 1e-5))
    expected = torch.nn.functional.layer_norm(x, (D,), eps=1e-5)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    torch.testing.assert_close(y.mean(-1), torch.zeros(4), rtol=0, atol=1e-5)


@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_rmsnorm_equals_hand_written_and_torch_rmsnorm(gen: torch.Generator, eps: float) -> None:
    w = 1 + 0.3 * torch.randn(D, generator=gen)
    x = _x(gen, 3, 4)
    y = apply_norm(x, NormSpec("rmsnorm", w, None, eps))
    torch.testing.assert_close(y, _hand_rmsnorm(x, w, eps, 0.0), rtol=1e-6, atol=1e-6)
    rms = torch.nn.RMSNorm(D, eps=eps)
    with torch.no_grad():
        rms.weight.copy_(w)
        expected = rms(x)
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)


def test_rmsnorm_eps_sits_inside_the_square_root() -> None:
    # x = 0.01 * ones: mean(x^2) = 1e-4, so eps = 1e-4 halves the variance term's share.
    x = torch.full((D,), 0.01)
    y = apply_norm(x, NormSpec("rmsnorm", None, None, 1e-4))
    torch.testing.assert_close(y, torch.full((D,), 0.01 / (2e-4) ** 0.5), rtol=1e-6, atol=0)


def test_gemma_rmsnorm_scales_by_one_plus_weight(gen: torch.Generator) -> None:
    w = 0.3 * torch.randn(D, generator=gen)  # Gemma stores w around 0; the scale is 1 + w
    x = _x(gen, 5)
    gemma = apply_norm(x, NormSpec("rmsnorm", w, None, 1e-6, weight_offset=1.0))
    torch.testing.assert_close(gemma, _hand_rmsnorm(x, w, 1e-6, 1.0), rtol=1e-6, atol=1e-6)
    plain = apply_norm(x, NormSpec("rmsnorm", 1 + w, None, 1e-6))
    torch.testing.assert_close(gemma, plain, rtol=1e-6, atol=1e-6)
    without_offset = apply_norm(x, NormSpec("rmsnorm", w, None, 1e-6))
    assert not torch.allclose(gemma, without_offset, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_norms_run_in_float32_whatever_the_input_dtype(
    gen: torch.Generator, dtype: torch.dtype
) -> None:
    x = _x(gen, 3).to(dtype)
    w = 1 + 0.3 * torch.randn(D, generator=gen)
    for spec in (NormSpec("rmsnorm", w, None, 1e-6), NormSpec("layernorm", w, w, 1e-5), None):
        y = apply_norm(x, spec)
        assert y.dtype == torch.float32
    torch.testing.assert_close(
        apply_norm(x, NormSpec("rmsnorm", w, None, 1e-6)),
        _hand_rmsnorm(x.float(), w, 1e-6, 0.0),
        rtol=1e-6,
        atol=1e-6,
    )


def test_none_spec_is_the_identity(gen: torch.Generator) -> None:
    x = _x(gen, 2, 3)
    assert torch.equal(apply_norm(x, None), x)


def test_normspec_rejects_bad_kind_and_rmsnorm_bias() -> None:
    with pytest.raises(ValueError, match="norm kind"):
        NormSpec("batchnorm", None, None, 1e-5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="RMSNorm has no bias"):
        NormSpec("rmsnorm", torch.ones(D), torch.zeros(D), 1e-5)


def _specs(n: int, prefix: str) -> list[NormSpec]:
    return [NormSpec("rmsnorm", torch.ones(D), None, 1e-6, name=f"{prefix}{i}") for i in range(n)]


N_BLOCKS = 4
FINAL = NormSpec("rmsnorm", torch.ones(D), None, 1e-6, name="final")
LN1, LN2 = _specs(N_BLOCKS, "ln1."), _specs(N_BLOCKS, "ln2.")


def test_plan_final_uses_the_final_norm_on_every_layer() -> None:
    plan = build_norm_plan("final", N_BLOCKS, FINAL, LN1, LN2)
    assert len(plan) == N_BLOCKS + 1
    assert all(spec is FINAL for spec in plan)


def test_plan_next_ln1_pre_norm_uses_block_ln1_then_final() -> None:
    plan = build_norm_plan("next_ln1", N_BLOCKS, FINAL, LN1, LN2, pre_norm=True)
    assert len(plan) == N_BLOCKS + 1
    for i in range(N_BLOCKS):
        assert plan[i] is LN1[i]  # layer i is the input to block i, normed by its ln1
    assert plan[N_BLOCKS] is FINAL


def test_plan_next_ln1_post_norm_uses_block_ln2_then_final() -> None:
    plan = build_norm_plan("next_ln1", N_BLOCKS, FINAL, LN1, LN2, pre_norm=False)
    assert [spec.name for spec in plan] == [*(s.name for s in LN2), "final"]
    assert all(plan[i] is LN2[i] for i in range(N_BLOCKS))


def test_plan_raw_applies_no_norm_at_all() -> None:
    # Parity and KL use the model's final norm through lens_pass(final_norm=...), not the plan.
    plan = build_norm_plan("raw", N_BLOCKS, FINAL, LN1, LN2)
    assert plan == [None] * (N_BLOCKS + 1)


def test_plan_modes_are_the_documented_three() -> None:
    assert set(LENS_MODES) == {"final", "next_ln1", "raw"}


@pytest.mark.parametrize("mode", ["", "Final", "next_ln2", "tuned"])
def test_plan_bad_mode_raises(mode: str) -> None:
    with pytest.raises(ValueError, match="lens mode must be one of"):
        build_norm_plan(mode, N_BLOCKS, FINAL, LN1, LN2)


def test_plan_next_ln1_needs_one_norm_per_block() -> None:
    with pytest.raises(ValueError, match="expected 4, got 3"):
        build_norm_plan("next_ln1", N_BLOCKS, FINAL, LN1[:3])
    with pytest.raises(ValueError, match="ln2"):
        build_norm_plan("next_ln1", N_BLOCKS, FINAL, LN1, None, pre_norm=False)
