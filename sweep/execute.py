"""Running planned models as Ray actors: batches planned by tokens, made durable as they finish,
resumed at the batch."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors.config import WORKER_ENV, ActorConfig
from actors.prompts import PromptSpec, plan_batches
from sweep.artefacts import ModelArtefacts
from sweep.ledger import Ledger, now

MAX_IN_FLIGHT = 2  # batches queued per actor: keeps it busy without piling results up


@dataclass
class _Job:
    """One model in flight: its actors, its planned batches and how far it has come.

    ``actors[0]`` counted the prompts and planned; later ones are replicas, started on CPU cores
    a finished model left (see ``replica_pays``). Every actor runs on the same number of threads,
    so a batch's results do not depend on which one ran it."""

    name: str
    sink: ModelArtefacts
    batches: list[list[PromptSpec]] = field(default_factory=list)
    todo: list[int] = field(default_factory=list)  # planned batches still to run, in order
    submitted: int = 0  # of todo
    done: int = 0  # batches durable, resumed ones included
    bar: Any = None  # this model's progress bar, once its batches are planned
    started: float = field(default_factory=time.perf_counter)
    planned_at: float | None = None  # when the first actor had counted the prompts
    actors: list[Any] = field(default_factory=list)  # those taking batches
    in_flight: list[int] = field(default_factory=list)  # batches queued on each of ``actors``
    ran: list[int] = field(default_factory=list)  # batches each of ``actors`` returned
    starting: list[Any] = field(default_factory=list)  # replicas not yet ready
    diagnostics: dict[int, dict[str, Any]] = field(default_factory=dict)  # per actor, at the end

    @property
    def unsubmitted(self) -> int:
        return len(self.todo) - self.submitted


def replica_pays(unsubmitted: int, batch_s: float, start_s: float, actors: int) -> bool:
    """Whether another actor of a model would still find work when ready: its batches not yet
    sent take ``unsubmitted * batch_s / actors`` on the actors it has, a new one is ready after
    about ``start_s`` (what the first took: worker, imports, load) and then runs whole batches."""
    return unsubmitted > 0 and unsubmitted * batch_s / max(1, actors) > start_s + batch_s


def merged_diagnostics(per_actor: list[dict[str, Any]]) -> dict[str, Any]:
    """One model's diagnostics from its actors (the first leads): time in batches and batch
    counts summed, each replica's own figures listed under ``replicas``."""
    first, rest = per_actor[0], per_actor[1:]
    if not rest:
        return first
    timings = dict(first.get("timings", {}))
    timings["lens_s"] = sum(d.get("timings", {}).get("lens_s", 0.0) for d in per_actor)
    return {
        **first,
        "timings": timings,
        "batches": sum(d.get("batches", 0) for d in per_actor),
        "replicas": [
            {"batches": d.get("batches", 0), "timings": d.get("timings", {})} for d in rest
        ],
    }


def with_worker_env(options: dict[str, Any]) -> dict[str, Any]:
    """Actor options whose runtime env carries WORKER_ENV, set before the worker touches CUDA.

    Ray merges an actor's env_vars over the job's, so a job's own runtime env still applies.
    """
    runtime_env = dict(options.get("runtime_env") or {})
    runtime_env["env_vars"] = {**WORKER_ENV, **runtime_env.get("env_vars", {})}
    return {**options, "runtime_env": runtime_env}


def explain_failure(exc: BaseException) -> str:
    """One line saying what went wrong in an actor and, where we can tell, what to do."""
    import ray.exceptions as rex

    cause = getattr(exc, "cause", None)
    root = cause if isinstance(cause, BaseException) else exc
    lines = [t.strip() for t in str(root).splitlines() if t.strip()]
    first = lines[0] if lines else type(root).__name__
    if isinstance(exc, rex.OutOfMemoryError) or "out of memory" in str(root).lower():
        hint = "lower batch_tokens or batch_size, use a half dtype, or place it elsewhere"
        return f"out of memory: {first[:300]}; {hint}"
    if getattr(exc, "actor_init_failed", False) and lines:
        # The constructor raised: its traceback ends with "module.ErrorClass: message".
        return lines[-1][:500]
    if isinstance(exc, rex.ActorDiedError | rex.RayActorError) and cause is None:
        return (
            "the actor's worker process died (killed, crashed or out of memory): "
            f"{first[:300]}. Rerun with --rerun-failed"
        )
    return f"{type(root).__name__}: {first[:500]}"


