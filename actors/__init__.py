"""One lens actor per model: load it, run the hooked lens pass, return Arrow batches.

Exports resolve lazily (PEP 562) so that planning code can use the torch-free parts
(ActorConfig, ModelSource, PromptSpec, the schema) on a head node without torch installed.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "ActorConfig": "actors.config",
    "BatchResult": "actors.lens_actor",
    "LensActor": "actors.lens_actor",
    "ModelSource": "actors.sources",
    "PromptSpec": "actors.prompts",
    "batch_prompts": "actors.prompts",
    "PROMPT_SUMMARY_SCHEMA": "actors.schema",
    "RECORDS_SCHEMA": "actors.schema",
    "SCHEMA_VERSION": "actors.schema",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'actors' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
