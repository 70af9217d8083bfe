"""What the lens-artefact audit costs: the lens pass with the audit on and off, side by side,
next to a cost model that says why the ratio is what it is.

Models (float32 on the CPU; ``bench/bench_models.py``): the demo's SmolLM2-135M and Gemma-3-270M,
and ``Llama-3.2-1B-shape``, a random-weight checkpoint of Llama-3.2-1B's shape (d 2048, 16
layers, vocabulary 128,256; built once into the cache, ~5 GB). Workloads:

- seed:   the demo's own prompts (manifests/prompts/capital-de.toml): one all-positions batch
          (the primary) and one next-token batch, as a sweep runs them (demo models);
- nextN:  N next-token prompts (the audit's worst case: every decoded row is audited); N = 32
          for the demo models, 8 for the research shape;
- all1:   the primary prompt alone at every position (the audit touches 1 row in 17).

Each is timed as ``LensActor.run_batch`` end to end (forward, lens, parity, Arrow) and as the
lens kernel alone (``lens_pass`` on the same residuals), the two settings interleaved run by run
so that a noisy machine slows both alike; medians of the ratios are printed. Target: on / off
<= 1.3x end to end.

The cost model: on next-token rows the audit decodes every (layer, prompt) row a second time
without the norm, one more float32 matmul [rows, d_model] x [d_model, vocab] the size of the
lens's own. With T_off = F + M + P (F the hooked forward, M that matmul, P the rest), on / off
is about 1 + M / T_off plus the audit's own statistics. F and M are timed alone in the same
rounds; their shares of T_off and the predicted ratio print beside the measured one. A tiny
model with a big vocabulary (Gemma-3-270M: M > F) cannot reach 1.3x on next-token batches
however fast the rest is; in a research-size model F is several times M (the more so, the
longer the prompts), and the ratio falls towards 1.

Why that matmul stays float32 (``bench/raw_precision.py``, printed after the table for the demo
models; random weights' raw logits mean nothing): raw residuals are unnormalised, so raw logits
run to hundreds (SmolLM2) or tens of thousands (Gemma), and bf16 operands change the raw answer
rank on nearly every row, even with each row's top candidates recomputed in float32.

    python -m bench.audit_bench [--repeats N] [--models NAME ...] [--threads N]
                                [--no-raw-precision]
"""

from __future__ import annotations

import argparse
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
ON_OVER_OFF_MAX = 1.3
DEMO_NEXT = 32  # next-token prompts in a demo model's nextN workload
SHAPE_NEXT = 8  # and in a research shape's: a 1B model's forward is ~10x a demo model's
TIMED = ("e2e on", "e2e off", "lens on", "lens off", "forward", "matmul")


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def workloads(prompts: list[Any], next_n: int, seed: bool = True) -> dict[str, list[list[Any]]]:
    """Batches per workload, each batch of one positions mode (as the sweep batches them)."""
    from actors.prompts import PromptSpec, batch_prompts

    primary = next(p for p in prompts if p.role == "primary")
    tests = [p for p in prompts if p.positions == "next"]
    nexts = [
        PromptSpec(f"n{i:02d}", tests[i % len(tests)].text, tests[i % len(tests)].answer)
        for i in range(next_n)
    ]
    out = {"seed": batch_prompts(prompts, 16)} if seed else {}
    return {**out, f"next{next_n}": [nexts], "all1": [[primary]]}


def batch_parts(actor: Any, batch: list[Any]) -> dict[str, Callable[[], Any]]:
    """Closures over one batch (tokenised and run forward once, here): ``forward``, the hooked
    forward alone; ``lens``, the lens kernel alone with the actor's current audit setting;
    ``matmul``, one float32 unembedding of its next-token rows (the audit's raw decode: the
    same [layers x prompts, d_model] rows through W_U, without the norm)."""
    from actors.prompts import tokenise

    tokens = tokenise(actor.tokenizer, batch, actor.bos_id, actor.pad_id, actor.n_ctx)
    all_positions = batch[0].positions == "all"
    with torch.inference_mode():
        head, resid = actor._forward(tokens, all_positions)
    inputs = actor._lens_inputs(tokens, resid, all_positions)
    d_model = inputs.resid_next.shape[-1]
    next_rows = inputs.resid_next.transpose(0, 1).reshape(-1, d_model).float()  # [B x L+1, d]

    def forward() -> Any:
        with torch.inference_mode():
            return actor._forward(tokens, all_positions)

    def lens() -> Any:
        with torch.inference_mode():
            return actor._lens(inputs, head)

    def matmul() -> Any:
        with torch.inference_mode():
            return actor.unembed(next_rows)

    return {"forward": forward, "lens": lens, "matmul": matmul}


