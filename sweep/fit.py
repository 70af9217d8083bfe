"""python -m sweep.fit MANIFEST: fit trained lenses (tuned lens, prism) for the manifest's models.

Each model is placed like a sweep's (sweep/placement.py) and fitted by one Ray actor
(actors/fit_actor.py); models fit in parallel. The driver owns every file:

    <out>/lenses/<model>/<lens>-<key>/lens.safetensors   the translator's weights
    <out>/lenses/<model>/<lens>-<key>/card.json          what it was fitted on, how, and how well
    <out>/lenses/<model>/<lens>-<key>/checkpoint.*       while fitting (weights, optimiser, step)

<key> hashes the model's identity (source, dtype), the [fit] settings and the text's sha256: a
lens with the same key is never fitted again, a changed setting fits a new one beside it. A
killed fit resumes from its last checkpoint on the next run and ends with the weights an
uninterrupted fit would have (steps draw their rows from (seed, step) alone).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Generator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from sweep.errors import ManifestError, RunDirError
from sweep.files import write_bytes, write_json
from sweep.fit_options import FitOptions, auto_rank, load_fit_options, read_documents
from sweep.manifest import Manifest, ModelEntry, load_manifest

CARD_VERSION = 1
LENS_FILE, CARD_FILE = "lens.safetensors", "card.json"
CHECKPOINT_FILE, CHECKPOINT_CARD = "checkpoint.safetensors", "checkpoint.json"


class LensCardError(ValueError):
    """A lens card that does not belong to the model it is asked to decode."""


def model_identity(entry: ModelEntry) -> str:
    """What a lens is fitted to: the model's weights (source, dtype), not the sweep's options."""
    payload = {"source": asdict(entry.source), "dtype": entry.dtype}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def lens_key(entry: ModelEntry, kind: str, options: FitOptions, text_sha256: str) -> str:
    payload = {"model": model_identity(entry), "kind": kind, "fit": options.key_fields(),
               "text": text_sha256, "card_version": CARD_VERSION}  # fmt: skip
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def lens_dir(out: Path, model: str, kind: str, key: str) -> Path:
    return out / "lenses" / model / f"{kind}-{key}"


def check_card(card: dict[str, Any], model: str, identity: str, shapes: dict[str, int]) -> None:
    """Refuse a card fitted to another model or another shape, saying which and what to do."""
    problems = []
    if card.get("model_identity") != identity:
        problems.append(f"it was fitted to model identity {card.get('model_identity')!r} "
                        f"({card.get('model')!r}), this model's is {identity!r}")  # fmt: skip
    for key, want in shapes.items():
        if card.get(key) != want:
            problems.append(f"{key} {card.get(key)!r} != the model's {want}")
    if problems:
        raise LensCardError(
            f"lens card {card.get('kind')}-{card.get('key')} does not match model {model!r}: "
            + "; ".join(problems)
            + ". Refit it: python -m sweep.fit MANIFEST"
        )


def read_card(folder: Path) -> dict[str, Any] | None:
    """The card of a finished lens (its weights there too), else None."""
    card, weights = folder / CARD_FILE, folder / LENS_FILE
    if not (card.is_file() and weights.is_file()):
        return None
    try:
        data = json.loads(card.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None  # damaged: fitted again
    return data if isinstance(data, dict) and data.get("card_version") == CARD_VERSION else None


def resolve_rank(options: FitOptions, d_model: int) -> int | None:
    """The tuned lens's rank; None is full (``auto_rank`` for "auto")."""
    if options.rank == "auto":
        return auto_rank(d_model)
    if options.rank == "full":
        return None
    return min(int(options.rank), d_model)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformer-lens", "transformers", "ray", "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def fit_extra_bytes(options: FitOptions, n_layers: int, d_model: int, d_vocab: int) -> int:
    """Memory a fit needs beyond the lens pass's estimate: cached residuals, the translators
    with their gradients and optimiser moments, and a step's logits (forward and backward)."""
    rows = options.train_tokens + options.heldout_tokens
    resid = rows * (n_layers + 1) * d_model * 4
    tuned = (n_layers + 1) * (d_model * d_model + d_model) * 4 * 4
    logits = options.batch_rows * d_vocab * 4 * (3 * min(options.layers_per_step, n_layers) + 2)
    return resid + tuned + logits


