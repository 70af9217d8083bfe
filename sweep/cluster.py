"""Ray connection and the per-node device probe that feeds the placement planner."""

from __future__ import annotations

import os
from typing import Any

from sweep.placement import NodeInfo


def _local_has_mps() -> bool:
    try:
        import torch

        return bool(torch.backends.mps.is_available())
    except ImportError:
        return False


def connect(address: str | None, num_cpus: int | None = None) -> dict[str, Any]:
    """Join the cluster at ``address`` (or RAY_ADDRESS), else start a local Ray on loopback.

    A local Ray on an Apple-silicon machine advertises a custom ``mps`` resource itself, since
    released Ray does not count Apple GPUs.
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
    resources = {"mps": 1} if _local_has_mps() else None
    ray.init(
        address="local",
        num_cpus=num_cpus,
        resources=resources,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        runtime_env=env,
        log_to_driver=False,
    )
    return {"address": "local", "local": True}


def _probe() -> dict[str, Any]:
    """Run on a node: its CUDA devices and free memory, MPS, and available RAM."""
    import psutil

    found: dict[str, Any] = {
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


def probe_nodes(simulate_missing_devices: bool = False) -> list[NodeInfo]:
    """Probe every alive node with a small pinned task and combine it with Ray's resources.

    A node that advertises GPUs or ``mps`` its probe cannot find is not planned on, unless
    ``simulate_missing_devices``: then the advertised device is offered with the node's RAM and
    the actor later runs on the CPU, recording the simulation.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote_probe = ray.remote(num_cpus=0)(_probe)
    alive = [n for n in ray.nodes() if n.get("Alive")]
    refs = [
        remote_probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote()
        for n in alive
    ]
    infos = []
    for node, found in zip(alive, ray.get(refs, timeout=120), strict=True):
        res = node.get("Resources", {})
        ram = min(found["ram_available"], int(res.get("memory", found["ram_available"])))
        gpus = tuple(g["free"] for g in found["cuda"])
        names = tuple(g["name"] for g in found["cuda"])
        simulated: list[str] = []
        if not gpus and res.get("GPU", 0) >= 1 and simulate_missing_devices:
            gpus, names = (ram,) * int(res["GPU"]), ("simulated on CPU",) * int(res["GPU"])
            simulated.append("cuda")
        mps = ram if (res.get("mps", 0) >= 1 and found["mps"]) else None
        if mps is None and res.get("mps", 0) >= 1 and simulate_missing_devices:
            mps = ram
            simulated.append("mps")
        infos.append(
            NodeInfo(
                node_id=node["NodeID"],
                ip=node.get("NodeManagerAddress", "?"),
                cpus=float(res.get("CPU", 0)),
                cpu_free_bytes=ram,
                gpu_free_bytes=gpus,
                gpu_names=names,
                mps_free_bytes=mps,
                simulated=tuple(simulated),
            )
        )
    return infos
