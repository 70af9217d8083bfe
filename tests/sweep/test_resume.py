"""Resume at the batch: a model whose worker is killed keeps its finished batches, and
--rerun-failed runs only the rest, giving the same files as a run that was never stopped."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors.prompts import PromptSpec
from actors.schema import PROMPT_SUMMARY_SCHEMA, RECORDS_SCHEMA
from sweep.artefacts import ModelArtefacts
from sweep.run import main
from tests.sweep.conftest import kill_actor_workers

NAME = "tiny-llama"
LONG = " ".join(["Berlin"] * 600)  # ~600 tokens: longer than the tiny models' context of 256
# (id, text, positions): with batch_size 2 and batch_tokens 16 these make 6 batches, longest
# first: [capital-de] (all positions), [too-long] (refused: over the context), then the
# next-token prompts by length, [planet], [italy, water], [france, count], [hello].
PROMPTS = [
    ("capital-de", "Give the city name only, plain text. The capital of Germany is called simply",
     "all"),
    ("france", "The capital of France is", "next"),
    ("hello", "Hello there", "next"),
    ("too-long", LONG, "next"),
    ("italy", "The capital of Italy is called", "next"),
    ("planet", "The largest planet in the solar system is called", "next"),
    ("water", "Water boils at a temperature of", "next"),
    ("count", "One, two, three,", "next"),
]  # fmt: skip
KILL_AT_ADD = 2  # the worker is killed as the driver stores its second finished batch


def _manifest(path: Path, model: Path) -> Path:
    body = (
        '[sweep]\nname = "resume"\nbatch_size = 2\nbatch_tokens = 16\ntop_k = 5\n'
        f'keep_residuals = true\n\n[[models]]\nname = "{NAME}"\nid = "{model}"\n'
    )
    for pid, text, positions in PROMPTS:
        body += f'\n[[prompts]]\nid = "{pid}"\ntext = "{text}"\npositions = "{positions}"\n'
    path.write_text(body)
    return path


def _ledger(out: Path) -> dict:
    return json.loads((out / "run-latest" / "ledger.json").read_text())["models"][NAME]


def _output(out: Path) -> dict:
    return json.loads((out / "run-latest" / f"output-{NAME}.json").read_text())


@pytest.fixture(scope="module")
def runs(tiny_checkpoints, tmp_path_factory) -> dict:
    """One uninterrupted run; one whose worker is killed mid-model, then --rerun-failed."""
    root = tmp_path_factory.mktemp("resume")
    manifest = _manifest(root / "m.toml", tiny_checkpoints["llama"])
    argv = [str(manifest), "--no-progress", "--num-cpus", "1"]
    whole, resumed = root / "whole", root / "resumed"
    assert main([*argv, "--out", str(whole)]) == 0

    real_add = ModelArtefacts.add
    adds: list[int | None] = []

    def add_then_kill(self, result, index=None):
        adds.append(index)
        if len(adds) == KILL_AT_ADD:
            # This batch's result is already here: it is still stored.
            kill_actor_workers("LensActor")
        return real_add(self, result, index)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ModelArtefacts, "add", add_then_kill)
        killed_code = main([*argv, "--out", str(resumed)])
    run = resumed / "run-latest"
    killed = {
        "code": killed_code,
        "ledger": _ledger(resumed),
        "files": sorted(p.name for p in run.iterdir() if NAME in p.name),
        "parts": sorted(p.name for p in (run / f".parts-{NAME}").iterdir()),
    }
    rerun_code = main([*argv, "--out", str(resumed), "--rerun-failed"])
    return {"whole": whole, "resumed": resumed, "killed": killed, "rerun_code": rerun_code}


def test_a_killed_worker_keeps_the_batches_it_finished(runs):
    killed = runs["killed"]
    entry = killed["ledger"]
    assert killed["code"] == 1 and entry["status"] == "failed"
    assert "the actor's worker process died" in entry["error"]
    assert entry["batches_total"] == 6 and entry["batches_resumed"] == 0
    # The two stored before the kill, and the one in flight if it had already come back.
    assert entry["batches_done"] in (KILL_AT_ADD, KILL_AT_ADD + 1)
    # Only its parts: no final file, no unfinished write; each part whole (JSON last).
    assert killed["files"] == [f".parts-{NAME}"]
    stems = {name.split(".", 1)[0] for name in killed["parts"]}
    assert len(stems) == entry["batches_done"]
    for stem in stems:
        kinds = sorted(n.split(".", 1)[1] for n in killed["parts"] if n.startswith(stem))
        data = ["json", "prompts.arrow", "records.arrow"]
        # Batch 1 holds only the refused prompt: no residuals.
        assert kinds == (data if stem.startswith("00001-") else [*data, "residuals.safetensors"])


def test_rerun_failed_runs_only_the_batches_not_finished(runs):
    done_before = runs["killed"]["ledger"]["batches_done"]
    assert runs["rerun_code"] == 0
    entry = _ledger(runs["resumed"])
    assert entry["status"] == "ok"
    assert (entry["batches_total"], entry["batches_done"]) == (6, 6)
    assert entry["batches_resumed"] == done_before
    diagnostics = _output(runs["resumed"])["diagnostics"]
    assert diagnostics["batches"] == 6 - done_before  # what the new actor itself ran
    assert diagnostics["batches_resumed"] == done_before
    # The refused prompt was in a batch of the killed run: still reported.
    assert [f["prompt_id"] for f in entry["prompt_failures"]] == ["too-long"]
    assert not list((runs["resumed"] / "run-latest").glob(".*"))  # parts assembled and gone
    whole = _ledger(runs["whole"])
    assert (whole["batches_total"], whole["batches_done"], whole["batches_resumed"]) == (6, 6, 0)


def test_the_resumed_files_equal_an_uninterrupted_run_bit_for_bit(runs):
    a, b = runs["whole"] / "run-latest", runs["resumed"] / "run-latest"
    for name in (f"records-{NAME}.parquet", f"prompts-{NAME}.parquet"):
        assert pq.read_table(a / name).equals(pq.read_table(b / name)), name
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    residuals = sorted(p.name for p in (a / f"residuals-{NAME}").iterdir())
    assert residuals == [f"batch-{i:04d}.safetensors" for i in (0, 2, 3, 4, 5)]  # 1: refused
    assert residuals == sorted(p.name for p in (b / f"residuals-{NAME}").iterdir())
    for name in residuals:
        left, right = a / f"residuals-{NAME}" / name, b / f"residuals-{NAME}" / name
        assert left.read_bytes() == right.read_bytes()
    whole, resumed = _output(runs["whole"]), _output(runs["resumed"])
    for key in ("prompt_failures", "parity"):
        assert whole["diagnostics"][key] == resumed["diagnostics"][key], key
    temperatures = whole["temperature_exploration"]
    assert temperatures == resumed["temperature_exploration"]
    kept = [pid for pid, _, _ in PROMPTS if pid != "too-long"]
    assert list(dict.fromkeys(t["prompt_id"] for t in temperatures)) == kept


def test_rows_are_in_manifest_order_whatever_the_batches(runs):
    records = pq.read_table(runs["whole"] / "run-latest" / f"records-{NAME}.parquet")
    ids = records.column("prompt_id").to_pylist()
    kept = [pid for pid, _, _ in PROMPTS if pid != "too-long"]
    assert list(dict.fromkeys(ids)) == kept  # each prompt's rows together, in manifest order
    columns = [records.column(c).to_pylist() for c in ("prompt_id", "layer", "pos")]
    keys = list(zip(*columns, strict=True))
    assert keys == sorted(keys, key=lambda k: (kept.index(k[0]), k[1], k[2]))
    prompts = pq.read_table(runs["whole"] / "run-latest" / f"prompts-{NAME}.parquet")
    assert prompts.column("prompt_id").to_pylist() == kept


def _empty_result(failed: str | None = None):
    from actors.lens_actor import BatchResult

    return BatchResult(
        pa.RecordBatch.from_pylist([], schema=RECORDS_SCHEMA),
        pa.RecordBatch.from_pylist([], schema=PROMPT_SUMMARY_SCHEMA),
        prompt_failures=[] if failed is None else [{"prompt_id": failed, "error": "too long"}],
    )


def test_only_parts_of_the_same_batch_and_fingerprint_are_reused(tmp_path):
    a, b = PromptSpec("a", "x"), PromptSpec("b", "y")
    folder = tmp_path / ".parts-m"
    sink = ModelArtefacts(tmp_path, "m", "fingerprint-1")
    assert sink.plan([[a], [b]], ["a", "b"]) == []
    sink.add(_empty_result("a"), 0)
    (folder / ".00001-0123456789abcdef.json.x1y2.tmp").write_text("{")  # a write cut short
    sink.abort()  # a failure keeps the finished batch and drops the unfinished write
    assert sorted(p.name.split(".", 1)[1] for p in folder.iterdir()) == [
        "json", "prompts.arrow", "records.arrow",
    ]  # fmt: skip
    # The same plan and fingerprint: batch 0 is reused.
    assert ModelArtefacts(tmp_path, "m", "fingerprint-1").plan([[a], [b]], ["a", "b"]) == [0]
    # Batches regrouped (another batch_size or tokenizer): nothing matches, all is discarded.
    assert ModelArtefacts(tmp_path, "m", "fingerprint-1").plan([[a, b]], ["a", "b"]) == []
    assert not list(folder.iterdir())
    # Another fingerprint (the manifest changed): the old batch is discarded too.
    sink = ModelArtefacts(tmp_path, "m", "fingerprint-1")
    sink.plan([[a], [b]], ["a", "b"])
    sink.add(_empty_result(), 0)
    assert ModelArtefacts(tmp_path, "m", "fingerprint-2").plan([[a], [b]], ["a", "b"]) == []
    assert not list(folder.iterdir())
    # A failure before any batch finished leaves no folder behind.
    ModelArtefacts(tmp_path, "m", "fingerprint-2").abort()
    assert not folder.exists()


def test_row_ranges_concatenate_each_run_in_order():
    import numpy as np

    from sweep.parts import _ranges

    got = _ranges(np.array([5, 0, 9]), np.array([2, 3, 0]))
    assert got.tolist() == [5, 6, 0, 1, 2]
    assert _ranges(np.array([], np.int64), np.array([], np.int64)).tolist() == []


def test_assembly_folds_pieces_from_many_parts_in_manifest_order(runs, tmp_path, monkeypatch):
    """A row group drawing on more parts than are held at once (folded every few parts) still
    comes out whole and in manifest order: the finished run's rows, re-split one prompt per part
    in reverse, assemble to the same tables."""
    import pyarrow.compute as pc

    from actors.lens_actor import BatchResult
    from sweep import parts as parts_module

    run = runs["whole"] / "run-latest"
    records = pq.read_table(run / f"records-{NAME}.parquet")
    summaries = pq.read_table(run / f"prompts-{NAME}.parquet")
    order = summaries.column("prompt_id").to_pylist()
    store = parts_module.BatchParts(tmp_path / ".parts")
    store.folder.mkdir()
    written = []
    for index, pid in enumerate(reversed(order)):
        rows = records.filter(pc.equal(records.column("prompt_id"), pid))
        summary = summaries.filter(pc.equal(summaries.column("prompt_id"), pid))
        result = BatchResult(rows.combine_chunks().to_batches()[0], summary.to_batches()[0])
        written.append(store.write(index, f"{index:016x}", [pid], result))
    monkeypatch.setattr(parts_module, "_COMBINE_PIECES", 2)
    groups = list(parts_module.record_row_groups(written, order, group_bytes=1 << 40))
    assert len(groups) == 1 and len(written) > 2 * parts_module._COMBINE_PIECES
    assert groups[0].equals(records)
    small = list(parts_module.record_row_groups(written, order, group_bytes=1))
    assert len(small) == len(order) and pa.concat_tables(small).equals(records)
    assert parts_module.prompt_summaries(written, order).equals(summaries)
