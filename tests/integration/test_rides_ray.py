"""Real Ray and Redis: a ride request becomes an offer on the driver's channel; accept races."""

from __future__ import annotations

import asyncio
import contextlib
import time

import msgpack
import numpy as np
import pytest
import redis.asyncio as aioredis

from actors.router import LocationRouter, RouterConfig
from dispatch.drivers import location_rows
from dispatch.errors import Conflict, OfferUnavailable
from dispatch.events import RIDE_RECORDS_STREAM, driver_channel, rider_channel
from tests.helpers import eventually, point_inside, restored, ride_request, scaled

pytestmark = pytest.mark.integration


async def _next(pubsub, timeout_s=10.0):
    deadline = time.monotonic() + scaled(timeout_s)
    while time.monotonic() < deadline:
        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
        if msg:
            return msg["channel"].decode(), msgpack.unpackb(msg["data"])
    raise AssertionError("no event")


async def _available_driver(shard_map, shards, driver_id, lat, lng):
    """Put ``driver_id`` online at (lat, lng) through a router; (router, its shard's handle)
    once that shard holds it as available."""
    router = LocationRouter(shard_map, shards, RouterConfig(flush_interval_s=0.005))
    await router.start()
    router.submit(location_rows(driver_id, lat, lng, time.time()))
    await router.drain()
    handle = shards.handle(shard_map.shard_for_point(lat, lng))

    async def ready():
        d = await handle.driver.remote(driver_id)
        return d and not d["pending"] and d["status"] == "available"

    await eventually(ready)
    return router, handle


async def test_request_offer_accept_and_the_accept_race(shard_map, shards, shard_client, bus_redis_url):
    await restored(shard_client, 2)  # a shard an earlier test restarted matches once restored
    lat, lng = point_inside(shard_map, 2, 1 / 3)
    driver_id = 5_000_001
    router, handle = await _available_driver(shard_map, shards, driver_id, lat + 0.0005, lng)
    r = aioredis.Redis.from_url(bus_redis_url)
    ps = r.pubsub()
    await ps.subscribe(driver_channel(driver_id), rider_channel("rider-it-1"))
    ride_id = "it-ride-1"
    request = {
        "ride_id": ride_id,
        "rider_id": "rider-it-1",
        "pickup_lat": lat,
        "pickup_lng": lng,
        "dropoff_lat": lat + 0.01,
        "dropoff_lng": lng + 0.01,
        "vehicle_class": 0,
    }
    await handle.add_ride.remote({**request, "requested_at": time.time()})
    got = {}
    while len(got) < 2:
        channel, msg = await _next(ps)
        got[channel] = msg
    offer = got[driver_channel(driver_id)]
    assert offer["type"] == "offer" and offer["ride_id"] == ride_id
    assert got[rider_channel("rider-it-1")]["status"] == "offered"
    assert (await handle.driver.remote(driver_id))["status"] == "offered"
    # Twenty accepts race for one offer: exactly one wins.
    results = await asyncio.gather(
        *[handle.accept_offer.remote(offer["offer_id"], driver_id) for _ in range(20)], return_exceptions=True
    )
    wins = [x for x in results if isinstance(x, dict)]
    assert len(wins) == 1 and wins[0]["ride_id"] == ride_id
    assert all(isinstance(x, OfferUnavailable) for x in results if not isinstance(x, dict))
    assert (await handle.driver.remote(driver_id))["status"] == "on_trip"
    # The driver moves: the rider sees it.
    router.submit(location_rows(driver_id, lat + 0.0007, lng, time.time()))
    await router.drain()
    while True:
        channel, msg = await _next(ps)
        if msg["type"] == "driver_position":
            assert channel == rider_channel("rider-it-1") and msg["driver_id"] == driver_id
            break
    # The ride's records reached the stream the edges persist from.
    entries = await r.xrange(RIDE_RECORDS_STREAM)
    events = [msgpack.unpackb(fields[b"r"]) for _id, fields in entries]
    assert any(e["ride_id"] == ride_id and e["event"] == "offered" for e in events)
    await handle.trip_ended.remote(driver_id)
    assert (await handle.driver.remote(driver_id))["status"] == "available"
    # The shard that matched counts the gaps between its ticks, by bucket (seconds).
    gaps = (await handle.stats.remote())["rides"]["tick_gaps"]
    assert sum(gaps.values()) > 0 and set(gaps) <= {"0.3", "0.4", "0.5", "0.75", "1", "2", "inf"}
    await ps.aclose()
    await r.aclose()
    await router.stop()


