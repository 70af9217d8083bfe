"""Trained lenses: a translator maps a layer's residual to one the model's final norm and
unembedding decode well, fitted to the model's own next-token distribution.

tuned (Belrose et al. 2023): per lens layer l, h -> h + h A_l + b_l; A_l is d x d, or U_l V_l^T
of rank k for wide models. Zero init: before any step it is the final-norm logit lens exactly.
prism: one map for every layer, h -> mu_F + sigma_F * (Q ((h - mu) / sigma)): a diagonal
whitening with statistics pooled over the layers, an orthogonal Q (the exponential of a
skew-symmetric matrix, identity at init), and the last layer's scale put back. d(d-1)/2
parameters against the tuned lens's L d^2: the lower-freedom control.

Objective: KL(final || lens) at the same position, the final distribution being the model's own
(the last layer through the final norm and unembedding, which the parity gate checks equals the
model's logits). Everything here is float32 and differentiable; nothing reads files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lens_kernel.norms import NormSpec, apply_norm
from lens_kernel.unembed import UnembedSpec

TRANSLATOR_KINDS: tuple[str, ...] = ("tuned", "prism")
LN2 = math.log(2.0)


class TunedLens(torch.nn.Module):
    """One affine translator per lens layer (0 = embeddings .. n_layers), identity at init."""

    def __init__(self, n_lens_layers: int, d_model: int, rank: int | None = None,
                 seed: int = 0) -> None:  # fmt: skip
        super().__init__()
        self.n_lens_layers, self.d_model, self.rank = n_lens_layers, d_model, rank
        self.bias = torch.nn.Parameter(torch.zeros(n_lens_layers, d_model))
        if rank is None:
            self.weight = torch.nn.Parameter(torch.zeros(n_lens_layers, d_model, d_model))
        else:
            # LoRA's init: U random and small, V zero, so the product starts at zero and both
            # factors get gradients.
            g = torch.Generator().manual_seed(seed)
            u = torch.randn(n_lens_layers, d_model, rank, generator=g) / math.sqrt(d_model)
            self.down = torch.nn.Parameter(u)
            self.up = torch.nn.Parameter(torch.zeros(n_lens_layers, d_model, rank))

    def forward(self, resid: torch.Tensor, layer: int) -> torch.Tensor:
        """Translate rows [n, d] of one lens layer."""
        h = resid.float()
        if self.rank is None:
            delta = h @ self.weight[layer]
        else:
            delta = (h @ self.down[layer]) @ self.up[layer].T
        return h + delta + self.bias[layer]

    def layer_change(self, layer: int) -> float:
        """||A_l||_F / sqrt(d) + ||b_l|| / sqrt(d): how far layer l's map is from the identity."""
        with torch.no_grad():
            a = self.weight[layer] if self.rank is None else self.down[layer] @ self.up[layer].T
            return float((a.norm() + self.bias[layer].norm()) / math.sqrt(self.d_model))


class Prism(torch.nn.Module):
    """One whitening and one orthogonal map shared by every lens layer."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, out_mean: torch.Tensor,
                 out_std: torch.Tensor) -> None:  # fmt: skip
        super().__init__()
        d = mean.numel()
        self.d_model = d
        for name, value in (("mean", mean), ("std", std), ("out_mean", out_mean),
                            ("out_std", out_std)):  # fmt: skip
            self.register_buffer(name, value.detach().float().reshape(d).clone())
        self.skew = torch.nn.Parameter(torch.zeros(d, d))

    mean: torch.Tensor  # buffers, declared for type checkers
    std: torch.Tensor
    out_mean: torch.Tensor
    out_std: torch.Tensor

    def rotation(self) -> torch.Tensor:
        """Q = exp(S - S^T): orthogonal for every S."""
        return torch.linalg.matrix_exp(self.skew - self.skew.T)

    def forward(
        self, resid: torch.Tensor, layer: int, rotation: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``rotation``: Q computed once for several layers (one matrix exponential per step)."""
        q = self.rotation() if rotation is None else rotation
        z = (resid.float() - self.mean) / self.std
        return self.out_mean + self.out_std * (z @ q.T)


