"""evaluation-cross-model.md: every model side by side, sorted by relative depth of L_semantic."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from sweep.reports.data import ModelData, RunData
from sweep.reports.markdown import fmt, table
from sweep.reports.model_report import delta_entropy

DEPTHS = (0.25, 0.50, 0.75)


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
    }


def curves(run: RunData) -> dict[str, pl.DataFrame]:
    """Per model: next-token entropy and answer probability against relative depth."""
    return {
        name: m.pure_next().select(
            (pl.col("layer") / m.n_layers).alias("rel_depth"), "entropy_bits", "answer_prob"
        )
        for name, m in run.models.items()
    }


def cross_report(run: RunData, plot: Path | None) -> str:
    rows = sorted(
        (model_row(m) for m in run.models.values()),
        key=lambda r: (r["rel_depth"] is None, r["rel_depth"] or 0, r["model"]),
    )
    header = ["model", "layers", "L_copy", "L_semantic", "L_sem / L", "ΔH (bits)", "final p(answer)",
              "KL@25% (bits)", "KL@50% (bits)", "KL@75% (bits)", "device"]  # fmt: skip
    body = [
        [r["model"], fmt(r["n_layers"]), fmt(r["L_copy"]), fmt(r["L_semantic"]), fmt(r["rel_depth"], 3),
         fmt(r["delta_H"]), fmt(r["final_answer_prob"]), fmt(r["kl_25"]), fmt(r["kl_50"]), fmt(r["kl_75"]),
         str(r["device"])]
        for r in rows
    ]  # fmt: skip
    primary = next(iter(run.models.values())).primary_id if run.models else None
    parts = [
        "# Cross-model evaluation",
        "",
        f"Run `{run.run_dir}`, started {run.ledger.get('started_at', 'n/a')}; primary prompt `{primary}`: "
        f"{run.prompt_text(primary or '')!r}.",
        "",
        "Sorted by the relative depth at which the answer first becomes top-1 (L_semantic / L); models "
        "that never get there come last. KL to the model's own output is read at 25/50/75% depth.",
        "",
        table(header, body) if body else "No model finished, so there is nothing to compare.",
    ]
    if plot is not None:
        parts += ["", f"![answer probability and entropy against relative depth]({plot.name})"]
    if run.not_ok:
        parts += ["", "## Models without results", ""]
        for name, e in run.not_ok.items():
            parts.append(
                f"- **{name}**: {e.get('status')}: {e.get('error') or 'no reason recorded'}"
            )
    return "\n".join(parts) + "\n"
