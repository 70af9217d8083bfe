"""Ray connection and the per-node device probe that feeds the placement planner."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

from sweep.placement import NodeInfo

ACCELERATOR_PREFIX = "accelerator_type:"
# Ray's names for Apple chips ("M1", "M2-Pro", "M3-Max", "M4-Ultra", or "Apple-Silicon"). One
# digit: NVIDIA's old Tesla M40 / M60 come out as "M40" / "M60".
APPLE_CHIP = re.compile(r"M\d(-(Pro|Max|Ultra))?|Apple-Silicon")
LOOPBACK = "127.0.0.1"
# Ids of the Ray nodes connect() started in this process: the driver probes those itself.
_started_here: set[str] = set()


def _local_has_mps() -> bool:
    try:
        import torch

        return bool(torch.backends.mps.is_available())
    except ImportError:
        return False


def _ray_counts_apple_gpu() -> bool:
    """Whether this Ray advertises this machine's Apple GPU as ``GPU`` itself (Ray >= 2.60)."""
    try:
        from ray._private.accelerators import AppleGPUAcceleratorManager
    except ImportError:
        return False
    return AppleGPUAcceleratorManager.get_current_node_num_accelerators() > 0


def connect(address: str | None, num_cpus: int | None = None) -> dict[str, Any]:
    """Join the cluster at ``address`` (or RAY_ADDRESS), else start a local Ray on loopback.

    On an Apple-silicon machine a Ray that counts Apple GPUs advertises ``GPU`` itself; an older
    one gets a custom ``mps`` resource from us instead.
    """
    import ray

    if ray.is_initialized():
        return {"address": "already connected"}
    address = address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}}
    if address:
        # A job's own runtime env (ray job submit) applies; adding env_vars here would conflict.
        ray.init(address=address, log_to_driver=False)
        return {"address": address, "local": False}
    resources = {"mps": 1} if _local_has_mps() and not _ray_counts_apple_gpu() else None
    # Ray serves Prometheus metrics without auth on 0.0.0.0; a local sweep does not need them.
    # Ray's processes inherit this (set it to 1 beforehand to keep them).
    os.environ.setdefault("RAY_enable_metrics_collection", "0")
    with _loopback_node_address():
        ray.init(
            address="local",
            num_cpus=num_cpus,
            resources=resources,
            include_dashboard=False,
            _node_ip_address=LOOPBACK,
            runtime_env=env,
            log_to_driver=False,
            # Ray starts idle workers for the first driver, one per core up to its start-up
            # limit. The actors never use them (each has a runtime env of its own), and their
            # start competes with the actors' (2 busy cores: ~0.6 s a run, 6 of 7 pairs).
            _system_config={"prestart_worker_first_driver": False},
        )
    _started_here.add(ray.get_runtime_context().get_node_id())
    return {"address": "local", "local": True}


@contextlib.contextmanager
def _loopback_node_address() -> Iterator[None]:
    """Keep 127.0.0.1 as the node's address while ``ray.init`` starts a local Ray.

    Ray's servers listen on loopback only where the node's address is 127.0.0.1 (GCS, raylet,
    object manager and workers: their gRPC servers; the agents: ``is_localhost``), else on all
    interfaces. But ``ray.init`` replaces 127.0.0.1 by the machine's routable address
    (``resolve_ip_for_localhost``) unless Ray's multi-node support is off, as it is by default
    on macOS and Windows. Turned off here for the start only: it is read nowhere else in the
    driver, and Ray's processes are given the address explicitly.
    """
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def _probe() -> dict[str, Any]:
    """Run on a node: its CUDA devices and free memory, MPS, and available RAM.

    ``pid``: the process that probed (the driver, or a task's worker).
    """
    import psutil

    found: dict[str, Any] = {
        "pid": os.getpid(),
        "ram_available": int(psutil.virtual_memory().available),
        "cuda": [],
        "mps": False,
    }
    try:
        import torch

        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                free, _total = torch.cuda.mem_get_info(i)
                found["cuda"].append({"free": int(free), "name": torch.cuda.get_device_name(i)})
        found["mps"] = bool(torch.backends.mps.is_available())
    except ImportError:
        found["torch"] = "missing"
    return found


def accelerator_types(resources: Mapping[str, float]) -> list[str]:
    """The accelerator types a node advertises (``accelerator_type:H100`` -> ``H100``)."""
    return sorted(
        k[len(ACCELERATOR_PREFIX) :] for k in resources if k.startswith(ACCELERATOR_PREFIX)
    )


