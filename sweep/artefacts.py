"""Per-model artefacts: Parquet assembled from the finished batches, the seed-layout CSVs and
the JSON diagnostics.

Batches are made durable as they arrive (``sweep.parts``; the driver's memory does not grow with
the number of prompts); every file appears atomically when the model finishes.
"""

from __future__ import annotations

import contextlib
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from actors.schema import (
    PROMPT_SUMMARY_SCHEMA,
    RECORDS_SCHEMA,
    SCHEMA_VERSION,
    artefact_tier,
    check_batch,
)
from sweep.files import write_atomic, write_json
from sweep.parts import (
    BatchParts,
    Part,
    batch_key,
    link_residuals,
    parts_dir,
    prompt_summaries,
    record_row_groups,
    with_batches,
)

if TYPE_CHECKING:
    from actors.lens_actor import BatchResult
    from actors.prompts import PromptSpec

ROW_GROUP_BYTES = (
    4 << 20
)  # records row groups: about this much Arrow data (memory while assembling ~ 4x)
# (assembling one holds ~5x this at peak: the rows copied out of the parts, in order, encoded)


def _fields_after(schema: pa.Schema, name: str) -> tuple[str, ...]:
    names = schema.names
    return tuple(names[names.index(name) + 1 :])


# The audit's columns, in schema order: whatever the schema adds, the CSV and JSON carry.
AUDIT_RECORD_COLUMNS = _fields_after(RECORDS_SCHEMA, "is_answer")
AUDIT_PROMPT_FIELDS = _fields_after(PROMPT_SUMMARY_SCHEMA, "parity_max_abs")


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
    """A Parquet file written table by table under a temp name, renamed into place on close."""

    def __init__(self, final: Path, schema: Any) -> None:
        self.final = final
        self.tmp = final.with_name(f".{final.name}.partial")
        self.schema = schema
        self.writer: pq.ParquetWriter | None = None

    def _open(self) -> pq.ParquetWriter:
        self.tmp.parent.mkdir(parents=True, exist_ok=True)
        return pq.ParquetWriter(self.tmp, self.schema, compression="zstd")

    def write(self, table: pa.Table) -> None:
        """Append ``table`` as one row group."""
        if self.writer is None:
            self.writer = self._open()
        self.writer.write_table(check_batch(table, self.schema), row_group_size=table.num_rows)

    def commit(self) -> None:
        if self.writer is None:  # no rows: still an (empty) file, so readers find it
            self.writer = self._open()
        self.writer.close()
        self.writer = None
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
    """One model's artefacts: each finished batch made durable as a part (``sweep.parts``), then
    the per-model files assembled from the parts in manifest order of prompts.

    ``plan`` first (the driver does): it names the batches, and returns those an earlier run
    already finished. Without it (``sweep.one``), batches are numbered as they arrive.
    """

    def __init__(self, run_dir: Path, name: str, fingerprint: str = "") -> None:
        self.name = name
        self.fingerprint = fingerprint
        self.paths = artefact_paths(run_dir, name)
        self.parts = BatchParts(parts_dir(run_dir, name))
        self._residuals_tmp = self.paths["residuals_dir"].with_name(
            f".{self.paths['residuals_dir'].name}.partial"
        )
        self._planned: list[list[str]] | None = None  # prompt ids of each planned batch
        self._order: list[str] = []  # prompt ids in manifest order (else in arrival order)
        self._done: dict[int, Part] = {}
        self.batches_resumed = 0
        self.diagnostics: dict[str, Any] = {}  # after commit: the actor's, with every batch's

    def plan(self, batches: list[list[PromptSpec]], manifest_ids: list[str]) -> list[int]:
        """Name this model's batches; returns the indices already finished by an earlier run
        (kept, not to be run again). Parts of any other plan or fingerprint are deleted."""
        self._planned = [[p.id for p in batch] for batch in batches]
        self._order = list(manifest_ids)
        keys = {i: batch_key(self.fingerprint, ids) for i, ids in enumerate(self._planned)}
        self._done = self.parts.keep_planned(keys)
        self.batches_resumed = len(self._done)
        return sorted(self._done)

    def add(self, result: BatchResult, index: int | None = None) -> None:
        """Make one finished batch durable (planned: batch ``index`` of the plan)."""
        if self._planned is None:  # unplanned: the next batch, of the prompts it answered
            index = len(self._done)
            ids = result.summary.column("prompt_id").to_pylist()
            ids += [f["prompt_id"] for f in result.prompt_failures]
            self._order += ids
        elif index is None or not 0 <= index < len(self._planned):
            raise ValueError(f"batch index {index} is not one of the {len(self._planned)} planned")
        else:
            ids = self._planned[index]
        key = batch_key(self.fingerprint, ids)
        self._done[index] = self.parts.write(index, key, ids, result)

    def abort(self) -> None:
        """After a failure: the finished batches stay for --rerun-failed; nothing half-written
        and no final file of this model is left. Never raises."""
        _StreamingParquet(self.paths["records_parquet"], RECORDS_SCHEMA).abort()
        shutil.rmtree(self._residuals_tmp, ignore_errors=True)
        for path in self.paths.values():
            with contextlib.suppress(OSError):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        self.parts.prune()

    def commit(self, diagnostics: dict[str, Any], context: dict[str, Any]) -> dict[str, str]:
        """Assemble the Parquet files from the parts (manifest order of prompts), derive the CSVs
        and JSON, remove the parts; returns file names by role."""
        planned = len(self._done) if self._planned is None else len(self._planned)
        missing = sorted(set(range(planned)) - set(self._done))
        if missing:
            raise RuntimeError(f"{self.name}: batches {missing[:5]} have not finished")
        parts = [self._done[i] for i in range(planned)]
        self.diagnostics = with_batches(diagnostics, parts, self._order, self.batches_resumed)
        records = _StreamingParquet(self.paths["records_parquet"], RECORDS_SCHEMA)
        for table in record_row_groups(parts, self._order, ROW_GROUP_BYTES):
            records.write(table)
        records.commit()
        # Arrow's pool keeps what the assembly freed; a sweep of many models would stack it.
        pa.default_memory_pool().release_unused()
        summaries = prompt_summaries(parts, self._order)
        write_atomic(
            self.paths["prompts_parquet"],
            lambda p: pq.write_table(summaries, p, compression="zstd"),
        )
        if any(p.meta["residuals_bytes"] is not None for p in parts):
            link_residuals(parts, self._residuals_tmp)
            shutil.rmtree(self.paths["residuals_dir"], ignore_errors=True)
            self._residuals_tmp.replace(self.paths["residuals_dir"])
        lenses = decoded_lenses(self.diagnostics)
        write_seed_csvs(self.paths, self.diagnostics.get("top_k", 20), lenses)
        every_lens = pl.read_parquet(self.paths["prompts_parquet"])
        prompts = every_lens.filter(pl.col("lens") == lenses[0])
        controls = prompts.filter(pl.col("role") == "control")["prompt_id"].to_list()
        margins = (
            pl.scan_parquet(self.paths["records_parquet"])
            .filter(
                pl.col("is_next_token")
                & (pl.col("lens") == lenses[0])
                & pl.col("prompt_id").is_in(controls)
            )
            .select("prompt_id", "layer", "control_margin")
            .collect()
        )
        info = model_json(self.name, self.diagnostics, prompts, context, margins)
        info["lenses"] = lens_block(every_lens, self.paths["records_parquet"], lenses)
        write_json(self.paths["json"], info)
        self.parts.remove()
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


