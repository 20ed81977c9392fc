"""Real Ray: the router's ingest links (plain TCP to each shard, set up through Ray)."""

from __future__ import annotations

import asyncio
import struct
import time

import numpy as np
import pytest
import ray

from actors.ingest_link import HEADER, MAGIC, MAX_FRAME_BYTES
from actors.router import LocationRouter, RouterConfig
from dispatch.drivers import LOCATION_DTYPE, Intent, location_rows
from tests.helpers import eventually, point_inside, restored

pytestmark = pytest.mark.integration


async def _linked_router(shard_map, shards, **cfg) -> LocationRouter:
    router = LocationRouter(shard_map, shards, RouterConfig(flush_interval_s=0.005, **cfg))
    await router.start()
    await eventually(lambda: router.stats()["links_up"] == shard_map.shard_count, timeout_s=20)
    return router


async def _held(shards, shard_id: int, driver_id: int) -> dict | None:
    row = await shards.handle(shard_id).driver.remote(driver_id)
    return row if row is not None and not row["pending"] else None


async def test_batches_go_over_the_links_and_reach_their_shards(shard_map, shards):
    router = await _linked_router(shard_map, shards)
    points = [point_inside(shard_map, k, 1 / 2) for k in range(shard_map.shard_count)]
    ids = np.arange(6_100_000, 6_100_000 + len(points), dtype=np.int64)
    lat = np.array([p[0] for p in points])
    lng = np.array([p[1] for p in points])
    frames_before = router.counters["link_frames"]
    router.submit(location_rows(ids, lat, lng, time.time()))
    await router.drain()
    assert router.counters["link_frames"] > frames_before  # not as Ray calls
    assert router.counters["delivered"] == len(ids) and router.counters["applied"] == len(ids)
    for k, driver_id in enumerate(ids.tolist()):
        await eventually(lambda k=k, d=driver_id: _held(shards, k, d))
    stats = [await h.stats.remote() for h in shards.all()]
    assert sum(st["ingest_link"]["frames"] for st in stats) > 0
    router.submit(location_rows(ids, lat, lng, time.time(), intent=Intent.OFFLINE))
    await router.stop()


async def test_without_links_every_batch_is_a_ray_call(shard_map, shards):
    router = LocationRouter(shard_map, shards, RouterConfig(flush_interval_s=0.005, links=False))
    await router.start()
    lat, lng = point_inside(shard_map, 1, 1 / 2)
    router.submit(location_rows(6_200_001, lat, lng, time.time()))
    await router.drain()
    await asyncio.sleep(0.1)
    assert router.counters["delivered"] == 1 and router.counters["link_frames"] == 0
    assert router.stats()["links_up"] == 0
    await router.stop()


async def test_a_restarted_shard_gets_a_new_link_and_the_stream_goes_on(shard_map, shards, shard_client):
    """The link to a killed shard breaks; the router asks Ray for the new incarnation's
    endpoint and links to it. Rows sent meanwhile go as Ray calls or count as errors,
    never silently to the dead process."""
    router = await _linked_router(shard_map, shards)
    victim = 2
    lat, lng = point_inside(shard_map, victim, 1 / 2)
    before = await shards.handle(victim).ingest_endpoint.remote()
    opened = router.counters["links_opened"]
    ray.kill(shards.handle(victim), no_restart=False)

    async def relinked():
        try:
            now = await shards.handle(victim).ingest_endpoint.remote()
        except Exception:
            shards.forget(victim)
            return False
        return now["token"] != before["token"] and router.counters["links_opened"] > opened

    await eventually(relinked, timeout_s=60, interval_s=0.5)
    await eventually(lambda: router.stats()["links_up"] == shard_map.shard_count, timeout_s=20)
    frames = router.counters["link_frames"]
    router.submit(location_rows(6_300_001, lat, lng, time.time()))
    await router.drain()
    assert router.counters["link_frames"] > frames
    await eventually(lambda: _held(shards, victim, 6_300_001), timeout_s=10)
    router.submit(location_rows(6_300_001, lat, lng, time.time(), intent=Intent.OFFLINE))
    await router.stop()
    # Leave the shard matching for the tests after this one.
    await restored(shard_client, victim)


