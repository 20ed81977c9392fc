"""Two live copies of one shard: the records of the superseded one are fenced off.

A host cut off from the cluster keeps its shard actor running while Ray starts the shard
again elsewhere and an edge restores it from Postgres (its open offers included). Real
Postgres: the records of both incarnations go through ``RideStore.apply_records`` as the
record consumer sends them.
"""

from __future__ import annotations

import time
import uuid

import pytest

from actors.shard_actor import incarnation_token
from loadtests.invariants import DRILL_INVARIANTS
from storage.rides import RideStore

pytestmark = pytest.mark.integration

# loadtests/invariants.py's invariant: an offer event applied twice for one offer, counted
# when a copy was stored after the given trip_events id.
APPLIED_TWICE = DRILL_INVARIANTS["records_applied_twice"]


async def _last_event_id(pg_pool) -> int:
    async with pg_pool.acquire() as conn:
        return int(await conn.fetchval("SELECT coalesce(max(id), 0) FROM trip_events"))


async def _ride(store: RideStore, region: str) -> str:
    ride, _ = await store.create_ride(
        rider_id=f"r-fence-{time.time_ns()}",
        region=region,
        shard_id=0,
        vehicle_class=0,
        pickup=(37.77, -122.42),
        dropoff=(37.78, -122.41),
        surge_multiplier=1.0,
        fare_estimate_cents=1200,
        currency="USD",
    )
    return ride.ride_id


class Incarnation:
    """The records one start of shard 0 sends (ids as ``actors/events.py`` stamps them)."""

    def __init__(self) -> None:
        self.token = incarnation_token()
        self.seq = 0

    def record(self, ride_id: str, event: str, at: float, **data) -> tuple[str, dict]:
        self.seq += 1
        rid = f"0:{self.token}:{self.seq}"
        if event == "offered":
            data = {**data, "expires_at": at + 15.0}
        rec = {"ride_id": ride_id, "event": event, "data": data, "shard_id": 0, "at": at, "record_id": rid}
        return rid, rec


@pytest.fixture(params=["one_ride_at_a_time", "batched"])
def path(request):
    """Both ways records reach the store: ``apply_records`` (a ride per transaction) and
    ``apply_many`` (the consumer's batch of many rides in one transaction)."""
    return request.param


def _applier(store: RideStore, path: str):
    async def apply(records):
        if path == "one_ride_at_a_time":
            return await store.apply_records(records)
        outcomes, errors = await store.apply_many(records)
        assert not errors
        return outcomes

    return apply


async def _history(store: RideStore, ride_id: str) -> list[tuple[str, bool, str | None, str | None]]:
    return [
        (e["event"], e["applied"], e["data"].get("offer_id"), e["data"].get("refused"))
        for e in await store.events(ride_id)
    ]


