"""A finished sweep of tiny checkpoints (two good models, one broken), shared read-only."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import psutil
import pytest

from sweep.run import main

PROMPTS = """
[[prompts]]
id = "capital-de"
text = "Give the city name only, plain text. The capital of Germany is called simply"
answer = "Berlin"
positions = "all"
primary = true

[[prompts]]
id = "capital-fr"
text = "The capital of France is"
answer = "Paris"

[[prompts]]
id = "no-answer"
text = "Hello there"
"""


def reply_json(handler: Any, payload: dict) -> None:
    """Answer an HTTP request (in a BaseHTTPRequestHandler) with ``payload`` as JSON."""
    data = json.dumps(payload).encode()
    handler.send_response(200)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def kill_actor_workers(actor_class: str) -> None:
    """SIGKILL the worker processes of this driver's local Ray that run ``actor_class``."""
    workers = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and actor_class in " ".join(proc.cmdline()):
                workers.append(proc)
        except psutil.Error:  # a process that ended meanwhile
            continue
    assert workers, f"no {actor_class} worker found"
    for worker in workers:  # one model, one actor: only a finished session's could be another
        worker.kill()
    psutil.wait_procs(workers, timeout=30)


def write_manifest(path: Path, models: dict[str, Path], top_k: int = 5) -> Path:
    body = f'[sweep]\nname = "e2e"\nbatch_size = 2\ntop_k = {top_k}\n'
    for name, directory in models.items():
        body += f'\n[[models]]\nname = "{name}"\nid = "{directory}"\n'
    path.write_text(body + PROMPTS)
    return path


@pytest.fixture(scope="session")
def broken_model(tiny_checkpoints, tmp_path_factory) -> Path:
    """A model directory with config and tokenizer but no weights: it sizes fine, then fails to load."""
    broken = tmp_path_factory.mktemp("broken") / "llama-no-weights"
    shutil.copytree(
        tiny_checkpoints["llama"], broken, ignore=shutil.ignore_patterns("*.safetensors", "*.bin")
    )
    return broken


@pytest.fixture(scope="session")
def first_run(tiny_checkpoints, broken_model, tmp_path_factory) -> dict:
    """One real sweep through a local Ray. Tests that change it work on a copy."""
    root = tmp_path_factory.mktemp("e2e")
    models = {
        "tiny-llama": tiny_checkpoints["llama"],
        "tiny-gemma2": tiny_checkpoints["gemma2"],
        "broken": broken_model,
    }
    manifest = write_manifest(root / "m.toml", models)
    out = root / "results"
    code = main([str(manifest), "--out", str(out), "--no-progress"])
    return {"code": code, "out": out, "run": out / "run-latest", "manifest": manifest}
