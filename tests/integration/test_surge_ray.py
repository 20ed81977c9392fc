"""Real Ray and Redis: a rush in one zone surges it in the region's hash; the edge reads it."""

from __future__ import annotations

import logging
import time
import uuid

import h3
import msgpack
import numpy as np
import pytest
import redis.asyncio as aioredis

from actors.events import EventPublisher
from actors.router import LocationRouter, RouterConfig
from actors.surge import SurgeReader, zone_record
from dispatch.drivers import Intent, location_rows
from dispatch.events import surge_key
from dispatch.pricing import SurgeConfig, ZoneSurge
from dispatch.surge_feed import ZoneGrid
from tests.helpers import eventually

pytestmark = pytest.mark.integration

# The Presidio: no hotspot of the shipped region, and no other test puts drivers there.
# (It was the Outer Sunset, the very point of tests/e2e/test_trip.py's SUNSET, whose
# trips' drivers then weighed in this zone's supply when the suites ran together.)
QUIET_POINT = (37.7989, -122.4662)


async def test_a_rush_in_one_zone_surges_it_in_the_hash_and_the_reader_quotes_it(
    region, shard_map, shards, bus_redis_url
):
    cfg = region.surge_config()
    grid = ZoneGrid(shard_map, cfg.resolution)
    zone = h3.latlng_to_cell(*QUIET_POINT, cfg.resolution)
    lat, lng = h3.cell_to_latlng(zone)
    owner = int(grid.owner[grid.zone_id[zone]])
    assert shard_map.shard_for_point(lat, lng) == owner
    handle = shards.handle(owner)
    token = uuid.uuid4().hex[:8]
    driver_id = 8_100_001
    router = LocationRouter(shard_map, shards, RouterConfig(flush_interval_s=0.005))
    await router.start()
    r = aioredis.Redis.from_url(bus_redis_url)
    reader = SurgeReader.for_region(region, bus_redis_url)
    # Earlier tests' drivers may still weigh in the zone's supply, a mean over the
    # model's window: ask for enough rides to outweigh them.
    before = await r.hget(surge_key(region.name), zone)
    supply_before = msgpack.unpackb(before)["supply"] if before else 0.0
    # The hash may hold no reading of the zone yet while earlier tests' drivers (a
    # simulated city's) are still online in it: count those the owner holds there too.
    near = await handle.nearby.remote(lat, lng, region.index.halo_m, 1000)
    in_zone = sum(1 for d in near if h3.latlng_to_cell(d["lat"], d["lng"], cfg.resolution) == zone)
    supply_before = max(supply_before, float(in_zone))
    ride_ids = [f"surge-{token}-{i}" for i in range(30 + 4 * int(np.ceil(supply_before)))]
    try:
        # One driver in the zone...
        router.submit(location_rows(driver_id, lat + 0.001, lng, time.time(), intent=Intent.ONLINE))
        await router.drain()

        async def held():
            d = await handle.driver.remote(driver_id)
            return d and not d["pending"]

        await eventually(held)
        # ... and many riders asking for premium cars (none around: they stay open).
        rng = np.random.default_rng(3)
        for i, ride_id in enumerate(ride_ids):
            plat, plng = lat + rng.uniform(-0.003, 0.003), lng + rng.uniform(-0.003, 0.003)
            await handle.add_ride.remote(
                {
                    "ride_id": ride_id,
                    "rider_id": f"rider-{token}-{i}",
                    "pickup_lat": plat,
                    "pickup_lng": plng,
                    "dropoff_lat": plat + 0.01,
                    "dropoff_lng": plng,
                    "vehicle_class": 2,
                    "requested_at": time.time(),
                }
            )

        async def surged():
            raw = await r.hget(surge_key(region.name), zone)
            rec = msgpack.unpackb(raw) if raw else None
            # An earlier test's rides may have surged the zone already: wait for a reading
            # that counts this rush.
            return rec if rec and rec["multiplier"] > 1.0 and rec["demand"] >= len(ride_ids) else None

        # An observation every interval_s: the rush is counted within two of them.
        rec = await eventually(surged, timeout_s=4 * cfg.interval_s, interval_s=0.25)
        assert rec["demand"] >= len(ride_ids) and rec["supply"] <= supply_before + 5
        assert rec["shard_id"] == owner and abs(rec["updated_at"] - time.time()) < 4 * cfg.interval_s
        assert 1.0 < rec["multiplier"] <= cfg.max_surge
        # The edge's reader resolves a point of the zone to it (the multiplier only rises
        # while the rush lasts, so it reads at least what the hash showed).
        m = await reader.surge_multiplier(lat - 0.001, lng + 0.001)
        assert rec["multiplier"] <= m <= cfg.max_surge
        assert await reader.surge_multiplier(40.0, -100.0) == 1.0  # no shard owns Kansas
        assert reader.available and zone in await reader.zones()
        assert zone in (await handle.stats.remote())["surge"]
    finally:
        for ride_id in ride_ids:
            try:
                await handle.cancel_ride.remote(ride_id)
            except Exception:
                pass  # never added
        router.submit(location_rows(driver_id, lat, lng, time.time(), intent=Intent.OFFLINE))
        await router.drain()
        await router.stop()
        await reader.close()
        await r.aclose()


def _record(multiplier: float, at: float) -> dict:
    return zone_record(ZoneSurge(multiplier, multiplier, 10, 2.0), at, shard_id=0)


async def test_the_reader_ignores_stale_and_malformed_values(bus_redis_url):
    region_name = f"test-{uuid.uuid4().hex[:8]}"
    cfg = SurgeConfig(interval_s=5.0)
    pub = EventPublisher(bus_redis_url)
    fresh, stale, bad = (h3.latlng_to_cell(37.78 + 0.05 * k, -122.42, 7) for k in range(3))
    now = time.time()
    assert await pub.publish_surge(region_name, {fresh: _record(1.7, now), stale: _record(2.0, now - 60)}, 30)
    r = aioredis.Redis.from_url(bus_redis_url)
    await r.hset(surge_key(region_name), bad, b"\x00not msgpack")
    assert 25 <= await r.ttl(surge_key(region_name)) <= 30
    reader = SurgeReader(bus_redis_url, region_name, cfg)
    at = h3.cell_to_latlng
    assert await reader.surge_multiplier(*at(fresh)) == 1.7
    assert await reader.surge_multiplier(*at(stale)) == 1.0  # a minute old: its shard is gone
    assert await reader.surge_multiplier(*at(bad)) == 1.0
    assert set(await reader.zones()) == {fresh}
    await reader.close()
    await r.aclose()


async def test_redis_down_never_raises_and_is_logged_once(caplog):
    from storage.redis_server import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"
    pub = EventPublisher(url)
    reader = SurgeReader(url, "nowhere", SurgeConfig())
    zone = h3.latlng_to_cell(*QUIET_POINT, 7)
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            assert await pub.publish_surge("nowhere", {zone: _record(2.0, time.time())}, 30) is False
            assert await reader.surge_multiplier(*QUIET_POINT) == 1.0
    assert pub.stats()["surge_failed"] == 3 and not reader.available
    assert (
        sum("surge hash" in rec.getMessage() and "not writable" in rec.getMessage() for rec in caplog.records)
        == 1
    )
    assert sum("unreadable" in rec.getMessage() for rec in caplog.records) == 1
    await reader.close()
