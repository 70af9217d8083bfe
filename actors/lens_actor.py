"""The lens actor: loads one model once, then decodes batches of prompts into Arrow.

A plain class: ``sweep`` wraps it in ``ray.remote`` and decides where it runs. No files are
written here except the converted-GGUF cache (a model-loading concern, like the HF cache).
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from actors.architectures import (
    architecture_facts,
    default_dtype,
    norm_spec,
    softcap_of,
)
from actors.config import ActorConfig
from actors.errors import DeviceUnavailable, ParityError
from actors.prompts import PromptSpec, TokenisedBatch, bos_policy, tokenise
from actors.records import TokenTexts, records_batch, summary_batch
from actors.runtime import check_device, set_determinism
from actors.schema import SCHEMA_VERSION
from actors.sources import architecture_of, load_hf, locate
from lens_kernel import (
    CollapseRule,
    LensInputs,
    UnembedSpec,
    build_norm_plan,
    lens_pass,
    next_token_stats,
    temperature_topk,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PARITY_ATOL = {torch.float32: 1e-4, torch.float16: 5e-2, torch.bfloat16: 2.5e-1}


@dataclass
class BatchResult:
    records: pa.RecordBatch
    summary: pa.RecordBatch
    residuals: bytes | None = None  # safetensors bytes, when keep_residuals
    temperature: list[dict[str, Any]] = field(default_factory=list)


def _versions() -> dict[str, str]:
    import transformer_lens
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "transformer_lens": getattr(transformer_lens, "__version__", "unknown"),
        "pyarrow": pa.__version__,
    }


class LensActor:
    """Loads a model through TransformerLens and runs the deterministic lens pass on batches."""

    def __init__(self, config: ActorConfig) -> None:
        t0 = time.perf_counter()
        self.config = config
        set_determinism(config.seed)
        self.simulated_device: str | None = None
        try:
            self.device = check_device(config.device)
        except DeviceUnavailable:
            if not config.simulate_missing_device:
                raise
            self.simulated_device, self.device = config.device, torch.device("cpu")

        from transformer_lens.model_bridge import TransformerBridge

        # The architecture (from the config alone) decides the dtype; weights load once, in it.
        name_or_dir, provenance = locate(config.source, Path(config.cache_dir))
        self.facts = architecture_facts(architecture_of(name_or_dir, config.source))
        self.dtype = (
            DTYPES[config.dtype] if config.dtype else default_dtype(self.device.type, self.facts)
        )
        hf_model, tokenizer = load_hf(name_or_dir, config.source, self.dtype)
        hf_model = hf_model.eval()
        self.bridge = TransformerBridge.boot_transformers(
            name_or_dir,
            hf_model=hf_model,
            tokenizer=tokenizer,
            device=str(self.device),
            dtype=self.dtype,
        )
        self.bridge.eval()
        self.tokenizer = tokenizer
        self.hf_config = hf_model.config
        cfg = self.bridge.cfg
        self.n_layers = int(cfg.n_layers)
        self.n_ctx = int(cfg.n_ctx)

        final = norm_spec(self.bridge.ln_final.original_component, self.facts, "ln_final")
        blocks = self.bridge.blocks
        ln1 = [
            norm_spec(b.ln1.original_component, self.facts, f"blocks.{i}.ln1")
            for i, b in enumerate(blocks)
        ]
        ln2 = [
            norm_spec(b.ln2.original_component, self.facts, f"blocks.{i}.ln2")
            for i, b in enumerate(blocks)
        ]
        plan = build_norm_plan(config.lens, self.n_layers, final, ln1, ln2, self.facts.pre_norm)
        moved = {id(s): _to_device(s, self.device) for s in [*plan, final] if s is not None}
        self.final_norm = moved[id(final)]
        # Shared specs stay shared: the kernel groups layers by spec identity.
        self.norm_plan = [None if s is None else moved[id(s)] for s in plan]
        self.norm_names = [None if s is None else s.name for s in self.norm_plan]
        unembed = self.bridge.unembed.original_component
        bias = getattr(unembed, "bias", None)
        self.unembed = UnembedSpec(
            W_U=unembed.weight.detach().float().T.contiguous(),
            # TransformerBridge gives lm_head an all-zero bias; skipping it saves a [rows, V] pass.
            b_U=None if bias is None or not bool(bias.any()) else bias.detach().float(),
            softcap=softcap_of(self.hf_config, self.facts),
        )
        self.rule = CollapseRule(config.copy_threshold, config.copy_margin)
        self.bos_id, self.bos_policy = bos_policy(tokenizer, config.prepend_bos)
        pad = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        self.pad_id = int(pad if pad is not None else 0)
        self.texts = TokenTexts(tokenizer)
        self.hook_names = ["blocks.0.hook_resid_pre"] + [
            f"blocks.{i}.hook_resid_post" for i in range(self.n_layers)
        ]
        self.provenance = provenance
        self.parity_max_abs = 0.0
        self.temperature_rows: list[dict[str, Any]] = []
        self.timings = {"load_s": time.perf_counter() - t0, "lens_s": 0.0}
        self.batches_done = 0

    # ---- one batch -------------------------------------------------------------------------

    def run_batch(self, prompts: list[PromptSpec]) -> BatchResult:
        """Decode one batch of prompts (all of one positions mode) into Arrow record batches."""
        t0 = time.perf_counter()
        modes = {p.positions for p in prompts}
        if len(modes) != 1:
            raise ValueError(f"a batch holds prompts of one positions mode, got {sorted(modes)}")
        all_positions = modes == {"all"}
        batch = tokenise(self.tokenizer, prompts, self.bos_id, self.pad_id, self.n_ctx)
        with torch.inference_mode():
            model_logits, resid = self._forward(batch, all_positions)
            out = lens_pass(
                self._lens_inputs(batch, resid, all_positions),
                self.norm_plan,
                self.unembed,
                top_k=self.config.top_k,
                rule=self.rule,
                keep_bias=self.config.keep_layernorm_bias,
                chunk_bytes=self.config.chunk_bytes,
                final_norm=self.final_norm,
            )
            parity = (out.final_logits - model_logits).abs().amax(dim=-1)  # [B]
            self._check_parity(float(parity.max()))
            model_stats = next_token_stats(
                model_logits.unsqueeze(0),
                torch.log_softmax(model_logits, dim=-1),
                batch.answer_ids.to(self.device),
                batch.input_ids.to(self.device),
                self.config.top_k,
                self.rule.copy_threshold,
                self.rule.copy_margin,
            )
            temps = self._temperature(batch, model_logits)
        records = records_batch(self.config.name, batch, out, self.texts)
        summary = summary_batch(
            self.config.name,
            batch,
            out,
            _squeeze_rows(model_stats.rows),
            model_stats.answer_prob[0],
            model_stats.answer_rank[0],
            parity,
            self.texts,
        )
        residuals = self._residual_bytes(batch, resid) if self.config.keep_residuals else None
        self.timings["lens_s"] += time.perf_counter() - t0
        self.batches_done += 1
        return BatchResult(records, summary, residuals, temps)

    def _forward(
        self, batch: TokenisedBatch, all_positions: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Model logits at next-token positions [B, V] (float32) and the hooked residuals."""
        ids = batch.input_ids.to(self.device)
        mask = batch.attention_mask.to(self.device)
        next_pos = batch.next_pos.to(self.device)
        rows = torch.arange(ids.shape[0], device=self.device)
        captured: list[torch.Tensor | None] = [None] * (self.n_layers + 1)

        def keep(layer: int):
            def hook(x: torch.Tensor, hook: Any) -> torch.Tensor:
                # Keep only the positions the lens needs; the full tensor is freed with the layer.
                captured[layer] = (
                    x.detach().clone() if all_positions else x[rows, next_pos].detach().clone()
                )
                return x

            return hook

        logits = self.bridge.run_with_hooks(
            ids,
            attention_mask=mask,
            fwd_hooks=[(n, keep(i)) for i, n in enumerate(self.hook_names)],
        )
        missing = [self.hook_names[i] for i, t in enumerate(captured) if t is None]
        if missing:
            raise RuntimeError(f"hooks did not fire: {missing}")
        resid = torch.stack([t for t in captured if t is not None])  # [layers, B, (T,) d]
        return logits[rows, next_pos].float(), resid

    def _lens_inputs(
        self, batch: TokenisedBatch, resid: torch.Tensor, all_positions: bool
    ) -> LensInputs:
        prompt_ids = torch.where(
            batch.attention_mask.bool(), batch.input_ids, torch.full_like(batch.input_ids, -1)
        )
        common = {
            "prompt_ids": prompt_ids.to(self.device),
            "answer_ids": batch.answer_ids.to(self.device),
        }
        if not all_positions:
            return LensInputs(resid_next=resid, **common)
        rows = torch.arange(resid.shape[1], device=resid.device)
        next_pos = batch.next_pos.to(resid.device)
        positions = batch.attention_mask.bool().clone()
        positions[torch.arange(positions.shape[0]), batch.next_pos] = (
            False  # next-token rows come from `next`
        )
        return LensInputs(
            resid_next=resid[:, rows, next_pos],
            resid_all=resid,
            positions=positions.to(self.device),
            **common,
        )

    def _check_parity(self, max_abs: float) -> None:
        self.parity_max_abs = max(self.parity_max_abs, max_abs)
        tol = PARITY_ATOL.get(self.dtype, 1e-4)
        if not max_abs <= tol:
            raise ParityError(
                f"{self.config.name}: lens at the last layer differs from the model's logits by "
                f"{max_abs:.3g} (tolerance {tol:g} in {self.dtype}); the final norm or unembedding "
                f"is not applied as the model does ({self.facts.family}); please report it"
            )

    def _temperature(
        self, batch: TokenisedBatch, model_logits: torch.Tensor
    ) -> list[dict[str, Any]]:
        rows = []
        for t in self.config.temperatures:
            stats = temperature_topk(model_logits, t, self.config.top_k)
            ids = stats.top_ids.cpu().numpy()
            texts = self.texts(ids).to_pylist()
            k = ids.shape[1]
            for b, p in enumerate(batch.prompts):
                rows.append(
                    {
                        "prompt_id": p.id,
                        "temperature": t,
                        "entropy_bits": float(stats.entropy_bits[b]),
                        "top": [
                            {
                                "token": texts[b * k + j],
                                "id": int(ids[b, j]),
                                "prob": float(stats.top_probs[b, j]),
                            }
                            for j in range(k)
                        ],
                    }
                )
        self.temperature_rows.extend(rows)
        return rows

    def _residual_bytes(self, batch: TokenisedBatch, resid: torch.Tensor) -> bytes:
        from safetensors.torch import save

        tensors = {}
        for b, p in enumerate(batch.prompts):
            r = resid[:, b, : int(batch.lengths[b])] if resid.dim() == 4 else resid[:, b]
            tensors[p.id] = r.float().contiguous().cpu()
        return save(
            tensors,
            metadata={
                "layout": "[layers, pos, d_model]" if resid.dim() == 4 else "[layers, d_model]"
            },
        )

    # ---- after the batches -----------------------------------------------------------------

    def diagnostics(self) -> dict[str, Any]:
        """A JSON-able record of what was loaded, how the lens ran, and its self-checks."""
        cfg = self.bridge.cfg
        n_params = sum(p.numel() for p in self.bridge.original_model.parameters())
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.config.name,
            "source": self.provenance,
            "architecture": self.hf_config.architectures[0],
            "family": self.facts.family,
            "n_params": n_params,
            "n_layers": self.n_layers,
            "d_model": int(cfg.d_model),
            "n_heads": int(cfg.n_heads),
            "d_vocab": int(cfg.d_vocab),
            "n_ctx": self.n_ctx,
            "norm": {
                "kind": self.facts.norm_kind,
                "final": type(self.bridge.ln_final.original_component).__name__,
                "block_ln1": type(self.bridge.blocks[0].ln1.original_component).__name__,
                "weight_offset": self.facts.norm_weight_offset,
                "pre_norm": self.facts.pre_norm,
                "keep_layernorm_bias": self.config.keep_layernorm_bias,
                "lens_norm_per_layer": self.norm_names,
            },
            "positional": self.facts.positional,
            "lens": self.config.lens,
            "final_logit_softcap": self.unembed.softcap,
            "dtype": {
                "compute": str(self.dtype).removeprefix("torch."),
                "lens_norm": "float32",
                "unembed": "float32",
            },
            "device": str(self.device),
            "simulated_device": self.simulated_device,
            "bos_policy": self.bos_policy,
            "seed": self.config.seed,
            "copy_rule": {
                "threshold": self.rule.copy_threshold,
                "margin": self.rule.copy_margin,
                "entropy_collapse_bits": self.rule.entropy_collapse_bits,
            },
            "top_k": self.config.top_k,
            "parity": {
                "max_abs_lens_minus_model_logits": self.parity_max_abs,
                "tolerance": PARITY_ATOL.get(self.dtype, 1e-4),
            },
            "temperature_exploration": self.temperature_rows,
            "timings": dict(self.timings),
            "batches": self.batches_done,
            "versions": _versions(),
        }


def _to_device(spec: Any, device: torch.device) -> Any:
    from dataclasses import replace

    return replace(
        spec,
        weight=None if spec.weight is None else spec.weight.to(device),
        bias=None if spec.bias is None else spec.bias.to(device),
    )


def _squeeze_rows(rows: Any) -> Any:
    from lens_kernel import RowStats

    return RowStats(rows.entropy_bits[0], rows.top_ids[0], rows.top_probs[0], rows.rest_mass[0])
