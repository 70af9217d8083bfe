"""evaluation-<model>.md: what a researcher would otherwise ask an LLM to write, computed."""

from __future__ import annotations

from pathlib import Path
from statistics import median
from typing import Any

import polars as pl

from sweep.reports.data import ModelData, RunData
from sweep.reports.markdown import fmt, table, tok
from sweep.reports.stats_report import model_statistics_section

COPY_REFLEX_LAYERS = 4  # a copy collapse in layers 0-3 is the "copy reflex"
MILESTONES = (0.30, 0.60)
TOP_SHOWN = 5
RAW_VS_NORM = "answer probability and divergence, normalised vs raw lens"  # plot label
LENS_KL = "KL to the model's output by layer, every lens"  # plot label
# What each risk tier means for a reader of this lens (tiers: actors.schema.artefact_tier).
TIER_MEANING = {
    "low": "the normalised and raw lenses agree",
    "medium": "the normalised and raw lenses diverge at some layers, so an early reading needs "
    "the raw lens's confirmation",
    "high": "the normalised and raw lenses disagree at many layers, so early readings of this "
    "lens are likely artefacts of the normalisation",
}
HEAD_MATCH_BITS = 1e-3  # below this KL the lens at the last layer is the model's head


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


# Per-prompt tables show at most this many rows; a research-scale run's full list is in its
# prompts Parquet, which the note under a cut table names.
MAX_PROMPT_ROWS = 40


def _cut_note(m: ModelData, shown: int, total: int) -> list[str]:
    if shown >= total:
        return []
    return ["", f"First {shown} of {total} prompts shown; all of them are in "
            f"`prompts-{m.name}.parquet`."]  # fmt: skip


def _tests_and_temperature(m: ModelData) -> str:
    rows = []
    for r in m.prompts.head(MAX_PROMPT_ROWS).iter_rows(named=True):
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
        *_cut_note(m, len(rows), m.prompts.height),
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
                for r in with_answer.head(MAX_PROMPT_ROWS).iter_rows(named=True)
            ],
        ),
        *_cut_note(m, min(MAX_PROMPT_ROWS, with_answer.height), with_answer.height),
    ]
    return "\n".join(parts)


def model_report(m: ModelData, run: RunData, plots: dict[str, Path]) -> str:
    """The full evaluation-<name>.md text; led by the statistics across prompts when a prompt set
    has more than one prompt of a role."""
    rows = m.pure_next()
    summary = m.prompts.filter(pl.col("prompt_id") == m.primary_id).row(0, named=True)
    shown = {label: path for label, path in plots.items() if label not in (RAW_VS_NORM, LENS_KL)}
    figures = "\n".join(f"![{label}]({path.name})" for label, path in shown.items())
    lead = [model_statistics_section(m)] if m.many_prompts else []
    return "\n\n".join([
        f"# Evaluation: {m.name}", *lead, _overview(m, run), _sanity(m, run, rows, summary),
        _quantitative(rows, summary, m.n_layers) + ("\n\n" + figures if figures else ""),
        _tests_and_temperature(m), _distribution(m),
        audit_section(m, rows, plots.get(RAW_VS_NORM)),
        *([lens_section(m, plots.get(LENS_KL))] if len(m.lenses) > 1 else []),
    ]) + "\n"  # fmt: skip


def _layer(layer: int | None) -> str:
    return "never" if layer is None else str(layer)


