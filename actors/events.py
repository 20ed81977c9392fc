"""What a shard actor sends out: client events (pub/sub) and ride records (a stream).

Redis down must not stop a shard: publishing failures are counted and logged once per
outage; client events are dropped (clients re-read their state from REST on reconnect),
ride records wait in a bounded outbox and go out when Redis is back, so nothing a rider
was told goes unrecorded while the shard lives.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

import msgpack
import redis.asyncio as aioredis

from dispatch.events import RIDE_RECORDS_STREAM, driver_channel, rider_channel

log = logging.getLogger("dispatch.events")

MAX_OUTBOX = 100_000
STREAM_MAXLEN = 1_000_000


class EventPublisher:
    def __init__(self, redis_url: str | None) -> None:
        self.redis_url = redis_url
        self._r = aioredis.Redis.from_url(redis_url) if redis_url else None
        self.outbox: deque[dict[str, Any]] = deque(maxlen=MAX_OUTBOX)
        self.published = 0
        self.failed = 0
        self.records_sent = 0
        self._down = False

    def set_url(self, redis_url: str | None) -> None:
        if redis_url != self.redis_url:
            self.redis_url = redis_url
            self._r = aioredis.Redis.from_url(redis_url) if redis_url else None

    async def flush(self, notices: list[tuple[str, str | int, dict]], records: list[dict]) -> None:
        """Publish client events and append records; never raises."""
        self.outbox.extend(records)
        if self._r is None or (not notices and not self.outbox):
            return
        now = time.time()
        # Take the records out before awaiting: flushes from concurrent calls of the actor
        # interleave at the await, and each record must go out exactly once.
        batch = list(self.outbox)
        self.outbox.clear()
        try:
            pipe = self._r.pipeline(transaction=False)
            for audience, ident, message in notices:
                channel = rider_channel(str(ident)) if audience == "rider" else driver_channel(ident)
                pipe.publish(channel, msgpack.packb({**message, "sent_at": now}))
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
            # Back to the front of the outbox, oldest first, for the next flush.
            self.outbox.extendleft(reversed(batch))
            self.failed += len(notices)
            if not self._down:
                log.warning("event bus unavailable, keeping %d records: %r", len(self.outbox), exc)
                self._down = True

    def stats(self) -> dict:
        return {
            "published": self.published,
            "failed": self.failed,
            "records_sent": self.records_sent,
            "records_waiting": len(self.outbox),
            "bus_up": not self._down and self._r is not None,
        }