async def test_a_trip_position_that_reaches_nobody_is_reported_unheard(bus_redis_url):
    from actors.events import EventPublisher

    pub = EventPublisher(bus_redis_url)
    r = aioredis.Redis.from_url(bus_redis_url)
    ps = r.pubsub()
    await ps.subscribe(rider_channel("rider-watching"))
    await ps.get_message(timeout=1.0)  # the subscribe confirmation

    def position(rider: str, driver_id: int) -> tuple[str, str, dict]:
        return ("rider", rider, {"type": "driver_position", "driver_id": driver_id, "lat": 1.0, "lng": 2.0})

    assert await pub.flush([position("rider-watching", 11), position("rider-away", 12)], []) == []
    assert pub.take_unheard() == [12] and pub.take_unheard() == []
    channel, msg = await _next(ps)
    assert channel == rider_channel("rider-watching") and msg["driver_id"] == 11
    # Only positions count: another event nobody hears is not a trip to mute.
    await pub.flush([("rider", "rider-away", {"type": "ride_status", "status": "accepted"})], [])
    assert pub.take_unheard() == []
    await ps.aclose()
    await r.aclose()


async def test_concurrent_flushes_send_each_record_exactly_once(bus_redis_url):
    import uuid

    from actors.events import EventPublisher

    r = aioredis.Redis.from_url(bus_redis_url)
    token = uuid.uuid4().hex
    pub = EventPublisher(bus_redis_url)
    records = [
        {"ride_id": f"flush-{token}-{i}", "event": "offered", "data": {}, "shard_id": 0, "at": 0.0}
        for i in range(50)
    ]
    await asyncio.gather(*[pub.flush([], [rec]) for rec in records])
    await pub.flush([], [])
    # Other tests' shards publish to the same stream: count only this test's records.
    sent = [msgpack.unpackb(f[b"r"])["ride_id"] for _i, f in await r.xrange(RIDE_RECORDS_STREAM)]
    mine = [x for x in sent if x.startswith(f"flush-{token}-")]
    assert sorted(mine) == sorted(rec["ride_id"] for rec in records)
    assert pub.stats()["records_waiting"] == 0 and pub.stats()["bus_up"]
    await r.aclose()


async def test_a_backlog_goes_out_over_several_flushes_oldest_first(bus_redis_url, monkeypatch):
    import uuid

    from actors import events
    from actors.events import EventPublisher

    monkeypatch.setattr(events, "RECORDS_PER_FLUSH", 20)
    r = aioredis.Redis.from_url(bus_redis_url)
    token = uuid.uuid4().hex
    pub = EventPublisher(bus_redis_url)
    records = [{"ride_id": f"backlog-{token}-{i}", "event": "offered", "data": {}} for i in range(50)]
    offer = ("driver", 7, {"type": "offer", "offer_id": f"backlog-{token}:0.x-1", "ride_id": "x"})
    assert await pub.flush([offer], records) == []
    waiting = [pub.stats()["records_waiting"]]
    while pub.stats()["records_waiting"]:
        await pub.flush([], [])
        waiting.append(pub.stats()["records_waiting"])
    assert waiting == [30, 10, 0]
    sent = [msgpack.unpackb(f[b"r"])["ride_id"] for _i, f in await r.xrange(RIDE_RECORDS_STREAM)]
    assert [x for x in sent if x.startswith(f"backlog-{token}-")] == [rec["ride_id"] for rec in records]
    assert pub.stats()["published"] == 1 and pub.stats()["records_sent"] == 50
    await r.aclose()


