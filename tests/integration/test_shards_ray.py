"""Real Ray: the router's batches reach the right shard actors; borders; restarts."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import ray

from actors.router import LocationRouter, RouterConfig
from dispatch.drivers import Intent, location_rows
from dispatch.geo import haversine_m
from tests.helpers import eventually

pytestmark = pytest.mark.integration


def _fleet(region, n, seed, first_id):
    rng = np.random.default_rng(seed)
    s, w, nn, e = region.bounds
    lat = rng.uniform(s + 0.01, nn - 0.01, n)
    lng = rng.uniform(w + 0.01, e - 0.01, n)
    return np.arange(first_id, first_id + n, dtype=np.int64), lat, lng


async def _offline(router, ids, lat, lng):
    """Take a test's drivers offline, so later tests (surge) do not see them as supply."""
    router.submit(location_rows(ids, lat, lng, time.time(), intent=Intent.OFFLINE))
    await router.drain()
    await router.stop()


async def _router(shard_map, shards):
    router = LocationRouter(shard_map, shards, RouterConfig(flush_interval_s=0.005))
    await router.start()
    return router


async def test_batches_reach_the_shard_of_each_position(region, shard_map, shards):
    router = await _router(shard_map, shards)
    ids, lat, lng = _fleet(region, 3000, seed=1, first_id=1_000_000)
    owner = shard_map.shard_of(lat, lng)
    assert router.submit(location_rows(ids, lat, lng, time.time())) == len(ids)
    await router.drain()
    assert router.counters["delivered"] == len(ids)

    async def placed():
        rows = await asyncio.gather(
            *[shards.handle(int(owner[j])).driver.remote(int(ids[j])) for j in range(0, len(ids), 97)]
        )
        return all(r is not None and r["status"] == "available" and not r["pending"] for r in rows)

    await eventually(placed, timeout_s=10)
    # And no other shard holds them.
    for j in range(0, len(ids), 331):
        others = [k for k in range(region.shard_count) if k != owner[j]]
        held = await asyncio.gather(*[shards.handle(k).driver.remote(int(ids[j])) for k in others])
        assert held == [None] * len(others)
    await _offline(router, ids, lat, lng)


async def test_nearby_next_to_a_border_finds_drivers_on_both_sides(region, shard_map, shards):
    router = await _router(shard_map, shards)
    # A point in shard 0 whose eastern neighbour cell belongs to another shard.
    r = shard_map.raster
    iy, ix = np.nonzero((r[:, :-1] == 0) & (r[:, 1:] > 0))
    i = len(iy) // 2
    qlat = shard_map.south + (iy[i] + 0.5) * shard_map.dlat
    qlng = shard_map.west + (ix[i] + 1.0) * shard_map.dlng
    # Drivers in a 600 m ring around it, on both sides.
    n = 40
    ang = np.linspace(0, 2 * np.pi, n, endpoint=False)
    lat = qlat + 0.004 * np.sin(ang)
    lng = qlng + 0.005 * np.cos(ang)
    ids = np.arange(2_000_000, 2_000_000 + n, dtype=np.int64)
    sides = set(shard_map.shard_of(lat, lng).tolist())
    assert len(sides) >= 2
    router.submit(location_rows(ids, lat, lng, time.time()))
    await router.drain()
    q_owner = shard_map.shard_for_point(qlat, qlng)
    d = haversine_m(qlat, qlng, lat, lng)
    expect = [int(x) for x in ids[np.lexsort((ids, d))][:10]]

    async def found():
        # Other tests' drivers share the city: ask for plenty, keep this test's own.
        got = await shards.handle(q_owner).nearby.remote(qlat, qlng, 1000, 1000)
        mine = [g for g in got if 2_000_000 <= g["driver_id"] < 2_000_000 + n][:10]
        return mine if [g["driver_id"] for g in mine] == expect else None

    got = await eventually(found, timeout_s=15)
    assert len({g["shard_id"] for g in got}) >= 2, got
    await _offline(router, ids, lat, lng)


async def test_a_killed_shard_actor_comes_back_and_refills(region, shard_map, shards):
    router = await _router(shard_map, shards)
    ids, lat, lng = _fleet(region, 2000, seed=3, first_id=3_000_000)
    owner = shard_map.shard_of(lat, lng)
    victim = int(owner[0])
    handle = shards.handle(victim)
    before = (await handle.stats.remote())["incarnation"]
    ray.kill(handle, no_restart=False)

    async def back():
        # ray.kill is asynchronous: the old incarnation may still answer for a moment.
        try:
            return (await shards.handle(victim).stats.remote())["incarnation"] != before
        except Exception:
            shards.forget(victim)
            return False

    await eventually(back, timeout_s=60, interval_s=0.5)
    # The restarted shard is empty; the next updates land and the drivers reappear.
    router.submit(location_rows(ids, lat, lng, time.time()))
    await router.drain()
    mine = ids[owner == victim]

    async def refilled():
        st = await shards.handle(victim).driver.remote(int(mine[-1]))
        return st is not None and not st["pending"]

    await eventually(refilled, timeout_s=15)
    stats = await shards.handle(victim).stats.remote()
    assert stats["uptime_s"] < 120 and stats["drivers"] >= len(mine)
    await _offline(router, ids, lat, lng)


async def test_bad_rows_are_counted_by_the_shard_and_good_ones_applied(region, shard_map, shards):
    router = await _router(shard_map, shards)
    ids, lat, lng = _fleet(region, 10, seed=5, first_id=4_000_000)
    rows = location_rows(ids, lat, lng, time.time())
    rows["speed"][3] = -1.0  # invalid speed
    rows["ts"][4] = time.time() + 3600  # from the future
    router.submit(rows)
    await router.drain()
    assert router.shard_dropped["invalid_speed"] >= 1
    assert router.shard_dropped["from_future"] >= 1
    assert router.counters["applied"] >= 8
    await router.stop()