def measure(
    actor: Any, batches: list[list[Any]], repeats: int
) -> tuple[dict[str, list[float]], int]:
    """Per-repeat seconds over ``batches``: end to end and kernel only, audit on / off, and the
    forward and the next-token matmul alone; and the Arrow records the workload writes."""
    from lens_kernel import AuditRule

    rule = AuditRule()
    parts = [batch_parts(actor, b) for b in batches]
    times: dict[str, list[float]] = {k: [] for k in TIMED}
    rows = 0
    for r in range(repeats + 1):  # the first round warms up and is dropped
        round_s: dict[str, float] = dict.fromkeys(TIMED, 0.0)
        for setting in ("on", "off") if r % 2 == 0 else ("off", "on"):
            actor.audit_rule = rule if setting == "on" else None
            runs = [_timed(lambda b=b: actor.run_batch(b)) for b in batches]
            round_s[f"e2e {setting}"] = sum(s for s, _ in runs)
            rows = sum(out.records.num_rows for _, out in runs)
            round_s[f"lens {setting}"] = sum(_timed(p["lens"])[0] for p in parts)
        for what in ("forward", "matmul"):
            round_s[what] = sum(_timed(p[what])[0] for p in parts)
        if r:
            for k, s in round_s.items():
                times[k].append(s)
    actor.audit_rule = rule
    return times, rows


def tokens_per_prompt(actor: Any, batches: list[list[Any]]) -> float:
    """Mean tokens per prompt as the forward runs them (each batch padded to its longest)."""
    from actors.prompts import tokenise

    widths = [
        (len(b), tokenise(actor.tokenizer, b, actor.bos_id, actor.pad_id, actor.n_ctx).input_ids)
        for b in batches
    ]
    return sum(n * ids.shape[1] for n, ids in widths) / sum(n for n, _ in widths)


def ratio(times: dict[str, list[float]], what: str) -> float:
    """Median over rounds of on / off (each round's pair ran back to back)."""
    return statistics.median(
        on / off for on, off in zip(times[f"{what} on"], times[f"{what} off"], strict=True)
    )


@dataclass(frozen=True)
class CostModel:
    """The audit-off run T_off = F + M + P: the forward F, the lens matmul M of the next-token
    rows and the rest P, as shares of T_off. The audit adds one more M: predicted on / off =
    1 + M / T_off."""

    off_s: float  # T_off: run_batch with the audit off, seconds (median)
    forward_share: float  # F / T_off
    matmul_share: float  # M / T_off

    @property
    def rest_share(self) -> float:
        """P / T_off; negative only when noise made F + M look longer than the whole."""
        return 1.0 - self.forward_share - self.matmul_share

    @property
    def predicted(self) -> float:
        return 1.0 + self.matmul_share


def cost_model(times: dict[str, list[float]]) -> CostModel:
    """Shares as medians of each round's own F / T_off and M / T_off (timed in the same round,
    so a machine whose load drifts between rounds skews them less than medians of seconds)."""
    off = times["e2e off"]

    def share(what: str) -> float:
        return statistics.median(x / t for x, t in zip(times[what], off, strict=True))

    return CostModel(statistics.median(off), share("forward"), share("matmul"))


def verdict(measured: float, predicted: float, limit: float = ON_OVER_OFF_MAX) -> str:
    """ok within the target; over it, whether the raw matmul alone already predicts that."""
    if measured <= limit:
        return "ok"
    return f"OVER {limit}x" + (" (matmul-bound)" if predicted > limit else "")


HEADER = (
    f"{'model':<22} {'workload':<8} {'tok':>4} {'rows':>5} {'off s':>7} {'F':>4} {'M':>4} {'P':>4} "
    f"{'pred x':>6} {'e2e x':>6} {'lens x':>6}  verdict"
)