def lens_section(m: ModelData, plot: Path | None) -> str:
    """Every lens decoded side by side: how far each is from the model's output, and where each
    puts the collapse layers; trained lenses with what they were fitted on."""
    block = m.info.get("lenses") or {}
    by_lens = block.get("by_lens", {})
    primary = m.lenses[0]
    base = (by_lens.get(primary) or {}).get("mean_kl_to_final_bits")
    body = []
    for lens in m.lenses:
        b = by_lens.get(lens, {})
        mean = b.get("mean_kl_to_final_bits")
        ratio = "-"
        if base and mean and lens != primary:
            ratio = f"{base / mean:.1f}x lower" if base >= mean else f"{mean / base:.1f}x higher"
        frac = b.get("frac_prompts_L_semantic")
        body.append([
            lens + (" (primary)" if lens == primary else ""), fmt(mean), ratio,
            _layer(b.get("primary_L_copy")), _layer(b.get("primary_L_semantic")),
            "-" if frac is None else f"{frac:.0%} of {b.get('n_prompts')}",
            fmt(b.get("median_L_semantic")),
        ])  # fmt: skip
    lines = [
        "## Lenses compared",
        "",
        f"Each lens decodes the same residuals. KL(lens || model) is to the model's own output at "
        f"the next-token position, in bits (the records' kl_to_final_bits), averaged over the prompts and over layers 0..L-1 (at L = "
        f"{m.n_layers} the final-norm lens is the model's head). L_copy and L_semantic are the "
        f"primary prompt's ({m.primary_id}).",
        "",
        table(
            [
                "lens",
                "mean KL to output (bits)",
                f"vs {primary}",
                "L_copy",
                "L_semantic",
                "prompts reaching L_semantic",
                "median L_semantic",
            ],
            body,
        ),
    ]
    cards = m.info.get("trained_lenses") or {}
    if cards:
        lines += ["", "Trained lenses, as fitted (held-out text, mean KL(model || lens), the fit's "
                  "objective, over layers 0..L-1):", ""]  # fmt: skip
        for kind, c in cards.items():
            lines.append(
                f"- {kind}: {fmt(c.get('heldout_mean_kl_bits'))} bits against the final-norm "
                f"lens's {fmt(c.get('final_lens_heldout_mean_kl_bits'))}; {c.get('steps')} steps "
                f"on {c.get('text')}, rank {c.get('rank')}; `{c.get('folder')}`"
            )
    if "tuned" in m.lenses:
        sources = m.prompts["confirmed_source"].drop_nulls().value_counts(sort=True)
        said = ", ".join(
            f"{r['confirmed_source']} {r['count']}" for r in sources.iter_rows(named=True)
        )
        confirmed = m.prompts["L_semantic_confirmed"].drop_nulls().len()
        lines += ["", "L_semantic_confirmed (raw lens, or tuned lens below the last layer, at "
                  f"rank 1 within +-2 layers of L_semantic): confirmed on {confirmed} of "
                  f"{m.prompts.height} prompts ({said or 'none'})."]  # fmt: skip
    if plot is not None:
        lines += ["", f"![{LENS_KL}]({plot.name})"]
    return "\n".join(lines)


def layer_ranges(layers: list[int]) -> str:
    """[3, 4, 5, 8] -> "3-5, 8"."""
    runs: list[list[int]] = []
    for x in sorted(set(layers)):
        if runs and x == runs[-1][-1] + 1:
            runs[-1].append(x)
        else:
            runs.append([x])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


def _from(layer: int | None) -> str:
    return "never met" if layer is None else f"from layer {layer}"


def audit_verdict(a: dict[str, Any], rows: pl.DataFrame, window: int) -> list[str]:
    """The audit in words: does the primary prompt's L_semantic survive it, how risky is the lens."""
    p = a["primary"]
    gates, rvn = p.get("gates", {}), p.get("raw_vs_norm", {})
    l_sem, l_raw, l_strong = (
        p["L_semantic"],
        gates.get("L_semantic_raw"),
        gates.get("L_semantic_strong"),
    )
    raw_top = rows.filter(pl.col("answer_rank_raw") == 1)["layer"].to_list()
    norm_only = rows.filter(pl.col("norm_only_semantics"))["layer"].to_list()
    confirmed = gates.get("L_semantic_confirmed") is not None
    if l_sem is None:
        first = (
            f"the raw lens ranks it first from layer {l_raw}"
            if l_raw is not None
            else "the raw lens never ranks it first either"
        )
        out = [
            f"The answer never becomes top-1 under the normalised lens (no L_semantic), so there "
            f"is no early semantic layer to confirm; {first}."
        ]
    elif confirmed:
        near = [x for x in raw_top if abs(x - l_sem) <= window]
        out = [
            f"L_semantic {l_sem} is confirmed by the raw lens (raw rank 1 at layer "
            f"{fmt(near[0] if near else None)}, within ±{window} layers)."
        ]
    else:
        where = (
            f"its first raw rank 1 is at layer {l_raw}" if l_raw is not None else "nor at any layer"
        )
        out = [
            f"L_semantic {l_sem} is NOT confirmed by the raw lens: the raw lens does not rank the "
            f"answer first within ±{window} layers ({where})."
        ]
    if norm_only:
        instead = [f"{k} {v}" for k, v in (("L_semantic_raw", l_raw), ("L_semantic_strong", l_strong))
                   if v is not None]  # fmt: skip
        artefact = f"; so L_semantic {l_sem} is a normalisation artefact: " + (
            f"read the semantic layer from {' or '.join(instead)}." if instead
            else "neither the raw lens nor the strong gate finds the answer at any layer."
        )  # fmt: skip
        out.append(
            f"Norm-only semantics at layer(s) {layer_ranges(norm_only)}: the normalised lens "
            "ranks the answer first there and the raw lens does not"
            + (artefact if l_sem in norm_only and not confirmed else ".")
        )
    else:
        out.append(
            "No layer shows norm-only semantics (answer first under the normalised lens only)."
        )
    tier = p["lens_artefact_tier"]
    frac = rvn.get("frac_layers_kl_norm_raw_ge_1")
    out.append(
        f"Artefact risk {tier} (score {fmt(p['lens_artefact_score'], 2)}) for `{p['prompt_id']}`: "
        f"{TIER_MEANING.get(tier or '', 'no tier')} (median JS {fmt(rvn.get('js_norm_raw_p50_bits'))} "
        f"bits, median L1 {fmt(rvn.get('l1_norm_raw_p50'))}, "
        f"{'n/a' if frac is None else f'{frac:.0%}'} of layers with KL(norm‖raw) >= 1 bit, max "
        f"{fmt(rvn.get('kl_norm_raw_max_bits'))} bits, median top-50 Jaccard "
        f"{fmt(rvn.get('jaccard_top50_p50'))})."
    )
    worst = a.get("worst_prompt") or {}
    out.append(
        f"Model-level artefact risk **{a['lens_artefact_tier']}**: the mean score over "
        f"{a['n_prompts_scored']} prompts is {fmt(a['lens_artefact_score'], 3)}; the riskiest "
        f"prompt is `{worst.get('prompt_id')}` ({fmt(worst.get('lens_artefact_score'), 3)}, "
        f"{worst.get('lens_artefact_tier')})."
    )
    moved = [
        f"{k} {fmt(v)}" for k, v in gates.items() if "@x" in k and v != gates.get(k.split("@")[0])
    ]
    out.append(
        f"Semantic gates: margin {_from(gates.get('L_semantic_margin'))}, strong {_from(l_strong)}; "
        + ("stable: neither moves with the logits scaled by 0.9 or 1.1."
           if gates.get("gates_stable") else
           f"not stable under rescaled logits ({', '.join(moved)}): a reading near its threshold.")
    )  # fmt: skip
    return out


