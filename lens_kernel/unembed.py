"""The unembedding: residual rows -> vocabulary logits, in float32 or an opt-in faster precision."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# The lens rows' matmul precision. float32 is the seed's policy (bit-identical results); tf32 is
# CUDA's tensor-core float32 (elsewhere it runs float32); bfloat16 rounds the operands and the
# result to bf16 (AVX512-BF16 / AMX on the CPU, tensor cores on GPUs), then recomputes each row's
# top candidates exactly. The reference (parity gate, KL target) is float32 whatever is chosen.
PRECISIONS = ("float32", "tf32", "bfloat16")
# bfloat16: each row's REFINE_TOP largest logits are recomputed in float32, so its top-1 is
# float32's unless that is not among bf16's top 4 (bf16 stores a logit of 20 to +-0.06, enough to
# reorder near ties: 96.5% top-1 agreement on SmolLM2's rows without the recompute, 100% with).
REFINE_TOP = 4
_BLOCK = 64  # vocabulary columns per block when looking for each row's top candidates


@dataclass(frozen=True, eq=False)
class UnembedSpec:
    """logits = softcap(x @ W_U + b_U), the matmul in ``precision``, the rest float32.

    softcap (Gemma 2/3 ``final_logit_softcapping``): logits = cap * tanh(z / cap).
    """

    W_U: torch.Tensor  # [d_model, vocab] float32
    b_U: torch.Tensor | None = None  # [vocab] float32
    softcap: float | None = None
    precision: str = "float32"  # one of PRECISIONS; for the lens rows only, never reference()
    # bfloat16 only: W_U transposed to [vocab, d_model] in bf16, made once here (oneDNN runs
    # x @ W^T with this layout about 1.3x faster than x @ W on an AVX512-BF16 CPU).
    W_U_bf16_T: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"unembed precision must be one of {', '.join(map(repr, PRECISIONS))}, "
                f"got {self.precision!r}"
            )
        if self.precision == "bfloat16":
            w = self.W_U
            # One bf16 buffer, no float32 transposed temporary (a 256k vocabulary's is 640 MiB).
            fast = torch.empty((w.shape[1], w.shape[0]), dtype=torch.bfloat16, device=w.device)
            object.__setattr__(self, "W_U_bf16_T", fast.copy_(w.T))

    @property
    def d_vocab(self) -> int:
        return int(self.W_U.shape[1])

    @property
    def effective_precision(self) -> str:
        """The precision the lens rows really get here: tf32 exists on CUDA only."""
        if self.precision == "tf32" and self.W_U.device.type != "cuda":
            return "float32"
        return self.precision

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for rows x [..., d_model] in ``precision``; ``out`` is an optional float32 buffer
        to write into. float32 (and tf32 off CUDA) runs exactly ``reference``'s kernels."""
        if self.precision == "bfloat16":
            logits = self._bfloat16_matmul(x, out)
        elif self.precision == "tf32" and x.is_cuda:
            # Scoped: the process keeps TF32 off (actors.runtime) for the model and the reference.
            before = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True
            try:
                logits = torch.matmul(x.float(), self.W_U, out=out)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = before
        else:
            logits = torch.matmul(x.float(), self.W_U, out=out)
        return self._finish(logits)

    def reference(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """float32 logits whatever the lens precision: the parity gate's and KL's reference."""
        return self._finish(torch.matmul(x.float(), self.W_U, out=out))

    def _finish(self, logits: torch.Tensor) -> torch.Tensor:
        # In place after the matmul: the same kernels and operand order, without new [rows, V]
        # tensors (inference only: autograd cannot differentiate through tanh_ then mul_).
        if self.b_U is not None:
            logits.add_(self.b_U)
        if self.softcap is not None:
            logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return logits

    def _bfloat16_matmul(self, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        """x @ W_U with bf16 operands (float32 accumulation, bf16 result), written as float32;
        then each row's REFINE_TOP largest logits recomputed from the float32 x and W_U.

        Error: bf16 keeps 8 significant bits (unit roundoff u = 2^-8), so an unrefined logit z is
        off by at most u |z| + 2.01 u sum_i |x_i W_i| (result, then operand rounding).
        """
        assert self.W_U_bf16_T is not None  # made in __post_init__ for this precision
        rows = x.reshape(-1, x.shape[-1]).float()  # [n, d]
        fast = torch.matmul(rows.to(torch.bfloat16), self.W_U_bf16_T.T)  # [n, V] bf16
        if out is None:
            flat = fast.float()
            logits = flat.view(*x.shape[:-1], self.d_vocab)
        else:
            logits = out
            flat = out.view(rows.shape[0], self.d_vocab)
            flat.copy_(fast)
        # From the float32 copy: reducing float32 blocks is ~4x faster than bf16 ones on the CPU.
        ids = top_ids(flat, min(REFINE_TOP, self.d_vocab))  # [n, k], chosen before the bias
        d_model = rows.shape[1]
        columns = self.W_U.index_select(1, ids.flatten()).view(d_model, *ids.shape)  # [d, n, k]
        flat.scatter_(1, ids, torch.einsum("nd,dnk->nk", rows, columns))
        return logits


def top_ids(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Ids [n, k] of the k largest entries of each row of ``logits`` [n, V], in no set order.

    Reads [n, V] once: the k largest entries of a row lie in its k blocks of _BLOCK columns with
    the largest maxima (each makes its block's max >= the row's k-th largest value), so topk runs
    on the block maxima and then on k * _BLOCK candidates. Ties may pick either of equal entries.
    """
    n, vocab = logits.shape
    if vocab % _BLOCK or vocab < k * _BLOCK:
        return torch.topk(logits, k, dim=-1, sorted=False).indices
    blocks = logits.view(n, vocab // _BLOCK, _BLOCK)
    best = torch.topk(blocks.amax(-1), k, dim=-1, sorted=False).indices  # [n, k] block ids
    cols = (best.unsqueeze(-1) * _BLOCK + torch.arange(_BLOCK, device=logits.device)).flatten(1)
    pick = torch.topk(logits.gather(1, cols), k, dim=-1, sorted=False).indices
    return cols.gather(1, pick)
