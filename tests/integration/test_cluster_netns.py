"""The namespace cluster (loadtests/cluster.py): real hosts on a bridge, real `ray start`
nodes joined with the cluster's auth token, Postgres and Redis on their own host, faults,
and a teardown that leaves nothing behind.

Needs root and iproute2; run with ``pytest -m cluster``. Ray drivers run inside the head
namespace (a driver needs a raylet on its own address), as separate processes so this
module never touches the Ray instance other tests in the session hold.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import psutil
import pytest

from tests.helpers import scaled

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ip") is None,
        reason="the namespace cluster needs root and iproute2 (`ip netns`)",
    ),
]


def _prefix() -> str:
    # Unique per run: another run (or a drill) on this machine may have its own cluster up.
    return f"dsp-t{uuid.uuid4().hex[:4]}-"


@pytest.fixture(scope="module")
def cluster():
    from loadtests.cluster import Cluster

    prefix = _prefix()
    state_dir = Path(f"/tmp/{prefix}state")
    c = Cluster(shard_hosts=2, edge_hosts=0, shard_cpus=1, prefix=prefix, state_dir=state_dir)
    with c:
        yield c
    shutil.rmtree(state_dir, ignore_errors=True)  # kept (with its logs) when a test failed


def driver(cluster, body: str, timeout_s: float = 60.0) -> dict:
    """Run ``body`` as a Ray driver on the head host; it assigns ``out`` (a dict), returned."""
    code = (
        "import json, time, ray\n"
        "ray.init(logging_level='WARNING', log_to_driver=False)\n"
        f"DEADLINE = time.monotonic() + {scaled(timeout_s)}\n"
        "out = {}\n" + textwrap.dedent(body) + "\nprint('OUT ' + json.dumps(out))\n"
    )
    proc = cluster.python("head", code, timeout_s=scaled(timeout_s) + 60)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("OUT ")]
    assert proc.returncode == 0 and lines, f"driver failed ({proc.returncode}): {proc.stderr[-3000:]}"
    return json.loads(lines[-1][4:])


def _reachable(cluster, from_host: str, ip: str, port: int) -> bool:
    code = (
        "import socket, sys\n"
        "try:\n"
        f"    socket.create_connection(({ip!r}, {port}), timeout=1.0).close()\n"
        "except OSError:\n"
        "    sys.exit(1)\n"
    )
    return cluster.python(from_host, code, timeout_s=30).returncode == 0


def test_shard_hosts_join_with_their_resources_over_the_token(cluster):
    out = driver(
        cluster,
        """
        out["nodes"] = [
            {"ip": n["NodeManagerAddress"], "alive": n["Alive"], "resources": n["Resources"]}
            for n in ray.nodes()
        ]
        """,
    )
    by_ip = {n["ip"]: n for n in out["nodes"] if n["alive"]}
    assert set(by_ip) == {cluster.ip("head"), cluster.ip("shard1"), cluster.ip("shard2")}
    for shard in ("shard1", "shard2"):
        assert by_ip[cluster.ip(shard)]["resources"]["shard_host"] == 100
        assert by_ip[cluster.ip(shard)]["resources"]["CPU"] == 1
    assert by_ip[cluster.ip("head")]["resources"]["head"] == 1
    assert "shard_host" not in by_ip[cluster.ip("head")]["resources"]
    assert "CPU" not in by_ip[cluster.ip("head")]["resources"]
    # The cluster's own token file, not ~/.ray/auth_token: that is what a joining process needs.
    assert cluster.env()["RAY_AUTH_MODE"] == "token"
    assert Path(cluster.env()["RAY_AUTH_TOKEN_PATH"]).read_text()


def test_an_actor_asking_for_shard_host_runs_on_each_shard_host(cluster):
    out = driver(
        cluster,
        """
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        @ray.remote(num_cpus=0, resources={"shard_host": 0.01})
        class Where:
            def ip(self):
                return ray.util.get_node_ip_address()

        shard_nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"] and "shard_host" in n["Resources"]]
        actors = [
            Where.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
            for node in shard_nodes
        ]
        out["ips"] = sorted(ray.get([a.ip.remote() for a in actors], timeout=DEADLINE - time.monotonic()))
        # Without affinity the resource alone keeps it off the head (which has none).
        free = [Where.remote() for _ in range(4)]
        out["free_ips"] = sorted(set(ray.get([a.ip.remote() for a in free])))
        """,
    )
    assert out["ips"] == sorted([cluster.ip("shard1"), cluster.ip("shard2")])
    assert set(out["free_ips"]) <= {cluster.ip("shard1"), cluster.ip("shard2")}


def test_postgres_and_redis_answer_from_another_host(cluster):
    code = f"""
import asyncio, asyncpg, redis
r = redis.Redis.from_url({cluster.redis_url!r})
r.set("k", "from-shard1")
assert r.get("k") == b"from-shard1"
async def main():
    conn = await asyncpg.connect({cluster.database_url!r})
    assert await conn.fetchval("SELECT current_database()") == "dispatch"
    await conn.close()
