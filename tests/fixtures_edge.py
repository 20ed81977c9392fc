"""Session fixtures for end-to-end tests: real edge processes (``dispatch edge``).

Two edges run as subprocesses on free ports, joined to the test run's Ray cluster and
namespace and to its Redis, so tests drive them through real sockets and a rider on one
edge can hear a driver's events through the other.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

import pytest

from tests.helpers import scaled

JWT_SECRET = "test-secret-" + secrets.token_hex(16)
OPERATOR_KEY = "op-" + secrets.token_hex(8)


@dataclass
class EdgeProcess:
    url: str
    ws: str
    proc: subprocess.Popen
    log_path: str
    env: dict = field(default_factory=dict)

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()[-4000:]

    def stop(self, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
            return r.status == 200
    except Exception:
        return False


@pytest.fixture(scope="session")
def edge_env(ray_cluster, shards, bus_redis_url, pg_dsn, tmp_path_factory):
    import ray

    env = dict(os.environ)
    env.update(
        RAY_ADDRESS=ray.get_runtime_context().gcs_address,
        DISPATCH_NAMESPACE=ray_cluster,
        REDIS_URL=bus_redis_url,
        DATABASE_URL=pg_dsn,
        DISPATCH_JWT_SECRET=JWT_SECRET,
        DISPATCH_OPERATOR_KEY=OPERATOR_KEY,
        DISPATCH_DATA_DIR=str(tmp_path_factory.mktemp("edge-data")),
        DISPATCH_RAY_LOG_TO_DRIVER="0",
    )
    return env


def start_edge(env: dict, log_dir, name: str, **extra_env: str) -> EdgeProcess:
    from storage.redis_server import free_port

    port = free_port()
    log_path = str(log_dir / f"{name}.log")
    e = {**env, **extra_env}
    with open(log_path, "w") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "edge", "--port", str(port), "--log-level", "warning"],
            env=e,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return EdgeProcess(f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}", proc, log_path, e)


def wait_ready(edges: list[EdgeProcess], timeout_s: float = 90.0) -> None:
    deadline = time.time() + scaled(timeout_s)
    pending = list(edges)
    while pending and time.time() < deadline:
        for e in list(pending):
            if e.proc.poll() is not None:
                raise RuntimeError(f"edge exited with {e.proc.returncode}:\n{e.log()}")
            if _ready(e.url):
                pending.remove(e)
        time.sleep(0.3)
    if pending:
        raise RuntimeError(f"edge not ready in {timeout_s}s:\n{pending[0].log()}")


@pytest.fixture(scope="session")
def edges(edge_env, tmp_path_factory):
    """Two edge processes, A and B, ready (every shard answers, Redis subscribed)."""
    log_dir = tmp_path_factory.mktemp("edge-logs")
    procs = [start_edge(edge_env, log_dir, n) for n in ("edge-a", "edge-b")]
    try:
        wait_ready(procs)
        yield procs
    finally:
        for p in procs:
            p.stop()


@pytest.fixture(scope="session")
def tokens():
    """Mint tokens the edges accept: ``tokens("driver", "drv-1")``."""
    from api.auth import TokenAuthority
    from api.settings import load_settings

    authority = TokenAuthority(load_settings(jwt_secret=JWT_SECRET))

    def mint(role: str, sub: str, ttl_s: int = 3600, now: float | None = None) -> str:
        return authority.issue(sub, role, ttl_s, now=now)

    return mint
