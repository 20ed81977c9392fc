"""Idempotency-Key handling for POSTs, stored in Postgres (``idempotency_keys``).

A POST that creates something runs through :meth:`IdempotencyStore.run`:

1. The first request with a ``(scope, key)`` reserves it: a row with its fingerprint and
   no response yet, inserted and committed on its own (``INSERT ... ON CONFLICT DO
   NOTHING``), so exactly one of any number of concurrent requests wins the key.
2. The winner runs the handler and stores its ``(status_code, body)`` in the row.
3. A retry with the same key and the same fingerprint gets the stored response back,
   without running the handler again. Another request body under the same key is
   :class:`~dispatch.errors.IdempotencyMismatch` (the edge answers 422); a retry while
   the first request still runs is :class:`~dispatch.errors.Conflict` (409, retry later).
4. If the handler raises, the reservation is deleted, so the client's retry runs again.
   A reservation older than ``stale_after_s`` (its edge died mid-request) is taken over.

The fingerprint is the caller's (``api/fingerprints.py`` makes them from HTTP
requests): this module only compares them. Only the outcome of the handler is
remembered, whatever its status code: a 4xx answer is as final as a 201 for this key.
``scope`` names who and what (``"rider:r-1:POST /v1/rides"``), so two riders' keys
never meet.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from dispatch.errors import Conflict, IdempotencyMismatch, InvalidInput, Unavailable
from storage.db import connection, transaction

log = logging.getLogger(__name__)

MAX_KEY_LENGTH = 200
DEFAULT_STALE_AFTER_S = 120.0


def check_key(key: object) -> str:
    """Return ``key`` if it is 1..200 printable characters, else raise InvalidInput."""
    if not isinstance(key, str) or not 1 <= len(key) <= MAX_KEY_LENGTH or not key.isprintable():
        raise InvalidInput(
            f"Idempotency-Key must be 1..{MAX_KEY_LENGTH} printable characters", field="Idempotency-Key"
        )
    return key


Handler = Callable[[], Awaitable[tuple[int, dict[str, Any]]]]


class IdempotencyStore:
    """Remembered responses of POSTs made with an Idempotency-Key (see the module docstring)."""

    def __init__(self, pool: asyncpg.Pool, *, stale_after_s: float = DEFAULT_STALE_AFTER_S) -> None:
        self.pool = pool
        self.stale_after_s = stale_after_s

    async def run(self, scope: str, key: str, fingerprint: str, fn: Handler) -> tuple[int, dict[str, Any]]:
        """Run ``fn`` once per ``(scope, key)`` and return its ``(status_code, body)``.

        Raises InvalidInput for a bad key, IdempotencyMismatch when the key was used with
        another fingerprint, Conflict while the first request with the key still runs,
        Unavailable when Postgres is down, and whatever ``fn`` raises (after releasing
        the key). ``body`` must be JSON-able.
        """
        check_key(key)
        if not (isinstance(scope, str) and scope):
            raise InvalidInput("idempotency scope must be a non-empty string")
        async with transaction(self.pool) as conn:
            reserved = await conn.fetchval(
                "INSERT INTO idempotency_keys (scope, key, fingerprint) VALUES ($1, $2, $3) "
                "ON CONFLICT (scope, key) DO NOTHING RETURNING true",
                scope,
                key,
                fingerprint,
            )
            if not reserved:
                row = await conn.fetchrow(
                    "SELECT fingerprint, status_code, response, "
                    " created_at < now() - make_interval(secs => $3) AS stale "
                    "FROM idempotency_keys WHERE scope = $1 AND key = $2 FOR UPDATE",
                    scope,
                    key,
                    self.stale_after_s,
                )
                if row is None:  # released between our insert and select: take it
                    reserved = await conn.fetchval(
                        "INSERT INTO idempotency_keys (scope, key, fingerprint) VALUES ($1, $2, $3) "
                        "ON CONFLICT (scope, key) DO NOTHING RETURNING true",
                        scope,
                        key,
                        fingerprint,
                    )
                    if not reserved:
                        raise Conflict("request with this key is in progress", key=key)
                elif row["fingerprint"] != fingerprint:
                    raise IdempotencyMismatch(
                        "this Idempotency-Key was used with a different request", key=key
                    )
                elif row["status_code"] is not None:
                    return row["status_code"], row["response"]
                elif not row["stale"]:
                    raise Conflict("request with this key is in progress", key=key)
                else:  # the first request's edge died: start over under our name
                    await conn.execute(
                        "UPDATE idempotency_keys SET created_at = now() WHERE scope = $1 AND key = $2",
                        scope,
                        key,
                    )
        try:
            status_code, body = await fn()
        except BaseException:
            try:
                async with connection(self.pool) as conn:
                    await conn.execute(
                        "DELETE FROM idempotency_keys WHERE scope = $1 AND key = $2 AND status_code IS NULL",
                        scope,
                        key,
                    )
            except Unavailable:
                # The handler's error is the one to report; the reservation goes stale instead.
                log.warning("could not release idempotency key %s/%s", scope, key)
            raise
        async with connection(self.pool) as conn:
            await conn.execute(
                "UPDATE idempotency_keys SET status_code = $3, response = $4, completed_at = now() "
                "WHERE scope = $1 AND key = $2",
                scope,
                key,
                int(status_code),
                body,
            )
        return int(status_code), body

    async def get(self, scope: str, key: str) -> dict[str, Any] | None:
        """The stored row of a key (for support and tests), or None."""
        async with connection(self.pool) as conn:
            row = await conn.fetchrow(
                "SELECT scope, key, fingerprint, status_code, response, created_at, completed_at "
                "FROM idempotency_keys WHERE scope = $1 AND key = $2",
                scope,
                key,
            )
        return dict(row) if row is not None else None

    async def purge(self, older_than_s: float) -> int:
        """Delete completed keys older than ``older_than_s``; return how many went."""
        async with connection(self.pool) as conn:
            status = await conn.execute(
                "DELETE FROM idempotency_keys WHERE status_code IS NOT NULL "
                "AND created_at < now() - make_interval(secs => $1)",
                float(older_than_s),
            )
        return int(status.split()[-1])
