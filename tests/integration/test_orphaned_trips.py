"""Real Ray, Postgres and Redis: trips whose driver went silent are ended by the server.

A driver's app or edge dies mid-trip and nothing on the client side will ever end the
ride. The ride services' sweep (run by the edge's upkeep loop) asks the shards about the
driver; one no shard holds, or whose last position is older than ``[trips]
orphan_after_s``, has its trip cancelled by the system with reason ``driver_lost``, the
rider told, nothing charged. A driver still reporting keeps its trip.
"""

from __future__ import annotations

import time
import uuid

import msgpack
import pytest
import redis.asyncio as aioredis

from api.rides import RideService
from dispatch.drivers import Intent, location_rows
from dispatch.events import rider_channel
from tests.helpers import eventually, point_inside, scaled, stored_ride

pytestmark = pytest.mark.integration

ORPHAN_AFTER_S = 1.0  # the region's default is 600 s; the sweep reads it from its service


async def _accepted_ride(store, region, shard_id, lat, lng, driver_id):
    ride = await stored_ride(store, region, shard_id, lat, lng)
    return await store.transition(
        ride.ride_id, "accept", "driver", str(driver_id), driver_id=driver_id, offer_pending=True
    )


async def test_a_trip_whose_driver_went_silent_is_ended_and_a_live_one_is_kept(
    pg_pool, region, shard_map, shards, shard_client, bus_redis_url
):
    service = RideService(
        pool=pg_pool,
        region=region,
        shard_map=shard_map,
        shards=shard_client,
        surge=None,
        redis_url=bus_redis_url,
        max_in_flight=8,
    )
    await service.start()
    service.trips.orphan_after_s = ORPHAN_AFTER_S
    store = service.rides
    k = 3
    lat, lng = point_inside(shard_map, k, 0.7)
    base = 7_300_000 + int(uuid.uuid4().int % 10_000) * 10
    lost, live = base + 1, base + 2  # no shard holds `lost`; `live` keeps reporting
    r = aioredis.Redis.from_url(bus_redis_url)
    ps = r.pubsub()
    try:
        orphan = await _accepted_ride(store, region, k, lat, lng, lost)
        kept = await _accepted_ride(store, region, k, lat + 0.001, lng, live)
        await ps.subscribe(rider_channel(orphan.rider_id))
        handle = shards.handle(k)

        async def report_live() -> None:
            await handle.ingest.remote(location_rows(live, lat + 0.001, lng, time.time()).tobytes())

        async def orphan_ended() -> bool:
            await report_live()  # the live driver reports throughout
            await service.trips.end_orphans()
            return (await store.get(orphan.ride_id)).status.value == "cancelled"

        await eventually(orphan_ended, timeout_s=scaled(20), interval_s=0.3)
        ended = await store.get(orphan.ride_id)
        assert ended.cancel_by == "system"
        events = await store.events(orphan.ride_id)
        assert events[-1]["data"]["reason"] == "driver_lost"
        assert events[-1]["data"]["cancel_fee_cents"] == 0
        # Nothing charged: no payment row for the ride.
        assert await pg_pool.fetchval("SELECT count(*) FROM payments WHERE ride_id = $1", orphan.ride_id) == 0
        # The rider is told.
        told = None
        deadline = time.monotonic() + scaled(5)
        while told is None and time.monotonic() < deadline:
            msg = await ps.get_message(ignore_subscribe_messages=True, timeout=0.2)
            if msg:
                m = msgpack.unpackb(msg["data"])
                if m.get("type") == "ride_status" and m.get("ride_id") == str(orphan.ride_id):
                    told = m
        assert told is not None and told["status"] == "cancelled" and told["reason"] == "driver_lost"
        # The driver that kept reporting keeps its trip, however long the ride has not changed.
        await report_live()
        assert await service.trips.end_orphans() == 0
        assert (await store.get(kept.ride_id)).status.value == "accepted"
        # Off duty again: the run's shards are shared with later tests.
        await handle.ingest.remote(
            location_rows(live, lat + 0.001, lng, time.time(), intent=Intent.OFFLINE).tobytes()
        )
    finally:
        await ps.aclose()
        await r.aclose()
        await service.stop()
