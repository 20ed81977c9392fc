"""The embedded Postgres: starts from the wheel (as root too), reuses, keeps data."""

from __future__ import annotations

import asyncpg
import pytest

from storage.postgres_server import start_postgres_server

pytestmark = pytest.mark.integration


async def test_data_survives_a_restart_and_a_running_server_is_reused(tmp_path):
    server = start_postgres_server(tmp_path)
    try:
        conn = await asyncpg.connect(server.url)
        await conn.execute("CREATE TABLE trips (id int primary key)")
        await conn.execute("INSERT INTO trips VALUES (1), (2)")
        await conn.close()
        again = start_postgres_server(tmp_path)
        assert again.process is None and again.url == server.url
    finally:
        server.stop()
    restarted = start_postgres_server(tmp_path)
    try:
        conn = await asyncpg.connect(restarted.url)
        assert await conn.fetchval("SELECT count(*) FROM trips") == 2
        await conn.close()
    finally:
        restarted.stop()
