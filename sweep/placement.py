"""Placement planner: each model to cuda -> mps -> cpu on a node whose free memory fits it.

A model larger than any one GPU takes the fewest whole GPUs of one node that hold it. A model on
a node's CPU reserves a share of that node's cores and runs torch on that many threads.

Pure: takes node snapshots and model estimates, returns placements that the driver turns into
Ray resource requests plus node affinity, so Ray itself does the scheduling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
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
    # The Ray resource an MPS actor asks for: "GPU" (Ray >= 2.60 counts an Apple GPU as one) or
    # "mps" (a custom resource, for older Ray); None with mps_free_bytes set reads as "mps".
    mps_resource: str | None = None
    accelerator_type: str | None = None  # Ray's accelerator_type:X resource: "H100", "M3-Pro"
    simulated: tuple[str, ...] = ()  # device kinds advertised but absent, simulated on CPU


@dataclass(frozen=True)
class ModelDemand:
    """One model's memory need per device kind (bytes), and any explicit device or dtype."""

    name: str
    est_bytes: dict[str, int]  # device kind -> estimated peak bytes in that kind's dtype
    dtype: dict[str, str]  # device kind -> dtype
    device: str | None = None
    # k >= 2 -> estimated peak bytes on each of k CUDA GPUs of one node, lens GPU first; for a
    # model that may need more than one GPU. Empty: one GPU or none.
    cuda_split: dict[int, tuple[int, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Placement:
    name: str
    status: str  # "planned" | "skipped_no_fit"
    device_kind: str | None = None
    node_id: str | None = None
    node_ip: str | None = None
    dtype: str | None = None
    est_bytes: int | None = None  # all devices together
    simulated: bool = False
    reason: str = ""
    gpu_share: float = 1.0  # fraction of one GPU (its memory) this model needs, for Ray
    n_gpus: int = 1  # whole CUDA GPUs of one node a model split across them takes
    est_bytes_per_gpu: tuple[int, ...] = ()  # a split model's estimate per GPU, lens GPU first
    mps_resource: str | None = None  # the Ray resource that holds an MPS device: "GPU" | "mps"
    # Whole CPUs Ray reserves for the actor; never more than its node has (see _share_cpus).
    cpus: int = 1

    def ray_options(self) -> dict[str, Any]:
        """Ray actor options: the resource that holds the device, pinned to the planned node."""
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        opts: dict[str, Any] = {
            # Ray sets OMP_NUM_THREADS to this in the worker; the actor sets torch to match.
            "num_cpus": self.cpus,
            "scheduling_strategy": NodeAffinitySchedulingStrategy(self.node_id, soft=False),
        }
        if self.device_kind == "cuda":
            # A fractional GPU lets Ray co-locate models whose memory fits together, as the
            # planner assumed; num_gpus=1 would serialise them. A split model takes whole GPUs.
            opts["num_gpus"] = self.n_gpus if self.n_gpus > 1 else self.gpu_share
        elif self.device_kind == "mps":
            if self.mps_resource == "GPU":
                opts["num_gpus"] = self.gpu_share
            else:
                opts["resources"] = {self.mps_resource or "mps": self.gpu_share}
        elif self.est_bytes:
            opts["memory"] = self.est_bytes
        return opts

    @property
    def device(self) -> str:
        # Ray narrows CUDA_VISIBLE_DEVICES to the GPUs it assigned, which are then cuda:0...
        return "cuda:0" if self.device_kind == "cuda" else str(self.device_kind)

    @property
    def devices(self) -> tuple[str, ...]:
        """The GPUs a split model's blocks go over, as the actor sees them; () for one device."""
        return tuple(f"cuda:{i}" for i in range(self.n_gpus)) if self.n_gpus > 1 else ()

    @property
    def torch_threads(self) -> int:
        """Intra-op threads for torch in the actor: its reserved CPUs, at least one."""
        return max(1, self.cpus)

    @property
    def label(self) -> str:
        """Where it runs, in words: "cuda", "cuda x2", "mps", "cpu"."""
        return f"{self.device_kind} x{self.n_gpus}" if self.n_gpus > 1 else str(self.device_kind)


# Free bytes per (node id, device kind, GPU index or 0) while planning.
_Slot = tuple[str, str, int]


@dataclass
class _Book:
    """The planner's bookkeeping: what is left where, and which GPUs hold a model already."""

    nodes: dict[str, NodeInfo]
    free: dict[_Slot, int] = field(default_factory=dict)
    capacity: dict[_Slot, int] = field(default_factory=dict)
    busy: set[_Slot] = field(default_factory=set)  # CUDA GPUs with a model: not whole any more

    @classmethod
    def of(cls, nodes: list[NodeInfo]) -> _Book:
        book = cls({n.node_id: n for n in nodes})
        for n in sorted(nodes, key=lambda n: n.node_id):
            for i, b in enumerate(n.gpu_free_bytes):
                book.free[(n.node_id, "cuda", i)] = b
            if n.mps_free_bytes is not None:
                book.free[(n.node_id, "mps", 0)] = n.mps_free_bytes
            book.free[(n.node_id, "cpu", 0)] = n.cpu_free_bytes
        book.capacity = dict(book.free)
        return book

    def take(self, key: _Slot, need: int) -> None:
        node = self.nodes[key[0]]
        self.free[key] -= need
        if _uses_ram(node, key[1]):
            # MPS unified memory and simulated devices draw on the node's RAM, as its CPU slot
            # does: one pool, so a placement on any of them shrinks all.
            for other in self.free:
                if other != key and other[0] == node.node_id and _uses_ram(node, other[1]):
                    self.free[other] = max(0, self.free[other] - need)

    def whole_gpus(self, node: NodeInfo) -> list[tuple[int, _Slot]]:
        """A node's real CUDA GPUs that hold no model yet, most free memory first."""
        if "cuda" in node.simulated:
            return []  # a simulated model runs on the CPU in one piece: nothing to split
        keys = [(node.node_id, "cuda", i) for i in range(len(node.gpu_free_bytes))]
        return sorted(((self.free[k], k) for k in keys if k not in self.busy), reverse=True)


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
    """Assign models in order; each takes memory from the slot it lands on (actors run at once).

    Per device kind in preference order: one device with the most free memory; for CUDA, if no
    single GPU fits, the fewest whole GPUs of one node that do (then the most free memory).
    """
    book = _Book.of(nodes)
    placements = []
    for d in demands:
        kinds = (d.device,) if d.device else DEVICE_ORDER
        chosen = None
        for kind in kinds:
            chosen = _place_single(d, kind, book)
            if chosen is None and kind == "cuda":
                chosen = _place_split(d, book)
            if chosen is not None:
                break
        if chosen is None:
            chosen = Placement(d.name, "skipped_no_fit", reason=_no_fit_reason(d, kinds, book))
        placements.append(chosen)
    return _share_cpus(placements, book.nodes)


def _share_cpus(placements: list[Placement], nodes: dict[str, NodeInfo]) -> list[Placement]:
    """Each planned model's CPU reservation: a CPU-placed model computes on its cores.

    Per node, with C its whole CPUs: a CUDA or MPS actor (simulated ones included) takes one
    CPU for its host-side work. The n CPU-placed models split what those leave, P (all C for a
    model alone): floor(P / n) each, and the P mod n cores left over go one each to the first
    of them in plan order (the manifest's), so the split is reproducible and uses every core.
    Each model gets at least one CPU and none more than C, so Ray can always grant the request
    (a node with more models than CPUs runs some in turn); a node with no whole CPU (C = 0)
    gets requests of 0, never one it cannot grant.
    """
    shared = []
    for p in placements:
        if p.status != "planned" or p.node_id is None:
            shared.append(p)
            continue
        whole = int(nodes[p.node_id].cpus)
        on_node = [q for q in placements if q.status == "planned" and q.node_id == p.node_id]
        on_cpu = [q.name for q in on_node if q.device_kind == "cpu"]
        if p.device_kind != "cpu":
            shared.append(replace(p, cpus=min(1, whole)))
            continue
        pool = max(0, whole - (len(on_node) - len(on_cpu)))
        base, extra = divmod(pool, len(on_cpu))
        cpus = base + (on_cpu.index(p.name) < extra)
        shared.append(replace(p, cpus=min(whole, max(1, cpus))))
    return shared


def _place_single(d: ModelDemand, kind: str, book: _Book) -> Placement | None:
    need = d.est_bytes[kind]
    fits = [(b, key) for key, b in book.free.items() if key[1] == kind and b >= need]
    if not fits:
        return None
    # Most free memory first; the slot key breaks ties so plans are reproducible.
    before, key = max(fits)
    node = book.nodes[key[0]]
    book.take(key, need)
    if kind == "cuda":
        book.busy.add(key)
    return Placement(
        d.name,
        "planned",
        kind,
        node.node_id,
        node.ip,
        d.dtype[kind],
        need,
        simulated=kind in node.simulated,
        reason=f"{kind} on {node.ip}: needs ~{_gib(need)} of {_gib(before)} free",
        gpu_share=_share(need, book.capacity[key]) if kind in ("cuda", "mps") else 1.0,
        mps_resource=(node.mps_resource or "mps") if kind == "mps" else None,
    )


def _place_split(d: ModelDemand, book: _Book) -> Placement | None:
    """The fewest whole GPUs of one node whose free memory holds the model split over them."""
    for k in sorted(d.cuda_split):
        needs = d.cuda_split[k]
        fits = []
        for node in book.nodes.values():
            gpus = book.whole_gpus(node)[:k]
            if len(gpus) == k and all(b >= n for (b, _), n in zip(gpus, needs, strict=True)):
                fits.append((sum(b for b, _ in gpus), node.node_id, gpus))
        if not fits:
            continue
        before, node_id, gpus = max(fits)
        node = book.nodes[node_id]
        for _, key in gpus:
            # Ray hands a whole GPU to one actor: nothing else can land on these any more.
            book.free[key] = 0
            book.busy.add(key)
        total = sum(needs)
        return Placement(
            d.name,
            "planned",
            "cuda",
            node.node_id,
            node.ip,
            d.dtype["cuda"],
            total,
            reason=(
                f"cuda x{k} on {node.ip}: needs ~{_gib(total)} ({_gib(needs[0])} on the lens GPU,"
                f" {_gib(needs[1])} on each other) of {_gib(before)} free on those {k} GPUs"
            ),
            n_gpus=k,
            est_bytes_per_gpu=tuple(needs),
        )
    return None


def _no_fit_reason(d: ModelDemand, kinds: tuple[str, ...], book: _Book) -> str:
    parts = []
    for kind in kinds:
        have = [b for key, b in book.free.items() if key[1] == kind]
        best = f"largest free {_gib(max(have))}" if have else "no such device in the cluster"
        part = f"{kind} needs ~{_gib(d.est_bytes[kind])} ({best})"
        if kind == "cuda" and d.cuda_split:
            part += _no_split_reason(d, book)
        parts.append(part)
    explicit = f"device = {d.device!r} was requested; " if d.device else ""
    return (
        f"{explicit}fits nowhere: "
        + "; ".join(parts)
        + ". Add memory, lower batch_size or pick a smaller dtype"
    )


def _no_split_reason(d: ModelDemand, book: _Book) -> str:
    offers = [
        (sum(b for b, _ in gpus), len(gpus), node.node_id)
        for node in book.nodes.values()
        if len(gpus := book.whole_gpus(node)) >= 2
    ]
    if not offers:
        return ", and no node has two GPUs free of other models to split it over"
    total, n, node_id = max(offers)
    k = min(n, max(d.cuda_split))
    return (
        f", or ~{_gib(sum(d.cuda_split[k]))} split over {k} GPUs of one node, and no node's GPUs"
        f" fit that (largest: {book.nodes[node_id].ip} offers {_gib(total)} free on {n} GPUs)"
    )
