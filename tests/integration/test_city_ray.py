"""The city simulation against the real shard actors: rides get offered, accepted, reached."""

from __future__ import annotations

import time

import pytest

from api.simulate import run_city
from dispatch.city import City
from dispatch.drivers import Intent, location_rows
from loadtests.direct import DirectTransport
from tests.helpers import scaled

pytestmark = pytest.mark.integration


async def test_a_small_city_runs_rides_through_the_shards(
    region, shard_map, shard_client, bus_redis_url, monkeypatch
):
    import dispatch.city

    monkeypatch.setattr(dispatch.city, "BOARDING_S", 2.0)
    city = City(
        region,
        shard_map,
        drivers=1500,
        requests_per_min=600,
        report_interval_s=0.5,
        seed=5,
        first_driver_id=7_000_000,
    )
    # Short trips so some complete within the test: drop-off right next to pickup.
    original = city.new_requests

    def short_trips(dt_s, now):
        rides = original(dt_s, now)
        for r in rides:
            r["dropoff_lat"] = r["pickup_lat"] + 0.0008
            r["dropoff_lng"] = r["pickup_lng"]
        return rides

    city.new_requests = short_trips
    transport = DirectTransport(shard_map, shard_client, bus_redis_url)
    await transport.start()
    try:
        summary = await run_city(city, transport, scaled(40.0))
    finally:
        # Leave the shared shards as we found them: rides cancelled, drivers offline.
        for ride_id, shard in list(transport.ride_shard.items()):
            try:
                await shard_client.cancel_ride(shard, ride_id)
            except Exception:
                pass  # accepted or expired already
        f = city.fleet
        await transport.send_locations(location_rows(f.ids, f.lat, f.lng, time.time(), intent=Intent.OFFLINE))
        await transport.router.drain()
        await transport.close()
    assert summary.requests > 100
    assert summary.offered >= 0.9 * summary.requests
    assert summary.accepted > 0.5 * summary.requests
    assert summary.arrived > 0 and summary.completed > 0
    # Each request's first offer reached its driver (latency figures are bench_match's).
    assert summary.match_latency.total >= 0.9 * summary.requests
