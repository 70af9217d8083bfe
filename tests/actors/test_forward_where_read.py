"""The model's head runs only where its logits are read: the next-token row of each prompt.

``LensActor._forward`` hands the model's own lm_head (and Gemma's final-logit soft cap after
it) one row per prompt instead of every position. Checked against the head at every position
(``_head_where_read = False``, the path before) on real observations, no mocks: the logits at
the next-token positions agree, a forward hook on the HF lm_head module sees [B, 1, d] instead
of [B, T, d], and whole batches come out the same in both positions modes. Every supported
architecture on tiny checkpoints (Gemma 2's soft cap included); the real demo models for a
trained Llama (SmolLM2) and a 262k vocabulary (Gemma-3-270M).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from actors import ActorConfig, LensActor, PromptSpec
from actors.prompts import tokenise
from tests.checkpoints import ARCHS

# Four lengths, longest not first, so a right-padded batch has four distinct next positions.
TEXTS = [
    ("mid", "Germany has its capital at", "Berlin"),
    ("long", "Give the city name only, plain text. The capital of Germany is called", "Berlin"),
    ("one", "Hi", None),
    ("short", "Paris lies in", "France"),
]


def prompts(positions: str) -> list[PromptSpec]:
    return [PromptSpec(pid, text, answer, positions) for pid, text, answer in TEXTS]


class Forward(NamedTuple):
    logits: torch.Tensor  # [B, V] model logits at the next-token positions
    resid: torch.Tensor  # [layers, B, (T,) d]
    head_inputs: list[tuple[int, ...]]  # shapes the HF lm_head module was called with


def hooked_forward(actor: Any, batch: Any, all_positions: bool, where_read: bool) -> Forward:
    """``_forward`` on one path, recording what really entered the model's lm_head."""
    shapes: list[tuple[int, ...]] = []
    lm_head = actor.bridge.unembed.original_component
    handle = lm_head.register_forward_hook(lambda m, args, out: shapes.append(args[0].shape))
    actor._head_where_read = where_read
    try:
        with torch.inference_mode():
            logits, resid = actor._forward(batch, all_positions)
    finally:
        del actor._head_where_read  # back to the class default
        handle.remove()
    return Forward(logits, resid, [tuple(s) for s in shapes])


def assert_head_where_read(actor: Any, positions: str, atol: float) -> None:
    """Same logits and residuals on both paths; the head saw one row per prompt, not T."""
    batch = tokenise(actor.tokenizer, prompts(positions), actor.bos_id, actor.pad_id, actor.n_ctx)
    n_prompts, n_pos = batch.input_ids.shape
    assert torch.unique(batch.next_pos).numel() == len(TEXTS)  # really different lengths
    all_positions = positions == "all"
    new = hooked_forward(actor, batch, all_positions, where_read=True)
    full = hooked_forward(actor, batch, all_positions, where_read=False)

    d_model = int(actor.bridge.cfg.d_model)
    assert full.head_inputs == [(n_prompts, n_pos, d_model)]
    assert new.head_inputs == [(n_prompts, 1, d_model)]
    assert new.logits.shape == full.logits.shape == (n_prompts, int(actor.bridge.cfg.d_vocab))
    torch.testing.assert_close(new.logits, full.logits, rtol=0, atol=atol)
    assert torch.equal(new.logits.argmax(-1), full.logits.argmax(-1))
    assert torch.equal(new.resid, full.resid)  # the blocks are untouched


def assert_same_batch(actor: Any, positions: str, atol: float) -> None:
    """run_batch on both paths: identical records, summaries equal up to the logits' rounding."""
    actor._head_where_read = False
    try:
        full = actor.run_batch(prompts(positions))
    finally:
        del actor._head_where_read
    new = actor.run_batch(prompts(positions))
    assert new.records.equals(full.records)  # the lens reads residuals, not the model's head
    assert new.summary.schema.equals(full.summary.schema)
    assert new.summary.num_rows == full.summary.num_rows == len(TEXTS)
    for name in new.summary.schema.names:
        got, want = new.summary.column(name), full.summary.column(name)
        assert got.is_null().equals(want.is_null()), name
        if pa.types.is_list(want.type):
            assert pc.list_value_length(got).equals(pc.list_value_length(want)), name
            got, want = pc.list_flatten(got), pc.list_flatten(want)
        if pa.types.is_floating(want.type):  # from the model's logits: equal up to rounding
            np.testing.assert_allclose(
                got.to_numpy(zero_copy_only=False),
                want.to_numpy(zero_copy_only=False),
                rtol=0,
                atol=atol,
                err_msg=name,
            )
        else:
            assert got.equals(want), name


# ---- every supported architecture, tiny checkpoints ------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_next_token_head_runs_on_next_rows_only(tiny_actor, arch):
    assert_head_where_read(tiny_actor(arch), "next", atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_tiny_all_positions_head_runs_on_next_rows_only(tiny_actor, arch):
    # All-positions mode reads the model's logits at the next-token row too (the lens decodes
    # every position from the residuals), so its head is trimmed the same way.
    assert_head_where_read(tiny_actor(arch), "all", atol=1e-5)


@pytest.mark.parametrize("positions", ["next", "all"])
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_tiny_batches_unchanged_by_head_where_read(tiny_actor, arch, positions):
    assert_same_batch(tiny_actor(arch), positions, atol=1e-5)


# ---- real demo models ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(smollm2_source, test_cache):
    return LensActor(ActorConfig(name="smollm2", source=smollm2_source, cache_dir=str(test_cache)))


@pytest.fixture(scope="module")
def gemma3(gemma3_source, test_cache):
    return LensActor(ActorConfig(name="gemma3", source=gemma3_source, cache_dir=str(test_cache)))


@pytest.mark.slow
def test_smollm2_next_token_head_runs_on_next_rows_only(smollm2):
    assert_head_where_read(smollm2, "next", atol=1e-4)


@pytest.mark.slow
def test_gemma3_next_token_head_runs_on_next_rows_only(gemma3):
    assert_head_where_read(gemma3, "next", atol=1e-4)


@pytest.mark.slow
def test_smollm2_all_positions_batch_unchanged(smollm2):
    assert_same_batch(smollm2, "all", atol=1e-4)
