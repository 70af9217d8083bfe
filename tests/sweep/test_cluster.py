"""A real Ray cluster on this machine: placement by node, simulated devices, ``ray job submit``.

Two Ray nodes run on loopback (FIXTURES.md, "Ray 2.60 facts"), advertising what Ray 2.60 does
on a Mac and on a CUDA box: a head on 127.0.0.2 with one ``GPU`` of accelerator type ``M3-Pro``
(it also serves the dashboard on 127.0.0.1, for the job API) and a worker on 127.0.0.2 with one
``GPU`` of type ``H200``. Neither device exists, so ``--simulate-missing-devices`` plans on them
and the actors run on the CPU. The pure classification of a node's resources (custom ``mps``
resource of older Ray included) is tested first, without a cluster.

Isolation from other Ray instances on the same machine (other tests, other users):
- every node gets its own ``--temp-dir`` (so no ``/tmp/ray/ray_current_cluster`` is
  written that a bare ``ray.init()`` elsewhere could pick up) and explicit free ports;
- token auth uses a token of our own in ``RAY_AUTH_TOKEN``, never ``~/.ray/auth_token``;
- every ``ray start`` runs with ``--block`` in its own session, and teardown ends exactly that
  process tree (never ``ray stop``, which stops every Ray process of the user);
- the drivers run as subprocesses, so a Ray that another test left initialised in this
  process is never reused.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sweep.cluster import gpu_kind, node_info

REPO_ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
NODE_IP = "127.0.0.2"  # 127.0.0.1 is rewritten to the routable address: the worker never joins
DASHBOARD_HOST = "127.0.0.1"
START_TIMEOUT_S = 240  # a node start takes ~30 s on a busy 2-core machine
RUN_TIMEOUT_S = 600
MAC = "accelerator_type:M3-Pro"  # what Ray 2.60 adds beside GPU=1 on an M3 Pro
CUDA_BOX = "accelerator_type:H200"
# Uploaded with the job's working dir: none of these (.gitignore covers most; be explicit).
JOB_EXCLUDES = [
    ".venv",
    ".cache",
    ".git",
    "results",
    "*.egg-info",
    "__pycache__",
    ".pytest_cache",
    ".ruff_cache",
    ".mypy_cache",
    ".hypothesis",
]

PROMPTS = """
[[prompts]]
id = "capital-de"
text = "The capital of Germany is"
answer = "Berlin"
primary = true