def gpu_kind(resources: Mapping[str, float], cuda_found: int, mps_found: bool) -> str | None:
    """What a node's Ray ``GPU`` resource stands for: "cuda", "mps" (an Apple GPU) or None.

    CUDA devices the probe finds make it CUDA. Otherwise an Apple accelerator type makes it
    Apple's, any other accelerator type (``H100``) CUDA; without a type, a GPU the probe finds
    only MPS on is Apple's (a Ray that reports no type), and any other is taken for CUDA.
    None: the node advertises no GPU and the probe finds none.
    """
    if cuda_found:
        return "cuda"
    if resources.get("GPU", 0) <= 0:
        return None
    types = accelerator_types(resources)
    if any(APPLE_CHIP.fullmatch(t) for t in types):
        return "mps"
    if types:
        return "cuda"
    return "mps" if mps_found else "cuda"


def node_info(node: Mapping[str, Any], found: Mapping[str, Any], simulate: bool) -> NodeInfo:
    """One node's offer, from its ``ray.nodes()`` row and its probe's findings.

    MPS is requested as Ray's ``GPU`` where that GPU is Apple's, else as a custom ``mps``
    resource where the node advertises one (older Ray); never on a node whose GPU is CUDA.
    A device advertised but not found is offered only when ``simulate``, with the node's RAM.
    """
    res = node.get("Resources", {})
    ram = min(found["ram_available"], int(res.get("memory", found["ram_available"])))
    gpus = tuple(g["free"] for g in found["cuda"])
    names = tuple(g["name"] for g in found["cuda"])
    kind = gpu_kind(res, len(gpus), bool(found["mps"]))
    simulated: list[str] = []
    if not gpus and kind == "cuda" and simulate:
        n = int(res["GPU"]) or 1
        gpus, names = (ram,) * n, ("simulated on CPU",) * n
        simulated.append("cuda")
    mps_resource = None
    if kind == "mps":
        mps_resource = "GPU"
    elif kind != "cuda" and res.get("mps", 0) > 0:
        mps_resource = "mps"
    mps = ram if mps_resource and found["mps"] else None
    if mps_resource and mps is None and simulate:
        mps = ram
        simulated.append("mps")
    types = accelerator_types(res)
    return NodeInfo(
        node_id=node["NodeID"],
        ip=node.get("NodeManagerAddress", "?"),
        cpus=float(res.get("CPU", 0)),
        cpu_free_bytes=ram,
        gpu_free_bytes=gpus,
        gpu_names=names,
        mps_free_bytes=mps,
        mps_resource=mps_resource if mps is not None else None,
        accelerator_type=types[0] if types else None,
        simulated=tuple(simulated),
    )


def _driver_may_probe() -> bool:
    """Whether the driver can probe its own node: not where that means a CUDA context.

    Reading a GPU's free memory creates a context of a few hundred MiB on it, which the
    driver would hold for the whole run; a probe task's worker holds it instead.
    """
    try:
        import torch
    except ImportError:
        return True
    return not torch.cuda.is_available()


def probe_nodes(simulate_missing_devices: bool = False) -> list[NodeInfo]:
    """Probe every alive node and combine what it finds with Ray's resources.

    A node that ``connect`` started in this process is probed here (no worker to start and no
    torch to import there); any other node by a small task pinned to it. A node that advertises
    GPUs or ``mps`` its probe cannot find is not planned on, unless
    ``simulate_missing_devices``: then the advertised device is offered with the node's RAM and
    the actor later runs on the CPU, recording the simulation (see ``node_info``).
    """
    found = probe_findings()
    return [node_info(node, f, simulate_missing_devices) for node, f in found]


def probe_findings() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """Each alive node's ``ray.nodes()`` row and what its probe found there."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote_probe = ray.remote(num_cpus=0)(_probe)
    alive = [n for n in ray.nodes() if n.get("Alive")]
    here = {n["NodeID"] for n in alive if n["NodeID"] in _started_here and _driver_may_probe()}
    refs = {
        n["NodeID"]: remote_probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote()
        for n in alive
        if n["NodeID"] not in here
    }
    found = dict(zip(refs, ray.get(list(refs.values()), timeout=120), strict=True))
    found.update({node_id: _probe() for node_id in here})
    return [(n, found[n["NodeID"]]) for n in alive]