def render_row(
    model: str, workload: str, tok: float, rows: int, cost: CostModel, e2e: float, lens: float
) -> str:
    """One table line: tokens per prompt, records, audit-off seconds, F / M / P as % of it,
    predicted and measured ratios."""
    shares = (cost.forward_share, cost.matmul_share, cost.rest_share)
    return (
        f"{model:<22} {workload:<8} {tok:>4.0f} {rows:>5} {cost.off_s:>7.3f} "
        + " ".join(f"{round(100 * s):>3}%" for s in shares)
        + f" {cost.predicted:>5.2f}x {e2e:>5.2f}x {lens:>5.2f}x  {verdict(e2e, cost.predicted)}"
    )


def render_facts(
    model: str, facts: dict[str, int], kind: str, load_s: float, build_s: float
) -> str:
    built = f", built in {build_s:.0f} s" if build_s else ""
    return (
        f"{model}: {kind}, d_model {facts['d_model']}, vocab {facts['vocab']:,}, "
        f"{facts['layers']} layers, {facts['params'] / 1e9:.2f}B params; load {load_s:.1f} s{built}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.audit_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per workload (5)")
    p.add_argument("--models", nargs="+", default=None, help="model names (default: all three)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's); 1 on a busy shared machine, where threads that "
        "wait for a descheduled sibling make small ops many times slower",
    )
    p.add_argument(
        "--no-raw-precision",
        dest="raw_precision",
        action="store_false",
        help="skip the raw decode's bf16-vs-float32 table (bench/raw_precision.py)",
    )
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1, got {args.threads}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("LENS_SWEEP_CACHE", str(REPO / ".cache" / "lens-sweep"))
    cache_dir = Path(os.environ["LENS_SWEEP_CACHE"])
    from transformers.utils import logging as hf_logging

    from bench import raw_precision
    from bench.bench_models import bench_models, load_actor, model_facts, release_memory, select
    from sweep.manifest import load_manifest

    hf_logging.disable_progress_bar()
    manifest = load_manifest(REPO / "manifests" / "demo.toml")
    models = select(bench_models(), args.models)
    table = [HEADER]
    load_at_start = os.getloadavg()[0]
    facts: list[str] = []
    worst = 0.0
    precision: list[raw_precision.ModelReport] = []
    for model in models:
        t0 = time.perf_counter()
        actor, build_s = load_actor(model, cache_dir, args.threads)
        load_s = time.perf_counter() - t0 - build_s
        kind = "random weights, bench/shapes" if model.shape else "pretrained (GGUF), demo"
        facts.append(render_facts(model.name, model_facts(actor), kind, load_s, build_s))
        print(facts[-1], file=sys.stderr, flush=True)
        next_n = SHAPE_NEXT if model.shape else DEMO_NEXT
        for label, batches in workloads(
            list(manifest.prompts), next_n, seed=not model.shape
        ).items():
            times, rows = measure(actor, batches, args.repeats)
            e2e, lens = ratio(times, "e2e"), ratio(times, "lens")
            worst = max(worst, e2e)
            tok = tokens_per_prompt(actor, batches)
            table.append(render_row(model.name, label, tok, rows, cost_model(times), e2e, lens))
            print(table[-1], file=sys.stderr, flush=True)
        if args.raw_precision and not model.shape:  # measured now, printed after the table
            precision.append(raw_precision.measure(actor, model.name, list(manifest.prompts)))
        del actor
        release_memory()
    lines = [
        "lens-sweep benchmark: the lens-artefact audit on vs off (ratios: on / off, median of "
        f"{args.repeats} interleaved rounds; target end to end <= {ON_OVER_OFF_MAX}x)",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores; "
        f"1-minute load {load_at_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end; "
        "float32 on the CPU",
        "",
        *table,
        "",
        "tok: tokens per prompt (padded); rows: Arrow records written. off s: run_batch with the",
        "audit off (T_off); F, M, P: its forward, its lens matmul of the next-token rows (timed",
        "alone) and the rest, as shares of T_off. pred x = 1 + M / T_off: the audit's raw decode",
        "is one more such matmul; e2e x - pred x is the audit's own statistics. e2e: run_batch;",
        "lens: lens_pass alone on the same residuals. matmul-bound: M alone puts it over target.",
        "Per next-token prompt M / F ~ (layers + 1) d_model vocab / (tok x non-embedding params):",
        "big vocabularies, small models and short prompts make the audit's matmul count.",
        *facts,
        f"worst end-to-end ratio {worst:.2f}x "
        + ("(within target)" if worst <= ON_OVER_OFF_MAX else "(OVER TARGET)"),
    ]
    print("\n".join(lines))
    if precision:
        print("\n" + raw_precision.render(precision))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
