"""How a result was made: versions, git hash, seed and schema version, written into artefacts."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from actors.schema import SCHEMA_VERSION

REPO_ROOT = Path(__file__).resolve().parents[1]
_PACKAGES = ("torch", "transformer-lens", "transformers", "ray", "pyarrow", "polars", "gguf")


def git_hash() -> str:
    """The checkout's commit (with '-dirty' if it has local changes), or 'unknown'."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for pkg in _PACKAGES:
        try:
            found[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            found[pkg] = "not installed"
    return found


def provenance(seed: int) -> dict[str, Any]:
    return {
        "tool": "lens-sweep",
        "schema_version": SCHEMA_VERSION,
        "git": git_hash(),
        "seed": seed,
        "versions": versions(),
        "platform": platform.platform(),
    }
