"""Statistics across prompts: one model's accuracy and relative-depth distributions per prompt set.

Pure Polars and numpy (no torch): the merge, the JSON and the reports call it on a prompts-<model>
table. Over the prompts whose role is "primary" or "test" (controls and ablations have their own
summaries in the audit block), per prompt set (null: "manifest"), per breakdown (every prompt of
the set, each template, each group) and per subset (every prompt; only those whose answer's first
token is unambiguous):

- accuracy: the model's own top-1 (final_top_ids[0]) is the answer's first token;
- relative depth (layer / n_layers) of L_semantic, L_copy and, with the audit on,
  L_semantic_confirmed and L_copy_strict (per prompt the earliest of L_copy_strict@*): how many
  prompts reach the layer, and the median and quartiles over those that do.

Intervals are percentile bootstraps (B resamples of the prompts, 95%), seeded from the sweep seed
and the cell's own key, so the same table gives the same numbers whatever else is in the run.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import polars as pl

from actors.config import DEFAULT_SEED
from sweep.artefacts import audit_enabled

STATS_ROLES = ("primary", "test")
MANIFEST_SET = "manifest"  # the prompt_set of [[prompts]] entries (null in the Parquet)
NO_LABEL = "(none)"  # a breakdown's prompts without that label, when others have one
N_BOOT = 1000
CI_LEVEL = 0.95
ACCURACY = "accuracy"
DEPTH_MEASURES = ("L_semantic", "L_copy", "L_semantic_confirmed", "L_copy_strict")
AUDIT_MEASURES = (
    "L_semantic_confirmed",
    "L_copy_strict",
)  # null for every prompt without the audit
FLAG_MEASURES = ("answer_token_not_prefix", "answer_token_shared")
BREAKDOWNS = ("all", "template", "group")
SUBSETS = ("all", "unambiguous")
_LABELS = ("prompt_set", "template", "group")
# What the statistics read of a prompts table, besides its L_* layer columns.
_STATS_COLUMNS = frozenset(("model", "prompt_id", "role", *_LABELS, "n_layers", "answer",
                            "answer_token", "answer_token_id", "final_top_ids"))  # fmt: skip

# One row per prompt set x breakdown x label x subset x measure (cross-model-statistics.*).
STATS_SCHEMA = {
    "model": pl.String,
    "prompt_set": pl.String,
    "breakdown": pl.String,  # all | template | group
    "label": pl.String,  # "all", the template or group label, or "(none)"
    "subset": pl.String,  # all | unambiguous (first-token check passed)
    "measure": pl.String,  # accuracy, a DEPTH_MEASURES name, or a FLAG_MEASURES name
    "n_prompts": pl.Int64,  # prompts of the breakdown and subset, with an answer or not
    "n": pl.Int64,  # of those, prompts with an answer: the denominator
    "n_hit": pl.Int64,  # top-1 correct / layer reached / flag raised
    "frac": pl.Float64,  # n_hit / n
    "frac_ci_low": pl.Float64,  # bootstrap interval of frac (null for the flags)
    "frac_ci_high": pl.Float64,
    "median": pl.Float64,  # relative depth, over the n_hit prompts that reach the layer
    "q25": pl.Float64,
    "q75": pl.Float64,
    "median_ci_low": pl.Float64,  # bootstrap interval of the median
    "median_ci_high": pl.Float64,
    "n_boot": pl.Int64,
    "seed": pl.Int64,
}
_CELL_KEYS = ("n", "n_hit", "frac", "frac_ci_low", "frac_ci_high")
_DEPTH_KEYS = ("median", "q25", "q75", "median_ci_low", "median_ci_high")


def _with_labels(prompts: pl.DataFrame) -> pl.DataFrame:
    """Label columns present (a table written before they existed has none), prompt_set filled."""
    missing = [pl.lit(None, pl.String).alias(c) for c in _LABELS if c not in prompts.columns]
    return prompts.with_columns(missing).with_columns(pl.col("prompt_set").fill_null(MANIFEST_SET))


def stats_seed(diagnostics: dict[str, Any]) -> int:
    """The seed of a model's bootstraps: the sweep seed its diagnostics record."""
    return int(diagnostics.get("seed", DEFAULT_SEED))


