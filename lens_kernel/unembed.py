"""The unembedding: residual rows -> vocabulary logits."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class UnembedSpec:
    """logits = softcap(x @ W_U + b_U), all float32.

    softcap (Gemma 2/3 ``final_logit_softcapping``): logits = cap * tanh(z / cap).
    """

    W_U: torch.Tensor  # [d_model, vocab] float32
    b_U: torch.Tensor | None = None  # [vocab] float32
    softcap: float | None = None

    @property
    def d_vocab(self) -> int:
        return int(self.W_U.shape[1])

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for rows x [..., d_model]; ``out`` is an optional float32 buffer to write into."""
        # In place after the matmul: the same kernels and operand order, without new [rows, V]
        # tensors (inference only: autograd cannot differentiate through tanh_ then mul_).
        logits = torch.matmul(x.float(), self.W_U, out=out)
        if self.b_U is not None:
            logits.add_(self.b_U)
        if self.softcap is not None:
            logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return logits

    def reference(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """float32 logits whatever the lens precision: the parity gate's and KL's reference."""
        logits = torch.matmul(x.float(), self.W_U, out=out)
        if self.b_U is not None:
            logits.add_(self.b_U)
        if self.softcap is not None:
            logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return logits