async def test_records_wait_while_redis_is_down_and_go_out_after():
    from actors.events import EventPublisher
    from storage.redis_server import free_port, start_redis_server

    port = free_port()
    pub = EventPublisher(f"redis://127.0.0.1:{port}/0")
    await pub.flush([("rider", "r1", {"type": "x"})], [{"ride_id": "down-1", "event": "offered"}])
    assert pub.stats()["records_waiting"] == 1 and not pub.stats()["bus_up"]
    import tempfile
    from pathlib import Path

    server = start_redis_server(Path(tempfile.mkdtemp()), port=port)
    try:

        async def sent():  # the publisher retries after a pause that grows with failures
            await pub.flush([], [])
            return pub.stats()["records_waiting"] == 0

        await eventually(sent)
        r = aioredis.Redis.from_url(server.url)
        entries = await r.xrange(RIDE_RECORDS_STREAM)
        assert [msgpack.unpackb(f[b"r"])["ride_id"] for _i, f in entries] == ["down-1"]
        assert pub.stats()["records_waiting"] == 0
        await r.aclose()
    finally:
        server.stop()


async def test_batched_handoffs_queue_each_ride_and_report_each_error(shard_map, shards, shard_client):
    """``ShardClient.hand_over`` batches ride handoffs (``ShardActor.inbox``): rides that
    arrive while a call is out go together in the next one; a malformed or conflicting
    request fails alone."""
    from actors.client import ShardClient
    from dispatch.errors import Conflict, InvalidInput

    lat, lng = point_inside(shard_map, 1, 1 / 3)
    shard_id = shard_map.shard_for_point(lat, lng)
    handle = shards.handle(shard_id)
    opened = (await handle.stats.remote())["rides"]["open"]
    now = time.time()

    def request(i: int, **extra) -> dict:
        return {**ride_request(f"it-batch-{i}", lat, lng, now), **extra}

    good = [request(i) for i in range(40)]
    conflicting = request(3, dropoff_lat=lat - 0.02)  # ride 3 again, other details
    malformed = {"ride_id": "it-batch-bad", "no_such_field": 1}
    results = await asyncio.gather(
        *(shard_client.hand_over(shard_id, r) for r in [*good[:20], conflicting, malformed, *good[20:]]),
        return_exceptions=True,
    )
    assert results[:20] == [None] * 20 and results[22:] == [None] * 20
    assert isinstance(results[20], Conflict)
    assert isinstance(results[21], InvalidInput)
    # One call for all of them: they were queued before the first call went out.
    assert shard_client.batch_counts["add_rides"] == (1, 42)
    stats = await handle.stats.remote()
    assert stats["rides"]["open"] == opened + 40
    # The same requests again are retries (no-ops), not errors. A ride that comes while a
    # call is out waits for it and goes in the next one.
    first = asyncio.ensure_future(shard_client.hand_over(shard_id, good[0]))
    await eventually(lambda: shard_client.batch_counts["add_rides"] == (2, 43))  # its call is out
    rest = asyncio.gather(*(shard_client.hand_over(shard_id, r) for r in good[1:5]))
    assert await first is None and await rest == [None] * 4
    assert shard_client.batch_counts["add_rides"] == (3, 47)
    # A shard that cannot be reached fails each of its items as Unavailable.
    from dispatch.errors import Unavailable

    with pytest.raises(Unavailable):
        await ShardClient(
            shards.region_name, shards.shard_count, shards.namespace, timeout_s=0.001
        ).hand_over(shard_id, request(99))
    # The run's shards are shared: these rides must not wait on for a later test's drivers.
    for r in [*good, request(99)]:  # 99's call may have reached the shard before its timeout
        await handle.cancel_ride.remote(r["ride_id"])