@dataclass
class _Job:
    name: str
    entry: ModelEntry
    kinds: list[str]
    actor: Any = None
    bar: Any = None
    result: dict[str, Any] = field(default_factory=dict)


def _fit_model(job: _Job, options: FitOptions, docs: list[str], text: dict[str, Any],
               out: Path) -> Generator[Any, Any, None]:  # fmt: skip
    """One model's fit as a sequence of actor calls (yielded refs; the results come back in)."""
    info = yield job.actor.prepare.remote(docs, options.seq_len, options.train_tokens,
                                          options.heldout_tokens)  # fmt: skip
    shapes = {k: info[k] for k in ("n_lens_layers", "d_model", "d_vocab")}
    rank = resolve_rank(options, info["d_model"])
    baseline = yield job.actor.evaluate.remote("final", None, None)
    settings = {k: getattr(options, k) for k in
                ("steps", "lr", "batch_rows", "layers_per_step", "weight_decay",
                 "precision")}  # fmt: skip
    settings["seed"] = options.seed
    for kind in job.kinds:
        key = lens_key(job.entry, kind, options, text["sha256"])
        folder = lens_dir(out, job.name, kind, key)
        folder.mkdir(parents=True, exist_ok=True)
        state, start = _checkpoint(folder, key)
        losses: list[float] = list(start.get("losses", []))
        resumed_from = int(start.get("step", 0))
        step = resumed_from
        t0 = time.perf_counter()
        job.bar.set_description(f"{job.name} {kind}")
        job.bar.reset(total=options.steps)
        job.bar.update(step)
        while step < options.steps:
            until = min(options.steps, step + options.checkpoint_every)
            r = yield job.actor.fit.remote(kind, settings, rank if kind == "tuned" else None,
                                           state, until)  # fmt: skip
            state, losses = r["state"], losses + r["losses"]
            write_bytes(folder / CHECKPOINT_FILE, state)
            write_json(folder / CHECKPOINT_CARD, {"key": key, "step": r["step"], "losses": losses,
                                                  "sha256": _sha256(state)})  # fmt: skip
            job.bar.update(r["step"] - step)
            job.bar.set_postfix(loss=f"{losses[-1]:.3f} bits")
            step = r["step"]
        quality = yield job.actor.evaluate.remote(kind, rank if kind == "tuned" else None, state)
        card = {
            "card_version": CARD_VERSION, "kind": kind, "key": key, "model": job.name,
            "model_identity": model_identity(job.entry), **shapes,
            "rank": ("full" if rank is None else rank) if kind == "tuned" else "d (orthogonal)",
            "fit": {**options.key_fields(), "lenses": None},
            "text": text, "data": {k: info[k] for k in
                                   ("tokens_read", "sequences", "train_sequences", "train_rows",
                                    "heldout_rows", "positions", "token_sha256", "bos")},
            "steps": step, "resumed_from_step": resumed_from or None,
            "fit_seconds_this_run": time.perf_counter() - t0,
            "loss_bits": losses,
            "heldout_kl_bits_by_layer": {"final": baseline["kl_bits_by_layer"],
                                         kind: quality["kl_bits_by_layer"]},
            **{k: v for k, v in quality.items()
               if k not in ("kind", "kl_bits_by_layer", "weights")},
            "versions": _versions(),
        }  # fmt: skip
        write_bytes(folder / LENS_FILE, quality["weights"])
        write_json(folder / CARD_FILE, card)  # last: a card means the lens is whole
        for name in (CHECKPOINT_FILE, CHECKPOINT_CARD):
            (folder / name).unlink(missing_ok=True)
        job.result[kind] = {"folder": str(folder), "mean_kl_bits": _mean_kl(card, kind),
                            "final_mean_kl_bits": _mean_kl(card, "final")}  # fmt: skip