def _meaning(name: str, rule: dict[str, Any]) -> str:
    kind, _, value = name.partition("@")
    return {
        "L_cos": f"cos(layer logits, final logits) >= {value}",
        "L_kl": f"KL to final <= {value} bits",
        "L_rank": f"answer rank <= {value}",
        "L_copy_strict": f"top-1 a prompt token, p1 > {value}, p1 - p2 > {rule.get('strict_margin')}",
        "L_answer_over_echo": "p(answer) > mass on the prompt's own tokens",
        "L_geom_crossover": "residual closer to the answer's unembedding than to any prompt token's",
    }.get(kind, f"last {name[-1]} top-1 ids a run of the prompt, p1 > {rule.get('soft_threshold')}"
          if kind.startswith("L_copy_soft_k") else "")  # fmt: skip


def _audit_tables(m: ModelData, rows: pl.DataFrame, a: dict[str, Any]) -> list[str]:
    p, n = a["primary"], m.n_layers or 1
    strict = [c for c in rows.columns if c.startswith("copy_strict@")]
    soft = [c for c in rows.columns if c.startswith("copy_soft_k")]
    body, bold = [], set()
    for i, r in enumerate(rows.iter_rows(named=True)):
        if r["layer"] == p["L_semantic"]:
            bold.add(i)
        body.append([
            str(r["layer"]), fmt(r["kl_norm_raw_bits"]), fmt(r["js_norm_raw_bits"]), fmt(r["l1_norm_raw"]),
            fmt(r["jaccard_top50_raw_norm"]), fmt(r["answer_prob"]), fmt(r["answer_prob_raw"]),
            fmt(r["answer_rank_raw"]), fmt(r["cos_to_final"]), fmt(r["echo_mass"]),
            " ".join(c.split("@")[1] for c in strict if r[c]) or "-",
            " ".join(c.removeprefix("copy_soft_") for c in soft if r[c]) or "-",
        ])  # fmt: skip
    header = ["layer", "KL(norm‖raw) (bits)", "JS (bits)", "L1", "Jaccard top-50", "p(answer) norm",
              "p(answer) raw", "raw rank", "cos to final", "echo mass", "strict copy", "soft copy"]  # fmt: skip
    rule = m.diagnostics.get("audit") or {}
    firsts = {**p.get("milestones", {}), **p.get("surface", {}),
              **{k: v for k, v in p.get("copy", {}).items() if k.startswith("L_")}}  # fmt: skip
    gates = p.get("gates", {})
    scales = sorted({k.split("@")[1] for k in gates if "@x" in k})
    out = [
        f"Per layer, primary prompt `{p['prompt_id']}` at the next-token position (bold: L_semantic; "
        "strict copy lists the thresholds that fire, soft copy the windows):", "",
        table(header, body, bold), "", "First layers (milestones, copy detectors, surface vs meaning):", "",
        table(["first layer where", "layer", "L / n_layers", "meaning"],
              [[k, fmt(v), fmt(None if v is None else v / n, 3), _meaning(k, rule)] for k, v in firsts.items()]),
        "", f"Semantic gates and their stability (gates stable: {fmt(gates.get('gates_stable'))}; "
        f"raw lens rank 1 from {fmt(gates.get('L_semantic_raw'))}; confirmed: "
        f"{fmt(gates.get('L_semantic_confirmed'))}, by {gates.get('confirmed_source') or 'n/a'}):", "",
        table(["gate", "logits x1", *(f"logits {s}" for s in scales)],
              [[g, fmt(gates.get(g)), *(fmt(gates.get(f"{g}@{s}")) for s in scales)]
               for g in ("L_semantic_margin", "L_semantic_strong")]),
    ]  # fmt: skip
    if a["controls"]:
        out += ["", "Controls (same template, another fact: its answer should beat the foil):", "",
                table(["control", "reference", "answer", "foil", "L_control_wins", "max margin", "final margin"],
                      [[f"`{c['prompt_id']}`", f"`{c['reference']}`", c["answer"] or "n/a", tok(c["foil_token"]),
                        fmt(c["L_control_wins"]), fmt(c["max_control_margin"]), fmt(c["final_control_margin"])]
                       for c in a["controls"]])]  # fmt: skip
    for ab in a["ablations"]:
        out += ["", f"Ablation `{ab['prompt_id']}` of `{ab['reference']}` (Δ = ablation - original):", "",
                table(["layer", "original", "ablation", "Δ"],
                      [[k, fmt(v["reference"]), fmt(v["ablation"]), fmt(v["delta"])]
                       for k, v in ab.items() if isinstance(v, dict)])]  # fmt: skip
    for su in a["suites"]:
        out += ["", f"Suite `{su['suite']}` ({su['n_prompts']} prompts), relative depth layer / n_layers:", "",
                table(["layer", "median", "min", "max", "IQR", "reached"],
                      [[k, fmt(v["median"], 3), fmt(v["min"], 3), fmt(v["max"], 3), fmt(v["iqr"], 3),
                        f"{fmt(v['n_reached'])} of {su['n_prompts']}"]
                       for k, v in su.items() if isinstance(v, dict)])]  # fmt: skip
    return out


