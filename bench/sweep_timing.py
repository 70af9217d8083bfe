"""Timing one sweep run end to end in a fresh interpreter, through Ray or in one process.

The measured process (``child``) runs either the driver's ``sweep.run.main()`` or the same
models, prompts and batches in itself, one ``LensActor`` after the other, with light
instrumentation: time stamps around the driver's phases, and a wrapper (``TracedLensActor``)
that logs when each actor call starts and ends where it runs. The parent (``run_variant``)
starts it, waits, and reads those stamps and events into phases and per-model time lines.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TRACE_ENV = "LENS_SWEEP_BENCH_TRACE"
Stamps = dict[str, Any]


def one_variant(threads: str) -> str:
    """The variant name of one process at ``threads`` ("all": torch's default)."""
    return "one" if threads == "all" else f"one@{threads}"


def label(variant: str) -> str:
    if variant == "ray":
        return "Ray"
    threads = variant.partition("@")[2]
    return f"one process, {threads} thread(s)" if threads else "one process"


# ---- instrumentation, in the measured processes ------------------------------------------------


def _trace(model: str, event: str, t: float | None = None, **fields: Any) -> None:
    """Append one event to this process's trace file (no-op unless TRACE_ENV names a folder)."""
    folder = os.environ.get(TRACE_ENV)
    if not folder:
        return
    line = {"model": model, "event": event, "t": time.time() if t is None else t, **fields}
    with open(Path(folder) / f"trace-{os.getpid()}.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


class TracedLensActor:
    """``LensActor`` behind a wrapper that logs its imports, load and calls with wall times.

    Importable by reference (Ray pickles it by name). It imports the actor module itself, so a
    worker's import of torch and TransformerLens is timed instead of hidden in unpickling.
    """

    def __init__(self, config: Any) -> None:
        self.name = config.name
        _trace(self.name, "init_entered")
        lens_actor = importlib.import_module("actors.lens_actor")
        _trace(self.name, "lens_actor_imported")
        importlib.import_module("transformer_lens.model_bridge")
        _trace(self.name, "transformer_lens_imported")
        if lens_actor.LensActor is TracedLensActor:  # the driver's patch, seen in its process
            raise RuntimeError("actors.lens_actor.LensActor is patched here: cannot wrap it")
        self.actor = lens_actor.LensActor(config)
        import torch

        _trace(self.name, "loaded", torch_threads=torch.get_num_threads(),
               omp_num_threads=os.environ.get("OMP_NUM_THREADS"))  # fmt: skip

    def run_batch(self, prompts: list[Any]) -> Any:
        t0 = time.time()
        result = self.actor.run_batch(prompts)
        _trace(self.name, "batch", start=t0, n_prompts=len(prompts))
        return result

    def token_lengths(self, prompts: list[Any]) -> list[int]:
        return self.actor.token_lengths(prompts)

    def diagnostics(self) -> dict[str, Any]:
        t0 = time.time()
        result = self.actor.diagnostics()
        _trace(self.name, "diagnostics", start=t0)
        return result


def _stamped(stamps: Stamps, key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` recording the wall time of its first call's start and end as key_start / key_end."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        stamps.setdefault(f"{key}_start", time.time())
        try:
            return fn(*args, **kwargs)
        finally:
            stamps.setdefault(f"{key}_end", time.time())

    return wrapper


def _stamp_sinks(stamps: Stamps) -> None:
    """Time the driver's artefact writing per model: batches appended, files committed."""
    from sweep.artefacts import ModelArtefacts

    add, commit = ModelArtefacts.add, ModelArtefacts.commit
    added, committed = stamps.setdefault("sink_add_s", {}), stamps.setdefault("committed", {})

    # Arguments passed through as they come: the sink's signature may grow (it did once, and
    # every Ray run of this bench failed at its first batch).
    def timed_add(self: Any, *args: Any, **kwargs: Any) -> None:
        t0 = time.time()
        add(self, *args, **kwargs)
        added[self.name] = added.get(self.name, 0.0) + time.time() - t0

    def timed_commit(self: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.time()
        files = commit(self, *args, **kwargs)
        committed[self.name] = {"start": t0, "end": time.time()}
        return files

    ModelArtefacts.add = timed_add  # type: ignore[method-assign]
    ModelArtefacts.commit = timed_commit  # type: ignore[method-assign]


def _child_ray(manifest: str, out: str, extra: list[str], stamps: Stamps) -> int:
    """The driver's main(), with time stamps around its phases and the traced actor class.

    Ray is imported here, before main(), so that ray.init and ray.shutdown can be timed; the
    driver would import it in connect() anyway.
    """
    import sweep.cluster
    import sweep.execute
    import sweep.merge
    import sweep.run

    stamps["imported"] = time.time()
    import ray

    stamps["ray_imported"] = time.time()
    ray.init = _stamped(stamps, "ray_init", ray.init)
    ray.shutdown = _stamped(stamps, "shutdown", ray.shutdown)
    run_models = sweep.execute.run_models

    def traced_run_models(*args: Any, **kwargs: Any) -> Any:
        stamps["run_models_start"] = time.time()
        lens_actor = importlib.import_module("actors.lens_actor")
        stamps["actor_module_imported"] = time.time()
        plain, lens_actor.LensActor = lens_actor.LensActor, TracedLensActor
        try:
            return run_models(*args, **kwargs)
        finally:
            lens_actor.LensActor = plain
            stamps["run_models_end"] = time.time()

    sweep.cluster.connect = _stamped(stamps, "connect", sweep.cluster.connect)
    sweep.cluster._local_has_mps = _stamped(stamps, "mps", sweep.cluster._local_has_mps)
    sweep.cluster.probe_nodes = _stamped(stamps, "probe", sweep.cluster.probe_nodes)
    sweep.execute.run_models = traced_run_models
    sweep.merge.merge_run = _stamped(stamps, "merge", sweep.merge.merge_run)
    sweep.run._reports = _stamped(stamps, "reports", sweep.run._reports)
    sweep.run._sweep = _stamped(stamps, "sweep", sweep.run._sweep)
    _stamp_sinks(stamps)
    return sweep.run.main([manifest, "--out", out, "--no-progress", *extra])


def _child_one(manifest_path: str, out: str, threads: str, stamps: Stamps) -> int:
    """The same models, prompts, batches and artefacts, in this one process, one model at a time."""
    import sweep.merge
    import sweep.run
    from actors.prompts import batch_prompts
    from sweep.artefacts import ModelArtefacts
    from sweep.files import write_json
    from sweep.ledger import Ledger, now
    from sweep.manifest import load_manifest
    from sweep.provenance import provenance

    stamps["imported"] = time.time()
    _stamp_sinks(stamps)
    manifest = load_manifest(Path(manifest_path))
    run_dir = Path(out) / sweep.run.LATEST
    run_dir.mkdir(parents=True)
    ledger = Ledger.create(run_dir, str(manifest.path))
    write_json(run_dir / "manifest.resolved.json", manifest.resolved())
    prov = provenance(manifest.options.seed)
    write_json(run_dir / "provenance.json", prov)
    stamps["setup_end"] = time.time()
    importlib.import_module("actors.lens_actor")
    if threads:
        importlib.import_module("torch").set_num_threads(int(threads))
    stamps["actor_module_imported"] = time.time()
    batches = batch_prompts(list(manifest.prompts), manifest.options.batch_size)
    for entry in manifest.models:
        name, fingerprint = entry.name, manifest.fingerprint(entry)
        ledger.update(name, status="running", fingerprint=fingerprint, started_at=now())
        sink = ModelArtefacts(run_dir, name)
        actor = TracedLensActor(sweep.run._actor_config(manifest, name))
        for batch in batches:
            sink.add(actor.run_batch(batch))
        diag = actor.diagnostics()
        context = {"placement": {"node": "local", "device_kind": "cpu"}, "provenance": prov,
                   "fingerprint": fingerprint}  # fmt: skip
        files = sink.commit(diag, context)
        ledger.update(name, status="ok", finished_at=now(), dtype=diag["dtype"]["compute"],
                      device=diag["device"], artefacts=files,
                      torch_threads=diag.get("torch_threads"))  # fmt: skip
        del actor
    stamps["models_end"] = time.time()
    _stamped(stamps, "merge", sweep.merge.merge_run)(run_dir, ledger.models)
    _stamped(stamps, "reports", sweep.run._reports)(run_dir)
    ledger.data["finished_at"] = now()
    ledger.save()
    return 0


def child(argv: list[str]) -> int:
    """Entry of a measured process: VARIANT MANIFEST OUT TRACE_DIR LAUNCH_TIME [DRIVER ARGS...]."""
    entered = time.time()
    variant, manifest, out, trace_dir, launched, *extra = argv
    os.environ[TRACE_ENV] = trace_dir
    stamps: Stamps = {"launch": float(launched), "entered": entered}
    try:
        if variant == "ray":
            return _child_ray(manifest, out, extra, stamps)
        return _child_one(manifest, out, variant.partition("@")[2], stamps)
    finally:
        stamps["main_end"] = time.time()
        (Path(trace_dir) / "driver.json").write_text(json.dumps(stamps), encoding="utf-8")


# ---- reading a measured run --------------------------------------------------------------------


@dataclass
class ModelTimes:
    """One model's time line in one run, in seconds; threads as the wrapper saw them."""

    torch_threads: int | None = None
    omp_num_threads: str | None = None
    submit_to_init: float = 0.0  # actor submitted (one process: constructor called) -> __init__
    import_actor: float = 0.0  # import actors.lens_actor (torch, pyarrow, lens_kernel)
    import_tl: float = 0.0  # import transformer_lens.model_bridge
    load: float = 0.0  # LensActor(config): source, weights, bridge boot, lens setup
    batches: float = 0.0  # run_batch calls, summed over the model's actors, where they run
    n_batches: int = 0
    replicas: int = 0  # actors the driver added to the model on cores others left
    diagnostics: float = 0.0
    sink_add: float = 0.0  # the driver appending batches to Parquet
    commit: float = 0.0  # the driver's per-model Parquet close, CSVs and JSON
    span: float = 0.0  # submitted -> files committed

    @property
    def other(self) -> float:
        """Span not in the parts above: waiting on results (round trips, queueing, CPU); with
        replicas their batches overlap the first actor's, and this goes negative."""
        parts = (self.submit_to_init, self.import_actor, self.import_tl, self.load, self.batches,
                 self.diagnostics, self.sink_add, self.commit)  # fmt: skip
        return self.span - sum(parts)


@dataclass
class VariantRun:
    variant: str
    wall_s: float
    phases: dict[str, float]
    models: dict[str, ModelTimes]
    ledger: dict[str, Any] = field(default_factory=dict)


def driver_phases(variant: str, s: Stamps, exited: float) -> dict[str, float]:
    """Wall seconds per phase from a measured process's stamps; ``exited``: seen by the parent.

    "rest" is what no stamp covers (the driver's own bookkeeping between phases).
    """

    def span(a: str, b: str) -> float:
        return float(s[b]) - float(s[a]) if a in s and b in s else 0.0

    ray = variant == "ray"
    phases = {
        "interpreter start + bench import": span("launch", "entered"),
        "driver imports (sweep, manifest)": span("entered", "imported"),
        "import ray": span("imported", "ray_imported"),
        "MPS check (imports torch)": span("mps_start", "mps_end"),
        "ray.init (local Ray start)": span("ray_init_start", "ray_init_end"),
        "run setup (ledger, provenance)": span("connect_end", "sweep_start")
        if ray
        else span("imported", "setup_end"),
        "probe nodes": span("probe_start", "probe_end"),
        "plan (GGUF headers, placement)": span("probe_end", "run_models_start"),
        "import actors.lens_actor": span("run_models_start" if ray else "setup_end",
                                         "actor_module_imported"),
        "models (actors, batches, artefacts)": span("actor_module_imported",
                                                    "run_models_end" if ray else "models_end"),
        "merge (cross-model tables)": span("merge_start", "merge_end"),
        "reports (markdown, plots, bundles)": span("reports_start", "reports_end"),
        "ray.shutdown": span("shutdown_start", "shutdown_end"),
        "interpreter exit": exited - float(s["main_end"]),
    }  # fmt: skip
    phases["rest"] = exited - float(s["launch"]) - sum(phases.values())
    return phases


def model_times(
    events: list[dict[str, Any]], stamps: Stamps, submitted: float | None
) -> dict[str, ModelTimes]:
    """Per model, from the wrapper's events and the driver's stamps; ``submitted``: when the
    driver created the actors (Ray), None where each model starts at its constructor."""
    by_model: dict[str, dict[str, Any]] = {}
    starts: dict[str, int] = {}
    for e in sorted(events, key=lambda e: e["t"]):
        slot = by_model.setdefault(e["model"], {"batches": []})
        if e["event"] == "batch":
            slot["batches"].append(e["t"] - e["start"])
        else:
            # The model's first actor's time line; a replica's start is counted, not timed.
            slot.setdefault(e["event"], e)
            starts[e["model"]] = starts.get(e["model"], 0) + (e["event"] == "init_entered")
    out = {}
    for name, ev in by_model.items():
        t = {k: v["t"] for k, v in ev.items() if isinstance(v, dict)}
        start = submitted if submitted is not None else t["init_entered"]
        committed = stamps.get("committed", {}).get(name, {})
        loaded = ev.get("loaded", {})
        out[name] = ModelTimes(
            torch_threads=loaded.get("torch_threads"),
            omp_num_threads=loaded.get("omp_num_threads"),
            submit_to_init=t["init_entered"] - start,
            import_actor=t["lens_actor_imported"] - t["init_entered"],
            import_tl=t["transformer_lens_imported"] - t["lens_actor_imported"],
            load=t.get("loaded", t["transformer_lens_imported"]) - t["transformer_lens_imported"],
            batches=sum(ev["batches"]),
            n_batches=len(ev["batches"]),
            replicas=max(0, starts.get(name, 1) - 1),
            diagnostics=t["diagnostics"] - ev["diagnostics"]["start"] if "diagnostics" in t else 0,
            sink_add=stamps.get("sink_add_s", {}).get(name, 0.0),
            commit=committed.get("end", 0.0) - committed.get("start", 0.0),
            span=committed.get("end", start) - start,
        )
    return out


def read_run(variant: str, trace: Path, wall_s: float, exited: float, run_dir: Path) -> VariantRun:
    stamps = json.loads((trace / "driver.json").read_text(encoding="utf-8"))
    events = [
        json.loads(line)
        for path in sorted(trace.glob("trace-*.jsonl"))
        for line in path.read_text(encoding="utf-8").splitlines()
    ]
    submitted = stamps.get("actor_module_imported") if variant == "ray" else None
    ledger_path = run_dir / "ledger.json"
    ledger = json.loads(ledger_path.read_text(encoding="utf-8")) if ledger_path.is_file() else {}
    phases = driver_phases(variant, stamps, exited)
    return VariantRun(variant, wall_s, phases, model_times(events, stamps, submitted), ledger)


def run_variant(
    variant: str, manifest: Path, root: Path, driver_args: list[str], timeout_s: float
) -> VariantRun:
    """One end-to-end run in a fresh interpreter; its files go under ``root``."""
    out, trace, log = root / "out", root / "trace", root / "log.txt"
    trace.mkdir(parents=True)
    code = "import sys; from bench.sweep_timing import child; sys.exit(child(sys.argv[1:]))"
    # Ray's workers import this module (the traced actor) from the repository.
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONPATH": path, "TRANSFORMERS_VERBOSITY": "error"}
    with open(log, "w", encoding="utf-8") as log_file:
        launched, t0 = time.time(), time.perf_counter()
        argv = [variant, str(manifest), str(out), str(trace), repr(launched), *driver_args]
        proc = subprocess.Popen([sys.executable, "-c", code, *argv], cwd=REPO, env=env,
                                stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # its own session: the driver and the local Ray it started
            proc.wait()
            raise RuntimeError(f"{label(variant)}: over {timeout_s:.0f} s; log {log}") from None
        wall, exited = time.perf_counter() - t0, time.time()
    if rc != 0:
        tail = "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-25:])
        raise RuntimeError(f"{label(variant)} run exited {rc}:\n{tail}")
    return read_run(variant, trace, wall, exited, out / "run-latest")


def run_once_more(
    variant: str, manifest: Path, root: Path, driver_args: list[str], timeout_s: float
) -> VariantRun:
    """``run_variant``, tried a second time after a failure (on a shared machine Ray's memory
    monitor may kill an actor that another process crowded out); a second failure raises."""
    try:
        return run_variant(variant, manifest, root, driver_args, timeout_s)
    except RuntimeError as exc:
        print(f"  {label(variant)} failed, running it again: {exc}", file=sys.stderr)
    finally:
        shutil.rmtree(root / "out", ignore_errors=True)
    retry = root.with_name(f"{root.name}-retry")
    try:
        return run_variant(variant, manifest, retry, driver_args, timeout_s)
    finally:
        shutil.rmtree(retry / "out", ignore_errors=True)
