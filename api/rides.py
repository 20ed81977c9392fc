"""Rides at the edge: quotes, requests, offers answered, the trip lifecycle and its money.

:class:`RideService` is what the REST routes (``api/ride_routes.py``) and the driver's
socket (``api/sockets.py``) call. It ties three things together, in an order that keeps
them consistent:

- **Postgres first for what a client is told.** A ride is stored before the rider hears
  of it; every transition a client causes is written (versioned, with its event row)
  before it is answered or announced.
- **The shard for what must be atomic among drivers.** An accept is taken by the ride's
  shard (one wins) and then written to Postgres; if Postgres refuses it (the rider
  cancelled a moment before) the shard frees the driver again, so a ride is never
  assigned twice and a driver never stays on a ride that is gone.
- **Redis for telling the other side.** Status changes are published on the rider's and
  the driver's channels; whichever edge holds their sockets forwards them.

Money: completion computes the final fare (:func:`dispatch.pricing.final_fare`) from the
distance the shard metered on the driver's positions and the duration between pickup and
drop-off, stores it with the ``complete`` event, then charges it with a key derived from
the ride (so a retry, or the settlement sweep after a crash, can never charge twice).
A rider's cancellation after the free window charges the class's fee the same way.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgpack

from actors.directory import BatchedCall, shard_call
from api.auth import Principal, Role
from dispatch.errors import (
    Conflict,
    DispatchError,
    Forbidden,
    IllegalTransition,
    InvalidInput,
    InvalidLocation,
    NotFound,
    Unavailable,
)
from dispatch.events import client_channel
from dispatch.pricing import FareBasis, FareBreakdown, estimate_trip, final_fare, make_quote
from dispatch.rides import MatchingConfig
from dispatch.shardmap import OUTSIDE
from dispatch.trips import ActorRole, RideStatus, TripEvent
from storage.idempotency import IdempotencyStore, fingerprint
from storage.payments import METHODS, PaymentStore
from storage.quotes import QuoteStore, StoredQuote
from storage.rides import Ride, RideStore

log = logging.getLogger("dispatch.rides")

# Trips are estimated at the pickup speed of the region's matching config, along the
# great circle times this detour factor (a street grid runs ~1.3x the straight line).
DETOUR_FACTOR = 1.3
# A drop-off may lie outside the service area (airports, the next town), but not absurdly far.
MAX_TRIP_M = 300_000.0
SURGE_CACHE_S = 1.0


def charge_key(ride_id: str) -> str:
    """The idempotency key of a ride's fare charge: one per ride, whoever triggers it."""
    return f"ride-charge-{ride_id}"


def fee_key(ride_id: str) -> str:
    return f"ride-cancel-fee-{ride_id}"


@dataclass(frozen=True, slots=True)
class Point:
    lat: float
    lng: float

    def pair(self) -> tuple[float, float]:
        return (self.lat, self.lng)


def _point(name: str, value: Any) -> Point:
    """``{"lat", "lng"}`` → Point; InvalidLocation for anything else."""
    if not isinstance(value, dict):
        raise InvalidLocation(f"'{name}' must be an object with 'lat' and 'lng'")
    lat, lng = value.get("lat"), value.get("lng")
    for v in (lat, lng):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise InvalidLocation(f"'{name}' needs finite numbers 'lat' and 'lng'")
    if not (-90 <= lat <= 90 and -180 <= lng <= 180):
        raise InvalidLocation(f"'{name}' ({lat}, {lng}) is out of range")
    return Point(float(lat), float(lng))


def _breakdown(
    lines: dict[str, Any],
    *,
    currency: str,
    surge: float,
    total: int,
    distance_m: float,
    duration_s: float,
    basis: FareBasis,
) -> FareBreakdown:
    """A FareBreakdown from its receipt lines (:meth:`FareBreakdown.lines`) and figures."""
    return FareBreakdown(
        currency=currency,
        base_cents=int(lines["base"]),
        distance_cents=int(lines["distance"]),
        time_cents=int(lines["time"]),
        surge_multiplier=float(surge),
        surge_cents=int(lines["surge"]),
        minimum_adjustment_cents=int(lines["minimum_fare_adjustment"]),
        booking_fee_cents=int(lines["booking_fee"]),
        total_cents=int(total),
        distance_m=float(distance_m),
        duration_s=float(duration_s),
        basis=basis,
    )


