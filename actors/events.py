"""What a shard actor sends out: client events (pub/sub) and ride records (a stream).

Redis down must not stop a shard: publishing failures are counted and logged once per
outage; client events are dropped (clients re-read their state from REST on reconnect),
ride records wait in a bounded outbox and go out when Redis is back, so nothing a rider
was told goes unrecorded while the shard lives. Surge readings (a hash per region, see
:meth:`EventPublisher.publish_surge`) are soft state: a failed write is simply replaced
by the next one.

Every record gets an identity when it enters the outbox (``record_id``,
``"<shard>:<incarnation>:<seq>"``): a batch whose write timed out is sent again, and
Redis may already hold the first copy under another stream id; the consumer stores a
record once per ``record_id`` (``api/upkeep.py``), so the resend is harmless.

A publication is bounded by ``publish_timeout_s`` (a paused Redis accepts the connection
and never answers; the client's own timeout was 5 s, a third of an offer's life) and
failed ones are retried with a growing pause. :meth:`EventPublisher.flush` reports the
offers it could not publish, so the shard withdraws them rather than let the driver's
silence count as a decline; :meth:`EventPublisher.health` says how the bus is doing.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
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
# A publication that has not answered by then counts as failed. A healthy local Redis
# answers a flush's pipeline in about a millisecond; a second leaves room for a loaded box.
PUBLISH_TIMEOUT_S = 1.0
# After a failure, the next attempt waits this long, doubling up to the maximum.
RETRY_FIRST_S = 0.1
RETRY_MAX_S = 2.0
# At most this many records in one flush (a backlog after an outage goes over several).
RECORDS_PER_FLUSH = 2_000

# One flush in one command: ARGV is (n, stream maxlen, n × (channel, message), records).
# Answers each PUBLISH's receiver count, in order. Against a pipeline of the same PUBLISH
# and XADD commands, ~290 us less of the shard's CPU for a flush of 25 (redis-py packs and
# parses each command of a pipeline on its own) and the same of Redis' (micro-run).
FLUSH_SCRIPT = """
local n = tonumber(ARGV[1])
local heard = {}
for i = 1, n do
  heard[i] = redis.call('PUBLISH', ARGV[1 + 2 * i], ARGV[2 + 2 * i])
