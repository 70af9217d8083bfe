"""The lens equals the model's own computation, for every supported architecture and lens mode.

- In every mode, the final norm + unembedding of the last layer reproduces the model's logits
  (the parity check, also the reference of KL); in final and next_ln1 that is the lens's own
  last-layer row, while raw decodes every layer, the last included, with no norm.
- At every layer and position, each mode decodes with the norm it names, against a reference
  built from HF pieces only: residuals from ``output_hidden_states`` (layers 0..L-1) and a
  pre-hook on the final norm (layer L), the HF norm modules, ``lm_head`` and the config's
  final-logit soft cap. Nothing of the actor or the kernel is reused.
- Each norm read by ``norm_spec`` and applied by the kernel equals calling the HF module, which
  is where LayerNorm's beta and Gemma's (1 + w) offset would go wrong.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from actors import BatchResult, PromptSpec
from actors.architectures import norm_spec
from lens_kernel import apply_norm
from tests.checkpoints import ARCHS, N_LAYERS

# Every architecture in the modes whose norms depend on it. Raw applies no norm: per
# architecture it still depends on the unembedding, the soft cap and the parity reference's
# final norm, which Llama (untied, RMSNorm), Gemma 2 (soft cap, (1 + w)) and GPT-2 (LayerNorm
# with bias) cover; each further actor load costs about a second.
MODE_CASES = [
    *((arch, lens) for lens in ("final", "next_ln1") for arch in ARCHS),
    *((arch, "raw") for arch in ("llama", "gemma2", "gpt2")),
]
# One right-padded batch: the first prompt is the longest, so its rows have no padding effects.
PROMPTS = [
    PromptSpec("capital", "The capital of Germany is called simply", "Berlin", "all"),
    PromptSpec("short", "Hello", None, "all"),
]


class LensRun(NamedTuple):
    actor: Any
    result: BatchResult


@pytest.fixture(scope="module")
def lens_run(tiny_actor):
    """``lens_run(arch, lens)``: the tiny actor and its result on PROMPTS, run once."""
    runs: dict[tuple[str, str], LensRun] = {}

    def get(arch: str, lens: str) -> LensRun:
        if (arch, lens) not in runs:
            actor = tiny_actor(arch, lens)
            runs[arch, lens] = LensRun(actor, actor.run_batch(PROMPTS))
        return runs[arch, lens]

    return get


@pytest.mark.parametrize(("arch", "lens"), MODE_CASES)
def test_last_layer_lens_equals_model_logits(lens_run, arch, lens):
    run = lens_run(arch, lens)
    diag = run.actor.diagnostics()
    assert diag["lens"] == lens
    assert diag["parity"]["max_abs_lens_minus_model_logits"] <= 1e-4
    summary = run.result.summary.to_pylist()
    assert len(summary) == len(PROMPTS)
    assert max(row["parity_max_abs"] for row in summary) <= 1e-4
    if lens == "raw":
        return
    # The lens's own last-layer row is the model's prediction: same top-k, KL to it ~0.
    last = {
        r["prompt_id"]: r
        for r in run.result.records.to_pylist()
        if r["is_next_token"] and r["layer"] == N_LAYERS
    }
    for row in summary:
        assert last[row["prompt_id"]]["top_ids"] == row["final_top_ids"]
        np.testing.assert_allclose(
            last[row["prompt_id"]]["top_probs"], row["final_top_probs"], atol=1e-5
        )
        assert last[row["prompt_id"]]["kl_to_final_bits"] < 1e-4


def _hf_residuals(actor: Any, text: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [T] and residuals [L + 1, T, d] from the HF model's forward."""
    tok = actor.tokenizer
    ids = torch.tensor([[tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]]])
    # The module the HF forward calls as its final norm (the bridge installed its wrapper there).
    seen: list[torch.Tensor] = []
    handle = actor.bridge.ln_final.register_forward_pre_hook(
        lambda _m, args: seen.append(args[0].clone())
    )
    try:
        with torch.inference_mode():
            out = actor.bridge.original_model(ids, output_hidden_states=True)
    finally:
        handle.remove()
    assert len(seen) == 1
    resid = torch.stack([*out.hidden_states[:N_LAYERS], seen[0]])[:, 0]
    return ids[0], resid


