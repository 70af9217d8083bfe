"""The placement planner on synthetic node snapshots: pure, no Ray cluster."""

from __future__ import annotations

import math

import pytest

from sweep.placement import DEFAULT_DTYPE, ModelDemand, NodeInfo, Placement, plan

GIB = 2**30


def demand(
    name: str,
    cuda: float,
    mps: float | None = None,
    cpu: float | None = None,
    device: str | None = None,
) -> ModelDemand:
    """A demand in GiB per kind; mps defaults to the cuda figure, cpu to twice it (float32)."""
    mps = cuda if mps is None else mps
    cpu = 2 * cuda if cpu is None else cpu
    est = {"cuda": int(cuda * GIB), "mps": int(mps * GIB), "cpu": int(cpu * GIB)}
    return ModelDemand(name, est, dict(DEFAULT_DTYPE), device)


def gpu_node(node_id: str, *gpus_gib: float, ram_gib: float = 64) -> NodeInfo:
    return NodeInfo(
        node_id=node_id,
        ip=f"10.0.0.{len(node_id)}",
        cpus=16,
        cpu_free_bytes=int(ram_gib * GIB),
        gpu_free_bytes=tuple(int(g * GIB) for g in gpus_gib),
        gpu_names=tuple("NVIDIA H100" for _ in gpus_gib),
    )


def mac_node(node_id: str, unified_gib: float) -> NodeInfo:
    b = int(unified_gib * GIB)
    return NodeInfo(node_id, "192.168.1.2", 10, cpu_free_bytes=b, mps_free_bytes=b)


def cpu_node(node_id: str, ram_gib: float) -> NodeInfo:
    return NodeInfo(node_id, "10.0.1.1", 8, cpu_free_bytes=int(ram_gib * GIB))


def kinds(placements: list[Placement]) -> list[tuple[str, str | None, str | None]]:
    return [(p.name, p.device_kind, p.node_id) for p in placements]


def test_prefers_cuda_then_mps_then_cpu() -> None:
    nodes = [gpu_node("gpu", 80), mac_node("mac", 64), cpu_node("cpu", 256)]
    (p,) = plan([demand("m", 10)], nodes)
    assert (p.status, p.device_kind, p.node_id) == ("planned", "cuda", "gpu")
    assert p.dtype == "float16" and p.est_bytes == 10 * GIB
    (p,) = plan([demand("m", 10)], nodes[1:])
    assert (p.device_kind, p.node_id, p.dtype) == ("mps", "mac", "float16")
    (p,) = plan([demand("m", 10)], nodes[2:])
    assert (p.device_kind, p.node_id, p.dtype) == ("cpu", "cpu", "float32")
    assert p.est_bytes == 20 * GIB


def test_too_large_for_the_gpu_falls_back_to_mps_then_cpu() -> None:
    nodes = [gpu_node("gpu", 24, ram_gib=32), mac_node("mac", 48), cpu_node("big", 512)]
    (p,) = plan([demand("m", 40)], nodes)
    assert (p.device_kind, p.node_id) == ("mps", "mac")
    (p,) = plan([demand("m", 60)], nodes)
    assert (p.device_kind, p.node_id) == ("cpu", "big")
    assert "needs ~120.0 GiB" in p.reason


def test_memory_is_subtracted_so_a_gpu_is_not_overcommitted() -> None:
    # Two 30 GiB models: one 40 GiB GPU holds one; the other goes to the second node's GPU.
    nodes = [gpu_node("a", 40), gpu_node("b", 35)]
    ps = plan([demand("m1", 30), demand("m2", 30)], nodes)
    assert kinds(ps) == [("m1", "cuda", "a"), ("m2", "cuda", "b")]
    # With one GPU only, the second falls back to the CPU.
    ps = plan([demand("m1", 30), demand("m2", 30)], [gpu_node("a", 40, ram_gib=128)])
    assert kinds(ps) == [("m1", "cuda", "a"), ("m2", "cpu", "a")]
    # Small models share a GPU while its memory lasts.
    ps = plan([demand(f"s{i}", 10) for i in range(5)], [gpu_node("a", 40, ram_gib=15)])
    assert [p.device_kind for p in ps] == ["cuda"] * 4 + [None]
    assert ps[4].status == "skipped_no_fit"


def test_multi_gpu_node_uses_each_gpu() -> None:
    ps = plan([demand("m1", 30), demand("m2", 30)], [gpu_node("a", 40, 40)])
    assert [p.device_kind for p in ps] == ["cuda", "cuda"]
    assert all(p.node_id == "a" for p in ps)


def test_most_free_memory_first() -> None:
    (p,) = plan([demand("m", 10)], [gpu_node("small", 16), gpu_node("large", 80)])
    assert p.node_id == "large"
    assert "of 80.0 GiB free" in p.reason


def test_mps_and_cpu_share_a_macs_unified_memory() -> None:
    # Regression: the planner kept separate pools for a Mac's MPS and CPU, so a model that no
    # longer fitted on MPS was put on the CPU of the same, already full, machine.
    ps = plan([demand("m1", 10, cpu=10), demand("m2", 10, cpu=10)], [mac_node("mac", 16)])
    assert kinds(ps) == [("m1", "mps", "mac"), ("m2", None, None)]
    assert ps[1].status == "skipped_no_fit"
    ps = plan([demand("m1", 10, cpu=10), demand("m2", 5, cpu=5)], [mac_node("mac", 16)])
    assert [p.device_kind for p in ps] == ["mps", "mps"]


