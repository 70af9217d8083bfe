"""The placement planner on synthetic node snapshots: pure, no Ray cluster."""

from __future__ import annotations

import math
from dataclasses import replace

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


def mac_node(node_id: str, unified_gib: float, resource: str = "GPU") -> NodeInfo:
    """A Mac as Ray 2.60 sees it (its GPU is Ray's ``GPU``), or with resource="mps" as older
    Ray does, through a custom resource."""
    b = int(unified_gib * GIB)
    return NodeInfo(
        node_id,
        "192.168.1.2",
        10,
        cpu_free_bytes=b,
        mps_free_bytes=b,
        mps_resource=resource,
        accelerator_type="M3-Pro" if resource == "GPU" else None,
    )


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
    # Ray 2.60 counts the Mac's GPU as a GPU: a share of it, in proportion to unified memory.
    o = mps.ray_options()
    assert o["num_gpus"] == math.ceil(100 * 10 / 16) / 100
    assert "resources" not in o and "memory" not in o
    o = cpu.ray_options()
    assert o["memory"] == 20 * GIB and "num_gpus" not in o and "resources" not in o
    assert (cuda.device, mps.device, cpu.device) == ("cuda:0", "mps", "cpu")
    assert (cuda.devices, mps.devices, cpu.devices) == ((), (), ())
    assert (cuda.n_gpus, mps.n_gpus, cpu.n_gpus) == (1, 1, 1)


def test_a_mac_on_older_ray_is_asked_for_through_the_custom_mps_resource() -> None:
    (p,) = plan([demand("m", 4, device="mps")], [mac_node("2b" * 28, 16, resource="mps")])
    assert (p.device_kind, p.mps_resource) == ("mps", "mps")
    o = p.ray_options()
    assert o["resources"] == {"mps": 0.25} and "num_gpus" not in o and "memory" not in o


def test_models_sharing_a_mac_ask_for_fractions_that_fit_together() -> None:
    for resource in ("GPU", "mps"):
        placed = plan([demand("a", 7), demand("b", 7)], [mac_node("2b" * 28, 16, resource)])
        assert [(p.device_kind, p.mps_resource) for p in placed] == [("mps", resource)] * 2
        shares = [
            o["num_gpus"] if resource == "GPU" else o["resources"]["mps"]
            for o in (p.ray_options() for p in placed)
        ]
        assert all(0 < s < 1 for s in shares) and sum(shares) <= 1.0


def test_apple_legacy_and_nvidia_nodes_each_get_their_own_kind() -> None:
    nodes = [
        mac_node("apple", 48),
        mac_node("legacy", 32, resource="mps"),
        gpu_node("nvidia", 80, ram_gib=16),
    ]
    ps = plan(
        [
            demand("any", 20),
            demand("on-cuda", 20, device="cuda"),
            demand("on-mps", 20, device="mps"),
            demand("on-mps-2", 20, device="mps"),
            demand("on-mps-3", 20, device="mps"),
        ],
        nodes,
    )
    assert [(p.name, p.device_kind, p.node_id, p.mps_resource) for p in ps] == [
        ("any", "cuda", "nvidia", None),
        ("on-cuda", "cuda", "nvidia", None),
        ("on-mps", "mps", "apple", "GPU"),  # most free unified memory first: 48 GiB
        ("on-mps-2", "mps", "legacy", "mps"),  # 32 GiB against the Mac's remaining 28
        ("on-mps-3", "mps", "apple", "GPU"),
    ]
    # A Mac offers no CUDA and an NVIDIA node no MPS: pinned to a kind, each goes nowhere else.
    (p,) = plan([demand("m", 20, device="cuda")], nodes[:2])
    assert p.status == "skipped_no_fit" and "cuda needs ~20.0 GiB (no such device" in p.reason
    (p,) = plan([demand("m", 20, device="mps")], nodes[2:])
    assert p.status == "skipped_no_fit" and "mps needs ~20.0 GiB (no such device" in p.reason


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


# ---- models larger than one GPU ---------------------------------------------------------------


def big(name: str, weights_gib: float, lens_gib: float = 4, max_k: int = 8) -> ModelDemand:
    """A model whose weights split evenly over k GPUs, the lens GPU needing ``lens_gib`` more."""
    split = {
        k: (int((weights_gib / k + lens_gib) * GIB),) + (int(weights_gib / k * GIB),) * (k - 1)
        for k in range(2, max_k + 1)
    }
    return replace(demand(name, weights_gib + lens_gib), cuda_split=split)


def test_a_model_larger_than_one_gpu_takes_the_fewest_gpus_of_one_node_that_hold_it() -> None:
    node_id = "5e" * 28
    (p,) = plan([big("70b", 140)], [gpu_node(node_id, 80, 80, 80, 80, ram_gib=64)])
    assert (p.status, p.device_kind, p.node_id, p.n_gpus) == ("planned", "cuda", node_id, 2)
    assert p.est_bytes_per_gpu == (74 * GIB, 70 * GIB)
    assert p.est_bytes == 144 * GIB
    assert p.devices == ("cuda:0", "cuda:1") and p.device == "cuda:0"
    assert p.label == "cuda x2" and p.reason.startswith("cuda x2 on 10.0.0.56: needs ~144.0 GiB")
    o = p.ray_options()
    assert o["num_gpus"] == 2 and isinstance(o["num_gpus"], int)
    assert "resources" not in o and "memory" not in o


