"""evaluation-cross-model.md: every model side by side, sorted by relative depth of L_semantic."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from sweep.reports.data import ModelData, RunData
from sweep.reports.markdown import fmt, table
from sweep.reports.model_report import delta_entropy
from sweep.reports.stats_report import cross_statistics_section

DEPTHS = (0.25, 0.50, 0.75)
# The primary prompt's audit, compactly: the gates, the strictest copy, a cosine milestone.
AUDIT_COLUMNS = ("L_semantic_strong", "L_semantic_confirmed", "gates_stable",
                 "L_copy_strict@0.95", "L_cos@0.6")  # fmt: skip


def kl_at_depth(rows: pl.DataFrame, n_layers: int, depth: float) -> float | None:
    """KL to final at layer round(depth * L), bits."""
    layer = round(depth * n_layers)
    hit = rows.filter(pl.col("layer") == layer)
    return float(hit["kl_to_final_bits"][0]) if hit.height else None


def model_row(m: ModelData) -> dict[str, Any]:
    """The numbers of one model's cross-model row (also used by the tests)."""
    rows = m.pure_next()
    s = m.prompts.filter(pl.col("prompt_id") == m.primary_id).row(0, named=True)
    l_sem = s["L_semantic"]
    return {
        "model": m.name,
        "n_layers": m.n_layers,
        "L_copy": s["L_copy"],
        "L_semantic": l_sem,
        "rel_depth": None if l_sem is None else l_sem / m.n_layers,
        "delta_H": delta_entropy(rows, s["L_copy"], l_sem),
        "final_answer_prob": s["final_answer_prob"],
        **{f"kl_{int(d * 100)}": kl_at_depth(rows, m.n_layers, d) for d in DEPTHS},
        "device": m.diagnostics.get("device"),
        **{c: s.get(c) for c in AUDIT_COLUMNS},
        "artefact_score": m.audit.get("lens_artefact_score"),  # the model's: mean over prompts
        "artefact_tier": m.audit.get("lens_artefact_tier"),
    }


def artefact_cell(row: dict[str, Any]) -> str:
    """The model's artefact risk as one cell: "low (0.08)"; "audit off" without a score."""
    if row["artefact_tier"] is None:
        return "audit off"
    return f"{row['artefact_tier']} ({fmt(row['artefact_score'], 2)})"


def curves(run: RunData) -> dict[str, pl.DataFrame]:
    """Per model: next-token entropy and answer probability against relative depth."""
    return {
        name: m.pure_next().select(
            (pl.col("layer") / m.n_layers).alias("rel_depth"), "entropy_bits", "answer_prob"
        )
        for name, m in run.models.items()
    }


def cross_report(run: RunData, plot: Path | None, depth_plot: Path | None = None) -> str:
    """The cross-model report; with the statistics across prompts (and ``depth_plot``) when
    some model has more than one prompt of a role in a prompt set."""
    rows = sorted(
        (model_row(m) for m in run.models.values()),
        key=lambda r: (r["rel_depth"] is None, r["rel_depth"] or 0, r["model"]),
    )
    header = ["model", "layers", "L_copy", "L_semantic", "L_sem / L", "ΔH (bits)", "final p(answer)",
              "KL@25% (bits)", "KL@50% (bits)", "KL@75% (bits)", "device", "L_sem strong",
              "L_sem confirmed", "gates stable", "L_copy strict@0.95", "L_cos@0.6", "artefact risk"]  # fmt: skip
    body = [
        [r["model"], fmt(r["n_layers"]), fmt(r["L_copy"]), fmt(r["L_semantic"]), fmt(r["rel_depth"], 3),
         fmt(r["delta_H"]), fmt(r["final_answer_prob"]), fmt(r["kl_25"]), fmt(r["kl_50"]), fmt(r["kl_75"]),
         str(r["device"]), *(fmt(r[c]) for c in AUDIT_COLUMNS), artefact_cell(r)]
        for r in rows
    ]  # fmt: skip
    audited = any(m.audit.get("enabled") for m in run.models.values())
    primary = next(iter(run.models.values())).primary_id if run.models else None
    parts = [
        "# Cross-model evaluation",
        "",
        f"Run `{run.run_dir}`, started {run.ledger.get('started_at', 'n/a')}; primary prompt `{primary}`: "
        f"{run.prompt_text(primary or '')!r}.",
        "",
        "Sorted by the relative depth at which the answer first becomes top-1 (L_semantic / L); models "
        "that never get there come last. KL to the model's own output is read at 25/50/75% depth.",
        "The last six columns are the lens-artefact audit of the primary prompt: the strong semantic "
        "gate, L_semantic confirmed by the raw lens, whether the gates hold under rescaled logits, "
        "the strict copy layer at p1 > 0.95, the first layer whose logits have cosine >= 0.6 with "
        "the final ones, and the model's artefact risk (tier and the mean score over its prompts)."
        if audited
        else "Audit off: this run was swept with `audit = false`, so the audit columns are n/a.",
        "",
        table(header, body) if body else "No model finished, so there is nothing to compare.",
    ]
    if plot is not None:
        parts += ["", f"![answer probability and entropy against relative depth]({plot.name})"]
    if any(m.many_prompts for m in run.models.values()):
        parts += ["", cross_statistics_section(run, depth_plot)]
    if run.not_ok:
        parts += ["", "## Models without results", ""]
        for name, e in run.not_ok.items():
            parts.append(
                f"- **{name}**: {e.get('status')}: {e.get('error') or 'no reason recorded'}"
            )
    return "\n".join(parts) + "\n"
