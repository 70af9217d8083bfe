"""evaluation-<model>.md: what a researcher would otherwise ask an LLM to write, computed."""

from __future__ import annotations

from pathlib import Path
from statistics import median
from typing import Any

import polars as pl

from sweep.reports.data import ModelData, RunData
from sweep.reports.markdown import fmt, table, tok

COPY_REFLEX_LAYERS = 4  # a copy collapse in layers 0-3 is the "copy reflex"
MILESTONES = (0.30, 0.60)
TOP_SHOWN = 5


def first_layer_above(rows: pl.DataFrame, threshold: float) -> int | None:
    hit = rows.filter(pl.col("answer_prob") > threshold)
    return int(hit["layer"][0]) if hit.height else None


def delta_entropy(rows: pl.DataFrame, l_copy: int | None, l_sem: int | None) -> float | None:
    """entropy(L_copy) - entropy(L_semantic), bits; None unless both layers exist."""
    if l_copy is None or l_sem is None:
        return None
    ent = dict(zip(rows["layer"].to_list(), rows["entropy_bits"].to_list(), strict=True))
    return float(ent[l_copy] - ent[l_sem])


def _overview(m: ModelData, run: RunData) -> str:
    d = m.diagnostics
    placement = m.info.get("placement", {})
    prompts = m.prompts
    lines = [
        "## 1. Overview",
        "",
        f"- Model: **{m.name}** ({d.get('architecture')}, family {d.get('family')}), "
        f"{fmt(d.get('n_params'))} parameters, {m.n_layers} layers, d_model {d.get('d_model')}, "
        f"{d.get('n_heads')} heads, vocabulary {d.get('d_vocab')}, context {d.get('n_ctx')}",
        f"- Source: {d.get('source', {}).get('source')}"
        + (f" ({d['source']['note']})" if d.get("source", {}).get("note") else ""),
        f"- Run: {run.ledger.get('started_at', 'n/a')}, directory `{run.run_dir}`",
        f"- Probed: {prompts.height} prompt(s); primary `{m.primary_id}` decoded at every position, "
        "the others at the next-token position",
        f"- Lens: `{d.get('lens')}`; top-k {d.get('top_k')}; seed {d.get('seed')}",
        f"- Device: {d.get('device')} (node {placement.get('node_ip', 'local')}), compute dtype "
        f"{d.get('dtype', {}).get('compute')}",
    ]
    return "\n".join(lines)


def _copy_check(m: ModelData, rows: pl.DataFrame, l_copy: int | None) -> list[str]:
    if l_copy is None:
        return [
            "- Copy collapse: never fires at the next-token position (no layer meets the rule)."
        ]
    row = rows.filter(pl.col("layer") == l_copy).row(0, named=True)
    p1, p2 = row["top_probs"][0], row["top_probs"][1]
    rule = m.diagnostics.get("copy_rule", {})
    thr, margin = rule.get("threshold", 0.9), rule.get("margin", 0.05)
    prompt_ids = set(
        pl.scan_parquet(m.records_path)
        .filter((pl.col("prompt_id") == m.primary_id) & (pl.col("layer") == 0))
        .select("token_id")
        .collect()["token_id"]
        .to_list()
    )
    held = row["top_ids"][0] in prompt_ids and p1 > thr and (p1 - p2) > margin
    reflex = " This is a copy reflex (layers 0-3)." if l_copy < COPY_REFLEX_LAYERS else ""
    return [
        f"- First copy collapse: layer {l_copy}, top-1 {tok(row['top_tokens'][0])} (id {row['top_ids'][0]}), "
        f"p1 = {fmt(p1)}, p2 = {fmt(p2)} (id {row['top_ids'][1]}); rule (top-1 in prompt, p1 > {thr}, "
        f"p1 - p2 > {margin}) re-checked from the records: {'holds' if held else 'DOES NOT hold'}.{reflex}"
    ]


def _sanity(m: ModelData, run: RunData, rows: pl.DataFrame, summary: dict[str, Any]) -> str:
    d = m.diagnostics
    norm = d.get("norm", {})
    text = run.prompt_text(m.primary_id or "") or ""
    ends = (
        "ends exactly as written, with no trailing whitespace"
        if text == text.rstrip()
        else ("ENDS WITH WHITESPACE, which changes the next-token distribution")
    )
    parity = d.get("parity", {})
    present = ", ".join(
        f"{k} = {fmt(summary.get(k))}" for k in ("L_copy", "L_copy_H", "L_semantic", "delta_layers")
    )
    lines = [
        "## 2. Method sanity check",
        "",
        f"- Norms: {norm.get('kind')} (final `{norm.get('final')}`, block `{norm.get('block_ln1')}`, "
        f"weight offset {norm.get('weight_offset')}, {'pre' if norm.get('pre_norm') else 'post'}-norm); "
        f"lens mode `{d.get('lens')}`; LayerNorm bias kept: {fmt(norm.get('keep_layernorm_bias'))}",
        f"- Positional embedding: {d.get('positional')}; final-logit soft-cap: {fmt(d.get('final_logit_softcap'))}",
        f"- Unembedding dtype: {d.get('dtype', {}).get('unembed')}; lens norms: {d.get('dtype', {}).get('lens_norm')}",
        f"- Parity (lens at the last layer vs the model's logits, in {d.get('dtype', {}).get('compute')}): "
        f"max |diff| = {fmt(parity.get('max_abs_lens_minus_model_logits'))}, "
        f"max KL(model || lens) = {fmt(parity.get('max_kl_model_to_lens_bits'))} bits "
        f"(bound {fmt(parity.get('kl_bound_bits'))}), top-1 disagreements "
        f"{fmt(parity.get('top1_disagreements'))}",
        f"- BOS: {d.get('bos_policy')}",
        f"- Primary prompt {ends}: {text!r}",
        f"- Collapse layers: {present}",
        *_copy_check(m, rows, summary.get("L_copy")),
    ]
    return "\n".join(lines)