def stats_prompts(prompts: pl.DataFrame) -> pl.DataFrame:
    """The prompts the statistics are over: roles primary and test; prompt_set null -> manifest.
    Only the columns the statistics read (a prompts table is wide: top-k lists, the audit)."""
    used = [c for c in prompts.columns if c in _STATS_COLUMNS or c.startswith("L_")]
    return _with_labels(prompts.select(used).filter(pl.col("role").is_in(STATS_ROLES)))


def has_many_prompts(prompts: pl.DataFrame) -> bool:
    """Whether some prompt set has more than one prompt of one role (primary or test)."""
    counts = stats_prompts(prompts).group_by("prompt_set", "role").len()
    return bool(counts.height) and int(counts["len"].max()) > 1  # type: ignore[arg-type]


def depth_measures(prompts: pl.DataFrame) -> tuple[str, ...]:
    """The relative-depth measures this table has: the audit's only when the audit ran."""
    audited = audit_enabled(prompts) and any(
        c.startswith("L_copy_strict@") for c in prompts.columns
    )
    return tuple(m for m in DEPTH_MEASURES if audited or m not in AUDIT_MEASURES)


def first_token_check(prompts: pl.DataFrame) -> pl.DataFrame:
    """Per statistics prompt with an answer: is the answer's first token usable by the lens?

    not_prefix: the first token's text, stripped, is empty or does not start the stripped answer
    (a lone space, a byte fragment, a piece from inside the word). shared: another answer of the
    same prompt set starts with the same token id, so the lens cannot tell the two apart;
    shared_with lists those other answers. ambiguous: either.
    """
    answer = pl.col("answer").str.strip_chars()
    token = pl.col("answer_token").fill_null("").str.strip_chars()
    key = ["prompt_set", "answer_token_id"]
    checked = (
        stats_prompts(prompts)
        .filter(pl.col("answer").is_not_null())
        .select("prompt_set", "prompt_id", "answer", "answer_token_id", "answer_token")
        .with_columns(
            not_prefix=(token == "") | ~answer.str.starts_with(token),
            shared=answer.n_unique().over(key) > 1,
        )
    )
    answers = checked.group_by(key).agg(answer.unique().sort().alias("_answers"))
    return (
        checked.join(answers, on=key, how="left", nulls_equal=True)
        .with_columns(
            shared_with=pl.col("_answers").list.set_difference(pl.concat_list(answer)).list.sort(),
            ambiguous=pl.col("not_prefix") | pl.col("shared"),
        )
        .drop("_answers")
        .sort("prompt_set", "prompt_id")
    )


def _rng(seed: int, key: tuple[str, ...]) -> np.random.Generator:
    """A generator for one cell: the sweep seed and a stable hash of the cell's key."""
    return np.random.default_rng([seed, zlib.crc32("\x1f".join(key).encode())])


def _interval(draws: np.ndarray, level: float) -> tuple[float, float]:
    low, high = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def bootstrap_fraction(
    n_hit: int, n: int, rng: np.random.Generator, n_boot: int = N_BOOT, level: float = CI_LEVEL
) -> tuple[float | None, float | None]:
    """Percentile bootstrap interval of n_hit / n. Resampling n yes/no outcomes with replacement
    counts Binomial(n, n_hit / n) yeses, so that is what is drawn; (None, None) for n = 0."""
    if n == 0:
        return None, None
    return _interval(rng.binomial(n, n_hit / n, size=n_boot) / n, level)


