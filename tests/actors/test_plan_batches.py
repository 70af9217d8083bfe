"""Batches planned by tokens: the budget, one positions mode each, order, determinism."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.prompts import PromptSpec, plan_batches, tokenise


def _prompts(lengths: list[int], modes: list[str]) -> list[PromptSpec]:
    return [
        PromptSpec(f"p{i}", "x" * n, positions=mode)  # type: ignore[arg-type]
        for i, (n, mode) in enumerate(zip(lengths, modes, strict=True))
    ]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 300), st.sampled_from(["all", "next"])), max_size=60),
    st.integers(1, 8),
    st.integers(1, 600),
)
def test_every_prompt_once_within_budget_one_mode_each(rows, batch_size, batch_tokens):
    lengths = [n for n, _ in rows]
    prompts = _prompts(lengths, [m for _, m in rows])
    length_of = {p.id: n for p, n in zip(prompts, lengths, strict=True)}
    batches = plan_batches(prompts, lengths, batch_size, batch_tokens)
    assert sorted(p.id for b in batches for p in b) == sorted(p.id for p in prompts)
    for batch in batches:
        assert batch and len(batch) <= batch_size
        assert len({p.positions for p in batch}) == 1
        width = max(length_of[p.id] for p in batch)
        # Within the budget, or a single prompt longer than it, alone.
        assert len(batch) * width <= batch_tokens or (len(batch) == 1 and width > batch_tokens)
    # "all" batches come first; within a mode, longest first, ties in manifest order.
    flat = [p for b in batches for p in b]
    modes = [p.positions for p in flat]
    assert modes == sorted(modes)  # "all" < "next"
    for mode in ("all", "next"):
        seen = [p for p in flat if p.positions == mode]
        want = sorted((p for p in prompts if p.positions == mode), key=lambda p: -length_of[p.id])
        assert seen == want
    # Deterministic: the same input gives the same batches.
    assert plan_batches(prompts, lengths, batch_size, batch_tokens) == batches


def test_greedy_packing_by_padded_width():
    # Sorted longest first: 9, 5, 5, 4, 3, 3 (p2 and p5 tie at 5: manifest order), budget 15.
    lengths = [3, 9, 5, 4, 3, 5]
    prompts = _prompts(lengths, ["next"] * 6)
    batches = plan_batches(prompts, lengths, batch_size=8, batch_tokens=15)
    ids = [[p.id for p in b] for b in batches]
    # [9] alone (2 x 9 > 15); [5, 5, 4] (3 x 5 = 15); [3, 3] (then nothing is left).
    assert ids == [["p1"], ["p2", "p5", "p3"], ["p0", "p4"]]
    # batch_size binds before the budget.
    ids = [[p.id for p in b] for b in plan_batches(prompts, lengths, 2, 10_000)]
    assert ids == [["p1", "p2"], ["p5", "p3"], ["p0", "p4"]]


def test_a_prompt_longer_than_the_budget_goes_alone():
    lengths = [700, 20, 650, 20]
    prompts = _prompts(lengths, ["next"] * 4)
    batches = plan_batches(prompts, lengths, batch_size=16, batch_tokens=512)
    assert [[p.id for p in b] for b in batches] == [["p0"], ["p2"], ["p1", "p3"]]


def test_the_plan_does_not_depend_on_what_other_modes_hold():
    # The shuffle of the other mode's prompts leaves this mode's batches as they were.
    rng = random.Random(316)
    lengths = [rng.randint(1, 50) for _ in range(40)]
    modes = ["all" if i % 3 == 0 else "next" for i in range(40)]
    prompts = _prompts(lengths, modes)
    batches = plan_batches(prompts, lengths, 4, 60)
    nexts = [i for i, m in enumerate(modes) if m == "next"]
    only_next = plan_batches([prompts[i] for i in nexts], [lengths[i] for i in nexts], 4, 60)
    assert [b for b in batches if b[0].positions == "next"] == only_next


@pytest.mark.parametrize(("size", "tokens"), [(0, 10), (4, 0)])
def test_bad_limits_are_refused(size, tokens):
    with pytest.raises(ValueError, match="must be >= 1"):
        plan_batches(_prompts([3], ["next"]), [3], size, tokens)
    with pytest.raises(ValueError, match="1 prompts but 2 lengths"):
        plan_batches(_prompts([3], ["next"]), [3, 4], 4, 10)


def test_token_lengths_are_the_lengths_run_batch_tokenises(tiny_actor):
    actor = tiny_actor("llama")
    prompts = [
        PromptSpec("seed", "Give the city name only, plain text. The capital of Germany is"),
        PromptSpec("short", "Hi"),
        PromptSpec("spaces", "  two leading spaces and a trailing one "),
    ]
    lengths = actor.token_lengths(prompts)
    batch = tokenise(actor.tokenizer, prompts, actor.bos_id, actor.pad_id, actor.n_ctx)
    assert lengths == batch.lengths.tolist()
    assert actor.bos_id is not None and lengths[1] == 2  # BOS counted: "Hi" is one token
    assert actor.token_lengths([]) == []
