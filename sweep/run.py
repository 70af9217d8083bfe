"""The sweep: python -m sweep.run MANIFEST.toml [--address ADDR] [--out DIR] [--rerun-failed].

Exit codes: 0 every model ok; 1 some model failed or was skipped; 2 bad input (nothing written).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from actors.config import ActorConfig
from actors.sources import DEFAULT_CACHE_DIR
from sweep.errors import ManifestError, RunDirError
from sweep.estimate import (
    BYTES_PER_PARAM,
    EstimateError,
    estimate_peak_bytes,
    estimate_split_bytes,
    model_shape,
    translator_bytes,
)
from sweep.files import write_json
from sweep.fit import LensCardError, lens_key, load_lens
from sweep.fit_options import FitOptions, load_fit_options, read_documents
from sweep.ledger import Ledger
from sweep.lock import RunLock
from sweep.manifest import Manifest, ModelEntry, load_manifest
from sweep.placement import DEFAULT_DTYPE, DEVICE_ORDER, ModelDemand, Placement, plan
from sweep.provenance import provenance

LATEST = "run-latest"


@dataclass(frozen=True)
class TrainedLensSource:
    """How the manifest's trained lenses are (or were) fitted: [fit] and its text."""

    options: FitOptions
    docs: list[str]
    text: dict[str, Any]

    def keys(self, entry: ModelEntry, kinds: tuple[str, ...]) -> list[str]:
        return [lens_key(entry, k, self.options, self.text["sha256"]) for k in kinds]


def trained_lens_source(manifest: Manifest) -> TrainedLensSource | None:
    """[fit] and its documents when the sweep decodes a trained lens (ManifestError if either is
    bad: refused before anything runs), else None."""
    if not manifest.options.trained_lenses:
        return None
    options = load_fit_options(manifest.path, manifest.options.seed)
    docs, text = read_documents(options, manifest.path.parent)
    return TrainedLensSource(options, docs, text)


def model_fingerprint(
    manifest: Manifest, entry: ModelEntry, lenses: TrainedLensSource | None
) -> str:
    """The manifest's fingerprint of the model, and the keys of its trained lenses: another
    [fit] or another text means other lenses, so other results."""
    fp = manifest.fingerprint(entry)
    if lenses is None:
        return fp
    keys = lenses.keys(entry, manifest.options.trained_lenses)
    return hashlib.sha256(json.dumps([fp, keys]).encode()).hexdigest()[:16]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sweep.run", description=__doc__)
    p.add_argument("manifest", type=Path, help="TOML manifest (see manifests/)")
    p.add_argument(
        "--out", type=Path, default=Path("results"), help="results root (default: results)"
    )
    p.add_argument(
        "--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local Ray)"
    )
    p.add_argument(
        "--rerun-failed", action="store_true", help="run only models of run-latest that are not ok"
    )
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for a local Ray (default: all)")
    p.add_argument(
        "--simulate-missing-devices",
        action="store_true",
        help="plan on GPUs/mps that nodes advertise but lack; run those actors on CPU (testing)",
    )
    p.add_argument(
        "--prompt-files-anywhere",
        action="store_true",
        help="read prompt files outside the manifest's folder (never /proc, /sys, /dev)",
    )
    p.add_argument(
        "--no-replicas",
        action="store_true",
        help="no second actors on cores finished models left (as [sweep] replicas = false)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def _rotate(root: Path) -> Path:
    """Move run-latest aside as run-YYYYMMDD-HHMMSS and make a fresh, empty run-latest."""
    latest = root / LATEST
    if latest.exists():
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(latest.stat().st_mtime))
        target, n = root / f"run-{stamp}", 1
        while target.exists():
            target, n = root / f"run-{stamp}-{n}", n + 1
        os.replace(latest, target)
    latest.mkdir(parents=True)
    return latest


def _check_out(args: argparse.Namespace) -> None:
    """Refuse an unusable results root before anything is connected, rotated or written."""
    if args.out.exists() and not args.out.is_dir():
        raise RunDirError(f"{args.out}: --out must be a directory, and this is a file")
    if args.rerun_failed and not (args.out / LATEST / "ledger.json").is_file():
        raise RunDirError(
            f"{args.out / LATEST}: no ledger.json to rerun from; run without --rerun-failed first"
        )


def rerun_command(args: argparse.Namespace) -> str:
    """The command that resumes this run, as given (results root, cluster), ready to paste."""
    argv = ["python", "-m", "sweep.run", str(args.manifest), "--out", str(args.out)]
    if args.address:
        argv += ["--address", args.address]
    if args.num_cpus is not None:
        argv += ["--num-cpus", str(args.num_cpus)]
    if args.simulate_missing_devices:
        argv.append("--simulate-missing-devices")
    if args.prompt_files_anywhere:
        argv.append("--prompt-files-anywhere")
    return shlex.join([*argv, "--rerun-failed"])


