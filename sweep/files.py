"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temp path beside ``final``; on success rename it over ``final``, else delete it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.chmod(0o644)  # mkstemp makes 0600; artefacts are meant to be shared
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(final: Path, write: Callable[[Path], Any]) -> Path:
    """Run ``write(tmp_path)`` and move the result into place."""
    with atomic_path(final) as tmp:
        write(tmp)
    return final


def write_text(final: Path, text: str) -> Path:
    return write_atomic(final, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(final: Path, data: Any) -> Path:
    return write_text(final, json.dumps(data, indent=2, sort_keys=False, default=_jsonable) + "\n")


def write_bytes(final: Path, data: bytes) -> Path:
    return write_atomic(final, lambda p: p.write_bytes(data))


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")
