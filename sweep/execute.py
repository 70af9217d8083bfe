"""Running planned models as Ray actors: batches streamed to disk in the order they finish."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors.config import WORKER_ENV, ActorConfig
from actors.prompts import PromptSpec, batch_prompts
from sweep.artefacts import ModelArtefacts
from sweep.ledger import Ledger, now

MAX_IN_FLIGHT = 2  # batches queued per actor: keeps it busy without piling results up


@dataclass
class _Job:
    name: str
    actor: Any
    batches: list[list[PromptSpec]]
    sink: ModelArtefacts
    next_batch: int = 0
    done_batches: int = 0
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
        hint = "lower batch_size, use a half dtype, or place it elsewhere"
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
    run_dir: Path,
    ledger: Ledger,
    context: Callable[[str], dict[str, Any]],
    progress: bool = True,
) -> None:
    """Run every model to completion or failure; the ledger records each outcome as it happens."""
    import ray
    from tqdm import tqdm

    from actors.lens_actor import LensActor

    remote_cls = ray.remote(max_restarts=0)(LensActor)
    batches = batch_prompts(prompts, batch_size)
    jobs: dict[str, _Job] = {}
    pending: dict[Any, tuple[str, str]] = {}  # ref -> (model, "batch" | "diagnostics")
    models_bar = tqdm(
        total=len(configs), desc="models", unit="model", disable=not progress, position=0
    )
    batch_bar = tqdm(
        total=len(configs) * len(batches),
        desc="batches",
        unit="batch",
        disable=not progress,
        position=1,
    )
    failed = 0

    def submit(job: _Job) -> None:
        while (
            job.next_batch < len(job.batches) and job.next_batch - job.done_batches < MAX_IN_FLIGHT
        ):
            ref = job.actor.run_batch.remote(job.batches[job.next_batch])
            pending[ref] = (job.name, "batch")
            job.next_batch += 1

    def finish(job: _Job, status: str, **fields: Any) -> None:
        nonlocal failed
        for ref, (name, _) in list(pending.items()):
            if name == job.name:
                del pending[ref]
        ray.kill(job.actor)
        jobs.pop(job.name, None)
        wall = time.perf_counter() - job.started
        ledger.update(job.name, status=status, finished_at=now(), wall_s=round(wall, 3), **fields)
        failed += status != "ok"
        models_bar.update(1)
        models_bar.set_postfix(failed=failed)
        batch_bar.update(len(job.batches) - job.done_batches)

    for cfg in configs:
        actor = remote_cls.options(**with_worker_env(options[cfg.name])).remote(cfg)
        job = _Job(cfg.name, actor, batches, ModelArtefacts(run_dir, cfg.name))
        jobs[cfg.name] = job
        ledger.update(cfg.name, status="running", started_at=now(), error=None)
        submit(job)
    try:
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            name, kind = pending.pop(ref)
            job = jobs[name]
            try:
                value = ray.get(ref)
            except Exception as exc:  # any actor-side failure fails this model only
                job.sink.abort()
                finish(job, "failed", error=explain_failure(exc))
                continue
            if kind == "batch":
                try:
                    job.sink.add(value)
                except Exception as exc:  # disk full, a bad path: this model fails, not the sweep
                    job.sink.abort()
                    finish(
                        job, "failed", error=f"writing results failed: {type(exc).__name__}: {exc}"
                    )
                    continue
                job.done_batches += 1
                batch_bar.update(1)
                if job.done_batches == len(job.batches):
                    pending[job.actor.diagnostics.remote()] = (name, "diagnostics")
                else:
                    submit(job)
                continue
            try:
                files = job.sink.commit(value, context(name))
            except Exception as exc:  # a broken artefact must not take the other models down
                job.sink.abort()
                finish(
                    job, "failed", error=f"writing artefacts failed: {type(exc).__name__}: {exc}"
                )
                continue
            finish(
                job,
                "ok",
                dtype=value["dtype"]["compute"],
                device=value["device"],
                simulated_device=value.get("simulated_device"),
                torch_threads=value.get("torch_threads"),
                load_s=round(value["timings"]["load_s"], 3),
                lens_s=round(value["timings"]["lens_s"], 3),
                parity_max_abs=value["parity"]["max_abs_lens_minus_model_logits"],
                parity_max_kl_bits=value["parity"]["max_kl_model_to_lens_bits"],
                prompt_failures=value.get("prompt_failures") or None,
                artefacts=files,
            )
    except KeyboardInterrupt:
        for job in list(jobs.values()):
            job.sink.abort()
            finish(
                job, "failed", error="interrupted (Ctrl-C); rerun with --rerun-failed to finish it"
            )
        raise
    finally:
        models_bar.close()
        batch_bar.close()
