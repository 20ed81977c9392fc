"""The ride application layer of one edge, wired: the services of :mod:`api.services`
built with their real dependencies.

:class:`RideService` builds each service once (from the edge's settings, region, pool,
shard directory and surge reader) and is what the REST routes (``api/ride_routes.py``),
the driver's socket (``api/sockets.py``) and the upkeep loop (``api/upkeep.py``) hold.
It keeps the few entry points they call (``accept``, ``decline``, ``advance``,
``cancel``, the sweeps) as one-line delegations; everything else is reached through the
service of its job: ``quotes``, ``requests``, ``offers``, ``trips``, ``settlement``, ``views``.

The order that keeps the three stores of truth consistent:

- **Postgres first for what a client is told.** A ride is stored before the rider hears
  of it; every transition a client causes is written (versioned, with its event row)
  before it is answered or announced.
- **The shard for what must be atomic among drivers** (an accept), through
  :class:`actors.client.ShardClient`.
- **Redis for telling the other side** (:class:`BusPublisher`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import msgpack

from actors.batching import Batcher
from api.auth import Principal
from api.services.ports import RideShards, SurgeSource
from api.services.quotes import Quotes
from api.services.requests import Offers, RideRequests
from api.services.settlement import Settlement
from api.services.trips import Trips
from api.services.values import RideCounters
from api.services.views import RideViews
from dispatch.events import client_channel
from dispatch.region import Region
from dispatch.rides import MatchingConfig
from dispatch.shardmap import ShardMap
from dispatch.trips import TripEvent
from dispatch.vocabulary import ENVELOPE_VERSION
from storage.bus import RedisPublisher
from storage.idempotency import IdempotencyStore
from storage.payments import PaymentStore
from storage.quotes import QuoteStore
from storage.rides import Ride, RideStore, WriteMany

log = logging.getLogger("dispatch.rides")


# The most rides one statement writes (RideStore's batched creates and accepts).
WRITE_BATCH = 64


class BatchedWrites:
    """RideStore's grouping in an edge (a :data:`storage.rides.Grouping`): one statement
    of a kind out at a time, at most every ``window_s``, with what arrived meanwhile
    (:class:`actors.batching.Batcher`). :meth:`counts` gives, per kind, the statements and
    the rides they wrote (``/metrics``: ``dispatch_ride_writes``)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._batchers: dict[str, Batcher[Any, Any]] = {}

    def __call__(self, name: str, write_many: WriteMany) -> Any:
        async def send(_key: int, items: list[Any]) -> list[Any]:
            return await write_many(items)

        batcher: Batcher[Any, Any] = Batcher(name, send, max_items=WRITE_BATCH, min_interval_s=self.window_s)
        self._batchers[name] = batcher
        return lambda item: batcher.add(0, item)

    def counts(self) -> dict[str, tuple[int, int]]:
        return {name: (b.calls, b.items) for name, b in self._batchers.items()}


class BusPublisher:
    """:class:`api.services.ports.Publisher` on Redis pub/sub (no Redis: nothing is sent),
    through :class:`storage.bus.RedisPublisher`: a publish is written, not waited for."""

    def __init__(self, redis_url: str | None) -> None:
        self.redis_url = redis_url
        self._bus: RedisPublisher | None = None

    async def start(self) -> None:
        if self.redis_url:
            self._bus = RedisPublisher(self.redis_url)

    async def stop(self) -> None:
        if self._bus is not None:
            self._bus.close()

    def counts(self) -> dict[str, int]:
        """``{outcome: publishes}``: ``sent``, ``dropped`` and ``refused`` (by Redis)."""
        b = self._bus
        return {"sent": b.sent, "dropped": b.dropped, "refused": b.errors} if b is not None else {}

    async def publish(self, audience: str, ident: str | int, message: dict[str, Any]) -> None:
        if self._bus is None:
            return
        channel = client_channel(audience, ident)
        try:
            payload = {"v": ENVELOPE_VERSION, **message, "sent_at": time.time()}
            await self._bus.publish(channel, msgpack.packb(payload))
        except Exception as exc:
            log.warning("could not publish %s to %s: %r", message.get("type"), channel, exc)


