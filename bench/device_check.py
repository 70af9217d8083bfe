"""Does the lens run, right and fast, on this device? Random-weight models of the real shapes.

    python -m bench.device_check --device cuda|mps|cpu [--tiny] [--shape NAME ...] [--json F]

For each model of ``manifests/all.toml`` (or the ``--shape`` names), builds a random-weight
checkpoint from the config kept in ``bench/shapes/`` (no downloads; SmolLM2's real tokenizer,
whose ids fit every shape's vocabulary), then:

- loads it as a ``LensActor`` on the device: load time, weights placed (the actor's own check);
- decodes the seed prompt at batch 1 and 32 (every position) and the seed's test prompts at
  batch 256 (next token): lens (``run_batch``), floor (hooked forward + norm + one float32
  matmul) and a plain forward, median seconds; prompts/s; the parity gate's figures;
- runs every batch twice and checks the Arrow records are identical;
- compares the device's peak memory with the estimator's figure for the same batch;
- with ``--split DEVICE``, loads the model again with its blocks split over the device and
  DEVICE (the multi-GPU path), and checks that it agrees with the unsplit model;
- finally runs ``python -m sweep.run`` (Ray, the planner, the artefacts) over all the shapes.

``--tiny`` builds tiny versions instead (the same architecture and config quirks, small
dimensions); ``make test`` runs ``--device cpu --tiny``. Exit code 0 only when every check holds.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.lens_bench import floor_pass

REPO = Path(__file__).resolve().parents[1]
SHAPES_DIR = REPO / "bench" / "shapes"
ALL_MANIFEST = REPO / "manifests" / "all.toml"
PROMPTS_FILE = REPO / "manifests" / "prompts" / "capital-de.toml"
SEED_PROMPT = "Give the city name only, plain text. The capital of Germany is called simply"
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,  # Gemma 2 alternates sliding and global layers: keep both kinds
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # still grouped-query attention
    "head_dim": 16,
}
BATCHES = ((1, "all"), (32, "all"), (256, "next"))
GIB = 2**30


# ---- shapes and checkpoints ----------------------------------------------------------------


def shape_names() -> list[str]:
    """The model names of manifests/all.toml, each of which has a config in bench/shapes."""
    from sweep.manifest import load_manifest

    return [m.name for m in load_manifest(ALL_MANIFEST).models]


def shape_config(name: str, tiny: bool, tokenizer: Any) -> dict[str, Any]:
    """The config dict of a shape; tiny: small dimensions, the same architecture and quirks."""
    path = SHAPES_DIR / f"{name}.json"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SHAPES_DIR.glob("*.json")))
        raise SystemExit(f"error: no shape {name!r} in {SHAPES_DIR} (known: {known})")
    cfg = json.loads(path.read_text())
    # The checkpoint runs with SmolLM2's tokenizer: its special ids, not the original model's.
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cfg.update(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad
    )
    if tiny:
        cfg.update(TINY)
        cfg["vocab_size"] = min(cfg["vocab_size"], len(tokenizer))
        if cfg.get("query_pre_attn_scalar"):
            cfg["query_pre_attn_scalar"] = TINY["head_dim"]
        if cfg.get("sliding_window"):
            cfg["sliding_window"] = 8  # shorter than the prompts, so the window matters
        cfg["initializer_range"] = 0.2  # peaked rather than near-uniform lens rows
    return cfg


def build_checkpoint(
    name: str, cfg: dict[str, Any], target: Path, device: str, dtype: torch.dtype
) -> float:
    """Build a seeded random-weight model of ``cfg`` on ``device`` in ``dtype`` and save it
    (with the tokenizer) to ``target``; returns seconds.

    Runs in a child process, so that none of its host or device memory is still held (or
    cached by an allocator) when the load is measured.
    """
    if (target / "config.json").is_file():
        return 0.0
    t0 = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=_build, args=(name, cfg, target, device, dtype))
    child.start()
    child.join()
    if child.exitcode != 0 or not (target / "config.json").is_file():
        raise RuntimeError(f"building the {name} checkpoint failed (exit code {child.exitcode})")
    return time.perf_counter() - t0


def _build(name: str, cfg: dict[str, Any], target: Path, device: str, dtype: torch.dtype) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    (tmp / "config.json").write_text(json.dumps(cfg))
    config = AutoConfig.from_pretrained(tmp)
    torch.manual_seed(316)
    build_on = device if torch.device(device).type != "mps" else "cpu"
    with torch.device(build_on):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval().save_pretrained(tmp)
    smollm2_tokenizer().save_pretrained(tmp)
    os.replace(tmp, target)


def smollm2_tokenizer() -> Any:
    """SmolLM2's tokenizer: LENS_SWEEP_TOKENIZER, the test cache, or read from its GGUF."""
    from transformers import AutoTokenizer

    given = os.environ.get("LENS_SWEEP_TOKENIZER")
    if given:
        return AutoTokenizer.from_pretrained(given)
    from actors.sources import DEFAULT_CACHE_DIR
    from tests.checkpoints import smollm2_tokenizer as from_gguf

    return from_gguf(DEFAULT_CACHE_DIR)