def run_models(
    configs: list[ActorConfig],
    options: dict[str, dict[str, Any]],
    prompts: list[PromptSpec],
    batch_size: int,
    batch_tokens: int,
    run_dir: Path,
    ledger: Ledger,
    context: Callable[[str], dict[str, Any]],
    progress: bool = True,
    replicas: bool = True,
) -> None:
    """Run every model to completion or failure; the ledger records each outcome as it happens.

    Each actor first counts every prompt's tokens (its tokenizer); the model's batches are then
    planned (``plan_batches``), those an earlier run finished are kept (``ModelArtefacts.plan``)
    and only the others are sent. Each finished batch is made durable as it arrives.

    ``replicas``: when a model ends, the CPU cores it held on its node may start another actor
    of a CPU-placed model there that still has batches to send (the one with the most work
    left, where ``replica_pays``); only once every model's actor has started, since Ray may be
    holding those cores for one still waiting.
    """
    import ray
    from tqdm import tqdm

    from actors.lens_actor import LensActor

    remote_cls = ray.remote(max_restarts=0)(LensActor)
    prompts_ref = ray.put(prompts)  # every actor counts the same prompts
    manifest_ids = [p.id for p in prompts]
    jobs: dict[str, _Job] = {}
    # ref -> (model, kind, batch index or -1, the actor's slot in job.actors or -1)
    pending: dict[Any, tuple[str, str, int, int]] = {}
    models_bar = tqdm(
        total=len(configs), desc="models", unit="model", disable=not progress, position=0
    )
    slots = {cfg.name: i + 1 for i, cfg in enumerate(configs)}  # progress bar lines
    by_name = {cfg.name: cfg for cfg in configs}
    free_cpus: dict[str, int] = {}  # per node: cores that finished models left
    # Per node: RAM the plan left free, plus what finished CPU models' actors held: a replica
    # must fit in it, so that it never takes a node past what the plan checked.
    headroom = {str(n["node_id"]): int(n.get("cpu_free_bytes") or 0)
                for n in ledger.data.get("nodes", [])}  # fmt: skip
    for cfg in configs:
        entry = ledger.models.get(cfg.name, {})
        if entry.get("device_kind") == "cpu" and entry.get("node_id") in headroom:
            headroom[entry["node_id"]] -= int(entry.get("est_bytes") or 0)
    replica_of: dict[Any, Any] = {}  # a starting replica's readiness ref -> the replica
    failed = 0

    def submit(job: _Job) -> None:
        for slot, actor in enumerate(job.actors):
            while job.unsubmitted and job.in_flight[slot] < MAX_IN_FLIGHT:
                index = job.todo[job.submitted]
                ref = actor.run_batch.remote(job.batches[index])
                pending[ref] = (job.name, "batch", index, slot)
                job.submitted += 1
                job.in_flight[slot] += 1

    def placed_on_cpu(name: str) -> tuple[str, int, int] | None:
        """(node, cpus, estimated bytes) of a model placed on a node's CPU; None for a GPU/MPS
        or simulated one, or one whose memory is not estimated."""
        entry = ledger.models.get(name, {})
        if entry.get("device_kind") != "cpu" or not entry.get("node_id"):
            return None
        if not entry.get("est_bytes"):
            return None
        return str(entry["node_id"]), int(entry.get("cpus") or 1), int(entry["est_bytes"])

    def release(job: _Job, actors: int) -> None:
        """The cores (and a CPU model's RAM) that many of the model's actors held go back to
        its node."""
        entry = ledger.models.get(job.name, {})
        node, cpus = entry.get("node_id"), int(entry.get("cpus") or 0)
        if node and cpus:
            free_cpus[node] = free_cpus.get(node, 0) + cpus * actors
        where = placed_on_cpu(job.name)
        if where is not None:
            headroom[where[0]] = headroom.get(where[0], 0) + where[2] * actors

    def batch_s(job: _Job) -> float | None:
        """Seconds one actor takes per batch, from this run's results so far (None: none yet)."""
        if job.planned_at is None or not sum(job.ran):
            return None
        return (time.perf_counter() - job.planned_at) * len(job.actors) / sum(job.ran)

    def add_replicas() -> None:
        if not replicas or any(j.planned_at is None for j in jobs.values()):
            return
        waiting = sorted(jobs.values(), key=lambda j: j.unsubmitted, reverse=True)
        for job in waiting:
            where, per_batch = placed_on_cpu(job.name), batch_s(job)
            if where is None or per_batch is None or job.planned_at is None:
                continue
            node, cpus, size = where
            if free_cpus.get(node, 0) < cpus or headroom.get(node, 0) < size:
                continue
            actors = len(job.actors) + len(job.starting)
            if not replica_pays(job.unsubmitted, per_batch, job.planned_at - job.started, actors):
                continue
            free_cpus[node] -= cpus
            headroom[node] -= size
            replica = remote_cls.options(**with_worker_env(options[job.name])).remote(
                by_name[job.name]
            )
            job.starting.append(replica)
            # Counting no prompts: it answers once it has loaded its model.
            ready = replica.token_lengths.remote([])
            pending[ready] = (job.name, "replica", -1, -1)
            replica_of[ready] = replica

    def replica_ready(job: _Job, replica: Any) -> None:
        job.starting.remove(replica)
        if not job.unsubmitted:  # the others got there first
            ray.kill(replica)
            release(job, 1)
            return
        job.actors.append(replica)
        job.in_flight.append(0)
        job.ran.append(0)
        ledger.update(job.name, replicas=len(job.actors) - 1)
        submit(job)

    def plan(job: _Job, lengths: list[int]) -> set[int]:
        """Plan the model's batches; returns those an earlier run finished (kept)."""
        job.batches = plan_batches(prompts, lengths, batch_size, batch_tokens)
        resumed = set(job.sink.plan(job.batches, manifest_ids))
        job.todo = [i for i in range(len(job.batches)) if i not in resumed]
        job.done = len(resumed)
        return resumed

    def record_plan(job: _Job, resumed: set[int]) -> None:
        ledger.update(
            job.name,
            batches_total=len(job.batches),
            batches_done=job.done,
            batches_resumed=len(resumed),
        )
        job.bar = tqdm(
            total=len(prompts),
            initial=sum(len(job.batches[i]) for i in resumed),
            desc=job.name[:32],
            unit="prompt",
            disable=not progress,
            position=slots[job.name],
            leave=True,
        )

    def next_step(job: _Job) -> None:
        if job.done == len(job.batches):
            for replica in job.starting:  # no work left for it
                ray.kill(replica)
                release(job, 1)
            job.starting.clear()
            for slot, actor in enumerate(job.actors):
                pending[actor.diagnostics.remote()] = (job.name, "diagnostics", -1, slot)
        else:
            submit(job)

    def finish(job: _Job, status: str, **fields: Any) -> None:
        nonlocal failed
        for ref, (name, *_) in list(pending.items()):
            if name == job.name:
                del pending[ref]
                replica_of.pop(ref, None)
        for actor in [*job.actors, *job.starting]:
            ray.kill(actor)
        release(job, len(job.actors) + len(job.starting))
        jobs.pop(job.name, None)
        wall = time.perf_counter() - job.started
        ledger.update(job.name, status=status, finished_at=now(), wall_s=round(wall, 3), **fields)
        failed += status != "ok"
        if job.bar is not None:
            job.bar.set_postfix_str(status)
            job.bar.close()
        models_bar.update(1)
        models_bar.set_postfix(failed=failed)

    def fail(job: _Job, error: str) -> None:
        job.sink.abort()  # its finished batches stay, for --rerun-failed
        finish(job, "failed", error=error)

    for cfg in configs:
        actor = remote_cls.options(**with_worker_env(options[cfg.name])).remote(cfg)
        fingerprint = ledger.models.get(cfg.name, {}).get("fingerprint") or ""
        sink = ModelArtefacts(run_dir, cfg.name, fingerprint)
        job = _Job(cfg.name, sink, actors=[actor], in_flight=[0], ran=[0])
        jobs[cfg.name] = job
        ledger.update(
            cfg.name, status="running", started_at=now(), error=None, replicas=0,
            replica_error=None,
        )  # fmt: skip
        pending[actor.token_lengths.remote(prompts_ref)] = (cfg.name, "lengths", -1, 0)
    try:
        while pending:
            add_replicas()  # after whatever the last event changed (cores freed, work planned)
            [ref], _ = ray.wait(list(pending), num_returns=1)
            name, kind, index, slot = pending.pop(ref)
            job = jobs[name]
            if kind == "replica":
                replica = replica_of.pop(ref)
                try:
                    ray.get(ref)
                except Exception as exc:  # a replica that cannot start costs nothing but itself
                    job.starting.remove(replica)
                    ray.kill(replica)
                    ledger.update(name, replica_error=explain_failure(exc))
                    release(job, 1)
                    continue
                replica_ready(job, replica)
                continue
            try:
                value = ray.get(ref)
            except Exception as exc:  # any actor-side failure fails this model only
                fail(job, explain_failure(exc))
                continue
            if kind == "lengths":
                try:
                    resumed = plan(job, value)
                except Exception as exc:  # e.g. its parts folder cannot be read or cleaned
                    fail(job, f"planning its batches failed: {type(exc).__name__}: {exc}")
                    continue
                job.planned_at = time.perf_counter()
                record_plan(job, resumed)
                next_step(job)
            elif kind == "batch":
                job.in_flight[slot] -= 1
                job.ran[slot] += 1
                try:
                    job.sink.add(value, index)
                except Exception as exc:  # disk full, a bad path: this model fails, not the sweep
                    fail(job, f"writing results failed: {type(exc).__name__}: {exc}")
                    continue
                job.done += 1
                job.bar.update(len(job.batches[index]))
                ledger.update(name, batches_done=job.done)
                next_step(job)
            else:
                job.diagnostics[slot] = value
                if len(job.diagnostics) < len(job.actors):
                    continue
                merged = merged_diagnostics([job.diagnostics[i] for i in range(len(job.actors))])
                try:
                    files = job.sink.commit(merged, context(name))
                except Exception as exc:  # a broken artefact must not take the other models down
                    fail(job, f"writing artefacts failed: {type(exc).__name__}: {exc}")
                    continue
                diag = job.sink.diagnostics  # with every batch's parity and refused prompts
                finish(
                    job,
                    "ok",
                    dtype=diag["dtype"]["compute"],
                    device=diag["device"],
                    simulated_device=diag.get("simulated_device"),
                    torch_threads=diag.get("torch_threads"),
                    load_s=round(diag["timings"]["load_s"], 3),
                    lens_s=round(diag["timings"]["lens_s"], 3),
                    parity_max_abs=diag["parity"]["max_abs_lens_minus_model_logits"],
                    parity_max_kl_bits=diag["parity"]["max_kl_model_to_lens_bits"],
                    prompt_failures=diag.get("prompt_failures") or None,
                    artefacts=files,
                )
    except KeyboardInterrupt:
        for job in list(jobs.values()):
            fail(job, "interrupted (Ctrl-C); rerun with --rerun-failed to finish it")
        raise
    finally:
        for job in jobs.values():
            if job.bar is not None:
                job.bar.close()
        models_bar.close()
