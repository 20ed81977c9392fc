"""The shards' ride records → Postgres: one leased consumer, in order, none lost on handover.

Real Redis (a server of this test's own, so the e2e edges' consumers stay out of it) and
real Postgres.
"""

from __future__ import annotations

import time

import msgpack
import pytest
import redis.asyncio as aioredis

from actors.shard_actor import incarnation_token
from api import upkeep
from api.upkeep import LEASE_KEY, RecordConsumer
from dispatch.errors import Unavailable
from dispatch.events import RIDE_RECORDS_GROUP, RIDE_RECORDS_STREAM
from storage.rides import RideStore
from tests.helpers import eventually

pytestmark = pytest.mark.integration


@pytest.fixture
def own_redis(tmp_path):
    from storage.redis_server import start_redis_server

    server = start_redis_server(tmp_path / "redis")
    yield server.url
    server.stop()


async def _ride(store: RideStore) -> str:
    ride, _ = await store.create_ride(
        rider_id=f"r-rec-{time.time_ns()}",
        region="sf",
        shard_id=0,
        vehicle_class=0,
        pickup=(37.77, -122.42),
        dropoff=(37.78, -122.41),
        surge_multiplier=1.0,
        fare_estimate_cents=1200,
        currency="USD",
    )
    return ride.ride_id


def _record(ride_id: str, event: str, **data) -> dict:
    return {
        "r": msgpack.packb(
            {"ride_id": ride_id, "event": event, "data": data, "shard_id": 0, "at": time.time()}
        )
    }


async def test_records_are_stored_in_order_and_a_new_leader_adopts_what_a_dead_one_read(
    pg_pool, own_redis, monkeypatch
):
    # A short lease so the handover below takes seconds, long enough that a busy test
    # machine's stalls do not make the holder lose it.
    monkeypatch.setattr(upkeep, "LEASE_S", 3.0)
    store = RideStore(pg_pool)
    r = aioredis.Redis.from_url(own_redis)
    rid = await _ride(store)
    await r.xadd(RIDE_RECORDS_STREAM, _record(rid, "offered", driver_id=7, offer_id=f"{rid}:1"))
    await r.xadd(RIDE_RECORDS_STREAM, _record(rid, "offer_expired", driver_id=7, offer_id=f"{rid}:1"))
    await r.xadd(RIDE_RECORDS_STREAM, {"r": b"\xc1 not msgpack"})  # acknowledged and skipped

    a = RecordConsumer(own_redis, "edge-a", store)
    standby = RecordConsumer(own_redis, "edge-b", store)
    await a.start()
    await standby.start()
    try:

        async def stored():
            events = [(e["event"], e["applied"]) for e in await store.events(rid)]
            return events == [("request", True), ("offer", True), ("offer_expired", True)]

        await eventually(stored)

        # The consumer counts and acknowledges after the commit (and after acknowledging
        # the unreadable message): wait for the round to finish.
        async def acknowledged():
            pending = (await r.xpending(RIDE_RECORDS_STREAM, RIDE_RECORDS_GROUP))["pending"]
            return pending == 0 and a.applied + a.not_applied + standby.applied + standby.not_applied >= 2

        await eventually(acknowledged)
        # Stored once, by whichever edge held the lease (normally the first to start), and
        # every record acknowledged once stored.
        assert a.applied + standby.applied == 2 and a.not_applied + standby.not_applied == 0
        assert (await store.get(rid)).status.value == "requested"
    finally:
        await standby.stop()
        await a.stop()

    # An edge that read a record and died before storing it: its lease runs out, and the
    # next leader adopts the record first.
    await r.set(LEASE_KEY, b"edge-dead", px=1000)
    await r.xadd(RIDE_RECORDS_STREAM, _record(rid, "expired", waited_s=180.0))
    read = await r.xreadgroup(RIDE_RECORDS_GROUP, "edge-dead", {RIDE_RECORDS_STREAM: ">"}, count=10)
    assert len(read[0][1]) == 1
    b = RecordConsumer(own_redis, "edge-b", store)
    await b.start()
    try:

        async def expired():
            return (await store.get(rid)).status.value == "expired"

        await eventually(expired, timeout_s=15)
        assert b.leader

        async def none_pending():  # acknowledged right after the commit
            return (await r.xpending(RIDE_RECORDS_STREAM, RIDE_RECORDS_GROUP))["pending"] == 0

        await eventually(none_pending)
        # A replay of a stored record changes nothing.
        assert [e["event"] for e in await store.events(rid)] == [
            "request",
            "offer",
            "offer_expired",
            "expire",
        ]
    finally:
        await b.stop()
        await r.aclose()