def _health_and_head(a: dict[str, Any]) -> list[str]:
    h, last = a["numeric_health"], a["last_layer"]
    bad = ", ".join(f"`{x}`" for x in h["prompts_with_nonfinite"])
    kl, after = last["kl_lens_to_head_bits"], last["kl_after_temperature_bits"]
    if kl is None:
        head = "not measured"
    elif kl <= HEAD_MATCH_BITS:
        head = "the lens reproduces the model's head at the last layer"
    elif after is not None and after <= HEAD_MATCH_BITS:
        head = "a temperature mismatch only: rescaled, the lens matches the head"
    else:
        head = "the lens and the head differ at the last layer beyond a temperature: check the final norm and soft-cap"
    return [
        f"- Numeric health: {'NaN or inf in ' + bad if h['any_nonfinite'] else 'no NaN or inf in any residual or lens logit'}; "
        f"largest residual-norm growth between adjacent layers x{fmt(h['max_resid_norm_ratio'], 2)} "
        f"(`{h['max_resid_norm_ratio_prompt']}`).",
        f"- Last-layer consistency (`{last['prompt_id']}`): KL(lens at L ‖ model head) = {fmt(kl)} bits; "
        f"the best temperature s = {fmt(last['temperature'], 3)} leaves {fmt(after)} bits: {head} "
        f"(largest over all prompts {fmt(last['max_kl_lens_to_head_bits_any_prompt'])} bits).",
    ]  # fmt: skip


def audit_section(m: ModelData, rows: pl.DataFrame, plot: Path | None) -> str:
    """Section 6: whether the early semantics survive the lens-artefact audit, in words first."""
    head = ["## 6. Lens-artefact audit", ""]
    a = m.audit
    if not a.get("enabled"):
        return "\n".join([*head,
            "Audit off: this sweep ran with `audit = false`, so there is "
            "no raw-lens comparison, artefact score, milestone, gate, copy variant, control margin or "
            "numeric-health check to report. Rerun with `audit = true` (the default) to get them."])  # fmt: skip
    window = int((m.diagnostics.get("audit") or {}).get("confirm_window", 2))
    figure = ["", f"![{RAW_VS_NORM}]({plot.name})"] if plot is not None else []
    return "\n".join([
        *head, *(f"- {s}" for s in audit_verdict(a, rows, window)), *_health_and_head(a), *figure,
        "", *_audit_tables(m, rows, a),
    ])  # fmt: skip
