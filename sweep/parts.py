"""A model's finished batches, kept on disk as they arrive, so a stopped run resumes at the batch.

``run-latest/.parts-<model>/`` holds, per finished batch ``<index>-<key>``: ``.records.arrow``
and ``.prompts.arrow`` (Arrow IPC files of one record batch each, as the actor returned them),
``.residuals.safetensors`` (when residuals are kept) and, written last, ``.json`` (the batch's
prompt ids, where each prompt's records lie, its refused prompts, parity figures and
temperature rows). Every file is written under a temp name and renamed; a batch counts as
finished once its JSON is there and its files read back whole. ``key`` hashes the model's
fingerprint and the batch's prompt ids, so a batch is reused only by the same manifest's same
batch.

Arrow IPC, not Parquet: writing is a copy (no encoding on the driver's hot path), and memory
mapped it hands any prompt's rows back without decoding the rest, so the final files are
assembled in manifest order of prompts, one row group of about ``group_bytes`` at a time
(copied out of the mappings), whatever the number of prompts or batches. Parts are temporary, and about 2-3x larger than
the final zstd Parquet.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from actors.schema import PROMPT_SUMMARY_SCHEMA, RECORDS_SCHEMA, check_batch
from sweep.files import write_atomic, write_bytes, write_text

if TYPE_CHECKING:
    from actors.lens_actor import BatchResult

PARTS_PREFIX = ".parts-"


def parts_dir(run_dir: Path, name: str) -> Path:
    return run_dir / f"{PARTS_PREFIX}{name}"


def batch_key(fingerprint: str, prompt_ids: list[str]) -> str:
    """16 hex digits naming one batch of one model configuration."""
    digest = hashlib.sha256(fingerprint.encode())
    for pid in prompt_ids:
        digest.update(b"\0" + pid.encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Part:
    """One finished batch on disk; ``meta`` is its JSON but the temperature rows (the bulk of it,
    read again at the end: a long run does not hold them in the driver)."""

    folder: Path
    index: int
    key: str
    meta: dict[str, Any]

    def path(self, suffix: str) -> Path:
        return self.folder / f"{self.index:05d}-{self.key}.{suffix}"

    def files(self) -> list[Path]:
        names = ["records.arrow", "prompts.arrow", "json"]
        return [self.path(n) for n in names] + (
            [self.path("residuals.safetensors")] if self.meta["residuals_bytes"] is not None else []
        )

    def whole(self) -> bool:
        """Every file there and of the size its JSON says (a disk that lost a write after a
        crash gives a short or empty file: that batch runs again)."""
        try:
            residuals = self.meta["residuals_bytes"]
            if (
                residuals is not None
                and self.path("residuals.safetensors").stat().st_size != residuals
            ):
                return False
            return (
                _read_ipc(self.path("records.arrow")).num_rows == self.meta["records_rows"]
                and _read_ipc(self.path("prompts.arrow")).num_rows == self.meta["prompts_rows"]
            )
        except (OSError, KeyError, pa.ArrowException):
            return False


class BatchParts:
    """The parts folder of one model."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def keep_planned(self, planned: dict[int, str]) -> dict[int, Part]:
        """The finished parts of the planned batches (index -> key); every other file in the
        folder (another plan's or fingerprint's batch, an unfinished write) is deleted."""
        found: dict[int, Part] = {}
        if not self.folder.is_dir():
            return found
        for meta_path in sorted(self.folder.glob("*.json")):
            index, _, key = meta_path.name.removesuffix(".json").partition("-")
            if not index.isdigit() or planned.get(int(index)) != key:
                continue
            try:
                meta = json.loads(meta_path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            meta.pop("temperature", None)
            part = Part(self.folder, int(index), key, meta)
            if part.whole():
                found[part.index] = part
        keep = {path.name for part in found.values() for path in part.files()}
        for path in self.folder.iterdir():
            if path.name not in keep:
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        return found

    def write(self, index: int, key: str, prompt_ids: list[str], result: BatchResult) -> Part:
        """Make one batch durable: its data files first, its JSON last (each atomically)."""
        records = check_batch(result.records, RECORDS_SCHEMA)
        summary = check_batch(result.summary, PROMPT_SUMMARY_SCHEMA)
        meta: dict[str, Any] = {
            "index": index,
            "key": key,
            "prompt_ids": prompt_ids,
            "records_rows": records.num_rows,
            "records_bytes": records.nbytes,
            "prompt_rows": _prompt_runs(records),  # [prompt id, first row, rows] of each prompt
            "prompts_rows": summary.num_rows,
            "residuals_bytes": None if result.residuals is None else len(result.residuals),
            "prompt_failures": result.prompt_failures,
            "parity": result.parity,
            "temperature": result.temperature,
        }
        part = Part(self.folder, index, key, meta)
        _write_ipc(part.path("records.arrow"), records)
        _write_ipc(part.path("prompts.arrow"), summary)
        if result.residuals is not None:
            write_bytes(part.path("residuals.safetensors"), result.residuals)
        write_text(part.path("json"), json.dumps(meta, separators=(",", ":")))
        del meta["temperature"]
        return part

    def prune(self) -> None:
        """After a failure: drop unfinished writes, and the folder if no batch finished.
        Never raises (it runs after another error, e.g. a full disk)."""
        with contextlib.suppress(OSError):
            for tmp in self.folder.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
            if not any(self.folder.glob("*.json")):
                shutil.rmtree(self.folder, ignore_errors=True)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _write_ipc(final: Path, batch: pa.RecordBatch) -> None:
    def write(tmp: Path) -> None:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
            writer.write_batch(batch)

    write_atomic(final, write)


def _read_ipc(path: Path) -> pa.RecordBatch:
    """The part's one record batch, memory mapped (its buffers keep the mapping alive after the
    file is closed, so a part read costs no file descriptor and no copy)."""
    source = pa.memory_map(str(path))
    try:
        return pa.ipc.open_file(source).get_batch(0)
    finally:
        source.close()


def _prompt_runs(records: pa.RecordBatch) -> list[list[Any]]:
    """[prompt id, first row, rows] of each run of one prompt's rows, in row order."""
    if records.num_rows == 0:
        return []
    encoded = pc.run_end_encode(records.column("prompt_id"))
    ends = encoded.run_ends.to_pylist()
    starts = [0, *ends[:-1]]
    return [
        [pid, start, end - start]
        for pid, start, end in zip(encoded.values.to_pylist(), starts, ends, strict=True)
    ]


def manifest_rank(order: list[str]) -> dict[str, int]:
    return {pid: i for i, pid in enumerate(order)}


def record_row_groups(parts: list[Part], order: list[str], group_bytes: int) -> Iterator[pa.Table]:
    """The records of every part, prompt by prompt in ``order`` (layer, pos within a prompt, as
    the actor wrote them), in tables of about ``group_bytes`` (one row group each in the final
    file); the parts a table needs are mapped for that table only."""
    rank = manifest_rank(order)
    runs = sorted(
        (rank[pid], part.index, start, rows, rows * part.meta["records_bytes"] // total)
        for part in parts
        if (total := part.meta["records_rows"])
        for pid, start, rows in part.meta["prompt_rows"]
    )
    by_index = {part.index: part for part in parts}
    chunk: list[tuple[int, int, int, int, int]] = []
    size = 0
    for run in runs:
        chunk.append(run)
        size += run[4]
        if size >= group_bytes:
            yield _gather(chunk, by_index)
            chunk, size = [], 0
    if chunk:
        yield _gather(chunk, by_index)


def _gather(chunk: list[tuple[int, int, int, int, int]], parts: dict[int, Part]) -> pa.Table:
    """The rows of ``chunk`` (rank, part index, first row, rows, bytes), in its order, as one
    compact table: each part's wanted rows are copied out of its mapping (one slice per prompt
    would cost ~10 KiB of objects each), then put in order."""
    runs = np.array([(index, start, rows) for _, index, start, rows, _ in chunk], np.int64)
    indices, starts, counts = runs.T
    # One part's runs, in chunk order, become consecutive rows of its piece; the pieces follow
    # each other in order of first use.
    used = list(dict.fromkeys(indices.tolist()))
    pieces: list[pa.RecordBatch] = []
    where = np.empty(len(runs), np.int64)  # each run's first row in the gathered table
    total = 0
    for index in used:
        mine = np.flatnonzero(indices == index)
        pieces.append(
            _read_ipc(parts[index].path("records.arrow")).take(
                pa.array(_ranges(starts[mine], counts[mine]))
            )
        )
        if len(pieces) == _COMBINE_PIECES:
            # A piece's column objects cost ~90 KiB whatever its rows; a table drawing on every
            # part (thousands at research scale) would hold that per part: fold them as we go.
            pieces = _folded(pieces, RECORDS_SCHEMA)
        where[mine] = total + np.concatenate(([0], np.cumsum(counts[mine])[:-1]))
        total += int(counts[mine].sum())
    return pa.Table.from_batches(pieces, RECORDS_SCHEMA).take(pa.array(_ranges(where, counts)))


_COMBINE_PIECES = 32  # parts gathered before their pieces are folded into one batch


def _folded(batches: list[pa.RecordBatch], schema: pa.Schema) -> list[pa.RecordBatch]:
    """``batches`` copied into one (the mapped parts they point into are then let go)."""
    return pa.Table.from_batches(batches, schema).combine_chunks().to_batches()


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """starts[i], starts[i] + 1, ..., starts[i] + counts[i] - 1 for each i, concatenated."""
    if counts.size == 0:
        return np.empty(0, np.int64)
    run_of_row = np.repeat(np.arange(counts.size), counts)
    first_row_of_run = np.cumsum(counts) - counts
    return starts[run_of_row] + np.arange(int(counts.sum())) - first_row_of_run[run_of_row]


def prompt_summaries(parts: list[Part], order: list[str]) -> pa.Table:
    """The prompt summaries of every part, one row per prompt, in ``order``."""
    batches: list[pa.RecordBatch] = []
    for part in parts:
        batches.append(_read_ipc(part.path("prompts.arrow")))
        if len(batches) == _COMBINE_PIECES:  # as in _gather: a wide batch's objects add up
            batches = _folded(batches, PROMPT_SUMMARY_SCHEMA)
    table = pa.Table.from_batches(batches, PROMPT_SUMMARY_SCHEMA)
    position = pc.index_in(table.column("prompt_id"), value_set=pa.array(order, pa.string()))
    return table.take(pc.sort_indices(position))


def per_prompt_rows(parts: list[Part], field: str, order: list[str]) -> list[dict[str, Any]]:
    """A list field of every part's JSON (prompt_failures; temperature, read from the file), by
    prompt in ``order``; a prompt's own rows keep their order."""
    rank = manifest_rank(order)
    rows = []
    for part in parts:
        meta = part.meta if field in part.meta else json.loads(part.path("json").read_text())
        rows += [(rank[r["prompt_id"]], part.index, n, r) for n, r in enumerate(meta[field])]
    return [r for *_, r in sorted(rows, key=lambda x: x[:3])]


def merged_parity(parts: list[Part]) -> dict[str, float]:
    """The model's parity figures over every batch: maxima, and the sum of top-1 disagreements."""
    total: dict[str, float] = {"max_abs": 0.0, "max_kl_bits": 0.0, "max_rel": 0.0,
                               "top1_disagreements": 0}  # fmt: skip
    for part in parts:
        for key, value in part.meta["parity"].items():
            total[key] = (
                total[key] + value if key == "top1_disagreements" else max(total[key], value)
            )
    return total


def with_batches(
    diagnostics: dict[str, Any], parts: list[Part], order: list[str], resumed: int
) -> dict[str, Any]:
    """The actor's diagnostics with what every batch carried (refused prompts, parity,
    temperature rows), batches an earlier run finished included; ``batches`` stays the count
    this actor ran."""
    figures = merged_parity(parts)
    parity = {
        **diagnostics.get("parity", {}),
        "max_abs_lens_minus_model_logits": figures["max_abs"],
        "max_kl_model_to_lens_bits": figures["max_kl_bits"],
        "top1_disagreements": figures["top1_disagreements"],
        "max_relative_error": figures["max_rel"],
    }
    return {
        **diagnostics,
        "parity": parity,
        "prompt_failures": per_prompt_rows(parts, "prompt_failures", order),
        "temperature_exploration": per_prompt_rows(parts, "temperature", order),
        "batches_total": len(parts),
        "batches_resumed": resumed,
    }


def link_residuals(parts: list[Part], directory: Path) -> None:
    """``directory``/batch-<index>.safetensors for every part with residuals: hard links to the
    parts (copies where a link cannot be made), so the parts stay whole until the end."""
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    for part in parts:
        if part.meta["residuals_bytes"] is not None:
            source = part.path("residuals.safetensors")
            target = directory / f"batch-{part.index:04d}.safetensors"
            try:
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)
