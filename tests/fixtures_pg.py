"""Session fixtures for real Postgres: one server, one fresh migrated database per run.

Registered from tests/conftest.py. The server is ``DATABASE_URL``'s when set (the tests
then only create and drop their own ``test_<hex>`` databases on it), else an embedded
server started in a temporary directory for this run and stopped at its end.
"""

from __future__ import annotations

import os
import uuid
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import pytest_asyncio


def with_database(dsn: str, name: str) -> str:
    """``dsn`` pointing at database ``name`` instead."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def pg_server_dsn(tmp_path_factory):
    """A DSN of the server's maintenance database: DATABASE_URL's server, or an embedded one."""
    if os.environ.get("DATABASE_URL"):
        yield with_database(os.environ["DATABASE_URL"], "postgres")
        return
    from storage.postgres_server import start_postgres_server

    server = start_postgres_server(tmp_path_factory.mktemp("pg"))
    yield with_database(server.url, "postgres")
    server.stop()


@pytest_asyncio.fixture(scope="session")
async def pg_databases(pg_server_dsn):
    """A factory of empty databases on the test server, all dropped at the end of the run."""
    made: list[str] = []

    async def make() -> str:
        name = f"test_{uuid.uuid4().hex[:12]}"
        conn = await asyncpg.connect(pg_server_dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        made.append(name)
        return with_database(pg_server_dsn, name)

    yield make
    for name in made:
        # WITH (FORCE) ends the edges' and pools' sessions on it; the server has been seen
        # to close this connection too while doing so, so each drop gets a fresh one and
        # one more try.
        for attempt in (1, 2):
            conn = await asyncpg.connect(pg_server_dsn)
            try:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                break
            except (asyncpg.ConnectionDoesNotExistError, ConnectionError):
                if attempt == 2:
                    raise
            finally:
                await conn.close()


@pytest_asyncio.fixture(scope="session")
async def pg_dsn(pg_databases):
    """The DSN of this run's database, with every migration applied."""
    from storage.db import migrate

    dsn = await pg_databases()
    await migrate(dsn)
    return dsn


@pytest_asyncio.fixture(scope="session")
async def pg_pool(pg_dsn):
    """An asyncpg pool (jsonb codec set) on this run's migrated database."""
    from storage.db import create_pool

    pool = await create_pool(pg_dsn, min_size=2, max_size=30)
    yield pool
    await pool.close()