def _reference_norm(actor: Any, lens: str, layer: int) -> Any:
    """The HF module a lens mode applies at ``layer`` (None: identity)."""
    if lens == "raw":
        return None
    if layer == N_LAYERS or lens == "final":
        return actor.bridge.ln_final.original_component
    return actor.bridge.blocks[layer].ln1.original_component


def _reference_log_probs(actor: Any, lens: str, resid: torch.Tensor) -> torch.Tensor:
    """Float64 log-probs [L + 1, T, V] of the reference lens."""
    lm_head = actor.bridge.original_model.get_output_embeddings()
    cap = getattr(actor.hf_config, "final_logit_softcapping", None)
    rows = []
    with torch.inference_mode():
        for layer in range(N_LAYERS + 1):
            norm = _reference_norm(actor, lens, layer)
            x = resid[layer].float()
            logits = lm_head(x if norm is None else norm(x)).double()
            if cap:
                logits = cap * torch.tanh(logits / cap)
            rows.append(torch.log_softmax(logits, dim=-1))
    return torch.stack(rows)


def _layer_pos_grid(records: pa.RecordBatch, column: str) -> np.ndarray:
    """A per-row column as an array [layers, positions, ...]."""
    layer = np.asarray(records.column("layer"))
    pos = np.asarray(records.column("pos"))
    values = np.asarray(records.column(column).to_pylist())
    grid = np.full((layer.max() + 1, pos.max() + 1, *values.shape[1:]), np.nan)
    grid[layer, pos] = values
    return grid


