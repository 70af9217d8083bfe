"""The statistics across prompts in the reports: the section a model's report leads with when it
has many prompts, and the cross-model tables (numbers from sweep/stats.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl

from sweep.reports.data import ModelData, RunData
from sweep.reports.markdown import table, tok
from sweep.stats import ACCURACY, DEPTH_MEASURES, STATS_ROLES, first_token_check

LIST_MAX = 20  # flagged answers listed in the report; the JSON has them all
Cells = dict[str, dict[str, Any]]  # measure -> its row of the statistics table


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def pct(frac: float | None) -> str:
    return "n/a" if frac is None else f"{100 * frac:.0f}%"


def depth(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def accuracy_cell(c: dict[str, Any]) -> str:
    """'143/190: 75% (69-81%)': correct of prompts with an answer, accuracy, its 95% interval."""
    if not c["n"]:
        return "n/a (no answer)"
    return f"{c['n_hit']}/{c['n']}: {pct(c['frac'])} ({pct(c['frac_ci_low'])[:-1]}-{pct(c['frac_ci_high'])})"


def reached_cell(c: dict[str, Any] | None) -> str:
    if c is None or not c["n"]:
        return "n/a"
    return f"{c['n_hit']}/{c['n']} ({pct(c['frac'])})"


def median_cell(c: dict[str, Any] | None) -> str:
    """'0.62 (0.55-0.70) [0.60-0.64]': median relative depth (IQR) [95% interval of the median]."""
    if c is None or c["median"] is None:
        return "n/a"
    return (
        f"{depth(c['median'])} ({depth(c['q25'])}-{depth(c['q75'])}) "
        f"[{depth(c['median_ci_low'])}-{depth(c['median_ci_high'])}]"
    )


def cells(stats: pl.DataFrame, prompt_set: str, breakdown: str, label: str, subset: str) -> Cells:
    """One breakdown's measures, by name."""
    rows = stats.filter(
        (pl.col("prompt_set") == prompt_set) & (pl.col("breakdown") == breakdown)
        & (pl.col("label") == label) & (pl.col("subset") == subset)
    )  # fmt: skip
    return {r["measure"]: r for r in rows.iter_rows(named=True)}


def _depth_words(measure: str, c: dict[str, Any], first: bool) -> str:
    name = f"{measure} is reached" if first else measure
    if not c["n_hit"]:
        return f"{measure} is never reached"
    return (
        f"{name} on {c['n_hit']} ({pct(c['frac'])}), median relative depth {depth(c['median'])} "
        f"(IQR {depth(c['q25'])}-{depth(c['q75'])}, 95% CI {depth(c['median_ci_low'])}-"
        f"{depth(c['median_ci_high'])})"
    )


def in_words(c: Cells) -> str:
    """The breakdown in one sentence: accuracy with its interval, then each layer's spread."""
    acc = c[ACCURACY]
    if not acc["n"]:
        return "No prompt here has an answer, so there is no accuracy or semantic layer to report."
    head = (
        f"The answer is the model's top-1 on {acc['n_hit']} of {plural(acc['n'], 'prompt')} "
        f"({pct(acc['frac'])}, 95% CI {pct(acc['frac_ci_low'])[:-1]}-{pct(acc['frac_ci_high'])})"
    )
    layers = [_depth_words(m, c[m], i == 0) for i, m in enumerate(DEPTH_MEASURES) if m in c]
    return "; ".join([head, *layers]) + "."


def measures_of(stats: pl.DataFrame) -> list[str]:
    """The relative-depth measures the table has, in DEPTH_MEASURES order."""
    present = set(stats["measure"].to_list())
    return [m for m in DEPTH_MEASURES if m in present]


def _breakdown_rows(stats: pl.DataFrame, prompt_set: str) -> Iterator[tuple[str, Cells]]:
    """The set's rows as the report shows them: all, all unambiguous, then each label."""
    yield "all", cells(stats, prompt_set, "all", "all", "all")
    yield "all, unambiguous first token", cells(stats, prompt_set, "all", "all", "unambiguous")
    labels = stats.filter(
        (pl.col("prompt_set") == prompt_set) & (pl.col("breakdown") != "all")
        & (pl.col("subset") == "all")
    ).select("breakdown", "label").unique(maintain_order=True)  # fmt: skip
    for breakdown, label in labels.iter_rows():
        yield f"{breakdown} `{label}`", cells(stats, prompt_set, breakdown, label, "all")


def _header(measures: list[str]) -> list[str]:
    out = ["n", "top-1 accuracy (95% CI)"]
    for m in measures:
        out += [f"{m} reached", f"{m} median (IQR) [95% CI]"]
    return out


def _row(c: Cells, measures: list[str]) -> list[str]:
    out = [str(c[ACCURACY]["n"]), accuracy_cell(c[ACCURACY])]
    for m in measures:
        out += [reached_cell(c.get(m)), median_cell(c.get(m))]
    return out


def _listed(items: list[str], where: str) -> str:
    more = len(items) - LIST_MAX
    return "; ".join(items[:LIST_MAX]) + (f"; and {more} more ({where})" if more > 0 else "")


