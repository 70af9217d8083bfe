"""Reading one run directory into the frames the reports need."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from sweep.artefacts import artefact_paths, decoded_lenses
from sweep.stats import has_many_prompts, prompt_statistics, stats_seed


@dataclass
class ModelData:
    """Everything about one finished model that a report uses."""

    name: str
    info: dict[str, Any]  # output-<name>.json
    prompts: pl.DataFrame  # prompts-<name>.parquet, the primary lens's rows
    records_path: Path
    primary_id: str | None
    every_lens: pl.DataFrame | None = None  # prompts-<name>.parquet, every lens's rows

    @property
    def lenses(self) -> list[str]:
        """The lenses decoded, the primary first."""
        return decoded_lenses(self.diagnostics)

    @property
    def diagnostics(self) -> dict[str, Any]:
        return self.info.get("diagnostics", {})

    @property
    def audit(self) -> dict[str, Any]:
        """The JSON's lens-artefact audit block; {} for a run written before the audit."""
        return self.info.get("audit") or {}

    @property
    def n_layers(self) -> int:
        return int(self.diagnostics.get("n_layers", 0))

    @functools.cached_property
    def statistics(self) -> pl.DataFrame:
        """The statistics across prompts (sweep/stats.py), seeded as the JSON's block was."""
        return prompt_statistics(self.prompts, stats_seed(self.diagnostics))

    @property
    def many_prompts(self) -> bool:
        """More than one prompt of one role in a prompt set: the reports lead with statistics."""
        return has_many_prompts(self.prompts)

    def pure_next(self, prompt_id: str | None = None, lens: str | None = None) -> pl.DataFrame:
        """Next-token rows of one prompt (default: primary) through one lens (default: the
        primary lens), one per layer, in layer order."""
        pid = prompt_id or self.primary_id
        return (
            pl.scan_parquet(self.records_path)
            .filter(
                (pl.col("prompt_id") == pid)
                & pl.col("is_next_token")
                & (pl.col("lens") == (lens or self.lenses[0]))
            )
            .sort("layer")
            .collect()
        )

    def all_positions(self, prompt_id: str | None = None) -> pl.DataFrame:
        pid = prompt_id or self.primary_id
        return (
            pl.scan_parquet(self.records_path)
            .filter((pl.col("prompt_id") == pid) & (pl.col("lens") == self.lenses[0]))
            .sort(["layer", "pos"])
            .collect()
        )


@dataclass
class RunData:
    run_dir: Path
    ledger: dict[str, Any]
    manifest: dict[str, Any]
    models: dict[str, ModelData]  # ok models only

    def prompt_text(self, prompt_id: str) -> str | None:
        for p in self.manifest.get("prompts", []):
            if p["id"] == prompt_id:
                return p["text"]
        return None

    @property
    def not_ok(self) -> dict[str, dict[str, Any]]:
        return {
            n: e
            for n, e in sorted(self.ledger.get("models", {}).items())
            if e.get("status") != "ok"
        }


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def load_run(run_dir: Path) -> RunData:
    """Read the ledger, the resolved manifest and every ok model's artefacts."""
    ledger = _read_json(run_dir / "ledger.json")
    manifest = _read_json(run_dir / "manifest.resolved.json")
    models: dict[str, ModelData] = {}
    for name, entry in sorted(ledger.get("models", {}).items()):
        paths = artefact_paths(run_dir, name)
        if entry.get("status") != "ok" or not paths["prompts_parquet"].is_file():
            continue
        info = _read_json(paths["json"])
        every_lens = pl.read_parquet(paths["prompts_parquet"])
        primary_lens = decoded_lenses(info.get("diagnostics") or {})[0]
        prompts = every_lens.filter(pl.col("lens") == primary_lens).sort("prompt_id")
        primary = prompts.filter(pl.col("role") == "primary")["prompt_id"]
        primary_id = (
            primary[0] if len(primary) else (prompts["prompt_id"][0] if prompts.height else None)
        )
        models[name] = ModelData(
            name, info, prompts, paths["records_parquet"], primary_id, every_lens
        )
    return RunData(run_dir, ledger, manifest, models)