@pytest.mark.parametrize(("arch", "lens"), MODE_CASES)
def test_lens_rows_equal_hf_reference(lens_run, arch, lens):
    run = lens_run(arch, lens)
    records = run.result.records
    records = records.filter(pc.equal(records.column("prompt_id"), PROMPTS[0].id))
    ids, resid = _hf_residuals(run.actor, PROMPTS[0].text)
    ref = _reference_log_probs(run.actor, lens, resid)  # [L + 1, T, V]
    assert records.num_rows == ref.shape[0] * ref.shape[1]  # every (layer, position) once

    assert np.array_equal(_layer_pos_grid(records, "token_id")[0], ids.numpy())
    ref_entropy = -(ref.exp() * ref).sum(-1) / math.log(2)
    np.testing.assert_allclose(_layer_pos_grid(records, "entropy_bits"), ref_entropy, atol=2e-4)
    # The reference's probabilities of the ids the lens reports as its top-k ...
    top_ids = torch.from_numpy(_layer_pos_grid(records, "top_ids").astype(np.int64))
    ref_top = ref.gather(-1, top_ids).exp().numpy()
    lens_top = _layer_pos_grid(records, "top_probs")
    np.testing.assert_allclose(lens_top, ref_top, rtol=1e-4, atol=1e-6)
    # ... are the reference's own top-k probabilities.
    ref_sorted = ref.topk(top_ids.shape[-1], dim=-1).values.exp().numpy()
    np.testing.assert_allclose(ref_top, ref_sorted, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_next_ln1_names_the_seed_rule_norms(tiny_actor, arch):
    names = tiny_actor(arch, "next_ln1").diagnostics()["norm"]["lens_norm_per_layer"]
    assert len(names) == N_LAYERS + 1
    for i, name in enumerate(names[:-1]):
        assert name.startswith(f"blocks.{i}.ln1:"), (i, name)
    assert names[-1].startswith("ln_final:")


def test_raw_and_final_name_their_norms(tiny_actor):
    raw = tiny_actor("llama", "raw").diagnostics()["norm"]["lens_norm_per_layer"]
    assert raw == [None] * (N_LAYERS + 1)
    final = tiny_actor("llama", "final").diagnostics()["norm"]["lens_norm_per_layer"]
    assert all(name.startswith("ln_final:") for name in final)


def _norm_modules(actor: Any):
    yield "ln_final", actor.bridge.ln_final.original_component
    for i, block in enumerate(actor.bridge.blocks):
        yield f"blocks.{i}.ln1", block.ln1.original_component
        yield f"blocks.{i}.ln2", block.ln2.original_component


@pytest.mark.parametrize("arch", ARCHS)
def test_norm_spec_matches_hf_norm_module(tiny_actor, arch):
    actor = tiny_actor(arch)
    gen = torch.Generator().manual_seed(0)
    # Off-centre, large residuals: both the mean and the scale matter.
    x = 4.0 * torch.randn(7, actor.bridge.cfg.d_model, generator=gen) + 1.5
    offset = 1.0 if arch.startswith("gemma") else 0.0
    for name, module in _norm_modules(actor):
        spec = norm_spec(module, actor.facts, name)
        assert spec.weight_offset == offset, name
        # The checkpoint's randomised weights really are away from the identity.
        assert float(spec.weight.std()) > 0.1, name
        with torch.inference_mode():
            expected = module(x.clone())
        torch.testing.assert_close(apply_norm(x, spec), expected, atol=1e-5, rtol=1e-5, msg=name)
        if arch == "gpt2":
            assert spec.bias is not None
            assert float(spec.bias.abs().mean()) > 0.1, name
            # Dropping beta (the seed note's variant) removes exactly the bias.
            torch.testing.assert_close(
                apply_norm(x, spec, keep_bias=False), expected - module.bias, atol=1e-5, rtol=1e-5
            )


def test_gemma2_final_logit_softcap_is_applied(tiny_actor):
    actor = tiny_actor("gemma2")
    assert actor.diagnostics()["final_logit_softcap"] == 30.0
    assert actor.hf_config.attn_logit_softcapping == 50.0
    x = 100.0 * torch.randn(3, actor.bridge.cfg.d_model, generator=torch.Generator().manual_seed(0))
    assert float(actor.unembed(x).abs().max()) <= 30.0


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_a_lens_with_a_wrong_final_norm_fails_the_parity_gate(tiny_checkpoints, arch):
    # The gate as the actor applies it: drop the final norm's weight (Gemma: its (1 + w) offset)
    # and every batch must raise ParityError naming the error in eps x scale.
    from dataclasses import replace

    from actors import ActorConfig, LensActor, ModelSource
    from actors.errors import ParityError

    actor = LensActor(
        ActorConfig(name=f"tiny-{arch}", source=ModelSource(hf=str(tiny_checkpoints[arch])))
    )
    healthy = actor.measure_parity(PROMPTS)
    assert (healthy.relative_error("float32") < 64).all()
    own = actor.final_norm
    broken = replace(own, weight_offset=0.0) if own.weight_offset else replace(own, weight=None)
    stats = actor.measure_parity(PROMPTS, broken)
    assert (stats.relative_error("float32") > 64).all() and (stats.kl_bits > 1e-5).all()
    actor.final_norm = broken  # the reference the gate compares against
    with pytest.raises(ParityError, match=r"eps x scale \(bound 64\).*please report it"):
        actor.run_batch(PROMPTS)


def test_bench_parity_dtypes_passes_the_own_norm_and_catches_a_dropped_one(
    tiny_checkpoints, tmp_path
):
    # The measurement behind README's parity table, on a tiny checkpoint in all three dtypes.
    from bench.parity_dtypes import measure

    manifest = tmp_path / "m.toml"
    manifest.write_text(
        f'[[models]]\nname = "tiny-gemma2"\nid = "{tiny_checkpoints["gemma2"]}"\n'
        '[[prompts]]\nid = "a"\ntext = "The capital of France is"\nanswer = "Paris"\n'
        '[[prompts]]\nid = "b"\ntext = "Hello there"\n'
    )
    rows = measure(manifest, "cpu")
    assert {(r["dtype"], r["lens"]) for r in rows} == {
        (d, lens)
        for d in ("float32", "bfloat16", "float16")
        for lens in ("own final norm", "norm weight dropped", "(1 + w) offset dropped")
    }
    for r in rows:
        assert r["gate_fails"] == ("0/2" if r["ok"] else "2/2"), r
