"""The lens-artefact audit everywhere a user looks, from real sweeps of the two offline models.

One sweep of SmolLM2-135M and Gemma-3-270M (real pretrained weights) with a primary prompt, a
control, an ablation, a four-prompt suite and a prompt without an answer; one sweep of SmolLM2
with ``audit = false``. Every number a report shows is checked against the Parquet, recomputed
here with Polars and numpy rather than with the driver's helpers.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from statistics import fmean
from typing import Any

import matplotlib.image as mpimg
import numpy as np
import polars as pl
import pytest

from actors.schema import PROMPT_SUMMARY_SCHEMA, RECORDS_SCHEMA
from sweep.reports.markdown import fmt
from sweep.reports.plots import DPI, raw_vs_norm_figsize
from sweep.run import main
from tests.checkpoints import GEMMA3_GGUF, GEMMA3_PACKAGE, SMOLLM2_GGUF, SMOLLM2_PACKAGE
from tests.sweep.markdown_tables import table_rows

pytestmark = pytest.mark.slow

SMOL, GEMMA = "SmolLM2-135M-Instruct", "gemma-3-270m"
MODELS = {SMOL: (SMOLLM2_PACKAGE, SMOLLM2_GGUF), GEMMA: (GEMMA3_PACKAGE, GEMMA3_GGUF)}
TEMPLATE = "Give the city name only, plain text. The capital of {} is called simply"
PROMPTS = f"""
[[prompts]]
id = "capital-de"
text = "{TEMPLATE.format("Germany")}"
answer = "Berlin"
positions = "all"
primary = true
suite = "capitals"

[[prompts]]
id = "capital-fr"
text = "{TEMPLATE.format("France")}"
answer = "Paris"
role = "control"
suite = "capitals"

[[prompts]]
id = "capital-it"
text = "{TEMPLATE.format("Italy")}"
answer = "Rome"
suite = "capitals"

[[prompts]]
id = "capital-jp"
text = "{TEMPLATE.format("Japan")}"
answer = "Tokyo"
suite = "capitals"

[[prompts]]
id = "capital-de-no-filler"
text = "{TEMPLATE.format("Germany").removesuffix(" simply")}"
answer = "Berlin"
ablation_of = "capital-de"

[[prompts]]
id = "no-answer"
text = "Hello there"
"""
# Per suite, the layers whose spread the JSON gives (relative depth layer / n_layers).
SUITE_LAYERS = (
    "L_copy",
    "L_copy_strict@0.95",
    "L_copy_soft_k1",
    "L_semantic",
    "L_semantic_strong",
    "L_semantic_confirmed",
)


def _sweep(root: Path, models: list[str], audit: bool) -> Path:
    body = f'[sweep]\nname = "audit"\ntop_k = 10\nbatch_size = 8\naudit = {str(audit).lower()}\n'
    for name in models:
        package, file = MODELS[name]
        body += (
            f'\n[[models]]\nname = "{name}"\ngguf = {{ package = "{package}", file = "{file}" }}\n'
        )
    manifest = root / "m.toml"
    manifest.write_text(body + PROMPTS)
    assert main([str(manifest), "--out", str(root / "results"), "--no-progress"]) == 0
    return root / "results" / "run-latest"


@pytest.fixture(scope="module")
def audited(tmp_path_factory) -> Path:
    return _sweep(tmp_path_factory.mktemp("audit-on"), [SMOL, GEMMA], audit=True)


@pytest.fixture(scope="module")
def unaudited(tmp_path_factory) -> Path:
    return _sweep(tmp_path_factory.mktemp("audit-off"), [SMOL], audit=False)


def _prompts(run: Path, name: str) -> pl.DataFrame:
    return pl.read_parquet(run / f"prompts-{name}.parquet").sort("prompt_id")


def _next_rows(run: Path, name: str, prompt_id: str) -> pl.DataFrame:
    return (
        pl.read_parquet(run / f"records-{name}.parquet")
        .filter((pl.col("prompt_id") == prompt_id) & pl.col("is_next_token"))
        .sort("layer")
    )


def _info(run: Path, name: str) -> dict[str, Any]:
    return json.loads((run / f"output-{name}.json").read_text())


def _json_value(value: Any) -> Any:
    """A Parquet value as the JSON must hold it: NaN and infinities as null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _section(text: str) -> str:
    return text[text.index("## 6. Lens-artefact audit") :]


