"""Cross-model artefacts, built with Polars from the per-model Parquet and the ledger."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl

from sweep.artefacts import (
    AUDIT_PROMPT_FIELDS,
    artefact_paths,
    decoded_lenses,
    model_artefact_score,
)
from sweep.files import write_atomic
from sweep.stats import STATS_SCHEMA, prompt_statistics, stats_seed

SUMMARY_STEM = "cross-model-summary"
PROMPTS_STEM = "cross-model-prompts"
STATS_STEM = "cross-model-statistics"  # long: model x prompt set x breakdown x subset x measure
# Layers read as relative depth (layer / n_layers) in both tables.
REL_LAYERS = ("L_copy", "L_copy_H", "L_semantic", "L_semantic_strong", "L_semantic_confirmed")
# The primary prompt's audit in the summary: milestones, gates (and their stability), the
# strictest strict copy and the shortest soft copy, and the prompt's own artefact score.
_SUMMARY_PREFIXES = ("L_cos@", "L_kl@", "L_rank@", "L_semantic_", "confirmed_source",
                     "gates_stable", "lens_artefact_")  # fmt: skip
AUDIT_SUMMARY_COLUMNS = (
    "L_copy_strict@0.95",
    "L_copy_soft_k1",
    *(f for f in AUDIT_PROMPT_FIELDS if f.startswith(_SUMMARY_PREFIXES)),
)


def _ledger_frame(models: dict[str, dict[str, Any]]) -> pl.DataFrame:
    rows = [
        {
            "model": name,
            "status": e.get("status"),
            "device": e.get("device"),
            "dtype": e.get("dtype"),
            "node_ip": e.get("node_ip"),
            "error": e.get("error"),
        }
        for name, e in sorted(models.items())
    ]
    schema = {k: pl.String for k in ("model", "status", "device", "dtype", "node_ip", "error")}
    return pl.DataFrame(rows, schema=schema)


def _model_diagnostics(run_dir: Path, name: str) -> dict[str, Any]:
    """The diagnostics the model's JSON records: its seed (its statistics block was bootstrapped
    with it) and its lenses (the primary first)."""
    path = artefact_paths(run_dir, name)["json"]
    info = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return info.get("diagnostics") or {}


def merge_run(run_dir: Path, models: dict[str, dict[str, Any]]) -> dict[str, Path]:
    """Write the cross-model tables; one row per model (primary prompt), one per model x prompt,
    and the statistics across prompts (sweep/stats.py), one row per model x prompt set x
    breakdown x subset x measure.

    Relative depths are layer / n_layers. The summary carries the primary prompt's collapse
    layers, milestones and gates, and the model's lens-artefact score (mean over its prompts)
    and tier. Failed and skipped models appear with their status and null numbers, so the table
    always lists every model of the manifest.
    """
    frames, scores, stats = [], [], [pl.DataFrame(schema=STATS_SCHEMA)]
    primary_lens: dict[str, str] = {}
    for name, entry in sorted(models.items()):
        path = artefact_paths(run_dir, name)["prompts_parquet"]
        if entry.get("status") == "ok" and path.is_file():
            diagnostics = _model_diagnostics(run_dir, name)
            every_lens = pl.read_parquet(path)
            frames.append(every_lens)
            primary_lens[name] = decoded_lenses(diagnostics)[0]
            mine = every_lens.filter(pl.col("lens") == primary_lens[name])
            score, tier, n = model_artefact_score(mine)
            scores.append((name, score, tier, n))
            stats.append(prompt_statistics(mine, stats_seed(diagnostics)))
    ledger = _ledger_frame(models)
    written: dict[str, Path] = {}
    statistics = pl.concat(stats)
    for suffix, writer in (("parquet", statistics.write_parquet), ("csv", statistics.write_csv)):
        written[f"{STATS_STEM}.{suffix}"] = write_atomic(run_dir / f"{STATS_STEM}.{suffix}", writer)
    if frames:
        prompts = pl.concat(frames).with_columns(
            (pl.col(c).cast(pl.Float64) / pl.col("n_layers")).alias(f"{c}_rel") for c in REL_LAYERS
        )
        prompts = prompts.sort(["model", "prompt_id"], maintain_order=True)
        written[PROMPTS_STEM] = run_dir / f"{PROMPTS_STEM}.parquet"
        write_atomic(written[PROMPTS_STEM], prompts.write_parquet)
        # The primary prompt's row of each model's primary lens; the other lenses' L_semantic
        # beside it, as L_semantic@<lens>.
        is_primary_lens = pl.col("lens") == pl.col("model").replace_strict(primary_lens)
        others = (
            prompts.filter((pl.col("role") == "primary") & ~is_primary_lens)
            .select("model", pl.format("L_semantic@{}", pl.col("lens")).alias("key"), "L_semantic")
            .pivot(on="key", index="model", values="L_semantic")
        )
        primary = prompts.filter((pl.col("role") == "primary") & is_primary_lens).select(
            "model",
            "prompt_id",
            "n_layers",
            "L_copy",
            "L_copy_H",
            "L_semantic",
            "delta_layers",
            *(f"{c}_rel" for c in REL_LAYERS),
            "answer",
            "final_answer_prob",
            "final_answer_rank",
            pl.col("final_top_tokens").list.first().alias("final_top1"),
            pl.col("final_top_probs").list.first().alias("final_top1_prob"),
            *AUDIT_SUMMARY_COLUMNS,
        )
        # The model's own score: the mean of its prompts' (the primary's is lens_artefact_score).
        model_scores = pl.DataFrame(
            scores,
            schema={
                "model": pl.String,
                "model_lens_artefact_score": pl.Float64,
                "model_lens_artefact_tier": pl.String,
                "n_prompts_scored": pl.Int64,
            },
            orient="row",
        )
        summary = ledger.join(primary, on="model", how="left").join(
            model_scores, on="model", how="left"
        )
        if others.width > 1:
            summary = summary.join(others, on="model", how="left")
    else:
        summary = ledger
    summary = summary.sort("model")
    for suffix, writer in (("parquet", summary.write_parquet), ("csv", summary.write_csv)):
        path = run_dir / f"{SUMMARY_STEM}.{suffix}"
        write_atomic(path, writer)
        written[f"{SUMMARY_STEM}.{suffix}"] = path
    return written