def _quantitative(rows: pl.DataFrame, summary: dict[str, Any], n_layers: int) -> str:
    l_sem = summary.get("L_semantic")
    header = [
        "layer",
        "entropy (bits)",
        "top-1",
        "p(top-1)",
        "p(answer)",
        "answer rank",
        "KL to final (bits)",
    ]
    body, bold = [], set()
    for i, r in enumerate(rows.iter_rows(named=True)):
        if r["layer"] == l_sem:
            bold.add(i)
        body.append([
            str(r["layer"]), fmt(r["entropy_bits"]), tok(r["top_tokens"][0]), fmt(r["top_probs"][0]),
            fmt(r["answer_prob"]), fmt(r["answer_rank"]), fmt(r["kl_to_final_bits"]),
        ])  # fmt: skip
    dh = delta_entropy(rows, summary.get("L_copy"), l_sem)
    final_p = rows["answer_prob"][-1] if rows.height else None
    milestones = [
        f"first layer with p(answer) > {t:.2f}: {fmt(first_layer_above(rows, t))}"
        for t in MILESTONES
    ]
    notes = [
        "",
        "- ΔH = entropy(L_copy) - entropy(L_semantic) = "
        + (
            f"{fmt(dh)} bits"
            if dh is not None
            else "n/a (needs both a copy collapse and L_semantic)"
        ),
        f"- Confidence milestones: {'; '.join(milestones)}; final-layer p(answer) = {fmt(final_p)}",
    ]
    if l_sem is None:
        notes.append("- The answer never becomes top-1, so no row is bold.")
    return "\n".join(
        ["## 3. Next-token lens by layer (primary prompt)", "", table(header, body, bold), *notes]
    )


def _topk_cells(tokens: list[str], probs: list[float]) -> str:
    return ", ".join(
        f"{tok(t)} {fmt(p, 3)}" for t, p in list(zip(tokens, probs, strict=True))[:TOP_SHOWN]
    )


def _tests_and_temperature(m: ModelData) -> str:
    rows = []
    for r in m.prompts.iter_rows(named=True):
        rows.append([
            f"`{r['prompt_id']}`", r["answer"] or "n/a", fmt(r["final_answer_prob"]),
            fmt(r["final_answer_rank"]), _topk_cells(r["final_top_tokens"], r["final_top_probs"]),
        ])  # fmt: skip
    parts = [
        "## 4. Test prompts and temperature exploration",
        "",
        f"Final prediction (the model's own logits), top {TOP_SHOWN}:",
        "",
        table(["prompt", "answer", "p(answer)", "rank", "top tokens"], rows),
    ]
    temps = [t for t in m.info.get("temperature_exploration", []) if t["prompt_id"] == m.primary_id]
    if temps:
        trows = [
            [fmt(t["temperature"], 2), fmt(t["entropy_bits"]),
             _topk_cells([x["token"] for x in t["top"]], [x["prob"] for x in t["top"]])]
            for t in sorted(temps, key=lambda t: t["temperature"])
        ]  # fmt: skip
        parts += [
            "",
            f"Temperature exploration of `{m.primary_id}`:",
            "",
            table(["T", "entropy (bits)", "top tokens"], trows),
        ]
    else:
        parts += ["", "No temperature exploration was recorded."]
    return "\n".join(parts)


def _distribution(m: ModelData) -> str:
    parts = ["## 5. Across prompts", ""]
    with_answer = m.prompts.filter(pl.col("answer").is_not_null())
    if m.prompts.height < 2 or with_answer.height == 0:
        return "\n".join(
            [*parts, "A single prompt (or none with an answer): no distribution to show."]
        )
    sem = [int(x) for x in with_answer["L_semantic"].to_list() if x is not None]
    missing = with_answer.height - len(sem)
    if not sem:
        return "\n".join(
            [
                *parts,
                f"The answer never becomes top-1 in any of the {with_answer.height} prompts with an answer.",
            ]
        )
    rel = [s / m.n_layers for s in sem]
    parts += [
        f"- L_semantic reached in {len(sem)} of {with_answer.height} prompts with an answer"
        + (f" ({missing} never reach it)" if missing else ""),
        f"- L_semantic: min {min(sem)}, median {fmt(float(median(sem)), 1)}, max {max(sem)}",
        f"- relative depth L_semantic / L: min {fmt(min(rel), 3)}, median {fmt(float(median(rel)), 3)}, max {fmt(max(rel), 3)}",
        "",
        table(
            ["prompt", "L_semantic", "relative depth"],
            [
                [
                    f"`{r['prompt_id']}`",
                    fmt(r["L_semantic"]),
                    fmt(r["L_semantic"] / m.n_layers, 3) if r["L_semantic"] is not None else "n/a",
                ]
                for r in with_answer.iter_rows(named=True)
            ],
        ),
    ]
    return "\n".join(parts)


def model_report(m: ModelData, run: RunData, plots: dict[str, Path]) -> str:
    """The full evaluation-<name>.md text."""
    rows = m.pure_next()
    summary = m.prompts.filter(pl.col("prompt_id") == m.primary_id).row(0, named=True)
    figures = "\n".join(f"![{label}]({path.name})" for label, path in plots.items())
    return "\n\n".join([
        f"# Evaluation: {m.name}", _overview(m, run), _sanity(m, run, rows, summary),
        _quantitative(rows, summary, m.n_layers) + ("\n\n" + figures if figures else ""),
        _tests_and_temperature(m), _distribution(m),
    ]) + "\n"  # fmt: skip
