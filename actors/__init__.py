"""One lens actor per model: load it, run the hooked lens pass, return Arrow batches."""

from actors.lens_actor import ActorConfig, BatchResult, LensActor
from actors.prompts import PromptSpec, batch_prompts
from actors.schema import PROMPT_SUMMARY_SCHEMA, RECORDS_SCHEMA, SCHEMA_VERSION
from actors.sources import ModelSource

__all__ = [
    "PROMPT_SUMMARY_SCHEMA",
    "RECORDS_SCHEMA",
    "SCHEMA_VERSION",
    "ActorConfig",
    "BatchResult",
    "LensActor",
    "ModelSource",
    "PromptSpec",
    "batch_prompts",
]