def whitening_stats(resid: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and standard deviation of rows [..., d] (float64 sums), std >= eps."""
    rows = resid.reshape(-1, resid.shape[-1]).double()
    mean = rows.mean(dim=0)
    std = rows.var(dim=0, unbiased=False).clamp_min(0).sqrt().clamp_min(eps)
    return mean.float(), std.float()


def decode(normed: torch.Tensor, unembed: UnembedSpec) -> torch.Tensor:
    """softcap(x @ W_U + b_U), out of place (differentiable; UnembedSpec works in place for
    inference). The matmul in float32, or with bf16 operands when ``unembed`` is a bfloat16 spec
    (fitting only: ~3x faster on a bf16-capable CPU or tensor cores; no top-k refinement, the
    gradient needs every logit alike); the rest float32."""
    if unembed.W_U_bf16_T is not None:
        logits = (normed.to(torch.bfloat16) @ unembed.W_U_bf16_T.T).float()
    else:
        logits = normed.float() @ unembed.W_U
    if unembed.b_U is not None:
        logits = logits + unembed.b_U
    if unembed.softcap is not None:
        logits = unembed.softcap * torch.tanh(logits / unembed.softcap)
    return logits


def lens_log_probs(
    translator: torch.nn.Module | None,
    resid: torch.Tensor,
    layer: int,
    final_norm: NormSpec | None,
    unembed: UnembedSpec,
) -> torch.Tensor:
    """log p of the lens at ``layer`` for rows [n, d]; translator None: the final-norm lens."""
    h = resid.float() if translator is None else translator(resid, layer)
    return torch.log_softmax(decode(apply_norm(h, final_norm), unembed), dim=-1)


def kl_nats(target_log_probs: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """KL(target || lens) per row, in nats (>= 0 up to rounding)."""
    return (target_log_probs.exp() * (target_log_probs - log_probs)).sum(dim=-1)


@dataclass(frozen=True)
class FitSettings:
    """How a translator is fitted; every field is recorded in the lens card."""

    steps: int = 300
    lr: float = 1e-3
    batch_rows: int = 128  # token positions per step
    layers_per_step: int = 4  # tuned only: lens layers updated per step (prism: all share one map)
    weight_decay: float = 0.0
    seed: int = 316
    # The training decode's matmul (lens_kernel.unembed.PRECISIONS); targets and held-out
    # evaluation are float32 whatever this says.
    precision: str = "bfloat16"


def step_sample(
    settings: FitSettings, step: int, n_rows: int, n_lens_layers: int
) -> tuple[torch.Tensor, list[int]]:
    """The rows and lens layers step ``step`` trains on: a function of (seed, step) alone, so a
    fit resumed at any step draws what an uninterrupted one would."""
    g = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
    rows = torch.randperm(n_rows, generator=g)[: settings.batch_rows]
    k = min(settings.layers_per_step, n_lens_layers)
    layers = torch.randperm(n_lens_layers, generator=g)[:k].sort().values.tolist()
    return rows, layers


def fit_step(
    translator: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    resid: torch.Tensor,
    target_log_probs: torch.Tensor,
    layers: list[int],
    final_norm: NormSpec | None,
    unembed: UnembedSpec,
) -> float:
    """One optimiser step on rows resid [layers_all, n, d] with targets [n, V]: the mean KL
    (nats) over ``layers`` and rows; returns that loss in bits."""
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    # Prism's Q is shared: one matrix exponential per step, and one backward through it. Each
    # layer's backward stops at a detached copy of Q, whose gradients add up; then that sum goes
    # back through exp(S - S^T) once (each layer's [rows, V] logits are freed after its own).
    q = translator.rotation() if isinstance(translator, Prism) else None
    q_leaf = None if q is None else q.detach().requires_grad_(True)
    for layer in layers:
        h = (
            translator(resid[layer], layer)
            if q_leaf is None
            else translator(resid[layer], layer, q_leaf)
        )
        lp = torch.log_softmax(decode(apply_norm(h, final_norm), unembed), dim=-1)
        kl = kl_nats(target_log_probs, lp).mean()
        (kl / len(layers)).backward()
        total += float(kl.detach())
    if q is not None and q_leaf is not None and q_leaf.grad is not None:
        q.backward(q_leaf.grad)
    optimizer.step()
    return total / len(layers) / LN2


@torch.no_grad()
def kl_by_layer_bits(
    translator: torch.nn.Module | None,
    resid: torch.Tensor,
    final_norm: NormSpec | None,
    unembed: UnembedSpec,
    chunk_rows: int = 256,
) -> list[float]:
    """Mean KL(final || lens) in bits per lens layer over rows resid [layers, n, d]; the final
    distribution is the last layer through the final norm and unembedding."""
    n_layers, n = resid.shape[0], resid.shape[1]
    sums = [0.0] * n_layers
    for start in range(0, n, chunk_rows):
        rows = resid[:, start : start + chunk_rows]
        target = lens_log_probs(None, rows[-1], n_layers - 1, final_norm, unembed)
        for layer in range(n_layers):
            lp = lens_log_probs(translator, rows[layer], layer, final_norm, unembed)
            sums[layer] += float(kl_nats(target, lp).double().sum())
    return [s / n / LN2 for s in sums]


def translator_from_state(kind: str, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A fitted translator from its weights (the ``lens.safetensors`` tensors: its state_dict's,
    with or without the file's "lens." prefix); shapes are read from the tensors. Raises
    ValueError on a wrong or partial set."""
    tensors = {k.removeprefix("lens."): v for k, v in tensors.items()}
    try:
        if kind == "tuned":
            bias = tensors["bias"]
            n, d = bias.shape
            rank = None if "weight" in tensors else int(tensors["down"].shape[-1])
            translator: torch.nn.Module = TunedLens(n, d, rank=rank)
        elif kind == "prism":
            translator = Prism(*(tensors[k] for k in ("mean", "std", "out_mean", "out_std")))
        else:
            raise ValueError(f"unknown translator kind {kind!r}; known: {TRANSLATOR_KINDS}")
        translator.load_state_dict({k: v.float() for k, v in tensors.items()})
    except (KeyError, RuntimeError) as exc:
        raise ValueError(f"{kind} lens weights do not make a {kind} translator: {exc}") from None
    return translator.eval()


def translator_shape(translator: torch.nn.Module) -> tuple[int | None, int]:
    """(lens layers, d_model) a translator is made for; prism serves any number of layers."""
    if isinstance(translator, TunedLens):
        return translator.n_lens_layers, translator.d_model
    if isinstance(translator, Prism):
        return None, translator.d_model
    raise TypeError(f"not a translator: {type(translator).__name__}")


@torch.no_grad()
def translate_layers(
    translator: torch.nn.Module, resid: torch.Tensor, rotation: torch.Tensor | None = None
) -> torch.Tensor:
    """Residuals [layers, ..., d] -> translated float32 residuals of the same shape, layer l by
    the translator's map for l (prism: its one rotation, ``rotation`` if given, else computed
    once here)."""
    q = None
    if isinstance(translator, Prism):
        q = translator.rotation() if rotation is None else rotation
    out = torch.empty(resid.shape, dtype=torch.float32, device=resid.device)
    for layer in range(resid.shape[0]):
        h = resid[layer]
        out[layer] = translator(h, layer) if q is None else translator(h, layer, q)
    return out