async def test_a_batch_on_a_link_that_breaks_goes_again_and_is_not_lost(shard_map, shards):
    """The link breaks with a batch sent and unanswered (as when its shard dies): the
    batch goes again as a Ray call and its rows reach the shard; it is not counted lost."""
    router = await _linked_router(shard_map, shards)
    k = 1
    lat, lng = point_inside(shard_map, k, 1 / 2)
    router.submit(location_rows(6_400_001, lat, lng, time.time()))
    frames = router.counters["link_frames"]
    router.flush_due(force=True)
    assert router.counters["link_frames"] == frames + 1  # on the link, not answered yet
    link = router._links[k]
    assert link is not None and link.pending
    link.close(ConnectionError("cut"))
    assert router.counters["resent"] == 1 and router.buffered_rows() == 1
    await router.drain()
    assert router.counters["shard_error"] == 0 and router.counters["delivered"] == 1
    await eventually(lambda: _held(shards, k, 6_400_001), timeout_s=10)
    router.submit(location_rows(6_400_001, lat, lng, time.time(), intent=Intent.OFFLINE))
    await router.stop()


async def test_a_batch_that_fails_twice_is_counted_lost(shard_map, shards):
    router = await _linked_router(shard_map, shards, resend_failed=0)
    k = 1
    lat, lng = point_inside(shard_map, k, 1 / 2)
    router.submit(location_rows(6_400_002, lat, lng, time.time()))
    router.flush_due(force=True)
    link = router._links[k]
    assert link is not None and link.pending
    link.close(ConnectionError("cut"))
    assert router.counters["shard_error"] == 1 and router.counters["resent"] == 0
    assert router.buffered_rows() == 0
    await router.stop()


async def test_bad_connections_are_closed_and_change_nothing(shard_map, shards):
    """A wrong token, a frame too large or not of whole rows: that connection is closed,
    counted as refused; the shard and other links work on."""
    router = await _linked_router(shard_map, shards)
    k = 0
    ep = await shards.handle(k).ingest_endpoint.remote()
    refused = (await shards.handle(k).stats.remote())["ingest_link"]["refused"]

    async def closed_after(payload: bytes) -> bool:
        reader, writer = await asyncio.open_connection(ep["host"], ep["port"])
        writer.write(payload)
        try:
            got = await asyncio.wait_for(reader.read(100), 5)
        finally:
            writer.close()
        return got == b""  # closed without an answer

    assert await closed_after(MAGIC + b"\0" * 16 + HEADER.pack(1, 48) + b"\0" * 48)
    assert await closed_after(MAGIC + bytes(ep["token"]) + HEADER.pack(1, MAX_FRAME_BYTES + 48))
    assert await closed_after(MAGIC + bytes(ep["token"]) + HEADER.pack(1, 47) + b"\0" * 47)
    assert await closed_after(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\0" * 16)
    stats = await shards.handle(k).stats.remote()
    assert stats["ingest_link"]["refused"] == refused + 4
    # A good client on the same port is answered, in order, with the ingest call's counts.
    reader, writer = await asyncio.open_connection(ep["host"], ep["port"])
    lat, lng = point_inside(shard_map, k, 1 / 2)
    rows = location_rows(6_400_001, lat, lng, time.time())
    assert rows.dtype == LOCATION_DTYPE
    writer.write(MAGIC + bytes(ep["token"]) + HEADER.pack(7, rows.nbytes) + rows.tobytes())
    seq, n = struct.unpack("<II", await asyncio.wait_for(reader.readexactly(8), 5))
    import msgpack

    reply = msgpack.unpackb(await reader.readexactly(n))
    writer.close()
    assert seq == 7 and reply["received"] == 1 and reply["applied"] == 1
    # The router's own link was not disturbed.
    assert router.stats()["links_up"] == shard_map.shard_count
    await router.stop()