def quote_breakdown(q: StoredQuote) -> FareBreakdown:
    """The stored quote back as the FareBreakdown it was made from."""
    return _breakdown(
        q.breakdown,
        currency=q.currency,
        surge=q.surge_multiplier,
        total=q.fare_cents,
        distance_m=q.distance_m,
        duration_s=q.duration_s,
        basis=FareBasis.ESTIMATE,
    )


def fare_json(fare: FareBreakdown) -> dict[str, Any]:
    return {
        "total_cents": fare.total_cents,
        "currency": fare.currency,
        "lines": fare.lines(),
        "surge_multiplier": fare.surge_multiplier,
        "distance_m": round(fare.distance_m, 1),
        "duration_s": round(fare.duration_s, 1),
        "basis": fare.basis.value,
    }


def fare_from_json(data: dict[str, Any]) -> FareBreakdown:
    """The inverse of :func:`fare_json` (up to its rounding of distance and duration)."""
    return _breakdown(
        data["lines"],
        currency=data["currency"],
        surge=data["surge_multiplier"],
        total=data["total_cents"],
        distance_m=data["distance_m"],
        duration_s=data["duration_s"],
        basis=FareBasis(data["basis"]),
    )


def _epoch(dt: datetime | None) -> float | None:
    return dt.timestamp() if dt is not None else None


