"""Placement planner: each model to cuda -> mps -> cpu on a node whose free memory fits it.

Pure: takes node snapshots and model estimates, returns placements that the driver turns into
Ray resource requests plus node affinity, so Ray itself does the scheduling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

DEVICE_ORDER = ("cuda", "mps", "cpu")
DEFAULT_DTYPE = {"cuda": "float16", "mps": "float16", "cpu": "float32"}


@dataclass(frozen=True)
class NodeInfo:
    """What one Ray node offers, from Ray's resources and a probe task run on it."""

    node_id: str
    ip: str
    cpus: float
    cpu_free_bytes: int  # min(available RAM, Ray's unreserved memory resource)
    gpu_free_bytes: tuple[int, ...] = ()  # per CUDA device
    gpu_names: tuple[str, ...] = ()
    mps_free_bytes: int | None = None  # unified memory usable by MPS; None: no MPS
    simulated: tuple[str, ...] = ()  # device kinds advertised but absent, simulated on CPU


@dataclass(frozen=True)
class ModelDemand:
    """One model's memory need per device kind (bytes), and any explicit device or dtype."""

    name: str
    est_bytes: dict[str, int]  # device kind -> estimated peak bytes in that kind's dtype
    dtype: dict[str, str]  # device kind -> dtype
    device: str | None = None


@dataclass(frozen=True)
class Placement:
    name: str
    status: str  # "planned" | "skipped_no_fit"
    device_kind: str | None = None
    node_id: str | None = None
    node_ip: str | None = None
    dtype: str | None = None
    est_bytes: int | None = None
    simulated: bool = False
    reason: str = ""
    gpu_share: float = 1.0  # fraction of one GPU (its memory) this model needs, for Ray

    def ray_options(self) -> dict[str, Any]:
        """Ray actor options: the resource that holds the device, pinned to the planned node."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        opts: dict[str, Any] = {
            "num_cpus": 1,
            "scheduling_strategy": NodeAffinitySchedulingStrategy(self.node_id, soft=False),
        }
        if self.device_kind == "cuda":
            # A fractional GPU lets Ray co-locate models whose memory fits together, as the
            # planner assumed; num_gpus=1 would serialise them.
            opts["num_gpus"] = self.gpu_share
        elif self.device_kind == "mps":
            opts["resources"] = {"mps": 1}
        elif self.est_bytes:
            opts["memory"] = self.est_bytes
        return opts

    @property
    def device(self) -> str:
        # Ray narrows CUDA_VISIBLE_DEVICES to the GPU it assigned, which is then cuda:0.
        return "cuda:0" if self.device_kind == "cuda" else str(self.device_kind)


# Remaining free bytes per (node id, device kind, GPU index or 0) while planning.
_Slots = dict[tuple[str, str, int], int]


def _uses_ram(node: NodeInfo, kind: str) -> bool:
    return kind in ("cpu", "mps") or kind in node.simulated


def _share(need: int, capacity: int) -> float:
    """need / capacity rounded up to a hundredth, in [0.01, 1]."""
    if capacity <= 0:
        return 1.0
    return min(1.0, max(0.01, math.ceil(100 * need / capacity) / 100))


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def plan(demands: list[ModelDemand], nodes: list[NodeInfo]) -> list[Placement]:
    """Assign models in order; each takes memory from the slot it lands on (actors run at once)."""
    free: _Slots = {}
    by_node = {n.node_id: n for n in nodes}
    gpu_capacity = {
        (n.node_id, "cuda", i): b for n in nodes for i, b in enumerate(n.gpu_free_bytes)
    }
    for n in sorted(nodes, key=lambda n: n.node_id):
        for i, b in enumerate(n.gpu_free_bytes):
            free[(n.node_id, "cuda", i)] = b
        if n.mps_free_bytes is not None:
            free[(n.node_id, "mps", 0)] = n.mps_free_bytes
        free[(n.node_id, "cpu", 0)] = n.cpu_free_bytes
    placements = []
    for d in demands:
        kinds = (d.device,) if d.device else DEVICE_ORDER
        chosen = None
        for kind in kinds:
            need = d.est_bytes[kind]
            fits = [(b, key) for key, b in free.items() if key[1] == kind and b >= need]
            if fits:
                # Most free memory first; the slot key breaks ties so plans are reproducible.
                before, key = max(fits, key=lambda f: (f[0], f[1]))
                node = by_node[key[0]]
                free[key] = before - need
                if _uses_ram(node, kind):
                    # MPS unified memory and simulated devices draw on the node's RAM, as its
                    # CPU slot does: one pool, so a placement on any of them shrinks all.
                    for other in free:
                        if other != key and other[0] == node.node_id and _uses_ram(node, other[1]):
                            free[other] = max(0, free[other] - need)
                chosen = Placement(
                    d.name,
                    "planned",
                    kind,
                    node.node_id,
                    node.ip,
                    d.dtype[kind],
                    need,
                    simulated=kind in node.simulated,
                    reason=f"{kind} on {node.ip}: needs ~{_gib(need)} of {_gib(before)} free",
                    gpu_share=_share(need, gpu_capacity.get(key, 0)) if kind == "cuda" else 1.0,
                )
                break
        if chosen is None:
            chosen = Placement(d.name, "skipped_no_fit", reason=_no_fit_reason(d, kinds, free))
        placements.append(chosen)
    return placements


def _no_fit_reason(d: ModelDemand, kinds: tuple[str, ...], free: _Slots) -> str:
    parts = []
    for kind in kinds:
        have = [b for key, b in free.items() if key[1] == kind]
        best = f"largest free {_gib(max(have))}" if have else "no such device in the cluster"
        parts.append(f"{kind} needs ~{_gib(d.est_bytes[kind])} ({best})")
    explicit = f"device = {d.device!r} was requested; " if d.device else ""
    return (
        f"{explicit}fits nowhere: "
        + "; ".join(parts)
        + ". Add memory, lower batch_size or pick a smaller dtype"
    )
