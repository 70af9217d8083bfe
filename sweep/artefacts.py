"""Per-model artefacts: streamed Parquet, the seed-layout CSVs and the JSON diagnostics.

Batches are appended to Parquet as they arrive (the driver's memory does not grow with the
number of prompts); every file appears atomically when the model finishes.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
import pyarrow.parquet as pq

from actors.schema import PROMPT_SUMMARY_SCHEMA, RECORDS_SCHEMA, SCHEMA_VERSION, check_batch
from sweep.files import write_atomic, write_bytes, write_json

if TYPE_CHECKING:
    from actors.lens_actor import BatchResult


def artefact_paths(run_dir: Path, name: str) -> dict[str, Path]:
    """Every per-model file, by role."""
    return {
        "records_parquet": run_dir / f"records-{name}.parquet",
        "prompts_parquet": run_dir / f"prompts-{name}.parquet",
        "json": run_dir / f"output-{name}.json",
        "records_csv": run_dir / f"output-{name}-records.csv",
        "pure_next_token_csv": run_dir / f"output-{name}-pure-next-token.csv",
        "residuals_dir": run_dir / f"residuals-{name}",
    }


class _StreamingParquet:
    """A Parquet file written batch by batch under a temp name, renamed into place on close."""

    def __init__(self, final: Path, schema: Any) -> None:
        self.final = final
        self.tmp = final.with_name(f".{final.name}.partial")
        self.schema = schema
        self.writer: pq.ParquetWriter | None = None

    def _open(self) -> pq.ParquetWriter:
        self.tmp.parent.mkdir(parents=True, exist_ok=True)
        return pq.ParquetWriter(self.tmp, self.schema, compression="zstd")

    def write(self, batch: Any) -> None:
        if self.writer is None:
            self.writer = self._open()
        self.writer.write_batch(check_batch(batch, self.schema))

    def commit(self) -> None:
        if self.writer is None:  # no batch: still an (empty) file, so readers find it
            self.writer = self._open()
        self.writer.close()
        self.tmp.replace(self.final)

    def abort(self) -> None:
        """Drop the partial file; never raises (it runs after another error, e.g. disk full)."""
        if self.writer is not None:
            # Closing a file the disk could not take may fail too: it goes anyway.
            with contextlib.suppress(Exception):
                self.writer.close()
            self.writer = None
        with contextlib.suppress(OSError):
            self.tmp.unlink(missing_ok=True)


class ModelArtefacts:
    """Collects one model's batches and writes its per-model artefacts."""

    def __init__(self, run_dir: Path, name: str) -> None:
        self.name = name
        self.paths = artefact_paths(run_dir, name)
        self._records = _StreamingParquet(self.paths["records_parquet"], RECORDS_SCHEMA)
        self._prompts = _StreamingParquet(self.paths["prompts_parquet"], PROMPT_SUMMARY_SCHEMA)
        self._residuals_tmp = self.paths["residuals_dir"].with_name(
            f".{self.paths['residuals_dir'].name}.partial"
        )
        self._temperature: list[dict[str, Any]] = []
        self.batches = 0

    def add(self, result: BatchResult) -> None:
        self._records.write(result.records)
        self._prompts.write(result.summary)
        if result.residuals is not None:
            write_bytes(
                self._residuals_tmp / f"batch-{self.batches:04d}.safetensors", result.residuals
            )
        self.batches += 1

    def abort(self) -> None:
        self._records.abort()
        self._prompts.abort()
        shutil.rmtree(self._residuals_tmp, ignore_errors=True)

    def commit(self, diagnostics: dict[str, Any], context: dict[str, Any]) -> dict[str, str]:
        """Close the Parquet files, derive the CSVs and JSON; returns file names by role."""
        self._records.commit()
        self._prompts.commit()
        if self._residuals_tmp.exists():
            shutil.rmtree(self.paths["residuals_dir"], ignore_errors=True)
            self._residuals_tmp.replace(self.paths["residuals_dir"])
        write_seed_csvs(self.paths, diagnostics.get("top_k", 20))
        prompts = pl.read_parquet(self.paths["prompts_parquet"])
        write_json(self.paths["json"], model_json(self.name, diagnostics, prompts, context))
        return {k: p.name for k, p in self.paths.items() if p.exists()}


