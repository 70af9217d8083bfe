"""Statistics across prompts (sweep/stats.py): hand-computed cases, the bootstrap against plain
index resampling, the first-token check, and the files and reports a run gets from them.

The prompts tables are real PROMPT_SUMMARY_SCHEMA tables (pyarrow); the run directory is written
by the driver's own ModelArtefacts, merge_run and build_reports.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib.image as mpimg
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors.schema import PROMPT_SUMMARY_SCHEMA, RECORDS_SCHEMA
from sweep.artefacts import artefact_paths, model_json
from sweep.files import write_json
from sweep.merge import merge_run
from sweep.report import build_reports
from sweep.reports.plots import DPI, depth_plot_figsize
from sweep.stats import (
    STATS_SCHEMA,
    bootstrap_fraction,
    bootstrap_median,
    first_token_check,
    has_many_prompts,
    prompt_statistics,
    relative_depths,
    statistics_block,
)
from tests.sweep.markdown_tables import table_rows

SEED = 316


def prompt_row(prompt_id: str, **values: Any) -> dict[str, Any]:
    """One PROMPT_SUMMARY_SCHEMA row: every field null unless given, required ones filled."""
    row: dict[str, Any] = dict.fromkeys(PROMPT_SUMMARY_SCHEMA.names)
    row.update(model="m", lens="final", prompt_id=prompt_id, role="test", n_tokens=4,
               next_token_pos=3,
               n_layers=8, answer="Paris", answer_token=" Paris", answer_token_id=10,
               final_top_ids=[10, 11], final_top_tokens=[" Paris", " Lyon"],
               final_top_probs=[0.6, 0.1], parity_max_abs=0.0)  # fmt: skip
    row.update(values)
    return row


def prompts_table(rows: list[dict[str, Any]]) -> pl.DataFrame:
    return pl.from_arrow(pa.Table.from_pylist(rows, schema=PROMPT_SUMMARY_SCHEMA))  # type: ignore[return-value]


def cell(stats: pl.DataFrame, measure: str, breakdown: str = "all", label: str = "all",
         subset: str = "all", prompt_set: str = "manifest") -> dict[str, Any]:  # fmt: skip
    (row,) = stats.filter(
        (pl.col("measure") == measure) & (pl.col("breakdown") == breakdown)
        & (pl.col("label") == label) & (pl.col("subset") == subset)
        & (pl.col("prompt_set") == prompt_set)
    ).to_dicts()  # fmt: skip
    return row


# Five test prompts with an answer over 8 layers, one without an answer, and a control and an
# ablation whose numbers would move every statistic if they were counted.
# top-1 correct: a, b, e (3 of 5). L_semantic: 2, 4, 4, 6, never -> depths .25 .5 .5 .75.
# L_copy: 1, never, never, 3, never -> depths .125 .375.
def small_case() -> pl.DataFrame:
    wrong = {"final_top_ids": [99, 10]}
    return prompts_table([
        prompt_row("a", L_semantic=2, L_copy=1, role="primary"),
        prompt_row("b", L_semantic=4),
        prompt_row("c", L_semantic=4, **wrong),
        prompt_row("d", L_semantic=6, L_copy=3, **wrong),
        prompt_row("e"),
        prompt_row("no-answer", answer=None, answer_token=None, answer_token_id=None, L_copy=0),
        prompt_row("ctl", role="control", L_semantic=0, L_copy=0, **wrong),
        prompt_row("abl", role="ablation", reference="a", L_semantic=8, **wrong),
    ])  # fmt: skip


def test_small_case_by_hand_and_roles_left_out():
    stats = prompt_statistics(small_case(), SEED)
    acc = cell(stats, "accuracy")
    assert (acc["n_prompts"], acc["n"], acc["n_hit"], acc["frac"]) == (6, 5, 3, 0.6)
    sem = cell(stats, "L_semantic")
    assert (sem["n"], sem["n_hit"], sem["frac"]) == (5, 4, 0.8)
    # linear quantiles of .25 .5 .5 .75: positions 0.75, 1.5, 2.25
    assert (sem["median"], sem["q25"], sem["q75"]) == (0.5, 0.4375, 0.5625)
    copy = cell(stats, "L_copy")  # the no-answer prompt's L_copy = 0 is not counted
    assert (copy["n"], copy["n_hit"], copy["frac"]) == (5, 2, 0.4)
    assert (copy["median"], copy["q25"], copy["q75"]) == (0.25, 0.1875, 0.3125)
    # The audit did not run: its measures are not reported rather than reported as never reached.
    assert set(stats["measure"]) == {"accuracy", "L_semantic", "L_copy",
                                     "answer_token_not_prefix", "answer_token_shared"}  # fmt: skip
    assert set(stats["prompt_set"]) == {"manifest"} and stats.schema == pl.Schema(STATS_SCHEMA)
    # Only primary and test prompts: a table of the control and the ablation alone is empty.
    others = small_case().filter(pl.col("role").is_in(["control", "ablation"]))
    assert prompt_statistics(others, SEED).is_empty()
    assert relative_depths(small_case())["prompt_id"].to_list() == ["a", "b", "c", "d", "e"]


def test_bootstrap_intervals_hold_the_estimate_and_repeat_for_a_seed():
    stats = prompt_statistics(small_case(), SEED)
    for measure in ("L_semantic", "L_copy"):
        c = cell(stats, measure)
        assert c["median_ci_low"] <= c["median"] <= c["median_ci_high"]
        assert c["median_ci_low"] >= min(0.125, c["q25"]) and c["median_ci_high"] <= 0.75
    for measure in ("accuracy", "L_semantic", "L_copy"):
        c = cell(stats, measure)
        assert c["frac_ci_low"] <= c["frac"] <= c["frac_ci_high"]
        assert c["frac_ci_low"] < c["frac_ci_high"]  # 5 prompts: a wide interval
    assert prompt_statistics(small_case(), SEED).equals(stats)  # same input, same output
    other = prompt_statistics(small_case(), SEED + 1)
    assert not other.equals(stats)
    assert other.drop("frac_ci_low", "frac_ci_high", "median_ci_low", "median_ci_high",
                      "seed").equals(stats.drop("frac_ci_low", "frac_ci_high", "median_ci_low",
                                                "median_ci_high", "seed"))  # fmt: skip


def test_constant_sample_gives_a_degenerate_interval():
    rows = [prompt_row(f"p{i}", L_semantic=4) for i in range(7)]
    c = cell(prompt_statistics(prompts_table(rows), SEED), "L_semantic")
    assert c["median"] == c["median_ci_low"] == c["median_ci_high"] == c["q25"] == c["q75"] == 0.5
    acc = cell(prompt_statistics(prompts_table(rows), SEED), "accuracy")
    assert (acc["frac"], acc["frac_ci_low"], acc["frac_ci_high"]) == (1.0, 1.0, 1.0)
    rng = np.random.default_rng(0)
    assert bootstrap_median(np.array([]), rng) == (None, None)
    assert bootstrap_fraction(0, 0, rng) == (None, None)


def test_bootstrap_matches_plain_index_resampling():
    """The count-based draws against resampling indices, with many resamples each."""
    rng = np.random.default_rng(7)
    for n in (9, 40, 301):
        values = rng.integers(0, 30, size=n) / 30
        draws = 40_000
        idx = np.random.default_rng(n).integers(0, n, size=(draws, n))
        ref_median = np.quantile(np.median(values[idx], axis=1), [0.025, 0.975])
        got = bootstrap_median(values, np.random.default_rng(1), n_boot=draws)
        assert got == pytest.approx(tuple(ref_median), abs=1.01 / 30), n
        hits = values < 0.5
        ref_frac = np.quantile(hits[idx].mean(axis=1), [0.025, 0.975])
        got_frac = bootstrap_fraction(int(hits.sum()), n, np.random.default_rng(2), draws)
        assert got_frac == pytest.approx(tuple(ref_frac), abs=1.01 / n), n


def test_breakdowns_by_template_and_group_with_unlabelled_prompts():
    rows = [
        prompt_row("fr-1", prompt_set="capitals", template="t1", group="Europe", L_semantic=4),
        prompt_row("fr-2", prompt_set="capitals", template="t2", group="Europe", L_semantic=6,
                   final_top_ids=[3, 10]),
        prompt_row("jp-1", prompt_set="capitals", template="t1", group="Asia", answer="Tokyo",
                   answer_token=" Tokyo", answer_token_id=20, final_top_ids=[20], L_semantic=2),
        prompt_row("jp-2", prompt_set="capitals", template="t2", answer="Tokyo",
                   answer_token=" Tokyo", answer_token_id=20, final_top_ids=[20]),
        prompt_row("seed", L_semantic=8),  # [[prompts]]: the manifest set, no labels
    ]  # fmt: skip
    stats = prompt_statistics(prompts_table(rows), SEED)
    labels = stats.filter((pl.col("prompt_set") == "capitals") & (pl.col("subset") == "all")
                          & (pl.col("measure") == "accuracy"))  # fmt: skip
    assert labels.select("breakdown", "label", "n", "n_hit").rows() == [
        ("all", "all", 4, 3), ("template", "t1", 2, 2), ("template", "t2", 2, 1),
        ("group", "Asia", 1, 1), ("group", "Europe", 2, 1), ("group", "(none)", 1, 1),
    ]  # fmt: skip
    t1 = cell(stats, "L_semantic", "template", "t1", prompt_set="capitals")
    assert (t1["n_hit"], t1["median"], t1["q25"], t1["q75"]) == (2, 0.375, 0.3125, 0.4375)
    t2 = cell(stats, "L_semantic", "template", "t2", prompt_set="capitals")
    assert (t2["n"], t2["n_hit"], t2["median"]) == (2, 1, 0.75)
    seed = stats.filter(pl.col("prompt_set") == "manifest")
    assert set(seed["breakdown"]) == {"all"}  # no labels: no template or group rows
    assert cell(stats, "L_semantic")["median"] == 1.0
    assert has_many_prompts(prompts_table(rows))
    assert not has_many_prompts(prompts_table([rows[4], {**rows[0], "role": "control"}]))


def test_first_token_check_flags_shared_ids_and_non_prefixes():
    def answer(pid: str, prompt_set: str, text: str, token: str, token_id: int, **kw: Any) -> dict:
        return prompt_row(pid, **{"prompt_set": prompt_set, "answer": text, "answer_token": token,
                                  "answer_token_id": token_id, "final_top_ids": [token_id], **kw})  # fmt: skip

    rows = [
        answer("cr", "c", "San José", " San", 5),
        answer("sm", "c", "San Marino", " San", 5, final_top_ids=[7]),  # the one wrong top-1
        # the same answer under two templates shares its id with itself only: not flagged
        answer("co-1", "c", "Bogotá", " Bog", 8),
        answer("co-2", "c", "Bogotá", " Bog", 8),
        answer("no", "c", "Oslo", " ", 9),
        answer("de", "c", "Berlin", "lin", 12),
        # the same id as San José, in another set: not shared
        answer("sa", "d", "Santiago", " San", 5),
        answer("sd", "d", "Santo Domingo", " Santo", 6),
        answer("ctl", "c", "Sana'a", " San", 5, role="control"),
    ]
    prompts = prompts_table(rows)
    check = first_token_check(prompts)
    flagged = {r["prompt_id"]: (r["not_prefix"], r["shared"]) for r in check.to_dicts()}
    assert flagged == {
        "cr": (False, True), "sm": (False, True), "co-1": (False, False), "co-2": (False, False),
        "no": (True, False), "de": (True, False), "sa": (False, False), "sd": (False, False),
    }  # fmt: skip
    assert check.filter(pl.col("prompt_id") == "cr")["shared_with"].to_list() == [["San Marino"]]
    stats = prompt_statistics(prompts, SEED)
    assert cell(stats, "answer_token_not_prefix", prompt_set="c")["n_hit"] == 2
    assert cell(stats, "answer_token_shared", prompt_set="c")["n_hit"] == 2
    # sm is wrong, the rest right: 5/6 over all, 2/2 over the unambiguous (co-1, co-2)
    assert cell(stats, "accuracy", prompt_set="c")["n_hit"] == 5
    clean = cell(stats, "accuracy", subset="unambiguous", prompt_set="c")
    assert (clean["n"], clean["n_hit"]) == (2, 2)
    block = statistics_block(prompts, SEED)["sets"][0]["first_token"]
    assert (block["n_checked"], block["n_not_prefix"], block["n_shared"], block["n_ambiguous"]) == (
        6, 2, 2, 4,
    )  # fmt: skip
    assert block["shared"] == [{"answer_token_id": 5, "answer_token": " San",
                                "answers": ["San José", "San Marino"], "prompt_ids": ["cr", "sm"]}]  # fmt: skip
    assert [x["prompt_id"] for x in block["not_prefix"]] == ["de", "no"]


def test_audit_measures_use_the_earliest_strict_copy_layer():
    rows = [
        prompt_row(f"p{i}", lens_artefact_score=0.1, L_semantic=4, L_semantic_confirmed=c,
                   **{"L_copy_strict@0.7": s70, "L_copy_strict@0.95": s95})
        for i, (c, s70, s95) in enumerate([(4, 2, 6), (None, None, 3), (4, None, None)])
    ]  # fmt: skip
    stats = prompt_statistics(prompts_table(rows), SEED)
    strict = cell(stats, "L_copy_strict")
    assert (strict["n_hit"], strict["median"]) == (2, 0.3125)  # layers 2 and 3 of 8
    confirmed = cell(stats, "L_semantic_confirmed")
    assert (confirmed["n"], confirmed["n_hit"], confirmed["median"]) == (3, 2, 0.5)


def test_json_block_holds_the_table_and_is_plain_json():
    prompts = small_case()
    block = json.loads(json.dumps(statistics_block(prompts, SEED), allow_nan=False))
    stats = prompt_statistics(prompts, SEED)
    assert (block["seed"], block["n_boot"], block["roles"]) == (SEED, 1000, ["primary", "test"])
    (manifest,) = block["sets"]
    assert (manifest["n_prompts"], manifest["n_with_answer"]) == (6, 5)
    for b in manifest["breakdowns"]:
        for measure, values in b["measures"].items():
            row = cell(stats, measure, b["breakdown"], b["label"], b["subset"])
            assert values == {k: row[k] for k in values}, (b["subset"], measure)
    assert set(manifest["breakdowns"][0]["measures"]["L_semantic"]) >= {"median", "median_ci_low"}


# A run directory as the driver leaves it: the Parquet files in the real schemas, the JSON by
# model_json, a ledger and the resolved manifest; then the driver's merge and reports.
CAPITALS = [("France", "Paris", "Europe"), ("Germany", "Berlin", "Europe"),
            ("Japan", "Tokyo", "Asia"), ("Kenya", "Nairobi", "Africa"),
            ("Costa Rica", "San José", "Americas"), ("San Marino", "San Marino", "Europe")]  # fmt: skip
TEMPLATES = ("called", "named")


def _records(
    model: str, prompt_id: str, n_layers: int, n_tokens: int, answer_id: int
) -> pa.RecordBatch:
    rows = []
    for layer in range(n_layers + 1):
        for pos in range(n_tokens):
            nxt = pos == n_tokens - 1
            top = answer_id if layer == n_layers else 100 + pos
            rows.append({
                "model": model, "lens": "final", "prompt_id": prompt_id, "layer": layer, "pos": pos,
                "token_id": 100 + pos, "token": f" w{pos}", "is_next_token": nxt,
                "entropy_bits": float(n_layers + 1 - layer), "top_ids": [top, 7],
                "top_tokens": [f" t{top}", " x"], "top_probs": [0.6, 0.1], "rest_mass": 0.3,
                "answer_prob": layer / n_layers if nxt else None,
                "answer_rank": 1 if nxt and layer == n_layers else (5 if nxt else None),
                "kl_to_final_bits": float(n_layers - layer) if nxt else None,
                "copy_collapse": False if nxt else None, "entropy_collapse": False if nxt else None,
                "is_answer": (layer == n_layers) if nxt else None,
            })  # fmt: skip
    return pa.RecordBatch.from_pylist(rows, schema=RECORDS_SCHEMA)


def _model_prompts(model: str, n_layers: int, many: bool) -> list[dict[str, Any]]:
    common = {"model": model, "n_layers": n_layers}
    rows = [prompt_row("capital-de", role="primary", answer="Berlin", answer_token=" Berlin",
                       answer_token_id=1, final_top_ids=[1, 2], L_semantic=n_layers, **common)]  # fmt: skip
    if not many:
        return rows
    for i, (country, city, group) in enumerate(CAPITALS):
        for j, template in enumerate(TEMPLATES):
            token_id = 50 if city.startswith("San ") else 10 + i  # " San" for both
            semantic = None if (i + j) % 4 == 3 else (n_layers * (i + 2)) // 8
            rows.append(prompt_row(
                f"{country.lower().replace(' ', '-')}-{template}", prompt_set="capitals",
                template=template, group=group, answer=city, answer_token=" " + city.split()[0],
                answer_token_id=token_id, final_top_ids=[token_id if j == 0 else 3, 4],
                L_semantic=semantic, L_copy=1 if i % 3 == 0 else None, **common,
            ))  # fmt: skip
    rows.append(prompt_row("ctl", role="control", reference="capital-de", **common))
    return rows


def _write_run(run: Path, many: bool) -> dict[str, int]:
    layers = {"model-a": 8, "model-b": 12}
    texts = {}
    for name, n_layers in layers.items():
        paths = artefact_paths(run, name)
        rows = _model_prompts(name, n_layers, many)
        texts |= {r["prompt_id"]: f"The capital is {r['answer']}" for r in rows}
        pq.write_table(pa.Table.from_pylist(rows, schema=PROMPT_SUMMARY_SCHEMA),
                       paths["prompts_parquet"])  # fmt: skip
        records = _records(name, "capital-de", n_layers, 4, 1)
        pq.write_table(pa.Table.from_batches([records]), paths["records_parquet"])
        diagnostics = {"n_layers": n_layers, "seed": SEED, "top_k": 2, "lens": "final"}
        prompts = pl.read_parquet(paths["prompts_parquet"])
        write_json(paths["json"], model_json(name, diagnostics, prompts, {"placement": {}}))
    models = {name: {"status": "ok"} for name in layers}
    (run / "ledger.json").write_text(json.dumps({"started_at": "now", "models": models}))
    prompts = [{"id": k, "text": v} for k, v in texts.items()]
    (run / "manifest.resolved.json").write_text(json.dumps({"sweep": {}, "prompts": prompts}))
    merge_run(run, models)
    build_reports(run)
    return layers


def test_a_run_gets_the_statistics_files_json_reports_and_plot(tmp_path):
    layers = _write_run(tmp_path, many=True)
    table = pl.read_parquet(tmp_path / "cross-model-statistics.parquet")
    csv = pl.read_csv(tmp_path / "cross-model-statistics.csv", schema=STATS_SCHEMA)
    assert table.schema == pl.Schema(STATS_SCHEMA) and csv.equals(table)
    assert set(table["model"]) == set(layers)
    assert set(table["prompt_set"]) == {"capitals", "manifest"}
    for name in layers:
        prompts = pl.read_parquet(tmp_path / f"prompts-{name}.parquet")
        own = prompt_statistics(prompts, SEED)
        assert table.filter(pl.col("model") == name).equals(own)
        info = json.loads((tmp_path / f"output-{name}.json").read_text())
        assert info["statistics"] == json.loads(json.dumps(statistics_block(prompts, SEED)))
        text = (tmp_path / f"evaluation-{name}.md").read_text()
        # The statistics lead the report, before the overview and the primary prompt's sections.
        assert text.index("## Statistics across prompts") < text.index("## 1. Overview")
        acc = cell(own, "accuracy", prompt_set="capitals")
        assert acc["n"] == 12 and acc["n_hit"] == 6  # the first template's prompts only
        assert (f"The answer is the model's top-1 on 6 of 12 prompts (50%, 95% CI "
                f"{100 * acc['frac_ci_low']:.0f}-{100 * acc['frac_ci_high']:.0f}%)") in text  # fmt: skip
        assert "San Marino" in text and "San José" in text  # the shared " San"
        rows = table_rows(text, "| prompts | n | top-1 accuracy")
        assert [r[0] for r in rows] == [
            "all", "all, unambiguous first token", "template `called`", "template `named`",
            "group `Africa`", "group `Americas`", "group `Asia`", "group `Europe`",
        ]  # fmt: skip
        assert rows[1][1] == "8"  # San José and San Marino left out, both templates
    cross = (tmp_path / "evaluation-cross-model.md").read_text()
    assert "## Statistics across prompts" in cross
    rows = table_rows(cross, "| model | prompt set | n | top-1 accuracy")
    assert [r[:2] for r in rows] == [["model-a", "capitals"], ["model-a", "manifest"],
                                     ["model-b", "capitals"], ["model-b", "manifest"]]  # fmt: skip
    assert rows[0][-1] == "4"  # ambiguous first tokens
    assert "](plot-cross-model-depths.png)" in cross
    w, h = depth_plot_figsize(2)  # a box per model for capitals; the one-prompt set has none
    image = mpimg.imread(tmp_path / "plot-cross-model-depths.png")
    assert image.shape[:2] == (round(h * DPI), round(w * DPI)) and image.std() > 0.01


def test_one_prompt_per_role_leaves_the_reports_as_they_were(tmp_path):
    _write_run(tmp_path, many=False)
    text = (tmp_path / "evaluation-model-a.md").read_text()
    assert "Statistics across prompts" not in text and text.index("## 1. Overview") > 0
    assert "Statistics across prompts" not in (tmp_path / "evaluation-cross-model.md").read_text()
    assert not (tmp_path / "plot-cross-model-depths.png").exists()
    # The files still carry the numbers (one prompt: n = 1).
    table = pl.read_parquet(tmp_path / "cross-model-statistics.parquet")
    assert set(table.filter(pl.col("measure") == "accuracy")["n"]) == {1}