def _open_run(
    args: argparse.Namespace, manifest: Manifest, previous: Ledger | None
) -> tuple[Path, Ledger]:
    """A fresh run-latest (the old one rotated aside), or the previous run's, to rerun."""
    if previous is None:
        try:
            run_dir = _rotate(args.out)
        except OSError as exc:
            raise RunDirError(f"{args.out}: cannot create the run directory: {exc}") from None
        return run_dir, Ledger.create(run_dir, str(manifest.path))
    previous.data["runs"] = previous.data.get("runs", 1) + 1
    previous.save()
    return args.out / LATEST, previous


def _actor_config(manifest: Manifest, name: str) -> ActorConfig:
    entry = next(m for m in manifest.models if m.name == name)
    o = manifest.options
    return ActorConfig(
        name=name, source=entry.source, dtype=entry.dtype, seed=o.seed, lens=o.lens,
        lenses=o.decoded_lenses,
        keep_layernorm_bias=o.keep_layernorm_bias, top_k=o.top_k, copy_threshold=o.copy_threshold,
        copy_margin=o.copy_margin, temperatures=o.temperatures, prepend_bos=o.prepend_bos,
        keep_residuals=o.keep_residuals, audit=o.audit, cache_dir=str(DEFAULT_CACHE_DIR),
        unembed_precision=entry.unembed_precision or o.unembed_precision,
    )  # fmt: skip


def _largest_batch(manifest: Manifest) -> tuple[int, int]:
    """A batch at least as large as any the actors will see: (rows, tokens per row).

    Tokens per row are bounded by the longest prompt's UTF-8 bytes plus BOS and one spare (a
    byte-level tokenizer never makes more tokens than bytes) and by max_seq_len. A real batch
    (``plan_batches``) holds rows x width <= batch_tokens (a longer prompt goes alone), at most
    batch_size rows and no more than the manifest's prompts; the rows returned cover those
    tokens at the bound's width, so rows x seq and rows x seq^2 (attention) bound the real
    batch's. The driver has no tokenizer: this is an upper bound, not the exact count.
    """
    o = manifest.options
    longest = max(len(p.text.encode("utf-8")) for p in manifest.prompts)
    seq = min(o.max_seq_len, longest + 2)
    rows = min(o.batch_size, len(manifest.prompts))
    tokens = min(rows * seq, max(o.batch_tokens, seq))
    return -(-tokens // seq), seq


def _demands(
    manifest: Manifest, names: list[str], ledger: Ledger, max_gpus: int = 1
) -> list[ModelDemand]:
    """Memory demand per model and device kind; a model whose shape cannot be read fails here.

    A model that may run on CUDA also gets its per-GPU demand split over 2..max_gpus GPUs (the
    most one node has), for when it fits on no single GPU.
    """
    demands = []
    batch, seq = _largest_batch(manifest)
    for m in manifest.models:
        if m.name not in names:
            continue
        try:
            shape = model_shape(m.source, DEFAULT_CACHE_DIR)
        except EstimateError as exc:
            ledger.update(m.name, status="failed", error=str(exc))
            continue
        dtypes = {k: m.dtype or DEFAULT_DTYPE[k] for k in DEVICE_ORDER}
        lenses = translator_bytes(shape, manifest.options.trained_lenses, batch, seq)
        est = {k: estimate_peak_bytes(shape, dtypes[k], batch, seq) + lenses for k in DEVICE_ORDER}
        split = {
            n: tuple(
                b + (lenses if i == 0 else 0)  # the lens device decodes the trained lenses
                for i, b in enumerate(estimate_split_bytes(shape, dtypes["cuda"], batch, seq, n))
            )
            for n in range(2, min(max_gpus, shape.n_layers) + 1)
            if m.device in (None, "cuda")
        }
        weights = {k: shape.n_params * BYTES_PER_PARAM[dtypes[k]] for k in DEVICE_ORDER}
        ledger.update(
            m.name, n_params=shape.n_params, n_layers=shape.n_layers, weights_bytes=weights
        )
        demands.append(ModelDemand(m.name, est, dtypes, m.device, split))
    return demands


def _summary_table(ledger: Ledger) -> str:
    rows = [("model", "status", "device", "detail")]
    for name, e in sorted(ledger.models.items()):
        detail = e.get("error") or (
            f"parity {e['parity_max_abs']:.1e}" if "parity_max_abs" in e else ""
        )
        if e.get("status") in ("failed", "running") and e.get("batches_done"):
            detail += f"; {e['batches_done']}/{e['batches_total']} batches finished and kept"
        elif e.get("batches_resumed"):
            detail += f"; {e['batches_resumed']}/{e['batches_total']} batches resumed"
        if e.get("prompt_failures"):
            refused = [f["prompt_id"] for f in e["prompt_failures"]]
            detail += f"; {len(refused)} prompt(s) refused (longer than the context): "
            detail += ", ".join(refused[:5]) + (" ..." if len(refused) > 5 else "")
        device = str(e.get("device") or "-")
        if e.get("n_gpus", 1) > 1:
            device = f"{e.get('device_kind')} x{e['n_gpus']}"  # a model split over GPUs
        rows.append((name, e.get("status", "?"), device, detail or ""))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3] for r in rows)


