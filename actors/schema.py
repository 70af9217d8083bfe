"""The one contract between lens actors and the driver: Arrow schemas of what an actor returns.

Bump SCHEMA_VERSION on any change of field name, type or meaning; it is stored in every
schema's metadata and written into every artefact.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1
_META = {b"lens_sweep.schema_version": str(SCHEMA_VERSION).encode()}

# One row per (prompt, layer, position) decoded by the lens.
RECORDS_SCHEMA = pa.schema(
    [
        pa.field("model", pa.string(), nullable=False),  # artefact name of the model
        pa.field("prompt_id", pa.string(), nullable=False),  # manifest prompt id
        pa.field("layer", pa.int16(), nullable=False),  # 0 = input to block 0, i = after block i-1
        pa.field("pos", pa.int32(), nullable=False),  # token position, 0-based, BOS included
        pa.field("token_id", pa.int32(), nullable=False),  # input token id at pos
        pa.field("token", pa.string(), nullable=False),  # input token text at pos
        pa.field("is_next_token", pa.bool_(), nullable=False),  # pos is the last prompt token
        pa.field("entropy_bits", pa.float32(), nullable=False),  # full-softmax entropy, bits
        pa.field("top_ids", pa.list_(pa.int32()), nullable=False),  # top-k ids, most probable first
        pa.field("top_tokens", pa.list_(pa.string()), nullable=False),  # their decoded texts
        pa.field("top_probs", pa.list_(pa.float32()), nullable=False),  # their probabilities
        pa.field("rest_mass", pa.float32(), nullable=False),  # 1 - sum(top_probs)
        # Next-token rows only (null elsewhere):
        pa.field("answer_prob", pa.float32()),  # p(gold answer's first token); null w/o answer
        pa.field("answer_rank", pa.int32()),  # 1-based rank of that token; null w/o answer
        pa.field("kl_to_final_bits", pa.float32()),  # KL(layer || model output), bits
        pa.field("copy_collapse", pa.bool_()),  # top-1 in prompt, p1 > thr, p1 - p2 > margin
        pa.field("entropy_collapse", pa.bool_()),  # entropy <= 1 bit
        pa.field("is_answer", pa.bool_()),  # top-1 == gold answer's first token
    ],
    metadata=_META,
)

# One row per prompt: its tokenisation, collapse layers and the model's own final prediction.
PROMPT_SUMMARY_SCHEMA = pa.schema(
    [
        pa.field("model", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("role", pa.string(), nullable=False),  # "primary" or "test"
        pa.field("n_tokens", pa.int32(), nullable=False),  # prompt length incl. BOS
        pa.field("next_token_pos", pa.int32(), nullable=False),  # = n_tokens - 1
        pa.field("n_layers", pa.int16(), nullable=False),  # L; lens layers are 0..L
        pa.field("answer", pa.string()),  # gold answer text as given; null if none
        pa.field("answer_token_id", pa.int32()),  # its first token id
        pa.field("answer_token", pa.string()),  # its first token text
        pa.field("L_copy", pa.int16()),  # first layer with copy_collapse; null if never
        pa.field("L_copy_H", pa.int16()),  # first layer with entropy_collapse; null if never
        pa.field("L_semantic", pa.int16()),  # first layer with is_answer; null if never
        pa.field("delta_layers", pa.int16()),  # L_semantic - L_copy; null unless both exist
        pa.field("final_top_ids", pa.list_(pa.int32()), nullable=False),  # model's own top-k
        pa.field("final_top_tokens", pa.list_(pa.string()), nullable=False),
        pa.field("final_top_probs", pa.list_(pa.float32()), nullable=False),
        pa.field("final_answer_prob", pa.float32()),  # model's own p(answer); null w/o answer
        pa.field("final_answer_rank", pa.int32()),  # model's own rank of the answer
        pa.field("parity_max_abs", pa.float32(), nullable=False),  # max|lens(L) - model logits|
    ],
    metadata=_META,
)


class SchemaMismatch(ValueError):
    """A record batch does not match the schema this build of the driver expects."""


def check_batch(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """Return ``batch`` if it matches ``schema`` (fields and version), else raise SchemaMismatch."""
    found = (batch.schema.metadata or {}).get(b"lens_sweep.schema_version", b"?").decode()
    if found != str(SCHEMA_VERSION):
        raise SchemaMismatch(
            f"record batch has schema version {found}, this driver reads {SCHEMA_VERSION}: "
            "run the driver and the workers from the same checkout"
        )
    if not batch.schema.equals(schema, check_metadata=False):
        raise SchemaMismatch(
            f"record batch fields differ from the schema:\n{batch.schema}\nexpected:\n{schema}"
        )
    return batch