async def test_records_of_a_superseded_incarnation_made_after_the_takeover_are_refused(pg_pool, path):
    store = RideStore(pg_pool)
    apply = _applier(store, path)
    region = f"fence-{time.time_ns()}"
    first = await _last_event_id(pg_pool)
    a, b = await _ride(store, region), await _ride(store, region)
    old = Incarnation()
    await store.register_incarnation(region, 0, old.token)
    # The old incarnation offers ride A (O1) and ride B (P1); both records are stored.
    o1, p1 = f"{a}:{old.token}1", f"{b}:{old.token}2"
    t0 = time.time()
    assert await apply([old.record(a, "offered", t0, driver_id=7, offer_id=o1)]) == [True]
    assert await apply([old.record(b, "offered", t0, driver_id=8, offer_id=p1)]) == [True]

    # Its host is cut off; Ray starts the shard again and an edge registers the new
    # incarnation before reading the state (O1 and P1 open) it restores it with.
    new = Incarnation()
    since = await store.register_incarnation(region, 0, new.token)
    assert await store.register_incarnation(region, 0, new.token) == since  # idempotent
    assert [inc for inc, _ in await store.incarnations(region, 0)] == [old.token, new.token]

    # The new incarnation expires O1 and offers ride A to another driver (O2).
    o2 = f"{a}:{new.token}1"
    assert await apply(
        [
            new.record(a, "offer_expired", since + 1, driver_id=7, offer_id=o1),
            new.record(a, "offered", since + 1.1, driver_id=9, offer_id=o2),
        ]
    ) == [True, True]
    # The old one, still running, expires its copy of O1 and offers ride A again (Z):
    # made after the takeover, both refused; O2 stays the ride's open offer.
    z = f"{a}:{old.token}3"
    assert await apply(
        [
            old.record(a, "offer_expired", since + 1.5, driver_id=7, offer_id=o1),
            old.record(a, "offered", since + 1.6, driver_id=10, offer_id=z),
        ]
    ) == [False, False]
    assert store.refused_superseded == 2
    ride = await store.get(a)
    assert ride is not None and ride.status.value == "offered"
    assert await _history(store, a) == [
        ("request", True, None, None),
        ("offer", True, o1, None),
        ("offer_expired", True, o1, None),
        ("offer", True, o2, None),
        ("offer_expired", False, o1, "superseded_incarnation"),
        ("offer", False, z, "superseded_incarnation"),
    ]
    # What an edge would restore ride A with: O2, not the refused offer.
    state = await store.restore_state(region, 0)
    offers = {r["ride_id"]: r.get("offer") for r in state["rides"]}
    assert offers[a] is not None and offers[a]["offer_id"] == o2

    # A record the old incarnation made before the takeover, delivered late (its host
    # was cut off from Redis too): the driver declined P1 then. Still applied.
    assert await apply([old.record(b, "offer_declined", since - 0.5, driver_id=8, offer_id=p1)]) == [True]
    ride_b = await store.get(b)
    assert ride_b is not None and ride_b.status.value == "requested"
    # A replay of a refused record is still a replay: nothing new stored.
    replay = (f"0:{old.token}:3", old.record(a, "offer_expired", since + 1.5, driver_id=7, offer_id=o1)[1])
    assert await apply([replay]) == [False]
    assert len(await store.events(a)) == 6

    async with pg_pool.acquire() as conn:
        assert await conn.fetchval(APPLIED_TWICE, first) == 0
        # The drill's figure does see a second applied expiry of O1, when it is new.
        await conn.execute(
            "INSERT INTO trip_events (ride_id, version, event, status, actor_role, actor_id, data)"
            " VALUES ($1, 1000, 'offer_expired', 'requested', 'system', 'shard-0', $2)",
            uuid.UUID(a),
            {"offer_id": o1},
        )
        assert await conn.fetchval(APPLIED_TWICE, first) == 1
        assert await conn.fetchval(APPLIED_TWICE, await _last_event_id(pg_pool)) == 0


async def test_an_offer_is_opened_and_closed_once_whatever_record_ids_repeat_it(pg_pool, path):
    # Both copies of the shard held O1 (the new one restored it) and both expire it, each
    # under its own record id, before any fence applies (the old one's record was made
    # before the takeover and arrives late): the second close changes nothing.
    store = RideStore(pg_pool)
    apply = _applier(store, path)
    region = f"fence-{time.time_ns()}"
    first = await _last_event_id(pg_pool)
    a = await _ride(store, region)
    old, new = Incarnation(), Incarnation()
    o1, o2 = f"{a}:{old.token}1", f"{a}:{new.token}1"
    t0 = time.time()
    assert await apply([old.record(a, "offered", t0, driver_id=7, offer_id=o1)]) == [True]
    assert await apply(
        [
            new.record(a, "offer_expired", t0 + 10, driver_id=7, offer_id=o1),
            new.record(a, "offered", t0 + 10.1, driver_id=9, offer_id=o2),
        ]
    ) == [True, True]
    # The late expiry of O1 would close O2 if it were applied; the same offer made again
    # under another record id is no new offer.
    assert await apply(
        [
            old.record(a, "offer_expired", t0 + 5, driver_id=7, offer_id=o1),
            old.record(a, "offered", t0 + 0.1, driver_id=7, offer_id=o1),
        ]
    ) == [False, False]
    assert store.refused_stale_offer == 2
    assert store.refused_superseded == 0
    ride = await store.get(a)
    assert ride is not None and ride.status.value == "offered"
    history = await _history(store, a)
    assert history[-2:] == [("offer_expired", False, o1, "stale_offer"), ("offer", False, o1, "stale_offer")]
    # O2 itself still closes as it should.
    assert await apply([new.record(a, "offer_declined", t0 + 11, driver_id=9, offer_id=o2)]) == [True]
    async with pg_pool.acquire() as conn:
        assert await conn.fetchval(APPLIED_TWICE, first) == 0
