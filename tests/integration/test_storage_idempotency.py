"""IdempotencyStore against real Postgres: one run per key, stored replies, mismatches,
in-progress conflicts, release on failure, stale reservations."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from api.fingerprints import fingerprint
from dispatch.errors import Conflict, IdempotencyMismatch, InvalidInput
from storage.idempotency import IdempotencyStore
from tests.helpers import eventually, scaled

pytestmark = pytest.mark.integration


def scope() -> str:
    return f"rider:r-{uuid.uuid4().hex[:8]}:POST /v1/rides"


@pytest.fixture
def store(pg_pool):
    return IdempotencyStore(pg_pool)


def test_fingerprint_is_canonical():
    a = fingerprint("post", "/v1/rides", {"pickup": {"lat": 1, "lng": 2}, "vehicle_class": 0})
    b = fingerprint("POST", "/v1/rides", {"vehicle_class": 0, "pickup": {"lng": 2, "lat": 1}})
    assert a == b and len(a) == 64
    assert a != fingerprint("POST", "/v1/rides", {"vehicle_class": 1, "pickup": {"lng": 2, "lat": 1}})
    assert a != fingerprint("POST", "/v1/quotes", {"vehicle_class": 0, "pickup": {"lng": 2, "lat": 1}})


async def test_a_retry_gets_the_stored_reply_without_running_again(store):
    calls = []

    async def handler():
        calls.append(1)
        return 201, {"ride_id": f"ride-{len(calls)}"}

    s = scope()
    assert await store.run(s, "k-1", "fp", handler) == (201, {"ride_id": "ride-1"})
    assert await store.run(s, "k-1", "fp", handler) == (201, {"ride_id": "ride-1"})
    assert len(calls) == 1
    with pytest.raises(IdempotencyMismatch):
        await store.run(s, "k-1", "other-fp", handler)
    # Another key, or the same key in another scope, is another request.
    assert await store.run(s, "k-2", "fp", handler) == (201, {"ride_id": "ride-2"})
    assert await store.run(scope(), "k-1", "fp", handler) == (201, {"ride_id": "ride-3"})
    row = await store.get(s, "k-1")
    assert row["status_code"] == 201 and row["response"] == {"ride_id": "ride-1"}


async def test_an_error_reply_is_remembered_too(store):
    s = scope()

    async def refuse():
        return 422, {"error": "invalid_location"}

    assert await store.run(s, "k", "fp", refuse) == (422, {"error": "invalid_location"})

    async def must_not_run():
        raise AssertionError("ran twice")

    assert await store.run(s, "k", "fp", must_not_run) == (422, {"error": "invalid_location"})


async def test_a_retry_while_the_first_runs_is_a_conflict(store):
    s, started, release = scope(), asyncio.Event(), asyncio.Event()

    async def slow():
        started.set()
        await release.wait()
        return 201, {"ok": True}

    first = asyncio.create_task(store.run(s, "k", "fp", slow))
    await asyncio.wait_for(started.wait(), scaled(5))
    with pytest.raises(Conflict) as err:
        await store.run(s, "k", "fp", slow)
    assert not isinstance(err.value, IdempotencyMismatch)
    assert "in progress" in err.value.message
    release.set()
    assert await asyncio.wait_for(first, scaled(5)) == (201, {"ok": True})
    assert await store.run(s, "k", "fp", slow) == (201, {"ok": True})


async def test_twenty_concurrent_requests_run_the_handler_once(store):
    s, calls, release = scope(), [], asyncio.Event()

    async def handler():
        calls.append(1)
        await release.wait()  # holds the key until every other request has its answer
        return 201, {"n": len(calls)}

    runs = [asyncio.create_task(store.run(s, "k", "fp", handler)) for _ in range(20)]
    await eventually(lambda: calls and sum(r.done() for r in runs) == 19)
    release.set()
    results = await asyncio.gather(*runs, return_exceptions=True)
    assert len(calls) == 1
    ok = [r for r in results if not isinstance(r, BaseException)]
    assert ok == [(201, {"n": 1})]
    assert all(isinstance(r, Conflict) for r in results if isinstance(r, BaseException))


async def test_a_failed_handler_releases_the_key(store):
    s, attempts = scope(), []

    async def flaky():
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("shard unavailable")
        return 201, {"attempt": len(attempts)}

    with pytest.raises(RuntimeError):
        await store.run(s, "k", "fp", flaky)
    assert await store.get(s, "k") is None
    assert await store.run(s, "k", "fp", flaky) == (201, {"attempt": 2})


async def test_a_stale_reservation_is_taken_over(pg_pool):
    store, s = IdempotencyStore(pg_pool, stale_after_s=0.0), scope()
    await pg_pool.execute(
        "INSERT INTO idempotency_keys (scope, key, fingerprint, created_at) VALUES ($1, 'k', 'fp', now() - "
        "interval '1 hour')",
        s,
    )

    async def handler():
        return 200, {"resumed": True}

    assert await store.run(s, "k", "fp", handler) == (200, {"resumed": True})


@pytest.mark.parametrize("key", ["", "x" * 201, "bad\nkey", None, 42])
async def test_bad_keys_are_refused(store, key):
    async def handler():
        raise AssertionError("must not run")

    with pytest.raises(InvalidInput):
        await store.run(scope(), key, "fp", handler)


async def test_purge_drops_old_completed_keys(pg_pool, store):
    s = scope()

    async def handler():
        return 201, {}

    await store.run(s, "old", "fp", handler)
    await pg_pool.execute(
        "UPDATE idempotency_keys SET created_at = now() - interval '2 days' WHERE scope = $1", s
    )
    await store.run(s, "new", "fp", handler)
    assert await store.purge(older_than_s=86400) >= 1
    assert await store.get(s, "old") is None and await store.get(s, "new") is not None
