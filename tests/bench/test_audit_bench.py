"""The audit bench's pure helpers: workloads, the cost model, ratios, verdicts, table lines, and
the research shape's config and model list.

Nothing here loads a model or builds a checkpoint, and nothing asserts a timing.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from bench.audit_bench import (
    CostModel,
    cost_model,
    parse_args,
    ratio,
    render_row,
    tokens_per_prompt,
    verdict,
    workloads,
)
from bench.bench_models import (
    RESEARCH_SHAPES,
    bench_models,
    checkpoint_dir,
    select,
)
from bench.device_check import SHAPES_DIR, shape_config, shape_names
from sweep.manifest import load_manifest
from tests.conftest import REPO_ROOT

DEMO = ["SmolLM2-135M-Instruct", "gemma-3-270m"]


@pytest.fixture(scope="module")
def prompts():
    return list(load_manifest(REPO_ROOT / "manifests" / "demo.toml").prompts)


def test_demo_workloads_are_seed_next_and_all1(prompts):
    w = workloads(prompts, 32)
    assert list(w) == ["seed", "next32", "all1"]
    assert [len(b) for b in w["next32"]] == [32]
    assert w["all1"][0][0].role == "primary" and w["all1"][0][0].positions == "all"
    for batches in w.values():
        assert all(len({p.positions for p in b}) == 1 for b in batches)


def test_a_research_shape_runs_next8_and_all1_without_the_seed(prompts):
    w = workloads(prompts, 8, seed=False)
    assert list(w) == ["next8", "all1"]
    (batch,) = w["next8"]
    assert len(batch) == 8 and {p.positions for p in batch} == {"next"}
    assert len({p.id for p in batch}) == 8


def test_tokens_per_prompt_counts_padding_and_bos(smollm2_tok):
    from actors.prompts import PromptSpec

    actor = SimpleNamespace(
        tokenizer=smollm2_tok, bos_id=smollm2_tok.bos_token_id, pad_id=0, n_ctx=64
    )
    short, long = PromptSpec("a", "Berlin"), PromptSpec("b", "Berlin is the capital of")
    n_short, n_long = (
        len(smollm2_tok(p.text, add_special_tokens=False)["input_ids"]) + 1  # + BOS
        for p in (short, long)
    )
    assert n_short < n_long
    assert tokens_per_prompt(actor, [[short, long]]) == n_long  # padded to the longest
    assert tokens_per_prompt(actor, [[short], [long, long, long]]) == (n_short + 3 * n_long) / 4


def test_ratio_is_the_median_of_each_rounds_on_over_off():
    times = {"e2e on": [2.0, 3.0, 30.0], "e2e off": [1.0, 2.0, 10.0]}
    assert ratio(times, "e2e") == pytest.approx(2.0)  # of 2.0, 1.5, 3.0


def test_cost_model_shares_and_prediction():
    cost = CostModel(off_s=2.0, forward_share=0.5, matmul_share=0.3)
    assert cost.rest_share == pytest.approx(0.2)
    assert cost.predicted == pytest.approx(1.3)


def test_cost_model_takes_shares_round_by_round():
    # A round that ran while the machine was twice as slow still gives F / T_off = 0.5.
    times = {"e2e off": [2.0, 4.0, 2.0], "forward": [1.0, 2.0, 1.0], "matmul": [0.2, 0.4, 0.6]}
    cost = cost_model(times)
    assert cost.off_s == 2.0
    assert cost.forward_share == pytest.approx(0.5)
    assert cost.matmul_share == pytest.approx(0.1)
    assert cost.predicted == pytest.approx(1.1)


def test_the_figures_of_the_brief_predict_the_two_regimes():
    # Gemma-3-270M-like: the matmul bigger than the forward -> over 1.3x from the matmul alone;
    # a research shape: the forward dominates -> well within.
    tiny = CostModel(off_s=1.0, forward_share=0.25, matmul_share=0.55)
    research = CostModel(off_s=1.0, forward_share=0.75, matmul_share=0.15)
    assert verdict(1.6, tiny.predicted) == "OVER 1.3x (matmul-bound)"
    assert verdict(1.17, research.predicted) == "ok"


@pytest.mark.parametrize(
    ("measured", "predicted", "expected"),
    [(1.3, 1.2, "ok"), (1.31, 1.2, "OVER 1.3x"), (1.5, 1.4, "OVER 1.3x (matmul-bound)")],
)
def test_verdict(measured, predicted, expected):
    assert verdict(measured, predicted) == expected


def test_a_table_row_shows_shares_and_both_ratios():
    cost = CostModel(off_s=1.234, forward_share=0.6, matmul_share=0.15)
    row = render_row("Llama-3.2-1B-shape", "next8", 9.4, 136, cost, 1.21, 1.9)
    assert row.split() == [
        "Llama-3.2-1B-shape", "next8", "9", "136", "1.234", "60%", "15%", "25%",
        "1.15x", "1.21x", "1.90x", "ok",
    ]  # fmt: skip


@pytest.mark.parametrize("flag", ["--repeats", "--threads"])
def test_counts_below_one_are_refused(flag):
    with pytest.raises(SystemExit):
        parse_args([flag, "0"])


def test_defaults():
    args = parse_args([])
    assert (args.repeats, args.threads, args.models) == (5, None, None)


def test_models_are_the_demo_ones_then_the_research_shape():
    models = bench_models()
    assert [m.name for m in models] == [*DEMO, "Llama-3.2-1B-shape"]
    assert [m.shape for m in models] == [None, None, "Llama-3.2-1B"]
    assert [m.name for m in select(models, ["Llama-3.2-1B-shape", DEMO[0]])] == [
        DEMO[0], "Llama-3.2-1B-shape",
    ]  # fmt: skip
    assert select(models, None) == models


def test_an_unknown_model_name_is_an_error_naming_the_known_ones():
    with pytest.raises(SystemExit, match="known: SmolLM2-135M-Instruct, gemma-3-270m"):
        select(bench_models(), ["Llama-9000"])


def test_the_checkpoint_lives_in_the_cache(tmp_path):
    assert checkpoint_dir(tmp_path, "Llama-3.2-1B") == tmp_path / "bench-shapes" / "Llama-3.2-1B"


def test_research_shapes_are_not_in_all_toml():
    # bench/shapes holds one config per model of all.toml (the device check's list) and these.
    names = shape_names()
    assert not set(RESEARCH_SHAPES.values()) & set(names)
    assert {p.stem for p in SHAPES_DIR.glob("*.json")} == set(names) | set(RESEARCH_SHAPES.values())


def test_the_llama_3_2_1b_shape_is_the_real_one():
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = SimpleNamespace(bos_token_id=1, eos_token_id=2, pad_token_id=None)
    cfg = shape_config("Llama-3.2-1B", tiny=False, tokenizer=tokenizer)
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)
    raw = json.loads((SHAPES_DIR / "Llama-3.2-1B.json").read_text())
    assert raw["rope_scaling"]["rope_type"] == "llama3" and raw["tie_word_embeddings"] is True
    config = AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    # Llama-3.2-1B has 1,235,814,400 parameters (the tied embedding counted once).
    assert sum(p.numel() for p in model.parameters()) == 1_235_814_400
