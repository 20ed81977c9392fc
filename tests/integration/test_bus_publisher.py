"""storage.bus.RedisPublisher against a real Redis: delivery, passwords, restarts, stalls."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import redis.asyncio as aioredis

from storage import bus
from storage.bus import RedisPublisher
from storage.redis_server import start_redis_server
from tests.helpers import eventually


async def _listen(url: str, channel: str):
    r = aioredis.Redis.from_url(url)
    ps = r.pubsub()
    await ps.subscribe(channel)
    await ps.get_message(timeout=1.0)  # the subscribe confirmation
    return r, ps


async def _drain(ps, want: int, timeout_s: float = 5.0) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    while len(got) < want and time.monotonic() < deadline:
        m = await ps.get_message(ignore_subscribe_messages=True, timeout=0.2)
        if m is not None:
            got.append(m["data"])
    return got


@pytest.fixture
def server(tmp_path):
    s = start_redis_server(tmp_path / "bus")
    yield s
    s.stop()


async def test_every_publish_reaches_a_subscriber_in_order(server):
    r, ps = await _listen(server.url, "dispatch:rider:7")
    pub = RedisPublisher(server.url)
    try:
        for i in range(300):
            assert await pub.publish("dispatch:rider:7", b"m%d\r\n$" % i)  # RESP bytes inside
        got = await _drain(ps, 300)
        assert got == [b"m%d\r\n$" % i for i in range(300)]
        assert (pub.sent, pub.dropped, pub.errors) == (300, 0, 0)
    finally:
        pub.close()
        await ps.aclose()
        await r.aclose()


async def test_a_password_or_a_user_is_used_and_a_wrong_one_drops_events_without_raising(server):
    admin = aioredis.Redis.from_url(server.url)
    await admin.acl_setuser(
        "edge", enabled=True, passwords=["+edge-secret"], commands=["+publish"], channels=["*"]
    )
    await admin.config_set("requirepass", "s3cret")
    admin_url = server.url.replace("redis://", "redis://:s3cret@")
    r, ps = await _listen(admin_url, "ch")
    good = RedisPublisher(admin_url)
    user = RedisPublisher(server.url.replace("redis://", "redis://edge:edge-secret@"))
    wrong = RedisPublisher(server.url.replace("redis://", "redis://:nope@"))
    try:
        assert await good.publish("ch", b"a")
        assert await user.publish("ch", b"b")
        assert await wrong.publish("ch", b"c")  # written; Redis refuses it
        assert await _drain(ps, 3, timeout_s=1.5) == [b"a", b"b"]
        await eventually(lambda: wrong.errors >= 2, timeout_s=5)  # AUTH, then PUBLISH
        assert (good.errors, user.errors) == (0, 0)
    finally:
        for p in (good, user, wrong):
            p.close()
        await ps.aclose()
        await r.aclose()
        await admin.aclose()


async def test_publishes_while_redis_is_down_are_dropped_at_once_and_it_reconnects(
    server, tmp_path, monkeypatch
):
    monkeypatch.setattr(bus, "RETRY_AFTER_S", 0.3)
    pub = RedisPublisher(server.url)
    assert await pub.publish("ch", b"before")
    server.stop()
    await eventually(lambda: pub._conn is None, timeout_s=5)
    t0 = time.monotonic()
    assert not await pub.publish("ch", b"down")
    assert not await pub.publish("ch", b"down again")  # within the retry pause: no new attempt
    assert time.monotonic() - t0 < bus.CONNECT_TIMEOUT_S + 0.5
    assert pub.dropped == 2
    again = start_redis_server(tmp_path / "bus", port=server.port)
    r, ps = await _listen(again.url, "ch")
    try:

        async def delivered() -> bool:
            await pub.publish("ch", b"after")
            return bool(await _drain(ps, 1, timeout_s=0.2))

        await eventually(delivered, timeout_s=5)
    finally:
        pub.close()
        await ps.aclose()
        await r.aclose()
        again.stop()


async def test_a_stalled_redis_never_holds_a_publish_and_what_does_not_fit_is_dropped(server, monkeypatch):
    monkeypatch.setattr(bus, "MAX_BUFFERED_BYTES", 1 << 20)
    r, ps = await _listen(server.url, "ch")
    pub = RedisPublisher(server.url)
    assert await pub.publish("ch", b"first")
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        payload = b"x" * 16_384
        t0 = time.monotonic()
        for _ in range(1_000):  # 16 MB: more than the socket and the buffer hold
            await asyncio.wait_for(pub.publish("ch", payload), 0.5)
        assert time.monotonic() - t0 < 5.0
        assert pub.dropped > 0
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    try:
        await eventually(lambda: pub._conn is not None and pub._conn.transport.get_write_buffer_size() == 0)
        assert await pub.publish("ch", b"last")
        got = await _drain(ps, pub.sent, timeout_s=10)
        assert got[0] == b"first" and got[-1] == b"last"
        assert len(got) == pub.sent  # everything written arrived; only the dropped did not
    finally:
        pub.close()
        await ps.aclose()
        await r.aclose()


async def test_a_publish_cancelled_while_connecting_leaves_the_next_ones_working(server):
    """The first publish opens the connection; its caller going away meanwhile (a request
    cancelled) neither abandons the attempt nor leaves later publishes waiting forever."""
    r, ps = await _listen(server.url, "ch")
    pub = RedisPublisher(server.url)
    opened = asyncio.Event()
    real_open = pub._open

    async def slow_open():
        await opened.wait()
        return await real_open()

    pub._open = slow_open  # type: ignore[method-assign]
    first = asyncio.ensure_future(pub.publish("ch", b"cancelled"))
    await asyncio.sleep(0.05)
    second = asyncio.ensure_future(pub.publish("ch", b"waits for the same attempt"))
    await asyncio.sleep(0.05)
    first.cancel()
    opened.set()
    try:
        assert await asyncio.wait_for(second, 5)
        assert await asyncio.wait_for(pub.publish("ch", b"after"), 5)
        assert await _drain(ps, 2) == [b"waits for the same attempt", b"after"]
        assert first.cancelled()
    finally:
        pub.close()
        await ps.aclose()
        await r.aclose()


async def test_closing_gives_up_a_connection_being_opened(server):
    """Closed (the edge stopping) while a publish opens the connection: the attempt is
    given up, no connection is left open, and the publish is dropped, not raised."""
    pub = RedisPublisher(server.url)
    release = asyncio.Event()
    opened: list = []
    real_open = pub._open

    async def slow_open():
        await release.wait()
        conn = await real_open()
        opened.append(conn)
        return conn

    pub._open = slow_open  # type: ignore[method-assign]
    publish = asyncio.ensure_future(pub.publish("ch", b"while closing"))
    await asyncio.sleep(0.05)
    pub.close()
    release.set()
    assert await asyncio.wait_for(publish, 5) is False
    await asyncio.sleep(0.1)
    assert opened == [] and pub._conn is None and pub._connecting is None
    assert (pub.sent, pub.dropped) == (0, 1)