def _mean_kl(card: dict[str, Any], kind: str) -> float:
    """Mean held-out KL over the lens layers but the last (where the final lens is exact)."""
    kl = card["heldout_kl_bits_by_layer"][kind][:-1]
    return sum(kl) / len(kl) if kl else 0.0


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _checkpoint(folder: Path, key: str) -> tuple[bytes | None, dict[str, Any]]:
    """The checkpoint a killed fit left (its state and card), if it belongs to this key and the
    state is the one the card (written after it) describes."""
    try:
        card = json.loads((folder / CHECKPOINT_CARD).read_text(encoding="utf-8"))
        state = (folder / CHECKPOINT_FILE).read_bytes()
    except (OSError, ValueError):
        return None, {}
    if isinstance(card, dict) and card.get("key") == key and card.get("sha256") == _sha256(state):
        return state, card
    return None, {}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m sweep.fit",
        description="Fit trained lenses (tuned lens, prism) for a manifest's models, as Ray "
        "actors; cached under OUT/lenses by model, settings and text.",
    )
    p.add_argument("manifest", type=Path)
    p.add_argument("--out", type=Path, default=Path("results"), help="results root")
    p.add_argument("--models", nargs="+", metavar="NAME", help="only these models")
    p.add_argument("--address", default=None, help="a Ray cluster to join (default: local)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def missing_lenses(entries: list[ModelEntry], kinds: tuple[str, ...], options: FitOptions,
                   text_sha256: str, out: Path) -> dict[str, list[str]]:  # fmt: skip
    """The trained lenses each model still lacks (no whole lens under ``out`` for its key)."""
    todo: dict[str, list[str]] = {}
    for entry in entries:
        lacking = [k for k in kinds
                   if read_card(lens_dir(out, entry.name, k,
                                         lens_key(entry, k, options, text_sha256))) is None]  # fmt: skip
        if lacking:
            todo[entry.name] = lacking
    return todo


def run_fit(args: argparse.Namespace, manifest: Manifest, options: FitOptions) -> int:
    from sweep.cluster import connect

    entries = [m for m in manifest.models if not args.models or m.name in args.models]
    unknown = sorted(set(args.models or ()) - {m.name for m in manifest.models})
    if unknown:
        print(f"error: no such model(s) in the manifest: {', '.join(unknown)}", file=sys.stderr)
        return 2
    docs, text = read_documents(options, manifest.path.parent)
    todo = missing_lenses(entries, options.lenses, options, text["sha256"], args.out)
    for entry in entries:
        if entry.name not in todo:
            print(f"{entry.name}: {', '.join(options.lenses)} already fitted (cached)")
    if not todo:
        return 0
    connect(args.address, args.num_cpus)
    try:
        failed = fit_models(manifest, options, todo, docs, text, args.out, args.no_progress)
        for name, why in failed.items():
            print(f"{name}: fit failed: {why}. Rerun the same command: finished lenses are "
                  "kept and an interrupted fit resumes from its last checkpoint", file=sys.stderr)  # fmt: skip
        return 1 if failed else 0
    finally:
        import ray

        ray.shutdown()