async def test_a_rides_records_are_stored_together_and_a_failure_acknowledges_none_of_them(
    pg_pool, own_redis
):
    store = RideStore(pg_pool)
    r = aioredis.Redis.from_url(own_redis)
    good, poisoned = await _ride(store), await _ride(store)
    await r.xadd(RIDE_RECORDS_STREAM, _record(good, "offered", driver_id=7, offer_id=f"{good}:1"))
    await r.xadd(RIDE_RECORDS_STREAM, _record(poisoned, "offered", driver_id=8, offer_id=f"{poisoned}:1"))
    await r.xadd(RIDE_RECORDS_STREAM, _record(good, "offer_declined", driver_id=7, offer_id=f"{good}:1"))
    # Refused by the database's rules when applied: this ride's records fail as one.
    await r.xadd(RIDE_RECORDS_STREAM, _record(poisoned, "cancelled", cancel_fee_cents=-1))
    await r.xadd(RIDE_RECORDS_STREAM, _record(good, "offer_expired", driver_id=7, offer_id=f"{good}:1"))
    c = RecordConsumer(own_redis, "edge-a", store)
    c._r = aioredis.Redis.from_url(own_redis)
    try:
        await c._ensure_group()
        with pytest.raises(Unavailable):
            await c.round(block_ms=100)
        # The good ride's records: stored in order (the last one too late), acknowledged.
        assert [(e["event"], e["applied"]) for e in await store.events(good)] == [
            ("request", True),
            ("offer", True),
            ("offer_declined", True),
            ("offer_expired", False),
        ]
        assert (c.applied, c.not_applied) == (2, 1)
        # The other ride's: none stored, none acknowledged, so read again next round.
        assert [e["event"] for e in await store.events(poisoned)] == ["request"]
        pending = await r.xpending(RIDE_RECORDS_STREAM, RIDE_RECORDS_GROUP)
        assert pending["pending"] == 2
        with pytest.raises(Unavailable):
            await c.round(block_ms=100)
        assert [e["event"] for e in await store.events(poisoned)] == ["request"]
        assert (c.applied, c.not_applied) == (2, 1)
    finally:
        await c._r.aclose()
        await r.aclose()


async def test_a_record_sent_twice_under_two_stream_ids_is_applied_once(pg_pool, own_redis):
    """A shard whose write timed out sends the batch again, and Redis may hold both copies:
    the record's own id makes the second one a no-op (the ride does not go back)."""
    store = RideStore(pg_pool)
    r = aioredis.Redis.from_url(own_redis)
    rid = await _ride(store)
    offer = {"driver_id": 7, "offer_id": f"{rid}:a-1"}
    # A real incarnation token: the store fences records of incarnations older than the
    # ones the run's edges registered for the shard.
    inc = incarnation_token()
    batch = []
    for seq, (event, data) in enumerate(
        [("offered", {**offer, "expires_at": time.time() + 15}), ("offer_declined", offer)], start=1
    ):
        rec = {"ride_id": rid, "event": event, "data": data, "shard_id": 0, "at": time.time()}
        batch.append({**rec, "record_id": f"0:{inc}:{seq}"})
    second_offer = {"driver_id": 8, "offer_id": f"{rid}:a-2"}
    later = {
        "ride_id": rid,
        "event": "offered",
        "data": {**second_offer, "expires_at": time.time() + 15},
        "shard_id": 0,
        "at": time.time(),
        "record_id": f"0:{inc}:3",
    }
    # The first send, the next record, then the resend of the first batch.
    for rec in [*batch, later, *batch]:
        await r.xadd(RIDE_RECORDS_STREAM, {"r": msgpack.packb(rec)})
    consumer = RecordConsumer(own_redis, "edge-dedup", store)
    await consumer.start()
    try:

        async def stored():
            return consumer.applied + consumer.not_applied == 5

        await eventually(stored, timeout_s=15)
        assert consumer.applied == 3
        events = [(e["event"], e["applied"]) for e in await store.events(rid)]
        assert events == [("request", True), ("offer", True), ("offer_declined", True), ("offer", True)]
        assert (await store.get(rid)).status.value == "offered"
        n = await pg_pool.fetchval(
            "SELECT count(*) FROM trip_events WHERE source = ANY($1::text[])", [f"0:{inc}:1", f"0:{inc}:2"]
        )
        assert n == 2
    finally:
        await consumer.stop()
        await r.aclose()


async def test_a_publisher_stamps_each_record_once_and_resends_it_with_the_same_id(tmp_path):
    """Redis paused (SIGSTOP) mid-flush: the flush fails within its short timeout and the
    records go again later with the ids they were given when made."""
    import os
    import signal

    from actors.events import EventPublisher
    from storage.redis_server import start_redis_server

    server = start_redis_server(tmp_path / "stall")
    pub = EventPublisher(server.url, source="4:incx", publish_timeout_s=0.3)
    r = aioredis.Redis.from_url(server.url)
    try:
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            offer = ("driver", 11, {"type": "offer", "offer_id": "ride-1:incx-1", "ride_id": "ride-1"})
            undelivered = await pub.flush([offer], [{"ride_id": "ride-1", "event": "offered", "data": {}}])
            assert undelivered == ["ride-1:incx-1"]
            assert not pub.health()["ok"] and pub.stats()["records_waiting"] == 1
        finally:
            os.kill(server.process.pid, signal.SIGCONT)

        async def sent():
            await pub.flush([], [])
            return pub.stats()["records_waiting"] == 0

        await eventually(sent, timeout_s=10)
        ids = {msgpack.unpackb(f[b"r"])["record_id"] for _i, f in await r.xrange(RIDE_RECORDS_STREAM)}
        assert ids == {"4:incx:1"}
        assert pub.health()["ok"]
    finally:
        await r.aclose()
        server.stop()
