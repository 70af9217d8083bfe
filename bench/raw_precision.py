"""Why the audit's raw decode stays float32: what bf16 operands would change in its metrics.

Raw residuals are unnormalised, so raw logits run to hundreds or tens of thousands, and bf16
keeps 8 significant bits. The demo models' next-token rows (every layer) are decoded raw in
float32 and in bf16 (unrefined, and with each row's top candidates recomputed in float32), and
every raw-lens metric the audit reports is compared in float64 (see ``ABOUT``).

    python -m bench.raw_precision [--models NAME ...] [--threads N]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
LN2 = math.log(2.0)
TOP_JACCARD = 50  # top-k of the norm / raw Jaccard
REFINE_TOP = 256  # bf16 raw and norm-lens candidates recomputed in float32 per row
CONTINUOUS = ("entropy_bits", "kl_bits", "js_bits", "l1", "p_answer", "jaccard")
DISCRETE = ("top1", "rank")
VARIANTS = ("bf16", f"bf16+refine{REFINE_TOP}")


def _row_metrics(
    zn: torch.Tensor, zr: torch.Tensor, answer: torch.Tensor, top: int
) -> dict[str, torch.Tensor]:
    zn, zr = zn.double(), zr.double()
    ln, lr = zn.log_softmax(-1), zr.log_softmax(-1)
    pn, pr = ln.exp(), lr.exp()
    lm = (0.5 * (pn + pr)).log()

    def p_log_ratio(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # sum of p (a - b) over p > 0 only: a zero-probability token adds nothing (0 * inf).
        return torch.where(p > 0, p * (a - b), 0.0).sum(-1)

    a = answer.unsqueeze(-1)
    z_answer = zr.gather(-1, a)
    k = min(top, zn.shape[-1])
    tn, tr = zn.topk(k, -1).indices, zr.topk(k, -1).indices
    inter = (tn.unsqueeze(-1) == tr.unsqueeze(-2)).any(-1).sum(-1).double()
    return {
        "entropy_bits": -torch.where(pr > 0, pr * lr, 0.0).sum(-1) / LN2,
        "kl_bits": p_log_ratio(pn, ln, lr) / LN2,
        "js_bits": 0.5 * (p_log_ratio(pn, ln, lm) + p_log_ratio(pr, lr, lm)) / LN2,
        "l1": (pn - pr).abs().sum(-1),
        "p_answer": pr.gather(-1, a).squeeze(-1),
        "jaccard": inter / (2 * k - inter),
        "top1": zr.argmax(-1),
        "rank": 1 + (zr > z_answer).sum(-1),
    }


def raw_metrics(
    norm_logits: torch.Tensor,
    raw_logits: torch.Tensor,
    answer_ids: torch.Tensor,
    top: int = TOP_JACCARD,
    chunk: int = 32,
) -> dict[str, torch.Tensor]:
    """The audit's raw-lens metrics per row, in float64 (the reference for any precision):
    raw entropy, KL(norm || raw), JS (bits), L1, p(answer) under raw, raw top-1 id, raw answer
    rank (1 + logits strictly above the answer's) and the top-``top`` Jaccard of norm and raw.
    Rows in chunks: a 262k vocabulary's float64 rows are 2 MiB each."""
    if bool((answer_ids < 0).any()):
        raise ValueError("every row needs an answer id >= 0")
    parts = [
        _row_metrics(norm_logits[s : s + chunk], raw_logits[s : s + chunk], answer_ids[s : s + chunk], top)
        for s in range(0, norm_logits.shape[0], chunk)
    ]  # fmt: skip
    return {k: torch.cat([p[k] for p in parts]) for k in (*CONTINUOUS, *DISCRETE)}


def compare(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> dict[str, float]:
    """Max abs error of each continuous metric (equal values, infinities included, count as
    0), the number of rows whose top-1 or answer rank differs, the largest rank shift, and the
    rows whose rank differs among those ranked <= REFINE_TOP in ``ref``."""
    out: dict[str, float] = {}
    for k in CONTINUOUS:
        err = torch.where(ref[k] == got[k], 0.0, (ref[k] - got[k]).abs())
        out[k] = float(err.max()) if err.numel() else 0.0
    for k in DISCRETE:
        out[k] = int((ref[k] != got[k]).sum())
    shift = (ref["rank"] - got["rank"]).abs()
    out["rank_shift"] = int(shift.max()) if shift.numel() else 0
    out["rank_head"] = int((shift[ref["rank"] <= REFINE_TOP] > 0).sum())  # where ranks matter
    return out


def bf16_product(rows: torch.Tensor, unembed: Any) -> torch.Tensor:
    """bf16 x @ bf16 W_U with float32 accumulation and result (the operands rounded, the
    product float32: the most a bf16 decode could keep); before bias and soft cap, which
    ``unembed._finish`` adds (in place) as for any of its matmuls."""
    w = unembed.W_U.to(torch.bfloat16).float()
    return torch.matmul(rows.float().to(torch.bfloat16).float(), w)


def refine(
    product: torch.Tensor, rows: torch.Tensor, unembed: Any, ids: torch.Tensor, chunk: int = 64
) -> torch.Tensor:
    """A copy of ``product`` [n, V] (x @ W_U, before bias and soft cap) with each row's ``ids``
    [n, k] recomputed in float32 from the rows [n, d] and W_U; every other entry as it was."""
    out = product.clone()
    d_model = rows.shape[1]
    for s in range(0, rows.shape[0], chunk):
        x, i = rows[s : s + chunk].float(), ids[s : s + chunk]
        cols = unembed.W_U.index_select(1, i.flatten()).view(d_model, *i.shape)  # [d, n, k]
        out[s : s + chunk].scatter_(1, i, torch.einsum("nd,dnk->nk", x, cols))
    return out


def refine_ids(raw: torch.Tensor, norm: torch.Tensor, answer: torch.Tensor, k: int) -> torch.Tensor:
    """The ids a refinement recomputes per row: raw top-k, norm top-k and the answer."""
    k = min(k, raw.shape[-1])
    return torch.cat([raw.topk(k, -1).indices, norm.topk(k, -1).indices, answer[:, None]], -1)


@dataclass
class ModelReport:
    """One model's comparison: per variant the errors (``compare``) and time / float32."""

    name: str
    layers: int  # lens layers (blocks + 1)
    prompts: int
    vocab: int
    max_raw: float  # max |float32 raw logit|
    logit_err: float  # max |bf16 operands - float32| logit
    kernel_err: float  # the same for the CPU's bf16 kernel (bf16 result)
    medians: dict[str, float]  # float32 value of each metric, median over rows
    head_rows: int  # rows whose float32 raw answer rank is <= REFINE_TOP
    errors: dict[str, dict[str, float]]  # variant -> compare()
    time_ratio: dict[str, float]  # variant -> its decode time / float32's (median of 3)

    @property
    def rows(self) -> int:
        return self.layers * self.prompts


def next_token_prompts(prompts: list[Any]) -> list[Any]:
    """The manifest's prompts with an answer, as next-token prompts (the audit's rows)."""
    from actors.prompts import PromptSpec

    return [PromptSpec(f"n{i:02d}", p.text, p.answer) for i, p in enumerate(prompts) if p.answer]


def time_ratios(
    reference: Callable[[], Any], fns: list[Callable[[], Any]], repeats: int = 3
) -> list[float]:
    """Median over rounds of each fn's time / the reference's, run back to back in each round
    (a noisy machine slows them alike), after one untimed warm-up round."""
    ratios: list[list[float]] = [[] for _ in fns]
    for r in range(repeats + 1):
        times = []
        for fn in [reference, *fns]:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        if r:
            for out, t in zip(ratios, times[1:], strict=True):
                out.append(t / times[0])
    return [statistics.median(x) for x in ratios]


def measure(actor: Any, name: str, prompts: list[Any]) -> ModelReport:
    """Decode the actor's next-token residuals of ``prompts`` raw in float32, bf16 and bf16
    refined, and compare every raw-lens metric; norm rows from the actor's own norm plan."""
    from actors.prompts import tokenise
    from lens_kernel import apply_norm

    specs = next_token_prompts(prompts)
    tok = tokenise(actor.tokenizer, specs, actor.bos_id, actor.pad_id, actor.n_ctx)
    u = actor.unembed
    with torch.inference_mode():
        _, resid = actor._forward(tok, False)  # [layers, B, d]
        keep = actor.config.keep_layernorm_bias
        normed = torch.stack([apply_norm(resid[i], s, keep) for i, s in enumerate(actor.norm_plan)])
        d_model = resid.shape[-1]
        rows = resid.float().reshape(-1, d_model)  # layer-major: row = layer * B + prompt
        answer = tok.answer_ids.to(rows.device).repeat(resid.shape[0])
        zn = u(normed.reshape(-1, d_model))
        zr = u.reference(rows)
        ref = raw_metrics(zn, zr, answer)
        product = bf16_product(rows, u)
        ids = refine_ids(product, zn, answer, REFINE_TOP)  # chosen before the bias, as in u
        zb = u._finish(product.clone())
        variants = dict(zip(VARIANTS, (zb, u._finish(refine(product, rows, u, ids))), strict=True))
        errors = {v: compare(ref, raw_metrics(zn, z, answer)) for v, z in variants.items()}
        logit_err = float((zb - zr).abs().max())
        del variants, zb
        w_t = torch.empty((u.d_vocab, d_model), dtype=torch.bfloat16, device=u.W_U.device)
        w_t.copy_(u.W_U.T)  # the layout UnembedSpec's bf16 kernel uses

        def kernel(finish: bool = True) -> torch.Tensor:
            z = torch.matmul(rows.to(torch.bfloat16), w_t.T).float()
            return u._finish(z) if finish else z

        def kernel_refined() -> torch.Tensor:
            z = kernel(finish=False)
            return u._finish(refine(z, rows, u, refine_ids(z, zn, answer, REFINE_TOP)))

        kernel_err = float((kernel() - zr).abs().max())
        ratios = time_ratios(lambda: u.reference(rows), [kernel, kernel_refined])
    medians = {k: float(ref[k].double().median()) for k in (*CONTINUOUS, "rank")}
    head = int((ref["rank"] <= REFINE_TOP).sum())
    return ModelReport(
        name, resid.shape[0], len(specs), u.d_vocab, float(zr.abs().max()), logit_err,
        kernel_err, medians, head, errors, dict(zip(VARIANTS, ratios, strict=True)),
    )  # fmt: skip


def conclusion(reports: list[ModelReport]) -> str:
    """The decision, from the data: the share of rows whose raw answer rank bf16 changes."""
    n = sum(r.rows for r in reports)
    share = {v: sum(r.errors[v]["rank"] for r in reports) / max(n, 1) for v in VARIANTS}
    what = (
        f"bf16 raw decode changes the raw answer rank on {100 * share['bf16']:.1f}% of {n} rows "
        f"({100 * share[VARIANTS[1]]:.1f}% with the top {REFINE_TOP} recomputed in float32)"
    )
    head = sum(r.head_rows for r in reports)
    what += f"; of the {head} rows ranked <= {REFINE_TOP}: " + ", ".join(
        f"{sum(r.errors[v]['rank_head'] for r in reports)} ({v})" for v in VARIANTS
    )
    if share[VARIANTS[1]] > 0:
        return what + ": the audit's raw decode stays float32"
    return what + ": bf16 with refinement keeps these models' raw ranks (check larger ones)"


HEAD = f"{'metric':<16} {'f32 median':>11} " + " ".join(f"{v + ' err':>20}" for v in VARIANTS)
ABOUT = f"""\
Raw-lens precision: the audit decodes each next-token row again without the norm. Here the
demo prompts' rows at every layer are decoded raw in float32 (the reference), with bf16
operands (float32 accumulation and result) and with bf16 plus the union of (bf16 raw
top-{REFINE_TOP}, norm top-{REFINE_TOP}, answer) recomputed in float32. err: max abs error
of each metric against float32, over rows, all in float64 (jaccard: top-{TOP_JACCARD} norm /
raw); differs: rows whose raw top-1 id or raw answer rank changed; rank_shift: the largest
change of a rank; rank_head: rank changes where the float32 rank is <= {REFINE_TOP}; time:
that decode (the CPU's bf16 kernel, bf16 result; the refinement a memory-bound gather of
W_U's columns) / the float32 matmul, median of 3 at {{threads}} torch threads."""


def _cell(metric: str, value: float, rows: int) -> str:
    if metric in CONTINUOUS:
        return f"{value:.2e}"
    return f"{int(value):,}" if metric == "rank_shift" else f"{int(value)}/{rows} differ"


def render(reports: list[ModelReport]) -> str:
    """The header paragraph, per model its facts and a line per metric, the conclusion."""
    lines = [ABOUT.format(threads=torch.get_num_threads())]
    for r in reports:
        lines += [
            "",
            f"{r.name}: {r.rows} rows ({r.layers} layers x {r.prompts} prompts), vocab "
            f"{r.vocab:,}; max |raw logit| {r.max_raw:,.1f}; max |bf16 - f32 logit| "
            f"{r.logit_err:,.2f} (bf16 result: {r.kernel_err:,.2f})",
            HEAD,
        ]
        for k in (*CONTINUOUS, *DISCRETE, "rank_shift", "rank_head"):
            median = f"{r.medians[k]:.4g}" if k in r.medians else "-"
            n = r.head_rows if k == "rank_head" else r.rows
            cells = [_cell(k, r.errors[v][k], n) for v in VARIANTS]
            lines.append(f"{k:<16} {median:>11} " + " ".join(f"{c:>20}" for c in cells))
        ratios = " ".join(f"{f'{r.time_ratio[v]:.2f}x':>20}" for v in VARIANTS)
        lines.append(f"{'time / f32':<16} {'-':>11} {ratios}")
    return "\n".join([*lines, "", conclusion(reports)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.raw_precision", description=__doc__)
    p.add_argument("--models", nargs="+", default=None, help="demo model names (default: both)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    os.environ.setdefault("LENS_SWEEP_CACHE", str(REPO / ".cache" / "lens-sweep"))
    from transformers.utils import logging as hf_logging

    from bench.bench_models import bench_models, load_actor, release_memory, select
    from sweep.manifest import load_manifest

    hf_logging.disable_progress_bar()
    prompts = list(load_manifest(REPO / "manifests" / "demo.toml").prompts)
    reports = []
    for model in select(bench_models()[:2], args.models):
        actor, _ = load_actor(model, Path(os.environ["LENS_SWEEP_CACHE"]), args.threads)
        reports.append(measure(actor, model.name, prompts))
        print(f"{model.name}: measured", file=sys.stderr, flush=True)
        del actor
        release_memory()
    print(render(reports))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
