"""Real Ray, Postgres and Redis: what a shard knows after its process dies.

A restarted shard must learn its drivers' trips, its rides' declined drivers and open
offers from Postgres before it offers anything; its offer ids must not repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from types import SimpleNamespace

import msgpack
import pytest
import redis.asyncio as aioredis

from api.upkeep import Upkeep
from dispatch.drivers import location_rows
from dispatch.events import driver_channel
from storage.rides import RideStore
from tests.helpers import eventually, point_inside, restored, ride_request, scaled, stored_ride

pytestmark = pytest.mark.integration


async def _show(handle, driver_id, lat, lng):
    """One position update of ``driver_id`` straight to its shard."""
    await handle.ingest.remote(location_rows(driver_id, lat, lng, time.time()).tobytes())


async def _status(handle, driver_id):
    d = await handle.driver.remote(driver_id)
    return None if d is None or d["pending"] else d["status"]


@contextlib.asynccontextmanager
async def _own_shards(region, bus_redis_url, prefix: str):
    """A fresh set of the region's shards in a namespace of their own (every shard's
    first incarnation, waiting for its stored state): ``(client, namespace)``; removed
    after."""
    from actors import directory
    from actors.client import ShardClient
    from actors.settings import ShardSettings
    from dispatch.region import region_file_text

    namespace = f"{prefix}-{uuid.uuid4().hex[:8]}"
    settings = ShardSettings.build(
        region_toml=region_file_text(), namespace=namespace, redis_url=bus_redis_url
    )
    directory.deploy_shards(settings)
    try:
        yield ShardClient(region.name, region.shard_count, namespace), namespace
    finally:
        directory.teardown_shards(region.name, region.shard_count, namespace)


def _offered_ride(ride_id: str, lat: float, lng: float, driver: int, now: float, expires_in_s: float) -> dict:
    """A stored open ride with an open offer to ``driver``, as a restore hands it over."""
    return {
        **ride_request(ride_id, lat, lng, now - 5),
        "offer": {
            "offer_id": f"{ride_id}:old-1",
            "driver_id": driver,
            "offered_at": now - 2,
            "expires_at": now + expires_in_s,
        },
    }


async def _offered_when_it_appears(client, handle, shard: int, driver: int, lat: float, lng: float) -> None:
    """Shard ``shard`` (``handle``) was told of one neighbour's offer to ``driver``; the
    driver then appears there and is held as offered, not available."""

    async def told():
        return (await handle.stats.remote())["rides"]["peer_offers_marked"] == 1

    await eventually(told, timeout_s=10)
    await _show(handle, driver, lat, lng)
    await eventually(lambda: _status(handle, driver), timeout_s=10)
    assert await _status(handle, driver) == "offered"
    assert driver not in (await client.live_ids(shard)).available


async def _offers_to(pubsub, timeout_s=10.0):
    """Every offer message on the subscribed driver channels within ``timeout_s``:
    {driver_id: [offer messages]}."""
    got: dict[int, list[str]] = {}
    deadline = time.monotonic() + scaled(timeout_s)
    while time.monotonic() < deadline:
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
        if msg:
            m = msgpack.unpackb(msg["data"])
            if m.get("type") == "offer":
                got.setdefault(int(msg["channel"].decode().rsplit(":", 1)[1]), []).append(m)
    return got


async def test_a_driver_on_a_trip_is_not_offered_a_ride_after_its_shard_restarts(
    shard_map, shards, region, bus_redis_url, pg_pool
):
    import ray

    store = RideStore(pg_pool)
    k = 1
    lat, lng = point_inside(shard_map, k, 0.4)
    handle = shards.handle(k)
    base = 7_100_000 + int(uuid.uuid4().int % 10_000) * 10
    on_trip, decliner, far = base + 1, base + 2, base + 3
    r = aioredis.Redis.from_url(bus_redis_url)
    ps = r.pubsub()
    await ps.subscribe(*(driver_channel(d) for d in (on_trip, decliner, far)))

    # Before the crash: the driver accepts R1 (the shard and Postgres both know).
    await _show(handle, on_trip, lat + 0.0005, lng)
    await eventually(lambda: _status(handle, on_trip), timeout_s=10)
    r1 = await stored_ride(store, region, k, lat, lng)
    await handle.add_ride.remote(r1.to_request())
    offers = await _offers_to(ps, timeout_s=3)
    assert [m["ride_id"] for m in offers[on_trip]] == [r1.ride_id]
    offer = offers[on_trip][0]
    await handle.accept_offer.remote(offer["offer_id"], on_trip)
    await store.transition(
        r1.ride_id, "accept", "driver", str(on_trip), driver_id=on_trip, offer_pending=True
    )
    # R2 is open; the decliner said no to it before the crash (as the shard's records say).
    r2 = await stored_ride(store, region, k, lat, lng)
    now = time.time()
    old_offer_id = f"{r2.ride_id}:1"
    base_rec = {"ride_id": r2.ride_id, "shard_id": k, "at": now}
    await store.apply_records(
        [
            (
                f"t:{r2.ride_id}:1",
                {
                    **base_rec,
                    "event": "offered",
                    "data": {"driver_id": decliner, "offer_id": old_offer_id, "expires_at": now + 15},
                },
            ),
            (
                f"t:{r2.ride_id}:2",
                {
                    **base_rec,
                    "event": "offer_declined",
                    "data": {"driver_id": decliner, "offer_id": old_offer_id},
                },
            ),
        ]
    )

    # The shard's process dies; Ray starts it again, empty.
    before = (await handle.stats.remote())["uptime_s"]
    ray.kill(handle, no_restart=False)
    shards.forget(k)

    async def back():
        try:
            h = shards.handle(k)
            s = await asyncio.wait_for(h.stats.remote(), 5)
        except Exception:
            shards.forget(k)
            return None
        return h if s["uptime_s"] < before else None

    handle = await eventually(back, timeout_s=60, interval_s=0.5)
    # Drivers reappear with their next position, before the edge restores the shard; and
    # a new ride R3 arrives next to the driver on the trip. Nothing is offered yet.
    await _show(handle, on_trip, lat + 0.0005, lng)
    await _show(handle, decliner, lat + 0.0006, lng)
    await _show(handle, far, lat + 0.006, lng)
    r3 = await stored_ride(store, region, k, lat, lng)
    await handle.add_ride.remote(r3.to_request())
    # The run's edges restore restarted shards too (their upkeep loop): whichever restores
    # first, the shard offers nothing before it has its stored trips.
    if await handle.restore_needed.remote():
        from actors.client import ShardClient

        client = ShardClient(region.name, region.shard_count, shards.namespace)
        edge = SimpleNamespace(region=region, shards=client, rides=SimpleNamespace(rides=store))
        await Upkeep(edge).restore_shards()

    async def restored():
        return not await handle.restore_needed.remote()

    await eventually(restored, timeout_s=20, interval_s=0.2)

    async def both_offered():
        return await _status(handle, decliner) == "offered" and await _status(handle, far) == "offered"

    await eventually(both_offered, timeout_s=20, interval_s=0.2)
    assert await _status(handle, on_trip) == "on_trip"
    offers = await _offers_to(ps, timeout_s=2)
    assert on_trip not in offers
    assert [m["ride_id"] for m in offers[decliner]] == [r3.ride_id]
    assert [m["ride_id"] for m in offers[far]] == [r2.ride_id]
    # Offer ids of the new incarnation never repeat the old ones.
    assert offers[far][0]["offer_id"] != old_offer_id
    assert offers[far][0]["offer_id"].rpartition(":")[0] == r2.ride_id
    for driver_id in (decliner, far):
        await handle.decline_offer.remote(offers[driver_id][0]["offer_id"], driver_id)
    for rid in (r2.ride_id, r3.ride_id):
        await handle.cancel_ride.remote(rid)
    await handle.trip_ended.remote(on_trip)
    await ps.aclose()
    await r.aclose()


async def test_an_offer_lost_to_a_paused_redis_is_made_again_to_the_same_driver(
    shard_map, shards, region, bus_redis_url, tmp_path
):
    """Redis paused (SIGSTOP) while a ride is offered: the publication times out, the offer
    is withdrawn without counting as a decline, and once Redis answers the same driver gets
    the ride again (instead of waiting out a 15 s timeout and being excluded)."""
    import os
    import signal

    from actors import directory
    from actors.settings import ShardSettings
    from dispatch.region import region_file_text
    from storage.redis_server import start_redis_server

    server = start_redis_server(tmp_path / "bus")
    # Shards of their own on this Redis (the run's shards keep the run's bus).
    namespace = f"stall-{uuid.uuid4().hex[:8]}"
    settings = ShardSettings.build(region_toml=region_file_text(), namespace=namespace, redis_url=server.url)
    directory.deploy_shards(settings)
    k = 2
    lat, lng = point_inside(shard_map, k, 0.6)
    handle = directory.lookup_shard(region.name, k, namespace)
    driver = 7_200_000 + int(uuid.uuid4().int % 10_000)
    r = aioredis.Redis.from_url(server.url)
    ps = r.pubsub()
    await ps.subscribe(driver_channel(driver))
    try:
        await _show(handle, driver, lat + 0.0005, lng)
        await eventually(lambda: _status(handle, driver), timeout_s=10)
        before = (await handle.stats.remote())["events"]["offers_undelivered"]
        ride_id = f"stall-{uuid.uuid4().hex[:8]}"
        request = {
            "ride_id": ride_id,
            "rider_id": "rider-stall",
            "pickup_lat": lat,
            "pickup_lng": lng,
            "dropoff_lat": lat + 0.01,
            "dropoff_lng": lng,
            "vehicle_class": 0,
        }
        os.kill(server.process.pid, signal.SIGSTOP)
        try:
            await handle.add_ride.remote({**request, "requested_at": time.time()})

            async def undelivered():
                s = await handle.stats.remote()
                return s["events"]["offers_undelivered"] > before and not s["events"]["bus"]["ok"]

            await eventually(undelivered, timeout_s=15, interval_s=0.2)
            # Offers pause while the bus is down: the driver is free, not excluded.
            assert await _status(handle, driver) == "available"
        finally:
            os.kill(server.process.pid, signal.SIGCONT)

        async def offered_again():
            s = await handle.stats.remote()
            return (
                s["events"]["bus"]["ok"]
                and s["rides"]["offers_made"] >= 2
                and (await _status(handle, driver) == "offered")
            )

        await eventually(offered_again, timeout_s=20, interval_s=0.2)
        offers = await _offers_to(ps, timeout_s=2)
        ids = [m["offer_id"] for m in offers.get(driver, []) if m["ride_id"] == ride_id]
        assert ids and len(set(ids)) == len(ids)  # the new offer reached the driver
        await handle.decline_offer.remote(ids[-1], driver)
        await handle.cancel_ride.remote(ride_id)
    finally:
        directory.teardown_shards(region.name, region.shard_count, namespace)
        await ps.aclose()
        await r.aclose()
        server.stop()


async def test_a_second_restore_of_one_incarnation_is_refused_and_brings_back_nothing(
    shard_map, region, bus_redis_url
):
    """Every edge's upkeep restores restarted shards: two edges may read the same state and
    both hand it to the same incarnation. The second must be refused: its state is older
    than what the shard did since (here: an accept of a restored offer), and taking it
    would put the accepted ride back in the queue, offered again, and free its driver
    (on a trip) when that stale offer expired."""
    from actors import directory
    from dispatch.errors import Conflict

    async with _own_shards(region, bus_redis_url, "twice") as (client, namespace):
        k = 1
        lat, lng = point_inside(shard_map, k, 0.3)
        driver = 7_300_000 + int(uuid.uuid4().int % 10_000)
        handle = directory.lookup_shard(region.name, k, namespace)
        await _show(handle, driver, lat + 0.0005, lng)
        await eventually(lambda: _status(handle, driver), timeout_s=10)
        # Both edges register the new incarnation and read the same state from Postgres:
        # a ride offered (before the restart) to the driver.
        target = await client.restore_target(k)
        assert target is not None
        ride = _offered_ride(f"twice-{uuid.uuid4().hex[:8]}", lat, lng, driver, time.time(), 30)
        ride_id, offer_id = ride["ride_id"], ride["offer"]["offer_id"]
        state = {"rides": [ride], "trips": []}
        assert await client.restore(k, state, target) == 1
        await client.accept(k, offer_id, driver)
        assert await _status(handle, driver) == "on_trip"
        # The other edge's restore comes late, with what it read before the accept.
        with pytest.raises(Conflict):
            await client.restore(k, state, target)
        live = await client.live_ids(k)
        assert ride_id in live.trips and ride_id not in live.requests
        assert driver not in live.offered and driver not in live.available
        assert await _status(handle, driver) == "on_trip"


async def test_relink_puts_back_on_its_trip_a_driver_a_shard_holds_as_free(
    shard_map, shards, shard_client, region
):
    """A driver whose trip's link was lost (it changed shards while the one that held it
    restarted) looks free to its shard; the edges' relink round gives the shards the
    active trips from Postgres and the shard puts it back on its trip."""

    k = 0
    lat, lng = point_inside(shard_map, k, 0.45)
    await restored(shard_client, k)  # restarted by an earlier test: nothing to restore
    handle = shards.handle(k)
    driver = 7_400_000 + int(uuid.uuid4().int % 10_000)
    await _show(handle, driver, lat + 0.0005, lng)
    await eventually(lambda: _status(handle, driver), timeout_s=10)
    assert await _status(handle, driver) == "available"
    ride_id = f"relink-{uuid.uuid4().hex[:8]}"
    trips = [{"driver_id": driver, "ride_id": ride_id, "rider_id": "rider-relink", "ride_shard": 2}]
    assert await shard_client.relink(k, trips, time.time()) == 1
    assert await _status(handle, driver) == "on_trip"
    assert ride_id in (await shard_client.live_ids(k)).trips
    assert (await handle.driver.remote(driver))["trip"]["ride_id"] == ride_id
    assert await shard_client.relink(k, trips, time.time()) == 0
    await handle.trip_ended.remote(driver)
    assert await _status(handle, driver) == "available"


async def test_a_restored_offer_to_a_driver_another_shard_holds_is_secured_or_withdrawn(
    shard_map, region, bus_redis_url
):
    """After a restart, a stored open offer may name a driver that another shard now
    holds (it moved, or was claimed there meanwhile). That shard must not offer it again:
    an available driver is reserved there for the restored offer; a busy one makes the
    restored offer be withdrawn (and the ride offered afresh)."""
    from actors import directory
    from dispatch.errors import OfferUnavailable

    async with _own_shards(region, bus_redis_url, "held") as (client, namespace):
        k, other = 1, 2
        for shard in range(region.shard_count):  # every shard takes its (empty) state
            if shard != k:
                target = await client.restore_target(shard)
                if target is not None:
                    await client.restore(shard, {"rides": [], "trips": []}, target)
        olat, olng = point_inside(shard_map, other, 0.5)
        free, busy = (
            7_400_001 + int(uuid.uuid4().int % 1000) * 10,
            7_400_002 + int(uuid.uuid4().int % 1000) * 10,
        )
        holder = directory.lookup_shard(region.name, other, namespace)
        await _show(holder, free, olat, olng)
        await _show(holder, busy, olat + 0.001, olng)
        await eventually(lambda: _status(holder, free), timeout_s=10)
        await eventually(lambda: _status(holder, busy), timeout_s=10)
        assert await holder.reserve_driver.remote(busy)  # busy: offered by its own shard
        lat, lng = point_inside(shard_map, k, 0.3)
        now = time.time()
        a, b = f"held-a-{uuid.uuid4().hex[:6]}", f"held-b-{uuid.uuid4().hex[:6]}"
        rides = [_offered_ride(a, lat, lng, free, now, 60), _offered_ride(b, lat, lng, busy, now, 60)]
        target = await client.restore_target(k)
        assert target is not None
        assert await client.restore(k, {"rides": rides, "trips": []}, target) == 2

        async def settled():
            stats = await client.directory.handle(k).stats.remote()
            return stats["rides"]["restored_offers_withdrawn"] == 1

        await eventually(settled, timeout_s=10)
        # The free driver is reserved at its holder for the restored offer: not offerable there.
        assert await _status(holder, free) == "offered"
        assert free not in (await client.live_ids(other)).available
        # The busy driver's restored offer was withdrawn: ride b waits for a new offer,
        # ride a keeps its offer (an accept of it still works).
        live = await client.live_ids(k)
        assert a in live.requests and b in live.requests
        taken = await client.accept(k, f"{a}:old-1", free)
        assert taken["ride_id"] == a
        with pytest.raises(OfferUnavailable):
            await client.accept(k, f"{b}:old-1", busy)


async def test_a_restored_offer_to_a_driver_no_shard_holds_is_held_where_it_appears(
    shard_map, region, bus_redis_url
):
    """Two shards restarted together (a host died): the one that restores an open offer
    asks its neighbours who holds the driver, and nobody does yet (its own shard has not
    heard it since). Where the driver's positions then land, it is offered, not
    available: never free in one shard while another's offer holds it."""
    from actors import directory

    async with _own_shards(region, bus_redis_url, "nowhere") as (client, namespace):
        k, other = 1, 2
        for shard in range(region.shard_count):
            if shard != k:
                target = await client.restore_target(shard)
                if target is not None:
                    await client.restore(shard, {"rides": [], "trips": []}, target)
        driver = 7_600_001 + int(uuid.uuid4().int % 1000) * 10
        lat, lng = point_inside(shard_map, k, 0.3)
        ride = _offered_ride(f"nowhere-{uuid.uuid4().hex[:6]}", lat, lng, driver, time.time(), 60)
        target = await client.restore_target(k)
        assert target is not None
        assert await client.restore(k, {"rides": [ride], "trips": []}, target) == 1
        holder = directory.lookup_shard(region.name, other, namespace)
        await _offered_when_it_appears(client, holder, other, driver, *point_inside(shard_map, other, 0.5))
        # The restored offer is still the driver's to accept.
        taken = await client.accept(k, f"{ride['ride_id']}:old-1", driver)
        assert taken["ride_id"] == ride["ride_id"]


