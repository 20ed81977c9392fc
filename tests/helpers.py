"""Shared test helpers: timeouts that scale with the machine, polling with a deadline."""

from __future__ import annotations

import asyncio
import os
import time

TIMEOUT_FACTOR = float(os.environ.get("DISPATCH_TEST_TIMEOUT_FACTOR", "1"))


def scaled(seconds: float) -> float:
    return seconds * TIMEOUT_FACTOR


async def eventually(check, timeout_s: float = 10.0, interval_s: float = 0.05):
    """Await ``check()`` (sync or async) until it returns a truthy value; return it."""
    deadline = time.monotonic() + scaled(timeout_s)
    last = None
    while time.monotonic() < deadline:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval_s)
    raise AssertionError(f"condition not met within {scaled(timeout_s):.1f}s (last: {last!r})")


def point_inside(shard_map, shard_id: int, frac: float = 0.5) -> tuple[float, float]:
    """The centre of a raster cell of ``shard_id``, ``frac`` of the way through its cells."""
    import numpy as np

    cells = np.argwhere(shard_map.raster == shard_id)
    iy, ix = cells[int(len(cells) * frac)]
    return shard_map.south + (iy + 0.5) * shard_map.dlat, shard_map.west + (ix + 0.5) * shard_map.dlng


def ride_request(ride_id: str, lat: float, lng: float, requested_at: float, vehicle_class: int = 0) -> dict:
    """A ride request as a shard takes it (``RideRequest`` fields): picked up at
    ``(lat, lng)``, dropped off a kilometre north, its rider named after the ride."""
    return {
        "ride_id": ride_id,
        "rider_id": f"rider-{ride_id}",
        "pickup_lat": lat,
        "pickup_lng": lng,
        "dropoff_lat": lat + 0.01,
        "dropoff_lng": lng,
        "vehicle_class": vehicle_class,
        "requested_at": requested_at,
    }


async def stored_ride(store, region, shard_id: int, lat: float, lng: float):
    """A requested ride of a new rider, stored in Postgres (``RideStore.create_ride``)."""
    import uuid

    ride, _ = await store.create_ride(
        rider_id=f"r-{uuid.uuid4().hex[:8]}",
        region=region.name,
        shard_id=shard_id,
        vehicle_class=0,
        pickup=(lat, lng),
        dropoff=(lat + 0.01, lng + 0.01),
        surge_multiplier=1.0,
        fare_estimate_cents=1200,
        currency="USD",
    )
    return ride


async def restored(shard_client, shard_id: int) -> None:
    """Give a shard an earlier test restarted its (empty) stored state, as the run's edges'
    upkeep would: a restarted shard does not match until restored, and a run of the
    integration tests alone has no edges."""
    import contextlib

    from dispatch.errors import Conflict

    if await shard_client.restore_needed(shard_id):
        with contextlib.suppress(Conflict):  # an edge restored it meanwhile
            await shard_client.restore(shard_id, {"rides": [], "trips": []})
