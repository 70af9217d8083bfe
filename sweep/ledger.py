"""The run ledger: every model's status, placement, timings and fingerprint, in the run directory.

Rewritten atomically after every change, so a killed driver leaves the last consistent state
and ``--rerun-failed`` knows exactly which models still need work.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sweep.files import write_json

LEDGER_NAME = "ledger.json"
STATUSES = ("pending", "running", "ok", "failed", "skipped_no_fit")


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
        path = run_dir / LEDGER_NAME
        return cls(path, json.loads(path.read_text(encoding="utf-8")))

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
