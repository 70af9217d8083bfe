"""What Ray costs a sweep, what the GGUF cache saves, and how many threads a Ray actor uses.

Three measurements in one run (``python -m bench.sweep_bench``; ``--quick``: a few minutes):

1. The sweep through Ray against one plain process, both end to end (interpreter launch to exit),
   on two workloads (``bench.sweep_workload``): the demo manifest, whose wall time is mostly
   start-up, and a research-scale one, the same models over its prompts repeated to about 340,
   where model compute dominates. Ray: the driver's own ``sweep.run.main()`` (local Ray start,
   placement, one actor per model, running at once on a split of the node's cores, replicas on
   cores a finished model left, merge, reports, Ray shutdown). One process: the same ActorConfigs and batches, one ``LensActor`` per
   model after the other at torch's default threads (every core), the same artefacts, merged
   tables and reports: the fair baseline. ``one@1`` (one thread) is an extra row. Rounds
   alternate which goes first; a ratio is the median of per-round ratios. Target: Ray / one
   process <= 1.15x on the research-scale workload; the demo's ratio shows the fixed start-up.
   Phase and per-model tables come from time stamps around the driver's phases and a wrapper
   that logs each actor call where it runs (``bench.sweep_timing``).
2. SmolLM2's GGUF loaded by ``LensActor`` with an empty cache and with the cache that load left
   (``bench.sweep_loads``). Target: first / cached >= 10x.
3. torch's threads in each Ray actor (``torch_threads`` in the run's ledger.json, and what the
   wrapper saw in the actor) next to the node's CPUs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.sweep_loads import GGUF_MODEL, LOAD_PARTS, measure_loads_or_why
from bench.sweep_timing import REPO, ModelTimes, VariantRun, label, one_variant, run_once_more
from bench.sweep_workload import RESEARCH_PROMPTS, Workload

RAY_OVER_ONE_MAX = 1.15
FIRST_OVER_CACHED_MIN = 10.0
TARGET_WORKLOAD = "research"  # where the Ray / one process target applies
QUICK_RESEARCH_PROMPTS = 32  # the demo's 17 prompts twice
SHARED_CORES_SLOWER = 1.2  # all cores this much slower than one thread: the cores were shared
Runs = dict[str, list[VariantRun]]  # variant -> its runs, one per round


def verdict(ratio: float, target: float, at_most: bool) -> str:
    return "PASS" if (ratio <= target if at_most else ratio >= target) else "MISS"


def median_of(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratios_to(runs: Runs, variant: str) -> list[float]:
    """Ray / ``variant`` per round (the runs of one round share an index)."""
    return [r.wall_s / o.wall_s for r, o in zip(runs["ray"], runs[variant], strict=True)]


def render_sweep(runs: Runs, target: bool) -> list[str]:
    """One workload: walls, ratios (a verdict where ``target``, on the all-cores row), phases."""
    ones = [v for v in runs if v != "ray"]
    lines = [f"   {'variant':<28} {'wall s':>8}  {'Ray / it':>8}  {'verdict':<30}  runs, s"]
    for v, vr in runs.items():
        walls = " ".join(f"{r.wall_s:.1f}" for r in vr)
        wall = median_of([r.wall_s for r in vr])
        if v == "ray":
            lines.append(f"   {label(v):<28} {wall:8.2f}  {'':>8}  {'':<30}  {walls}")
            continue
        ratios = ratios_to(runs, v)
        ratio = median_of(ratios)
        if not target:
            ok = "no target: start-up cost"
        elif v == "one":
            ok = f"{verdict(ratio, RAY_OVER_ONE_MAX, True)} (target <= {RAY_OVER_ONE_MAX:g}x)"
        else:
            ok = "extra row, no target"
        each = ", ".join(f"{x:.2f}" for x in ratios)
        lines.append(f"   {label(v):<28} {wall:8.2f}  {ratio:7.2f}x  {ok:<30}  {walls} "
                     f"(ratios {each})")  # fmt: skip
    head = "".join(f" {v:>8}" for v in ones)
    lines += ["", f"   {'phase, wall s (medians)':<40} {'Ray':>8}{head} {f'Ray-{ones[0]}':>8}"]
    names = list(dict.fromkeys(p for vr in runs.values() for p in vr[0].phases))
    for phase in names:
        cells = {v: median_of([r.phases.get(phase, 0.0) for r in vr]) for v, vr in runs.items()}
        row = "".join(f" {cells[v]:8.2f}" for v in ones)
        diff = cells["ray"] - cells[ones[0]]
        lines.append(f"   {phase:<40} {cells['ray']:8.2f}{row} {diff:+8.2f}")
    lines += ["", *render_totals(runs)]
    return [*lines, "", *render_models(runs)]


RAY_ONLY = ("import ray", "ray.init (local Ray start)", "probe nodes", "ray.shutdown")


def render_totals(runs: Runs) -> list[str]:
    """Where the difference comes from, in three sums (medians over rounds)."""

    def med(v: str, fn: Callable[[VariantRun], float]) -> float:
        return median_of([fn(r) for r in runs[v]])

    def threads(v: str) -> str:
        found = {m.torch_threads for m in runs[v][-1].models.values()}
        return "/".join(str(t) for t in sorted(found, key=str))

    fixed = med("ray", lambda r: sum(r.phases.get(p, 0.0) for p in RAY_ONLY))
    starts = med("ray", lambda r: max((m.submit_to_init + m.import_actor + m.import_tl
                                       for m in r.models.values()), default=0.0))  # fmt: skip

    def batch_s(r: VariantRun) -> float:
        return sum(m.batches for m in r.models.values())

    batches = "; ".join(
        f"{'Ray' if v == 'ray' else v} {med(v, batch_s):.2f} s at {threads(v)} thread(s)"
        for v in runs
    )
    return [
        f"   Ray's own phases ({', '.join(RAY_ONLY)}): {fixed:.2f} s",
        f"   slowest actor's worker start + imports of torch and TransformerLens: {starts:.2f} s "
        "(each actor pays them; one process imports once)",
        f"   run_batch calls summed over models: {batches}",
    ]


MODEL_COLUMNS = (("thr", "torch_threads"), ("OMP", "omp_num_threads"),
                 ("submit", "submit_to_init"), ("torch", "import_actor"), ("TL", "import_tl"),
                 ("load", "load"), ("batches", "batches"), ("write", "sink_add"),
                 ("commit", "commit"), ("other", "other"), ("span", "span"))  # fmt: skip


def render_models(runs: Runs) -> list[str]:
    """Per model and variant, the medians of each part of its time line."""
    names = list(dict.fromkeys(m for vr in runs.values() for m in vr[0].models))
    head = "".join(f" {col:>7}" for col, _ in MODEL_COLUMNS)
    lines = [f"   {'per model, wall s (medians)':<30} {'variant':<10}{head}"]
    for name in names:
        for v, vr in runs.items():
            seen = [r.models[name] for r in vr if name in r.models]
            if not seen:
                continue
            cells = []
            for _, attr in MODEL_COLUMNS:
                if attr in ("torch_threads", "omp_num_threads"):
                    value = getattr(seen[-1], attr)
                    cells.append(f" {'-' if value is None else value!s:>7}")
                else:
                    cells.append(f" {median_of([getattr(m, attr) for m in seen]):7.2f}")
            lines.append(f"   {name[:30]:<30} {'Ray' if v == 'ray' else v:<10}" + "".join(cells))
    first = runs["ray"][0].models
    lines += [
        "   thr: torch threads in the actor; OMP: OMP_NUM_THREADS there; submit: actor submitted "
        "-> its __init__ entered (worker start, unpickling); torch: import actors.lens_actor "
        "(torch, pyarrow, kernel); TL: import transformer_lens; load: LensActor() (weights, "
        "bridge boot); batches: run_batch calls where the actor runs ("
        + ", ".join(
            f"{m.n_batches} for {n}" + (f" on {m.replicas + 1} actors" if m.replicas else "")
            for n, m in first.items()
        )
        + "; a model with replicas: the first actor's start, every actor's batches); write: the "
        "driver appending them to Parquet; commit: its CSVs and JSON; other: the rest of the "
        "span, waiting on results (negative where replicas overlap); span: submitted -> "
        "committed",
    ]
    return lines


def render_threads(ledger: dict[str, Any], seen: dict[str, ModelTimes], cpus: int) -> list[str]:
    """Part 3: per model, the ledger's torch_threads, what the wrapper saw, the node's CPUs."""
    node_cpus = (ledger.get("nodes") or [{}])[0].get("cpus", "?")
    models = ledger.get("models", {})
    lines = [
        "3. torch threads in each Ray CPU actor (the last Ray run)",
        f"   {'model':<28} {'ledger torch_threads':>20} {'seen in actor':>13} "
        f"{'OMP_NUM_THREADS':>15} {'node CPUs':>9}",
    ]
    for name in sorted(set(models) | set(seen)):
        recorded = models.get(name, {}).get("torch_threads")
        m = seen.get(name, ModelTimes())
        lines.append(
            f"   {name:<28} {'not recorded' if recorded is None else recorded!s:>20} "
            f"{'-' if m.torch_threads is None else m.torch_threads!s:>13} "
            f"{m.omp_num_threads or '-':>15} {node_cpus!s:>9}"
        )
    return [*lines, f"   (this machine: {cpus} logical cores)"]


def render_loads(loads: dict[str, list[dict[str, float]]]) -> list[str]:
    """Part 2: first vs cached load of SmolLM2's GGUF, with what each spends its time on."""
    med = {k: {p: median_of([x.get(p, 0.0) for x in v]) for p in ("total", *LOAD_PARTS)}
           for k, v in loads.items()}  # fmt: skip
    ratio = med["first"]["total"] / med["cached"]["total"]
    return [
        f"2. {GGUF_MODEL[0]} GGUF into LensActor: first load (empty cache) vs cached "
        f"({len(loads['first'])} + {len(loads['cached'])} loads; medians)",
        f"   {'part, wall s':<40} {'first':>8} {'cached':>8}",
        *(f"   {p:<40} {med['first'][p]:8.2f} {med['cached'][p]:8.2f}" for p in med["first"]),
        f"   first / cached {ratio:.1f}x; target >= {FIRST_OVER_CACHED_MIN:g}x: "
        f"{verdict(ratio, FIRST_OVER_CACHED_MIN, False)}",
    ]


