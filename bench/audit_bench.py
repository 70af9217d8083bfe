"""What the lens-artefact audit costs: the lens pass with the audit on and off, side by side.

Both demo models (SmolLM2-135M, Gemma-3-270M; float32 on the CPU), three workloads each:

- seed:   the demo's own prompts (manifests/prompts/capital-de.toml): one all-positions batch
          (the primary) and one next-token batch, as a sweep runs them;
- next32: 32 next-token prompts (the audit's worst case: every decoded row is audited);
- all1:   the primary prompt alone at every position (the audit touches 1 row in 17).

Each is timed as ``LensActor.run_batch`` end to end (forward, lens, parity, Arrow) and as the
lens kernel alone (``lens_pass`` on the same residuals), the two settings interleaved run by run
so that a noisy machine slows both alike; medians of the ratios are printed. Target: on / off
<= 1.3x end to end. ``python -m bench.audit_bench --help`` for options.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
ON_OVER_OFF_MAX = 1.3


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def workloads(prompts: list[Any]) -> dict[str, list[list[Any]]]:
    """Batches per workload, each batch of one positions mode (as the sweep batches them)."""
    from actors.prompts import PromptSpec, batch_prompts

    primary = next(p for p in prompts if p.role == "primary")
    tests = [p for p in prompts if p.positions == "next"]
    next32 = [
        PromptSpec(f"n{i:02d}", tests[i % len(tests)].text, tests[i % len(tests)].answer)
        for i in range(32)
    ]
    return {
        "seed": batch_prompts(prompts, 16),
        "next32": [next32],
        "all1": [[primary]],
    }


def kernel_call(actor: Any, batch: list[Any], audit: Any) -> Callable[[], Any]:
    """The lens kernel alone on this batch's residuals (forward done once, outside the timing)."""
    from actors.prompts import tokenise

    tokens = tokenise(actor.tokenizer, batch, actor.bos_id, actor.pad_id, actor.n_ctx)
    all_positions = batch[0].positions == "all"
    with torch.inference_mode():
        head, resid = actor._forward(tokens, all_positions)
    inputs = actor._lens_inputs(tokens, resid, all_positions)

    def run() -> Any:
        actor.audit_rule = audit
        with torch.inference_mode():
            return actor._lens(inputs, head)

    return run


def measure(actor: Any, batches: list[list[Any]], repeats: int) -> dict[str, list[float]]:
    """Per-repeat seconds of end-to-end and kernel-only passes over ``batches``, audit on / off."""
    from lens_kernel import AuditRule

    rule = AuditRule()
    kernels = {
        "on": [kernel_call(actor, b, rule) for b in batches],
        "off": [kernel_call(actor, b, None) for b in batches],
    }
    times: dict[str, list[float]] = {k: [] for k in ("e2e on", "e2e off", "lens on", "lens off")}
    for r in range(repeats + 1):  # the first round warms up and is dropped
        for setting in ("on", "off") if r % 2 == 0 else ("off", "on"):
            actor.audit_rule = rule if setting == "on" else None
            e2e = sum(_timed(lambda b=b: actor.run_batch(b)) for b in batches)
            lens = sum(_timed(k) for k in kernels[setting])
            if r:
                times[f"e2e {setting}"].append(e2e)
                times[f"lens {setting}"].append(lens)
    actor.audit_rule = rule
    return times


def ratio(times: dict[str, list[float]], what: str) -> float:
    return statistics.median(
        on / off for on, off in zip(times[f"{what} on"], times[f"{what} off"], strict=True)
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.audit_bench", description=__doc__)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds per workload (5)")
    p.add_argument("--models", nargs="+", default=None, help="demo model names (default: both)")
    args = p.parse_args(argv)
    os.environ.setdefault("LENS_SWEEP_CACHE", str(REPO / ".cache" / "lens-sweep"))
    from transformers.utils import logging as hf_logging

    from actors import ActorConfig, LensActor
    from sweep.manifest import load_manifest

    hf_logging.disable_progress_bar()
    manifest = load_manifest(REPO / "manifests" / "demo.toml")
    lines = [
        "lens-sweep benchmark: the lens-artefact audit on vs off (ratios: on / off, median of "
        f"{args.repeats} interleaved rounds; target end to end <= {ON_OVER_OFF_MAX}x)",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores; "
        f"1-minute load {os.getloadavg()[0]:.2f}",
        "",
        f"{'model':<24} {'workload':<8} {'rows':>6} {'e2e off s':>9} {'e2e x':>6} "
        f"{'lens off s':>10} {'lens x':>7}  verdict",
    ]
    worst = 0.0
    for entry in manifest.models:
        if args.models and entry.name not in args.models:
            continue
        actor = LensActor(
            ActorConfig(
                name=entry.name, source=entry.source, cache_dir=os.environ["LENS_SWEEP_CACHE"]
            )
        )
        for label, batches in workloads(list(manifest.prompts)).items():
            times = measure(actor, batches, args.repeats)
            rows = sum(actor.run_batch(b).records.num_rows for b in batches)
            e2e, lens = ratio(times, "e2e"), ratio(times, "lens")
            worst = max(worst, e2e)
            verdict = "ok" if e2e <= ON_OVER_OFF_MAX else f"OVER {ON_OVER_OFF_MAX}x"
            lines.append(
                f"{entry.name:<24} {label:<8} {rows:>6} "
                f"{statistics.median(times['e2e off']):>9.3f} {e2e:>5.2f}x "
                f"{statistics.median(times['lens off']):>10.3f} {lens:>6.2f}x  {verdict}"
            )
            print(lines[-1], file=sys.stderr, flush=True)
        del actor
    lines += [
        "",
        "e2e: LensActor.run_batch over the workload's batches (forward, lens, parity, Arrow);",
        "lens: lens_pass alone on the same residuals. rows: Arrow records the workload writes.",
        f"worst end-to-end ratio {worst:.2f}x "
        + ("(within target)" if worst <= ON_OVER_OFF_MAX else "(OVER TARGET)"),
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
