"""What the fast unembedding buys and costs: float32 vs bfloat16 lens rows, side by side.

Both demo models (SmolLM2-135M, Gemma-3-270M; float32 weights on the CPU). The demo prompts
(manifests/demo.toml) run through the actor's hooked forward at every position; every row (all
layers, all real positions) is normed as the lens does, then unembedded in the lens's own chunk
size by ``UnembedSpec`` in float32 and in each fast precision (bfloat16; tf32 too on CUDA).

- matmul x: float32 / fast seconds of the unembedding over all rows (matmul, the float32 copy and,
  for bfloat16, the exact recompute of each row's top logits), the precisions interleaved run by
  run so that a noisy machine slows both alike; the median of the per-round ratios.
- lens x:   the same for the whole lens pass on those residuals (``lens_pass``: unembedding,
  log-softmax, top-k, entropy, KL, audit), which the matmul speed-up is diluted in.
- error of the fast precision against float32 over every row: max |delta entropy| (bits), max
  |delta p1| (top-1 probability) and top-1 agreement (fraction of rows with the same top-1 id).

Target: matmul float32 / bfloat16 >= 3x. ``python -m bench.unembed_bench --help`` for options.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from bench.lens_bench import cpu_name, share_model_cache

REPO = Path(__file__).resolve().parents[1]
FAST_OVER_FLOAT32_MIN = 3.0


def cpu_features() -> str:
    """The CPU's bf16 matmul hardware as /proc/cpuinfo names it (Linux), or 'unknown'."""
    try:
        flags = next(
            line.split(":", 1)[1].split()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        )
    except (OSError, StopIteration):
        return "unknown"
    wanted = [f for f in flags if f in ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f")]
    return " ".join(sorted(wanted)) or "none of avx512f, avx512_bf16, amx_bf16"


def rows_of(actor: Any, prompts: list[Any]) -> tuple[torch.Tensor, Any]:
    """Every lens row of ``prompts`` at every position, normed as the lens does: [rows, d_model]
    float32, plus the lens inputs and model logits for timing the whole lens pass."""
    from actors.prompts import tokenise
    from lens_kernel import apply_norm

    everywhere = [replace(p, positions="all") for p in prompts]
    tokens = tokenise(actor.tokenizer, everywhere, actor.bos_id, actor.pad_id, actor.n_ctx)
    with torch.inference_mode():
        head, resid = actor._forward(tokens, all_positions=True)  # resid [layers, B, T, d]
        real = tokens.attention_mask.bool().to(resid.device)
        keep_bias = actor.config.keep_layernorm_bias
        rows = torch.cat(
            [apply_norm(resid[i][real], s, keep_bias) for i, s in enumerate(actor.norm_plan)]
        )
    return rows, (actor._lens_inputs(tokens, resid, True), head)


def unembed_all(spec: Any, rows: torch.Tensor, chunk: int, buf: torch.Tensor) -> None:
    for r0 in range(0, rows.shape[0], chunk):
        x = rows[r0 : r0 + chunk]
        spec(x, out=buf[: x.shape[0]])


def errors(exact: Any, fast: Any, rows: torch.Tensor, chunk: int) -> tuple[float, float, float]:
    """(max |delta entropy| bits, max |delta p1|, top-1 agreement) of ``fast`` against ``exact``."""
    worst_h = worst_p1 = 0.0
    same = 0
    for r0 in range(0, rows.shape[0], chunk):
        x = rows[r0 : r0 + chunk]
        stats = []
        for spec in (exact, fast):
            log_p = torch.log_softmax(spec(x), dim=-1)
            p = log_p.exp()
            entropy_bits = -(p * log_p).sum(-1) / math.log(2)
            p1, top1 = p.max(-1)
            stats.append((entropy_bits, p1, top1))
        (h0, p0, t0), (h1, p1_fast, t1) = stats
        worst_h = max(worst_h, float((h1 - h0).abs().max()))
        worst_p1 = max(worst_p1, float((p1_fast - p0).abs().max()))
        same += int((t1 == t0).sum())
    return worst_h, worst_p1, same / rows.shape[0]


def measure(
    actor: Any, specs: dict[str, Any], rows: torch.Tensor, lens: Any, repeats: int
) -> dict[str, dict[str, list[float]]]:
    """Per-round seconds of the unembedding and of the lens pass, per precision, interleaved."""
    vocab = actor.unembed.d_vocab
    # The lens's all-positions chunk: four float32 [rows, V] buffers within chunk_bytes.
    chunk = max(1, actor.config.chunk_bytes // (16 * vocab))
    buf = torch.zeros(min(chunk, rows.shape[0]), vocab)
    inputs, head = lens
    own = actor.unembed
    times: dict[str, dict[str, list[float]]] = {"matmul": {}, "lens": {}}
    names = list(specs)
    try:
        for r in range(repeats + 1):  # the first round warms up and is dropped
            for name in names if r % 2 == 0 else names[::-1]:
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    unembed_all(specs[name], rows, chunk, buf)
                    t1 = time.perf_counter()
                    actor.unembed = specs[name]
                    actor._lens(inputs, head)
                    t2 = time.perf_counter()
                if r:
                    times["matmul"].setdefault(name, []).append(t1 - t0)
                    times["lens"].setdefault(name, []).append(t2 - t1)
    finally:
        actor.unembed = own
    return times


def ratio(times: dict[str, list[float]], fast: str) -> float:
    return statistics.median(a / b for a, b in zip(times["float32"], times[fast], strict=True))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.unembed_bench", description=__doc__)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds per model (3)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's); 1 is steadier on a machine others are using",
    )
    p.add_argument("--models", nargs="+", default=None, help="demo model names (default: both)")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    share_model_cache()
    from transformers.utils import logging as hf_logging

    from actors import ActorConfig, LensActor
    from lens_kernel import UnembedSpec
    from sweep.manifest import load_manifest

    hf_logging.disable_progress_bar()
    manifest = load_manifest(REPO / "manifests" / "demo.toml")
    load_before = os.getloadavg()[0]
    lines = [
        "lens-sweep benchmark: the lens rows' unembedding in float32 vs faster precisions "
        f"(x: float32 / fast seconds, median of {args.repeats} interleaved rounds; target "
        f"matmul >= {FAST_OVER_FLOAT32_MIN:g}x)",
        f"{cpu_name()} ({cpu_features()}); torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} cores; 1-minute load {load_before:.2f} before",
        f"rows: the {len(manifest.prompts)} demo prompts at every position, all layers",
        "",
        f"{'model':<22} {'fast':<8} {'rows':>6} {'chunk':>5} {'f32 s':>7} {'matmul x':>8} "
        f"{'lens x':>6} {'max|dH| bits':>12} {'max|dp1|':>8} {'top-1 agree':>11}",
    ]
    worst = math.inf
    for entry in manifest.models:
        if args.models and entry.name not in args.models:
            continue
        actor = LensActor(
            ActorConfig(
                name=entry.name, source=entry.source, cache_dir=os.environ["LENS_SWEEP_CACHE"]
            )
        )
        rows, lens = rows_of(actor, list(manifest.prompts))
        base = actor.unembed
        fast = ["bfloat16"] + (["tf32"] if actor.device.type == "cuda" else [])
        specs = {
            name: UnembedSpec(base.W_U, base.b_U, base.softcap, precision=name)
            for name in ["float32", *fast]
        }
        times = measure(actor, specs, rows, lens, args.repeats)
        chunk = max(1, actor.config.chunk_bytes // (16 * base.d_vocab))
        for name in fast:
            with torch.inference_mode():
                dh, dp1, agree = errors(specs["float32"], specs[name], rows, chunk)
            x = ratio(times["matmul"], name)
            if name == "bfloat16":
                worst = min(worst, x)
            lines.append(
                f"{entry.name:<22} {name:<8} {rows.shape[0]:>6} {chunk:>5} "
                f"{statistics.median(times['matmul']['float32']):>7.2f} {x:>7.2f}x "
                f"{ratio(times['lens'], name):>5.2f}x {dh:>12.4f} {dp1:>8.4f} {agree:>11.5f}"
            )
            print(lines[-1], file=sys.stderr, flush=True)
        del actor, specs
    lines += [
        "",
        "f32 s: seconds of the float32 unembedding over all rows (median); matmul x: that over "
        "the fast precision's",
        "(bf16 matmul + float32 copy + top-4 recompute); lens x: the same for the whole lens "
        "pass; errors over every row.",
        f"1-minute load {os.getloadavg()[0]:.2f} after; worst bfloat16 matmul ratio {worst:.2f}x "
        + ("(within target)" if worst >= FAST_OVER_FLOAT32_MIN else "(UNDER TARGET)"),
    ]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
