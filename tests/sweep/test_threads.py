"""CPU actors compute on the cores they reserve: the planner's split, the actor's threads, Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from actors.runtime import set_threads
from sweep.placement import DEFAULT_DTYPE, ModelDemand, NodeInfo, Placement, plan
from sweep.run import main
from tests.sweep.conftest import write_manifest

GIB = 2**30


def demand(name: str, device: str | None = "cpu") -> ModelDemand:
    return ModelDemand(name, {k: GIB for k in DEFAULT_DTYPE}, dict(DEFAULT_DTYPE), device)


def node(cpus: float, gpus: int = 0, node_id: str = "1a" * 28) -> NodeInfo:
    """A node of ``cpus`` CPUs and ``gpus`` 80 GiB GPUs (Ray checks node ids: 28 bytes of hex)."""
    return NodeInfo(
        node_id, "10.0.0.1", cpus, cpu_free_bytes=64 * GIB, gpu_free_bytes=(80 * GIB,) * gpus
    )


def cpus_of(placements: list[Placement]) -> list[int]:
    return [p.cpus for p in placements]


def test_a_model_alone_on_a_node_reserves_all_its_cpus() -> None:
    (p,) = plan([demand("a")], [node(32)])
    assert (p.device_kind, p.cpus, p.torch_threads) == ("cpu", 32, 32)
    assert p.ray_options()["num_cpus"] == 32


def test_two_models_on_a_two_cpu_node_take_one_each() -> None:
    assert cpus_of(plan([demand("a"), demand("b")], [node(2)])) == [1, 1]


def test_three_models_on_eight_cpus_use_every_core_the_first_ones_get_the_rest() -> None:
    assert cpus_of(plan([demand("a"), demand("b"), demand("c")], [node(8)])) == [3, 3, 2]
    # The order of the manifest decides, not the names.
    placed = plan([demand("c"), demand("a"), demand("b")], [node(8)])
    assert [(p.name, p.cpus) for p in placed] == [("c", 3), ("a", 3), ("b", 2)]


def test_gpu_models_keep_one_cpu_and_leave_the_rest_to_cpu_models() -> None:
    placed = plan([demand("g1", "cuda"), demand("g2", "cuda"), demand("c")], [node(16, gpus=2)])
    assert [(p.device_kind, p.cpus) for p in placed] == [("cuda", 1), ("cuda", 1), ("cpu", 14)]
    assert placed[0].ray_options()["num_cpus"] == 1 and placed[0].torch_threads == 1


def test_models_are_split_per_node() -> None:
    nodes = [node(4, node_id="a" * 56), node(6, node_id="b" * 56)]
    placed = plan([demand("x"), demand("y"), demand("z")], nodes)
    per_node: dict[str, list[int]] = {}
    for p in placed:
        per_node.setdefault(str(p.node_id), []).append(p.cpus)
    assert sorted(sum(c) for c in per_node.values()) == [4, 6]


def test_more_models_than_cpus_each_ask_for_one_which_ray_can_grant() -> None:
    assert cpus_of(plan([demand(n) for n in "abc"], [node(2)])) == [1, 1, 1]


def test_a_node_without_a_whole_cpu_is_never_asked_for_more_than_it_has() -> None:
    # A head node started with --num-cpus=0: a request of 1 would wait for ever.
    placed = plan([demand("g", "cuda"), demand("c")], [node(0, gpus=1)])
    assert cpus_of(placed) == [0, 0]
    assert [p.torch_threads for p in placed] == [1, 1]
    assert cpus_of(plan([demand("c")], [node(2.5)])) == [2]


def test_skipped_models_reserve_nothing_from_the_split() -> None:
    huge = ModelDemand("huge", {k: 1000 * GIB for k in DEFAULT_DTYPE}, dict(DEFAULT_DTYPE), "cpu")
    placed = plan([huge, demand("a")], [node(8)])
    assert [(p.status, p.cpus) for p in placed] == [("skipped_no_fit", 1), ("planned", 8)]


@given(
    cpus=st.integers(0, 64),
    kinds=st.lists(st.sampled_from(["cpu", "cuda"]), min_size=1, max_size=12),
)
def test_requests_fit_the_node_and_use_every_core_left_to_cpu_models(
    cpus: int, kinds: list[str]
) -> None:
    gpus = kinds.count("cuda")
    placed = plan([demand(f"m{i}", k) for i, k in enumerate(kinds)], [node(cpus, gpus=gpus)])
    on_cpu = [p.cpus for p in placed if p.device_kind == "cpu"]
    assert all(0 <= p.cpus <= cpus for p in placed)
    if on_cpu and cpus:
        left = max(0, cpus - gpus)
        assert sum(on_cpu) == max(left, len(on_cpu))
        assert max(on_cpu) - min(on_cpu) <= 1


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_set_threads_sets_torch_and_none_leaves_it(restore_threads) -> None:
    assert set_threads(2) == 2 == torch.get_num_threads()
    assert set_threads(None) == 2
    assert set_threads(1) == 1 == torch.get_num_threads()
    with pytest.raises(ValueError, match="positive"):
        set_threads(0)


def test_a_cpu_actor_under_ray_is_not_held_to_one_thread(tiny_checkpoints, tmp_path: Path) -> None:
    """Ray gives a num_cpus=1 actor OMP_NUM_THREADS=1; a model alone uses the whole node."""
    manifest = write_manifest(tmp_path / "m.toml", {"tiny-llama": tiny_checkpoints["llama"]})
    out = tmp_path / "results"
    assert main([str(manifest), "--out", str(out), "--no-progress"]) == 0
    ledger = json.loads((out / "run-latest" / "ledger.json").read_text())
    (ray_node,) = ledger["nodes"]
    node_cpus = int(ray_node["cpus"])  # what Ray's local node offers: every core here
    entry = ledger["models"]["tiny-llama"]
    assert entry["device"] == "cpu"
    assert entry["cpus"] == node_cpus
    assert entry["torch_threads"] == node_cpus
    output = json.loads((out / "run-latest" / "output-tiny-llama.json").read_text())
    assert output["diagnostics"]["torch_threads"] == node_cpus
