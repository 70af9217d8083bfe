"""Fits trained lenses (lens_kernel/translators.py) on one model: the LensActor's model, norms
and unembedding, plus residuals of ordinary text cached once and steps run in chunks, so the
driver can checkpoint between chunks and resume a killed fit where it stopped."""

from __future__ import annotations

import hashlib
import time
from dataclasses import replace
from typing import Any

import torch

from actors.lens_actor import LensActor
from lens_kernel import UnembedSpec
from lens_kernel.translators import (
    FitSettings,
    Prism,
    TunedLens,
    fit_step,
    kl_by_layer_bits,
    lens_log_probs,
    step_sample,
    whitening_stats,
)


class FitActor(LensActor):
    """A LensActor that also fits translators; Ray runs one per model."""

    def prepare(
        self, documents: list[str], seq_len: int, train_tokens: int, heldout_tokens: int
    ) -> dict[str, Any]:
        """Tokenise the documents (EOS between them), cut sequences of seq_len tokens (BOS first
        where the model takes one), run them through the model and keep every layer's residual
        at positions seq_len/4 .. seq_len-1 (late enough to have context, as prompts do). The
        first sequences give train_tokens rows, the next heldout_tokens rows (the split is by
        sequence, in text order: held-out text is never trained on)."""
        t0 = time.perf_counter()
        body = seq_len - (self.bos_id is not None)
        first = seq_len // 4
        per_seq = seq_len - first
        want = -(-train_tokens // per_seq) + -(-heldout_tokens // per_seq)
        eos = self.tokenizer.eos_token_id
        ids: list[int] = []
        for doc in documents:  # in order, until the sequences wanted are there
            ids += self.tokenizer(doc, add_special_tokens=False)["input_ids"]
            if eos is not None:
                ids.append(int(eos))
            if len(ids) >= want * body:
                break
        n_seq = min(len(ids) // body, want)
        n_train = min(-(-train_tokens // per_seq), n_seq - 1)
        if n_train < 1 or n_seq - n_train < 1:
            raise ValueError(
                f"the fit text gives {len(ids)} tokens: too few for one training and one "
                f"held-out sequence of {seq_len} tokens; give more text or a smaller seq_len"
            )
        seqs = torch.tensor(ids[: n_seq * body], dtype=torch.long).view(n_seq, body)
        if self.bos_id is not None:
            seqs = torch.cat([torch.full((n_seq, 1), self.bos_id, dtype=torch.long), seqs], 1)
        resid = self._residuals(seqs, first)  # [layers, n_seq * per_seq, d]
        split = n_train * per_seq
        self.train_resid = resid[:, :split][:, :train_tokens].contiguous()
        self.heldout_resid = resid[:, split:][:, :heldout_tokens].contiguous()
        digest = hashlib.sha256(seqs.numpy().tobytes()).hexdigest()
        return {
            "tokens_read": len(ids),
            "sequences": n_seq,
            "train_sequences": n_train,
            "train_rows": int(self.train_resid.shape[1]),
            "heldout_rows": int(self.heldout_resid.shape[1]),
            "positions": [first, seq_len - 1],
            "token_sha256": digest,
            "n_lens_layers": self.n_layers + 1,
            "d_model": int(self.train_resid.shape[-1]),
            "d_vocab": self.unembed.d_vocab,
            "bos": self.bos_policy,
            "prepare_s": time.perf_counter() - t0,
        }

    @torch.no_grad()
    def _residuals(self, seqs: torch.Tensor, first: int, batch: int = 8) -> torch.Tensor:
        out = []
        for start in range(0, seqs.shape[0], batch):
            ids = seqs[start : start + batch].to(self.device)
            captured: list[torch.Tensor | None] = [None] * (self.n_layers + 1)

            def keep(layer: int, into: list[torch.Tensor | None] = captured):
                def hook(x: torch.Tensor, hook: Any) -> torch.Tensor:
                    into[layer] = x.detach()[:, first:].to(self.device, torch.float32)
                    return x

                return hook

            hooks = [(n, keep(i)) for i, n in enumerate(self.hook_names)]
            self.bridge.run_with_hooks(ids, fwd_hooks=hooks)
            stacked = torch.stack([t for t in captured if t is not None])  # [layers, B, T, d]
            out.append(stacked.flatten(1, 2))
        return torch.cat(out, dim=1)

    def _translator(self, kind: str, rank: int | None, seed: int) -> torch.nn.Module:
        n, d = self.train_resid.shape[0], self.train_resid.shape[-1]
        if kind == "tuned":
            return TunedLens(n, d, rank=rank, seed=seed).to(self.device)
        if kind == "prism":
            mean, std = whitening_stats(self.train_resid[:-1])
            out_mean, out_std = whitening_stats(self.train_resid[-1])
            return Prism(mean, std, out_mean, out_std).to(self.device)
        raise ValueError(f"unknown translator kind {kind!r}")

    def fit(
        self,
        kind: str,
        settings: dict[str, Any],
        rank: int | None,
        state: bytes | None,
        until_step: int,
    ) -> dict[str, Any]:
        """Run steps from the state's step (0 without one) up to ``until_step``; returns the new
        state (weights, optimiser moments, step) as safetensors bytes and the steps' losses."""
        from safetensors.torch import load, save

        fs = FitSettings(**settings)
        translator = self._translator(kind, rank, fs.seed)
        params = dict(translator.named_parameters())
        optimizer = torch.optim.AdamW(params.values(), lr=fs.lr, weight_decay=fs.weight_decay)
        step = 0
        if state is not None:
            tensors = load(state)
            step = int(tensors.pop("step").item())
            translator.load_state_dict(
                {k.removeprefix("lens."): v for k, v in tensors.items() if k.startswith("lens.")}
            )
            for name, p in params.items():
                optimizer.state[p] = {
                    "step": tensors[f"adam.{name}.step"],
                    "exp_avg": tensors[f"adam.{name}.exp_avg"].to(self.device),
                    "exp_avg_sq": tensors[f"adam.{name}.exp_avg_sq"].to(self.device),
                }
        losses = []
        t0 = time.perf_counter()
        n_rows, n_layers = self.train_resid.shape[1], self.train_resid.shape[0]
        # The tuned lens's last layer stays the identity (the seed's rule): there the target is
        # the lens itself, the gradient is zero and Adam would only turn rounding into steps.
        trained = n_layers - 1 if kind == "tuned" else n_layers
        train_unembed = self._train_unembed(fs.precision)
        while step < until_step:
            rows, layers = step_sample(fs, step, n_rows, trained)
            resid = self.train_resid[:, rows.to(self.device)]
            with torch.no_grad():
                target = lens_log_probs(None, resid[-1], n_layers - 1, self.final_norm,
                                        self.unembed)  # fmt: skip
            loss = fit_step(
                translator, optimizer, resid, target, layers, self.final_norm, train_unembed
            )
            losses.append(loss)
            step += 1
        out = {
            f"lens.{k}": v.detach().cpu().contiguous() for k, v in translator.state_dict().items()
        }
        for name, p in params.items():
            s = optimizer.state.get(p)
            if s:
                out[f"adam.{name}.step"] = torch.as_tensor(s["step"]).reshape(()).cpu().clone()
                out[f"adam.{name}.exp_avg"] = s["exp_avg"].detach().cpu().contiguous()
                out[f"adam.{name}.exp_avg_sq"] = s["exp_avg_sq"].detach().cpu().contiguous()
        out["step"] = torch.tensor(step)
        return {"state": save(out), "step": step, "losses": losses,
                "seconds": time.perf_counter() - t0}  # fmt: skip

    def _train_unembed(self, precision: str) -> UnembedSpec:
        """The unembedding the training steps decode with (its bf16 copy made once)."""
        if precision == self.unembed.precision:
            return self.unembed
        cached = getattr(self, "_train_unembeds", {})
        if precision not in cached:
            cached[precision] = replace(self.unembed, precision=precision)
            self._train_unembeds = cached
        return cached[precision]

    def evaluate(self, kind: str, rank: int | None, state: bytes | None) -> dict[str, Any]:
        """Mean KL(model || lens) in bits per lens layer on the held-out rows, and the weights
        (safetensors bytes) of the fit ``state``; kind "final" is the final-norm logit lens (no
        translator). The tuned lens also reports how far each layer's map moved from the
        identity, the prism its orthogonality error."""
        from safetensors.torch import load, save

        translator = None
        weights = None
        if kind != "final":
            translator = self._translator(kind, rank, 0)
            lens = {k: v for k, v in load(state).items() if k.startswith("lens.")} if state else {}
            translator.load_state_dict({k.removeprefix("lens."): v for k, v in lens.items()})
            weights = save(lens)
        kl = kl_by_layer_bits(translator, self.heldout_resid, self.final_norm, self.unembed)
        out: dict[str, Any] = {"kind": kind, "kl_bits_by_layer": kl, "weights": weights}
        if isinstance(translator, TunedLens):
            out["change_by_layer"] = [translator.layer_change(i) for i in range(len(kl))]
        if isinstance(translator, Prism):
            q = translator.rotation().detach()
            eye = torch.eye(q.shape[0], device=q.device)
            out["orthogonality_error"] = float((q @ q.T - eye).abs().max())
        return out
