"""The embedded Postgres: starts from the wheel (as root too), reuses, keeps data."""

from __future__ import annotations

import os

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


async def test_a_killed_postgres_is_restarted_by_its_supervisor_with_its_data(tmp_path):
    """kill -9 of the postmaster: no zombie, no stale lock in the way; it answers again."""
    import os
    import signal

    from storage.redis_server import pid_alive
    from tests.helpers import eventually

    server = start_postgres_server(tmp_path)
    try:
        conn = await asyncpg.connect(server.url)
        await conn.execute("CREATE TABLE kept (v int); INSERT INTO kept VALUES (42)")
        await conn.close()
        server.supervise(interval_s=0.2)
        old = server.process.pid
        os.kill(old, signal.SIGKILL)

        async def answers():
            if server.process.pid == old:
                return False
            try:
                c = await asyncpg.connect(server.url, timeout=2)
            except (OSError, asyncpg.PostgresError):
                return False
            try:
                return await c.fetchval("SELECT v FROM kept")
            finally:
                await c.close()

        assert await eventually(answers, timeout_s=60, interval_s=0.3) == 42
        assert not pid_alive(old)  # reaped, not a zombie
        assert server.supervisor.restarts >= 1
    finally:
        server.stop()


def test_a_stale_lock_naming_a_dead_pid_is_cleared_and_a_live_one_is_kept(tmp_path):
    from storage.postgres_server import clear_stale_lock

    pgdata = tmp_path / "pgdata"
    pgdata.mkdir()
    (pgdata / "postmaster.pid").write_text(f"{2**22 + 12345}\n{pgdata}\n0\n5999\n")
    (pgdata / ".s.PGSQL.5999.lock").write_text("x")
    assert clear_stale_lock(pgdata)
    assert not (pgdata / "postmaster.pid").exists() and not (pgdata / ".s.PGSQL.5999.lock").exists()
    (pgdata / "postmaster.pid").write_text(f"{os.getpid()}\n{pgdata}\n0\n5999\n")
    assert not clear_stale_lock(pgdata) and (pgdata / "postmaster.pid").exists()