async def test_a_restarted_shard_learns_which_of_its_drivers_a_neighbours_offer_holds(
    shard_map, region, bus_redis_url
):
    """A neighbour's offer to a driver of shard k was reserved at k's previous
    incarnation; the reservation died with it. After its restore, k asks its neighbours
    and holds that driver as offered, not available, when it reports."""
    from actors import directory

    async with _own_shards(region, bus_redis_url, "peer") as (client, namespace):
        k, other = 1, 2
        driver = 7_500_001 + int(uuid.uuid4().int % 1000) * 10
        olat, olng = point_inside(shard_map, other, 0.5)
        offered = _offered_ride(f"peer-{uuid.uuid4().hex[:6]}", olat, olng, driver, time.time(), 60)
        # Every other shard takes its state; the neighbour's holds an open offer to a
        # driver of shard k (as restored after its own restart).
        for shard in range(region.shard_count):
            if shard != k:
                target = await client.restore_target(shard)
                assert target is not None
                rides = [offered] if shard == other else []
                await client.restore(shard, {"rides": rides, "trips": []}, target)
        holder = directory.lookup_shard(region.name, other, namespace)
        assert await holder.offered_drivers.remote() == [driver]
        handle = directory.lookup_shard(region.name, k, namespace)
        target = await client.restore_target(k)
        assert target is not None
        await client.restore(k, {"rides": [], "trips": []}, target)
        await _offered_when_it_appears(client, handle, k, driver, *point_inside(shard_map, k, 0.4))