class RideService:
    """The ride services of one edge process (see the module docstring)."""

    def __init__(
        self,
        *,
        pool: Any,
        region: Region,
        shard_map: ShardMap,
        shards: RideShards,
        surge: SurgeSource | None,
        redis_url: str | None,
        max_in_flight: int,
        write_window_s: float = 0.0,
    ) -> None:
        self.writes = BatchedWrites(write_window_s)
        self.rides = RideStore(pool, grouping=self.writes)
        self.payments = PaymentStore(pool)
        self.idempotency = IdempotencyStore(pool)
        self.publisher = BusPublisher(redis_url)
        self.shards = shards
        self.stats = RideCounters()
        classes = tuple(region.drivers.vehicle_classes)
        matching = MatchingConfig.from_section(region.section("matching"))
        fares = region.fare_schedule()
        self.views = RideViews(self.rides, self.payments, classes)
        self.quotes = Quotes(
            QuoteStore(pool),
            region_name=region.name,
            region_display_name=region.display_name,
            shard_map=shard_map,
            fares=fares,
            vehicle_classes=classes,
            pickup_speed_mps=matching.pickup_speed_mps,
            surge=surge,
        )
        self.settlement = Settlement(self.rides, self.payments, self.views, fares)
        self.requests = RideRequests(
            self.rides,
            shards,
            self.quotes,
            region_name=region.name,
            payment_methods=getattr(self.payments.provider, "methods", ("wallet", "cash")),
            max_in_flight=max_in_flight,
            counters=self.stats,
        )
        self.offers = Offers(
            self.rides,
            self.views,
            shards,
            self.publisher,
            self.requests,
            vehicle_classes=classes,
            shard_count=region.shard_count,
            counters=self.stats,
        )
        self.trips = Trips(
            self.rides,
            self.quotes.store,
            self.views,
            shards,
            self.publisher,
            self.settlement,
            fares=fares,
            policy=region.cancellation_policy(),
            pickup_speed_mps=matching.pickup_speed_mps,
            max_wait_s=matching.max_wait_s,
            orphan_after_s=region.trip_rules().orphan_after_s,
            counters=self.stats,
        )

    @classmethod
    def for_edge(cls, edge: Any, pool: Any) -> RideService:
        """The services of ``edge`` (an :class:`api.edge.Edge` that has started its shards)."""
        return cls(
            pool=pool,
            region=edge.region,
            shard_map=edge.map,
            shards=edge.shards,
            surge=edge.surge,
            redis_url=edge.settings.redis_url,
            max_in_flight=int(edge.settings.ride_requests_in_flight),
            write_window_s=edge.settings.ride_write_window_s,
        )

    async def start(self) -> None:
        await self.publisher.start()

    async def stop(self) -> None:
        await self.publisher.stop()

    # -- what the metrics read -------------------------------------------------------------

    @property
    def counters(self) -> dict[str, int]:
        return self.stats.steps

    @property
    def pending_handoffs(self) -> dict[str, Ride | None]:
        return self.requests.pending_handoffs

    # -- what the driver's socket and the upkeep loop call ----------------------------------

    async def accept(
        self,
        principal: Principal,
        ride_id: str,
        offer_id: str,
        history: list[dict[str, Any]] | None = None,
    ) -> Ride:
        return await self.offers.accept(principal, ride_id, offer_id, history)

    async def decline(self, principal: Principal, ride_id: str, offer_id: str) -> None:
        await self.offers.decline(principal, ride_id, offer_id)

    async def advance(
        self, principal: Principal, ride_id: str, event: TripEvent
    ) -> tuple[Ride, dict[str, Any]]:
        return await self.trips.advance(principal, ride_id, event)

    async def cancel(
        self, principal: Principal, ride_id: str, reason: str | None = None
    ) -> tuple[Ride, dict[str, Any]]:
        return await self.trips.cancel(principal, ride_id, reason)

    async def retry_handoffs(self) -> int:
        return await self.requests.retry_handoffs()

    async def settle_unpaid(self, limit: int = 100) -> int:
        return await self.settlement.settle_unpaid(limit)

    async def expire_lost(self, grace_s: float = 60.0, limit: int = 100) -> int:
        return await self.trips.expire_lost(grace_s, limit)

    async def end_orphans(self, limit: int = 100) -> int:
        return await self.trips.end_orphans(limit)