def decoded_lenses(diagnostics: dict[str, Any]) -> list[str]:
    """The lenses a model was decoded with, the primary first (runs before trained lenses
    decoded the primary alone)."""
    return list(diagnostics.get("lenses") or [diagnostics.get("lens", "final")])


def lens_block(prompts: pl.DataFrame, records_path: Path, lenses: list[str]) -> dict[str, Any]:
    """output-<model>.json's "lenses": per lens, the next-token KL to the model's output by
    layer (mean over prompts) and its mean over layers 0..L-1 (at L the final-norm lens is the
    model's head), and the primary prompt's and every prompt's L_copy / L_semantic."""
    kl = (
        pl.scan_parquet(records_path)
        .filter(pl.col("is_next_token"))
        .group_by("lens", "layer")
        .agg(pl.col("kl_to_final_bits").mean())
        .sort("lens", "layer")
        .collect()
    )
    primary_id = _primary_id(prompts.filter(pl.col("lens") == lenses[0]))
    out: dict[str, Any] = {"primary": lenses[0], "decoded": lenses, "by_lens": {}}
    for lens in lenses:
        by_layer = kl.filter(pl.col("lens") == lens)["kl_to_final_bits"].to_list()
        mine = prompts.filter(pl.col("lens") == lens)
        primary = mine.filter(pl.col("prompt_id") == primary_id)
        reached = mine["L_semantic"].drop_nulls()
        below_last = by_layer[:-1]
        out["by_lens"][lens] = {
            "kl_to_final_bits_by_layer": [finite(v) for v in by_layer],
            "mean_kl_to_final_bits": finite(sum(below_last) / len(below_last))
            if below_last
            else None,
            "primary_L_copy": primary["L_copy"][0] if primary.height else None,
            "primary_L_semantic": primary["L_semantic"][0] if primary.height else None,
            "n_prompts": mine.height,
            "frac_prompts_L_semantic": reached.len() / mine.height if mine.height else None,
            "median_L_semantic": finite(reached.median()) if reached.len() else None,
        }
    return out