class RideService:
    """The ride operations of one edge process (see the module docstring)."""

    def __init__(self, edge: Any, pool: Any) -> None:
        self.edge = edge
        self.rides = RideStore(pool)
        self.quotes = QuoteStore(pool)
        self.payments = PaymentStore(pool)
        self.idempotency = IdempotencyStore(pool)
        region = edge.region
        self.fares = region.fare_schedule()
        self.policy = region.cancellation_policy()
        self.matching = MatchingConfig.from_section(region.section("matching"))
        self.classes = tuple(region.drivers.vehicle_classes)
        self._bus: Any = None
        self._surge: dict[str, Any] = {}
        self._surge_at = -math.inf
        # Rides stored but not yet taken by their shard (it was down or slow): retried.
        self.pending_handoffs: dict[str, Ride] = {}
        # Handoffs and accepts go to the shards batched: one call out per shard at a time.
        self.handoffs = BatchedCall(edge.directory, "add_rides")
        self.accepts = BatchedCall(edge.directory, "accept_offers")
        self.declines = BatchedCall(edge.directory, "decline_offers")
        self.counters: dict[str, int] = {
            "requested": 0,
            "accepted": 0,
            "completed": 0,
            "cancelled": 0,
            "refused_busy": 0,
        }
        self.in_flight = 0
        self.max_in_flight = int(edge.settings.ride_requests_in_flight)

    async def start(self) -> None:
        if self.edge.settings.redis_url:
            import redis.asyncio as aioredis

            self._bus = aioredis.Redis.from_url(self.edge.settings.redis_url)

    async def stop(self) -> None:
        if self._bus is not None:
            await self._bus.aclose()

    # -- helpers ------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def admitted(self):
        """Hold one of the edge's ride-request slots; Unavailable (503, Retry-After) when
        all are taken. The client retries with the same Idempotency-Key."""
        if self.in_flight >= self.max_in_flight:
            self.counters["refused_busy"] += 1
            raise Unavailable("this edge is at capacity for ride requests; retry shortly", retry_after_s=1)
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    def vehicle_class(self, name: Any) -> int:
        if not isinstance(name, str) or name not in self.classes:
            raise InvalidInput(f"vehicle_class must be one of {list(self.classes)}", vehicle_class=name)
        return self.classes.index(name)

    def _shard(self, shard_id: int):
        return self.edge.directory.handle(int(shard_id))

    async def publish(self, audience: str, ident: str | int, message: dict[str, Any]) -> None:
        """Tell a rider or a driver, on whichever edge holds its sockets. Never raises:
        a lost event is re-read over REST (docs/protocol.md)."""
        if self._bus is None:
            return
        channel = client_channel(audience, ident)
        try:
            await self._bus.publish(channel, msgpack.packb({"v": 1, **message, "sent_at": time.time()}))
        except Exception as exc:
            log.warning("could not publish %s to %s: %r", message.get("type"), channel, exc)

    def _status_message(self, ride: Ride, **extra: Any) -> dict[str, Any]:
        return {
            "type": "ride_status",
            "ride_id": ride.ride_id,
            "status": ride.status.value,
            "version": ride.version,
            **extra,
        }

    async def _load(self, ride_id: str) -> Ride:
        ride = await self.rides.get(ride_id)
        if ride is None:
            raise NotFound(f"no ride {ride_id!r}", ride_id=str(ride_id))
        return ride

    def check_access(self, principal: Principal, ride: Ride) -> None:
        """A rider sees only its rides, a driver only the ride it drives, an admin all.
        Others get NotFound: whether a ride exists is not theirs to know."""
        if principal.role is Role.ADMIN:
            return
        if principal.role is Role.RIDER and ride.rider_id == principal.sub:
            return
        if (
            principal.role is Role.DRIVER
            and ride.driver_id is not None
            and ride.driver_id == principal.driver_id
        ):
            return
        raise NotFound(f"no ride {ride.ride_id!r}", ride_id=ride.ride_id)

    # -- quotes -------------------------------------------------------------------------------

    def _trip_points(self, body: dict[str, Any]) -> tuple[Point, Point, int]:
        pickup, dropoff = _point("pickup", body.get("pickup")), _point("dropoff", body.get("dropoff"))
        if self.edge.map.shard_for_point(pickup.lat, pickup.lng) == OUTSIDE:
            raise InvalidLocation(
                f"pickup ({pickup.lat}, {pickup.lng}) is outside"
                f" {self.edge.region.display_name}'s service area"
            )
        distance_m, _ = estimate_trip(pickup.pair(), dropoff.pair(), 1.0, DETOUR_FACTOR)
        if distance_m > MAX_TRIP_M:
            raise InvalidLocation(
                f"the drop-off is {distance_m / 1000:.0f} km away; at most {MAX_TRIP_M / 1000:.0f}"
            )
        return pickup, dropoff, self.vehicle_class(body.get("vehicle_class", self.classes[0]))

    async def surge_at(self, p: Point) -> float:
        """The multiplier in force at ``p`` now (1.0 when surge data is unavailable).

        The shards rewrite the readings every few seconds; the edge reads all zones at
        most once per ``SURGE_CACHE_S`` instead of asking Redis on every quote and request.
        """
        now = time.monotonic()
        if now - self._surge_at >= SURGE_CACHE_S:
            self._surge_at = now
            try:
                self._surge = await self.edge.surge.zones()
            except Exception as exc:
                log.warning("surge unavailable, quoting 1.0: %r", exc)
                self._surge = {}
        z = self._surge.get(self.edge.surge.zone_of(p.lat, p.lng))
        return 1.0 if z is None else max(1.0, float(z.multiplier))

    async def quote(self, principal: Principal, body: dict[str, Any]) -> dict[str, Any]:
        """An upfront fare for a trip, stored and valid for the class's ``quote_ttl_s``."""
        pickup, dropoff, vclass = self._trip_points(body)
        rules = self.fares.for_class(vclass)
        surge = await self.surge_at(pickup)
        q = make_quote(
            rules,
            vclass,
            pickup.pair(),
            dropoff.pair(),
            self.matching.pickup_speed_mps,
            surge,
            time.time(),
            DETOUR_FACTOR,
        )
        stored = await self.quotes.save(
            principal.sub, self.edge.region.name, pickup.pair(), dropoff.pair(), q
        )
        return {
            "quote_id": stored.quote_id,
            "vehicle_class": self.classes[vclass],
            "fare": fare_json(q.fare),
            "expires_at": q.expires_at,
            "valid_for_s": round(q.expires_at - q.issued_at, 1),
            "reprice_rules": {
                "distance_over_frac": rules.reprice_distance_over_frac,
                "duration_over_frac": rules.reprice_duration_over_frac,
                "note": "the quoted total is charged unless the trip runs farther or longer than the quote "
                "by more than these fractions; then it is metered on the actual trip at the locked surge",
            },
        }

    # -- requests -----------------------------------------------------------------------------

    async def request_ride(
        self, principal: Principal, body: dict[str, Any], idempotency_key: str
    ) -> tuple[Ride, bool]:
        """Store a ride (idempotent per rider and key) and hand it to its pickup's shard."""
        pickup, dropoff, vclass = self._trip_points(body)
        method = body.get("payment_method", "wallet")
        if method not in METHODS:
            raise InvalidInput(f"payment_method must be one of {list(METHODS)}", payment_method=method)
        accepted = getattr(self.payments.provider, "methods", ("wallet", "cash"))
        if method not in accepted:
            raise InvalidInput(
                f"this deployment's payment provider takes {list(accepted)};"
                f" {method!r} needs a card processor",
                payment_method=method,
            )
        quote_id = body.get("quote_id")
        if quote_id is not None and not isinstance(quote_id, str):
            raise InvalidInput("quote_id must be a string")
        shard = self.edge.map.shard_for_point(pickup.lat, pickup.lng)
        rules = self.fares.for_class(vclass)
        if quote_id is None:
            surge = await self.surge_at(pickup)
            est = make_quote(
                rules,
                vclass,
                pickup.pair(),
                dropoff.pair(),
                self.matching.pickup_speed_mps,
                surge,
                time.time(),
                DETOUR_FACTOR,
            ).fare
            surge, estimate = est.surge_multiplier, est.total_cents
        else:
            surge, estimate = 1.0, 0  # the quote's figures replace these
        fp = fingerprint(
            "POST",
            "/v1/rides",
            {
                "pickup": pickup.pair(),
                "dropoff": dropoff.pair(),
                "vehicle_class": vclass,
                "quote_id": quote_id,
                "payment_method": method,
            },
        )
        ride, created = await self.rides.create_ride(
            rider_id=principal.sub,
            region=self.edge.region.name,
            shard_id=shard,
            vehicle_class=vclass,
            pickup=pickup.pair(),
            dropoff=dropoff.pair(),
            surge_multiplier=surge,
            fare_estimate_cents=estimate,
            currency=rules.currency,
            quote_id=quote_id,
            idempotency_key=idempotency_key,
            fingerprint=fp,
            payment_method=method,
        )
        if ride.status in (RideStatus.REQUESTED, RideStatus.OFFERED):
            await self.hand_to_shard(ride)
        if created:
            self.counters["requested"] += 1
        return ride, created

    async def hand_to_shard(self, ride: Ride) -> bool:
        """Queue ``ride`` in its shard (a no-op if it is there). On failure the ride is
        kept and retried by :meth:`retry_handoffs`; the rider already has its answer."""
        try:
            await self.handoffs.add(int(ride.shard_id), ride.to_request())
            self.pending_handoffs.pop(ride.ride_id, None)
            return True
        except DispatchError as exc:
            log.warning("ride %s not yet taken by shard %s: %s", ride.ride_id, ride.shard_id, exc.message)
            self.pending_handoffs[ride.ride_id] = ride
            return False

    async def retry_handoffs(self) -> int:
        done = 0
        for ride in list(self.pending_handoffs.values()):
            fresh = await self.rides.get(ride.ride_id)
            if fresh is None or fresh.status not in (RideStatus.REQUESTED, RideStatus.OFFERED):
                self.pending_handoffs.pop(ride.ride_id, None)
                continue
            done += await self.hand_to_shard(fresh)
        return done

    async def get(self, principal: Principal, ride_id: str) -> dict[str, Any]:
        return await self.view_of(principal, await self._load(ride_id))

    async def view_of(self, principal: Principal, ride: Ride) -> dict[str, Any]:
        """:meth:`get` of a ride already in hand (one transition returned): only its history
        is read."""
        self.check_access(principal, ride)
        return self.view(ride, await self.rides.events(ride.ride_id))

    def view(self, ride: Ride, events: list[dict[str, Any]] | None) -> dict[str, Any]:
        """The ride as clients see it: class names, public driver ids, its history."""
        out = ride.to_json()
        out["vehicle_class"] = (
            self.classes[ride.vehicle_class] if ride.vehicle_class < len(self.classes) else None
        )
        out["driver_id"] = f"drv-{ride.driver_id}" if ride.driver_id is not None else None
        if events is not None:
            out["events"] = [
                {k: e[k] for k in ("version", "event", "status", "applied", "actor_role", "at")}
                for e in events
            ]
        return out

    @staticmethod
    def created_events(ride: Ride) -> list[dict[str, Any]]:
        """The history of a ride just created: its one ``request`` event (no query needed)."""
        return [
            {
                "version": 1,
                "event": "request",
                "status": "requested",
                "applied": True,
                "actor_role": "rider",
                "at": ride.requested_at.isoformat(),
            }
        ]

    async def list_mine(self, principal: Principal, limit: int) -> list[dict[str, Any]]:
        return [self.view(r, None) for r in await self.rides.rides_of_rider(principal.sub, limit)]

    # -- offers -------------------------------------------------------------------------------

    async def accept(self, principal: Principal, ride_id: str, offer_id: str) -> Ride:
        """The driver takes an offer: atomic in the shard, then written to Postgres.

        Raises OfferUnavailable (expired, taken, declined, not this driver's), NotFound,
        Conflict when the rider cancelled meanwhile (the shard frees the driver again),
        Unavailable when Postgres is down (the shard puts the ride back in its queue).
        """
        driver_id, ride = await self._offer_of(principal, ride_id, offer_id)
        taken = await self.accepts.add(int(ride.shard_id), (offer_id, driver_id))
        eta = taken.get("pickup_eta_s")
        try:
            ride = await self.rides.transition(
                ride.ride_id,
                TripEvent.ACCEPT,
                ActorRole.DRIVER,
                principal.sub,
                driver_id=driver_id,
                offer_pending=True,
                data={"offer_id": offer_id, "pickup_eta_s": eta},
            )
        except (IllegalTransition, Conflict, Forbidden) as exc:
            # The ride moved on in Postgres (the rider cancelled): give the driver back.
            await self._free_driver(ride.shard_id, driver_id)
            raise Conflict(
                f"ride {ride.ride_id} can no longer be accepted: {exc.message}", ride_id=ride.ride_id
            ) from None
        except Unavailable:
            await self._free_driver(ride.shard_id, driver_id)
            await self.hand_to_shard(ride)
            raise
        self.counters["accepted"] += 1
        driver_info = {"driver_id": principal.sub, "vehicle_class": self.classes[ride.vehicle_class]}
        await self.publish(
            "rider", ride.rider_id, self._status_message(ride, driver=driver_info, pickup_eta_s=eta)
        )
        return ride

    async def decline(self, principal: Principal, ride_id: str, offer_id: str) -> None:
        driver_id, ride = await self._offer_of(principal, ride_id, offer_id)
        await self.declines.add(int(ride.shard_id), (offer_id, driver_id))

    async def _offer_of(self, principal: Principal, ride_id: str, offer_id: Any) -> tuple[int, Ride]:
        """The calling driver's id and the ride ``offer_id`` belongs to, checked before the
        shard takes anything: offer ids are ``<ride id>:<attempt>`` (dispatch/rides.py)."""
        driver_id = self._driver(principal)
        if not isinstance(offer_id, str) or not offer_id:
            raise InvalidInput("offer_id must be a non-empty string")
        ride = await self._load(ride_id)
        if offer_id.rpartition(":")[0] != ride.ride_id:
            raise InvalidInput(f"offer {offer_id!r} is not an offer of ride {ride.ride_id}")
        return driver_id, ride

    async def _free_driver(self, shard_id: int, driver_id: int) -> None:
        try:
            await shard_call(self._shard(shard_id).trip_ended.remote(driver_id))
        except DispatchError as exc:
            log.warning("could not free driver %s at shard %s: %s", driver_id, shard_id, exc.message)

    def _driver(self, principal: Principal) -> int:
        if principal.role is not Role.DRIVER or principal.driver_id is None:
            raise Forbidden("only a driver can do this")
        return principal.driver_id

    # -- the trip -----------------------------------------------------------------------------

    async def _event_data(self, ride_id: str, event: TripEvent) -> dict[str, Any]:
        """The data stored with the ride's latest applied ``event`` ({} if none)."""
        for e in reversed(await self.rides.events(ride_id)):
            if e["event"] == event.value and e["applied"]:
                return e.get("data") or {}
        return {}

    async def _odometer(self, driver_id: int, ride_id: str) -> float | None:
        """The shards' odometer of the driver on ``ride_id`` (metres), None if unknown."""
        held = await self.edge.find_driver(driver_id)
        trip = (held[1].get("trip") or {}) if held is not None else {}
        return float(trip["odometer_m"]) if trip.get("ride_id") == ride_id else None

    async def advance(
        self, principal: Principal, ride_id: str, event: TripEvent
    ) -> tuple[Ride, dict[str, Any]]:
        """The driver reports ``arrive``, ``start`` or ``complete``; the ride after it and
        what the driver is told beyond the status (the fare on completion)."""
        driver_id = self._driver(principal)
        ride = await self._load(ride_id)
        if ride.driver_id != driver_id:
            raise NotFound(f"no ride {ride_id!r}", ride_id=str(ride_id))
        extra: dict[str, Any] = {}
        data: dict[str, Any] = {}
        if event is TripEvent.START:
            odo = await self._odometer(driver_id, ride.ride_id)
            if odo is not None:
                data["odometer_m"] = odo
        elif event is TripEvent.COMPLETE:
            fare, distance_m, duration_s = await self._final_fare(ride, driver_id)
            # The ride keeps what was driven; the fare, what it was priced on (the quote's
            # estimate when the quote is honoured).
            extra["fare"] = fare_json(fare)
            data = {
                "final_fare_cents": fare.total_cents,
                "distance_m": round(distance_m, 1),
                "duration_s": round(duration_s, 1),
                "fare": extra["fare"],
            }
        elif event is not TripEvent.ARRIVE:
            raise InvalidInput(f"a driver cannot report {event.value!r} here")
        ride = await self.rides.transition(
            ride.ride_id,
            event,
            ActorRole.DRIVER,
            principal.sub,
            driver_id=driver_id,
            expected_version=ride.version,
            data=data,
        )
        if event is TripEvent.COMPLETE:
            self.counters["completed"] += 1
            await self._free_driver(ride.shard_id, driver_id)
            payment = await self.settle(ride, fare_from_json(extra["fare"]))
            if payment is not None:
                extra["payment"] = {
                    "status": payment.status,
                    "method": payment.method,
                    "failure_reason": payment.failure_reason,
                }
        await self.publish("rider", ride.rider_id, self._status_message(ride, **extra))
        return ride, extra

    async def _final_fare(self, ride: Ride, driver_id: int) -> tuple[FareBreakdown, float, float]:
        """The fare to charge, and the trip's actual distance (m) and duration (s)."""
        rules = self.fares.for_class(ride.vehicle_class)
        start_odo = (await self._event_data(ride.ride_id, TripEvent.START)).get("odometer_m")
        started_at = ride.started_at
        now_odo = await self._odometer(driver_id, ride.ride_id)
        if start_odo is not None and now_odo is not None and now_odo >= start_odo:
            distance_m = now_odo - float(start_odo)
        else:
            # The shard lost the odometer (it restarted mid-trip): the straight-line estimate.
            distance_m, _ = estimate_trip(
                (ride.pickup_lat, ride.pickup_lng),
                (ride.dropoff_lat, ride.dropoff_lng),
                self.matching.pickup_speed_mps,
                DETOUR_FACTOR,
            )
            log.warning("ride %s: no odometer from the shards; charging the estimated distance", ride.ride_id)
        duration_s = max(0.0, time.time() - started_at.timestamp()) if started_at else 0.0
        quote = None
        if ride.quote_id is not None:
            stored = await self.quotes.get(ride.quote_id)
            quote = quote_breakdown(stored) if stored is not None else None
        return (
            final_fare(rules, quote, distance_m, duration_s, float(ride.surge_multiplier)),
            distance_m,
            duration_s,
        )

    async def settle(self, ride: Ride, fare: FareBreakdown | None = None):
        """Charge a completed ride its final fare: ``fare`` as stored with its ``complete``
        event (read from there when not given). Idempotent; failures are kept as failed
        payments. Returns the payment, or None if the charge could not run now (Postgres
        down): the settlement sweep retries it."""
        if fare is None:
            fare_data = (await self._event_data(ride.ride_id, TripEvent.COMPLETE)).get("fare")
            if fare_data is None:
                log.error("ride %s completed without a stored fare; not charged", ride.ride_id)
                return None
            fare = fare_from_json(fare_data)
        try:
            return await self.payments.charge_ride(
                ride.ride_id,
                fare=fare,
                rules=self.fares.for_class(ride.vehicle_class),
                method=ride.payment_method,
                idempotency_key=charge_key(ride.ride_id),
            )
        except Unavailable:
            log.warning("ride %s: charge deferred, Postgres unavailable", ride.ride_id)
            return None

    async def settle_unpaid(self, limit: int = 100) -> int:
        """Charge completed rides that have no charge yet (an edge died between the two)."""
        done = 0
        for ride in await self.rides.completed_without_charge(older_than_s=10.0, limit=limit):
            if await self.settle(ride) is not None:
                done += 1
        return done

    async def expire_lost(self, grace_s: float = 60.0, limit: int = 100) -> int:
        """Expire rides still open in Postgres well past their maximum wait.

        A shard expires its own requests and records it; a ride it never held (the edge
        that stored it died before handing it over, and nobody retried) would otherwise
        stay open forever. Returns how many were expired (their riders are told).
        """
        done = 0
        for ride_id in await self.rides.open_requested_before(self.matching.max_wait_s + grace_s, limit):
            try:
                ride = await self.rides.transition(
                    ride_id,
                    TripEvent.EXPIRE,
                    ActorRole.SYSTEM,
                    "edge",
                    data={"reason": "not_matched_in_time", "swept": True},
                )
            except Conflict:
                continue  # it moved on meanwhile
            done += 1
            log.warning("ride %s was still open past its maximum wait: expired", ride.ride_id)
            await self.publish("rider", ride.rider_id, self._status_message(ride, reason="no_driver_found"))
        return done

    # -- cancellation -------------------------------------------------------------------------

    async def cancel(
        self, principal: Principal, ride_id: str, reason: str | None = None
    ) -> tuple[Ride, dict[str, Any]]:
        """Cancel as the rider, the driver (of an accepted ride) or support (an admin).

        The fee follows the region's cancellation policy (rider only, after the free
        window or once the driver has arrived) and is charged at once. Returns the ride
        and ``{"fee": ..., "payment": ...}``.
        """
        if reason is not None and not (isinstance(reason, str) and len(reason) <= 200):
            raise InvalidInput("reason must be a string of at most 200 characters")
        if principal.role is Role.RIDER:
            role = ActorRole.RIDER
        elif principal.role is Role.DRIVER:
            role = ActorRole.DRIVER
        elif principal.role is Role.ADMIN:
            role = ActorRole.SUPPORT
        else:
            raise Forbidden(f"a {principal.role.value} cannot cancel rides")
        for _attempt in range(3):
            ride = await self._load(ride_id)
            self.check_access(principal, ride)
            before = ride.status
            now = time.time()
            rules = self.fares.for_class(ride.vehicle_class)
            fee = self.policy.fee(
                before,
                role,
                now,
                rules.cancellation_fee_cents,
                accepted_at=_epoch(ride.accepted_at),
                arrived_at=_epoch(ride.arrived_at),
                promised_pickup_at=await self._promised_pickup(ride),
            )
            data = {"reason": reason, "fee_reason": fee.reason.value, "cancel_fee_cents": fee.fee_cents}
            try:
                ride = await self.rides.transition(
                    ride.ride_id,
                    TripEvent.CANCEL,
                    role,
                    principal.sub,
                    expected_version=ride.version,
                    driver_id=principal.driver_id,
                    data=data,
                )
                break
            except Conflict as exc:
                if isinstance(exc, IllegalTransition) or "current_version" not in exc.detail:
                    raise
                continue  # the ride moved while we decided the fee: decide again
        else:
            raise Conflict(f"ride {ride_id} keeps changing; try again", ride_id=str(ride_id))
        self.counters["cancelled"] += 1
        # The shard lets go: an open request leaves its queue (and its offer is withdrawn),
        # an accepted driver is free again.
        if before in (RideStatus.REQUESTED, RideStatus.OFFERED):
            try:
                await shard_call(self._shard(ride.shard_id).cancel_ride.remote(ride.ride_id))
            except NotFound:
                pass  # the shard no longer holds it (a racing accept frees the driver itself)
            except DispatchError as exc:
                log.warning(
                    "shard %s did not take the cancel of %s: %s", ride.shard_id, ride.ride_id, exc.message
                )
        elif ride.driver_id is not None:
            await self._free_driver(ride.shard_id, ride.driver_id)
        fee_out = {"charged": fee.charged, "fee_cents": fee.fee_cents, "reason": fee.reason.value}
        extra: dict[str, Any] = {"cancelled_by": role.value, "fee": fee_out}
        if fee.charged:
            try:
                p = await self.payments.charge_cancellation_fee(
                    ride.ride_id, rules=rules, idempotency_key=fee_key(ride.ride_id)
                )
                extra["payment"] = {"status": p.status, "failure_reason": p.failure_reason}
            except Unavailable:
                log.warning("ride %s: cancellation fee deferred, Postgres unavailable", ride.ride_id)
        message = self._status_message(ride, cancelled_by=role.value, reason=reason)
        await self.publish("rider", ride.rider_id, message)
        if ride.driver_id is not None and role is not ActorRole.DRIVER:
            await self.publish("driver", ride.driver_id, message)
        return ride, extra

    async def _promised_pickup(self, ride: Ride) -> float | None:
        """When the driver was due at the pickup: acceptance plus the offered ETA, if known."""
        if ride.accepted_at is None or ride.status is not RideStatus.ACCEPTED:
            return None
        eta = (await self._event_data(ride.ride_id, TripEvent.ACCEPT)).get("pickup_eta_s")
        return ride.accepted_at.timestamp() + float(eta) if isinstance(eta, int | float) else None

    # -- reading money ------------------------------------------------------------------------

    async def receipt(self, principal: Principal, ride_id: str) -> dict[str, Any]:
        ride = await self._load(ride_id)
        self.check_access(principal, ride)
        out = await self.payments.receipt(ride.ride_id)
        out["driver_id"] = f"drv-{ride.driver_id}" if ride.driver_id is not None else None
        out["distance_m"] = ride.distance_m
        out["duration_s"] = ride.duration_s
        out["surge_multiplier"] = ride.surge_multiplier
        out["quote_id"] = ride.quote_id
        out["payment_method"] = ride.payment_method
        if principal.role is not Role.ADMIN:
            # Riders and drivers see their money, not the platform's book-keeping accounts.
            mine = {"rider": f"rider:{ride.rider_id}", "driver": f"driver:{ride.driver_id}"}
            own = mine.get(principal.role.value)
            out["ledger"] = [line for line in out["ledger"] if line["account"] == own]
        return out


def utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, UTC)
