"""What a shard actor sends out: client events (pub/sub) and ride records (a stream).

Redis down must not stop a shard: publishing failures are counted and logged once per
outage; client events are dropped (clients re-read their state from REST on reconnect),
ride records wait in a bounded outbox and go out when Redis is back, so nothing a rider
was told goes unrecorded while the shard lives. Surge readings (a hash per region, see
:meth:`EventPublisher.publish_surge`) are soft state: a failed write is simply replaced
by the next one.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import msgpack
import redis.asyncio as aioredis

from dispatch.events import RIDE_RECORDS_STREAM, client_channel, surge_key

log = logging.getLogger("dispatch.events")

MAX_OUTBOX = 100_000
STREAM_MAXLEN = 1_000_000
DROP_LOG_EVERY_S = 10.0


class EventPublisher:
    def __init__(self, redis_url: str | None, max_outbox: int = MAX_OUTBOX) -> None:
        self.redis_url = redis_url
        self._r = aioredis.Redis.from_url(redis_url) if redis_url else None
        self.outbox: deque[dict[str, Any]] = deque(maxlen=max_outbox)
        # Records pushed out of the full outbox (oldest first): lost, so counted and logged.
        self.dropped = 0
        self._drop_logged_at = -math.inf
        self.published = 0
        self.failed = 0
        self.records_sent = 0
        self._down = False
        self.surge_writes = 0
        self.surge_failed = 0
        self._surge_down = False

    async def flush(self, notices: list[tuple[str, str | int, dict]], records: list[dict]) -> None:
        """Publish client events and append records; never raises."""
        self._keep(records)
        if self._r is None or (not notices and not self.outbox):
            if notices and self._r is None:
                self._drop(len(notices), "client events (no Redis URL)")
            return
        now = time.time()
        # Take the records out before awaiting: flushes from concurrent calls of the actor
        # interleave at the await, and each record must go out exactly once.
        batch = list(self.outbox)
        self.outbox.clear()
        try:
            pipe = self._r.pipeline(transaction=False)
            for audience, ident, message in notices:
                channel = client_channel(audience, ident)
                # "v": the socket protocol version (docs/protocol.md); edges forward as is.
                pipe.publish(channel, msgpack.packb({"v": 1, **message, "sent_at": now}))
            for rec in batch:
                pipe.xadd(
                    RIDE_RECORDS_STREAM, {"r": msgpack.packb(rec)}, maxlen=STREAM_MAXLEN, approximate=True
                )
            await pipe.execute()
            self.published += len(notices)
            self.records_sent += len(batch)
            if self._down:
                log.warning("event bus is back; %d records sent", len(batch))
                self._down = False
        except Exception as exc:
            # Back to the front of the outbox, oldest first, for the next flush; what no
            # longer fits is dropped (the newest: the outbox is full of older records).
            room = self.outbox.maxlen - len(self.outbox) if self.outbox.maxlen else len(batch)
            if room < len(batch):
                self._drop(len(batch) - room, "ride records (outbox full)")
                batch = batch[:room]
            self.outbox.extendleft(reversed(batch))
            self.failed += len(notices)
            if not self._down:
                log.warning("event bus unavailable, keeping %d records: %r", len(self.outbox), exc)
                self._down = True

    def _keep(self, records: list[dict]) -> None:
        """Append ``records`` to the outbox; the oldest that fall out are counted and logged."""
        maxlen = self.outbox.maxlen
        over = len(self.outbox) + len(records) - maxlen if maxlen is not None else 0
        if over > 0:
            self._drop(over, "ride records (outbox full)")
        self.outbox.extend(records)

    def _drop(self, n: int, what: str) -> None:
        self.dropped += n
        now = time.monotonic()
        if now - self._drop_logged_at >= DROP_LOG_EVERY_S:  # every drop counted, logged at most this often
            self._drop_logged_at = now
            log.error("event outbox: dropped %d %s; %d dropped since start", n, what, self.dropped)

    async def publish_surge(
        self,
        region: str,
        zones: Mapping[str, Mapping[str, Any]],
        ttl_s: float,
        timeout_s: float = 2.0,
    ) -> bool:
        """Write surge readings into the region's hash (:func:`dispatch.events.surge_key`).

        One field per zone (its H3 cell), the value the msgpack of its reading (``{multiplier,
        demand, supply, updated_at, ...}``), and the whole hash set to expire ``ttl_s`` after
        this write: every shard refreshes it, so it outlives a stopped deployment by no more
        than ``ttl_s``. A single dead shard's fields stay, and readers judge them by their
        ``updated_at`` (``actors/surge.py``). Returns whether the write went through; never
        raises (Redis down or slower than ``timeout_s`` is counted and logged once per outage).
        """
        if self._r is None or not zones:
            return False
        key = surge_key(region)
        try:
            pipe = self._r.pipeline(transaction=False)
            pipe.hset(key, mapping={z: msgpack.packb(dict(v)) for z, v in zones.items()})
            pipe.expire(key, max(1, math.ceil(ttl_s)))
            await asyncio.wait_for(pipe.execute(), timeout_s)
        except Exception as exc:
            self.surge_failed += 1
            if not self._surge_down:
                log.warning("surge hash %s not writable (Redis unavailable?): %r", key, exc)
                self._surge_down = True
            return False
        self.surge_writes += 1
        if self._surge_down:
            log.warning("surge hash %s writable again", key)
            self._surge_down = False
        return True

    def stats(self) -> dict:
        return {
            "published": self.published,
            "failed": self.failed,
            "records_sent": self.records_sent,
            "records_waiting": len(self.outbox),
            "dropped": self.dropped,
            "bus_up": not self._down and self._r is not None,
            "surge_writes": self.surge_writes,
            "surge_failed": self.surge_failed,
        }
