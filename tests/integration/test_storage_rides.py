"""RideStore against real Postgres: migrations, idempotent creation, the state machine made
durable (versions, events, races), shard records replayed and late, and shard restore."""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg
import pytest

from api.rides import BatchedWrites
from dispatch.errors import (
    Conflict,
    IdempotencyMismatch,
    IllegalTransition,
    InvalidInput,
    NotFound,
)
from dispatch.pricing import FareRules, make_quote
from dispatch.rides import RideRequest
from dispatch.trips import ActorRole, RideStatus, TripEvent
from storage.db import create_pool, migrate, migration_files
from storage.quotes import QuoteStore
from storage.rides import RideStore
from tests.helpers import eventually

pytestmark = pytest.mark.integration

PICKUP, DROPOFF = (37.7749, -122.4194), (37.7849, -122.4094)


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def ride_args(**kw):
    """create_ride's arguments for a plain ride, with ``kw`` over them."""
    args = dict(
        rider_id=uid("r"),
        region="sf",
        shard_id=0,
        vehicle_class=0,
        pickup=PICKUP,
        dropoff=DROPOFF,
        surge_multiplier=1.0,
        fare_estimate_cents=1500,
        currency="USD",
    )
    args.update(kw)
    return args


async def new_ride(store: RideStore, rider_id: str | None = None, **kw):
    ride, created = await store.create_ride(**ride_args(**({"rider_id": rider_id} if rider_id else {}), **kw))
    assert created
    return ride


async def event_count(pool, ride_id: str) -> int:
    return await pool.fetchval("SELECT count(*) FROM trip_events WHERE ride_id = $1", uuid.UUID(ride_id))


@pytest.fixture
def store(pg_pool):
    return RideStore(pg_pool)


@pytest.fixture
def batched(pg_pool):
    """A store whose writes are grouped as an edge groups them (no window: what arrives
    while one statement is out goes in the next)."""
    return RideStore(pg_pool, grouping=BatchedWrites(0.0))


# -- migrations ---------------------------------------------------------------------------------