def test_simulated_devices_draw_on_the_nodes_ram() -> None:
    node = NodeInfo(
        "sim",
        "127.0.0.1",
        4,
        16 * GIB,
        gpu_free_bytes=(16 * GIB,),
        gpu_names=("simulated on CPU",),
        simulated=("cuda",),
    )
    ps = plan([demand("m1", 10, cpu=10), demand("m2", 10, cpu=10)], [node])
    assert ps[0].device_kind == "cuda" and ps[0].simulated
    assert ps[1].status == "skipped_no_fit"


def test_no_fit_anywhere_is_skipped_with_the_needed_gib() -> None:
    (p,) = plan([demand("huge", 100, cpu=200)], [gpu_node("a", 80, ram_gib=128)])
    assert p.status == "skipped_no_fit"
    assert (p.device_kind, p.node_id, p.est_bytes) == (None, None, None)
    assert "cuda needs ~100.0 GiB (largest free 80.0 GiB)" in p.reason
    assert "mps needs ~100.0 GiB (no such device in the cluster)" in p.reason
    assert "cpu needs ~200.0 GiB (largest free 128.0 GiB)" in p.reason


def test_no_nodes_at_all() -> None:
    (p,) = plan([demand("m", 1)], [])
    assert p.status == "skipped_no_fit"
    assert "no such device" in p.reason


def test_explicit_device_is_honoured() -> None:
    nodes = [gpu_node("a", 80, ram_gib=64)]
    (p,) = plan([demand("m", 10, device="cpu")], nodes)
    assert (p.status, p.device_kind, p.dtype) == ("planned", "cpu", "float32")


def test_explicit_device_that_fits_nowhere_is_skipped() -> None:
    (p,) = plan([demand("m", 10, device="mps")], [gpu_node("a", 80, ram_gib=512)])
    assert p.status == "skipped_no_fit"
    assert "device = 'mps' was requested" in p.reason
    assert "mps needs ~10.0 GiB (no such device in the cluster)" in p.reason
    assert "cuda" not in p.reason  # no fallback was tried
    (p,) = plan([demand("m", 100, device="cuda")], [gpu_node("a", 80)])
    assert p.status == "skipped_no_fit" and "device = 'cuda'" in p.reason


def test_deterministic_and_independent_of_node_order() -> None:
    nodes = [gpu_node("n1", 40), gpu_node("n2", 40), mac_node("n3", 32), cpu_node("n4", 64)]
    demands = [demand(f"m{i}", g) for i, g in enumerate([30, 12, 12, 25, 8, 50, 300])]
    first = plan(demands, nodes)
    assert plan(demands, nodes) == first
    assert plan(demands, list(reversed(nodes))) == first
    assert plan(demands, nodes[2:] + nodes[:2]) == first
    assert first[-1].status == "skipped_no_fit"


def test_ray_options_per_kind() -> None:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # Ray checks node ids: 28 bytes of hex, as ray.nodes() reports them.
    g, m, c = ("1a" * 28, "2b" * 28, "3c" * 28)
    nodes = [gpu_node(g, 80, ram_gib=8), mac_node(m, 16), cpu_node(c, 64)]
    cuda, mps, cpu = plan(
        [demand("a", 10), demand("b", 10, device="mps"), demand("c", 10, device="cpu")], nodes
    )
    assert kinds([cuda, mps, cpu]) == [("a", "cuda", g), ("b", "mps", m), ("c", "cpu", c)]
    for p in (cuda, mps, cpu):
        strategy = p.ray_options()["scheduling_strategy"]
        assert isinstance(strategy, NodeAffinitySchedulingStrategy)
        assert strategy.node_id == p.node_id and strategy.soft is False
    o = cuda.ray_options()
    # A fraction of the GPU in proportion to its memory, so Ray co-locates what fits together.
    assert o["num_gpus"] == math.ceil(100 * cuda.est_bytes / (80 * GIB)) / 100
    assert "resources" not in o and "memory" not in o
    o = mps.ray_options()
    assert o["resources"] == {"mps": 1} and "num_gpus" not in o and "memory" not in o
    o = cpu.ray_options()
    assert o["memory"] == 20 * GIB and "num_gpus" not in o and "resources" not in o
    assert (cuda.device, mps.device, cpu.device) == ("cuda:0", "mps", "cpu")


@pytest.mark.parametrize("kind", ["cuda", "mps"])
def test_simulated_flag(kind: str) -> None:
    ram = 32 * GIB
    node = NodeInfo(
        "sim",
        "127.0.0.1",
        4,
        ram,
        gpu_free_bytes=(ram,) if kind == "cuda" else (),
        mps_free_bytes=ram if kind == "mps" else None,
        simulated=(kind,),
    )
    (p,) = plan([demand("m", 1)], [node])
    assert (p.device_kind, p.simulated) == (kind, True)
    (real,) = plan([demand("m", 1)], [gpu_node("g", 80)])
    assert real.simulated is False


def test_models_sharing_a_gpu_ask_ray_for_fractions_that_fit_together() -> None:
    placed = plan([demand("a", 30), demand("b", 30)], [gpu_node("4d" * 28, 80, ram_gib=8)])
    assert [p.device_kind for p in placed] == ["cuda", "cuda"]
    shares = [p.ray_options()["num_gpus"] for p in placed]
    assert all(0 < s < 1 for s in shares) and sum(shares) <= 1.0