# ---- measuring -----------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if device.type == "mps":
        return int(torch.mps.driver_allocated_memory())
    return None


def median_time(fn: Callable[[], Any], device: torch.device, repeats: int) -> tuple[float, Any]:
    """Median wall seconds of ``repeats`` calls after one warm-up; the warm-up's result too."""
    first = fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), first


def prompts_for(batch: int, positions: str) -> list[Any]:
    """Batch 1 and 32: the seed prompt (no padding); 256: the seed's test prompts, cycled."""
    import tomllib

    from actors import PromptSpec

    if positions == "all":
        return [PromptSpec(f"seed-{i:03d}", SEED_PROMPT, "Berlin", "all") for i in range(batch)]
    tests = tomllib.loads(PROMPTS_FILE.read_text())["prompts"]
    return [
        PromptSpec(f"t{i:03d}", tests[i % len(tests)]["text"], tests[i % len(tests)].get("answer"))
        for i in range(batch)
    ]


def forward_only(actor: Any, prompts: list[Any]) -> torch.Tensor:
    from actors.prompts import tokenise

    batch = tokenise(actor.tokenizer, prompts, actor.bos_id, actor.pad_id, actor.n_ctx)
    with torch.inference_mode():
        return actor.bridge(
            batch.input_ids.to(actor.device), attention_mask=batch.attention_mask.to(actor.device)
        )


class HostAnonPeak:
    """Peak anonymous host memory (RssAnon) of this process while the block runs, sampled.

    Anonymous, not resident: safetensors are memory-mapped, and a mapped checkpoint's pages
    count in RSS (all of them, when it lies on tmpfs) without being a copy of the weights. A
    second copy of the weights in host RAM shows up here. Linux only; None elsewhere.
    """

    def __init__(self, interval_s: float = 0.02) -> None:
        self.interval_s = interval_s
        self.baseline: int | None = None
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def read() -> int | None:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None

    def _sample(self) -> None:
        while not self._stop.is_set():
            now = self.read()
            if now is not None:
                self.peak = max(self.peak or 0, now)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> HostAnonPeak:
        gc.collect()
        self.baseline = self.peak = self.read()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        now = self.read()
        if now is not None:
            self.peak = max(self.peak or 0, now)

    @property
    def added(self) -> int | None:
        """Peak minus the level before the block, in bytes."""
        return None if self.peak is None or self.baseline is None else self.peak - self.baseline


LOAD_HOST_OVERHEAD_GIB = 0.5  # Python, tokenizer and transformers' own allocations in a load


def load_host_ram_ok(added_gib: float, weights_gib: float) -> bool:
    """Loaded straight onto the device: the anonymous host memory the load added stays under
    half the weights (no second full copy in RAM), plus a fixed overhead that tiny models'
    few MiB of weights would otherwise be measured against."""
    return added_gib < 0.5 * weights_gib + LOAD_HOST_OVERHEAD_GIB


