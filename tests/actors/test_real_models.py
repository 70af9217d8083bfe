"""Real pretrained models from the GGUFs shipped in PyPI wheels (FIXTURES.md): SmolLM2, Gemma 3.

Slow: the first conversion of each GGUF takes ~20 s (SmolLM2) and ~60 s (Gemma) and is cached
under LENS_SWEEP_CACHE; every later load reads the cached HF directory. Each model loads once
per module.
"""

from __future__ import annotations

import pytest

from actors import ActorConfig, LensActor, PromptSpec
from actors.schema import PROMPT_SUMMARY_SCHEMA, RECORDS_SCHEMA, check_batch

pytestmark = pytest.mark.slow

SEED_PROMPT = PromptSpec(
    "capital",
    "Give the city name only, plain text. The capital of Germany is called simply",
    "Berlin",
    "all",
    "primary",
)


@pytest.fixture(scope="module")
def smollm2(smollm2_source, test_cache):
    return LensActor(ActorConfig(name="smollm2", source=smollm2_source, cache_dir=str(test_cache)))


@pytest.fixture(scope="module")
def smollm2_seed_run(smollm2):
    return smollm2.run_batch([SEED_PROMPT])


@pytest.fixture(scope="module")
def gemma3(gemma3_source, test_cache):
    return LensActor(ActorConfig(name="gemma3", source=gemma3_source, cache_dir=str(test_cache)))


def _assert_gguf_provenance(diag: dict, file_type: str) -> None:
    source = diag["source"]
    assert "dequantised from GGUF" in source["note"]
    assert source["gguf_file_type"] == file_type
    assert len(source["gguf_sha256"]) == 64
    assert source["gguf_cache"] in ("hit", "miss")


def test_smollm2_parity_and_provenance(smollm2, smollm2_seed_run):
    diag = smollm2.diagnostics()
    assert diag["architecture"] == "LlamaForCausalLM"
    assert diag["n_layers"] == 30 and diag["d_model"] == 576 and diag["d_vocab"] == 49152
    assert diag["parity"]["max_abs_lens_minus_model_logits"] <= 1e-4
    assert max(smollm2_seed_run.summary.column("parity_max_abs").to_pylist()) <= 1e-4
    _assert_gguf_provenance(diag, "MOSTLY_Q4_1")
    check_batch(smollm2_seed_run.records, RECORDS_SCHEMA)
    check_batch(smollm2_seed_run.summary, PROMPT_SUMMARY_SCHEMA)


def test_smollm2_says_berlin_at_the_last_layer(smollm2, smollm2_seed_run):
    berlin = smollm2.tokenizer(" Berlin", add_special_tokens=False)["input_ids"][0]
    summary = smollm2_seed_run.summary.to_pylist()[0]
    assert summary["answer_token_id"] == berlin
    assert summary["answer_token"] == " Berlin"
    assert summary["final_top_ids"][0] == berlin
    assert summary["final_answer_rank"] == 1
    assert summary["final_answer_prob"] > 0.5  # ~0.8 in FIXTURES.md

    n_layers = summary["n_layers"]
    last = [
        r
        for r in smollm2_seed_run.records.to_pylist()
        if r["is_next_token"] and r["layer"] == n_layers
    ]
    assert len(last) == 1
    assert last[0]["top_ids"][0] == berlin
    assert last[0]["top_tokens"][0] == " Berlin"
    assert last[0]["is_answer"] is True
    assert last[0]["answer_rank"] == 1
    # The first layer at which ' Berlin' is top-1 exists and is at most the last.
    assert summary["L_semantic"] is not None and 0 <= summary["L_semantic"] <= n_layers


def test_smollm2_second_load_is_a_cache_hit(smollm2, smollm2_seed_run, smollm2_source, test_cache):
    again = LensActor(ActorConfig(name="smollm2", source=smollm2_source, cache_dir=str(test_cache)))
    diag = again.diagnostics()
    assert diag["source"]["gguf_cache"] == "hit"
    assert diag["source"]["gguf_sha256"] == smollm2.diagnostics()["source"]["gguf_sha256"]
    # A reload is the same model: bit-identical records.
    result = again.run_batch([SEED_PROMPT])
    assert result.records.equals(smollm2_seed_run.records)
    assert result.summary.equals(smollm2_seed_run.summary)


def test_gemma3_parity_and_provenance(gemma3):
    prompt = PromptSpec(SEED_PROMPT.id, SEED_PROMPT.text, SEED_PROMPT.answer, "next", "primary")
    result = gemma3.run_batch([prompt])
    diag = gemma3.diagnostics()
    assert diag["architecture"] == "Gemma3ForCausalLM"
    assert diag["n_layers"] == 18 and diag["d_model"] == 640 and diag["d_vocab"] == 262144
    assert diag["norm"]["weight_offset"] == 1.0
    assert diag["dtype"]["compute"] == "float32"  # the CPU policy, Gemma or not
    assert diag["parity"]["max_abs_lens_minus_model_logits"] <= 1e-4
    assert max(result.summary.column("parity_max_abs").to_pylist()) <= 1e-4
    _assert_gguf_provenance(diag, "MOSTLY_Q4_K_M")
    assert result.records.num_rows == diag["n_layers"] + 1