[[prompts]]
id = "hello"
text = "Hello there"
"""


# ---- what a node's resources and probe say, without Ray ------------------------------------------

GIB = 2**30


def _ray_node(**resources: float) -> dict[str, Any]:
    return {"NodeID": "ab" * 28, "NodeManagerAddress": "10.0.0.7", "Resources": resources}


def _found(cuda: int = 0, mps: bool = False, ram_gib: float = 64) -> dict[str, Any]:
    gpus = [{"free": 80 * GIB, "name": "NVIDIA H100 80GB HBM3"} for _ in range(cuda)]
    return {"ram_available": int(ram_gib * GIB), "cuda": gpus, "mps": mps}


@pytest.mark.parametrize(
    ("resources", "cuda_found", "mps_found", "kind"),
    [
        ({}, 0, False, None),
        ({"mps": 1}, 0, True, None),  # older Ray on a Mac: no GPU, a custom resource
        ({"GPU": 1, "accelerator_type:M1": 1}, 0, True, "mps"),
        ({"GPU": 1, "accelerator_type:M2-Pro": 1}, 0, False, "mps"),
        ({"GPU": 1, "accelerator_type:M4-Ultra": 1}, 0, False, "mps"),
        ({"GPU": 1, "accelerator_type:Apple-Silicon": 1}, 0, False, "mps"),
        ({"GPU": 1}, 0, True, "mps"),  # no type: the probe finds MPS and no CUDA
        ({"GPU": 1}, 0, False, "cuda"),
        ({"GPU": 8, "accelerator_type:H100": 1}, 8, False, "cuda"),
        ({"GPU": 8, "accelerator_type:H100": 1}, 0, False, "cuda"),  # absent, but NVIDIA's
        ({"GPU": 1, "accelerator_type:H200": 1}, 0, True, "cuda"),  # never MPS on NVIDIA
        ({"GPU": 2, "accelerator_type:M60": 1}, 0, False, "cuda"),  # Tesla M60, not Apple
        ({"GPU": 1, "accelerator_type:M3-Max": 1}, 1, False, "cuda"),  # CUDA found wins
    ],
)
def test_gpu_kind_from_resources_and_probe(
    resources: dict[str, float], cuda_found: int, mps_found: bool, kind: str | None
) -> None:
    assert gpu_kind(resources, cuda_found, mps_found) == kind


def test_a_mac_on_ray_2_60_offers_mps_through_its_gpu_resource() -> None:
    mac = _ray_node(CPU=12, GPU=1, memory=40 * GIB, **{MAC: 1})
    n = node_info(mac, _found(mps=True), simulate=False)
    assert (n.mps_free_bytes, n.mps_resource, n.accelerator_type) == (40 * GIB, "GPU", "M3-Pro")
    assert (n.gpu_free_bytes, n.simulated, n.cpu_free_bytes) == ((), (), 40 * GIB)
    # Regression: a Mac's GPU was read as a CUDA GPU, and simulated as one.
    for simulate in (False, True):
        n = node_info(mac, _found(mps=False), simulate)
        assert n.gpu_free_bytes == ()
        assert (n.mps_free_bytes is not None, n.simulated) == (
            (True, ("mps",)) if simulate else (False, ())
        )


def test_a_mac_on_older_ray_offers_mps_through_the_custom_resource() -> None:
    n = node_info(_ray_node(CPU=8, mps=1), _found(mps=True, ram_gib=16), simulate=False)
    assert (n.mps_free_bytes, n.mps_resource, n.gpu_free_bytes) == (16 * GIB, "mps", ())
    n = node_info(_ray_node(CPU=8, mps=1), _found(), simulate=True)
    assert (n.mps_resource, n.simulated) == ("mps", ("mps",))
    assert node_info(_ray_node(CPU=8, mps=1), _found(), simulate=False).mps_free_bytes is None


def test_an_nvidia_node_offers_cuda_and_never_mps() -> None:
    box = _ray_node(CPU=64, GPU=2, mps=1, **{"accelerator_type:H100": 1})
    n = node_info(box, _found(cuda=2), simulate=True)
    assert n.gpu_free_bytes == (80 * GIB, 80 * GIB) and n.gpu_names[0].startswith("NVIDIA")
    assert (n.mps_free_bytes, n.mps_resource, n.simulated) == (None, None, ())
    n = node_info(box, _found(), simulate=True)
    assert (n.gpu_free_bytes, n.simulated) == ((64 * GIB,) * 2, ("cuda",))
    assert n.mps_free_bytes is None
    assert node_info(box, _found(), simulate=False).gpu_free_bytes == ()


def test_local_ray_adds_the_mps_resource_only_where_ray_does_not_count_the_apple_gpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ray._private.accelerators import AppleGPUAcceleratorManager

    import sweep.cluster as cluster_mod

    seen: list[Any] = []

    class _Ray:
        @staticmethod
        def is_initialized() -> bool:
            return False

        @staticmethod
        def init(**kwargs: Any) -> None:
            seen.append(kwargs.get("resources"))

        @staticmethod
        def get_runtime_context() -> Any:
            return type("Context", (), {"get_node_id": staticmethod(lambda: "ab" * 28)})

    monkeypatch.setitem(sys.modules, "ray", _Ray)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(cluster_mod, "_local_has_mps", lambda: True)
    for counted, expected in ((1, None), (0, {"mps": 1})):
        monkeypatch.setattr(
            AppleGPUAcceleratorManager, "get_current_node_num_accelerators", lambda n=counted: n
        )
        cluster_mod.connect(None)
        assert seen.pop() == expected


# ---- a local Ray ------------------------------------------------------------------------------


def test_a_local_ray_is_probed_in_the_driver_as_a_task_would_find_it() -> None:
    # The node connect() started is this machine: no worker needs to start and import torch
    # to look at it. What the driver finds must be what a task on that node finds.
    driver = """