async def test_batched_accepts_one_wins_and_each_loser_hears_why(
    shard_map, shards, shard_client, bus_redis_url
):
    """``ShardClient.accept`` batches accepts (``ShardActor.inbox``): racing accepts of one
    offer in one batch still give exactly one winner; a malformed answer in a batch fails
    alone."""
    from actors.directory import shard_call
    from dispatch.errors import InvalidInput

    lat, lng = point_inside(shard_map, 3, 1 / 3)
    shard_id = shard_map.shard_for_point(lat, lng)
    driver_id = 5_000_077
    router, handle = await _available_driver(shard_map, shards, driver_id, lat + 0.0004, lng)
    r = aioredis.Redis.from_url(bus_redis_url)
    ps = r.pubsub()
    await ps.subscribe(driver_channel(driver_id))
    await handle.add_ride.remote(ride_request("it-batch-accept", lat, lng, time.time()))
    _, offer = await _next(ps)
    assert offer["type"] == "offer"
    other = ride_request("it-batch-accept-2", lat, lng, time.time())
    *results, handed = await asyncio.gather(
        *(shard_client.accept(shard_id, offer["offer_id"], driver_id) for _ in range(12)),
        shard_client.hand_over(shard_id, other),
        return_exceptions=True,
    )
    # The accepts and the handoff went in one call.
    assert shard_client.batch_counts["accept_offers"] == (1, 12)
    assert shard_client.batch_counts["add_rides"] == (1, 1) and handed is None
    assert shard_client.batch_counts["inbox"] == (1, 13)
    wins = [x for x in results if isinstance(x, dict)]
    assert len(wins) == 1 and wins[0]["ride_id"] == "it-batch-accept" and wins[0]["driver_id"] == driver_id
    assert all(isinstance(x, OfferUnavailable) for x in results if not isinstance(x, dict))
    # The client only sends well-formed answers; the shard still answers a malformed one
    # in a batch with its own error, beside the others' outcomes.
    bad, late, unknown = await shard_call(
        handle.inbox.remote(
            [("accept", ("just-one-field",)), ("accept", (offer["offer_id"], driver_id)), ("grab", ("x", 1))]
        )
    )
    assert isinstance(bad, InvalidInput) and isinstance(late, OfferUnavailable)
    assert isinstance(unknown, InvalidInput) and "unknown kind" in unknown.message
    assert (await handle.driver.remote(driver_id))["status"] == "on_trip"
    # Declines batch the same way: a taken offer and a malformed answer each fail alone.
    with pytest.raises(OfferUnavailable):
        await shard_client.decline(shard_id, offer["offer_id"], driver_id)
    late, bad = await shard_call(
        handle.inbox.remote([("decline", (offer["offer_id"], driver_id)), ("decline", ("no-driver",))])
    )
    assert isinstance(late, OfferUnavailable) and isinstance(bad, InvalidInput)
    assert (await handle.driver.remote(driver_id))["status"] == "on_trip"
    # A trip's reads of its driver (its odometer) and its end go in the inbox too, applied
    # in order: the read after the end sees the driver free.
    seen, nobody, ended, after = await asyncio.gather(
        shard_client.driver(shard_id, driver_id),
        shard_client.driver(shard_id, 5_999_998),
        shard_client.trip_ended(shard_id, driver_id),
        shard_client.driver(shard_id, driver_id),
    )
    assert seen["status"] == "on_trip" and seen["trip"]["ride_id"] == "it-batch-accept"
    assert nobody is None and ended is None
    assert after["status"] == "available" and "trip" not in after
    assert shard_client.batch_counts["driver_reads"] == (1, 3)
    assert shard_client.batch_counts["trips_ended"] == (1, 1)
    assert shard_client.batch_counts["inbox"][0] == 3  # accepts, the decline, this batch
    await handle.cancel_ride.remote(other["ride_id"])
    await ps.aclose()
    await r.aclose()
    await router.stop()


async def test_find_drivers_asks_each_shard_once_for_many_drivers(shard_map, shards, shard_client):
    """``find_drivers``: one ``drivers`` call per shard answers for every driver asked
    (its shard and row, or None for a driver no shard holds); a hinted ``find_driver``
    that hits answers from that shard alone."""
    a = point_inside(shard_map, 0, 1 / 3)
    b = point_inside(shard_map, 3, 1 / 3)
    routers = [
        (await _available_driver(shard_map, shards, 5_000_101, *a))[0],
        (await _available_driver(shard_map, shards, 5_000_102, *b))[0],
    ]
    try:
        found = await shard_client.find_drivers([5_000_101, 5_000_102, 5_999_999])
        assert found[5_000_101] is not None and found[5_000_101][0] == shard_map.shard_for_point(*a)
        assert found[5_000_102] is not None and found[5_000_102][0] == shard_map.shard_for_point(*b)
        assert found[5_000_101][1]["status"] == "available"
        assert found[5_999_999] is None  # nobody holds it: known, not left out
        k, row = await shard_client.find_driver(5_000_102, hint=shard_map.shard_for_point(*b))
        assert k == shard_map.shard_for_point(*b) and row["driver_id"] == 5_000_102
        # A wrong hint falls back to asking every shard.
        held = await shard_client.find_driver(5_000_102, hint=shard_map.shard_for_point(*a))
        assert held is not None and held[0] == shard_map.shard_for_point(*b)
        assert await shard_client.find_driver(5_999_999, hint=0) is None
    finally:
        for router in routers:
            await router.stop()