def bootstrap_median(
    values: np.ndarray, rng: np.random.Generator, n_boot: int = N_BOOT, level: float = CI_LEVEL
) -> tuple[float | None, float | None]:
    """Percentile bootstrap interval of the median of ``values`` (numpy's median: the mean of the
    two middle values for an even count). A resample of n values is drawn as the counts of each
    distinct value, Multinomial(n, observed frequencies): the same distribution as resampling
    indices, in O(B x distinct values) memory. (None, None) for no values."""
    n = values.size
    if n == 0:
        return None, None
    distinct, counts = np.unique(values, return_counts=True)
    cumulative = rng.multinomial(n, counts / n, size=n_boot).cumsum(axis=1)  # [B, distinct]
    # the k-th smallest (0-based) of a resample is the first distinct value whose cumulative
    # count exceeds k
    low_mid = distinct[(cumulative <= (n - 1) // 2).sum(axis=1)]
    high_mid = distinct[(cumulative <= n // 2).sum(axis=1)]
    return _interval((low_mid + high_mid) / 2, level)


def _breakdowns(rows: pl.DataFrame) -> Iterator[tuple[str, str, pl.DataFrame]]:
    yield "all", "all", rows
    for col in BREAKDOWNS[1:]:
        labels = rows[col].drop_nulls().unique().sort().to_list()
        if not labels:
            continue
        for label in labels:
            yield col, label, rows.filter(pl.col(col) == label)
        if rows[col].null_count():
            yield col, NO_LABEL, rows.filter(pl.col(col).is_null())


def _cell(
    key: tuple[str, ...], hits: np.ndarray, depths: np.ndarray | None, seed: int, n_boot: int
) -> dict[str, Any]:
    """One measure over one population: hits [n] bool; depths of the prompts that reach it."""
    rng = _rng(seed, key)
    n, n_hit = hits.size, int(hits.sum())
    low, high = bootstrap_fraction(n_hit, n, rng, n_boot)
    out: dict[str, Any] = {"n": n, "n_hit": n_hit, "frac": n_hit / n if n else None,
                           "frac_ci_low": low, "frac_ci_high": high}  # fmt: skip
    if depths is not None and depths.size:
        q25, median, q75 = (float(x) for x in np.quantile(depths, [0.25, 0.5, 0.75]))
        m_low, m_high = bootstrap_median(depths, rng, n_boot)
        out |= {"median": median, "q25": q25, "q75": q75,
                "median_ci_low": m_low, "median_ci_high": m_high}  # fmt: skip
    return out


def _per_prompt(
    prompts: pl.DataFrame, measures: tuple[str, ...], flagged: pl.Series
) -> pl.DataFrame:
    """Statistics prompts with an answer flag, correct (top-1), ambiguous and relative depths."""
    rows = stats_prompts(prompts)
    strict = [c for c in rows.columns if c.startswith("L_copy_strict@")]
    if "L_copy_strict" in measures:
        rows = rows.with_columns(pl.min_horizontal(strict).alias("L_copy_strict"))
    n_layers = pl.col("n_layers").cast(pl.Float64)
    return rows.with_columns(
        has_answer=pl.col("answer").is_not_null(),
        correct=(pl.col("final_top_ids").list.first() == pl.col("answer_token_id")).fill_null(
            False
        ),
        ambiguous=pl.col("prompt_id").is_in(flagged.implode()),
        **{f"rel_{m}": pl.col(m).cast(pl.Float64) / n_layers for m in measures},
    )


def relative_depths(prompts: pl.DataFrame) -> pl.DataFrame:
    """Per statistics prompt with an answer: its set, id and each measure's relative depth (null:
    never reached); the values the medians are taken over."""
    measures = depth_measures(prompts)
    rows = _per_prompt(prompts, measures, pl.Series([], dtype=pl.String)).filter("has_answer")
    return rows.select("prompt_set", "prompt_id", *(pl.col(f"rel_{m}").alias(m) for m in measures))


def prompt_statistics(prompts: pl.DataFrame, seed: int, n_boot: int = N_BOOT) -> pl.DataFrame:
    """The long table (STATS_SCHEMA) for one model's prompts table; empty without test prompts.

    Rows with n = 0 are kept (counted, with null numbers). Same table and seed, same output.
    """
    measures = depth_measures(prompts)
    check = first_token_check(prompts)
    frame = _per_prompt(prompts, measures, check["prompt_id"].filter(check["ambiguous"]))
    if frame.is_empty():
        return pl.DataFrame(schema=STATS_SCHEMA)
    model = str(frame["model"][0])
    rows: list[dict[str, Any]] = []
    for set_name in sorted(frame["prompt_set"].unique().to_list()):
        in_set = frame.filter(pl.col("prompt_set") == set_name)
        for breakdown, label, part in _breakdowns(in_set):
            for subset in SUBSETS:
                sub = part if subset == "all" else part.filter(~pl.col("ambiguous"))
                answered = sub.filter("has_answer")
                head = {"model": model, "prompt_set": set_name, "breakdown": breakdown,
                        "label": label, "subset": subset, "n_prompts": sub.height,
                        "n_boot": n_boot, "seed": seed}  # fmt: skip
                key = (set_name, breakdown, label, subset)
                correct = answered["correct"].to_numpy()
                rows.append({**head, "measure": ACCURACY,
                             **_cell((*key, ACCURACY), correct, None, seed, n_boot)})  # fmt: skip
                for m in measures:
                    depth = answered[f"rel_{m}"]
                    rows.append({**head, "measure": m, **_cell(
                        (*key, m), depth.is_not_null().to_numpy(),
                        depth.drop_nulls().to_numpy(), seed, n_boot)})  # fmt: skip
        checked = check.filter(pl.col("prompt_set") == set_name)
        for flag, col in zip(FLAG_MEASURES, ("not_prefix", "shared"), strict=True):
            n_hit = int(checked[col].sum())
            rows.append({"model": model, "prompt_set": set_name, "breakdown": "all",
                         "label": "all", "subset": "all", "measure": flag,
                         "n_prompts": in_set.height, "n": checked.height, "n_hit": n_hit,
                         "frac": n_hit / checked.height if checked.height else None,
                         "n_boot": n_boot, "seed": seed})  # fmt: skip
    return pl.DataFrame(rows, schema=STATS_SCHEMA)


def statistics_block(prompts: pl.DataFrame, seed: int, n_boot: int = N_BOOT) -> dict[str, Any]:
    """output-<model>.json's "statistics": per prompt set, the first-token check and every
    breakdown's measures (the same numbers as cross-model-statistics.*)."""
    table = prompt_statistics(prompts, seed, n_boot)
    check = first_token_check(prompts)
    sets = []
    for set_name in table["prompt_set"].unique(maintain_order=True).to_list():
        rows = table.filter(pl.col("prompt_set") == set_name)
        everything = rows.filter((pl.col("breakdown") == "all") & (pl.col("subset") == "all"))
        sets.append({
            "prompt_set": set_name,
            "n_prompts": int(everything["n_prompts"][0]),
            "n_with_answer": int(everything["n"][0]),
            "first_token": _first_token_block(check.filter(pl.col("prompt_set") == set_name)),
            "breakdowns": _breakdown_blocks(rows.filter(~pl.col("measure").is_in(FLAG_MEASURES))),
        })  # fmt: skip
    return {
        "roles": list(STATS_ROLES),
        "relative_depth": "layer / n_layers; median and quartiles over the prompts that reach it",
        "interval": f"{CI_LEVEL:.0%} percentile bootstrap",
        "n_boot": n_boot,
        "seed": seed,
        "sets": sets,
    }


def _breakdown_blocks(rows: pl.DataFrame) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for r in rows.iter_rows(named=True):
        if not out or (out[-1]["breakdown"], out[-1]["label"], out[-1]["subset"]) != (
            r["breakdown"], r["label"], r["subset"]
        ):  # fmt: skip
            out.append({k: r[k] for k in ("breakdown", "label", "subset", "n_prompts")})
            out[-1]["measures"] = {}
        keys = _CELL_KEYS if r["measure"] == ACCURACY else (*_CELL_KEYS, *_DEPTH_KEYS)
        out[-1]["measures"][r["measure"]] = {k: r[k] for k in keys}
    return out


def _first_token_block(check: pl.DataFrame) -> dict[str, Any]:
    shared = (
        check.filter("shared")
        .group_by("answer_token_id", "answer_token")
        .agg(
            pl.col("answer").str.strip_chars().unique().sort().alias("answers"),
            pl.col("prompt_id").sort().alias("prompt_ids"),
        )
        .sort("answer_token_id")
    )
    return {
        "n_checked": check.height,
        "n_not_prefix": int(check["not_prefix"].sum()),
        "n_shared": int(check["shared"].sum()),
        "n_ambiguous": int(check["ambiguous"].sum()),
        "not_prefix": check.filter("not_prefix")
        .select("prompt_id", "answer", "answer_token_id", "answer_token")
        .to_dicts(),
        "shared": shared.to_dicts(),  # one entry per token id that starts several answers
    }
