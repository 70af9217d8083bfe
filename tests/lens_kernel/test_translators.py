"""Trained-lens maths (lens_kernel/translators.py) against a float64 reference and by property."""

from __future__ import annotations

import math

import pytest
import torch

from lens_kernel.norms import NormSpec, apply_norm
from lens_kernel.translators import (
    FitSettings,
    Prism,
    TunedLens,
    decode,
    fit_step,
    kl_by_layer_bits,
    lens_log_probs,
    step_sample,
    translate_layers,
    translator_from_state,
    translator_shape,
    whitening_stats,
)
from lens_kernel.unembed import UnembedSpec

D, V, LAYERS, ROWS = 16, 50, 4, 64


def _setup(seed: int = 0, softcap: float | None = None):
    g = torch.Generator().manual_seed(seed)
    w_u = torch.randn(D, V, generator=g) / math.sqrt(D) * 3
    norm = NormSpec("rmsnorm", torch.rand(D, generator=g) + 0.5, None, 1e-6)
    resid = torch.randn(LAYERS, ROWS, D, generator=g) * torch.linspace(1, 4, LAYERS)[:, None, None]
    return resid, norm, UnembedSpec(W_U=w_u, softcap=softcap)


def _reference_kl_bits(resid: torch.Tensor, norm: NormSpec, unembed: UnembedSpec) -> list[float]:
    """Independent float64: log-softmax by hand, KL(final || layer) per row, mean, in bits."""
    w = unembed.W_U.double()

    def log_probs(x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + norm.eps) * norm.weight.double()
        z = y @ w
        if unembed.softcap is not None:
            z = unembed.softcap * torch.tanh(z / unembed.softcap)
        m = z.max(-1, keepdim=True).values
        return z - m - torch.log(torch.exp(z - m).sum(-1, keepdim=True))

    target = log_probs(resid[-1])
    out = []
    for layer in range(resid.shape[0]):
        lp = log_probs(resid[layer])
        out.append(float((target.exp() * (target - lp)).sum(-1).mean() / math.log(2)))
    return out


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_kl_by_layer_matches_a_float64_reference(softcap: float | None) -> None:
    resid, norm, unembed = _setup(softcap=softcap)
    got = kl_by_layer_bits(None, resid, norm, unembed, chunk_rows=7)  # chunks of odd size
    want = _reference_kl_bits(resid, norm, unembed)
    assert got == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert got[-1] == pytest.approx(0.0, abs=1e-6) and all(x >= -1e-6 for x in got)


def test_an_untrained_tuned_lens_is_the_final_norm_lens_exactly() -> None:
    resid, norm, unembed = _setup()
    for rank in (None, 3):
        tuned = TunedLens(LAYERS, D, rank=rank, seed=1)
        for layer in range(LAYERS):
            plain = lens_log_probs(None, resid[layer], layer, norm, unembed)
            assert torch.equal(lens_log_probs(tuned, resid[layer], layer, norm, unembed), plain)
        assert tuned.layer_change(0) == 0.0


def test_decode_is_the_unembedding_and_differentiable() -> None:
    resid, norm, unembed = _setup(softcap=5.0)
    x = apply_norm(resid[1], norm).requires_grad_()
    logits = decode(x, unembed)
    reference = unembed.reference(apply_norm(resid[1], norm).clone())
    assert torch.allclose(logits, reference, rtol=1e-6, atol=1e-6)
    logits.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_the_prism_map_is_orthogonal_and_starts_as_a_rescaling() -> None:
    resid, _, _ = _setup()
    mean, std = whitening_stats(resid[:-1])
    out_mean, out_std = whitening_stats(resid[-1])
    prism = Prism(mean, std, out_mean, out_std)
    with torch.no_grad():
        prism.skew.copy_(torch.randn(D, D))
    q = prism.rotation()
    assert torch.allclose(q @ q.T, torch.eye(D), atol=1e-5)
    with torch.no_grad():
        prism.skew.zero_()
    mapped = prism(resid[0], 0)
    assert torch.allclose(mapped, out_mean + out_std * (resid[0] - mean) / std, atol=1e-5)
    rows = resid[:-1].reshape(-1, D).double()
    assert torch.allclose(mean.double(), rows.mean(0), atol=1e-5)
    assert torch.allclose(std.double(), rows.std(0, unbiased=False), atol=1e-4)


@pytest.mark.parametrize("kind", ["tuned", "prism"])
def test_fitting_lowers_the_kl_to_the_final_distribution(kind: str) -> None:
    """Layers whose residual is a rotated, shifted copy of the last one's: a translator can
    undo that, and a few steps must move KL a long way down."""
    resid, norm, unembed = _setup(seed=3)
    g = torch.Generator().manual_seed(4)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g))
    shifted = torch.stack([resid[-1] @ q + 0.5 * i for i in range(LAYERS - 1)] + [resid[-1]])
    before = kl_by_layer_bits(None, shifted, norm, unembed)
    settings = FitSettings(steps=150, lr=2e-2, batch_rows=32, layers_per_step=2, seed=5)
    if kind == "tuned":
        translator: torch.nn.Module = TunedLens(LAYERS, D)
    else:
        translator = Prism(*whitening_stats(shifted[:-1]), *whitening_stats(shifted[-1]))
    opt = torch.optim.Adam(translator.parameters(), lr=settings.lr)
    for step in range(settings.steps):
        rows, layers = step_sample(settings, step, ROWS, LAYERS)
        with torch.no_grad():
            target = lens_log_probs(None, shifted[-1][rows], LAYERS - 1, norm, unembed)
        loss = fit_step(translator, opt, shifted[:, rows], target, layers, norm, unembed)
        assert loss >= -1e-6
    after = kl_by_layer_bits(translator, shifted, norm, unembed)
    mean_before, mean_after = sum(before[:-1]) / 3, sum(after[:-1]) / 3
    assert mean_after < mean_before / 3, (before, after)