async def test_the_unlink_round_frees_a_driver_whose_trip_ended_without_its_shard_hearing(
    shard_map, shards, shard_client, region, pg_pool
):
    """The edge that ends a ride tells the shards; when that word is lost (Postgres died
    between storing the end and answering it), the driver's shard still holds it on the
    trip, and it is never offered again. The edges' unlink round asks the shards which
    trips they hold and frees the drivers of rides Postgres has ended."""
    from dispatch.trips import ActorRole, TripEvent

    store = RideStore(pg_pool)
    k = 2
    lat, lng = point_inside(shard_map, k, 0.55)
    handle = shards.handle(k)
    driver = 7_500_000 + int(uuid.uuid4().int % 10_000)
    await _show(handle, driver, lat + 0.0005, lng)
    await eventually(lambda: _status(handle, driver), timeout_s=10)
    ride = await stored_ride(store, region, k, lat, lng)
    trip = {"driver_id": driver, "ride_id": ride.ride_id, "rider_id": ride.rider_id, "ride_shard": k}
    # The shard holds the driver on the ride's trip (as after an accept).
    assert await shard_client.relink(k, [trip], time.time() + 5) == 1
    assert await _status(handle, driver) == "on_trip"
    assert ride.ride_id in await shard_client.trip_rides(k)
    edge = SimpleNamespace(region=region, shards=shard_client, rides=SimpleNamespace(rides=store))
    upkeep = Upkeep(edge)
    # Still open in Postgres: left alone.
    await upkeep.unlink_ended_trips()
    assert await _status(handle, driver) == "on_trip"
    # The ride ends in Postgres and no word reaches the shard.
    await store.transition(ride.ride_id, TripEvent.CANCEL, ActorRole.RIDER, ride.rider_id)
    assert await upkeep.unlink_ended_trips() >= 1 and upkeep.unlinked >= 1
    assert await _status(handle, driver) == "available"
    assert ride.ride_id not in await shard_client.trip_rides(k)
    assert (await handle.stats.remote())["rides"]["unlinked"] >= 1
