"""The run ledger: every model's status, placement, timings and fingerprint, in the run directory.

Rewritten atomically after every change, so a killed driver leaves the last consistent state
and ``--rerun-failed`` knows exactly which models still need work. A model's progress is
counted in batches (``batches_total``, ``batches_done``, ``batches_resumed``: kept from an
earlier run); the batches themselves are the parts ``sweep.parts`` keeps.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sweep.errors import RunDirError
from sweep.files import write_json

LEDGER_NAME = "ledger.json"
STATUSES = ("pending", "running", "ok", "failed", "skipped_no_fit")


def _problem(data: Any) -> str | None:
    """What is wrong with a ledger's structure, or None."""
    if not isinstance(data, dict):
        return f"expected a JSON object, found {type(data).__name__}"
    models = data.get("models")
    if not isinstance(models, dict):
        return "no 'models' table"
    for name, entry in models.items():
        if not isinstance(entry, dict) or entry.get("status") not in STATUSES:
            return f"model {name!r} has no valid status"
    return None


def _damaged(path: Path, problem: str) -> RunDirError:
    return RunDirError(
        f"{path}: the ledger is damaged ({problem}); nothing was changed. Its artefacts stay "
        f"readable: move {path.parent} aside and run without --rerun-failed"
    )


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


@dataclass
class Ledger:
    path: Path
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(cls, run_dir: Path, manifest: str) -> Ledger:
        ledger = cls(
            run_dir / LEDGER_NAME,
            {"manifest": manifest, "started_at": now(), "runs": 1, "models": {}},
        )
        ledger.save()
        return ledger

    @classmethod
    def load(cls, run_dir: Path) -> Ledger:
        """Read a run's ledger; RunDirError (one line, nothing changed) if it is damaged."""
        path = run_dir / LEDGER_NAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise _damaged(path, f"{type(exc).__name__}: {exc}") from None
        problem = _problem(data)
        if problem:
            raise _damaged(path, problem)
        return cls(path, data)

    @property
    def models(self) -> dict[str, dict[str, Any]]:
        return self.data["models"]

    def update(self, name: str, **fields: Any) -> None:
        entry = self.models.setdefault(name, {"status": "pending"})
        if "status" in fields and fields["status"] not in STATUSES:
            raise ValueError(f"unknown status {fields['status']!r}")
        entry.update(fields, updated_at=now())
        self.save()

    def is_done(self, name: str, fingerprint: str) -> bool:
        entry = self.models.get(name)
        return bool(
            entry and entry.get("status") == "ok" and entry.get("fingerprint") == fingerprint
        )

    def save(self) -> None:
        write_json(self.path, self.data)