@pytest.mark.parametrize(("lens_gib", "k"), [(4, 7), (5, 8)])
def test_eight_small_gpus_take_as_many_as_the_figures_say(lens_gib: float, k: int) -> None:
    # 140 GiB over k 24 GiB GPUs: 140 / 7 + 4 = 24 fits exactly; 140 / 7 + 5 = 25 needs 8.
    (p,) = plan([big("m", 140, lens_gib)], [gpu_node("a", *[24] * 8, ram_gib=64)])
    assert (p.device_kind, p.n_gpus) == ("cuda", k)
    assert p.devices == tuple(f"cuda:{i}" for i in range(k))


def test_only_the_node_with_enough_gpus_takes_a_split_model() -> None:
    nodes = [gpu_node("few", 48, 48, ram_gib=512), gpu_node("many", 48, 48, 48, 48, ram_gib=8)]
    (p,) = plan([big("m", 140)], nodes)
    # 2 x 48 GiB hold 96 of the 144 GiB; the other node needs all 4 (35 + 4 GiB on the lens GPU).
    assert (p.device_kind, p.node_id, p.n_gpus) == ("cuda", "many", 4)


def test_fewest_gpus_first_then_most_free_memory() -> None:
    # Eight 40 GiB GPUs offer more memory in all, but take 4 where two 80 GiB GPUs do.
    (p,) = plan([big("m", 140)], [gpu_node("wide", *[40] * 8), gpu_node("tall", 80, 80)])
    assert (p.node_id, p.n_gpus) == ("tall", 2)
    nodes = [gpu_node("a", 80, 80, 80), gpu_node("b", 90, 90), gpu_node("c", 80, 90)]
    for order in (nodes, nodes[::-1], nodes[1:] + nodes[:1]):
        (p,) = plan([big("m", 140)], order)
        assert (p.node_id, p.n_gpus) == ("b", 2)
        assert "of 180.0 GiB free on those 2 GPUs" in p.reason


def test_a_split_model_takes_whole_gpus_so_nothing_else_lands_on_them() -> None:
    ps = plan(
        [big("m1", 140), demand("s1", 30), demand("s2", 30), big("m2", 140)],
        [gpu_node("a", 80, 80, 80, ram_gib=8)],
    )
    assert [(p.name, p.device_kind, p.n_gpus) for p in ps[:3]] == [
        ("m1", "cuda", 2),
        ("s1", "cuda", 1),
        ("s2", "cuda", 1),  # 80 GiB were free on the third GPU: both small models fit on it
    ]
    assert ps[3].status == "skipped_no_fit"
    assert "no node has two GPUs free of other models to split it over" in ps[3].reason


def test_a_gpu_shared_by_a_small_model_is_not_taken_whole() -> None:
    # Ray hands whole GPUs only when nothing holds a share of them: the split has no room.
    ps = plan([demand("s", 10), big("m", 140)], [gpu_node("a", 80, 80, ram_gib=8)])
    assert (ps[0].device_kind, ps[1].status) == ("cuda", "skipped_no_fit")
    ps = plan([big("m", 140), demand("s", 10)], [gpu_node("a", 80, 80, ram_gib=8)])
    assert [p.n_gpus for p in ps] == [2, 1] and ps[1].status == "skipped_no_fit"


def test_a_model_bigger_than_any_node_says_what_the_largest_node_offers() -> None:
    nodes = [gpu_node("a", 80, 80, 80, 80, ram_gib=64), gpu_node("bb", 80, 80, ram_gib=64)]
    (p,) = plan([big("m", 400)], nodes)
    assert p.status == "skipped_no_fit" and p.n_gpus == 1 and p.devices == ()
    assert "cuda needs ~404.0 GiB (largest free 80.0 GiB)" in p.reason
    assert "~404.0 GiB split over 4 GPUs of one node" in p.reason
    assert "largest: 10.0.0.1 offers 320.0 GiB free on 4 GPUs" in p.reason


def test_simulated_gpus_are_not_split() -> None:
    node = NodeInfo(
        "sim",
        "127.0.0.1",
        4,
        64 * GIB,
        gpu_free_bytes=(64 * GIB,) * 4,
        gpu_names=("simulated on CPU",) * 4,
        simulated=("cuda",),
    )
    (p,) = plan([big("m", 100)], [node])
    assert p.status == "skipped_no_fit" and p.n_gpus == 1


def test_split_plans_are_deterministic_and_independent_of_node_order() -> None:
    nodes = [gpu_node("n1", 80, 80, 50), gpu_node("n2", 48, 48, 48, 48), mac_node("n3", 64)]
    demands = [big("b1", 140), demand("s1", 30), big("b2", 140), demand("s2", 40), big("b3", 90)]
    first = plan(demands, nodes)
    assert [(p.device_kind, p.node_id, p.n_gpus) for p in first] == [
        ("cuda", "n1", 2),
        ("cuda", "n1", 1),  # the 50 GiB GPU has the most free memory
        ("cuda", "n2", 4),  # 3 x 48 GiB would need 50.7 GiB on the lens GPU
        ("mps", "n3", 1),
        (None, None, 1),
    ]
    for order in (nodes[::-1], nodes[1:] + nodes[:1]):
        assert plan(demands, order) == first


def test_the_summary_says_how_many_gpus_a_split_model_took(tmp_path) -> None:
    from sweep.ledger import Ledger
    from sweep.run import _summary_table

    ledger = Ledger(tmp_path / "ledger.json", {"models": {}})
    ledger.models["big"] = {"status": "ok", "device": "cuda:0", "device_kind": "cuda", "n_gpus": 2}
    ledger.models["small"] = {
        "status": "ok",
        "device": "cuda:0",
        "device_kind": "cuda",
        "n_gpus": 1,
    }
    rows = {line.split()[0]: line.split()[2:] for line in _summary_table(ledger).splitlines()}
    assert rows["big"][:2] == ["cuda", "x2"] and rows["small"][0] == "cuda:0"