asyncio.run(main())
print("ok")
"""
    proc = cluster.python("shard1", code, timeout_s=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_a_cut_link_isolates_the_host_until_healed(cluster):
    data_ip = cluster.ip("data")
    assert _reachable(cluster, "shard1", data_ip, 6379)
    cluster.cut("data")
    try:
        assert not _reachable(cluster, "shard1", data_ip, 6379)
        # The host itself still runs: its own loopback answers inside the namespace.
        assert _reachable(cluster, "data", "127.0.0.1", 6379)
    finally:
        cluster.heal("data")
    assert _reachable(cluster, "shard1", data_ip, 6379)


def test_a_killed_shard_host_is_marked_dead_and_its_actor_restarts_on_the_other(cluster):
    created = driver(
        cluster,
        """
        @ray.remote(num_cpus=0, resources={"shard_host": 0.01}, max_restarts=-1, max_task_retries=-1)
        class Where:
            def ip(self):
                return ray.util.get_node_ip_address()

        a = Where.options(name="probe", namespace="cluster-test", lifetime="detached").remote()
        out["ip"] = ray.get(a.ip.remote(), timeout=DEADLINE - time.monotonic())
        out["node"] = ray.get_runtime_context().get_node_id()
        """,
    )
    victim = next(h for h in ("shard1", "shard2") if cluster.ip(h) == created["ip"])
    survivor = "shard2" if victim == "shard1" else "shard1"
    killed = cluster.kill_host(victim)
    assert killed and not cluster.pids(victim)

    out = driver(
        cluster,
        f"""
        def victim_alive():
            return [n["Alive"] for n in ray.nodes() if n["NodeManagerAddress"] == {cluster.ip(victim)!r}]

        while victim_alive() != [False] and time.monotonic() < DEADLINE:
            time.sleep(0.2)
        out["victim_alive"] = victim_alive()
        a = ray.get_actor("probe", namespace="cluster-test")
        out["ip"] = ray.get(a.ip.remote(), timeout=DEADLINE - time.monotonic())
        ray.kill(a)
        """,
    )
    assert out["victim_alive"] == [False]
    assert out["ip"] == cluster.ip(survivor)


def test_a_killed_head_restarts_and_keeps_its_actors_through_the_gcs_redis(cluster):
    body = """
        @ray.remote(num_cpus=0, resources={"shard_host": 0.01})
        class Counter:
            def __init__(self):
                self.n = 0

            def inc(self):
                self.n += 1
                return self.n

        a = Counter.options(name="counter", namespace="cluster-test", lifetime="detached", get_if_exists=True)
        out["n"] = ray.get(a.remote().inc.remote(), timeout=DEADLINE - time.monotonic())
        """
    assert driver(cluster, body)["n"] == 1
    cluster.kill_host("head")
    cluster.start_host("head")
    # The same actor, with its state: the worker nodes and the actor outlived the head,
    # and the new GCS read the actor table back from Redis.
    assert driver(cluster, body)["n"] == 2


def _everything(cluster) -> dict[int, float]:
    """Every process in the cluster's namespaces, with its start time (pids get reused)."""
    procs = {}
    for name in cluster.hosts:
        for pid in cluster.pids(name):
            try:
                procs[pid] = psutil.Process(pid).create_time()
            except psutil.NoSuchProcess:
                pass
    return procs


def _survivors(procs: dict[int, float]) -> list[int]:
    """Those of ``procs`` still running. A killed process whose parent has not reaped it
    yet (a zombie) holds nothing and no longer counts."""
    alive = []
    for pid, started in procs.items():
        try:
            p = psutil.Process(pid)
            if p.create_time() == started and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def _leftovers(prefix: str) -> list[str]:
    from loadtests.cluster import link_names, netns_names

    return netns_names(prefix) + link_names(prefix)


def test_teardown_leaves_no_namespace_link_or_process(cluster):
    procs = _everything(cluster)
    assert len(procs) > 5  # the data host's servers, the head's and the nodes' Ray processes
    cluster.down()
    assert _leftovers(cluster.prefix) == []
    assert _survivors(procs) == []
    assert (
        cluster.prefix not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    )


def test_sigterm_tears_the_cluster_down():
    prefix = _prefix()
    script = textwrap.dedent(
        f"""
        import sys, time
        from loadtests.cluster import Cluster
        with Cluster(shard_hosts=1, edge_hosts=0, shard_cpus=1, data_host=False, gcs_ft=False,
                     prefix={prefix!r}, state_dir="/tmp/{prefix}state") as c:
            print("UP", flush=True)
            time.sleep(600)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    try:
        assert proc.stdout.readline().strip() == "UP", proc.stderr.read()[-3000:]
        from loadtests.cluster import netns_names, netns_pids

        procs = {}
        for ns in netns_names(prefix):
            for pid in netns_pids(ns):
                procs[pid] = psutil.Process(pid).create_time()
        assert procs
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(scaled(60)) == 128 + signal.SIGTERM
        assert _leftovers(prefix) == []
        assert _survivors(procs) == []
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run([sys.executable, "-m", "loadtests.cluster", "down", "--prefix", prefix], check=False)
    shutil.rmtree(f"/tmp/{prefix}state", ignore_errors=True)


def test_down_removes_what_a_crashed_run_left():
    prefix = _prefix()
    ns = f"{prefix}head"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    subprocess.run(["ip", "link", "add", f"{prefix}br0", "type", "bridge"], check=True)
    subprocess.run(["ip", "link", "add", f"{prefix}v2", "type", "veth", "peer", "name", "eth0", "netns", ns])
    sleeper = subprocess.Popen(["ip", "netns", "exec", ns, "sleep", "600"])
    try:
        deadline = time.monotonic() + scaled(10)
        from loadtests.cluster import netns_pids

        while sleeper.pid not in netns_pids(ns) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sleeper.pid in netns_pids(ns)
        out = subprocess.run(
            [sys.executable, "-m", "loadtests.cluster", "down", "--prefix", prefix],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parents[2],
        )
        assert out.returncode == 0, out.stderr
        assert sleeper.wait(scaled(10)) == -signal.SIGKILL
        assert _leftovers(prefix) == []
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
        subprocess.run([sys.executable, "-m", "loadtests.cluster", "down", "--prefix", prefix], check=False)


def test_addresses_are_on_a_subnet_no_route_already_uses():
    from loadtests.cluster import free_subnet

    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    subnet = free_subnet()
    assert subnet.startswith("10.213.")
    assert subnet not in routes
