"""Cross-model artefacts, built with Polars from the per-model Parquet and the ledger."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from sweep.artefacts import artefact_paths
from sweep.files import write_atomic

SUMMARY_STEM = "cross-model-summary"
PROMPTS_STEM = "cross-model-prompts"


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


def merge_run(run_dir: Path, models: dict[str, dict[str, Any]]) -> dict[str, Path]:
    """Write the cross-model tables; one row per model (primary prompt) and one per model x prompt.

    Relative depths are layer / n_layers. Failed and skipped models appear with their status and
    null numbers, so the table always lists every model of the manifest.
    """
    frames = []
    for name, entry in sorted(models.items()):
        path = artefact_paths(run_dir, name)["prompts_parquet"]
        if entry.get("status") == "ok" and path.is_file():
            frames.append(pl.read_parquet(path))
    ledger = _ledger_frame(models)
    written: dict[str, Path] = {}
    if frames:
        prompts = pl.concat(frames).with_columns(
            (pl.col(c).cast(pl.Float64) / pl.col("n_layers")).alias(f"{c}_rel")
            for c in ("L_copy", "L_copy_H", "L_semantic")
        )
        prompts = prompts.sort(["model", "prompt_id"])
        written[PROMPTS_STEM] = run_dir / f"{PROMPTS_STEM}.parquet"
        write_atomic(written[PROMPTS_STEM], prompts.write_parquet)
        primary = prompts.filter(pl.col("role") == "primary").select(
            "model",
            "prompt_id",
            "n_layers",
            "L_copy",
            "L_copy_H",
            "L_semantic",
            "delta_layers",
            "L_copy_rel",
            "L_copy_H_rel",
            "L_semantic_rel",
            "answer",
            "final_answer_prob",
            "final_answer_rank",
            pl.col("final_top_tokens").list.first().alias("final_top1"),
            pl.col("final_top_probs").list.first().alias("final_top1_prob"),
        )
        summary = ledger.join(primary, on="model", how="left")
    else:
        summary = ledger
    summary = summary.sort("model")
    for suffix, writer in (("parquet", summary.write_parquet), ("csv", summary.write_csv)):
        path = run_dir / f"{SUMMARY_STEM}.{suffix}"
        write_atomic(path, writer)
        written[f"{SUMMARY_STEM}.{suffix}"] = path
    return written