def first_token_lines(check: pl.DataFrame, json_name: str) -> list[str]:
    """The first-token check of one prompt set in words, with the flagged answers."""
    not_prefix, shared = check.filter("not_prefix"), check.filter("shared")
    if not not_prefix.height and not shared.height:
        return [f"- First-token check: every answer ({check.height} checked) starts with a first "
                "token of its own that begins it."]  # fmt: skip
    where = f"`{json_name}`, statistics"
    out = [f"- First-token check: {check['ambiguous'].sum()} of {check.height} answers are "
           "ambiguous for the lens and left out of the unambiguous rows."]  # fmt: skip
    if not_prefix.height:
        items = [f"`{r['prompt_id']}` {r['answer']!r} -> {tok(r['answer_token'])}"
                 for r in not_prefix.iter_rows(named=True)]  # fmt: skip
        out.append(f"- {not_prefix.height} answers whose first token is not a prefix of the "
                   f"answer: {_listed(items, where)}.")  # fmt: skip
    if shared.height:
        groups = shared.group_by("answer_token_id", "answer_token").agg(
            pl.col("answer").str.strip_chars().unique().sort()
        ).sort("answer_token_id")  # fmt: skip
        items = [f"{tok(r['answer_token'])} (id {r['answer_token_id']}): {', '.join(r['answer'])}"
                 for r in groups.iter_rows(named=True)]  # fmt: skip
        out.append(f"- {shared.height} prompts share their answer's first token with a different "
                   f"answer, so the lens cannot tell those answers apart: {_listed(items, where)}.")  # fmt: skip
    return out


INTRO = (
    f"Over the prompts with role {' or '.join(STATS_ROLES)} and an answer, per prompt set "
    "(controls and ablations are summarised in the audit). Accuracy: the model's own top-1 is "
    "the answer's first token. Relative depth = layer / n_layers; the median and quartiles (IQR) "
    "are over the prompts that reach the layer, with how many do beside them. Intervals: 95% "
    "percentile bootstrap ({n_boot} resamples, seed {seed}). Unambiguous: the answer's first "
    "token passes the first-token check."
)


def _intro(stats: pl.DataFrame) -> str:
    n_boot, seed = (stats[c][0] if stats.height else "n/a" for c in ("n_boot", "seed"))
    return INTRO.format(n_boot=n_boot, seed=seed)


def model_statistics_section(m: ModelData) -> str:
    """The statistics across prompts for one model: in words first, then per set a table."""
    stats, check = m.statistics, first_token_check(m.prompts)
    parts = ["## Statistics across prompts", "", _intro(stats)]
    measures = measures_of(stats)
    for prompt_set in stats["prompt_set"].unique(maintain_order=True).to_list():
        everything = cells(stats, prompt_set, "all", "all", "all")
        clean = cells(stats, prompt_set, "all", "all", "unambiguous")
        n_prompts = everything[ACCURACY]["n_prompts"]
        parts += ["", f"### Prompt set `{prompt_set}`: {plural(n_prompts, 'prompt')}, "
                  f"{everything[ACCURACY]['n']} with an answer", "", f"- {in_words(everything)}"]  # fmt: skip
        if clean[ACCURACY]["n"] != everything[ACCURACY]["n"]:
            parts.append(f"- Unambiguous first tokens only ({plural(clean[ACCURACY]['n'], 'prompt')}"
                         f" with an answer). {in_words(clean)}")  # fmt: skip
        parts += first_token_lines(
            check.filter(pl.col("prompt_set") == prompt_set), f"output-{m.name}.json"
        )
        body = [[label, *_row(c, measures)] for label, c in _breakdown_rows(stats, prompt_set)]
        parts += ["", table(["prompts", *_header(measures)], body)]
    return "\n".join(parts)


def cross_statistics_section(run: RunData, plot: Path | None) -> str:
    """Every model's statistics side by side: all prompts, unambiguous ones, by label."""
    frames = [m.statistics for m in run.models.values() if m.statistics.height]
    stats = pl.concat(frames) if frames else pl.DataFrame()
    parts = ["## Statistics across prompts", "", _intro(stats)]
    if not frames:
        return "\n".join([*parts, "", "No model has a test prompt."])
    measures = measures_of(stats)
    keys = stats.select("model", "prompt_set").unique().sort("model", "prompt_set").rows()
    lead = ["model", "prompt set"]
    for subset, title in (("all", "All prompts"), ("unambiguous", "Unambiguous first tokens")):
        body = []
        for model, prompt_set in keys:
            own = stats.filter(pl.col("model") == model)
            c = cells(own, prompt_set, "all", "all", subset)
            clean = cells(own, prompt_set, "all", "all", "unambiguous")[ACCURACY]["n"]
            flagged = [str(c[ACCURACY]["n"] - clean)] if subset == "all" else []
            body.append([model, prompt_set, *_row(c, measures), *flagged])
        tail = ["ambiguous first tokens"] if subset == "all" else []
        parts += ["", f"{title}:", "", table([*lead, *_header(measures), *tail], body)]
    labelled = stats.filter((pl.col("breakdown") != "all") & (pl.col("subset") == "all"))
    if labelled.height:
        body = []
        rows = labelled.select("model", "prompt_set", "breakdown", "label").unique(
            maintain_order=True
        )
        for model, prompt_set, breakdown, label in rows.iter_rows():
            own = stats.filter(pl.col("model") == model)
            c = cells(own, prompt_set, breakdown, label, "all")
            body.append([model, prompt_set, f"{breakdown} `{label}`",
                         *_row(c, ["L_semantic"])])  # fmt: skip
        parts += ["", "By template and group (all prompts):", "",
                  table([*lead, "prompts", *_header(["L_semantic"])], body)]  # fmt: skip
    if plot is not None:
        parts += ["", f"![relative depth of L_semantic and L_copy across prompts]({plot.name})"]
    return "\n".join(parts)