def _reports(run_dir: Path) -> None:
    """Reports are derived data: a failure here is reported but loses no result."""
    from sweep.report import build_reports

    try:
        build_reports(run_dir)
    except Exception as exc:  # any bug in a report must not turn a finished sweep into a crash
        print(f"warning: reports failed ({type(exc).__name__}: {exc}); "
              f"retry with: python -m sweep.report {run_dir}", file=sys.stderr)  # fmt: skip


def run(
    args: argparse.Namespace, manifest: Manifest, lenses: TrainedLensSource | None = None
) -> int:
    from sweep.cluster import connect

    _check_out(args)
    with RunLock(args.out):
        # A damaged ledger is one line, exit 2, before anything is connected or changed.
        previous = Ledger.load(args.out / LATEST) if args.rerun_failed else None
        # Connect before touching the results root, so a cluster that cannot be reached leaves
        # the previous run-latest where it was.
        cluster = connect(args.address, args.num_cpus)
        try:
            run_dir, ledger = _open_run(args, manifest, previous)
            try:
                ledger.data["cluster"] = cluster
                write_json(run_dir / "manifest.resolved.json", manifest.resolved())
                write_json(run_dir / "provenance.json", provenance(manifest.options.seed))
                todo = []
                for m in manifest.models:
                    fp = model_fingerprint(manifest, m, lenses)
                    if ledger.is_done(m.name, fp):
                        continue
                    if ledger.models.get(m.name, {}).get("fingerprint") not in (None, fp):
                        # Another configuration: its kept batches will not be reused.
                        ledger.update(m.name, batches_done=None, batches_resumed=None)
                    ledger.update(m.name, status="pending", fingerprint=fp, error=None)
                    todo.append(m.name)
                return _sweep(args, manifest, run_dir, ledger, todo, lenses)
            except BaseException as exc:
                # A full disk may refuse this too: the ledger then keeps its last good state.
                with contextlib.suppress(OSError):
                    _close_unfinished(ledger, exc, rerun_command(args))
                raise
        finally:
            import ray

            ray.shutdown()  # this process connected; leave no Ray behind (a local one stops too)


def _close_unfinished(ledger: Ledger, exc: BaseException, rerun: str) -> None:
    """The driver is stopping early: no model may stay 'pending' or 'running' in the ledger."""
    what = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"{type(exc).__name__}: {exc}"
    for name, entry in ledger.models.items():
        if entry.get("status") in ("pending", "running"):
            ledger.update(
                name, status="failed", error=f"the driver stopped ({what}); resume with: {rerun}"
            )


def _trained_lenses(
    args: argparse.Namespace,
    manifest: Manifest,
    todo: list[str],
    ledger: Ledger,
    lenses: TrainedLensSource,
) -> tuple[dict[str, tuple[tuple[str, bytes], ...]], dict[str, dict[str, Any]]]:
    """Each model's trained lenses: fitted first where missing (sweep.fit, cached under
    OUT/lenses), then read and checked against the model. A model whose lens cannot be had
    fails here, with why; the others go on."""
    from sweep.fit import fit_models, missing_lenses

    kinds = manifest.options.trained_lenses
    entries = [m for m in manifest.models if m.name in todo]
    missing = missing_lenses(entries, kinds, lenses.options, lenses.text["sha256"], args.out)
    if missing:
        print(f"fitting trained lenses first ({args.out / 'lenses'}): "
              + "; ".join(f"{n}: {', '.join(k)}" for n, k in missing.items()))  # fmt: skip
        failed = fit_models(manifest, lenses.options, missing, lenses.docs, lenses.text,
                            args.out, args.no_progress)  # fmt: skip
        for name, why in failed.items():
            ledger.update(name, status="failed", error=f"fitting its trained lenses failed: "
                          f"{why}; rerun: {rerun_command(args)}")  # fmt: skip
    weights: dict[str, tuple[tuple[str, bytes], ...]] = {}
    cards: dict[str, dict[str, Any]] = {}
    for entry in entries:
        if ledger.models.get(entry.name, {}).get("status") == "failed":
            continue
        try:
            shape = model_shape(entry.source, DEFAULT_CACHE_DIR)
            shapes = {"n_lens_layers": shape.n_layers + 1, "d_model": shape.d_model}
            got = {k: load_lens(args.out, entry, k, lenses.options, lenses.text["sha256"], shapes)
                   for k in kinds}  # fmt: skip
        except (LensCardError, FileNotFoundError, EstimateError) as exc:
            ledger.update(entry.name, status="failed", error=str(exc))
            continue
        weights[entry.name] = tuple((k, w) for k, (w, _) in got.items())
        cards[entry.name] = {k: card for k, (_, card) in got.items()}
    return weights, cards