@dataclass
class ShapeResult:
    name: str
    device: str
    dtype: str = ""
    n_params: int = 0
    build_s: float = 0.0
    load_s: float = 0.0
    weights_gib: float = 0.0
    load_host_anon_gib: float | None = None  # anonymous host memory the load added, at peak
    parity_max_abs: float = 0.0
    parity_max_kl_bits: float = 0.0
    parity_max_rel: float = 0.0  # max |diff| in units of eps(dtype) x the logits' scale
    rows: list[dict[str, Any]] = field(default_factory=list)
    split: str = ""
    checks: dict[str, bool] = field(default_factory=dict)
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and all(self.checks.values())


def check_shape(
    name: str, ckpt: Path, device: str, repeats: int, split_with: str | None
) -> ShapeResult:
    from actors import ActorConfig, LensActor, ModelSource
    from sweep.estimate import BYTES_PER_PARAM, estimate_peak_bytes, model_shape

    dev = torch.device(device)
    res = ShapeResult(name, device)
    source = ModelSource(hf=str(ckpt))
    t0 = time.perf_counter()
    with HostAnonPeak() as host:
        actor = LensActor(ActorConfig(name=name, source=source, device=device))
    res.load_s = time.perf_counter() - t0
    res.dtype = str(actor.dtype).removeprefix("torch.")
    shape = model_shape(source)
    res.n_params = shape.n_params
    res.weights_gib = shape.n_params * BYTES_PER_PARAM[res.dtype] / GIB
    if host.added is not None:
        res.load_host_anon_gib = host.added / GIB
        if dev.type != "cpu":
            res.checks["load adds < half the weights in host RAM"] = load_host_ram_ok(
                res.load_host_anon_gib, res.weights_gib
            )
    vocab = int(actor.bridge.cfg.d_vocab)
    for batch, positions in BATCHES:
        prompts = prompts_for(batch, positions)
        from actors.prompts import tokenise

        tok = tokenise(actor.tokenizer, prompts, actor.bos_id, actor.pad_id, actor.n_ctx)
        if int(tok.input_ids.max()) >= vocab:
            raise SystemExit(f"error: {name}: prompt token ids exceed its vocabulary of {vocab}")
        reset_peak(dev)
        lens_s, first = median_time(lambda p=prompts: actor.run_batch(p), dev, repeats)
        again = actor.run_batch(prompts)
        peak = peak_bytes(dev)
        floor_s, _ = median_time(lambda p=prompts: floor_pass(actor, p), dev, repeats)
        fwd_s, _ = median_time(lambda p=prompts: forward_only(actor, p), dev, repeats)
        est = estimate_peak_bytes(shape, res.dtype, batch, int(tok.input_ids.shape[1]))
        equal = first.records.equals(again.records) and first.summary.equals(again.summary)
        res.rows.append(
            {
                "batch": batch,
                "positions": positions,
                "lens_s": lens_s,
                "floor_s": floor_s,
                "forward_s": fwd_s,
                "prompts_per_s": batch / lens_s,
                "peak_bytes": peak,
                "est_bytes": est,
                "rerun_equal": equal,
            }
        )
        res.checks[f"B{batch} rerun equal"] = equal
        if peak is not None:
            res.checks[f"B{batch} peak <= estimate"] = peak <= est
    diag = actor.diagnostics()
    res.parity_max_abs = diag["parity"]["max_abs_lens_minus_model_logits"]
    res.parity_max_kl_bits = diag["parity"]["max_kl_model_to_lens_bits"]
    res.parity_max_rel = diag["parity"]["max_relative_error"]
    if split_with:
        res.split = check_split(actor, source, device, split_with, res)
    return res


