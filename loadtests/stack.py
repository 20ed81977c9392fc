"""The whole engine on this machine for a benchmark: Redis, optionally Postgres, local Ray
with the region's shard actors in a namespace of their own, and one edge process.

Used by ``bench_edge`` (no Postgres: location traffic only) and ``bench_match`` (the ride
side end to end). Everything lives in a temporary directory removed at :meth:`stop`
unless ``keep_tmp``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import psutil

from actors import directory
from actors.settings import ShardSettings
from dispatch.region import Region, region_file_text
from dispatch.shardmap import ShardMap


class LocalStack:
    """Start with :meth:`start`, stop with :meth:`stop`; then ``url``/``ws`` are the edge's,
    ``env`` its environment (for load generators that join the stack), ``authority`` mints
    tokens and ``admin`` is an admin token."""

    def __init__(
        self,
        name: str,
        region: Region,
        *,
        region_file: str | None = None,
        postgres: bool = False,
        edge_env: dict[str, str] | None = None,
        keep_tmp: bool = False,
    ) -> None:
        self.region = region
        self.region_file = region_file
        self.map = ShardMap(region)
        self.postgres = postgres
        self.edge_env = dict(edge_env or {})
        self.keep_tmp = keep_tmp
        self.namespace = f"{name}-{uuid.uuid4().hex[:6]}"
        self.secret = uuid.uuid4().hex + uuid.uuid4().hex
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{name}-"))
        self.edge: subprocess.Popen | None = None
        self.edge_log = None
        self.redis = None
        self.pg = None

    def start(self, ready_timeout_s: float = 180.0) -> None:
        import ray

        from api.auth import TokenAuthority
        from api.settings import load_settings
        from storage.redis_server import free_port, start_redis_server

        self.redis = start_redis_server(self.tmp / "redis")
        if self.postgres:
            from storage.postgres_server import start_postgres_server

            self.pg = start_postgres_server(self.tmp / "pg")
        directory.connect(namespace=self.namespace, num_cpus=os.cpu_count() or 2)
        directory.deploy_shards(
            ShardSettings.build(
                region_toml=region_file_text(self.region_file),
                namespace=self.namespace,
                redis_url=self.redis.url,
            )
        )
        self.directory = directory.ShardDirectory(self.region.name, self.region.shard_count, self.namespace)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.ws = f"ws://127.0.0.1:{port}"
        self.env = {
            **os.environ,
            "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
            "DISPATCH_NAMESPACE": self.namespace,
            "REDIS_URL": self.redis.url,
            "DISPATCH_JWT_SECRET": self.secret,
            "DISPATCH_RAY_LOG_TO_DRIVER": "0",
            **({"DATABASE_URL": self.pg.url} if self.pg is not None else {}),
            **({"DISPATCH_REGION_FILE": self.region_file} if self.region_file else {}),
            **self.edge_env,
        }
        self.edge_log = open(self.tmp / "edge.log", "w")  # noqa: SIM115 (closed in stop)
        self.edge = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "api.cli",
                "edge",
                "--port",
                str(port),
                "--data-dir",
                str(self.tmp / "edge"),
            ],
            env=self.env,
            stdout=self.edge_log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + ready_timeout_s
        while time.time() < deadline:
            if self.edge.poll() is not None:
                raise RuntimeError(f"edge exited: {self.edge_log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except Exception:
                time.sleep(0.5)
        else:
            raise RuntimeError(f"edge not ready: {self.edge_log_tail()}")
        self.authority = TokenAuthority(load_settings(jwt_secret=self.secret))
        self.admin = self.authority.issue("bench", "admin", 3600)

    def edge_log_tail(self, n: int = 3000) -> str:
        try:
            return (self.tmp / "edge.log").read_text()[-n:]
        except OSError:
            return ""

    def metrics(self) -> str:
        """The edge's /metrics text."""
        req = urllib.request.Request(f"{self.url}/metrics", headers={"Authorization": f"Bearer {self.admin}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.read().decode()

    def pids(self) -> dict[str, set[int]]:
        """Process ids by group, children included (Postgres forks one backend per connection)."""

        def tree(pid: int | None) -> set[int]:
            if pid is None:
                return set()
            try:
                p = psutil.Process(pid)
                return {pid, *(c.pid for c in p.children(recursive=True))}
            except psutil.NoSuchProcess:
                return set()

        pg_pid = self.pg.process.pid if self.pg is not None and self.pg.process is not None else None
        return {"edge": tree(self.edge.pid if self.edge else None), "postgres": tree(pg_pid)}

    def stop(self) -> None:
        if self.edge is not None and self.edge.poll() is None:
            self.edge.terminate()
            try:
                self.edge.wait(30)
            except subprocess.TimeoutExpired:
                self.edge.kill()
        if self.edge_log is not None:
            self.edge_log.close()
        try:
            directory.teardown_shards(self.region.name, self.region.shard_count, namespace=self.namespace)
        except Exception:
            pass
        directory.shutdown()
        if self.redis is not None:
            self.redis.stop()
        if self.pg is not None:
            self.pg.stop()
        if not self.keep_tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