def _sweep(
    args: argparse.Namespace,
    manifest: Manifest,
    run_dir: Path,
    ledger: Ledger,
    todo: list[str],
    lenses: TrainedLensSource | None = None,
) -> int:
    from sweep.cluster import probe_nodes
    from sweep.execute import run_models
    from sweep.merge import merge_run

    weights: dict[str, tuple[tuple[str, bytes], ...]] = {}
    cards: dict[str, dict[str, Any]] = {}
    if lenses is not None and todo:
        weights, cards = _trained_lenses(args, manifest, todo, ledger, lenses)
        todo = [n for n in todo if n in weights]
    nodes = probe_nodes(args.simulate_missing_devices)
    ledger.data["nodes"] = [
        {"node_id": n.node_id, "ip": n.ip, "cpus": n.cpus, "cpu_free_bytes": n.cpu_free_bytes,
         "gpu_free_bytes": list(n.gpu_free_bytes), "mps_free_bytes": n.mps_free_bytes,
         "mps_resource": n.mps_resource, "accelerator_type": n.accelerator_type,
         "simulated": list(n.simulated)}
        for n in nodes
    ]  # fmt: skip
    max_gpus = max((len(n.gpu_free_bytes) for n in nodes), default=1)
    placements = plan(_demands(manifest, todo, ledger, max_gpus), nodes)
    runnable: list[Placement] = []
    for p in placements:
        # Written on every plan, so a rerun overwrites what an earlier plan said.
        fields: dict[str, Any] = {
            "est_bytes": p.est_bytes,
            "est_bytes_per_gpu": list(p.est_bytes_per_gpu) or None,
            "n_gpus": p.n_gpus,
            "plan": p.reason,
        }
        if p.status == "skipped_no_fit":
            ledger.update(p.name, status="skipped_no_fit", error=p.reason, **fields)
            continue
        ledger.update(
            p.name, node_id=p.node_id, node_ip=p.node_ip, device_kind=p.device_kind, cpus=p.cpus,
            **fields,
        )  # fmt: skip
        runnable.append(p)
    configs = [
        replace(
            _actor_config(manifest, p.name),
            device=p.device,
            devices=p.devices,
            simulate_missing_device=p.simulated,
            torch_threads=p.torch_threads,
            translator_weights=weights.get(p.name, ()),
        )
        for p in runnable
    ]
    prov = provenance(manifest.options.seed)

    def context(name: str) -> dict[str, Any]:
        entry = ledger.models[name]
        keys = ("node_id", "node_ip", "device_kind", "n_gpus", "est_bytes", "plan")
        out = {
            "placement": {k: entry.get(k) for k in keys},
            "provenance": prov,
            "fingerprint": entry.get("fingerprint"),
        }
        if name in cards:
            out["trained_lenses"] = cards[name]  # which fitted lens files were decoded
        return out

    if configs:
        run_models(
            configs, {p.name: p.ray_options() for p in runnable}, list(manifest.prompts),
            manifest.options.batch_size, manifest.options.batch_tokens, run_dir, ledger, context,
            progress=not args.no_progress,
            replicas=manifest.options.replicas and not args.no_replicas,
        )  # fmt: skip
    merge_run(run_dir, ledger.models)
    _reports(run_dir)
    ledger.data["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    ledger.save()
    print(_summary_table(ledger))
    print(f"artefacts: {run_dir}")
    bad = [n for n, e in ledger.models.items() if e.get("status") != "ok"]
    if bad:
        print(
            f"{len(bad)} model(s) not ok; fix the cause, then (finished batches are kept): "
            f"{rerun_command(args)}"
        )
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        manifest = load_manifest(args.manifest, prompt_files_anywhere=args.prompt_files_anywhere)
        lenses = trained_lens_source(manifest)
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return run(args, manifest, lenses)
    except RunDirError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ConnectionError as exc:
        print(
            f"error: could not connect to Ray ({args.address or 'RAY_ADDRESS'}): {exc}",
            file=sys.stderr,
        )
        return 2
    except OSError as exc:  # the driver's own files (ledger, merged tables): a full disk, say
        print(
            f"error: writing the run's files under {args.out} failed ({exc}); finished models' "
            f"files are kept. Make room or fix the directory, then: {rerun_command(args)}",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print(
            f"interrupted: finished models are kept; resume with: {rerun_command(args)}",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
