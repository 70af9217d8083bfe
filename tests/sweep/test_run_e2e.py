"""End to end through a local Ray: artefacts, seed CSVs, ledger, exit codes, rerun, determinism."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq

from sweep.run import main
from tests.sweep.conftest import write_manifest


def _ledger(out: Path) -> dict:
    return json.loads((out / "run-latest" / "ledger.json").read_text())


def test_broken_model_fails_alone_and_the_others_complete(first_run):
    out, run = first_run["out"], first_run["run"]
    assert first_run["code"] == 1
    ledger = _ledger(out)
    assert {n: e["status"] for n, e in ledger["models"].items()} == {
        "tiny-llama": "ok",
        "tiny-gemma2": "ok",
        "broken": "failed",
    }
    assert "could not load" in ledger["models"]["broken"]["error"]
    for name in ("tiny-llama", "tiny-gemma2"):
        entry = ledger["models"][name]
        assert entry["device"] == "cpu" and entry["node_id"] and entry["fingerprint"]
        assert entry["parity_max_abs"] <= 1e-4
        diag = json.loads((run / f"output-{name}.json").read_text())["diagnostics"]
        # CUDA determinism needs its cuBLAS setting before the worker's first CUDA call: the
        # sweep puts it into the actor's runtime env, so it is there before the actor runs.
        assert diag["deterministic"] == {
            "algorithms": True,
            "cublas_workspace_config": ":4096:8",
            "worker_env_preset": True,
        }
        for f in (f"records-{name}.parquet", f"prompts-{name}.parquet", f"output-{name}.json"):
            assert (run / f).is_file()
        with open(run / f"output-{name}-records.csv") as fh:
            header = next(csv.reader(fh))
        expected = ["layer", "pos", "token", "entropy"]
        for i in range(1, 6):
            expected += [f"top{i}", f"prob{i}"]
        assert header == [*expected, "rest_mass", "lens"]
        with open(run / f"output-{name}-pure-next-token.csv") as fh:
            rows = list(csv.reader(fh))
        assert rows[0][: len(expected) + 4] == [
            *expected, "rest_mass", "copy_collapse", "entropy_collapse", "is_answer",
        ]  # fmt: skip
        assert len(rows) - 1 == 4  # layers 0..3 at the primary prompt's next-token position
        records = pq.read_table(run / f"records-{name}.parquet")
        assert set(records.column("prompt_id").to_pylist()) == {
            "capital-de",
            "capital-fr",
            "no-answer",
        }
    # Nothing half-written is left behind by the failed model.
    assert not list(run.glob("records-broken*")) and not list(run.glob("output-broken*"))
    assert not list(run.glob(".*"))
    summary = pq.read_table(run / "cross-model-summary.parquet").to_pylist()
    assert [r["model"] for r in summary] == ["broken", "tiny-gemma2", "tiny-llama"]
    assert summary[0]["status"] == "failed" and summary[0]["L_semantic_rel"] is None
    assert all(r["n_layers"] == 3 for r in summary[1:])


def test_rerun_failed_after_fixing_runs_only_the_failed_model(
    first_run, tiny_checkpoints, broken_model, tmp_path
):
    out = tmp_path / "results"
    shutil.copytree(first_run["out"], out)  # other tests read the original run
    run, manifest = out / "run-latest", first_run["manifest"]
    ok_mtime = (run / "records-tiny-llama.parquet").stat().st_mtime_ns
    for weights in tiny_checkpoints["llama"].glob("*.safetensors"):
        shutil.copy(weights, broken_model / weights.name)
    assert main([str(manifest), "--out", str(out), "--rerun-failed", "--no-progress"]) == 0
    ledger = _ledger(out)
    assert ledger["runs"] == 2
    assert all(e["status"] == "ok" for e in ledger["models"].values())
    assert (run / "records-tiny-llama.parquet").stat().st_mtime_ns == ok_mtime  # not recomputed
    assert (run / "records-broken.parquet").is_file()
    assert len(pq.read_table(run / "cross-model-summary.parquet")) == 3
    assert (run / "evaluation-broken.md").is_file()  # reports are rebuilt after the rerun
    # A rerun does not rotate; the results root holds the runs and the run lock.
    assert sorted(p.name for p in out.iterdir()) == [".lock", "run-latest"]


def test_same_manifest_twice_gives_identical_numeric_artefacts(tiny_checkpoints, tmp_path):
    out = tmp_path / "results"
    manifest = write_manifest(tmp_path / "m.toml", {"tiny-gpt2": tiny_checkpoints["gpt2"]})
    assert main([str(manifest), "--out", str(out), "--no-progress"]) == 0
    assert main([str(manifest), "--out", str(out), "--no-progress"]) == 0
    runs = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(runs) == 2 and runs[-1].name == "run-latest"  # the first run was rotated aside
    first, second = runs
    for f in ("records-tiny-gpt2.parquet", "prompts-tiny-gpt2.parquet"):
        assert pq.read_table(first / f).equals(pq.read_table(second / f))
    for f in (
        "output-tiny-gpt2-records.csv",
        "output-tiny-gpt2-pure-next-token.csv",
        "cross-model-summary.csv",
    ):
        assert (first / f).read_bytes() == (second / f).read_bytes()
