"""The lens actor: loads one model once, then decodes batches of prompts into Arrow.

A plain class: ``sweep`` wraps it in ``ray.remote`` and decides where it runs. No files are
written here except the converted-GGUF cache (a model-loading concern, like the HF cache).
"""

from __future__ import annotations

import os
import platform
import string
import time
import unicodedata
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from actors.architectures import (
    architecture_facts,
    default_dtype,
    norm_spec,
    softcap_of,
)
from actors.config import WORKER_ENV, ActorConfig
from actors.devices import peak_memory_bytes, verify_placement, weight_device_map
from actors.errors import DeviceUnavailable, NumericOverflow, ParityError
from actors.prompts import PromptSpec, TokenisedBatch, bos_policy, tokenise
from actors.records import TokenTexts, interleave_by_prompt, records_batch, summary_batch
from actors.runtime import check_device, keep_freed_memory, set_determinism, set_threads
from actors.schema import PROMPT_SUMMARY_SCHEMA, RECORDS_SCHEMA, SCHEMA_VERSION
from actors.sources import architecture_of, load_config, load_hf, locate
from lens_kernel import (
    KL_BOUND_BITS,
    LENS_MODES,
    REL_BOUND,
    AuditRule,
    CollapseRule,
    LensInputs,
    LensOutputs,
    NormSpec,
    ParityStats,
    UnembedSpec,
    apply_norm,
    build_norm_plan,
    lens_pass,
    next_token_stats,
    parity_failures,
    parity_stats,
    temperature_topk,
)
from lens_kernel.audit import confirm_with_tuned
from lens_kernel.translators import (
    TRANSLATOR_KINDS,
    Prism,
    translate_layers,
    translator_from_state,
    translator_shape,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class BatchResult:
    records: pa.RecordBatch
    summary: pa.RecordBatch
    residuals: bytes | None = None  # safetensors bytes, when keep_residuals
    temperature: list[dict[str, Any]] = field(default_factory=list)
    # This batch's refused prompts ({"prompt_id", "error"}) and its parity figures (max_abs,
    # max_kl_bits, max_rel, top1_disagreements; empty when nothing was decoded): they travel
    # with the batch, so a model resumed from stored batches still reports them.
    prompt_failures: list[dict[str, str]] = field(default_factory=list)
    parity: dict[str, float] = field(default_factory=dict)


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

    # The model's logits are read at next-token positions only, in both positions modes, so its
    # head runs there only (see _forward). False: the head at every position, as before; for
    # benches and tests that compare the two.
    _head_where_read: bool = True

    def __init__(self, config: ActorConfig) -> None:
        t0 = time.perf_counter()
        self.config = config
        # First, before any parallel work: the threads Ray reserved CPUs for.
        self.torch_threads = set_threads(config.torch_threads)
        # Whether the worker's environment (the sweep's Ray runtime env) already had what CUDA
        # determinism needs before this process could touch CUDA, or the actor had to set it.
        self.worker_env_preset = all(os.environ.get(k) == v for k, v in WORKER_ENV.items())
        set_determinism(config.seed)
        self.heap_kept = keep_freed_memory()
        self.simulated_device: str | None = None
        try:
            self.device = check_device(config.device)
        except DeviceUnavailable:
            if not config.simulate_missing_device:
                raise
            self.simulated_device, self.device = config.device, torch.device("cpu")

        from transformer_lens.model_bridge import TransformerBridge

        # The config alone decides dtype and device map; the weights then load once, in that
        # dtype, straight onto the placed device(s).
        name_or_dir, provenance = locate(config.source, Path(config.cache_dir))
        hf_config = load_config(name_or_dir, config.source)
        self.facts = architecture_facts(architecture_of(hf_config))
        self.dtype = (
            DTYPES[config.dtype] if config.dtype else default_dtype(self.device.type, self.facts)
        )
        self.dtype_name = str(self.dtype).removeprefix("torch.")  # as the parity bounds key it
        devices = config.devices if self.simulated_device is None else ()
        self.weight_devices = [check_device(d) for d in devices] or [self.device]
        device_map = weight_device_map(hf_config, devices, self.device)
        hf_model, tokenizer = load_hf(name_or_dir, config.source, self.dtype, device_map)
        hf_model = hf_model.eval()
        # TransformerLens uses a model it is given where it is: the weights are already placed.
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
        moved: dict[int, NormSpec] = {}

        def plan_for(mode: str) -> list[NormSpec | None]:
            # Shared specs stay shared, within and across plans: the kernel groups layers by
            # spec identity.
            plan = build_norm_plan(mode, self.n_layers, final, ln1, ln2, self.facts.pre_norm)
            for spec in [*plan, final]:
                if spec is not None and id(spec) not in moved:
                    moved[id(spec)] = _to_device(spec, self.device)
            return [None if s is None else moved[id(s)] for s in plan]

        self.norm_plan = plan_for(config.lens)
        self.final_norm = moved[id(final)]
        self.norm_names = [None if s is None else s.name for s in self.norm_plan]
        # Every lens of the sweep: a norm plan each, and a translator for a trained lens (whose
        # translated residual is read through the final norm).
        self.lens_names = list(dict.fromkeys([config.lens, *config.lenses]))
        self.rotations: dict[str, torch.Tensor] = {}
        self.translators = self._load_translators(dict(config.translator_weights))
        self.lens_plans = {
            name: plan_for("final" if name in self.translators else name)
            for name in self.lens_names[1:]
        }
        unembed = self.bridge.unembed.original_component
        bias = getattr(unembed, "bias", None)
        self.unembed = UnembedSpec(
            W_U=_float32_transposed(unembed.weight.detach(), self.device),
            # TransformerBridge gives lm_head an all-zero bias; skipping it saves a [rows, V] pass.
            b_U=None
            if bias is None or not bool(bias.any())
            else bias.detach().to(self.device, torch.float32),
            softcap=softcap_of(self.hf_config, self.facts),
            precision=config.unembed_precision,
        )
        self._check_placement()
        self.rule = CollapseRule(config.copy_threshold, config.copy_margin)
        self.audit_rule = AuditRule() if config.audit else None
        # Tokens that never count as an echo of the prompt: special ones (BOS) and, by text,
        # whitespace- or punctuation-only ones (decided per id on first sight).
        self._special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
        self._echo_ok: dict[int, bool] = {}
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
        self.parity = {"max_abs": 0.0, "max_kl_bits": 0.0, "max_rel": 0.0, "top1_disagreements": 0}
        self.prompt_failures: list[dict[str, str]] = []
        self.timings = {"load_s": time.perf_counter() - t0, "lens_s": 0.0}
        self.batches_done = 0

    def _load_translators(self, weights: dict[str, bytes]) -> dict[str, torch.nn.Module]:
        """The trained lenses asked for, built from the driver's weights and checked against
        this model's shape."""
        from safetensors.torch import load

        out: dict[str, torch.nn.Module] = {}
        d_model = int(self.bridge.cfg.d_model)
        for name in self.lens_names:
            if name not in TRANSLATOR_KINDS:
                continue
            if name == self.config.lens:
                raise ValueError(
                    f"lens = {name!r}: the primary lens must be a norm mode "
                    f"({', '.join(LENS_MODES)}); list trained lenses in lenses"
                )
            if name not in weights:
                raise ValueError(f"{self.config.name}: lens {name!r} asked for but no weights "
                                 "were given (the driver fits or finds them: sweep.fit)")  # fmt: skip
            translator = translator_from_state(name, load(weights[name]))
            n_lens, d = translator_shape(translator)
            if d != d_model or n_lens not in (None, self.n_layers + 1):
                raise ValueError(
                    f"{self.config.name}: the {name} lens was fitted for {n_lens} lens layers of "
                    f"width {d}, this model has {self.n_layers + 1} of width {d_model}; refit "
                    "it: python -m sweep.fit MANIFEST"
                )
            out[name] = translator.to(self.device)
            if isinstance(translator, Prism):  # its rotation is fixed: made once, not per batch
                with torch.no_grad():
                    self.rotations[name] = out[name].rotation()
        return out

    # ---- one batch -------------------------------------------------------------------------

    def run_batch(self, prompts: list[PromptSpec]) -> BatchResult:
        """Decode one batch of prompts (all of one positions mode) into Arrow record batches."""
        t0 = time.perf_counter()
        modes = {p.positions for p in prompts}
        if len(modes) != 1:
            raise ValueError(f"a batch holds prompts of one positions mode, got {sorted(modes)}")
        all_positions = modes == {"all"}
        prompts, refused = self._screen(prompts)
        if not prompts:  # every prompt of this batch was refused: nothing to decode
            self.batches_done += 1
            return BatchResult(
                pa.RecordBatch.from_pylist([], schema=RECORDS_SCHEMA),
                pa.RecordBatch.from_pylist([], schema=PROMPT_SUMMARY_SCHEMA),
                prompt_failures=refused,
            )
        batch = tokenise(self.tokenizer, prompts, self.bos_id, self.pad_id, self.n_ctx)
        with torch.inference_mode():
            model_logits, resid = self._forward(batch, all_positions)
            inputs = self._lens_inputs(batch, resid, all_positions)
            out = self._lens(inputs, model_logits)
            parity = parity_stats(model_logits, out.final_logits)
            batch_parity = self._check_parity(batch, parity)
            outs = {self.config.lens: out}
            for name in self.lens_names[1:]:
                outs[name] = self._lens(inputs, out.final_logits, name)
            if "tuned" in outs and out.prompt_audit is not None:
                confirm_with_tuned(
                    out.prompt_audit,
                    out.collapse.L_semantic,
                    outs["tuned"].next.answer_rank,
                    inputs.answer_ids,
                    AuditRule().confirm_window if self.audit_rule is None
                    else self.audit_rule.confirm_window,
                )  # fmt: skip
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
        ids = [p.id for p in batch.prompts]
        model_top = _squeeze_rows(model_stats.rows)
        records = interleave_by_prompt(
            [records_batch(self.config.name, batch, o, self.texts, lens=name)
             for name, o in outs.items()], ids)  # fmt: skip
        summary = interleave_by_prompt(
            [summary_batch(self.config.name, batch, o, model_top, model_stats.answer_prob[0],
                           model_stats.answer_rank[0], parity.max_abs, self.texts, lens=name)
             for name, o in outs.items()], ids)  # fmt: skip
        residuals = self._residual_bytes(batch, resid) if self.config.keep_residuals else None
        self.timings["lens_s"] += time.perf_counter() - t0
        self.batches_done += 1
        return BatchResult(records, summary, residuals, temps, refused, batch_parity)

    def token_lengths(self, prompts: list[PromptSpec]) -> list[int]:
        """Each prompt's token count as ``run_batch`` tokenises it (BOS included): what the
        driver plans batches by. Tokenizer only, no forward."""
        extra = 0 if self.bos_id is None else 1
        texts = [p.text for p in prompts]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        return [len(i) + extra for i in ids]

    def _screen(self, prompts: list[PromptSpec]) -> tuple[list[PromptSpec], list[dict[str, str]]]:
        """The prompts that fit the model's context, and a failure for each one that does not
        (also kept in ``diagnostics()['prompt_failures']``): the others go on."""
        kept, refused = [], []
        for p, n in zip(prompts, self.token_lengths(prompts), strict=True):
            if n > self.n_ctx:
                error = f"{n} tokens, longer than the model's context of {self.n_ctx}"
                refused.append({"prompt_id": p.id, "error": error})
            else:
                kept.append(p)
        self.prompt_failures.extend(refused)
        return kept, refused

    def measure_parity(
        self, prompts: list[PromptSpec], final_norm: NormSpec | None = None
    ) -> ParityStats:
        """Parity of lens and model at the next-token position, without the gate: for measuring
        what the gate must allow and what it catches (``bench.parity_dtypes`` passes a
        deliberately wrong ``final_norm``; default: the model's own)."""
        batch = tokenise(self.tokenizer, prompts, self.bos_id, self.pad_id, self.n_ctx)
        norm = self.final_norm if final_norm is None else final_norm
        with torch.inference_mode():
            model_logits, resid = self._forward(batch, all_positions=False)
            final = apply_norm(resid[-1], norm, keep_bias=True)
            return parity_stats(model_logits, self.unembed.reference(final))

    def _forward(
        self, batch: TokenisedBatch, all_positions: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Model logits at next-token positions [B, V] (float32) and the hooked residuals.

        The logits are the model's own: its lm_head and soft cap, run on the next-token rows
        only (a hook on ``unembed.hook_in``), which is all anything reads. Not HF's
        ``logits_to_keep``: with right padding its 1-D form keeps every distinct next position
        for every prompt (B x distinct rows), and its per-prompt 2-D form is too recent."""
        ids = batch.input_ids.to(self.device)
        mask = batch.attention_mask.to(self.device)
        at_next = _NextTokenRows(batch.next_pos)
        captured: list[torch.Tensor | None] = [None] * (self.n_layers + 1)

        def keep(layer: int):
            def hook(x: torch.Tensor, hook: Any) -> torch.Tensor:
                # Keep only the positions the lens needs: gathered where the layer ran, then
                # moved to the lens device (a split model's blocks run elsewhere); the full
                # tensor is freed with the layer.
                seen = x.detach()
                captured[layer] = (
                    seen.to(self.device, copy=True)
                    if all_positions
                    else at_next(seen).to(self.device)
                )
                return x

            return hook

        def head_at_next(x: torch.Tensor, hook: Any) -> torch.Tensor:
            # The final-normed hidden state entering the model's own lm_head: [B, T, d] ->
            # [B, 1, d], so the head (and Gemma's softcap after it) runs on one row per prompt.
            return at_next(x).unsqueeze(1)

        hooks = [(n, keep(i)) for i, n in enumerate(self.hook_names)]
        if self._head_where_read:
            hooks.append(("unembed.hook_in", head_at_next))
        logits = self.bridge.run_with_hooks(ids, attention_mask=mask, fwd_hooks=hooks)
        missing = [self.hook_names[i] for i, t in enumerate(captured) if t is None]
        if missing:
            raise RuntimeError(f"hooks did not fire: {missing}")
        resid = torch.stack([t for t in captured if t is not None])  # [layers, B, (T,) d]
        head = logits[:, 0] if self._head_where_read else at_next(logits)  # [B, V]
        return head.to(self.device).float(), resid

    def _lens_inputs(
        self, batch: TokenisedBatch, resid: torch.Tensor, all_positions: bool
    ) -> LensInputs:
        prompt_ids = torch.where(
            batch.attention_mask.bool(), batch.input_ids, torch.full_like(batch.input_ids, -1)
        )
        common = {
            "prompt_ids": prompt_ids.to(self.device),
            "answer_ids": batch.answer_ids.to(self.device),
            "foil_ids": batch.foil_ids.to(self.device),
            "echo_ids": self._echo_ids(prompt_ids).to(self.device),
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

    def _lens(
        self, inputs: LensInputs, model_logits: torch.Tensor, lens: str | None = None
    ) -> LensOutputs:
        """The lens pass with this actor's norms, unembedding and rules: the primary lens (with
        the audit setting), or another ``lens`` of the sweep from the same residuals (its own
        norm plan, a trained lens's translation first, no audit: the audit is raw against the
        primary). ``model_logits``: the head's logits for the primary, the primary's reference
        (the model's output, for KL) for another lens."""
        primary = lens is None or lens == self.config.lens
        plan = self.norm_plan if primary else self.lens_plans[lens]
        translator = None if primary else self.translators.get(lens)
        if translator is not None:
            q = self.rotations.get(lens)
            inputs = replace(
                inputs,
                resid_next=translate_layers(translator, inputs.resid_next, q),
                resid_all=None if inputs.resid_all is None
                else translate_layers(translator, inputs.resid_all, q),
            )  # fmt: skip
        return lens_pass(
            inputs,
            plan,
            self.unembed,
            top_k=self.config.top_k,
            rule=self.rule,
            keep_bias=self.config.keep_layernorm_bias,
            chunk_bytes=self.config.chunk_bytes,
            final_norm=self.final_norm,
            audit=self.audit_rule if primary else None,
            head_logits=model_logits if primary else None,
            reference_logits=None if primary else model_logits,
        )

    def _echo_ids(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """Prompt ids [B, T] (-1 padded) with non-echo tokens set to -1 (see __init__)."""
        new = [i for i in torch.unique(prompt_ids).tolist() if i >= 0 and i not in self._echo_ok]
        if new:
            for i, text in zip(new, self.texts(np.array(new)).to_pylist(), strict=True):
                self._echo_ok[i] = i not in self._special_ids and not _blank_or_punct(text)
        keep = [i for i, ok in self._echo_ok.items() if ok]
        eligible = torch.isin(prompt_ids, torch.tensor(keep, dtype=prompt_ids.dtype))
        return torch.where(eligible, prompt_ids, torch.full_like(prompt_ids, -1))

    def _check_placement(self) -> None:
        """Every weight on the placed device(s), every lens tensor on the lens device."""
        lens = {"unembed.W_U": self.unembed.W_U, "unembed.b_U": self.unembed.b_U}
        for spec in [*self.norm_plan, self.final_norm]:
            if spec is not None:
                lens[f"lens norm {spec.name}.weight"] = spec.weight
                lens[f"lens norm {spec.name}.bias"] = spec.bias
        model = self.bridge.original_model
        verify_placement(model, lens, self.weight_devices, self.device, self.config.name)

    def _check_parity(self, batch: TokenisedBatch, parity: ParityStats) -> dict[str, float]:
        """The dtype-scaled parity gate (lens_kernel.parity); overflow is named as such.
        Returns the batch's figures (also folded into the actor's running maxima)."""
        dtype = self.dtype_name
        finite = parity.model_finite
        if not bool(finite.all()):
            bad = [p.id for p, ok in zip(batch.prompts, finite.tolist(), strict=True) if not ok]
            known = (
                f" ({self.facts.family} is known to)" if dtype in self.facts.overflows_in else ""
            )
            raise NumericOverflow(
                f"{self.config.name}: the model's own forward gave non-finite logits in {dtype} "
                f"(prompts {', '.join(bad[:3])}): it overflowed in {dtype}{known}, which is not a "
                'lens error; use dtype = "bfloat16" or "float32" for this model'
            )
        figures = {
            "max_abs": float(parity.max_abs.max()),
            "max_kl_bits": float(parity.kl_bits.max()),
            "max_rel": float(parity.relative_error(dtype).max()),
            "top1_disagreements": int((~parity.top1_agree).sum()),
        }
        for key, value in figures.items():
            total = self.parity[key]
            self.parity[key] = total + value if key == "top1_disagreements" else max(total, value)
        failed = parity_failures(parity, dtype)
        if bool(failed.any()):
            i = int(failed.nonzero()[0, 0])
            raise ParityError(
                f"{self.config.name}: lens at the last layer does not reproduce the model's "
                f"output on prompt {batch.prompts[i].id!r} in {dtype}: max |diff| "
                f"{float(parity.max_abs[i]):.3g} = {float(parity.relative_error(dtype)[i]):.3g} "
                f"eps x scale (bound {REL_BOUND[dtype]:g}), KL(model || lens) "
                f"{float(parity.kl_bits[i]):.3g} bits (bound {KL_BOUND_BITS[dtype]:g}), top-1 "
                f"{'agrees' if bool(parity.top1_agree[i]) else 'differs'}; the final norm or "
                f"unembedding is not applied as the model does ({self.facts.family}); please "
                "report it"
            )
        return figures

    def _temperature(
        self, batch: TokenisedBatch, model_logits: torch.Tensor
    ) -> list[dict[str, Any]]:
        """The model's own next-token top-k at each temperature, for the manifest's own
        [[prompts]]; a prompt set's thousands of prompts are read through their statistics (the
        rows would be most of the output JSON). Returned with the batch, never kept here: an
        actor's memory follows its batch, not the number of prompts."""
        rows: list[dict[str, Any]] = []
        keep = [b for b, p in enumerate(batch.prompts) if p.prompt_set is None]
        if not keep:
            return rows
        picked = torch.tensor(keep, device=model_logits.device)
        model_logits = model_logits.index_select(0, picked)
        prompts = [batch.prompts[b] for b in keep]
        for t in self.config.temperatures:
            stats = temperature_topk(model_logits, t, self.config.top_k)
            ids = stats.top_ids.cpu().numpy()
            texts = self.texts(ids).to_pylist()
            k = ids.shape[1]
            for b, p in enumerate(prompts):
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
        dtype = self.dtype_name
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
            "lenses": self.lens_names,
            "translators": {
                name: {
                    "n_lens_layers": translator_shape(t)[0],
                    "d_model": translator_shape(t)[1],
                    "rank": getattr(t, "rank", None),
                }
                for name, t in self.translators.items()
            },
            "final_logit_softcap": self.unembed.softcap,
            "dtype": {
                "compute": self.dtype_name,
                "lens_norm": "float32",
                # The lens rows' matmul as run here (tf32 off CUDA runs float32), as asked, and
                # the parity gate's and KL target's, which is float32 whatever the lens rows use.
                "unembed": self.unembed.effective_precision,
                "unembed_requested": self.config.unembed_precision,
                "reference": "float32",
            },
            "device": str(self.device),
            "weight_devices": [str(d) for d in self.weight_devices],
            "simulated_device": self.simulated_device,
            "torch_threads": self.torch_threads,  # torch's intra-op threads after set_threads
            "bos_policy": self.bos_policy,
            "seed": self.config.seed,
            "deterministic": {
                "algorithms": torch.are_deterministic_algorithms_enabled(),
                "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
                "worker_env_preset": self.worker_env_preset,
            },
            "copy_rule": {
                "threshold": self.rule.copy_threshold,
                "margin": self.rule.copy_margin,
                "entropy_collapse_bits": self.rule.entropy_collapse_bits,
            },
            "top_k": self.config.top_k,
            "audit": None
            if self.audit_rule is None
            else {
                **{k: v for k, v in asdict(self.audit_rule).items()},
                "echo_tokens": "distinct prompt ids; special tokens and whitespace- or "
                "punctuation-only tokens excluded",
            },
            "parity": {
                "max_abs_lens_minus_model_logits": self.parity["max_abs"],
                "max_kl_model_to_lens_bits": self.parity["max_kl_bits"],
                "top1_disagreements": self.parity["top1_disagreements"],
                "max_relative_error": self.parity["max_rel"],
                "kl_bound_bits": KL_BOUND_BITS[dtype],
                "relative_error_bound": REL_BOUND[dtype],
                "gate": "max|diff| <= R eps scale, KL(model || lens) <= bound, same top-1 "
                "unless a near tie (lens_kernel/parity.py)",
            },
            "prompt_failures": self.prompt_failures,
            "timings": dict(self.timings),
            "allocator": "glibc keeps freed buffers for reuse"
            if self.heap_kept
            else "platform default",
            "memory": peak_memory_bytes(self.weight_devices),
            "batches": self.batches_done,
            "versions": _versions(),
        }


class _NextTokenRows:
    """Gathers each prompt's next-token row, [B, T, ...] -> [B, ...], on whatever device the
    tensor is on (a split model's layers run on several); index copies are made once per device."""

    def __init__(self, next_pos: torch.Tensor) -> None:
        self.next_pos = next_pos
        self._index: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.device not in self._index:
            pos = self.next_pos.to(x.device)
            self._index[x.device] = (torch.arange(pos.shape[0], device=x.device), pos)
        rows, pos = self._index[x.device]
        return x[rows, pos]


def _blank_or_punct(text: str) -> bool:
    """Whitespace or punctuation only (SentencePiece's word marker counts as a space)."""
    shown = text.replace("\u2581", " ").replace("\u0120", " ").replace("\u010a", " ")
    return all(
        c.isspace() or c in string.punctuation or unicodedata.category(c)[0] == "P" for c in shown
    )


def _float32_transposed(weight: torch.Tensor, device: torch.device) -> torch.Tensor:
    """[V, d] weight -> contiguous float32 [d, V] on ``device``, with one float32 buffer (not a
    cast copy and then a transposed copy: 4 GiB less at peak for a 256k-vocabulary model)."""
    out = torch.zeros((weight.shape[1], weight.shape[0]), dtype=torch.float32, device=device)
    return out.copy_(weight.T)


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
