"""PNG plots (matplotlib, headless). Figure sizes are fixed by the data, so a PNG's pixel size is
predictable: size_px = figsize_in * DPI."""

from __future__ import annotations

import functools
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on workers or CI

import matplotlib.pyplot as plt
import numpy as np
import polars as pl
from matplotlib.ticker import MaxNLocator

from sweep.files import write_atomic
from sweep.reports.data import ModelData

DPI = 100
MAX_TOKEN_CHARS = 7


def _save(fig: plt.Figure, path: Path) -> Path:
    write_atomic(path, lambda p: fig.savefig(p, dpi=DPI, format="png"))
    plt.close(fig)
    return path


@functools.cache
def _font_chars() -> frozenset[int]:
    """Code points the default matplotlib font can draw (others would print as empty boxes)."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    path = font_manager.findfont(
        font_manager.FontProperties(family=matplotlib.rcParams["font.family"])
    )
    return frozenset(FT2Font(path).get_charmap())


def token_label(text: str | None) -> str:
    """A token as a short, visible label: whitespace made visible, characters the font lacks as
    U+XXXX, long labels cut with an ellipsis."""
    if text is None:
        return ""
    drawable = _font_chars()
    text = "".join(c if ord(c) in drawable or c in "\n\t " else f"U+{ord(c):04X}" for c in text)
    shown = text.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "\u00b7")
    shown = shown.replace("$", r"\$")  # matplotlib would read $...$ as maths
    return shown if len(shown) <= MAX_TOKEN_CHARS else shown[: MAX_TOKEN_CHARS - 1] + "\u2026"


def entropy_answer_figsize() -> tuple[float, float]:
    return (8.0, 4.5)


def plot_entropy_answer(model: ModelData, rows: pl.DataFrame, path: Path) -> Path:
    """Entropy (bits, left axis) and answer probability (right axis) against layer."""
    fig, ax = plt.subplots(figsize=entropy_answer_figsize(), layout="constrained")
    layers = rows["layer"].to_numpy()
    ax.plot(
        layers,
        rows["entropy_bits"].to_numpy(),
        color="tab:blue",
        marker="o",
        ms=3,
        label="entropy (bits)",
    )
    ax.set_xlabel("layer (0 = embeddings)")
    ax.set_ylabel("entropy (bits)", color="tab:blue")
    handles = ax.get_lines()[:]
    if rows["answer_prob"].null_count() < rows.height:
        ax2 = ax.twinx()
        ax2.plot(
            layers,
            rows["answer_prob"].to_numpy(),
            color="tab:red",
            marker="s",
            ms=3,
            label="p(answer)",
        )
        ax2.set_ylabel("p(answer)", color="tab:red")
        ax2.set_ylim(0, 1)
        handles += ax2.get_lines()
    ax.legend(handles=handles, labels=[h.get_label() for h in handles], loc="upper right")
    ax.set_title(f"{model.name}: next-token entropy and answer probability by layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def heatmap_figsize(n_layers: int, n_pos: int) -> tuple[float, float]:
    return (2.0 + 0.75 * n_pos, 1.6 + 0.28 * (n_layers + 1))


def plot_top1_heatmap(model: ModelData, rows: pl.DataFrame, path: Path) -> Path:
    """Layers x positions, each cell the top-1 token text, coloured by entropy (tuned-lens style)."""
    n_layers = int(rows["layer"].max()) + 1
    positions = sorted(rows["pos"].unique().to_list())
    col = {p: i for i, p in enumerate(positions)}
    ent = np.full((n_layers, len(positions)), np.nan)
    text = [["" for _ in positions] for _ in range(n_layers)]
    inputs = {}
    for r in rows.select("layer", "pos", "entropy_bits", "top_tokens", "token").iter_rows(
        named=True
    ):
        ent[r["layer"], col[r["pos"]]] = r["entropy_bits"]
        text[r["layer"]][col[r["pos"]]] = token_label(
            r["top_tokens"][0] if r["top_tokens"] else None
        )
        inputs[r["pos"]] = r["token"]
    fig, ax = plt.subplots(figsize=heatmap_figsize(n_layers, len(positions)), layout="constrained")
    im = ax.imshow(ent, aspect="auto", cmap="viridis", origin="lower", interpolation="nearest")
    vmax = np.nanmax(ent) if np.isfinite(ent).any() else 1.0
    for i in range(n_layers):
        for j in range(len(positions)):
            dark = ent[i, j] < 0.6 * vmax if np.isfinite(ent[i, j]) else False
            ax.text(
                j,
                i,
                text[i][j],
                ha="center",
                va="center",
                fontsize=6,
                color="white" if dark else "black",
            )
    ax.set_xticks(
        range(len(positions)), [token_label(inputs[p]) for p in positions], rotation=60, fontsize=7
    )
    ax.set_yticks(range(n_layers), [str(i) for i in range(n_layers)], fontsize=6)
    ax.set_xlabel("input token at position")
    ax.set_ylabel("layer")
    ax.set_title(f"{model.name}: top-1 lens token by layer and position ({model.primary_id})")
    bar = fig.colorbar(im, ax=ax, label="entropy (bits)")
    bar.formatter.set_useOffset(False)
    bar.update_ticks()
    return _save(fig, path)


def cross_figsize() -> tuple[float, float]:
    return (12.0, 4.8)


def plot_cross_model(curves: dict[str, pl.DataFrame], path: Path) -> Path:
    """Answer probability and entropy against relative depth (layer / n_layers), one line a model."""
    fig, (ax_p, ax_h) = plt.subplots(1, 2, figsize=cross_figsize(), layout="constrained")
    for name, rows in sorted(curves.items()):
        depth = rows["rel_depth"].to_numpy()
        if rows["answer_prob"].null_count() < rows.height:
            ax_p.plot(depth, rows["answer_prob"].to_numpy(), marker="o", ms=2, label=name)
        ax_h.plot(depth, rows["entropy_bits"].to_numpy(), marker="o", ms=2, label=name)
    ax_p.set(
        xlabel="relative depth (layer / n_layers)", ylabel="p(answer)", ylim=(0, 1), xlim=(0, 1)
    )
    ax_p.set_title("answer probability at the next-token position")
    ax_h.set(xlabel="relative depth (layer / n_layers)", ylabel="entropy (bits)", xlim=(0, 1))
    ax_h.set_title("next-token entropy")
    for ax in (ax_p, ax_h):
        ax.grid(alpha=0.3)
        ax.ticklabel_format(axis="y", useOffset=False)
        if ax.get_lines():
            ax.legend(fontsize=8)
    return _save(fig, path)


def raw_vs_norm_figsize() -> tuple[float, float]:
    return (8.0, 6.5)


def plot_raw_vs_norm(model: ModelData, rows: pl.DataFrame, path: Path) -> Path:
    """Primary prompt by layer: p(answer) under the normalised and the raw lens (top), and
    KL(norm || raw) and JS between them in bits (bottom); L_semantic and L_semantic_raw marked."""
    fig, (ax_p, ax_d) = plt.subplots(
        2, 1, figsize=raw_vs_norm_figsize(), sharex=True, layout="constrained"
    )
    layers = rows["layer"].to_numpy()
    audited = rows.height > 0 and rows["kl_norm_raw_bits"].null_count() < rows.height
    has_answer = rows["answer_prob"].null_count() < rows.height
    if has_answer:
        ax_p.plot(layers, rows["answer_prob"].to_numpy(), color="tab:red", marker="o", ms=3,
                  label="p(answer), normalised lens")  # fmt: skip
    if has_answer and audited:
        ax_p.plot(layers, rows["answer_prob_raw"].to_numpy(), color="tab:purple", marker="s",
                  ms=3, ls="--", label="p(answer), raw lens")  # fmt: skip
    summary = model.prompts.filter(pl.col("prompt_id") == model.primary_id)
    marks = (("L_semantic", "-"), ("L_semantic_raw", ":"))
    for name, style in marks:
        layer = summary[name][0] if summary.height and name in summary.columns else None
        if layer is not None:
            ax_p.axvline(layer, color="black", ls=style, lw=1, label=f"{name} = {layer}")
    ax_p.set(ylabel="p(answer)", ylim=(0, 1))
    ax_p.set_title(f"{model.name}: normalised vs raw lens ({model.primary_id})")
    if ax_p.get_lines():
        ax_p.legend(fontsize=8, loc="upper left")
    if not has_answer:
        ax_p.text(
            0.5, 0.5, "no answer on the primary prompt", ha="center", transform=ax_p.transAxes
        )
    if audited:
        ax_d.plot(layers, rows["kl_norm_raw_bits"].to_numpy(), color="tab:blue", marker="o",
                  ms=3, label="KL(norm || raw)")  # fmt: skip
        ax_js = ax_d.twinx()
        ax_js.plot(layers, rows["js_norm_raw_bits"].to_numpy(), color="tab:green", marker="^",
                   ms=3, label="JS(norm, raw)")  # fmt: skip
        ax_js.set_ylabel("JS (bits)", color="tab:green")
        ax_js.set_ylim(0, 1)
        handles = ax_d.get_lines() + ax_js.get_lines()
        ax_d.legend(handles=handles, labels=[h.get_label() for h in handles], fontsize=8)
    else:
        ax_d.text(0.5, 0.5, "audit off: no raw lens", ha="center", transform=ax_d.transAxes)
    ax_d.set_yscale("symlog", linthresh=1.0)  # linear below 1 bit, where "agree" is read
    ax_d.set_xlabel("layer (0 = embeddings)")
    ax_d.set_ylabel("KL(norm || raw) (bits)", color="tab:blue")
    ax_d.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_p.ticklabel_format(axis="y", useOffset=False)
    for ax in (ax_p, ax_d):
        ax.grid(alpha=0.3)
    return _save(fig, path)


DEPTH_PLOT_MEASURES = ("L_semantic", "L_copy")
MIN_BOX_PROMPTS = 2  # a prompt set of one prompt has no distribution to draw


def depth_plot_figsize(n_boxes: int) -> tuple[float, float]:
    return (12.0, 1.6 + 0.45 * max(n_boxes, 1))


def plot_depth_distributions(depths: dict[str, pl.DataFrame], path: Path) -> Path:
    """Box plots of relative depth (layer / n_layers) across prompts, one box per model and prompt
    set of at least MIN_BOX_PROMPTS prompts with an answer, one panel per measure; each label says
    how many of them reach the layer (the box is over those). ``depths``: per model,
    sweep.stats.relative_depths."""
    boxes = [
        (model, prompt_set, rows)
        for model, frame in sorted(depths.items())
        for prompt_set in sorted(frame["prompt_set"].unique().to_list())
        if (rows := frame.filter(pl.col("prompt_set") == prompt_set)).height >= MIN_BOX_PROMPTS
    ]
    one_set = len({b[1] for b in boxes}) <= 1
    fig, axes = plt.subplots(
        1, len(DEPTH_PLOT_MEASURES), figsize=depth_plot_figsize(len(boxes)), layout="constrained"
    )
    for ax, measure in zip(axes, DEPTH_PLOT_MEASURES, strict=True):
        values, labels = [], []
        for model, prompt_set, rows in reversed(boxes):  # the first model on top
            reached = rows[measure].drop_nulls().to_numpy()
            values.append(reached)
            name = model if one_set else f"{model} [{prompt_set}]"
            labels.append(f"{name}: {reached.size}/{rows.height}")
        if values:
            ax.boxplot(values, orientation="horizontal", tick_labels=labels, widths=0.6)
        ax.set(xlim=(-0.02, 1.02), xlabel="relative depth (layer / n_layers)")
        ax.set_title(measure)
        ax.grid(alpha=0.3, axis="x")
    where = f"prompt set {boxes[0][1]}: " if one_set and boxes else ""
    fig.suptitle(f"Relative depth across prompts ({where}boxes over the prompts that reach the "
                 "layer; labels: reached / prompts with an answer)")  # fmt: skip
    return _save(fig, path)


def lens_kl_figsize() -> tuple[float, float]:
    return (8.0, 6.5)


LENS_STYLES = {"final": ("tab:blue", "o"), "next_ln1": ("tab:cyan", "v"),
               "raw": ("tab:purple", "s"), "tuned": ("tab:red", "^"),
               "prism": ("tab:green", "D")}  # fmt: skip


def plot_lens_kl(model: ModelData, path: Path) -> Path:
    """Every lens decoded, by layer: KL to the model's output in bits, mean over the prompts
    (top), and the primary prompt's p(answer) (bottom)."""
    fig, (ax_kl, ax_p) = plt.subplots(
        2, 1, figsize=lens_kl_figsize(), sharex=True, layout="constrained"
    )
    by_lens = (model.info.get("lenses") or {}).get("by_lens", {})
    for lens in model.lenses:
        color, marker = LENS_STYLES.get(lens, ("tab:gray", "x"))
        kl = by_lens.get(lens, {}).get("kl_to_final_bits_by_layer") or []
        mean = by_lens.get(lens, {}).get("mean_kl_to_final_bits")
        label = lens if mean is None else f"{lens} (mean {mean:.2f} bits, layers 0..L-1)"
        values = np.array([np.nan if v is None else v for v in kl], dtype=float)
        ax_kl.plot(np.arange(values.size), values, color=color, marker=marker, ms=3, label=label)
        rows = model.pure_next(lens=lens)
        if rows.height and rows["answer_prob"].null_count() < rows.height:
            ax_p.plot(rows["layer"].to_numpy(), rows["answer_prob"].to_numpy(), color=color,
                      marker=marker, ms=3, label=lens)  # fmt: skip
    ax_kl.set_yscale("symlog", linthresh=1.0)
    ax_kl.set_ylabel("KL(lens || model) (bits)")
    ax_kl.set_title(f"{model.name}: lenses against the model's output")
    ax_kl.legend(fontsize=8)
    ax_p.set(ylabel=f"p(answer), {model.primary_id}", ylim=(0, 1))
    if ax_p.get_lines():
        ax_p.legend(fontsize=8, loc="upper left")
    else:
        ax_p.text(0.5, 0.5, "no answer on the primary prompt", ha="center",
                  transform=ax_p.transAxes)  # fmt: skip
    ax_p.set_xlabel("layer (0 = embeddings)")
    ax_p.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in (ax_kl, ax_p):
        ax.grid(alpha=0.3)
    return _save(fig, path)