def write_seed_csvs(paths: dict[str, Path], top_k: int, lenses: list[str]) -> None:
    """The seed's two CSVs for the primary prompt, so existing readers keep working.

    records:          layer,pos,token,entropy,top1,prob1,...,topK,probK,rest_mass (every position)
    pure next-token:  the same at the next-token position, then copy_collapse,entropy_collapse,
                      is_answer, and (added, at the end) p_answer,answer_rank,kl_to_final_bits,
                      then the audit's columns in RECORDS_SCHEMA order (empty with audit off).
    Both end with ``lens``: one block of rows per lens decoded, in ``lenses`` order (the primary
    first).
    Entropy is in bits. New columns only ever go at the end, so readers by position still work.
    """
    prompts = pl.read_parquet(paths["prompts_parquet"], columns=["prompt_id", "role", "lens"])
    primary = _primary_id(prompts.filter(pl.col("lens") == lenses[0]))
    rank = {name: i for i, name in enumerate(lenses)}
    records = pl.scan_parquet(paths["records_parquet"]).filter(pl.col("prompt_id") == primary)
    records = records.with_columns(
        pl.col("lens").replace_strict(rank, default=len(rank), return_dtype=pl.Int32).alias("_r")
    ).sort(["_r", "layer", "pos"])
    all_rows = records.select([*_seed_columns(top_k), pl.col("lens")]).collect()
    write_atomic(paths["records_csv"], all_rows.write_csv)
    flags = [
        pl.col("copy_collapse"),
        pl.col("entropy_collapse"),
        pl.col("is_answer"),
        pl.col("answer_prob").alias("p_answer"),
        pl.col("answer_rank"),
        pl.col("kl_to_final_bits"),
        *(pl.col(c) for c in AUDIT_RECORD_COLUMNS),
    ]
    pure = (
        records.filter(pl.col("is_next_token"))
        .select([*_seed_columns(top_k), *flags, pl.col("lens")])
        .collect()
    )
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


def _prompt_entry(r: dict[str, Any]) -> dict[str, Any]:
    """One prompt's block of output-<name>.json, from its prompts-Parquet row."""
    return {
        "prompt_id": r["prompt_id"],
        "role": r["role"],
        "reference": r["reference"],
        "suite": r["suite"],
        "prompt_set": r["prompt_set"],
        "template": r["template"],
        "group": r["group"],
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
        **{f: finite(r[f]) for f in AUDIT_PROMPT_FIELDS},
    }


