"""Where an actor cannot run as placed: absent devices, simulated ones, unsupported models."""

from __future__ import annotations

import pytest
import torch

from actors import ActorConfig, LensActor, ModelSource, PromptSpec
from actors.architectures import ARCHITECTURES
from actors.errors import DeviceUnavailable, UnsupportedArchitecture
from tests.checkpoints import UNSUPPORTED_ARCH, build_tiny_checkpoint


def _config(checkpoint, **overrides) -> ActorConfig:
    return ActorConfig(name="tiny", source=ModelSource(hf=str(checkpoint)), **overrides)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_absent_cuda_raises_device_unavailable(tiny_checkpoints):
    with pytest.raises(DeviceUnavailable, match=r"placed on cuda but this worker sees 0 CUDA"):
        LensActor(_config(tiny_checkpoints["llama"], device="cuda"))


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="needs a machine without MPS")
def test_absent_mps_raises_device_unavailable(tiny_checkpoints):
    with pytest.raises(DeviceUnavailable, match=r"placed on mps but this worker has no usable"):
        LensActor(_config(tiny_checkpoints["llama"], device="mps"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_simulated_missing_device_runs_on_cpu_and_says_so(tiny_checkpoints):
    actor = LensActor(
        _config(tiny_checkpoints["llama"], device="cuda", simulate_missing_device=True)
    )
    result = actor.run_batch([PromptSpec("p", "The capital of France is", "Paris")])
    diag = actor.diagnostics()
    assert diag["simulated_device"] == "cuda"
    assert diag["device"] == "cpu"
    # The dtype follows the device it really runs on, not the one it was placed for.
    assert diag["dtype"]["compute"] == "float32"
    assert max(result.summary.column("parity_max_abs").to_pylist()) <= 1e-4


def test_unsupported_architecture_names_the_supported_ones(tmp_path, smollm2_tok):
    checkpoint = build_tiny_checkpoint(UNSUPPORTED_ARCH, tmp_path, smollm2_tok)
    assert "Phi3ForCausalLM" not in ARCHITECTURES  # the premise of this test
    with pytest.raises(UnsupportedArchitecture) as err:
        LensActor(_config(checkpoint))
    message = str(err.value)
    assert "'Phi3ForCausalLM' is not supported" in message
    for name in ARCHITECTURES:
        assert name in message
