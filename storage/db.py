"""Postgres access: the pool, the migrations, and where the database is.

- :func:`create_pool` opens an asyncpg pool whose connections decode ``jsonb`` to Python
  values and encode dicts and lists to it.
- :func:`migrate` applies the numbered ``storage/migrations/NNNN_name.sql`` files not yet
  recorded in ``schema_migrations``, in order, each in its own transaction, under a
  session advisory lock: edges starting at once queue on the lock and the later ones
  find nothing left to do.
- :func:`database_url` answers ``DATABASE_URL``, or starts the embedded server.
- :func:`connection` and :func:`transaction` are how the stores in this package talk to
  the pool: they translate a lost or refused connection into
  :class:`~dispatch.errors.Unavailable` (the edge's 503), so asyncpg's own errors never
  leave ``storage/``.

``python -m storage.db migrate [--data-dir DIR]`` applies the migrations and prints the
versions it applied.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import cast

import asyncpg

from dispatch.errors import Conflict, DispatchError, InvalidInput, Unavailable
from storage.postgres_server import PostgresServer, start_postgres_server

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# pg_advisory_lock key of the migrations: any constant shared by every edge ("dispmigr").
MIGRATION_LOCK_KEY = 0x646973706D696772

# Errors that mean "the database is not there right now", as opposed to a bad query.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,
    ConnectionError,
    TimeoutError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    # asyncpg's own state errors during an outage ("cannot perform operation: another
    # operation is in progress" on a connection the server dropped, a pool closing under
    # a request): the database is not there for us, whatever the wording.
    asyncpg.InternalClientError,
)


def parse_uuid(value: object) -> uuid.UUID | None:
    """``value`` as a UUID (a UUID or its text), or None: an id that is not a uuid names
    nothing stored. The one parser of ids for every store."""
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


#: what a client is told to wait before retrying a write that found Postgres unavailable
RETRY_AFTER_S = 2


def unavailable(exc: BaseException) -> Unavailable | None:
    """The :class:`~dispatch.errors.Unavailable` that ``exc`` means (a lost, refused or
    closed connection, a timeout, asyncpg's client state errors), or None if it means
    something else."""
    if isinstance(exc, DispatchError) or not isinstance(exc, _UNAVAILABLE):
        return None
    return Unavailable(f"Postgres unavailable: {exc}", dependency="postgres", retry_after_s=RETRY_AFTER_S)


async def _init_connection(conn: asyncpg.Connection) -> None:
    for typ in ("jsonb", "json"):
        await conn.set_type_codec(typ, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool release without asyncpg's default reset query.

    asyncpg still rolls back an open transaction before this is called; the default would
    then add a round trip per release (``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *;
    RESET ALL``) for session state this project never leaves behind: no LISTEN, no SET,
    no cursors, and the one advisory lock (migrations) is unlocked in a ``finally``.
    """


async def create_pool(
    dsn: str, *, min_size: int = 1, max_size: int = 10, timeout_s: float = 10.0
) -> asyncpg.Pool:
    """An asyncpg pool on ``dsn`` with the jsonb codec. Raises Unavailable if it cannot connect."""
    try:
        return await asyncpg.create_pool(
            dsn,
            min_size=min_size,
            max_size=max_size,
            init=_init_connection,
            reset=_keep_session,
            timeout=timeout_s,
        )
    except _UNAVAILABLE as exc:
        raise Unavailable(
            f"cannot connect to Postgres: {exc}", dependency="postgres", retry_after_s=RETRY_AFTER_S
        ) from exc


@asynccontextmanager
async def connection(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection. Translates asyncpg's errors that escape the block: a lost or
    refused connection → Unavailable, a deadlock or unique violation → Conflict, a check,
    not-null or foreign-key violation or bad data → InvalidInput."""
    try:
        async with pool.acquire() as conn:
            # The pool hands out a proxy that forwards every Connection method (asyncpg's
            # PoolConnectionProxyMeta); the stubs type the two apart, so callers see a Connection.
            yield cast(asyncpg.Connection, conn)
    except DispatchError:
        raise  # ours already (Forbidden is a PermissionError, hence an OSError)
    except _UNAVAILABLE as exc:
        raise unavailable(exc) from exc  # type: ignore[misc]
    except asyncpg.DeadlockDetectedError as exc:
        raise Conflict("concurrent update, retry", reason="deadlock") from exc
    except asyncpg.UniqueViolationError as exc:
        raise Conflict(f"already exists: {exc.detail or exc}", constraint=exc.constraint_name) from exc
    except (asyncpg.IntegrityConstraintViolationError, asyncpg.DataError) as exc:
        constraint = getattr(exc, "constraint_name", None)
        raise InvalidInput(f"refused by the database: {exc}", constraint=constraint) from exc


@asynccontextmanager
async def transaction(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """A pooled connection inside a transaction (committed on success, rolled back on error)."""
    async with connection(pool) as conn, conn.transaction():
        yield conn


def migration_files(directory: Path = MIGRATIONS_DIR) -> list[tuple[str, Path]]:
    """``(version, path)`` of every ``NNNN_name.sql`` file, in order; version is the stem."""
    files = sorted(p for p in directory.glob("*.sql") if p.stem[:4].isdigit())
    return [(p.stem, p) for p in files]


async def migrate(dsn_or_pool: str | asyncpg.Pool, directory: Path = MIGRATIONS_DIR) -> list[str]:
    """Apply the pending migrations in order; return the versions applied (``[]`` if none).

    Safe to run from many processes at once (a session advisory lock serializes them).
    A migration that fails is rolled back whole, is not recorded, and its error propagates;
    the ones before it stay applied. Raises Unavailable if the database cannot be reached.
    """
    if isinstance(dsn_or_pool, str):
        try:
            conn = await asyncpg.connect(dsn_or_pool, timeout=10)
        except _UNAVAILABLE as exc:
            raise Unavailable(f"cannot connect to Postgres: {exc}", dependency="postgres") from exc
        try:
            return await _migrate(conn, directory)
        finally:
            await conn.close()
    async with connection(dsn_or_pool) as conn:
        return await _migrate(conn, directory)


async def _migrate(conn: asyncpg.Connection, directory: Path) -> list[str]:
    applied: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, path in migration_files(directory):
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(path.read_text())
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
            log.info("applied migration %s", version)
            applied.append(version)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    return applied


def database_url(data_dir: Path, url: str | None = None) -> tuple[str, PostgresServer | None]:
    """``url`` if given (and no server), else the embedded server under ``data_dir``.

    The caller owns the returned server (``stop()`` it on shutdown, or leave it running
    for the next start to reuse). Raises Unavailable if the embedded server fails to start.
    """
    if url:
        return url, None
    server = start_postgres_server(Path(data_dir) / "postgres")
    return server.url, server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m storage.db", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    mig = sub.add_parser("migrate", help="apply pending migrations and print the versions applied")
    mig.add_argument("--data-dir", type=Path, default=Path(".dispatch"), help="embedded server's home")
    mig.add_argument("--database-url", default=None, help="a Postgres to migrate instead of the embedded one")
    args = parser.parse_args(argv)
    url, server = database_url(args.data_dir, args.database_url)
    try:
        applied = asyncio.run(migrate(url))
    except Unavailable as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    print("\n".join(applied) if applied else "no pending migrations")
    _ = server  # an embedded server keeps running for the stack that starts next
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