def check_split(actor: Any, source: Any, device: str, other: str, res: ShapeResult) -> str:
    """Blocks split over (device, other): placed as asked, parity holds, and it agrees with the
    unsplit model (same top-1 everywhere on the seed prompt; KL reported)."""
    from actors import ActorConfig, LensActor
    from lens_kernel import kl_bits

    prompts = prompts_for(1, "all")
    whole = actor.run_batch(prompts)
    config = ActorConfig(
        name=f"{res.name}-split", source=source, device=device, devices=(device, other)
    )
    split = LensActor(config)
    got = split.run_batch(prompts)
    placed = sorted({str(p.device) for p in split.bridge.original_model.parameters()})
    top_a = [ids[0] for ids in whole.records.column("top_ids").to_pylist()]
    top_b = [ids[0] for ids in got.records.column("top_ids").to_pylist()]
    same = sum(a == b for a, b in zip(top_a, top_b, strict=True))
    p_a = torch.tensor(whole.records.column("top_probs").to_pylist())
    p_b = torch.tensor(got.records.column("top_probs").to_pylist())
    drift = float(kl_bits(p_a.clamp_min(1e-12).log(), p_b.clamp_min(1e-12).log()).max())
    res.checks["split placed on both devices"] = len(placed) == len({device, other}) or (
        device == other
    )
    res.checks["split top-1 agrees"] = same >= 0.99 * len(top_a)
    del split
    return f"{'+'.join(placed)}: top-1 {same}/{len(top_a)}, max top-k KL {drift:.1e} bits"


# ---- the sweep -----------------------------------------------------------------------------


def run_sweep(shapes: dict[str, Path], device: str, work: Path, runs: int) -> tuple[bool, str]:
    """``python -m sweep.run`` over every checkpoint, placed on ``device``'s kind, ``runs``
    times; with two, the runs' Parquet records must be identical (determinism in Ray workers)."""
    kind = torch.device(device).type
    lines = [
        f"include = [{json.dumps(str(PROMPTS_FILE))}]",
        "[sweep]",
        'name = "device-check"',
        "batch_size = 16",
    ]
    for name, path in shapes.items():
        lines += [
            "[[models]]",
            f"name = {json.dumps(name)}",
            f"id = {json.dumps(str(path))}",
            f"device = {json.dumps(kind)}",
        ]
    manifest = work / "device-check.toml"
    manifest.write_text("\n".join(lines) + "\n")
    out = work / "results"
    cmd = [sys.executable, "-m", "sweep.run", str(manifest), "--out", str(out), "--no-progress"]
    summaries, ok = [], True
    for _ in range(runs):
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        ledger_file = out / "run-latest" / "ledger.json"
        if not ledger_file.is_file():
            return False, f"sweep.run exited {proc.returncode}: {proc.stderr.strip()[-1500:]}"
        models = json.loads(ledger_file.read_text())["models"]
        bad = {n: e.get("error") for n, e in models.items() if e.get("status") != "ok"}
        devices = sorted({str(e.get("device")) for e in models.values()})
        summaries.append(
            f"exit {proc.returncode}, {len(models) - len(bad)}/{len(models)} ok on {devices}"
            + (f"; failed: {bad}" if bad else "")
        )
        ok = ok and proc.returncode == 0 and not bad
    if runs > 1 and ok:
        identical = _same_parquet(out / "run-latest", sorted(out.glob("run-2*"))[-1])
        summaries.append("two runs' Parquet identical" if identical else "two runs DIFFER")
        ok = ok and identical
    return ok, "sweep.run: " + "; ".join(summaries)


def _same_parquet(a: Path, b: Path) -> bool:
    import pyarrow.parquet as pq

    files = sorted(p.name for p in a.glob("*.parquet"))
    if not files or files != sorted(p.name for p in b.glob("*.parquet")):
        return False
    return all(pq.read_table(a / f).equals(pq.read_table(b / f)) for f in files)


# ---- report --------------------------------------------------------------------------------


def _gib_or_na(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / GIB:.2f}"


