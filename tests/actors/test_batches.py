"""What one ``run_batch`` returns: rows, flags, answers, BOS, schema, residuals, determinism."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors.torch import load as load_safetensors

from actors import (
    PROMPT_SUMMARY_SCHEMA,
    RECORDS_SCHEMA,
    SCHEMA_VERSION,
    ActorConfig,
    LensActor,
    ModelSource,
    PromptSpec,
)
from actors.schema import SchemaMismatch, check_batch
from tests.checkpoints import N_LAYERS

SEED_PROMPT = "Give the city name only, plain text. The capital of Germany is called simply"
# Different lengths, so a batch of them is right-padded; one without an answer.
TEXTS = [
    ("seed", SEED_PROMPT, "Berlin"),
    ("hi", "Hi", None),
    ("france", "The capital of France is", " Paris"),
]
# Compared within a tolerance on every row (None where the field is next-token only).
FLOAT_FIELDS = ("entropy_bits", "rest_mass", "answer_prob", "kl_to_final_bits")


def prompts(positions: str) -> list[PromptSpec]:
    return [PromptSpec(pid, text, answer, positions) for pid, text, answer in TEXTS]


def by_key(records: pa.RecordBatch) -> dict[tuple[str, int, int], dict[str, Any]]:
    return {(r["prompt_id"], r["layer"], r["pos"]): r for r in records.to_pylist()}


def assert_rows_close(got: dict[str, Any], want: dict[str, Any], atol: float) -> None:
    key = (want["prompt_id"], want["layer"], want["pos"])
    for name in FLOAT_FIELDS:
        if want[name] is None:
            assert got[name] is None, (key, name)
        else:
            assert got[name] == pytest.approx(want[name], abs=atol), (key, name)
    np.testing.assert_allclose(got["top_probs"], want["top_probs"], atol=atol, err_msg=str(key))
    p1, p2 = want["top_probs"][:2]
    if p1 - p2 > 10 * atol:  # top-1 is well separated: it must not move
        assert got["top_ids"][0] == want["top_ids"][0], key
        assert got["is_answer"] == want["is_answer"], key


# Rotary with GQA, sliding window with soft caps, learned absolute positions.
@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_batched_equals_one_by_one(tiny_actor, arch):
    # Right padding moves real positions by ~4e-5 (eager attention numerics), no more.
    actor = tiny_actor(arch)
    singles: dict[tuple[str, int, int], dict[str, Any]] = {}
    single_summaries = {}
    for p in prompts("all"):
        result = actor.run_batch([p])
        singles.update(by_key(result.records))
        single_summaries[p.id] = result.summary.to_pylist()[0]

    batched = by_key(actor.run_batch(prompts("all")).records)
    assert batched.keys() == singles.keys()
    for key, want in singles.items():
        assert_rows_close(batched[key], want, atol=1e-4)

    # Next-token-only batches give the same next-token rows as the all-position runs.
    next_result = actor.run_batch(prompts("next"))
    next_rows = by_key(next_result.records)
    assert next_rows.keys() == {k for k, r in singles.items() if r["is_next_token"]}
    for key, got in next_rows.items():
        assert_rows_close(got, singles[key], atol=1e-4)
    for row in next_result.summary.to_pylist():
        want = single_summaries[row["prompt_id"]]
        for name in ("n_tokens", "answer_token_id", "L_semantic", "final_answer_rank"):
            assert row[name] == want[name], name
        np.testing.assert_allclose(row["final_top_probs"], want["final_top_probs"], atol=1e-4)


def _fresh_actor(checkpoint, **config: Any) -> LensActor:
    return LensActor(ActorConfig(name="tiny", source=ModelSource(hf=str(checkpoint)), **config))


def test_two_fresh_actors_are_bit_identical(tiny_checkpoints):
    results = []
    for _ in range(2):
        actor = _fresh_actor(tiny_checkpoints["gemma2"])
        results.append([actor.run_batch(prompts(mode)) for mode in ("all", "next")])
    (all_a, next_a), (all_b, next_b) = results
    for a, b in ((all_a, all_b), (next_a, next_b)):
        assert a.records.equals(b.records)
        assert a.summary.equals(b.summary)
        assert a.temperature and a.temperature == b.temperature


def test_positions_all_and_next_rows(tiny_actor):
    actor = tiny_actor("llama")
    all_result = actor.run_batch(prompts("all"))
    next_result = actor.run_batch(prompts("next"))
    n_tokens = dict(
        zip(
            all_result.summary.column("prompt_id").to_pylist(),
            all_result.summary.column("n_tokens").to_pylist(),
            strict=True,
        )
    )
    for summary in (all_result.summary, next_result.summary):
        for row in summary.to_pylist():
            assert row["n_tokens"] == n_tokens[row["prompt_id"]]
            assert row["next_token_pos"] == row["n_tokens"] - 1
            assert row["n_layers"] == N_LAYERS

    rows = all_result.records.to_pylist()
    assert len(rows) == (N_LAYERS + 1) * sum(n_tokens.values())
    # Sorted by prompt (batch order), layer, position.
    order = [p.id for p in prompts("all")]
    keys = [(order.index(r["prompt_id"]), r["layer"], r["pos"]) for r in rows]
    assert keys == sorted(keys)
    for r in rows:
        is_next = r["pos"] == n_tokens[r["prompt_id"]] - 1
        assert r["is_next_token"] == is_next
        next_only = ("kl_to_final_bits", "copy_collapse", "entropy_collapse", "is_answer")
        for name in next_only:
            assert (r[name] is not None) == is_next, name
    assert sum(r["is_next_token"] for r in rows) == (N_LAYERS + 1) * len(n_tokens)

    next_rows = next_result.records.to_pylist()
    assert len(next_rows) == (N_LAYERS + 1) * len(n_tokens)
    assert all(r["is_next_token"] for r in next_rows)
    assert all(r["pos"] == n_tokens[r["prompt_id"]] - 1 for r in next_rows)
    assert [r["layer"] for r in next_rows] == list(range(N_LAYERS + 1)) * len(n_tokens)


def test_bos_prepended_once_and_recorded(tiny_actor, tiny_checkpoints, smollm2_tok):
    bos = smollm2_tok.bos_token_id
    actor = tiny_actor("llama")
    assert f"(id {bos}) prepended" in actor.diagnostics()["bos_policy"]
    records = actor.run_batch(prompts("all")).records.to_pylist()
    for pid, text, _ in TEXTS:
        ids = smollm2_tok(text, add_special_tokens=False)["input_ids"]
        got = [r["token_id"] for r in records if r["prompt_id"] == pid and r["layer"] == 0]
        assert got == [bos, *ids]  # exactly one BOS, then the prompt as written

    no_bos = tiny_actor("llama", prepend_bos=False)
    assert "no BOS" in no_bos.diagnostics()["bos_policy"]
    result = no_bos.run_batch(prompts("all"))
    records = result.records.to_pylist()
    for pid, text, _ in TEXTS:
        ids = smollm2_tok(text, add_special_tokens=False)["input_ids"]
        assert [r["token_id"] for r in records if r["prompt_id"] == pid and r["layer"] == 0] == ids
    assert max(result.summary.column("parity_max_abs").to_pylist()) <= 1e-4


def test_answer_token_and_answer_columns(tiny_actor, smollm2_tok):
    actor = tiny_actor("gpt2")
    result = actor.run_batch(
        [*prompts("next"), PromptSpec("spaced", SEED_PROMPT, " Berlin", "next")]
    )
    summary = {r["prompt_id"]: r for r in result.summary.to_pylist()}
    berlin = smollm2_tok(" Berlin", add_special_tokens=False)["input_ids"][0]
    assert summary["seed"]["answer_token_id"] == berlin
    assert summary["seed"]["answer_token"] == " Berlin"
    assert summary["seed"]["answer"] == "Berlin"
    # A leading space in the answer is not doubled.
    assert summary["spaced"]["answer_token_id"] == berlin
    paris = smollm2_tok(" Paris", add_special_tokens=False)["input_ids"][0]
    assert summary["france"]["answer_token_id"] == paris
    hi = summary["hi"]
    assert hi["answer"] is None and hi["answer_token_id"] is None and hi["answer_token"] is None
    assert hi["final_answer_prob"] is None and hi["final_answer_rank"] is None

    for r in result.records.to_pylist():
        answer_id = summary[r["prompt_id"]]["answer_token_id"]
        if answer_id is None:
            assert r["answer_prob"] is None and r["answer_rank"] is None
            assert r["is_answer"] is False
            continue
        assert 0.0 < r["answer_prob"] <= 1.0
        assert r["is_answer"] == (r["top_ids"][0] == answer_id)
        assert (r["answer_rank"] == 1) == r["is_answer"]
        if answer_id in r["top_ids"]:
            rank = r["top_ids"].index(answer_id)
            assert r["answer_rank"] == rank + 1
            assert r["answer_prob"] == pytest.approx(r["top_probs"][rank], rel=1e-5)
    # The model's own prediction is the lens's last layer.
    last = {r["prompt_id"]: r for r in result.records.to_pylist() if r["layer"] == N_LAYERS}
    for pid, row in summary.items():
        assert row["final_top_ids"] == last[pid]["top_ids"]
        if row["answer_token_id"] is not None:
            assert row["final_answer_rank"] == last[pid]["answer_rank"]


def test_arrow_batches_match_the_shared_schema(tiny_actor):
    actor = tiny_actor("qwen3")
    for mode in ("all", "next"):
        result = actor.run_batch(prompts(mode))
        assert check_batch(result.records, RECORDS_SCHEMA) is result.records
        assert check_batch(result.summary, PROMPT_SUMMARY_SCHEMA) is result.summary
        version = result.records.schema.metadata[b"lens_sweep.schema_version"]
        assert version == str(SCHEMA_VERSION).encode()
        assert result.residuals is None  # not asked for
    with pytest.raises(SchemaMismatch):
        check_batch(result.records.drop_columns(["rest_mass"]), RECORDS_SCHEMA)
    diag = actor.diagnostics()
    json.dumps(diag)  # JSON-able as the driver writes it
    assert diag["schema_version"] == SCHEMA_VERSION
    assert diag["n_layers"] == N_LAYERS and diag["architecture"] == "Qwen3ForCausalLM"
    assert diag["dtype"] == {
        "compute": "float32",
        "lens_norm": "float32",
        "unembed": "float32",
        "unembed_requested": "float32",
        "reference": "float32",
    }
    assert diag["simulated_device"] is None and diag["device"] == "cpu"


def test_keep_residuals_returns_loadable_safetensors(tiny_actor, smollm2_tok):
    actor = tiny_actor("llama", keep_residuals=True)
    d_model = actor.bridge.cfg.d_model
    all_result = actor.run_batch(prompts("all"))
    next_result = actor.run_batch(prompts("next"))
    full = load_safetensors(all_result.residuals)
    last = load_safetensors(next_result.residuals)
    assert full.keys() == last.keys() == {pid for pid, _, _ in TEXTS}
    for pid, text, _ in TEXTS:
        ids = [smollm2_tok.bos_token_id, *smollm2_tok(text, add_special_tokens=False)["input_ids"]]
        assert full[pid].shape == (N_LAYERS + 1, len(ids), d_model)
        assert full[pid].dtype == torch.float32
        assert last[pid].shape == (N_LAYERS + 1, d_model)
        # The residuals the lens decoded: layers 0..L-1 are the HF model's own hidden states.
        with torch.inference_mode():
            hidden = actor.bridge.original_model(torch.tensor([ids]), output_hidden_states=True)
        want = torch.stack(hidden.hidden_states[:N_LAYERS])[:, 0]
        torch.testing.assert_close(full[pid][:N_LAYERS], want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(last[pid], full[pid][:, -1], atol=1e-4, rtol=1e-4)


def test_prompts_longer_than_the_context_are_refused_alone(tiny_actor):
    base = tiny_actor("qwen2")
    # A fresh actor, so that its list of failures starts empty.
    actor = LensActor(ActorConfig(name="tiny-qwen2", source=base.config.source))
    too_long = PromptSpec("long", " ".join(["Paris"] * 600), "Paris")
    fine = PromptSpec("fine", "The capital of France is", "Paris")
    result = actor.run_batch([too_long, fine])
    assert result.summary.column("prompt_id").to_pylist() == ["fine"]
    assert actor.run_batch([too_long]).summary.num_rows == 0  # a batch of only refused prompts
    failures = actor.diagnostics()["prompt_failures"]
    assert [f["prompt_id"] for f in failures] == ["long", "long"]
    assert "longer than the model's context of 256" in failures[0]["error"]
