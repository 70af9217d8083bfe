"""Where an actor's weights go: straight onto the placed device(s), checked after loading.

A GPU is not needed for what is tested here: the device map the loader is given, a split map
that covers every weight exactly once, the split path end to end on CPU devices, and the
self-check failing, by name, when a tensor is left behind (the bug that made every batch fail
on a real GPU: the weights never left the CPU).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from actors import ActorConfig, LensActor, ModelSource, PromptSpec
from actors.architectures import ARCHITECTURES, default_dtype
from actors.devices import split_device_map, verify_placement, weight_device_map
from actors.errors import DeviceMismatch, NumericOverflow
from lens_kernel import UnembedSpec
from tests.checkpoints import ARCHS

PROMPTS = [
    PromptSpec("all", "The capital of France is", "Paris", "all"),
]


def _config(checkpoint, **overrides) -> ActorConfig:
    return ActorConfig(name="tiny", source=ModelSource(hf=str(checkpoint)), **overrides)


def _skeleton(checkpoint) -> tuple[object, torch.nn.Module]:
    config = AutoConfig.from_pretrained(checkpoint)
    with torch.device("meta"):
        return config, AutoModelForCausalLM.from_config(config)


def test_one_device_loads_everything_straight_onto_it(tiny_checkpoints):
    config = AutoConfig.from_pretrained(tiny_checkpoints["llama"])
    assert weight_device_map(config, (), torch.device("cuda:0")) == {"": "cuda:0"}
    assert weight_device_map(config, (), torch.device("mps")) == {"": "mps"}
    assert weight_device_map(config, (), torch.device("cpu")) is None


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("k", [2, 3])
def test_split_map_covers_every_weight_once_blocks_in_order(tiny_checkpoints, arch, k):
    config, skeleton = _skeleton(tiny_checkpoints[arch])
    devices = [f"cuda:{i}" for i in range(k)]
    mapping = split_device_map(skeleton, config.num_hidden_layers, devices, "cuda:0")
    names = [n for n, _ in skeleton.named_parameters()] + [n for n, _ in skeleton.named_buffers()]
    for name in names:
        owners = [key for key in mapping if name == key or name.startswith(key + ".")]
        assert len(owners) == 1, f"{name} is mapped by {owners}"
    blocks = [key for key in mapping if key.rsplit(".", 1)[-1].isdigit()]
    assert len(blocks) == config.num_hidden_layers
    order = [int(mapping[b].split(":")[1]) for b in blocks]
    assert order == sorted(order) and set(order) == set(range(k))  # contiguous runs, all used
    others = {mapping[key] for key in mapping if key not in blocks}
    assert others == {"cuda:0"}  # embeddings, final norm, lm_head: on the lens device


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
def test_split_over_two_devices_gives_the_same_records(tiny_checkpoints, tiny_actor, arch):
    whole = tiny_actor(arch).run_batch(PROMPTS)
    config = _config(tiny_checkpoints[arch], devices=("cpu", "cpu"))
    split = LensActor(replace(config, name=f"tiny-{arch}"))
    got = split.run_batch(PROMPTS)
    assert got.records.equals(whole.records)
    assert split.diagnostics()["weight_devices"] == ["cpu", "cpu"]


def test_a_weight_left_behind_fails_the_placement_check_by_name(tiny_checkpoints):
    actor = LensActor(_config(tiny_checkpoints["llama"]))
    model = actor.bridge.original_model
    verify_placement(model, {}, [torch.device("cpu")], torch.device("cpu"), "tiny")  # as loaded
    # Leave one weight on another device ("meta" stands in for the CPU a GPU actor left it on).
    norm = model.get_submodule("model.norm")
    norm.weight = torch.nn.Parameter(torch.empty(norm.weight.shape, device="meta"))
    with pytest.raises(DeviceMismatch, match=r"1 tensor\(s\).*model\.norm\.weight on meta"):
        actor._check_placement()


def test_a_lens_tensor_left_behind_fails_the_placement_check_by_name(tiny_checkpoints):
    actor = LensActor(_config(tiny_checkpoints["gemma2"]))
    actor.unembed = UnembedSpec(actor.unembed.W_U.to("meta"), softcap=actor.unembed.softcap)
    with pytest.raises(DeviceMismatch, match=r"lens on cpu\): unembed\.W_U on meta"):
        actor._check_placement()


def test_the_dtype_policy_never_picks_a_dtype_a_family_overflows_in():
    for name, facts in ARCHITECTURES.items():
        for kind in ("cuda", "mps", "cpu"):
            dtype = str(default_dtype(kind, facts)).removeprefix("torch.")
            assert dtype not in facts.overflows_in, (name, kind)
    assert "float16" in ARCHITECTURES["Gemma3ForCausalLM"].overflows_in


def test_a_model_that_overflows_in_float16_is_reported_as_overflow(tiny_checkpoints, tmp_path):
    # A final-norm weight of 1e5 puts logits far past float16's 65504: the model's own output is
    # inf, while the lens (float32) is finite. That is the model overflowing, not a lens bug.
    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"])
    with torch.no_grad():
        model.model.norm.weight.fill_(1e5)
    model.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes(
        (tiny_checkpoints["llama"] / "tokenizer.json").read_bytes()
    )
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        src = tiny_checkpoints["llama"] / name
        if src.is_file():
            (tmp_path / name).write_bytes(src.read_bytes())
    actor = LensActor(_config(tmp_path, dtype="float16"))
    with pytest.raises(NumericOverflow, match=r"overflowed in float16.*bfloat16.*float32"):
        actor.run_batch(PROMPTS)
    fine = LensActor(_config(tmp_path, dtype="float32")).run_batch(PROMPTS)
    assert fine.records.num_rows > 0


def test_actors_keep_freed_heap_memory_on_glibc() -> None:
    """On glibc the actor's allocator setting takes: once a 64 MiB buffer has been freed, the
    next one of that size reuses its pages (no page faults to pay), as each lens chunk does."""
    import platform
    import resource

    from actors.runtime import keep_freed_memory

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    assert keep_freed_memory() is True
    source = torch.ones(16 * 2**20)
    first = torch.exp(source)  # the first buffer of this size is faulted in, then freed
    del first
    # The next one a little smaller, as a sweep's later chunks are: an exactly equal request may
    # not fit the freed block once the allocator's alignment padding is added, and then extends
    # the heap instead (by address-space layout, about one run in two).
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    again = torch.exp(source[: -(2**16)])
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert again.numel() == source.numel() - 2**16
    assert faults < 1000, faults  # without the setting: ~16,300 (the whole buffer, 4 KiB pages)