def model_json(
    name: str,
    diagnostics: dict[str, Any],
    prompts: pl.DataFrame,
    context: dict[str, Any],
    control_margins: pl.DataFrame | None = None,
) -> dict[str, Any]:
    """output-<name>.json: diagnostics, the primary prompt's collapse layers and final prediction,
    every prompt's final prediction (the seed's test prompts) and audit fields, the model's
    audit block, the statistics across prompts (sweep/stats.py, bootstrap seeded from the
    diagnostics' seed), temperature exploration, context.

    control_margins: next-token rows (prompt_id, layer, control_margin) of the control prompts.
    """
    from sweep.stats import statistics_block, stats_seed

    # Per-prompt entries for the manifest's own [[prompts]]; a prompt set's (thousands, at
    # research scale) are rows of prompts-<name>.parquet and read through the statistics, so the
    # JSON, and the driver that writes it, stay the size of the hand-written prompts.
    own = prompts.filter(pl.col("prompt_set").is_null())
    rows = own.sort("prompt_id").to_dicts()
    primary_id = _primary_id(prompts)
    sets = prompts.filter(pl.col("prompt_set").is_not_null()).group_by("prompt_set").len()
    prompt_sets = {
        r["prompt_set"]: {"n_prompts": r["len"], "per_prompt": f"prompts-{name}.parquet"}
        for r in sets.sort("prompt_set").iter_rows(named=True)
    }
    per_prompt = [_prompt_entry(r) for r in rows]
    primary_rows = prompts.filter(pl.col("prompt_id") == primary_id).to_dicts()
    primary = _prompt_entry(primary_rows[0]) if primary_rows else None
    diag = {k: v for k, v in diagnostics.items() if k != "temperature_exploration"}
    return {
        "schema_version": SCHEMA_VERSION,
        "model": name,
        "diagnostics": diag,
        "primary_prompt": primary,
        "prompts": per_prompt,
        "prompt_sets": prompt_sets,
        "audit": audit_block(prompts, primary_id, control_margins),
        "statistics": statistics_block(prompts, stats_seed(diagnostics)),
        "temperature_exploration": diagnostics.get("temperature_exploration", []),
        **context,
    }


# Which per-prompt audit fields the JSON's primary block groups together, by name prefix.
_GROUPS = {
    "copy": ("L_copy_strict@", "L_copy_soft_k", "delta_layers_"),
    "milestones": ("L_cos@", "L_kl@", "L_rank@"),
    "gates": ("L_semantic_", "confirmed_source", "gates_stable"),
    "raw_vs_norm": ("n_norm_only", "L_norm_only", "kl_norm_raw", "frac_layers_", "js_", "l1_", "jaccard_"),
    "surface": ("L_answer_over_echo", "L_geom_crossover"),
}  # fmt: skip
# The plain lens's layers, measured with the audit off too; every other number needs the audit.
PLAIN_LENS_LAYERS = ("L_copy", "L_copy_H", "L_semantic")
SUITE_METRICS = ("L_copy", "L_copy_strict@0.95", "L_copy_soft_k1", "L_semantic",
                 "L_semantic_strong", "L_semantic_confirmed")  # fmt: skip
# Ablations: the loosest and the strictest strict-copy threshold, the shortest soft window.
ABLATION_METRICS = ("L_copy", "L_copy_strict@0.7", "L_copy_strict@0.95", "L_copy_soft_k1",
                    "L_semantic", "L_semantic_strong", "L_semantic_confirmed")  # fmt: skip


def finite(value: Any) -> Any:
    """A value as JSON writes it: NaN and infinities become null (JSON has no spelling for them)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def audit_enabled(prompts: pl.DataFrame) -> bool:
    """Whether the audit ran: with audit = false every audit field is null."""
    score = "lens_artefact_score"
    return score in prompts.columns and bool(prompts[score].is_not_null().any())


def model_artefact_score(prompts: pl.DataFrame) -> tuple[float | None, str | None, int]:
    """The model's lens-artefact score: the mean over prompts that have one; its tier; how many."""
    if "lens_artefact_score" not in prompts.columns:
        return None, None, 0
    scores = prompts["lens_artefact_score"].cast(pl.Float64).fill_nan(None).drop_nulls()
    if scores.is_empty():
        return None, None, 0
    mean = float(scores.mean())  # type: ignore[arg-type]
    return mean, artefact_tier(mean), scores.len()