def _audit_columns() -> list[str]:
    names = RECORDS_SCHEMA.names
    return names[names.index("is_answer") + 1 :]


def _tier(score: float) -> str:
    return "low" if score < 0.2 else "medium" if score <= 0.5 else "high"


@pytest.mark.parametrize("which", ["audited", "unaudited"])
def test_pure_next_token_csv_ends_with_every_audit_column_in_schema_order_then_lens(request, which):
    run = request.getfixturevalue(which)
    with open(run / f"output-{SMOL}-pure-next-token.csv") as fh:
        header = next(csv.reader(fh))
    seed = ["layer", "pos", "token", "entropy"]
    for i in range(1, 11):
        seed += [f"top{i}", f"prob{i}"]
    flags = ["copy_collapse", "entropy_collapse", "is_answer", "p_answer", "answer_rank"]
    assert header == [*seed, "rest_mass", *flags, "kl_to_final_bits", *_audit_columns(), "lens"]
    table = pl.read_csv(run / f"output-{SMOL}-pure-next-token.csv", infer_schema_length=None)
    rows = _next_rows(run, SMOL, "capital-de")
    assert table.height == rows.height == 31
    for col in ("kl_norm_raw_bits", "answer_prob_raw", "cos_to_final", "echo_mass"):
        if which == "unaudited":
            assert table[col].null_count() == table.height, col
            continue
        # float32 written as its shortest repr reads back to the same float32, denormals too
        got = table[col].to_numpy().astype(np.float32)
        np.testing.assert_array_equal(got, rows[col].to_numpy(), err_msg=col)
    if which == "audited":
        assert table["copy_strict@0.95"].to_list() == rows["copy_strict@0.95"].to_list()
        assert table["answer_rank_raw"].to_list() == rows["answer_rank_raw"].to_list()


@pytest.mark.parametrize("name", [SMOL, GEMMA])
def test_json_audit_block_holds_the_parquet_numbers(audited, name):
    info, prompts = _info(audited, name), _prompts(audited, name)
    audit = info["audit"]
    assert audit["enabled"] is True
    scores = [s for s in prompts["lens_artefact_score"].to_list() if s is not None]
    assert len(scores) == prompts.height == audit["n_prompts_scored"] == 6
    assert audit["lens_artefact_score"] == pytest.approx(fmean(scores), rel=1e-12)
    assert audit["lens_artefact_tier"] == _tier(fmean(scores))
    worst = prompts.sort("lens_artefact_score", descending=True).row(0, named=True)
    assert audit["worst_prompt"] == {
        "prompt_id": worst["prompt_id"],
        "lens_artefact_score": worst["lens_artefact_score"],
        "lens_artefact_tier": worst["lens_artefact_tier"],
    }
    # Every per-prompt audit field, and the primary's grouped ones, as in the Parquet.
    names = PROMPT_SUMMARY_SCHEMA.names
    fields = names[names.index("parity_max_abs") + 1 :]
    by_id = {r["prompt_id"]: r for r in prompts.to_dicts()}
    for entry in info["prompts"]:
        row = by_id[entry["prompt_id"]]
        for f in ("role", "reference", "suite", *fields):
            assert entry[f] == _json_value(row[f]), (entry["prompt_id"], f)
    primary = audit["primary"]
    p = by_id["capital-de"]
    grouped = {k: v for group in ("milestones", "gates", "copy", "raw_vs_norm", "surface")
               for k, v in primary[group].items()}  # fmt: skip
    assert {f"L_cos@{c}" for c in ("0.2", "0.4", "0.6")} <= set(primary["milestones"])
    assert {"L_semantic_strong", "L_semantic_confirmed", "gates_stable"} <= set(primary["gates"])
    for k, v in grouped.items():
        assert v == _json_value(p[k]), k
    assert primary["lens_artefact_score"] == p["lens_artefact_score"]
    assert audit["last_layer"]["kl_lens_to_head_bits"] == p["last_kl_lens_to_head_bits"]
    assert audit["last_layer"]["temperature"] == p["last_temperature"]
    assert audit["last_layer"]["kl_after_temperature_bits"] == p["last_kl_after_temperature_bits"]
    health = audit["numeric_health"]
    assert health["any_nonfinite"] == (prompts["n_nonfinite_layers"].sum() > 0)
    assert health["max_resid_norm_ratio"] == prompts["max_resid_norm_ratio"].max()
    # The control's margins are read off its next-token records.
    (control,) = audit["controls"]
    margins = _next_rows(audited, name, "capital-fr")["control_margin"].to_list()
    assert control["prompt_id"] == "capital-fr" and control["reference"] == "capital-de"
    assert control["L_control_wins"] == by_id["capital-fr"]["L_control_wins"]
    assert control["max_control_margin"] == max(margins)
    assert control["final_control_margin"] == margins[-1]
    (ablation,) = audit["ablations"]
    assert ablation["prompt_id"] == "capital-de-no-filler" and ablation["reference"] == "capital-de"
    ab = by_id["capital-de-no-filler"]
    for layer in ("L_copy", "L_copy_strict@0.95", "L_semantic", "L_semantic_strong"):
        change = ablation[layer]
        assert (change["reference"], change["ablation"]) == (p[layer], ab[layer])
        both = p[layer] is not None and ab[layer] is not None
        assert change["delta"] == (ab[layer] - p[layer] if both else None)