import json, os, ray
from sweep.cluster import _probe, connect, probe_findings, probe_nodes
connect(None, 1)
[(node, here)] = probe_findings()
there = ray.get(ray.remote(num_cpus=0)(_probe).remote())
[info] = probe_nodes()
print(json.dumps({"driver": os.getpid(), "here": here, "there": there, "cpus": info.cpus,
                  "node": node["NodeID"] == info.node_id}))
ray.shutdown()
"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = _run([sys.executable, "-c", driver], REPO_ROOT, env)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    here, there = found["here"], found["there"]
    assert here["pid"] == found["driver"] != there["pid"]
    assert {k: v for k, v in here.items() if k not in ("pid", "ram_available")} == {
        k: v for k, v in there.items() if k not in ("pid", "ram_available")
    }
    assert (found["cpus"], found["node"]) == (1.0, True)


# ---- a two-node cluster -----------------------------------------------------------------------


def _ray_cli() -> Path:
    for candidate in (VENV_BIN / "ray", shutil.which("ray")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    pytest.skip("the `ray` CLI is not installed beside this Python (pip install 'ray[default]')")


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _require_loopback_alias() -> None:
    try:
        _free_port(NODE_IP)
    except OSError as exc:  # macOS has only 127.0.0.1 unless an alias is added
        pytest.skip(f"cannot bind {NODE_IP} ({exc}); a two-node cluster on one machine needs it")


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn (Linux): SIGTERM the child when pytest dies, so no cluster outlives us.

    libc is looked up here, in the parent: the child runs only the foreign call.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl, pr_set_pdeathsig, sigterm = ctypes.CDLL(None).prctl, 1, int(signal.SIGTERM)
    return lambda: prctl(pr_set_pdeathsig, sigterm)


def _tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"({path} unreadable)"


@dataclass
class _RayNode:
    """One ``ray start --block`` process and the tree it spawns; ``stop`` ends exactly those."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    temp_dir: Path

    @classmethod
    def start(cls, name: str, args: list[str], env: dict[str, str], root: Path) -> _RayNode:
        temp_dir = Path(tempfile.mkdtemp(prefix=f"rt{name[0]}-", dir="/tmp"))  # short: sockets
        log = root / f"ray-{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [str(_ray_cli()), "start", *args, f"--temp-dir={temp_dir}", "--block"],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent(),
            )
        node = cls(name, proc, log, temp_dir)
        try:
            node._wait_started()
        except BaseException:
            node.stop()
            raise
        return node

    def _wait_started(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if "Ray runtime started" in self.log.read_text(errors="replace"):
                return
            if self.proc.poll() is not None:
                pytest.fail(
                    f"ray start ({self.name}) exited {self.proc.returncode}:\n{_tail(self.log)}"
                )
            time.sleep(0.5)
        pytest.fail(f"ray start ({self.name}) not up after {START_TIMEOUT_S} s:\n{_tail(self.log)}")

    def stop(self) -> None:
        """SIGTERM ``ray start`` (it shuts its children down), then end whatever outlives it."""
        import psutil

        def running(procs: list[psutil.Process]) -> list[psutil.Process]:
            alive = []
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                        alive.append(p)
            return alive

        try:
            root = psutil.Process(self.proc.pid)
            tree = [root, *root.children(recursive=True)]  # before the raylet's workers reparent
        except psutil.NoSuchProcess:
            tree = []
        for sig, procs in (
            (signal.SIGTERM, tree[:1]),
            (signal.SIGTERM, tree),
            (signal.SIGKILL, tree),
        ):
            for p in running(procs):
                with contextlib.suppress(psutil.Error):
                    p.send_signal(sig)
            deadline = time.monotonic() + 20
            while running(procs) and time.monotonic() < deadline:
                time.sleep(0.2)
            if not running(tree):
                break
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@dataclass
class Cluster:
    address: str  # GCS, for --address
    dashboard: str  # http://127.0.0.1:PORT, for ray job submit
    env: dict[str, str]
    token: str
    logs: Path
    nodes: list[_RayNode] = field(default_factory=list)

    def api(self, path: str) -> Any:
        request = urllib.request.Request(
            self.dashboard + path, headers={"Authorization": f"Bearer {self.token}"}
        )
        no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with no_proxy.open(request, timeout=30) as response:
            return json.loads(response.read())

    def alive_nodes(self) -> list[dict[str, Any]]:
        """Ray's own view (state API): node_id, resources_total, state, per node."""
        rows = self.api("/api/v0/nodes?limit=100")["data"]["result"]["result"]
        return [r for r in rows if r.get("state") == "ALIVE"]

    def node_with(self, resource: str) -> str:
        ids = [n["node_id"] for n in self.alive_nodes() if n["resources_total"].get(resource)]
        assert len(ids) == 1, f"expected one node with {resource}: {self.alive_nodes()}"
        return ids[0]


def _cluster_env(token: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(
        PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # the job's `python` is this one
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        RAY_USAGE_STATS_ENABLED="0",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # else SIGTERM waits 30 s for a drain
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    loopback = f"127.0.0.1,{NODE_IP},localhost"  # `ray job submit` must not go through a proxy
    for key in ("NO_PROXY", "no_proxy"):
        env[key] = ",".join(filter(None, (env.get(key), loopback)))
    return env


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Head (a Mac-like GPU, dashboard) + worker (a CUDA-like GPU), 1 CPU each, on loopback."""
    _ray_cli()
    _require_loopback_alias()
    token = secrets.token_hex(32)
    env = _cluster_env(token)
    logs = tmp_path_factory.mktemp("ray-cluster")
    port, dash = _free_port(NODE_IP), _free_port(DASHBOARD_HOST)
    common = ["--num-cpus=1", "--object-store-memory=100000000", "--disable-usage-stats"]
    c = Cluster(f"{NODE_IP}:{port}", f"http://{DASHBOARD_HOST}:{dash}", env, token, logs)
    try:
        c.nodes.append(
            _RayNode.start(
                "head",
                [
                    "--head",
                    f"--node-ip-address={NODE_IP}",
                    f"--port={port}",
                    "--num-gpus=1",
                    f"--resources={json.dumps({MAC: 1})}",
                    "--include-dashboard=true",
                    f"--dashboard-host={DASHBOARD_HOST}",
                    f"--dashboard-port={dash}",
                    f"--ray-client-server-port={_free_port(NODE_IP)}",
                    f"--dashboard-agent-listen-port={_free_port(NODE_IP)}",
                    *common,
                ],
                env,
                logs,
            )
        )
        c.nodes.append(
            _RayNode.start(
                "worker",
                [
                    f"--address={c.address}",
                    f"--node-ip-address={NODE_IP}",
                    "--num-gpus=1",
                    f"--resources={json.dumps({CUDA_BOX: 1})}",
                    f"--dashboard-agent-listen-port={_free_port(NODE_IP)}",
                    *common,
                ],
                env,
                logs,
            )
        )
        _wait_for_two_nodes(c)
        yield c
    finally:
        for node in reversed(c.nodes):
            node.stop()


def _wait_for_two_nodes(c: Cluster) -> None:
    deadline, last = time.monotonic() + START_TIMEOUT_S, ""
    while time.monotonic() < deadline:
        try:
            nodes = c.alive_nodes()
            if len(nodes) == 2:
                return
            last = f"{len(nodes)} alive node(s)"
        except Exception as exc:  # the dashboard is still starting
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(1)
    logs = "\n".join(_tail(n.log, 20) for n in c.nodes)
    pytest.fail(f"the two-node cluster did not come up ({last}):\n{logs}")


def _manifest(path: Path, models: dict[str, tuple[Path, str | None]]) -> Path:
    body = '[sweep]\nname = "cluster"\nbatch_size = 2\ntop_k = 5\n'
    for name, (directory, device) in models.items():
        body += f'\n[[models]]\nname = "{name}"\nid = "{directory}"\n'
        if device:
            body += f'device = "{device}"\n'
    path.write_text(body + PROMPTS)
    return path


def _sweep(c: Cluster, manifest: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "sweep.run", str(manifest), "--address", c.address]
    cmd += ["--out", str(out), "--no-progress", *extra]
    return _run(cmd, REPO_ROOT, c.env)


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cmd,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        preexec_fn=_die_with_parent(),
    )


def _read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def test_simulated_devices_place_each_model_on_the_node_that_advertises_it(
    cluster: Cluster, tiny_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    # Both nodes advertise GPU=1, as Ray 2.60 does on a Mac and on a CUDA box; only the
    # accelerator type tells them apart. Each model asks for its kind explicitly.
    llama = tiny_checkpoints["llama"]
    manifest = _manifest(tmp_path / "m.toml", {"gpu": (llama, "cuda"), "mps": (llama, "mps")})
    out = tmp_path / "results"

    done = _sweep(cluster, manifest, out, "--simulate-missing-devices")

    assert done.returncode == 0, done.stdout + done.stderr
    run = out / "run-latest"
    ledger = _read(run / "ledger.json")
    assert ledger["cluster"]["local"] is False
    gpu_node, mps_node = cluster.node_with(CUDA_BOX), cluster.node_with(MAC)
    assert gpu_node != mps_node
    nodes = {n["node_id"]: n for n in ledger["nodes"]}
    assert set(nodes) == {gpu_node, mps_node}
    assert nodes[gpu_node]["simulated"] == ["cuda"] and len(nodes[gpu_node]["gpu_free_bytes"]) == 1
    assert nodes[gpu_node]["mps_free_bytes"] is None  # never MPS on an NVIDIA GPU
    assert nodes[gpu_node]["accelerator_type"] == "H200"
    assert nodes[mps_node]["simulated"] == ["mps"] and nodes[mps_node]["mps_free_bytes"] > 0
    assert nodes[mps_node]["gpu_free_bytes"] == []  # never CUDA on an Apple GPU
    assert (nodes[mps_node]["mps_resource"], nodes[mps_node]["accelerator_type"]) == (
        "GPU",
        "M3-Pro",
    )

    for name, kind, node in (("gpu", "cuda", gpu_node), ("mps", "mps", mps_node)):
        entry = ledger["models"][name]
        assert entry["status"] == "ok", entry
        assert entry["device_kind"] == kind
        assert entry["node_id"] == node
        assert entry["node_ip"] == NODE_IP
        assert entry["n_gpus"] == 1
        assert entry["device"] == "cpu"
        assert entry["simulated_device"].startswith(kind)
        output = _read(run / f"output-{name}.json")
        assert output["diagnostics"]["device"] == "cpu"
        assert output["diagnostics"]["simulated_device"].startswith(kind)
        assert output["placement"]["node_id"] == node
        assert output["placement"]["device_kind"] == kind


def test_ray_job_submit_runs_the_sweep_on_the_cluster_and_skips_absent_devices(
    cluster: Cluster, tiny_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    # No --simulate-missing-devices: the advertised GPU and mps are absent, so the planner
    # must not use them and the model lands on a CPU.
    manifest = _manifest(tmp_path / "m.toml", {"job": (tiny_checkpoints["llama"], None)})
    out = tmp_path / "results"  # absolute: the job runs in an uploaded copy of the repo
    cmd = [str(_ray_cli()), "job", "submit", "--address", cluster.dashboard]
    cmd += ["--working-dir", str(REPO_ROOT)]
    cmd += ["--runtime-env-json", json.dumps({"excludes": JOB_EXCLUDES})]
    cmd += ["--", "python", "-m", "sweep.run", str(manifest), "--out", str(out), "--no-progress"]

    done = _run(cmd, tmp_path, cluster.env)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "succeeded" in done.stdout, done.stdout
    run = out / "run-latest"
    for artefact in (
        "ledger.json",
        "output-job.json",
        "output-job-records.csv",
        "output-job-pure-next-token.csv",
        "records-job.parquet",
        "cross-model-summary.csv",
    ):
        assert (run / artefact).is_file(), sorted(p.name for p in run.iterdir())
    ledger = _read(run / "ledger.json")
    assert ledger["cluster"]["local"] is False  # it joined the cluster through RAY_ADDRESS
    assert len(ledger["nodes"]) == 2
    for node in ledger["nodes"]:
        assert node["simulated"] == []
        assert node["gpu_free_bytes"] == []
        assert node["mps_free_bytes"] is None
    entry = ledger["models"]["job"]
    assert entry["status"] == "ok", entry
    assert entry["device_kind"] == "cpu"
    assert entry["node_id"] in {n["node_id"] for n in cluster.alive_nodes()}
    assert not entry.get("simulated_device")
    assert not _read(run / "output-job.json")["diagnostics"].get("simulated_device")