end
for j = 3 + 2 * n, #ARGV do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'r', ARGV[j])
end
return heard
"""


def _connect(redis_url: str, timeout_s: float) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        redis_url, socket_timeout=max(2 * timeout_s, 1.0), socket_connect_timeout=timeout_s
    )


class EventPublisher:
    def __init__(
        self,
        redis_url: str | None,
        max_outbox: int = MAX_OUTBOX,
        *,
        source: str = "",
        publish_timeout_s: float = PUBLISH_TIMEOUT_S,
    ) -> None:
        """``source`` prefixes the ids of the records this publisher sends (the shard and
        its incarnation, ``"3:lq9x2k7a"``); without one a random prefix is used."""
        self.redis_url = redis_url
        self.publish_timeout_s = publish_timeout_s
        self._r = _connect(redis_url, publish_timeout_s) if redis_url else None
        # EVALSHA, loading the script again when Redis does not know it (a restart).
        self._flush_script = self._r.register_script(FLUSH_SCRIPT) if self._r is not None else None
        self.source = source or uuid.uuid4().hex[:12]
        self._seq = 0
        self.outbox: deque[dict[str, Any]] = deque(maxlen=max_outbox)
        # Records pushed out of the full outbox (oldest first): lost, so counted and logged.
        self.dropped = 0
        self._drop_logged_at = -math.inf
        self.last_ok_at: float | None = None
        self.last_failed_at: float | None = None
        self.last_error = ""
        self.offers_undelivered = 0
        self._retry_at = 0.0
        self._retry_s = RETRY_FIRST_S
        self.published = 0
        self.failed = 0
        self.records_sent = 0
        self._down = False
        self.surge_writes = 0
        self.surge_failed = 0
        self._surge_down = False
        # Drivers whose trip position the last flushes published to nobody (no edge holds
        # the rider's socket): see :meth:`take_unheard`.
        self._unheard: list[int] = []
        self.unheard_positions = 0

    def _stamp(self, records: list[dict]) -> None:
        for rec in records:
            if "record_id" not in rec:
                self._seq += 1
                rec["record_id"] = f"{self.source}:{self._seq}"

    @property
    def bus_ok(self) -> bool:
        """True when the last publication (or probe) went through."""
        return self._r is not None and not self._down

    async def flush(self, notices: list[tuple[str, str | int, dict]], records: list[dict]) -> list[str]:
        """Publish client events and append records; never raises.

        Returns the ids of the offers among ``notices`` that were not published (the bus
        failed, did not answer within ``publish_timeout_s``, or is waiting out its retry
        pause). Records wait in the outbox and go with a later flush; only what no longer
        fits in a full outbox is dropped, counted and logged.
        """
        self._stamp(records)
        self._keep(records)
        if not notices and not self.outbox:
            return []
        offers = [
            str(m["offer_id"])
            for audience, _, m in notices
            if audience == "driver" and m.get("type") == "offer" and "offer_id" in m
        ]
        if self._r is None:
            if notices:
                self._drop(len(notices), "client events (no Redis URL)")
            return offers
        now = time.time()
        if self._down and time.monotonic() < self._retry_at:
            self.failed += len(notices)
            self.offers_undelivered += len(offers)
            return offers
        # Take the records out before awaiting: flushes from concurrent calls of the actor
        # interleave at the await, and each record must go out exactly once.
        batch = [self.outbox.popleft() for _ in range(min(len(self.outbox), RECORDS_PER_FLUSH))]
        try:
            assert self._flush_script is not None
            args: list[Any] = [len(notices), STREAM_MAXLEN]
            for audience, ident, message in notices:
                # "v": the socket protocol version (docs/protocol.md); edges forward as is.
                args += [client_channel(audience, ident), msgpack.packb({"v": 1, **message, "sent_at": now})]
            args += [msgpack.packb(rec) for rec in batch]
            answers = await asyncio.wait_for(
                self._flush_script(keys=[RIDE_RECORDS_STREAM], args=args), self.publish_timeout_s
            )
        except Exception as exc:
            # Back to the front of the outbox, oldest first, for the next flush; what no
            # longer fits is dropped, the newest (a full deque drops from its other end).
            # Redis may have written some of them before the timeout: their record ids make
            # the resend harmless.
            maxlen = self.outbox.maxlen
            over = len(self.outbox) + len(batch) - maxlen if maxlen is not None else 0
            if over > 0:
                self._drop(over, "ride records (outbox full)")
            self.outbox.extendleft(reversed(batch))
            self.failed += len(notices)
            self.offers_undelivered += len(offers)
            self._failed(exc)
            return offers
        self.published += len(notices)
        self.records_sent += len(batch)
        for (_, _, message), receivers in zip(notices, answers, strict=False):
            # PUBLISH answers how many subscribers got it; edges subscribe to a client's
            # channel only while they hold its socket.
            if receivers == 0 and message.get("type") == "driver_position":
                self._unheard.append(int(message["driver_id"]))
        self.unheard_positions += len(self._unheard)
        if self._down:
            log.warning("event bus is back; %d records sent", len(batch))
        self._ok()
        return []

    def take_unheard(self) -> list[int]:
        """The drivers whose trip position reached no rider's socket since the last call
        (the shard mutes their positions for a while: nobody is watching)."""
        out, self._unheard = self._unheard, []
        return out

    def _ok(self) -> None:
        self._down = False
        self.last_ok_at = time.time()
        self._retry_s = RETRY_FIRST_S

    def _failed(self, exc: BaseException) -> None:
        self.last_failed_at = time.time()
        self.last_error = repr(exc)[:200]
        self._retry_at = time.monotonic() + self._retry_s
        self._retry_s = min(RETRY_MAX_S, self._retry_s * 2)
        if not self._down:
            log.warning("event bus unavailable, keeping %d records: %r", len(self.outbox), exc)
            self._down = True

    async def probe(self) -> bool:
        """PING the bus (within ``publish_timeout_s``, respecting the retry pause while it
        is down); updates :attr:`bus_ok` and returns it. Never raises."""
        if self._r is None:
            return False
        if self._down and time.monotonic() < self._retry_at:
            return False
        try:
            await asyncio.wait_for(self._r.ping(), self.publish_timeout_s)
        except Exception as exc:
            self._failed(exc)
            return False
        if self._down:
            log.warning("event bus answers again")
        self._ok()
        return True

    def health(self, now: float | None = None) -> dict[str, Any]:
        """The bus as this publisher last saw it: ``ok``, seconds since the last success
        (None if never), the last error, records waiting."""
        now = time.time() if now is None else now
        return {
            "ok": self.bus_ok,
            "since_ok_s": None if self.last_ok_at is None else round(now - self.last_ok_at, 1),
            "last_failed_at": self.last_failed_at,
            "last_error": self.last_error,
            "records_waiting": len(self.outbox),
        }

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
            "bus_up": self.bus_ok,
            "offers_undelivered": self.offers_undelivered,
            "bus": self.health(),
            "surge_writes": self.surge_writes,
            "surge_failed": self.surge_failed,
            "unheard_positions": self.unheard_positions,
        }