def render(results: list[ShapeResult]) -> str:
    out = [
        "| shape | dtype | params | load s (host GiB added) | parity max abs / KL bits | batch "
        "| lens s | floor s "
        "| forward s | lens/floor | prompts/s | rerun equal | peak GiB vs estimate |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.error:
            out.append(f"| {r.name} | FAILED: {r.error} |")
            continue
        for i, row in enumerate(r.rows):
            head = (
                f"{r.name} | {r.dtype} | {r.n_params / 1e9:.2f}B | {r.load_s:.1f} "
                f"({_gib_or_na(r.load_host_anon_gib)}) | "
                f"{r.parity_max_abs:.2g} / {r.parity_max_kl_bits:.1e}"
                if i == 0
                else " | | | | "
            )
            out.append(
                f"| {head} | {row['batch']} {row['positions']} | {row['lens_s']:.3f} | "
                f"{row['floor_s']:.3f} | {row['forward_s']:.3f} | "
                f"{row['lens_s'] / row['floor_s']:.2f}x | {row['prompts_per_s']:.0f} | "
                f"{'yes' if row['rerun_equal'] else 'NO'} | "
                f"{_gib(row['peak_bytes'])} vs {_gib(row['est_bytes'])} |"
            )
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.device_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--tiny", action="store_true", help="tiny versions of the shapes")
    p.add_argument("--shape", action="append", help="a shape name (repeatable); default: all")
    p.add_argument("--repeats", type=int, default=None, help="timed runs (default 3; tiny 1)")
    p.add_argument("--split", metavar="DEVICE", default=None, help="also split blocks over DEVICE")
    p.add_argument("--no-sweep", action="store_true", help="skip the sweep.run check")
    p.add_argument(
        "--sweep-runs", type=int, default=None, help="sweep.run runs to compare (cpu 1, else 2)"
    )
    p.add_argument("--work", type=Path, default=None, help="where checkpoints go (default: temp)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints after the check")
    p.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from actors.architectures import architecture_facts, default_dtype
    from actors.runtime import check_device, set_determinism

    device = check_device(args.device)
    set_determinism()
    names = args.shape or shape_names()
    repeats = args.repeats or (1 if args.tiny else 3)
    tokenizer = smollm2_tokenizer()
    work = args.work or Path(tempfile.mkdtemp(prefix="device-check-"))
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"device check on {device} ({_device_name(device)}), torch {torch.__version__}, "
        f"{'tiny' if args.tiny else 'real'} shapes: {', '.join(names)}; work dir {work}",
        flush=True,
    )
    results: list[ShapeResult] = []
    built: dict[str, Path] = {}
    for name in names:
        cfg = shape_config(name, args.tiny, tokenizer)
        label = f"{name}-tiny" if args.tiny else name
        dtype = default_dtype(device.type, architecture_facts(cfg["architectures"][0]))
        target = work / label
        try:
            build_s = build_checkpoint(label, cfg, target, str(device), dtype)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            res = check_shape(label, target, str(device), repeats, args.split)
            res.build_s = build_s
        except Exception as exc:  # one shape's failure is reported; the others still run
            res = ShapeResult(label, str(device), error=f"{type(exc).__name__}: {exc}"[:400])
        built[label] = target
        results.append(res)
        print(
            f"{label}: {'ok' if res.ok else 'FAILED'} build {res.build_s:.1f} s, load "
            f"{res.load_s:.1f} s, weights {res.weights_gib:.2f} GiB, host RAM the load added "
            f"{_gib_or_na(res.load_host_anon_gib)} GiB (anonymous, at peak)"
            + (f"; split {res.split}" if res.split else "")
            + (f"; {res.error}" if res.error else ""),
            flush=True,
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(render(results), flush=True)
    sweep_ok, sweep_summary = (True, "skipped")
    if not args.no_sweep:
        runs = args.sweep_runs or (1 if device.type == "cpu" else 2)
        sweep_ok, sweep_summary = run_sweep(built, str(device), work, runs)
    print(sweep_summary, flush=True)
    failed = [f"{r.name}: {k}" for r in results for k, ok in r.checks.items() if not ok]
    failed += [f"{r.name}: {r.error}" for r in results if r.error]
    if not sweep_ok:
        failed.append("sweep.run")
    if args.json:
        payload = {
            "device": str(device),
            "device_name": _device_name(device),
            "torch": torch.__version__,
            "tiny": args.tiny,
            "shapes": [r.__dict__ for r in results],
            "sweep": sweep_summary,
            "failed": failed,
        }
        args.json.write_text(json.dumps(payload, indent=2, default=str))
    if not args.keep and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print("all checks hold" if not failed else f"FAILED: {'; '.join(failed)}", flush=True)
    return 0 if not failed else 1


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return "Apple MPS"
    import platform

    return platform.processor() or platform.machine()


if __name__ == "__main__":
    sys.exit(main())