def render_summary(workloads: list[Workload], runs: dict[str, Runs]) -> list[str]:
    """Part 1's head: Ray / one process per workload, and the verdict where the target applies."""
    lines = ["1. the sweep end to end, Ray vs one process (medians of per-round ratios)"]
    for w in workloads:
        ratios = {v: median_of(ratios_to(runs[w.name], v)) for v in runs[w.name] if v != "ray"}
        cells = ", ".join(f"Ray / {label(v)} {x:.2f}x" for v, x in ratios.items())
        if w.name != TARGET_WORKLOAD:
            what = "start-up cost, no target"
        elif "one" in ratios:
            what = (
                f"target <= {RAY_OVER_ONE_MAX:g}x: {verdict(ratios['one'], RAY_OVER_ONE_MAX, True)}"
            )
        else:
            what = "target needs the all-cores row (--one-threads all)"
        lines.append(f"   {w.name:<9} {w.n_models} models x {w.n_prompts:>3} prompts: {cells} "
                     f"({what})")  # fmt: skip
        lines += _shared_cores(w.name, runs[w.name])
    return lines


def _shared_cores(name: str, runs: Runs) -> list[str]:
    """A warning where every core was slower than one: other work held a core, so torch's
    threads waited on it op by op, and the all-cores row measures the machine, not Ray."""
    if "one" not in runs or "one@1" not in runs:
        return []
    every, one = (median_of([r.wall_s for r in runs[v]]) for v in ("one", "one@1"))
    if every <= SHARED_CORES_SLOWER * one:
        return []
    return [
        f"   {'':<9} caution: one process at every core took {every / one:.1f}x its time at one "
        "thread; cores were shared with other work, so that row's ratio is not Ray's cost"
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.sweep_bench",
        description="The sweep through Ray vs one process (demo and research-scale workloads); "
        "a GGUF's first vs cached load; a Ray actor's threads.",
    )
    p.add_argument(
        "--manifest",
        type=Path,
        default=REPO / "manifests" / "demo.toml",
        help="the demo workload, and the base of the research-scale one "
        "(default: manifests/demo.toml)",
    )
    p.add_argument(
        "--workloads",
        nargs="+",
        choices=("demo", "research"),
        default=None,
        help="which to run (default: both; --quick: research)",
    )
    p.add_argument(
        "--research-prompts",
        type=int,
        default=None,
        metavar="N",
        help=f"prompts of the research-scale workload, about (default {RESEARCH_PROMPTS}; "
        f"--quick {QUICK_RESEARCH_PROMPTS})",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        metavar="N",
        help="interleaved rounds of every variant (default 2; --quick 1)",
    )
    p.add_argument(
        "--load-repeats",
        type=int,
        default=None,
        metavar="N",
        help="first and cached loads of the GGUF, each (default 2; --quick 1)",
    )
    p.add_argument(
        "--one-threads",
        nargs="+",
        default=None,
        metavar="N",
        help="torch threads of the one-process side, one variant each: integers or "
        "'all' (torch's default); default: all 1 (--quick: all)",
    )
    p.add_argument(
        "--num-cpus",
        type=int,
        default=None,
        metavar="N",
        help="the driver's --num-cpus for its local Ray (default: all)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=900.0,
        metavar="S",
        help="seconds one sweep run may take (default 900)",
    )
    p.add_argument("--skip-loads", action="store_true", help="leave out part 2")
    p.add_argument(
        "--no-replicas",
        action="store_true",
        help="the Ray driver without replicas (cores a finished model left stay idle)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="a few minutes: one round of Ray and one process at all threads on a smaller "
        "research-scale workload; no demo, no part 2",
    )
    args = p.parse_args(argv)
    default = 1 if args.quick else 2
    args.repeats = default if args.repeats is None else args.repeats
    args.load_repeats = default if args.load_repeats is None else args.load_repeats
    args.skip_loads = args.skip_loads or args.quick
    if args.workloads is None:
        args.workloads = ["research"] if args.quick else ["demo", "research"]
    if args.research_prompts is None:
        args.research_prompts = QUICK_RESEARCH_PROMPTS if args.quick else RESEARCH_PROMPTS
    if args.one_threads is None:
        args.one_threads = ["all"] if args.quick else ["all", "1"]
    for name in ("repeats", "load_repeats", "num_cpus", "research_prompts"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for t in args.one_threads:
        if t != "all" and not (t.isdigit() and int(t) >= 1):
            p.error(f"--one-threads takes positive integers or 'all', got {t!r}")
    args.variants = ["ray", *dict.fromkeys(one_variant(t) for t in args.one_threads)]
    args.workloads = list(dict.fromkeys(args.workloads))
    if not args.manifest.is_file():
        p.error(f"manifest not found: {args.manifest}")
    return args


def report(
    workloads: list[Workload],
    runs: dict[str, Runs],
    loads: dict[str, list[dict[str, float]]] | str | None,
    load_avg: tuple[float, float],
) -> list[str]:
    import platform

    from bench.lens_bench import cpu_name

    lines = [
        "lens-sweep benchmark: the sweep through Ray vs one process; GGUF first vs cached load; "
        "threads in a Ray actor",
        f"machine  {cpu_name()}, {os.cpu_count()} logical cores; python "
        f"{platform.python_version()}; 1-minute load {load_avg[0]:.2f} before, {load_avg[1]:.2f} "
        "after (other work slows every side; compare ratios)",
        *(
            f"workload {w.name}: {w.manifest} ({w.n_models} models, {w.n_prompts} prompts)"
            for w in workloads
        ),
        "Ray      sweep.run's main() in a fresh interpreter: imports, local ray.init, node probe, "
        "plan, one actor per model, running at once on a split of the cores (worker start, "
        "imports, model load, batches), Parquet/CSV/JSON, merge, reports, ray.shutdown, exit",
        "one      a fresh interpreter: the same imports, ActorConfigs and batches, one LensActor "
        "per model after the other, the same artefacts, merge, reports, exit; no Ray, no plan; "
        "torch's default threads (every core) unless one@N (N threads)",
        "",
        *render_summary(workloads, runs),
    ]
    for i, w in enumerate(workloads):
        n = len(runs[w.name]["ray"])
        lines += ["", f"1{'abc'[i]}. {w.name}: {w.n_models} models x {w.n_prompts} prompts "
                  f"({n} interleaved round(s); medians)"]  # fmt: skip
        lines += render_sweep(runs[w.name], target=w.name == TARGET_WORKLOAD)
    lines.append("")
    if isinstance(loads, str):
        lines += [f"2. the GGUF loads failed: {loads}", ""]
    elif loads is not None:
        lines += [*render_loads(loads), ""]
    last = runs[workloads[-1].name]["ray"][-1]
    return lines + render_threads(last.ledger, last.models, os.cpu_count() or 0)


def main(argv: list[str] | None = None) -> int:
    from bench.sweep_workload import as_is, research_scale

    args = parse_args(argv)
    # Both sweep sides use the tests' converted GGUFs; part 2 converts into its own folders.
    os.environ.setdefault("LENS_SWEEP_CACHE", str(REPO / ".cache" / "lens-sweep"))
    driver_args = [] if args.num_cpus is None else ["--num-cpus", str(args.num_cpus)]
    if args.no_replicas:
        driver_args.append("--no-replicas")
    scratch = Path(tempfile.mkdtemp(prefix="sweep-bench-"))
    load_before = os.getloadavg()[0]
    try:
        made = {"demo": lambda: as_is(args.manifest),
                "research": lambda: research_scale(args.manifest, scratch / "research",
                                                   args.research_prompts)}  # fmt: skip
        workloads = [made[name]() for name in args.workloads]
        runs = {w.name: {v: [] for v in args.variants} for w in workloads}
        for r in range(args.repeats):
            for w in workloads:
                for v in args.variants if r % 2 == 0 else args.variants[::-1]:
                    root = scratch / f"{w.name}-{v}-{r}"
                    found = run_once_more(v, w.manifest, root, driver_args, args.timeout)
                    runs[w.name][v].append(found)
                    print(f"  round {r + 1}: {w.name:<9} {label(v):<28} {found.wall_s:7.2f} s",
                          file=sys.stderr, flush=True)  # fmt: skip
        loads: dict[str, list[dict[str, float]]] | str | None = None
        if not args.skip_loads:
            loads = measure_loads_or_why(args.load_repeats, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print("\n".join(report(workloads, runs, loads, (load_before, os.getloadavg()[0]))))
    return 1 if isinstance(loads, str) else 0


if __name__ == "__main__":
    raise SystemExit(main())
