"""Prompts as the actor sees them, how they are batched, their tokenisation and right padding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

Positions = Literal["all", "next"]


@dataclass(frozen=True)
class PromptSpec:
    """One prompt; ``positions`` is "all" (every position) or "next" (the next-token one only)."""

    id: str
    text: str
    answer: str | None = None
    positions: Positions = "next"
    # "primary" (the prompt the seed-layout CSVs show), "test", "control" (same template, another
    # fact: its answer must beat ``foil``) or "ablation" (a variant of ``reference``).
    role: str = "test"
    reference: str | None = None  # the prompt a control or ablation is read against
    foil: str | None = None  # control only: the reference prompt's answer, which should lose
    suite: str | None = None  # facts sharing one template, summarised together
    # Research-scale sweeps: the [[prompt_sets]] table a prompt came from (None: [[prompts]]),
    # and free labels the statistics are broken down by.
    prompt_set: str | None = None
    template: str | None = None  # e.g. "called-simply": the wording, shared across facts
    group: str | None = None  # e.g. "Europe": any grouping of the facts


@dataclass(frozen=True)
class TokenisedBatch:
    """Right-padded token ids of one batch; padding sits after every real token."""

    prompts: list[PromptSpec]
    input_ids: torch.Tensor  # [B, T] int64
    attention_mask: torch.Tensor  # [B, T] int64, 1 on real tokens
    lengths: torch.Tensor  # [B] int64, real tokens per prompt
    answer_ids: torch.Tensor  # [B] int64, gold first-token id, -1 if none
    foil_ids: torch.Tensor  # [B] int64, a control prompt's foil first-token id, -1 if none

    @property
    def next_pos(self) -> torch.Tensor:
        return self.lengths - 1


def batch_prompts(prompts: list[PromptSpec], batch_size: int) -> list[list[PromptSpec]]:
    """Split prompts into batches of one positions mode each, in manifest order within a mode."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    batches: list[list[PromptSpec]] = []
    for mode in ("all", "next"):
        group = [p for p in prompts if p.positions == mode]
        batches.extend(group[i : i + batch_size] for i in range(0, len(group), batch_size))
    return batches


def plan_batches(
    prompts: list[PromptSpec], lengths: list[int], batch_size: int, batch_tokens: int
) -> list[list[PromptSpec]]:
    """Batches bounded in prompts and in padded tokens, one positions mode each.

    ``lengths[i]`` is prompt i's token count as the actor tokenises it (BOS included). Per mode
    ("all" first), prompts go longest first (a stable sort: ties keep manifest order), packed
    greedily so that a batch holds at most ``batch_size`` prompts and its rows x padded width
    (its first, longest prompt's length) stays <= ``batch_tokens``. A prompt longer than the
    budget goes alone. Longest first: the batch that needs the most memory runs first, so a
    model that does not fit fails in minutes, not hours. The same prompts and lengths always
    give the same batches (a resumed run finds its finished ones by their prompts).
    """
    if batch_size < 1 or batch_tokens < 1:
        raise ValueError(
            f"batch_size and batch_tokens must be >= 1, got {batch_size} and {batch_tokens}"
        )
    if len(lengths) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(lengths)} lengths")
    batches: list[list[PromptSpec]] = []
    for mode in ("all", "next"):
        group = [i for i, p in enumerate(prompts) if p.positions == mode]
        group.sort(key=lambda i: -lengths[i])
        current: list[PromptSpec] = []
        width = 0  # the current batch's padded width: its first prompt's length
        for i in group:
            if current and (
                len(current) == batch_size or (len(current) + 1) * width > batch_tokens
            ):
                batches.append(current)
                current = []
            if not current:
                width = lengths[i]
            current.append(prompts[i])
        if current:
            batches.append(current)
    return batches


def bos_policy(tokenizer: Any, prepend_bos: bool) -> tuple[int | None, str]:
    """The BOS id to prepend (or None) and a sentence recording the policy."""
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if not prepend_bos:
        return None, "no BOS prepended (disabled in the manifest)"
    if bos_id is None:
        return None, "no BOS prepended (the tokenizer defines none)"
    return int(bos_id), f"BOS {tokenizer.bos_token!r} (id {bos_id}) prepended to every prompt"


def answer_token_id(tokenizer: Any, prompt_ids: list[int], text: str, answer: str) -> int:
    """First token of the answer as it would continue the prompt.

    Tokenises prompt + " " + answer (no space added if the answer starts with whitespace) and takes
    the first token past the prompt; where the tokenizer merges across the boundary, falls back to
    tokenising the spaced answer alone.
    """
    spaced = answer if answer[:1].isspace() else " " + answer
    joined = tokenizer(text + spaced, add_special_tokens=False)["input_ids"]
    if len(joined) > len(prompt_ids) and joined[: len(prompt_ids)] == prompt_ids:
        return int(joined[len(prompt_ids)])
    return int(tokenizer(spaced, add_special_tokens=False)["input_ids"][0])


def tokenise(
    tokenizer: Any, prompts: list[PromptSpec], bos_id: int | None, pad_id: int, max_tokens: int
) -> TokenisedBatch:
    """Tokenise each prompt exactly as written (no stripping), prepend BOS, right-pad."""
    import torch

    rows: list[list[int]] = []
    answers: list[int] = []
    foils: list[int] = []
    for p in prompts:
        ids = tokenizer(p.text, add_special_tokens=False)["input_ids"]
        answers.append(
            -1 if p.answer is None else answer_token_id(tokenizer, ids, p.text, p.answer)
        )
        foils.append(-1 if p.foil is None else answer_token_id(tokenizer, ids, p.text, p.foil))
        full = ([bos_id] if bos_id is not None else []) + list(ids)
        if not full:
            raise ValueError(f"prompt {p.id!r} tokenises to nothing")
        if len(full) > max_tokens:
            raise ValueError(
                f"prompt {p.id!r} has {len(full)} tokens, the model's context is {max_tokens}"
            )
        rows.append(full)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        attention[i, : len(r)] = 1
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    return TokenisedBatch(
        prompts,
        input_ids,
        attention,
        lengths,
        torch.tensor(answers, dtype=torch.long),
        torch.tensor(foils, dtype=torch.long),
    )