async def test_live_ids_name_each_open_ride_in_its_one_shard_and_only_free_drivers_as_available(
    shard_map, shards, shard_client, bus_redis_url
):
    """``ShardClient.live_ids``: a queued or offered request is in its shard's requests, an
    accepted ride in the trips of the shard that holds its driver, and only a free, held
    driver is available (an offered or on-trip one is not); no other shard names any of
    them (a halo copy is not a held driver)."""
    from dispatch.drivers import Intent

    lat, lng = point_inside(shard_map, 0, 0.55)
    k = int(shard_map.shard_for_point(lat, lng))
    if await shard_client.restore_needed(k):  # restarted by an earlier test: nothing to restore
        with contextlib.suppress(Conflict):  # an edge of the run restored it first
            await shard_client.restore(k, {"rides": [], "trips": []})
    on_trip, offered, idle = 5_000_201, 5_000_202, 5_000_203
    ids = np.array([on_trip, offered, idle])
    lats = np.array([lat + 0.0003, lat + 0.0008, lat + 0.004])
    lngs = np.full(3, lng)
    assert (shard_map.shard_of(lats, lngs) == k).all()
    router = LocationRouter(shard_map, shards, RouterConfig(flush_interval_s=0.005))
    await router.start()
    router.submit(location_rows(ids, lats, lngs, time.time()))
    await router.drain()

    async def available() -> bool:
        live = await shard_client.live_ids(k)
        return set(ids.tolist()) <= set(live.available)

    await eventually(available)
    r = aioredis.Redis.from_url(bus_redis_url)
    ps = r.pubsub()
    await ps.subscribe(driver_channel(on_trip), driver_channel(offered))

    def request(ride_id: str, vehicle_class: int = 0) -> dict:
        return ride_request(ride_id, lat, lng, time.time(), vehicle_class)

    await shard_client.hand_over(k, request("it-live-trip"))
    channel, offer = await _next(ps)
    assert channel == driver_channel(on_trip) and offer["ride_id"] == "it-live-trip"
    await shard_client.accept(k, offer["offer_id"], on_trip)
    # A handoff of the accepted ride that comes late (an edge's retry) changes nothing.
    await shard_client.hand_over(k, request("it-live-trip"))
    await shard_client.hand_over(k, request("it-live-offered"))
    channel, offer = await _next(ps)
    assert channel == driver_channel(offered) and offer["ride_id"] == "it-live-offered"
    # No driver of class 1 here: this one waits in the queue.
    await shard_client.hand_over(k, request("it-live-queued", vehicle_class=1))

    live = await shard_client.live_ids(k)
    assert live.shard_id == k
    assert "it-live-trip" in live.trips and "it-live-trip" not in live.requests
    assert {"it-live-offered", "it-live-queued"} <= set(live.requests)
    assert idle in live.available and on_trip not in live.available and offered not in live.available
    assert offered in live.offered and on_trip not in live.offered
    for other in range(shard_client.shard_count):
        if other == k:
            continue
        them = await shard_client.live_ids(other)
        named = set(them.requests) | set(them.trips)
        assert not named & {"it-live-trip", "it-live-offered", "it-live-queued"}
        assert not set(them.available) & set(ids.tolist())

    # The run's shards are shared: leave nothing open.
    await shard_client.trip_ended(k, on_trip)
    for ride_id in ("it-live-offered", "it-live-queued"):
        await shard_client.cancel_ride(k, ride_id)
    live = await shard_client.live_ids(k)
    assert not {"it-live-trip", "it-live-offered", "it-live-queued"} & (set(live.requests) | set(live.trips))
    assert {on_trip, offered} <= set(live.available)
    router.submit(location_rows(ids, lats, lngs, time.time(), intent=Intent.OFFLINE))
    await router.drain()
    await router.stop()
    await ps.aclose()
    await r.aclose()
