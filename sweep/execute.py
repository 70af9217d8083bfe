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
    """One model in flight: its actor, its planned batches and how far it has come."""

    name: str
    actor: Any
    sink: ModelArtefacts
    batches: list[list[PromptSpec]] = field(default_factory=list)
    todo: list[int] = field(default_factory=list)  # planned batches still to run, in order
    submitted: int = 0  # of todo
    in_flight: int = 0
    done: int = 0  # batches durable, resumed ones included
    bar: Any = None  # this model's progress bar, once its batches are planned
    started: float = field(default_factory=time.perf_counter)


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
) -> None:
    """Run every model to completion or failure; the ledger records each outcome as it happens.

    Each actor first counts every prompt's tokens (its tokenizer); the model's batches are then
    planned (``plan_batches``), those an earlier run finished are kept (``ModelArtefacts.plan``)
    and only the others are sent. Each finished batch is made durable as it arrives.
    """
    import ray
    from tqdm import tqdm

    from actors.lens_actor import LensActor

    remote_cls = ray.remote(max_restarts=0)(LensActor)
    prompts_ref = ray.put(prompts)  # every actor counts the same prompts
    manifest_ids = [p.id for p in prompts]
    jobs: dict[str, _Job] = {}
    pending: dict[Any, tuple[str, str, int]] = {}  # ref -> (model, kind, batch index)
    models_bar = tqdm(
        total=len(configs), desc="models", unit="model", disable=not progress, position=0
    )
    slots = {cfg.name: i + 1 for i, cfg in enumerate(configs)}  # progress bar lines
    failed = 0

    def submit(job: _Job) -> None:
        while job.submitted < len(job.todo) and job.in_flight < MAX_IN_FLIGHT:
            index = job.todo[job.submitted]
            pending[job.actor.run_batch.remote(job.batches[index])] = (job.name, "batch", index)
            job.submitted += 1
            job.in_flight += 1

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
            pending[job.actor.diagnostics.remote()] = (job.name, "diagnostics", -1)
        else:
            submit(job)

    def finish(job: _Job, status: str, **fields: Any) -> None:
        nonlocal failed
        for ref, (name, _, _) in list(pending.items()):
            if name == job.name:
                del pending[ref]
        ray.kill(job.actor)
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
        job = _Job(cfg.name, actor, ModelArtefacts(run_dir, cfg.name, fingerprint))
        jobs[cfg.name] = job
        ledger.update(cfg.name, status="running", started_at=now(), error=None)
        pending[actor.token_lengths.remote(prompts_ref)] = (cfg.name, "lengths", -1)
    try:
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            name, kind, index = pending.pop(ref)
            job = jobs[name]
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
                record_plan(job, resumed)
                next_step(job)
            elif kind == "batch":
                job.in_flight -= 1
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
                try:
                    files = job.sink.commit(value, context(name))
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
