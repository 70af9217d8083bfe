"""LLM evaluation bundles: the seed's three prompt kinds, filled with this run's real content.

Each bundle is a self-contained markdown file a researcher can paste into any LLM; the reports
computed here are included so the model comments on numbers rather than recomputing them.
"""

from __future__ import annotations

import json
from pathlib import Path

from sweep.artefacts import artefact_paths
from sweep.reports.data import ModelData, RunData

SYSTEM = (
    "You are an interpretability researcher reviewing logit-lens results. Be precise, cite layer "
    "numbers and probabilities from the material, and say plainly where the evidence is weak."
)


def _params(run: RunData) -> str:
    sweep = run.manifest.get("sweep", {})
    keys = ("lens", "seed", "top_k", "copy_threshold", "copy_margin", "batch_size", "temperatures",
            "audit")  # fmt: skip
    return "\n".join(f"- {k}: {sweep.get(k)}" for k in keys)


def single_model_bundle(m: ModelData, run: RunData, report: str) -> str:
    paths = artefact_paths(run.run_dir, m.name)
    pure = (
        paths["pure_next_token_csv"].read_text(encoding="utf-8")
        if paths["pure_next_token_csv"].is_file()
        else ""
    )
    diag = {k: v for k, v in m.diagnostics.items() if k not in ("versions", "timings")}
    return "\n".join([
        f"# Single-model evaluation request: {m.name}",
        "",
        "Write `evaluation-" + m.name + ".md`: interpret where this model's next-token prediction forms "
        "(copy reflex, semantic collapse, confidence build-up), check the method for mistakes, say "
        "whether the early semantic layer survives the lens-artefact audit (raw vs normalised lens, "
        "gates, controls), and list what the numbers do and do not support. Keep to the evidence below.",
        "",
        "## Run", "",
        f"- run directory: `{run.run_dir}`",
        f"- files: `{paths['records_parquet'].name}`, `{paths['json'].name}`, "
        f"`{paths['records_csv'].name}`, `{paths['pure_next_token_csv'].name}`",
        _params(run), "",
        "## Computed report", "", report, "",
        "## Diagnostics (JSON)", "", "```json", json.dumps(diag, indent=1, default=str), "```", "",
        "## Pure next-token CSV (primary prompt)", "", "```csv", pure.strip(), "```", "",
    ])  # fmt: skip


def cross_model_bundle(run: RunData, cross: str, reports: dict[str, str]) -> str:
    parts = [
        "# Cross-model evaluation request",
        "",
        "Write `evaluation-cross-model.md`: compare where the answer emerges across these models "
        "(relative depth, sharpness, copy reflexes), relate differences to architecture and size, and "
        "flag comparisons the setup cannot support (different tokenizers, quantised weights, one prompt).",
        "",
        "## Run", "", f"- run directory: `{run.run_dir}`", _params(run), "",
        "## Computed cross-model report", "", cross,
    ]  # fmt: skip
    for name, text in sorted(reports.items()):
        parts += ["", f"## Per-model report: {name}", "", text]
    return "\n".join(parts) + "\n"


def meta_bundle(run: RunData, cross: str, llm_answers: dict[str, str]) -> str:
    parts = [
        "# Meta-evaluation request",
        "",
        "Review the evaluations of this run as a sceptical senior researcher: are the claims supported "
        "by the numbers, is the method sound (normalisation, parity, tokenisation, prompt wording), "
        "and what experiment would most reduce the remaining uncertainty?",
        "",
        "## Run", "", f"- run directory: `{run.run_dir}`", _params(run), "",
        "## Computed cross-model report", "", cross,
    ]  # fmt: skip
    if llm_answers:
        for name, text in sorted(llm_answers.items()):
            parts += ["", f"## LLM evaluation: {name}", "", text]
    else:
        parts += [
            "",
            "(No LLM evaluations were produced for this run; review the computed reports.)",
        ]
    return "\n".join(parts) + "\n"


def bundle_path(run_dir: Path, kind: str) -> Path:
    return run_dir / f"llm-prompt-{kind}.md"