def test_step_samples_depend_on_seed_and_step_only() -> None:
    s = FitSettings(batch_rows=8, layers_per_step=3, seed=9)
    a, b = step_sample(s, 17, 100, 10), step_sample(s, 17, 100, 10)
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[1] == sorted(a[1])
    assert not torch.equal(step_sample(s, 18, 100, 10)[0], a[0])
    assert len(set(a[0].tolist())) == 8 and len(set(a[1])) == 3


def test_a_prism_step_computes_q_once_with_the_gradient_of_one_q_per_layer() -> None:
    resid, norm, unembed = _setup(seed=6)
    stats = (*whitening_stats(resid[:-1]), *whitening_stats(resid[-1]))
    fast, slow = Prism(*stats), Prism(*stats)
    with torch.no_grad():
        skew = torch.randn(D, D, generator=torch.Generator().manual_seed(7)) * 0.1
        fast.skew.copy_(skew)
        slow.skew.copy_(skew)
    target = lens_log_probs(None, resid[-1], LAYERS - 1, norm, unembed).detach()
    sgd = torch.optim.SGD(fast.parameters(), lr=0.0)  # lr 0: only the gradient is compared
    loss = fit_step(fast, sgd, resid, target, [0, 1, 2], norm, unembed)
    total = sum(
        _kl_bits_mean(slow, resid[layer], layer, norm, unembed, target) for layer in (0, 1, 2)
    )
    (total / 3 * math.log(2)).backward()
    assert loss == pytest.approx(float(total.detach()) / 3, rel=1e-5)
    assert torch.allclose(fast.skew.grad, slow.skew.grad, rtol=1e-4, atol=1e-7)


def _kl_bits_mean(translator, rows, layer, norm, unembed, target) -> torch.Tensor:
    from lens_kernel.translators import kl_nats

    lp = lens_log_probs(translator, rows, layer, norm, unembed)
    return kl_nats(target, lp).mean() / math.log(2)


def _trained(kind: str) -> torch.nn.Module:
    """A translator with non-trivial weights (random, seeded)."""
    resid = _setup(seed=3)[0]
    g = torch.Generator().manual_seed(5)
    if kind == "tuned":
        lens: torch.nn.Module = TunedLens(LAYERS, D)
    else:
        mean, std = whitening_stats(resid[:-1])
        lens = Prism(mean, std, *whitening_stats(resid[-1]))
    with torch.no_grad():
        for p in lens.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return lens


@pytest.mark.parametrize("kind", ["tuned", "prism"])
def test_a_translator_comes_back_from_its_weights_and_translates_every_layer(kind: str) -> None:
    lens = _trained(kind)
    back = translator_from_state(kind, {k: v.clone() for k, v in lens.state_dict().items()})
    assert translator_shape(back) == ((LAYERS, D) if kind == "tuned" else (None, D))
    resid = torch.randn(LAYERS, 3, 5, D)  # [layers, B, T, d]: any rows per layer
    got = translate_layers(back, resid)
    for layer in range(LAYERS):
        # Each layer by its own map; float64 from the weights for the tuned lens.
        if kind == "tuned":
            w, b = back.weight[layer].double(), back.bias[layer].double()
            want = resid[layer].double() + resid[layer].double() @ w + b
            torch.testing.assert_close(got[layer].double(), want, rtol=1e-5, atol=1e-5)
        else:
            want = lens(resid[layer], layer)
            torch.testing.assert_close(got[layer], want, rtol=1e-6, atol=1e-6)


def test_low_rank_tuned_weights_keep_their_rank_and_bad_weights_are_refused() -> None:
    lens = TunedLens(LAYERS, D, rank=3, seed=1)
    back = translator_from_state("tuned", lens.state_dict())
    assert back.rank == 3
    with pytest.raises(ValueError, match="do not make a tuned translator"):
        translator_from_state("tuned", {"bias": torch.zeros(LAYERS, D)})  # no weight, no down/up
    with pytest.raises(ValueError, match="do not make a prism translator"):
        translator_from_state("prism", TunedLens(LAYERS, D).state_dict())
    with pytest.raises(ValueError, match="unknown translator kind"):
        translator_from_state("sideways", {})


def test_the_bfloat16_training_decode_is_close_to_float32_and_differentiable() -> None:
    resid, norm, unembed = _setup()
    fast = UnembedSpec(W_U=unembed.W_U, precision="bfloat16")
    x = apply_norm(resid[1], norm).requires_grad_(True)
    z32, z16 = decode(x, unembed), decode(x, fast)
    # bf16 operands: 8 significant bits, so logits agree to ~1e-2 of their scale.
    assert (z32 - z16).abs().max() <= 0.02 * z32.abs().max()
    z16.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