@pytest.mark.parametrize("name", [SMOL, GEMMA])
def test_suite_spread_recomputed_from_the_prompts_parquet(audited, name):
    prompts = _prompts(audited, name)
    (suite,) = _info(audited, name)["audit"]["suites"]
    members = prompts.filter(pl.col("suite") == "capitals")
    assert suite["suite"] == "capitals" and suite["n_prompts"] == members.height == 4
    n_layers = members["n_layers"][0]
    for layer in SUITE_LAYERS:
        depths = np.array([x / n_layers for x in members[layer].to_list() if x is not None])
        stats = suite[layer]
        assert stats["n_reached"] == len(depths), layer
        if not len(depths):
            assert stats["median"] is stats["iqr"] is None
            continue
        q25, q50, q75 = np.percentile(depths, [25, 50, 75])
        assert stats["median"] == pytest.approx(q50, abs=1e-12), layer
        assert (stats["min"], stats["max"]) == pytest.approx((depths.min(), depths.max()))
        assert stats["iqr"] == pytest.approx(q75 - q25, abs=1e-12), layer


@pytest.mark.parametrize("name", [SMOL, GEMMA])
def test_report_names_the_tier_and_says_whether_l_semantic_survives(audited, name):
    text = _section((audited / f"evaluation-{name}.md").read_text())
    prompts = _prompts(audited, name)
    p = prompts.filter(pl.col("prompt_id") == "capital-de").row(0, named=True)
    mean = fmean(prompts["lens_artefact_score"].to_list())
    assert f"Model-level artefact risk **{_tier(mean)}**" in text
    assert (
        f"Artefact risk {p['lens_artefact_tier']} (score {fmt(p['lens_artefact_score'], 2)})"
        in text
    )
    rows = _next_rows(audited, name, "capital-de")
    if p["L_semantic"] is None:
        assert "no L_semantic" in text
    elif p["L_semantic_confirmed"] is not None:
        raw = rows.filter(
            (pl.col("answer_rank_raw") == 1) & ((pl.col("layer") - p["L_semantic"]).abs() <= 2)
        )["layer"][0]
        assert (
            f"L_semantic {p['L_semantic']} is confirmed by the raw lens (raw rank 1 at layer {raw}"
            in text
        )
    else:
        assert f"L_semantic {p['L_semantic']} is NOT confirmed by the raw lens" in text
    norm_only = rows.filter(pl.col("norm_only_semantics"))["layer"].to_list()
    assert ("Norm-only semantics at layer(s)" in text) == bool(norm_only)
    assert ("gates stable: yes" in text) == p["gates_stable"]
    assert (
        f"![answer probability and divergence, normalised vs raw lens](plot-{name}-raw-vs-norm.png)"
        in text
    )
    table = table_rows(text, strip_bold=True, header_start="| layer | KL(norm‖raw)")
    assert len(table) == rows.height == p["n_layers"] + 1
    for cells, r in zip(table, rows.iter_rows(named=True), strict=True):
        assert cells[:10] == [
            str(r["layer"]), fmt(r["kl_norm_raw_bits"]), fmt(r["js_norm_raw_bits"]), fmt(r["l1_norm_raw"]),
            fmt(r["jaccard_top50_raw_norm"]), fmt(r["answer_prob"]), fmt(r["answer_prob_raw"]),
            fmt(r["answer_rank_raw"]), fmt(r["cos_to_final"]), fmt(r["echo_mass"]),
        ]  # fmt: skip
        assert (cells[10] == "-") == (not r["copy_strict@0.7"])
    controls = table_rows(text, strip_bold=True, header_start="| control |")
    assert controls[0][:2] == ["`capital-fr`", "`capital-de`"]
    suite = table_rows(text, strip_bold=True, header_start="| layer | median")
    assert [r[0] for r in suite] == list(SUITE_LAYERS)


