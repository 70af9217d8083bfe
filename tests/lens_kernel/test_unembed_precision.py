"""The unembedding's precision option: float32 bit-identical to the seed's matmul, bfloat16 within
bf16's rounding bound with each row's top logits exact, the reference float32 whatever is chosen."""

from __future__ import annotations

import pytest
import torch

from lens_kernel.unembed import PRECISIONS, REFINE_TOP, UnembedSpec, top_ids

U_BF16 = 2.0**-8  # bf16 unit roundoff: 8 significant bits, round to nearest


def _case(
    rows: int = 48, d: int = 64, vocab: int = 512, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, d, generator=g) * 3
    W_U = torch.randn(d, vocab, generator=g) / d**0.5
    b_U = torch.randn(vocab, generator=g)
    return x, W_U, b_U


def _seed_path(x: torch.Tensor, W_U: torch.Tensor, b_U: torch.Tensor | None, cap: float | None):
    """The unembedding as the seed wrote it, before precisions existed."""
    logits = torch.matmul(x.float(), W_U)
    if b_U is not None:
        logits.add_(b_U)
    if cap is not None:
        logits.div_(cap).tanh_().mul_(cap)
    return logits


@pytest.mark.parametrize("cap", [None, 30.0])
@pytest.mark.parametrize("bias", [False, True])
def test_float32_default_is_bit_identical_to_the_seeds_matmul(bias: bool, cap: float | None):
    x, W_U, b_U = _case()
    b = b_U if bias else None
    spec = UnembedSpec(W_U, b, cap)
    assert spec.precision == "float32" and spec.W_U_bf16_T is None  # off by default
    expected = _seed_path(x, W_U, b, cap)
    assert torch.equal(spec(x), expected)
    buf = torch.zeros_like(expected)
    assert spec(x, out=buf) is buf and torch.equal(buf, expected)
    assert torch.equal(spec.reference(x), expected)


def test_tf32_off_cuda_is_float32_and_says_so():
    x, W_U, b_U = _case()
    before = torch.backends.cuda.matmul.allow_tf32
    spec = UnembedSpec(W_U, b_U, 30.0, precision="tf32")
    assert spec.effective_precision == "float32"
    assert torch.equal(spec(x), _seed_path(x, W_U, b_U, 30.0))
    assert torch.backends.cuda.matmul.allow_tf32 == before  # no process-wide switch left on


@pytest.mark.parametrize("vocab", [512, 100])  # top_ids by blocks / by a plain topk
@pytest.mark.parametrize(("bias", "cap"), [(False, None), (True, 30.0)])
def test_bfloat16_is_within_bf16_rounding_of_float32(vocab: int, bias: bool, cap: float | None):
    """|fast - exact| <= u |z| + 2.01 u sum_i |x_i W_i| (bf16 result, then operand rounding, with
    float32 accumulation), plus float32 slack; bias and softcap (1-Lipschitz) add nothing."""
    x, W_U, b_U = _case(vocab=vocab)
    b = b_U if bias else None
    spec = UnembedSpec(W_U, b, cap, precision="bfloat16")
    assert spec.effective_precision == "bfloat16"
    buf = torch.zeros(x.shape[0], vocab)
    fast = spec(x, out=buf)
    assert fast is buf and fast.dtype == torch.float32
    z = x.double() @ W_U.double()  # float64 reference
    bound = U_BF16 * z.abs() + 2.01 * U_BF16 * (x.double().abs() @ W_U.double().abs()) + 1e-4
    if b is not None:
        z = z + b.double()
    if cap is not None:
        z = cap * torch.tanh(z / cap)
    err = (fast.double() - z).abs()
    assert bool((err <= bound).all()), float((err - bound).max())
    # The bound is not loose by orders of magnitude: bf16 really is in use.
    assert float(err.max()) > 1e-2 * float(bound.max())


def test_bfloat16_recomputes_each_rows_top_logits_in_float32():
    """Near-tied pairs of tokens (logits 0.1% apart, under a bf16 ulp at |z| ~ 10): bf16 alone
    orders some pairs wrongly; the refined top logits match float32's and so does every top-1."""
    x, W_U, _ = _case(rows=64, vocab=512, seed=1)
    W_U[:, 1::2] = W_U[:, 0::2] * 1.001
    spec = UnembedSpec(W_U, precision="bfloat16")
    exact = _seed_path(x, W_U, None, None)
    plain_bf16 = (x.bfloat16() @ W_U.bfloat16()).float()
    assert bool((plain_bf16.argmax(-1) != exact.argmax(-1)).any())  # the case bites
    fast = spec(x)
    assert torch.equal(fast.argmax(-1), exact.argmax(-1))
    top_pair = exact.topk(2, dim=-1).indices  # within the REFINE_TOP that bf16 ranks highest
    torch.testing.assert_close(
        fast.gather(1, top_pair), exact.gather(1, top_pair), rtol=1e-5, atol=1e-5
    )


def test_reference_stays_float32_whatever_the_precision():
    x, W_U, b_U = _case()
    expected = _seed_path(x, W_U, b_U, 30.0)
    for precision in PRECISIONS:
        spec = UnembedSpec(W_U, b_U, 30.0, precision=precision)
        assert torch.equal(spec.reference(x), expected), precision


def test_bfloat16_keeps_leading_dims_and_allocates_when_no_buffer():
    x, W_U, _ = _case(rows=12)
    spec = UnembedSpec(W_U, precision="bfloat16")
    stacked = spec(x.view(3, 4, -1))  # [layers, batch, d]
    assert stacked.shape == (3, 4, W_U.shape[1]) and stacked.dtype == torch.float32
    assert torch.equal(stacked.view(12, -1), spec(x))
    assert spec(x[:0], out=torch.zeros(0, W_U.shape[1])).shape == (0, W_U.shape[1])  # no rows


def test_an_unknown_precision_names_the_allowed_values():
    with pytest.raises(ValueError, match="'float32', 'tf32', 'bfloat16', got 'fp16'"):
        UnembedSpec(torch.zeros(4, 8), precision="fp16")


@pytest.mark.parametrize("vocab", [1024, 200, 3])
def test_top_ids_are_each_rows_k_largest(vocab: int):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(16, vocab, generator=g)
    k = min(REFINE_TOP, vocab)
    got = top_ids(logits, k).sort(-1).values
    assert torch.equal(got, logits.topk(k, dim=-1).indices.sort(-1).values)