def fit_models(manifest: Manifest, options: FitOptions, todo: dict[str, list[str]],
               docs: list[str], text: dict[str, Any], out: Path,
               no_progress: bool = False) -> dict[str, str]:  # fmt: skip
    """Fit the lenses ``todo`` names (model -> kinds) on a connected Ray, one actor per model,
    in parallel; prints each lens's held-out quality. Returns why each failed model failed.
    The actors are gone when this returns (a sweep places its own next)."""
    import ray
    from tqdm import tqdm

    from actors.fit_actor import FitActor
    from actors.sources import DEFAULT_CACHE_DIR
    from sweep.cluster import probe_nodes
    from sweep.estimate import EstimateError, model_shape
    from sweep.execute import explain_failure, with_worker_env
    from sweep.ledger import Ledger
    from sweep.placement import ModelDemand, plan
    from sweep.run import _actor_config, _demands

    jobs = [_Job(m.name, m, todo[m.name]) for m in manifest.models if m.name in todo]
    fit_root = out / "lenses"
    fit_root.mkdir(parents=True, exist_ok=True)
    # The planner records each model's shape (or why it could not be read) in a ledger.
    ledger = Ledger.create(fit_root / ".last-fit", str(manifest.path))
    nodes = probe_nodes()
    demands = []
    for d in _demands(manifest, [j.name for j in jobs], ledger,
                      max((len(n.gpu_free_bytes) for n in nodes), default=1)):  # fmt: skip
        try:
            shape = model_shape(next(j.entry for j in jobs if j.name == d.name).source,
                                DEFAULT_CACHE_DIR)  # fmt: skip
        except EstimateError:  # _demands read it a moment ago; a vanished file fails below
            continue
        extra = fit_extra_bytes(options, shape.n_layers, shape.d_model, shape.d_vocab)
        demands.append(ModelDemand(d.name, {k: v + extra for k, v in d.est_bytes.items()},
                                   d.dtype, d.device))  # fmt: skip
    placements = {p.name: p for p in plan(demands, nodes)}
    failed: dict[str, str] = {}
    running: dict[Any, tuple[_Job, Generator[Any, Any, None]]] = {}
    try:
        for position, job in enumerate(jobs):
            p = placements.get(job.name)
            if p is None or p.status == "skipped_no_fit":
                failed[job.name] = (
                    p.reason if p is not None
                    else ledger.models.get(job.name, {}).get("error", "its shape is unknown")
                )  # fmt: skip
                continue
            config = replace(_actor_config(manifest, job.name), device=p.device,
                             devices=p.devices, torch_threads=p.torch_threads,
                             simulate_missing_device=p.simulated, lenses=(),
                             translator_weights=())  # fmt: skip
            job.actor = (
                ray.remote(FitActor).options(**with_worker_env(p.ray_options())).remote(config)
            )
            job.bar = tqdm(total=options.steps, desc=job.name, position=position,
                           disable=no_progress, leave=True)  # fmt: skip
            flow = _fit_model(job, options, docs, text, out)
            running[next(flow)] = (job, flow)
        while running:
            ready, _ = ray.wait(list(running), num_returns=1)
            job, flow = running.pop(ready[0])
            try:
                value = ray.get(ready[0])
                running[flow.send(value)] = (job, flow)
            except StopIteration:
                job.bar.close()
            except Exception as exc:  # an actor's error, its death, out of memory: that model
                failed[job.name] = explain_failure(exc)
                job.bar.close()
    finally:
        for job in jobs:
            if job.actor is not None:
                ray.kill(job.actor)
    for job in jobs:
        for kind, r in job.result.items():
            cut = r["final_mean_kl_bits"] / r["mean_kl_bits"] if r["mean_kl_bits"] else 0.0
            print(f"{job.name} {kind}: held-out mean KL {r['mean_kl_bits']:.3f} bits "
                  f"(final-norm lens {r['final_mean_kl_bits']:.3f}, {cut:.1f}x lower) -> "
                  f"{r['folder']}")  # fmt: skip
    return failed


def load_lens(out: Path, entry: ModelEntry, kind: str, options: FitOptions, text_sha256: str,
              shapes: dict[str, int]) -> tuple[bytes, dict[str, Any]]:  # fmt: skip
    """A fitted lens's weights and what a run records of it, after its card is checked against
    the model (identity and shape); LensCardError if it does not belong, FileNotFoundError if
    it is not there."""
    key = lens_key(entry, kind, options, text_sha256)
    folder = lens_dir(out, entry.name, kind, key)
    card = read_card(folder)
    if card is None:
        raise FileNotFoundError(f"no fitted {kind} lens at {folder}; fit it: python -m sweep.fit")
    check_card(card, entry.name, model_identity(entry), shapes)
    weights = (folder / LENS_FILE).read_bytes()
    return weights, {
        "kind": kind, "key": key, "folder": str(folder), "weights_sha256": _sha256(weights),
        "steps": card.get("steps"), "rank": card.get("rank"),
        "heldout_mean_kl_bits": _mean_kl(card, kind),
        "final_lens_heldout_mean_kl_bits": _mean_kl(card, "final"),
        "text": card.get("text", {}).get("text"),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        manifest = load_manifest(args.manifest)
        options = load_fit_options(manifest.path, manifest.options.seed)
        return run_fit(args, manifest, options)
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunDirError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the driver's own files: a full disk, a folder it may not write
        print(
            f"error: writing under {args.out / 'lenses'} failed ({exc}); finished lenses and the "
            "last checkpoints are kept. Fix it, then run the same command again",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        print("interrupted: finished lenses and the last checkpoints are kept; run the same "
              "command again to resume", file=sys.stderr)  # fmt: skip
        return 130


if __name__ == "__main__":
    sys.exit(main())