async def test_migrations_apply_once(pg_databases):
    dsn = await pg_databases()
    expected = [v for v, _ in migration_files()]
    assert expected and expected[0] == "0001_init"
    assert await migrate(dsn) == expected
    assert await migrate(dsn) == []
    conn = await asyncpg.connect(dsn)
    try:
        assert [r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")] == expected
    finally:
        await conn.close()


async def test_concurrent_migrate_from_two_pools_applies_each_migration_once(pg_databases):
    dsn = await pg_databases()
    pools = [await create_pool(dsn), await create_pool(dsn)]
    try:
        results = await asyncio.gather(*(migrate(p) for p in pools))
        assert sorted(results, key=len) == [[], [v for v, _ in migration_files()]]
        assert await pools[0].fetchval("SELECT count(*) FROM schema_migrations") == len(migration_files())
    finally:
        for p in pools:
            await p.close()


async def test_status_check_matches_the_state_machine(pg_pool, store):
    definition = await pg_pool.fetchval(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conrelid = 'rides'::regclass AND contype = 'c' AND pg_get_constraintdef(oid) LIKE '%status%'"
    )
    for status in RideStatus:
        assert f"'{status.value}'" in definition
    ride = await new_ride(store)
    with pytest.raises(asyncpg.CheckViolationError):
        await pg_pool.execute(
            "UPDATE rides SET status = 'teleported' WHERE ride_id = $1", uuid.UUID(ride.ride_id)
        )


# -- creating -----------------------------------------------------------------------------------


async def test_same_key_same_ride_other_body_mismatch(store):
    rider = uid("r")
    first = await new_ride(store, rider, idempotency_key="req-1")
    again, created = await store.create_ride(
        rider_id=rider,
        region="sf",
        shard_id=0,
        vehicle_class=0,
        pickup=PICKUP,
        dropoff=DROPOFF,
        surge_multiplier=1.0,
        fare_estimate_cents=1500,
        currency="USD",
        idempotency_key="req-1",
    )
    assert not created and again.ride_id == first.ride_id
    with pytest.raises(IdempotencyMismatch):
        await store.create_ride(
            rider_id=rider,
            region="sf",
            shard_id=0,
            vehicle_class=1,
            pickup=PICKUP,
            dropoff=DROPOFF,
            surge_multiplier=1.0,
            fare_estimate_cents=1500,
            currency="USD",
            idempotency_key="req-1",
        )
    # The same key from another rider is another request.
    other = await new_ride(store, uid("r"), idempotency_key="req-1")
    assert other.ride_id != first.ride_id


async def test_twenty_concurrent_creates_with_one_key_make_one_ride(pg_pool, store):
    rider = uid("r")

    async def create():
        return await store.create_ride(
            rider_id=rider,
            region="sf",
            shard_id=0,
            vehicle_class=0,
            pickup=PICKUP,
            dropoff=DROPOFF,
            surge_multiplier=1.0,
            fare_estimate_cents=1500,
            currency="USD",
            idempotency_key="same",
            fingerprint="fp-1",
        )

    results = await asyncio.gather(*(create() for _ in range(20)))
    assert sum(created for _, created in results) == 1
    assert len({ride.ride_id for ride, _ in results}) == 1
    assert await pg_pool.fetchval("SELECT count(*) FROM rides WHERE rider_id = $1", rider) == 1
    assert await event_count(pg_pool, results[0][0].ride_id) == 1


async def test_bad_input_stores_nothing(pg_pool, store):
    rider = uid("r")
    with pytest.raises(InvalidInput):
        await new_ride(store, rider, pickup=(91.0, 0.0))
    with pytest.raises(InvalidInput):
        await new_ride(store, rider, surge_multiplier=0.5)
    with pytest.raises(InvalidInput):
        await new_ride(store, rider, idempotency_key="x" * 201)
    assert await pg_pool.fetchval("SELECT count(*) FROM rides WHERE rider_id = $1", rider) == 0


async def test_a_quote_is_checked_used_once_and_locks_the_price(pg_pool, store):
    rider, quotes = uid("r"), QuoteStore(pg_pool)
    quote = make_quote(FareRules(), 0, PICKUP, DROPOFF, speed_mps=8.0, surge=1.4, now=time.time())
    saved = await quotes.save(rider, "sf", PICKUP, DROPOFF, quote)
    ride = await new_ride(store, rider, quote_id=saved.quote_id, surge_multiplier=1.0, fare_estimate_cents=1)
    assert ride.quote_id == saved.quote_id
    assert ride.surge_multiplier == pytest.approx(1.4)
    assert ride.fare_estimate_cents == quote.fare.total_cents
    assert (await quotes.get(saved.quote_id)).used_by_ride == ride.ride_id
    with pytest.raises(Conflict):
        await new_ride(store, rider, quote_id=saved.quote_id)
    with pytest.raises(InvalidInput):  # another rider's quote is as good as unknown
        other = await quotes.save(uid("r"), "sf", PICKUP, DROPOFF, quote)
        await new_ride(store, rider, quote_id=other.quote_id)
    fresh = await quotes.save(rider, "sf", PICKUP, DROPOFF, quote)
    with pytest.raises(InvalidInput):
        await new_ride(store, rider, quote_id=fresh.quote_id, vehicle_class=1)
    stale = make_quote(FareRules(), 0, PICKUP, DROPOFF, speed_mps=8.0, surge=1.0, now=time.time() - 3600)
    expired = await quotes.save(rider, "sf", PICKUP, DROPOFF, stale)
    with pytest.raises(Conflict):
        await new_ride(store, rider, quote_id=expired.quote_id)
    with pytest.raises(InvalidInput):
        await new_ride(store, rider, quote_id="not-a-uuid")
    assert await pg_pool.fetchval("SELECT count(*) FROM rides WHERE rider_id = $1", rider) == 1
    assert (await quotes.get(fresh.quote_id)).used_by_ride is None


# -- transitions -----------------------------------------------------------------------------------


async def test_every_transition_to_completed_with_versions_and_events(pg_pool, store):
    ride = await new_ride(store)
    rider, driver = ride.rider_id, "drv-7"
    steps = [
        (TripEvent.OFFER, ActorRole.SYSTEM, "shard-0", RideStatus.OFFERED),
        (TripEvent.ACCEPT, ActorRole.DRIVER, driver, RideStatus.ACCEPTED),
        (TripEvent.ARRIVE, ActorRole.DRIVER, driver, RideStatus.ARRIVED),
        (TripEvent.START, ActorRole.DRIVER, driver, RideStatus.IN_PROGRESS),
        (TripEvent.COMPLETE, ActorRole.DRIVER, driver, RideStatus.COMPLETED),
    ]
    for version, (event, role, actor, status) in enumerate(steps, start=2):
        data = (
            {"final_fare_cents": 1734, "distance_m": 2100.5, "duration_s": 540}
            if status == "completed"
            else None
        )
        ride = await store.transition(
            ride.ride_id, event, role, actor, expected_version=version - 1, data=data
        )
        assert (ride.status, ride.version) == (status, version)
    assert ride.driver_id == 7 and ride.rider_id == rider
    assert (ride.final_fare_cents, ride.distance_m, ride.duration_s) == (1734, 2100.5, 540.0)
    assert ride.requested_at <= ride.accepted_at <= ride.arrived_at <= ride.started_at <= ride.completed_at
    events = await store.events(ride.ride_id)
    assert [e["version"] for e in events] == [1, 2, 3, 4, 5, 6]
    assert [e["event"] for e in events] == ["request", "offer", "accept", "arrive", "start", "complete"]
    assert [e["status"] for e in events] == ["requested", *(s.value for *_, s in steps)]
    assert all(e["applied"] for e in events)
    assert events[-1]["data"]["final_fare_cents"] == 1734
    assert (await store.get(ride.ride_id)) == ride
    assert ride.to_json()["completed_at"] == ride.completed_at.isoformat()
    # The history cannot be rewritten.
    with pytest.raises(asyncpg.PostgresError):
        await pg_pool.execute("DELETE FROM trip_events WHERE ride_id = $1", uuid.UUID(ride.ride_id))


async def test_illegal_transitions_are_rejected_and_change_nothing(pg_pool, store):
    ride = await new_ride(store)
    illegal = [
        (TripEvent.ACCEPT, ActorRole.DRIVER, "drv-1"),  # nothing was offered
        (TripEvent.ARRIVE, ActorRole.SUPPORT, "agent-1"),
        (TripEvent.COMPLETE, ActorRole.SYSTEM, "shard-0"),
        (TripEvent.OFFER, ActorRole.RIDER, ride.rider_id),  # riders do not make offers
    ]
    for event, role, actor in illegal:
        with pytest.raises(IllegalTransition):
            await store.transition(ride.ride_id, event, role, actor)
    with pytest.raises(InvalidInput):
        await store.transition(ride.ride_id, "teleport", "system", "shard-0")
    assert await store.get(ride.ride_id) == ride
    assert await event_count(pg_pool, ride.ride_id) == 1
    ride = await store.transition(ride.ride_id, "expire", "system", "shard-0")
    with pytest.raises(IllegalTransition):
        await store.transition(ride.ride_id, "cancel", "support", "agent-1")
    assert (await store.get(ride.ride_id)).version == 2


async def test_a_drivers_step_must_come_from_the_rides_driver(store):
    # Whether a rider or driver may act on a ride at all is the edge's to decide
    # (api/services/views.py); the store keeps the ride's driver part of its state.
    ride = await new_ride(store)
    ride = await store.transition(ride.ride_id, "offer", "system", "shard-0")
    ride = await store.transition(ride.ride_id, "accept", "driver", "drv-3")
    with pytest.raises(Conflict) as err:
        await store.transition(ride.ride_id, "arrive", "driver", "drv-4")
    assert err.value.detail["reason"] == "other_driver"
    with pytest.raises(Conflict):
        await store.transition(ride.ride_id, "arrive", "driver", "someone", driver_id=4)
    with pytest.raises(InvalidInput):
        await store.transition(ride.ride_id, "arrive", "driver", "nobody")
    ride = await store.transition(ride.ride_id, "arrive", "driver", "3")  # the bare integer id works too
    assert ride.status == RideStatus.ARRIVED
    for bad in ("not-a-uuid", str(uuid.uuid4())):
        with pytest.raises(NotFound):
            await store.transition(bad, "cancel", "support", "agent-1")
        assert await store.get(bad) is None


async def test_version_conflict_changes_nothing(store):
    ride = await new_ride(store)
    ride = await store.transition(ride.ride_id, "offer", "system", "shard-0", expected_version=1)
    with pytest.raises(Conflict) as err:
        await store.transition(ride.ride_id, "accept", "driver", "drv-1", expected_version=1)
    assert err.value.detail["current_version"] == 2 and err.value.detail["status"] == "offered"
    assert await store.get(ride.ride_id) == ride


async def test_twenty_concurrent_accepts_exactly_one_wins(pg_pool, store):
    ride = await new_ride(store)
    ride = await store.transition(ride.ride_id, "offer", "system", "shard-0")

    async def accept(driver: int):
        return await store.transition(ride.ride_id, "accept", "driver", f"drv-{driver}", expected_version=2)

    results = await asyncio.gather(*(accept(d) for d in range(1, 21)), return_exceptions=True)
    won = [r for r in results if not isinstance(r, BaseException)]
    lost = [r for r in results if isinstance(r, BaseException)]
    assert len(won) == 1 and len(lost) == 19
    assert all(isinstance(e, Conflict) for e in lost)
    final = await store.get(ride.ride_id)
    assert final.status == RideStatus.ACCEPTED and final.version == 3 and final.driver_id == won[0].driver_id
    events = await store.events(ride.ride_id)
    assert [e["event"] for e in events].count("accept") == 1


async def test_accept_before_the_offer_record_landed(store):
    ride = await new_ride(store)
    ride = await store.transition(ride.ride_id, "accept", "driver", "drv-9", offer_pending=True)
    assert (ride.status, ride.version, ride.driver_id) == (RideStatus.ACCEPTED, 3, 9)
    # The shard's offered record arrives afterwards: kept, not applied.
    applied = await store.apply_record("1-0-late", _record(ride.ride_id, "offered", driver_id=9))
    assert applied is False
    events = await store.events(ride.ride_id)
    assert [(e["event"], e["applied"]) for e in events] == [
        ("request", True),
        ("offer", True),
        ("accept", True),
        ("offer", False),
    ]
    assert (await store.get(ride.ride_id)).version == 3


@pytest.mark.parametrize(
    ("stage", "role", "actor"),
    [
        ("requested", "rider", None),
        ("offered", "rider", None),
        ("accepted", "rider", None),
        ("arrived", "rider", None),
        ("accepted", "driver", "drv-5"),
        ("arrived", "driver", "drv-5"),
        ("in_progress", "support", "agent-1"),
    ],
)
async def test_cancellation_at_each_stage(store, stage, role, actor):
    ride = await new_ride(store)
    path = {
        "requested": [],
        "offered": ["offer"],
        "accepted": ["offer", "accept"],
        "arrived": ["offer", "accept", "arrive"],
        "in_progress": ["offer", "accept", "arrive", "start"],
    }
    for event in path[stage]:
        who = ("system", "shard-0") if event == "offer" else ("driver", "drv-5")
        ride = await store.transition(ride.ride_id, event, *who)
    assert ride.status == stage
    if stage == "in_progress":
        with pytest.raises(IllegalTransition):  # a trip under way is not the rider's to cancel
            await store.transition(ride.ride_id, "cancel", "rider", ride.rider_id)
    fee = 500 if (role, stage) == ("rider", "arrived") else None
    cancelled = await store.transition(
        ride.ride_id,
        "cancel",
        role,
        actor or ride.rider_id,
        expected_version=ride.version,
        data={"cancel_fee_cents": fee} if fee else None,
    )
    assert cancelled.status == RideStatus.CANCELLED and cancelled.version == ride.version + 1
    assert cancelled.cancel_by == role and cancelled.cancel_fee_cents == fee
    assert cancelled.cancelled_at is not None
    with pytest.raises(IllegalTransition):
        await store.transition(ride.ride_id, "cancel", "support", "agent-1")


# -- the shards' records ----------------------------------------------------------------------------


def _record(ride_id: str, event: str, **data) -> dict:
    return {"ride_id": ride_id, "event": event, "data": data, "shard_id": 0, "at": time.time()}


async def test_records_apply_once_and_late_ones_change_nothing(pg_pool, store):
    ride = await new_ride(store)
    src = uid("1700000000000")
    offered = _record(ride.ride_id, "offered", driver_id=4, offer_id=f"{ride.ride_id}:1", expires_at=1.0)
    assert await store.apply_record(f"{src}-0", offered) is True
    assert await store.apply_record(f"{src}-0", offered) is False  # replay
    assert (await store.get(ride.ride_id)).status == RideStatus.OFFERED
    declined = _record(ride.ride_id, "offer_declined", driver_id=4, offer_id=f"{ride.ride_id}:1")
    assert await store.apply_record(f"{src}-1", declined) is True
    assert await store.apply_record(f"{src}-2", _record(ride.ride_id, "offered", driver_id=6)) is True
    ride = await store.transition(ride.ride_id, "accept", "driver", "drv-6", expected_version=4)
    # The offer's timeout raced the accept and lost: stored for support, not applied.
    late = _record(ride.ride_id, "offer_expired", driver_id=6, offer_id=f"{ride.ride_id}:2")
    assert await store.apply_record(f"{src}-3", late) is False
    assert await store.apply_record(f"{src}-3", late) is False
    assert await store.get(ride.ride_id) == ride
    events = await store.events(ride.ride_id)
    assert [(e["event"], e["status"], e["version"], e["applied"]) for e in events] == [
        ("request", "requested", 1, True),
        ("offer", "offered", 2, True),
        ("offer_declined", "requested", 3, True),
        ("offer", "offered", 4, True),
        ("accept", "accepted", 5, True),
        ("offer_expired", "accepted", 5, False),
    ]
    assert events[2]["actor_role"] == "driver" and events[2]["actor_id"] == "4"
    assert [e["source"] for e in events if e["source"]] == [f"{src}-{i}" for i in range(4)]


async def test_expired_and_cancelled_records(store):
    a, b = await new_ride(store), await new_ride(store)
    assert await store.apply_record(uid("e"), _record(a.ride_id, "expired", waited_s=180.0))
    assert await store.apply_record(uid("c"), _record(b.ride_id, "cancelled", by="rider", stage="open"))
    a, b = await store.get(a.ride_id), await store.get(b.ride_id)
    assert a.status == RideStatus.EXPIRED and a.expired_at is not None
    assert b.status == RideStatus.CANCELLED and b.cancel_by == "rider"
    # The rider cancelled through the edge first; the shard's record is then late.
    c = await new_ride(store)
    await store.transition(c.ride_id, "cancel", "rider", c.rider_id)
    assert not await store.apply_record(uid("c"), _record(c.ride_id, "cancelled", by="rider"))
    assert [e["applied"] for e in await store.events(c.ride_id)] == [True, True, False]


async def test_bad_records_store_nothing_and_never_raise(pg_pool, store):
    ride = await new_ride(store)
    before = await pg_pool.fetchval("SELECT count(*) FROM trip_events")
    bad = [
        ("s-1", _record("not-a-uuid", "offered", driver_id=1)),
        ("s-2", _record(str(uuid.uuid4()), "offered", driver_id=1)),
        ("s-3", _record(ride.ride_id, "teleported")),
        ("s-4", "not a dict"),
        ("s-5", {**_record(ride.ride_id, "offered"), "data": ["not", "a", "dict"]}),
        ("", _record(ride.ride_id, "offered")),
        ("s-6", {**_record(ride.ride_id, "offered"), "ride_id": None}),
    ]
    for source, record in bad:
        assert await store.apply_record(source, record) is False
    assert await pg_pool.fetchval("SELECT count(*) FROM trip_events") == before
    assert await store.get(ride.ride_id) == ride
    # A record with an absurd time is still applied, at the time it is stored.
    assert await store.apply_record(uid("t"), {**_record(ride.ride_id, "offered"), "at": 1e300})
    assert (await store.events(ride.ride_id))[-1]["event"] == "offer"


# -- reading ---------------------------------------------------------------------------------------


async def test_open_rides_restore_a_shard(store):
    region = uid("city")
    r0 = await new_ride(store, region=region, shard_id=0, vehicle_class=1, surge_multiplier=1.5)
    r1 = await new_ride(store, region=region, shard_id=0)
    await store.transition(r1.ride_id, "offer", "system", "shard-0")
    r2 = await new_ride(store, region=region, shard_id=1)
    for gone, events in (
        (await new_ride(store, region=region), ["offer", "accept"]),
        (await new_ride(store, region=region), ["expire"]),
        (await new_ride(store, region=region), ["cancel"]),
    ):
        for event in events:
            role = {"accept": ("driver", "drv-1"), "cancel": ("rider", gone.rider_id)}.get(event)
            await store.transition(gone.ride_id, event, *(role or ("system", "shard-0")))
    await new_ride(store, region=uid("elsewhere"))
    open_all = await store.open_rides(region)
    assert [d["ride_id"] for d in open_all] == [r0.ride_id, r1.ride_id, r2.ride_id]
    assert [d["ride_id"] for d in await store.open_rides(region, shard_id=1)] == [r2.ride_id]
    requests = [RideRequest(**d) for d in open_all]
    first = requests[0]
    assert (first.rider_id, first.vehicle_class, first.surge_multiplier) == (r0.rider_id, 1, 1.5)
    assert (first.pickup_lat, first.pickup_lng, first.dropoff_lat, first.dropoff_lng) == (*PICKUP, *DROPOFF)
    assert first.requested_at == pytest.approx(r0.requested_at.timestamp())
    assert abs(first.requested_at - time.time()) < 600 and first.quote_id is None


async def test_rides_of_rider_newest_first(store):
    rider = uid("r")
    made = [await new_ride(store, rider) for _ in range(3)]
    await new_ride(store)
    got = await store.rides_of_rider(rider)
    assert [r.ride_id for r in got] == [r.ride_id for r in reversed(made)]
    assert [r.ride_id for r in await store.rides_of_rider(rider, limit=2)] == [
        made[2].ride_id,
        made[1].ride_id,
    ]


async def test_an_unreachable_database_is_unavailable():
    from dispatch.errors import Unavailable
    from storage.redis_server import free_port

    dsn = f"postgresql://postgres@127.0.0.1:{free_port()}/dispatch"
    with pytest.raises(Unavailable):
        await create_pool(dsn, timeout_s=2)
    with pytest.raises(Unavailable):
        await migrate(dsn)


# -- round trips -------------------------------------------------------------------------------------


@pytest.fixture
def round_trips(monkeypatch):
    """The statements sent to Postgres (each one round trip), as they are sent."""
    sent: list[str] = []
    conn_cls = asyncpg.connection.Connection
    for name in ("execute", "executemany", "fetch", "fetchrow", "fetchval"):
        original = getattr(conn_cls, name)

        def counted(self, query, *args, _original=original, **kw):
            sent.append(query)
            return _original(self, query, *args, **kw)

        monkeypatch.setattr(conn_cls, name, counted)
    return sent


async def test_round_trips_of_a_record_a_batch_and_an_accept(store, round_trips):
    ride = await new_ride(store)
    src = uid("1700000000001")
    round_trips.clear()
    assert await store.apply_record(f"{src}-0", _record(ride.ride_id, "offered", driver_id=4)) is True
    print("apply_record:", len(round_trips), round_trips)
    assert len(round_trips) == 4  # BEGIN, lock + replay check, the event, COMMIT
    round_trips.clear()
    batch = [
        (f"{src}-1", _record(ride.ride_id, "offer_declined", driver_id=4)),
        (f"{src}-2", _record(ride.ride_id, "offered", driver_id=6)),
        (f"{src}-3", _record(ride.ride_id, "offer_expired", driver_id=6)),
    ]
    assert await store.apply_records(batch) == [True, True, True]
    print("apply_records(3):", len(round_trips))
    assert len(round_trips) == 3 + len(batch)
    other = await new_ride(store)
    round_trips.clear()
    await store.transition(other.ride_id, "accept", "driver", "drv-8", offer_pending=True)
    print("accept:", len(round_trips), round_trips)
    # Tried as offered first (it is not: the shard's record has not come), then BEGIN,
    # lock, the implied offer, the accept (+ its driver), COMMIT.
    assert len(round_trips) == 6


async def test_an_accept_of_an_offered_ride_needs_no_read_of_it(store, round_trips):
    """The driver's accept names no version: a ride still offered to no driver moves in
    one statement; one already taken is judged on the locked row as before."""
    ride = await store.transition((await new_ride(store)).ride_id, "offer", "system", "shard-0")
    round_trips.clear()
    accepted = await store.transition(ride.ride_id, "accept", "driver", "drv-8", offer_pending=True)
    assert len(round_trips) == 1
    assert (accepted.status, accepted.driver_id, accepted.version) == (
        RideStatus.ACCEPTED,
        8,
        ride.version + 1,
    )
    events = await store.events(ride.ride_id)
    assert [(e["event"], e["version"], e["actor_id"]) for e in events][-1] == (
        "accept",
        ride.version + 1,
        "drv-8",
    )
    with pytest.raises(Conflict):
        await store.transition(ride.ride_id, "accept", "driver", "drv-9", offer_pending=True)
    assert (await store.get(ride.ride_id)).driver_id == 8


# -- batched writes --------------------------------------------------------------------------------


async def test_rides_requested_at_once_are_written_together_each_as_if_alone(pg_pool, batched, round_trips):
    """Rides requested at once go in one statement (what arrives while a write is out goes
    in the next); each caller gets its own ride, with its own values."""
    twice, keyed = uid("r"), uid("r")
    asks = [dict(rider_id=uid("r"), fare_estimate_cents=1000 + i) for i in range(5)]
    asks += [dict(rider_id=twice, fare_estimate_cents=2000), dict(rider_id=twice, fare_estimate_cents=2001)]
    asks += [
        dict(rider_id=keyed, fare_estimate_cents=3000, idempotency_key="k", fingerprint="fp"),
        dict(rider_id=keyed, fare_estimate_cents=3000, idempotency_key="k", fingerprint="fp"),
        dict(rider_id=keyed, fare_estimate_cents=3000, idempotency_key="k", fingerprint="other"),
    ]
    results = await asyncio.gather(
        *(batched.create_ride(**ride_args(**ask)) for ask in asks), return_exceptions=True
    )
    inserts = [q for q in round_trips if "INSERT INTO rides" in q]
    assert len(inserts) == 1 and "unnest" in inserts[0]
    for ask, result in zip(asks[:7], results[:7], strict=True):
        ride, created = result
        assert created and (ride.rider_id, ride.fare_estimate_cents) == (
            ask["rider_id"],
            ask["fare_estimate_cents"],
        )
        assert ride.status == RideStatus.REQUESTED and ride.version == 1
        assert await event_count(pg_pool, ride.ride_id) == 1
    keyed_results = results[7:]
    mismatches = [r for r in keyed_results if isinstance(r, IdempotencyMismatch)]
    rides = [r for r in keyed_results if not isinstance(r, BaseException)]
    # The key was first used by one of the two same requests or by the other one: either
    # way one ride, and whoever asked for something else under the key is refused.
    assert len(rides) + len(mismatches) == 3 and len({ride.ride_id for ride, _ in rides}) == 1
    assert sum(created for _, created in rides) == 1
    assert await pg_pool.fetchval("SELECT count(*) FROM rides WHERE rider_id = $1", keyed) == 1
    assert await pg_pool.fetchval("SELECT count(*) FROM rides WHERE rider_id = $1", twice) == 2


async def test_a_ride_postgres_refuses_fails_alone_in_its_batch(pg_pool, batched):
    riders = [uid("r") for _ in range(6)]
    pickups = [PICKUP] * 6
    pickups[3] = (91.0, 0.0)  # past Postgres' range check (the edge refuses it before)
    results = await asyncio.gather(
        *(new_ride(batched, rider, pickup=pickup) for rider, pickup in zip(riders, pickups, strict=True)),
        return_exceptions=True,
    )
    assert isinstance(results[3], InvalidInput)
    assert all(
        r.rider_id == rider for i, (r, rider) in enumerate(zip(results, riders, strict=True)) if i != 3
    )
    assert await pg_pool.fetchval("SELECT count(*) FROM rides WHERE rider_id = $1", riders[3]) == 0
    assert await pg_pool.fetchval("SELECT count(*) FROM rides WHERE rider_id = ANY($1)", riders) == 5


async def test_rides_with_quotes_at_once_each_use_their_quote_once(pg_pool, batched, round_trips):
    """Quoted rides in one statement: each good quote used once at its price; a quote used
    before, expired, another rider's, or named by two rides of the batch is decided alone,
    with the error the rider would get alone."""
    quotes = QuoteStore(pg_pool)
    now = time.time()
    quote = make_quote(FareRules(), 0, PICKUP, DROPOFF, speed_mps=8.0, surge=1.4, now=now)
    stale = make_quote(FareRules(), 0, PICKUP, DROPOFF, speed_mps=8.0, surge=1.0, now=now - 3600)
    riders = [uid("r") for _ in range(6)]
    good = [await quotes.save(r, "sf", PICKUP, DROPOFF, quote) for r in riders[:3]]
    used = await quotes.save(riders[3], "sf", PICKUP, DROPOFF, quote)
    await new_ride(batched, riders[3], quote_id=used.quote_id)
    expired = await quotes.save(riders[4], "sf", PICKUP, DROPOFF, stale)
    others = await quotes.save(uid("r"), "sf", PICKUP, DROPOFF, quote)
    asks = [dict(rider_id=r, quote_id=q.quote_id) for r, q in zip(riders[:3], good, strict=True)]
    asks += [
        dict(rider_id=riders[3], quote_id=used.quote_id),
        dict(rider_id=riders[4], quote_id=expired.quote_id),
        dict(rider_id=riders[5], quote_id=others.quote_id),
        dict(rider_id=riders[0], quote_id=good[0].quote_id),  # the same quote twice at once
        dict(rider_id=riders[5]),  # no quote
    ]
    round_trips.clear()
    results = await asyncio.gather(
        *(batched.create_ride(**ride_args(fare_estimate_cents=1, **ask)) for ask in asks),
        return_exceptions=True,
    )
    assert sum("unnest" in q and "INSERT INTO rides" in q for q in round_trips) == 1
    for (ride, created), q in zip(results[:3], good, strict=True):
        assert created and ride.quote_id == q.quote_id
        assert (ride.surge_multiplier, ride.fare_estimate_cents) == (
            pytest.approx(1.4),
            quote.fare.total_cents,
        )
        assert (await quotes.get(q.quote_id)).used_by_ride == ride.ride_id
    assert isinstance(results[3], Conflict) and isinstance(results[4], Conflict)
    assert isinstance(results[5], InvalidInput)
    assert isinstance(results[6], Conflict)  # its quote went to the first ride
    assert results[7][1] and results[7][0].quote_id is None
    counts = [await pg_pool.fetchval("SELECT count(*) FROM rides WHERE rider_id = $1", r) for r in riders]
    assert counts == [1, 1, 1, 1, 0, 1]
    assert (await quotes.get(expired.quote_id)).used_by_ride is None
    assert (await quotes.get(others.quote_id)).used_by_ride is None
    for ride, _ in (results[0], results[1], results[2], results[7]):
        assert await event_count(pg_pool, ride.ride_id) == 1


async def test_accepts_at_once_are_written_together_each_as_if_alone(pg_pool, batched, round_trips):
    """Drivers' accepts of offered rides in one statement; a ride still requested (its
    offer record not yet applied) and a second accept of one ride are decided alone, on
    the locked row, as before."""
    offered = [
        await batched.transition((await new_ride(batched)).ride_id, "offer", "system", "shard-0")
        for _ in range(6)
    ]
    requested = await new_ride(batched)
    round_trips.clear()
    asks = [(ride.ride_id, 100 + i) for i, ride in enumerate(offered)]
    asks += [(requested.ride_id, 200), (offered[0].ride_id, 300)]
    # Every other accept asks for the ride's history (the REST answer carries it).
    histories: list[list[dict] | None] = [[] if i % 2 else None for i in range(len(asks))]
    results = await asyncio.gather(
        *(
            batched.transition(rid, "accept", "driver", f"drv-{d}", offer_pending=True, history=h)
            for (rid, d), h in zip(asks, histories, strict=True)
        ),
        return_exceptions=True,
    )
    assert any("unnest" in q and "UPDATE rides" in q for q in round_trips)
    won_first = [r for r in (results[0], results[-1]) if not isinstance(r, BaseException)]
    assert len(won_first) == 1 and isinstance(
        results[0] if won_first[0] is results[-1] else results[-1], Conflict
    )
    for (rid, driver), result in zip(asks[1:7], results[1:7], strict=True):
        assert (result.ride_id, result.status, result.driver_id) == (rid, RideStatus.ACCEPTED, driver)
    assert (results[6].version, offered[1].version + 1) == (3, 3)
    fields = ("version", "event", "status", "applied", "actor_role", "at")
    for (rid, _), history, result in zip(asks, histories, results, strict=True):
        if history is not None and not isinstance(result, BaseException):
            assert history == [{f: e[f] for f in fields} for e in await batched.events(rid)]
    assert histories[1] and histories[3] and histories[5]
    for rid, _ in asks[:7]:
        events = await batched.events(rid)
        assert [e["version"] for e in events] == list(range(1, len(events) + 1))
        assert [e["event"] for e in events] == ["request", "offer", "accept"]
        assert events[-1]["actor_id"] == f"drv-{(await batched.get(rid)).driver_id}"
    assert (
        await pg_pool.fetchval(
            "SELECT count(*) FROM drivers WHERE driver_id = ANY($1::bigint[])",
            [100, 101, 102, 103, 104, 105, 200],
        )
        == 7
    )


async def test_a_transition_on_the_ride_as_seen_is_one_round_trip(store, round_trips):
    ride = await store.transition((await new_ride(store)).ride_id, "offer", "system", "shard-0")
    round_trips.clear()
    accepted = await store.transition(
        ride.ride_id, "accept", "driver", "drv-8", offer_pending=True, seen=ride
    )
    assert len(round_trips) == 1, round_trips  # the update and its event, if still at the version seen
    assert (accepted.status, accepted.version, accepted.driver_id) == (RideStatus.ACCEPTED, 3, 8)
    assert [e["event"] for e in await store.events(ride.ride_id)] == ["request", "offer", "accept"]


async def test_a_stale_seen_ride_is_decided_on_the_locked_row(store):
    """What the caller saw is only a guess: a ride that moved on since is judged as it is
    now (the version check, the other driver, the state machine), with nothing stored
    twice."""
    ride = await store.transition((await new_ride(store)).ride_id, "offer", "system", "shard-0")
    won = await store.transition(ride.ride_id, "accept", "driver", "drv-1", seen=ride)
    with pytest.raises(Conflict) as err:  # the same version seen by a second driver
        await store.transition(ride.ride_id, "accept", "driver", "drv-2", seen=ride)
    assert err.value.detail["reason"] == "other_driver"
    with pytest.raises(Conflict) as err:
        await store.transition(ride.ride_id, "arrive", "driver", "drv-1", expected_version=2, seen=ride)
    assert err.value.detail["current_version"] == 3
    # Stale but still allowed on the current row: applied once, on the current version.
    arrived = await store.transition(ride.ride_id, "arrive", "driver", "drv-1", seen=ride)
    assert (arrived.status, arrived.version) == (RideStatus.ARRIVED, won.version + 1)
    # Seen as requested, offer pending, but the ride was offered meanwhile: one accept.
    other = await new_ride(store)
    offered = await store.transition(other.ride_id, "offer", "system", "shard-0")
    taken = await store.transition(other.ride_id, "accept", "driver", "drv-3", offer_pending=True, seen=other)
    assert taken.version == offered.version + 1
    assert [e["event"] for e in await store.events(other.ride_id)] == ["request", "offer", "accept"]


async def test_twenty_concurrent_accepts_on_one_seen_version_exactly_one_wins(store):
    ride = await store.transition((await new_ride(store)).ride_id, "offer", "system", "shard-0")
    results = await asyncio.gather(
        *(store.transition(ride.ride_id, "accept", "driver", f"drv-{d}", seen=ride) for d in range(1, 21)),
        return_exceptions=True,
    )
    won = [r for r in results if not isinstance(r, BaseException)]
    assert len(won) == 1 and all(isinstance(r, Conflict) for r in results if r not in won)
    assert [e["event"] for e in await store.events(ride.ride_id)].count("accept") == 1


async def test_an_accept_stores_a_driver_never_seen_before(pg_pool, store):
    driver = int(time.time_ns() % 10**15) + 10**15  # no ride had this driver yet
    assert await pg_pool.fetchval("SELECT count(*) FROM drivers WHERE driver_id = $1", driver) == 0
    ride = await new_ride(store)
    ride = await store.transition(ride.ride_id, "accept", "driver", f"drv-{driver}", offer_pending=True)
    assert (ride.status, ride.driver_id, ride.version) == (RideStatus.ACCEPTED, driver, 3)
    assert await pg_pool.fetchval("SELECT count(*) FROM drivers WHERE driver_id = $1", driver) == 1
    # A known driver's next accept leaves its row as it is.
    again = await store.transition(
        (await new_ride(store)).ride_id, "accept", "driver", str(driver), offer_pending=True
    )
    assert again.driver_id == driver
    assert await pg_pool.fetchval("SELECT count(*) FROM drivers WHERE driver_id = $1", driver) == 1


async def test_a_batch_of_records_keeps_each_records_outcome(pg_pool, store):
    ride = await new_ride(store)
    src = uid("1700000000002")
    assert await store.apply_record(f"{src}-0", _record(ride.ride_id, "offered", driver_id=4)) is True
    batch = [
        (f"{src}-0", _record(ride.ride_id, "offered", driver_id=4)),  # a replay of a stored one
        (f"{src}-1", _record(ride.ride_id, "offer_declined", driver_id=4)),
        ("", _record(ride.ride_id, "offered")),  # bad: stores nothing
        (f"{src}-2", _record(ride.ride_id, "offer_expired", driver_id=4)),  # not offered any more
        (f"{src}-3", _record(ride.ride_id, "offered", driver_id=5)),
        (f"{src}-3", _record(ride.ride_id, "offered", driver_id=5)),  # a replay within the batch
        (f"{src}-4", _record(ride.ride_id, "expired", waited_s=180.0)),
        (f"{src}-5", _record(ride.ride_id, "cancelled", by="rider")),  # too late
    ]
    assert await store.apply_records(batch) == [False, True, False, False, True, False, True, False]
    assert await store.apply_records(batch) == [False] * len(batch)  # all replays now
    events = await store.events(ride.ride_id)
    assert [(e["event"], e["status"], e["version"], e["applied"], e["source"]) for e in events] == [
        ("request", "requested", 1, True, None),
        ("offer", "offered", 2, True, f"{src}-0"),
        ("offer_declined", "requested", 3, True, f"{src}-1"),
        ("offer_expired", "requested", 3, False, f"{src}-2"),
        ("offer", "offered", 4, True, f"{src}-3"),
        ("expire", "expired", 5, True, f"{src}-4"),
        ("cancel", "expired", 5, False, f"{src}-5"),
    ]
    assert events[2]["actor_id"] == "4" and events[4]["actor_id"] == events[5]["actor_id"] == "shard-0"
    assert events[6]["actor_id"] == ride.rider_id
    assert (await store.get(ride.ride_id)).status == RideStatus.EXPIRED
    # Records of several rides, and of an unknown one, each keep their outcome.
    a, b = await new_ride(store), await new_ride(store)
    mixed = [
        (f"{src}-6", _record(a.ride_id, "offered", driver_id=1)),
        (f"{src}-7", _record(str(uuid.uuid4()), "offered", driver_id=1)),
        (f"{src}-8", _record(b.ride_id, "expired")),
        (f"{src}-9", _record(a.ride_id, "offer_expired", driver_id=1)),
    ]
    assert await store.apply_records(mixed) == [True, False, True, True]
    assert (await store.get(a.ride_id)).version == 3 and (await store.get(b.ride_id)).version == 2


async def test_a_failing_batch_stores_none_of_its_records(pg_pool, store):
    ride = await new_ride(store)
    src = uid("1700000000003")
    batch = [
        (f"{src}-0", _record(ride.ride_id, "offered", driver_id=4)),
        (f"{src}-1", _record(ride.ride_id, "cancelled", cancel_fee_cents=-1)),  # refused when applied
    ]
    with pytest.raises(InvalidInput):
        await store.apply_records(batch)
    assert await store.get(ride.ride_id) == ride
    assert await event_count(pg_pool, ride.ride_id) == 1


async def test_a_record_stored_by_another_consumer_while_waiting_for_the_lock_is_a_replay(
    pg_pool, store, monkeypatch
):
    # Two consumers during a lease handover: one holds the ride's lock while it stores a
    # record; the other, waiting for that lock, must see the record as a replay.
    attempts = []
    first_try = store._apply_run

    async def counted(run):
        attempts.append(len(run))
        return await first_try(run)

    monkeypatch.setattr(store, "_apply_run", counted)
    ride = await new_ride(store)
    source = uid("1700000000004")
    record = _record(ride.ride_id, "offered", driver_id=4)
    async with pg_pool.acquire() as other, other.transaction():
        await other.execute("SELECT 1 FROM rides WHERE ride_id = $1 FOR UPDATE", uuid.UUID(ride.ride_id))
        await other.execute(
            "WITH new AS (UPDATE rides SET status = 'offered', version = 2 WHERE ride_id = $1 RETURNING *)"
            " INSERT INTO trip_events (ride_id, version, event, status, actor_role, actor_id, source)"
            " SELECT ride_id, 2, 'offer', 'offered', 'system', 'shard-0', $2 FROM new",
            uuid.UUID(ride.ride_id),
            source,
        )
        waiting = asyncio.create_task(store.apply_records([(source, record)]))
        await eventually(  # until it waits for the lock
            lambda: pg_pool.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                " AND query LIKE '%FOR UPDATE OF r'"
            )
        )
        assert not waiting.done()
    assert await waiting == [False]
    assert attempts == [1, 1]  # its check ran before the other committed: it tried again
    events = await store.events(ride.ride_id)
    assert [(e["event"], e["version"]) for e in events] == [("request", 1), ("offer", 2)]


