"""The event relay: Redis pub/sub → the sockets this edge process holds.

Shards publish client-bound events (msgpack maps) on one channel per rider and per
driver (:mod:`dispatch.events`). Each edge subscribes, on one Redis connection, to the
channels of the clients connected to it, and hands every message to ``deliver``. So a
rider on edge A and a driver on edge B still reach each other: the shards never need to
know which edge holds whom.

Redis down: the relay keeps retrying with backoff and re-subscribes everything when
it is back; events published meanwhile are lost (pub/sub keeps nothing), which the
protocol allows: clients re-read their state over REST on reconnect (docs/protocol.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub

from dispatch.events import PREFIX, parse_channel

log = logging.getLogger("dispatch.relay")


class EventRelay:
    """Subscribes to the channels of local clients; ``deliver(audience, id, raw)`` gets
    every message (raw msgpack bytes), called on the event loop, never awaited."""

    def __init__(self, redis_url: str, edge_id: str, deliver: Callable[[str, str, bytes], None]) -> None:
        self.redis_url = redis_url
        self.control = f"{PREFIX}edge:{edge_id}"  # always subscribed: keeps the reader alive
        self.deliver = deliver
        self.channels: Counter[str] = Counter()  # channel -> local subscribers
        self.connected = False
        self.received = 0
        self.errors = 0
        self._r: aioredis.Redis | None = None
        self._pubsub: PubSub | None = None
        self._task: asyncio.Task | None = None
        self._pending: set[str] = set()  # to subscribe on the next reader round
        self._dropped: set[str] = set()  # to unsubscribe
        self._subscribing: set[str] = set()  # sent to Redis, not confirmed yet
        self._round = asyncio.Event()  # set (and replaced) after each subscription round
        self._wake = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="event-relay")

    def add(self, channel: str) -> None:
        self.channels[channel] += 1
        if self.channels[channel] == 1:
            self._dropped.discard(channel)
            self._pending.add(channel)
            self._wake.set()

    def remove(self, channel: str) -> None:
        if self.channels.get(channel, 0) <= 0:
            return
        self.channels[channel] -= 1
        if self.channels[channel] == 0:
            del self.channels[channel]
            self._pending.discard(channel)
            self._dropped.add(channel)
            self._wake.set()

    def is_subscribed(self, channel: str) -> bool:
        return (
            self.connected
            and channel in self.channels
            and channel not in self._pending
            and channel not in self._subscribing
        )

    async def wait_subscribed(self, channel: str, timeout_s: float = 5.0) -> bool:
        """True once ``channel`` is subscribed on Redis, False after ``timeout_s`` (the
        welcome frame says which: a client then knows whether an event could have been
        missed between its socket opening and this). Woken by each subscription round,
        not by polling: thousands of sockets open at once after an edge dies."""
        deadline = time.monotonic() + timeout_s
        while not self.is_subscribed(channel):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                await asyncio.wait_for(self._round.wait(), left)
            except TimeoutError:
                return False
        return True

    def _round_done(self) -> None:
        done, self._round = self._round, asyncio.Event()
        done.set()

    async def _connect(self) -> None:
        self._r = aioredis.Redis.from_url(
            self.redis_url, socket_connect_timeout=2.0, health_check_interval=15
        )
        self._pubsub = pubsub = self._r.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(self.control)
        self._pending = set(self.channels)
        self._dropped.clear()
        self.connected = True

    async def _sync_subscriptions(self) -> None:
        assert self._pubsub is not None, "called when connected"
        if self._pending:
            batch, self._pending = list(self._pending), set()
            self._subscribing.update(batch)
            try:
                await self._pubsub.subscribe(*batch)  # a failure reconnects: all re-subscribed
            finally:
                self._subscribing.difference_update(batch)
            self._round_done()
        if self._dropped:
            batch = list(self._dropped)
            self._dropped = set()
            await self._pubsub.unsubscribe(*batch)

    async def _run(self) -> None:
        backoff = 0.2
        while True:
            try:
                if not self.connected:
                    await self._connect()
                    if backoff > 0.2:
                        log.warning("event relay reconnected; %d channels re-subscribed", len(self.channels))
                    backoff = 0.2
                await self._sync_subscriptions()
                pubsub = self._pubsub
                assert pubsub is not None, "set by _connect"
                msg = await pubsub.get_message(timeout=0.05)
                while msg is not None:
                    if msg.get("type") == "message":
                        self._on_message(msg)
                    msg = await pubsub.get_message(timeout=0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.errors += 1
                if self.connected:
                    log.warning("event relay lost Redis (%r); retrying", exc)
                self.connected = False
                await self._close_conn()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def _on_message(self, msg: dict) -> None:
        channel = msg["channel"]
        channel = channel.decode() if isinstance(channel, bytes) else channel
        if channel == self.control:
            return
        try:
            audience, ident = parse_channel(channel)
        except ValueError:
            return
        self.received += 1
        try:
            self.deliver(audience, ident, msg["data"])
        except Exception:
            log.exception("delivering an event on %s failed", channel)

    async def _close_conn(self) -> None:
        try:
            if self._pubsub is not None:
                await self._pubsub.aclose()
            if self._r is not None:
                await self._r.aclose()
        except Exception:
            pass
        self._pubsub = self._r = None

    async def ping(self, timeout_s: float = 0.5) -> bool:
        """Whether Redis answers a PING within ``timeout_s`` (a paused server keeps the
        subscription's socket open, so ``connected`` alone stays True). Never raises."""
        r = self._r
        if r is None or not self.connected:
            return False
        try:
            return bool(await asyncio.wait_for(r.ping(), timeout_s))
        except Exception:
            return False

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
        await self._close_conn()
        self.connected = False