def _primary_id(prompts: pl.DataFrame) -> str | None:
    primary = prompts.filter(pl.col("role") == "primary")
    chosen = primary if primary.height else prompts
    return chosen["prompt_id"][0] if chosen.height else None


def _seed_columns(top_k: int) -> list[pl.Expr]:
    cols: list[pl.Expr] = [
        pl.col("layer"),
        pl.col("pos"),
        pl.col("token"),
        pl.col("entropy_bits").alias("entropy"),
    ]
    for i in range(top_k):
        cols.append(pl.col("top_tokens").list.get(i, null_on_oob=True).alias(f"top{i + 1}"))
        cols.append(pl.col("top_probs").list.get(i, null_on_oob=True).alias(f"prob{i + 1}"))
    cols.append(pl.col("rest_mass"))
    return cols


def write_seed_csvs(paths: dict[str, Path], top_k: int) -> None:
    """The seed's two CSVs for the primary prompt, so existing readers keep working.

    records:          layer,pos,token,entropy,top1,prob1,...,topK,probK,rest_mass (every position)
    pure next-token:  the same at the next-token position, then copy_collapse,entropy_collapse,
                      is_answer, and (added, at the end) p_answer,answer_rank,kl_to_final_bits.
    Entropy is in bits.
    """
    prompts = pl.read_parquet(paths["prompts_parquet"], columns=["prompt_id", "role"])
    primary = _primary_id(prompts)
    records = pl.scan_parquet(paths["records_parquet"]).filter(pl.col("prompt_id") == primary)
    records = records.sort(["layer", "pos"])
    all_rows = records.select(_seed_columns(top_k)).collect()
    write_atomic(paths["records_csv"], all_rows.write_csv)
    flags = [
        pl.col("copy_collapse"),
        pl.col("entropy_collapse"),
        pl.col("is_answer"),
        pl.col("answer_prob").alias("p_answer"),
        pl.col("answer_rank"),
        pl.col("kl_to_final_bits"),
    ]
    pure = records.filter(pl.col("is_next_token")).select([*_seed_columns(top_k), *flags]).collect()
    write_atomic(paths["pure_next_token_csv"], pure.write_csv)


def _top_list(row: dict[str, Any], prefix: str = "final_") -> list[dict[str, Any]]:
    return [
        {"token": t, "id": i, "prob": p}
        for t, i, p in zip(
            row[f"{prefix}top_tokens"],
            row[f"{prefix}top_ids"],
            row[f"{prefix}top_probs"],
            strict=True,
        )
    ]


def model_json(
    name: str, diagnostics: dict[str, Any], prompts: pl.DataFrame, context: dict[str, Any]
) -> dict[str, Any]:
    """output-<name>.json: diagnostics, the primary prompt's collapse layers and final prediction,
    every prompt's final prediction (the seed's test prompts), temperature exploration, context."""
    rows = prompts.sort("prompt_id").to_dicts()
    primary_id = _primary_id(prompts)
    per_prompt = []
    for r in rows:
        per_prompt.append(
            {
                "prompt_id": r["prompt_id"],
                "role": r["role"],
                "answer": r["answer"],
                "answer_token": r["answer_token"],
                "n_tokens": r["n_tokens"],
                "L_copy": r["L_copy"],
                "L_copy_H": r["L_copy_H"],
                "L_semantic": r["L_semantic"],
                "delta_layers": r["delta_layers"],
                "final_answer_prob": r["final_answer_prob"],
                "final_answer_rank": r["final_answer_rank"],
                "final_prediction": _top_list(r),
                "parity_max_abs": r["parity_max_abs"],
            }
        )
    primary = next((p for p in per_prompt if p["prompt_id"] == primary_id), None)
    diag = {k: v for k, v in diagnostics.items() if k != "temperature_exploration"}
    return {
        "schema_version": SCHEMA_VERSION,
        "model": name,
        "diagnostics": diag,
        "primary_prompt": primary,
        "prompts": per_prompt,
        "temperature_exploration": diagnostics.get("temperature_exploration", []),
        **context,
    }
