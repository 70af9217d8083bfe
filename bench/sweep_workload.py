"""The sweep bench's workloads: a manifest as it is, and a research-scale one built from it.

The demo sweeps two small models over 17 prompts, so Ray's fixed start-up (a local Ray, a
worker per actor importing torch and TransformerLens) is most of its wall time. A research
sweep runs many more prompts through the same models, and there model compute decides: the
research-scale workload repeats the manifest's prompts until there are about
``RESEARCH_PROMPTS`` of them. The copies are plain test prompts (ids ``<id>-r1``, ``-r2``, ...;
no primary, role, reference or suite), so the manifest's rules still hold.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

RESEARCH_PROMPTS = 340  # a sweep of hundreds of prompts: the models run for minutes


@dataclass(frozen=True)
class Workload:
    """A manifest the bench sweeps, with what sizes it."""

    name: str  # "demo" or "research"
    manifest: Path
    n_models: int
    n_prompts: int


def _toml_string(text: str) -> str:
    """A TOML basic string: JSON's escapes are TOML's, except that TOML also refuses DEL."""
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def as_is(manifest: Path, name: str = "demo") -> Workload:
    """The manifest unchanged."""
    from sweep.manifest import load_manifest

    m = load_manifest(manifest)
    return Workload(name, manifest.resolve(), len(m.models), len(m.prompts))


def research_scale(manifest: Path, folder: Path, n_prompts: int = RESEARCH_PROMPTS) -> Workload:
    """``manifest`` with its prompts repeated to about ``n_prompts``, written under ``folder``.

    ``research.toml`` includes ``manifest`` (its [sweep] table, models and prompts, first and
    unchanged) and ``prompts-research.toml`` (the copies), and renames the sweep.
    """
    from sweep.manifest import load_manifest

    m = load_manifest(manifest)
    repeats = max(1, round(n_prompts / len(m.prompts)))
    entries = []
    for r in range(1, repeats):
        for p in m.prompts:
            entry = f"[[prompts]]\nid = {_toml_string(f'{p.id}-r{r}')}\n"
            entry += f"text = {_toml_string(p.text)}\n"
            if p.answer is not None:
                entry += f"answer = {_toml_string(p.answer)}\n"
            entry += f"positions = {_toml_string(p.positions)}\n"
            entries.append(entry)
    folder.mkdir(parents=True, exist_ok=True)
    prompts = folder / "prompts-research.toml"
    prompts.write_text("\n".join(entries), encoding="utf-8")
    top = folder / "research.toml"
    includes = ", ".join(_toml_string(str(p)) for p in (manifest.resolve(), prompts))
    name = _toml_string(f"{m.options.name}-research")
    top.write_text(f"include = [{includes}]\n\n[sweep]\nname = {name}\n", encoding="utf-8")
    built = load_manifest(top)  # the manifest's own rules: ids unique, one primary, ...
    return Workload("research", top, len(built.models), len(built.prompts))