@pytest.mark.parametrize("which", ["audited", "unaudited"])
def test_raw_vs_norm_plot_decodes_at_its_expected_size(request, which):
    run = request.getfixturevalue(which)
    w, h = raw_vs_norm_figsize()
    image = mpimg.imread(run / f"plot-{SMOL}-raw-vs-norm.png")
    assert image.shape[:2] == (round(h * DPI), round(w * DPI))
    assert image.std() > 0.01


def test_cross_model_summary_and_table_carry_the_audit(audited):
    summary = pl.read_csv(audited / "cross-model-summary.csv", infer_schema_length=None)
    parquet = pl.read_parquet(audited / "cross-model-summary.parquet")
    wanted = ["L_cos@0.6", "L_kl@0.5", "L_rank@1", "L_semantic_strong", "L_semantic_confirmed",
              "gates_stable", "L_copy_strict@0.95", "lens_artefact_tier",
              "model_lens_artefact_score", "model_lens_artefact_tier"]  # fmt: skip
    assert set(wanted) <= set(summary.columns) and summary.columns == parquet.columns
    text = (audited / "evaluation-cross-model.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| model | layers"))
    for col in (
        "L_sem strong",
        "L_sem confirmed",
        "gates stable",
        "L_copy strict@0.95",
        "artefact risk",
    ):
        assert f"| {col} |" in header or header.endswith(f"| {col} |")
    table = {r[0]: r for r in table_rows(text, strip_bold=True, header_start="| model | layers")}
    for row in parquet.iter_rows(named=True):
        name = row["model"]
        p = _prompts(audited, name).filter(pl.col("role") == "primary").row(0, named=True)
        for col in ("L_cos@0.6", "L_semantic_strong", "L_semantic_confirmed", "gates_stable"):
            assert row[col] == p[col], (name, col)
        audit = _info(audited, name)["audit"]
        assert row["model_lens_artefact_score"] == audit["lens_artefact_score"]
        assert row["model_lens_artefact_tier"] == audit["lens_artefact_tier"]
        cell = f"{audit['lens_artefact_tier']} ({fmt(audit['lens_artefact_score'], 2)})"
        assert table[name][-1] == cell
        assert table[name][-3] == fmt(p["L_copy_strict@0.95"])


def test_audit_off_still_writes_everything_and_says_so(audited, unaudited):
    def files(run: Path) -> set[str]:
        return {f.name for f in run.iterdir() if SMOL in f.name}

    assert files(unaudited) == files(audited)
    text = (unaudited / f"evaluation-{SMOL}.md").read_text()
    assert "Audit off" in _section(text)
    assert "audit off" in (unaudited / "evaluation-cross-model.md").read_text()
    audit = _info(unaudited, SMOL)["audit"]
    assert audit["enabled"] is False
    for key in ("lens_artefact_score", "lens_artefact_tier", "worst_prompt", "primary",
                "last_layer", "numeric_health"):  # fmt: skip
        assert audit[key] is None, key
    # Roles come from the manifest: the lists keep their entries, the audit's numbers are null,
    # the plain lens's layers are filled.
    prompts = _prompts(unaudited, SMOL)
    p = prompts.filter(pl.col("prompt_id") == "capital-de").row(0, named=True)
    ((control,), (ablation,), (suite,)) = audit["controls"], audit["ablations"], audit["suites"]
    assert control["reference"] == "capital-de" and control["L_control_wins"] is None
    assert control["max_control_margin"] is control["final_control_margin"] is None
    assert ablation["L_semantic"]["reference"] == p["L_semantic"]
    assert ablation["L_semantic_strong"] == {"reference": None, "ablation": None, "delta": None}
    assert suite["L_semantic"]["n_reached"] is not None
    assert suite["L_semantic_strong"]["n_reached"] is None
    assert prompts["lens_artefact_score"].null_count() == prompts.height
    row = pl.read_parquet(unaudited / "cross-model-summary.parquet").row(0, named=True)
    assert row["model_lens_artefact_score"] is None and row["L_semantic"] == p["L_semantic"]
    assert "Lens-artefact audit" in (unaudited / f"llm-prompt-single-{SMOL}.md").read_text()
