"""The state of one edge process: its links to the shards and Redis, and its sockets.

Built by the app's lifespan (``api/app.py``) from :class:`~api.settings.Settings`; the
REST routes and socket handlers reach it as ``request.app.state.edge``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

import msgpack

from api.auth import Principal, TokenAuthority
from api.gc_policy import GcPolicy
from api.metrics import EdgeCounters, make_registry
from api.protocol import LocationRules, encode
from api.relay import EventRelay
from api.settings import Settings
from dispatch.events import client_channel
from dispatch.region import Region, load_region
from dispatch.shardmap import ShardMap

if TYPE_CHECKING:
    from actors.client import ShardClient

log = logging.getLogger("dispatch.edge")


class TokenBucket:
    """``rate`` tokens a second up to ``burst``; :meth:`take` spends one if there is one."""

    __slots__ = ("rate", "burst", "tokens", "at")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.tokens, self.at = rate, burst, burst, now

    def take(self, now: float) -> bool:
        tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return True
        self.tokens = tokens
        return False

    def wait_s(self) -> float:
        return max(0.0, (1.0 - self.tokens) / self.rate)


class Connection:
    """One open socket: who it is, how it talks, and its outbound queue.

    Outbound messages go through a bounded queue drained by one writer task, so a slow
    client never holds up the relay or other sockets; past ``MAX_QUEUED`` the oldest
    message is dropped (positions are superseded by the next ones; ride state can be
    re-read over REST).
    """

    MAX_QUEUED = 256

    def __init__(self, ws, principal: Principal, socket: str, binary: bool) -> None:
        self.ws = ws
        self.principal = principal
        self.socket = socket
        self.binary = binary
        self.queue: asyncio.Queue = asyncio.Queue()
        self.dropped_out = 0
        self.closed = False
        self.last_seen = time.monotonic()
        self._writer: asyncio.Task | None = None

    def start(self) -> None:
        self._writer = asyncio.get_running_loop().create_task(self._write())

    def send(self, message: dict) -> None:
        self._put(encode(message, self.binary))

    def send_raw(self, raw: bytes) -> None:
        """A msgpack message from the bus, re-encoded only for JSON clients."""
        self._put(raw if self.binary else encode(msgpack.unpackb(raw), False))

    def _put(self, data: bytes | str) -> None:
        if self.closed:
            return
        if self.queue.qsize() >= self.MAX_QUEUED:
            self.queue.get_nowait()
            self.dropped_out += 1
        self.queue.put_nowait(data)

    async def _write(self) -> None:
        try:
            while True:
                data = await self.queue.get()
                if data is None:
                    return
                if isinstance(data, bytes):
                    await self.ws.send_bytes(data)
                else:
                    await self.ws.send_text(data)
        except Exception:
            self.closed = True  # the reader sees the disconnect and cleans up

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        if self._writer is not None:
            self.queue.put_nowait(None)
            try:
                await asyncio.wait_for(self._writer, 2.0)
            except (TimeoutError, Exception):
                self._writer.cancel()
        try:
            await self.ws.close(code=code, reason=reason)
        except Exception:
            pass


class Edge:
    """Everything one edge process shares between requests."""

    def __init__(self, settings: Settings, region: Region | None = None) -> None:
        self.settings = settings
        self.region = region or load_region(settings.region_file)
        self.map = ShardMap(self.region)
        self.rules = LocationRules(self.region, self.map)
        self.auth = TokenAuthority(settings)
        self.counters = EdgeCounters()
        self.shards: ShardClient | None = None  # the one door to the shards, set on start
        self.directory: Any = None  # its actors.directory.ShardDirectory (the router's)
        self.router: Any = None  # actors.router.LocationRouter
        self.relay: EventRelay | None = None
        self.surge: Any = None  # actors.surge.SurgeReader
        self.pool: Any = None  # asyncpg pool, when DATABASE_URL is configured
        self.rides: Any = None  # api.rides.RideService, with the pool
        self.records: Any = None  # api.upkeep.RecordConsumer
        self.upkeep: Any = None  # api.upkeep.Upkeep
        self.gc = GcPolicy(settings.gc_freeze_every_s, settings.gc_full_every_s)
        self.registry, self.relay_lag, self.rest_latency = make_registry(
            self.counters, lambda: self.router, lambda: self.relay, lambda: self.gc, lambda: self.shards
        )
        # (audience, id) -> open connections of that client on this edge
        self.clients: dict[tuple[str, str], set[Connection]] = defaultdict(set)
        self.rest_buckets: dict[str, TokenBucket] = {}
        self.started_at = time.time()
        self.stopping = False
        self._sweeper: asyncio.Task | None = None
        self._rides_retry: asyncio.Task | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        from actors import directory
        from actors.client import ShardClient
        from actors.router import LocationRouter, RouterConfig
        from actors.surge import SurgeReader

        s = self.settings
        # Blocking, once, before the edge serves anything (Ray wants the main thread).
        directory.connect(s.ray_address or "auto", s.namespace, log_to_driver=s.ray_log_to_driver)
        self.shards = ShardClient(self.region.name, self.region.shard_count, s.namespace)
        self.directory = self.shards.directory
        self.router = LocationRouter(
            self.map,
            self.directory,
            RouterConfig(flush_interval_s=s.flush_interval_s, max_rows_per_call=s.max_rows_per_call),
        )
        await self.router.start()
        if s.redis_url:
            self.relay = EventRelay(s.redis_url, s.edge_id, self.deliver)
            await self.relay.start()
        self.surge = SurgeReader.for_region(self.region, s.redis_url)
        if s.database_url:
            try:
                await self._start_rides()
            except Exception as exc:  # Postgres down: ingest and matching go on; rides answer 503
                log.error("Postgres unavailable (%r); ride routes answer 503 until it is back", exc)
                self._rides_retry = asyncio.get_running_loop().create_task(self._retry_rides())
        else:
            log.warning("no DATABASE_URL: ride, quote and payment routes answer 503")
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_idle())
        self.gc.install()
        log.info("edge %s up: region %s, %d shards", s.edge_id, self.region.name, self.region.shard_count)

    async def _start_rides(self) -> None:
        """Postgres, the migrations (``auto_migrate``), the ride service and its loops."""
        from api.rides import RideService
        from api.upkeep import RecordConsumer, RideCollector, Upkeep
        from storage.db import create_pool, migrate

        s = self.settings
        assert s.database_url
        self.pool = await create_pool(s.database_url, min_size=1, max_size=s.db_pool_size)
        if s.auto_migrate:
            applied = await migrate(self.pool)
            if applied:
                log.info("applied migrations %s", ", ".join(applied))
        self.rides = RideService.for_edge(self, self.pool)
        await self.rides.start()
        if s.redis_url:
            self.records = RecordConsumer(s.redis_url, s.edge_id, self.rides.rides)
            await self.records.start()
        self.upkeep = Upkeep(self)
        await self.upkeep.start()
        self.registry.register(RideCollector(self))

    async def _retry_rides(self) -> None:
        while self.rides is None:
            await asyncio.sleep(5.0)
            try:
                if self.pool is not None:
                    await self.pool.close()
                    self.pool = None
                await self._start_rides()
                log.warning("Postgres is back: ride routes serve again")
            except Exception as exc:
                log.warning("Postgres still unavailable: %r", exc)

    async def quiesce(self) -> None:
        """First step of a graceful shutdown: refuse new sockets, close the open ones with
        1001 (going away: clients reconnect to another edge), flush buffered updates."""
        self.stopping = True
        conns = [c for group in self.clients.values() for c in group]
        await asyncio.gather(*(c.close(1001, "edge shutting down") for c in conns), return_exceptions=True)
        if self.router is not None:
            try:
                await self.router.drain(timeout_s=10.0)
            except Exception:
                log.exception("flushing the router on shutdown failed")

    async def stop(self) -> None:
        """Graceful shutdown (after :meth:`quiesce`, which it runs if nobody did)."""
        if not self.stopping:
            await self.quiesce()
        for task in (self._sweeper, self._rides_retry):
            if task is not None:
                task.cancel()
        if self.router is not None:
            try:
                await self.router.stop(timeout_s=10.0)
            except Exception:
                log.exception("stopping the router failed")
        if self.relay is not None:
            await self.relay.stop()
        if self.surge is not None:
            await self.surge.close()
        for part in (self.upkeep, self.records, self.rides):
            if part is not None:
                try:
                    await part.stop()
                except Exception:
                    log.exception("stopping %s failed", type(part).__name__)
        if self.pool is not None:
            await self.pool.close()
        self.gc.uninstall()

    async def _sweep_idle(self) -> None:
        """Close sockets silent for longer than the idle timeout (dead networks); freeze
        and collect garbage when due (api/gc_policy.py)."""
        timeout = self.settings.idle_timeout_s
        while True:
            await asyncio.sleep(min(5.0, timeout / 4))
            self.gc.tick()
            cutoff = time.monotonic() - timeout
            for group in list(self.clients.values()):
                for c in list(group):
                    if c.last_seen < cutoff:
                        c.send(
                            {
                                "type": "error",
                                "v": 1,
                                "code": "idle_timeout",
                                "message": f"nothing received for {timeout:g} s",
                            }
                        )
                        await c.close(1001, "idle timeout")

    # -- sockets and the relay -------------------------------------------------------------

    def register(self, conn: Connection, audience: str, ident: str) -> None:
        self.clients[(audience, ident)].add(conn)
        self.counters.connections[conn.socket] += 1
        self.counters.connections_total[conn.socket] += 1
        if self.relay is not None and audience in ("rider", "driver"):
            self.relay.add(client_channel(audience, ident))

    async def subscribed(self, audience: str, ident: str, timeout_s: float = 1.0) -> bool | None:
        """Whether this client's bus channel is subscribed (waiting up to ``timeout_s``):
        from then on no event for it is missed. None for sockets without one."""
        if self.relay is None or audience not in ("rider", "driver"):
            return None
        return await self.relay.wait_subscribed(client_channel(audience, ident), timeout_s)

    def unregister(self, conn: Connection, audience: str, ident: str) -> None:
        group = self.clients.get((audience, ident))
        if group is not None and conn in group:
            group.discard(conn)
            if not group:
                del self.clients[(audience, ident)]
            self.counters.connections[conn.socket] -= 1
            if self.relay is not None and audience in ("rider", "driver"):
                self.relay.remove(client_channel(audience, ident))

    def deliver(self, audience: str, ident: str, raw: bytes) -> None:
        """An event from the bus for a client: to each of its sockets on this edge."""
        group = self.clients.get((audience, ident))
        if not group:
            return
        try:
            sent_at = msgpack.unpackb(raw).get("sent_at")
            if isinstance(sent_at, int | float):
                self.relay_lag.observe(max(0.0, time.time() - sent_at))
        except Exception:
            return  # not a message of ours
        for conn in group:
            conn.send_raw(raw)
        self.counters.relayed[audience] += len(group)

    # -- the shards ------------------------------------------------------------------------

    @property
    def shard_client(self) -> ShardClient:
        """The client to the shards. Requests are served only after :meth:`start` set it."""
        assert self.shards is not None, "the edge has not started"
        return self.shards

    async def find_driver(self, driver_id: int) -> tuple[int, dict] | None:
        """``(shard id, row)`` of the shard that holds the driver (asked of every shard at
        once; of two holders mid-handoff, the newer position), or None if none does."""
        assert self.shards is not None, "the edge has not started"
        return await self.shards.find_driver(driver_id)

    # -- REST rate limits --------------------------------------------------------------------

    def rest_allowed(self, principal: Principal) -> TokenBucket | None:
        """None if ``principal`` may make a request now, else its (empty) bucket."""
        now = time.monotonic()
        key = f"{principal.role}:{principal.sub}"
        b = self.rest_buckets.get(key)
        if b is None:
            if len(self.rest_buckets) > 100_000:
                self.rest_buckets.clear()  # bounded memory; a reset bucket is full, not empty
            b = self.rest_buckets[key] = TokenBucket(
                self.settings.rest_rate_per_s, self.settings.rest_burst, now
            )
        return None if b.take(now) else b