def depth_stats(layers: list[int | None], n_layers: int, measured: bool) -> dict[str, Any]:
    """Relative depths (layer / n_layers) of the prompts that reach a layer: median, min, max,
    IQR (linear quantiles) and how many reach it; all null when the layer was not measured."""
    reached = pl.Series([x / n_layers for x in layers if x is not None], dtype=pl.Float64)
    if not measured or reached.is_empty():
        stats = dict.fromkeys(("median", "min", "max", "iqr"))
        return {**stats, "n_reached": reached.len() if measured else None}
    q75, q25 = reached.quantile(0.75, "linear"), reached.quantile(0.25, "linear")
    return {
        "median": reached.median(), "min": reached.min(), "max": reached.max(),
        "iqr": q75 - q25,  # type: ignore[operator]
        "n_reached": reached.len(),
    }  # fmt: skip


def _grouped(row: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name in AUDIT_PROMPT_FIELDS:
        group = next((g for g, prefixes in _GROUPS.items() if name.startswith(prefixes)), None)
        if group is not None:
            out.setdefault(group, {})[name] = finite(row[name])
    return out


def _controls(rows: dict[str, dict[str, Any]], margins: pl.DataFrame | None) -> list[dict]:
    """Per control prompt: where its own answer first beats the foil, and by how much."""
    out = []
    for r in rows.values():
        if r["role"] != "control":
            continue
        own = (
            margins.filter(pl.col("prompt_id") == r["prompt_id"]).sort("layer")
            if margins is not None
            else pl.DataFrame({"control_margin": []}, schema={"control_margin": pl.Float32})
        )
        values = [finite(x) for x in own["control_margin"].to_list()]
        finite_values = [x for x in values if x is not None]
        out.append({
            "prompt_id": r["prompt_id"], "reference": r["reference"], "answer": r["answer"],
            "foil_token": r["foil_token"], "L_control_wins": r["L_control_wins"],
            "max_control_margin": max(finite_values, default=None),
            "final_control_margin": values[-1] if values else None,  # at the last layer
        })  # fmt: skip
    return out


def _ablations(rows: dict[str, dict[str, Any]], on: bool) -> list[dict]:
    """Per ablation: each layer on the original prompt, on the ablation, and the change."""
    out = []
    for r in rows.values():
        ref = rows.get(r["reference"] or "")
        if r["role"] != "ablation" or ref is None:
            continue
        entry: dict[str, Any] = {"prompt_id": r["prompt_id"], "reference": ref["prompt_id"]}
        for m in ABLATION_METRICS:
            a, b = (ref[m], r[m]) if on or m in PLAIN_LENS_LAYERS else (None, None)
            entry[m] = {
                "reference": a,
                "ablation": b,
                "delta": None if a is None or b is None else b - a,
            }
        out.append(entry)
    return out


def _suites(rows: dict[str, dict[str, Any]], n_layers: int, on: bool) -> list[dict]:
    """Per fact suite: the spread of each layer's relative depth over its prompts."""
    out = []
    for suite in sorted({r["suite"] for r in rows.values() if r["suite"] is not None}):
        members = [r for r in rows.values() if r["suite"] == suite]
        entry: dict[str, Any] = {"suite": suite, "n_prompts": len(members),
                                 "prompt_ids": [r["prompt_id"] for r in members]}  # fmt: skip
        for m in SUITE_METRICS:
            entry[m] = depth_stats([r[m] for r in members], n_layers, on or m in PLAIN_LENS_LAYERS)
        out.append(entry)
    return out


def _audit_rows(prompts: pl.DataFrame, primary_id: str | None) -> pl.DataFrame:
    """The prompts the audit block names one by one (controls, ablations and what they ablate,
    suite members, the primary), by prompt id: never every row of a 10,000-prompt set."""
    refs = prompts.filter(pl.col("role") == "ablation")["reference"].drop_nulls()
    wanted = (
        pl.col("role").is_in(["control", "ablation"])
        | pl.col("suite").is_not_null()
        | pl.col("prompt_id").is_in(refs.to_list())
        | (pl.col("prompt_id") == (primary_id or ""))
    )
    return prompts.filter(wanted).sort("prompt_id")


def _top_by(prompts: pl.DataFrame, column: str, *also: str) -> dict[str, Any] | None:
    """Of the row with the largest finite ``column`` (ties: the first prompt id), its id,
    ``column`` and the ``also`` columns; None when no row has one."""
    value = pl.col(column).cast(pl.Float64)
    narrow = prompts.select(list(dict.fromkeys(("prompt_id", column, *also))))
    finite_rows = narrow.filter(value.is_finite())
    if finite_rows.is_empty():
        return None
    top = finite_rows.sort([value, pl.col("prompt_id")], descending=[True, False]).row(
        0, named=True
    )
    return {k: finite(v) for k, v in top.items()}


def audit_block(
    prompts: pl.DataFrame, primary_id: str | None, control_margins: pl.DataFrame | None
) -> dict[str, Any]:
    """The model's lens-artefact audit in one place (output-<model>.json's "audit").

    One shape whatever the data: with the audit off, "enabled" is false, every number the audit
    computes is null (so are the objects made only of them: worst_prompt, primary, last_layer,
    numeric_health), and the lists that come from the manifest (controls, ablations, suites)
    keep their entries, with the plain lens's L_copy and L_semantic still filled.
    """
    on = audit_enabled(prompts)
    rows = {r["prompt_id"]: r for r in _audit_rows(prompts, primary_id).to_dicts()}
    n_layers = int(prompts["n_layers"][0]) if prompts.height else 0
    score, tier, n_scored = model_artefact_score(prompts)
    worst = _top_by(prompts, "lens_artefact_score", "lens_artefact_tier")
    p = rows.get(primary_id or "") if on else None
    head_kl = (_top_by(prompts, "last_kl_lens_to_head_bits") or {}).get("last_kl_lens_to_head_bits")
    top_ratio = _top_by(prompts, "max_resid_norm_ratio") or dict.fromkeys(
        ("max_resid_norm_ratio", "prompt_id")
    )
    bad = prompts.filter(pl.col("n_nonfinite_layers").fill_null(0) > 0).sort("prompt_id")
    bad_ids = bad["prompt_id"].to_list()
    return {
        "enabled": on,
        "lens_artefact_score": score,
        "lens_artefact_tier": tier,
        "n_prompts_scored": n_scored,
        "worst_prompt": None if worst is None else {
            k: worst[k] for k in ("prompt_id", "lens_artefact_score", "lens_artefact_tier")
        },
        "primary": None if p is None else {
            "prompt_id": p["prompt_id"], "n_layers": n_layers, "L_semantic": p["L_semantic"],
            "lens_artefact_score": finite(p["lens_artefact_score"]),
            "lens_artefact_tier": p["lens_artefact_tier"], **_grouped(p),
        },
        "last_layer": None if p is None else {
            "prompt_id": p["prompt_id"],
            "kl_lens_to_head_bits": finite(p["last_kl_lens_to_head_bits"]),
            "temperature": finite(p["last_temperature"]),
            "kl_after_temperature_bits": finite(p["last_kl_after_temperature_bits"]),
            "max_kl_lens_to_head_bits_any_prompt": head_kl,
        },
        "numeric_health": None if not on else {
            "any_nonfinite": bool(bad_ids), "prompts_with_nonfinite": bad_ids,
            "max_resid_norm_ratio": top_ratio["max_resid_norm_ratio"],
            "max_resid_norm_ratio_prompt": top_ratio["prompt_id"],
        },
        "controls": _controls(rows, control_margins),
        "ablations": _ablations(rows, on),
        "suites": _suites(rows, n_layers, on),
    }  # fmt: skip