# ---- the lens-artefact audit on real models ---------------------------------------------------

FRANCE = PromptSpec(
    "control-fr",
    "Give the city name only, plain text. The capital of France is called simply",
    "Paris",
    "next",
    "control",
    reference="capital",
    foil="Berlin",
)


def _next_rows(result, prompt_id: str) -> list[dict]:
    rows = [
        r for r in result.records.to_pylist() if r["prompt_id"] == prompt_id and r["is_next_token"]
    ]
    return sorted(rows, key=lambda r: r["layer"])


@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_layer0_copy_reflex_shows_as_echo_mass_and_strict_copy(model, request):
    """Both demo models put p ~ 1 on the prompt's last word ' simply' at layer 0: the audit must
    see it as echo mass and as a strict copy at every threshold, and the echo must fade."""
    actor = request.getfixturevalue(model)
    prompt = PromptSpec(SEED_PROMPT.id, SEED_PROMPT.text, SEED_PROMPT.answer, "next", "primary")
    result = actor.run_batch([prompt])
    rows = _next_rows(result, SEED_PROMPT.id)
    layer0 = rows[0]
    assert layer0["top_tokens"][0] == " simply"
    assert layer0["echo_mass"] > 0.99
    assert all(layer0[f"copy_strict@{t}"] for t in ("0.7", "0.8", "0.9", "0.95"))
    assert layer0["copy_soft_k1"] is True
    summary = result.summary.to_pylist()[0]
    assert summary["L_copy_strict@0.95"] == 0 and summary["L_copy_soft_k1"] == 0
    assert rows[-1]["echo_mass"] < 0.5  # the output is not an echo of the prompt
    # The last layer's lens is the model head: no temperature misfit.
    assert summary["last_kl_lens_to_head_bits"] < 1e-3
    assert summary["last_temperature"] == 1.0
    assert summary["n_nonfinite_layers"] == 0
    assert rows[0]["resid_norm_ratio"] is None and rows[1]["resid_norm_ratio"] > 0


def test_smollm2_control_prompt_reads_the_fact_not_the_template(smollm2):
    """France -> Paris with Berlin as the foil: SmolLM2 says Paris at the end, so the control's
    margin p(Paris) - p(Berlin) is positive at the last layer and L_control_wins exists."""
    result = smollm2.run_batch([FRANCE])
    rows = _next_rows(result, "control-fr")
    summary = result.summary.to_pylist()[0]
    assert summary["role"] == "control" and summary["reference"] == "capital"
    assert summary["foil_token"] == " Berlin"
    last = rows[-1]
    assert last["control_margin"] == pytest.approx(last["answer_prob"] - last["foil_prob"])
    assert last["control_margin"] > 0
    wins = summary["L_control_wins"]
    assert wins is not None and rows[wins]["control_margin"] > 0
    assert all(r["control_margin"] <= 0 for r in rows[:wins])


def test_audit_off_leaves_the_lens_columns_bit_identical(smollm2, smollm2_source, test_cache):
    """audit = false: every audit column null, every other column the same bits as with it on."""
    from actors.schema import PROMPT_SUMMARY_SCHEMA, RECORDS_SCHEMA

    off = LensActor(
        ActorConfig(name="smollm2", source=smollm2_source, cache_dir=str(test_cache), audit=False)
    )
    on_result = smollm2.run_batch([SEED_PROMPT])
    off_result = off.run_batch([SEED_PROMPT])
    seed_records = RECORDS_SCHEMA.names[: RECORDS_SCHEMA.get_field_index("is_answer") + 1]
    seed_summary = PROMPT_SUMMARY_SCHEMA.names[
        : PROMPT_SUMMARY_SCHEMA.get_field_index("parity_max_abs") + 1
    ]
    assert off_result.records.select(seed_records).equals(on_result.records.select(seed_records))
    assert off_result.summary.select(seed_summary).equals(on_result.summary.select(seed_summary))
    for name in RECORDS_SCHEMA.names[len(seed_records) :]:
        assert off_result.records.column(name).null_count == off_result.records.num_rows, name
    first_audit = PROMPT_SUMMARY_SCHEMA.get_field_index("L_copy_strict@0.7")
    for name in PROMPT_SUMMARY_SCHEMA.names[first_audit:]:
        assert off_result.summary.column(name).null_count == 1, name
    assert off.diagnostics()["audit"] is None and smollm2.diagnostics()["audit"] is not None