async def test_the_latest_incarnation_says_when_a_shard_of_the_region_last_restarted(store):
    region = f"inc-{uuid.uuid4().hex[:6]}"
    assert await store.latest_incarnation_at(region) is None
    # A shard's first incarnation is its start, not a restart.
    await store.register_incarnation(region, 0, "aaa1")
    await store.register_incarnation(region, 2, "bbb1")
    assert await store.latest_incarnation_at(region) is None
    second = await store.register_incarnation(region, 0, "aaa2")
    assert await store.latest_incarnation_at(region) == pytest.approx(second)
    third = await store.register_incarnation(region, 2, "bbb2")
    assert third >= second and await store.latest_incarnation_at(region) == pytest.approx(third)
    await store.register_incarnation(region, 3, "ccc1")  # another shard's first start
    assert await store.latest_incarnation_at(region) == pytest.approx(third)
    assert await store.latest_incarnation_at("no-such-region") is None


@pytest.mark.parametrize("path", ["seen", "offered", "locked"])
async def test_a_transition_gives_the_history_as_a_read_of_it_would(store, round_trips, path):
    """``history`` is filled by the transition's own statement: the same events, fields and
    times as :meth:`RideStore.events` reads afterwards, on each of the three ways an
    accept is stored (on the ride as seen, on a ride still offered, on the locked row)."""
    ride = await new_ride(store)
    if path != "locked":
        ride = await store.transition(ride.ride_id, "offer", "system", "shard-0")
    history: list[dict] = []
    round_trips.clear()
    accepted = await store.transition(
        ride.ride_id,
        "accept",
        "driver",
        "drv-8",
        offer_pending=True,
        seen=ride if path == "seen" else None,
        history=history,
    )
    assert len(round_trips) == (1 if path != "locked" else 6)
    fields = ("version", "event", "status", "applied", "actor_role", "at")
    read = [{f: e[f] for f in fields} for e in await store.events(ride.ride_id)]
    assert history == read
    assert [e["event"] for e in history] == ["request", "offer", "accept"]
    assert history[-1]["version"] == accepted.version
