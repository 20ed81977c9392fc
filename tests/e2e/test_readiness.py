"""Readiness says what the edge can do: a paused Redis makes /readyz 503, and it says which."""

from __future__ import annotations

import os
import signal

import httpx
import pytest

from tests.fixtures_edge import start_edge
from tests.helpers import eventually

pytestmark = pytest.mark.e2e


async def test_readyz_is_503_while_redis_is_paused_and_names_it(edge_env, tmp_path):
    from storage.redis_server import start_redis_server

    server = start_redis_server(tmp_path / "redis")
    edge = start_edge(edge_env, tmp_path, "edge-paused-redis", REDIS_URL=server.url)
    try:
        async with httpx.AsyncClient(base_url=edge.url, timeout=10) as c:

            async def ready():
                try:
                    return (await c.get("/readyz")).status_code == 200
                except httpx.TransportError:
                    return False

            await eventually(ready, timeout_s=90, interval_s=0.3)
            body = (await c.get("/readyz")).json()
            assert body["dependencies"]["redis"]["ok"] and body["dependencies"]["postgres"]["ok"]
            os.kill(server.process.pid, signal.SIGSTOP)
            try:
                r = await c.get("/readyz")
                assert r.status_code == 503
                body = r.json()
                assert body["checks"]["redis"] is False and body["checks"]["shards"] is True
                assert body["dependencies"]["redis"] == {
                    **body["dependencies"]["redis"],
                    "ok": False,
                    "needed": True,
                }
                assert body["dependencies"]["postgres"]["ok"] is True
            finally:
                os.kill(server.process.pid, signal.SIGCONT)
            await eventually(ready, timeout_s=30, interval_s=0.3)
    finally:
        edge.stop()
        server.stop()
