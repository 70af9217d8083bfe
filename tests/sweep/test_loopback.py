"""A local sweep's Ray listens on loopback only: every server it starts binds to 127.0.0.1.

Regression: ``connect()`` passed ``_node_ip_address="127.0.0.1"``, but ``ray.init`` replaced it by
the machine's routable address, so GCS, raylet, object manager and workers listened on all
interfaces and the agents on the routable address (and the ledger recorded that address).

The driver runs in a subprocess of its own session, so a Ray that another test left initialised
in this process is never reused, and only what it started is looked at and stopped.
"""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parents[2]

DRIVER = """
import json, os, psutil, ray
from sweep.cluster import connect

connect(None, 1)


class Actor:
    def pid(self):
        return os.getpid()


ray.get(ray.remote(num_cpus=0)(lambda: os.getpid()).remote())  # a task's worker
env = {"env_vars": {"LOOPBACK_TEST": "1"}}  # an actor's own worker, as a sweep's actors have
actor = ray.remote(num_cpus=1)(Actor).options(runtime_env=env).remote()
ray.get(actor.pid.remote())
me = psutil.Process()
started = me.children(recursive=True)
listening = []
for p in [me, *started]:
    try:
        for c in p.net_connections(kind="inet"):
            if c.status == psutil.CONN_LISTEN or c.type == 2:  # TCP LISTEN, or a bound UDP socket
                listening.append([c.laddr.ip, c.laddr.port, p.name()])
    except psutil.NoSuchProcess:
        pass
node_ips = [n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]]
print(json.dumps({
    "listening": listening,
    "node_ips": node_ips,
    "started": [[p.pid, p.create_time()] for p in started],
}))
ray.shutdown()
"""


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)  # [::ffff:127.0.0.1]: an IPv6 socket on 127.0.0.1
    return (mapped or addr).is_loopback


def _stop_leftovers(started: list[list[float]]) -> list[str]:
    """Kill the processes the driver started that outlived it (exactly those); say which."""
    left = []
    for pid, created in started:
        try:
            p = psutil.Process(int(pid))
            if p.create_time() != created:
                continue  # the pid was reused by another process
            left.append(f"{pid} {p.name()}")
            p.kill()
        except psutil.NoSuchProcess:
            pass
    return left


def test_a_local_ray_listens_on_loopback_only():
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER], cwd=REPO_ROOT, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its session: the driver and the Ray it started
        proc.communicate()
        raise
    assert proc.returncode == 0, err[-3000:]
    found = json.loads(out.strip().splitlines()[-1])
    assert not _stop_leftovers(found["started"]), "Ray processes outlived ray.shutdown()"

    listening = found["listening"]
    names = {name for _, _, name in listening}
    # GCS, raylet (node manager, object manager), agents, a task's and an actor's worker.
    assert {"gcs_server", "raylet"} <= names, listening
    assert sum(name.startswith("ray::") for _, _, name in listening) >= 3, listening
    assert [s for s in listening if not _is_loopback(s[0])] == [], listening
    assert found["node_ips"] == ["127.0.0.1"]  # what the ledger records as the node's address
