"""Ride requests, their handoff to the shards, and the driver's answers to offers.

A ride is stored before the rider hears of it, then handed to its pickup's shard. A
handoff that fails (the shard is down or slow) is kept and retried by
:meth:`RideRequests.retry_handoffs`; the rider already has its answer.

An accept is taken by the ride's shard first (one accept of an offer wins) and then
written to Postgres; if Postgres refuses it (the rider cancelled a moment before) the
shard frees the driver again, so a ride is never assigned twice and a driver never
stays on a ride that is gone.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

from api.auth import Principal
from api.services.ports import Publisher, RideShards
from api.services.quotes import Quotes
from api.services.values import RideCounters, RideRequestInput
from api.services.views import RideViews, acting_driver
from dispatch.errors import (
    Conflict,
    DispatchError,
    Forbidden,
    IllegalTransition,
    InvalidInput,
    NotFound,
    OfferUnavailable,
    Unavailable,
)
from dispatch.rides import offer_shard
from dispatch.trips import ActorRole, RideStatus, TripEvent
from dispatch.vocabulary import MessageType
from storage.payments import METHODS
from storage.rides import Ride, RideStore

log = logging.getLogger("dispatch.rides")


def status_message(ride: Ride, **extra: object) -> dict[str, object]:
    """The ``ride_status`` message of ``ride`` as it is now, with ``extra`` fields."""
    return {
        "type": MessageType.RIDE_STATUS,
        "ride_id": ride.ride_id,
        "status": ride.status.value,
        "version": ride.version,
        **extra,
    }


async def free_driver(shards: RideShards, shard_id: int, driver_id: int) -> None:
    """Tell the shard the driver's trip is over; logged, never raised (the shard's own
    staleness rules catch a driver it keeps by mistake)."""
    try:
        await shards.trip_ended(int(shard_id), driver_id)
    except DispatchError as exc:
        log.warning("could not free driver %s at shard %s: %s", driver_id, shard_id, exc.message)


class RideRequests:
    """Stores ride requests and hands them to their shards."""

    def __init__(
        self,
        rides: RideStore,
        shards: RideShards,
        quotes: Quotes,
        *,
        region_name: str,
        payment_methods: Sequence[str],
        max_in_flight: int,
        counters: RideCounters,
    ) -> None:
        self.rides = rides
        self.shards = shards
        self.quotes = quotes
        self.region_name = region_name
        self.payment_methods = tuple(payment_methods)
        self.max_in_flight = max_in_flight
        self.counters = counters
        self.in_flight = 0
        # Rides stored but not yet taken by their shard (it was down or slow): retried,
        # each read again first (None: a ride not read yet, see :meth:`reopen`).
        self.pending_handoffs: dict[str, Ride | None] = {}
        # Pending rides whose accept could not be stored: handed over to be reopened.
        self._reopen: set[str] = set()

    @contextlib.asynccontextmanager
    async def admitted(self) -> AsyncIterator[None]:
        """Hold one of the edge's ride-request slots; Unavailable (503, Retry-After) when
        all are taken. The client retries with the same Idempotency-Key."""
        if self.in_flight >= self.max_in_flight:
            self.counters.add("refused_busy")
            raise Unavailable("this edge is at capacity for ride requests; retry shortly", retry_after_s=1)
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    async def request_ride(self, req: RideRequestInput) -> tuple[Ride, bool]:
        """Store a ride (idempotent per rider and key) and hand it to its pickup's shard.
        ``(ride, created)``: a retry with the same key and request gets the ride as it is."""
        trip = self.quotes.trip(req.pickup, req.dropoff, req.vehicle_class)
        if req.payment_method not in METHODS:
            raise InvalidInput(
                f"payment_method must be one of {list(METHODS)}", payment_method=req.payment_method
            )
        if req.payment_method not in self.payment_methods:
            raise InvalidInput(
                f"this deployment's payment provider takes {list(self.payment_methods)};"
                f" {req.payment_method!r} needs a card processor",
                payment_method=req.payment_method,
            )
        rules = self.quotes.fares.for_class(trip.vehicle_class)
        if req.quote_id is None:
            est = await self.quotes.estimate(trip)
            surge, estimate = est.surge_multiplier, est.total_cents
        else:
            surge, estimate = 1.0, 0  # the quote's figures replace these
        ride, created = await self.rides.create_ride(
            rider_id=req.rider_id,
            region=self.region_name,
            shard_id=trip.shard_id,
            vehicle_class=trip.vehicle_class,
            pickup=trip.pickup.pair(),
            dropoff=trip.dropoff.pair(),
            surge_multiplier=surge,
            fare_estimate_cents=estimate,
            currency=rules.currency,
            quote_id=req.quote_id,
            idempotency_key=req.idempotency_key,
            fingerprint=req.fingerprint,
            payment_method=req.payment_method,
        )
        if ride.status in (RideStatus.REQUESTED, RideStatus.OFFERED):
            await self.hand_to_shard(ride)
        if created:
            self.counters.add("requested")
        return ride, created

    async def hand_to_shard(self, ride: Ride, *, reopen: bool = False) -> bool:
        """Queue ``ride`` in its shard (a no-op if it is there, or if the shard already let
        it go: accepted, expired or cancelled there). ``reopen`` queues it although the
        shard let it go: its accept could not be stored. On failure the ride is kept and
        retried by :meth:`retry_handoffs`; the rider already has its answer."""
        reopen = reopen or ride.ride_id in self._reopen
        try:
            await self.shards.hand_over(int(ride.shard_id), ride.to_request(), reopen=reopen)
            self.pending_handoffs.pop(ride.ride_id, None)
            self._reopen.discard(ride.ride_id)
            return True
        except DispatchError as exc:
            log.warning("ride %s not yet taken by shard %s: %s", ride.ride_id, ride.shard_id, exc.message)
            self.pending_handoffs[ride.ride_id] = ride
            if reopen:
                self._reopen.add(ride.ride_id)
            return False

    async def reopen(self, ride_id: str, ride: Ride | None) -> None:
        """Queue again in its shard a ride whose accept the shard granted but Postgres did
        not store: now if the ride is in hand, else by :meth:`retry_handoffs`, which reads it
        once Postgres answers."""
        if ride is not None:
            await self.hand_to_shard(ride, reopen=True)
            return
        self.pending_handoffs.setdefault(ride_id, None)
        self._reopen.add(ride_id)

    async def retry_handoffs(self) -> int:
        done = 0
        for ride_id in list(self.pending_handoffs):
            fresh = await self.rides.get(ride_id)
            if fresh is None or fresh.status not in (RideStatus.REQUESTED, RideStatus.OFFERED):
                self.pending_handoffs.pop(ride_id, None)
                self._reopen.discard(ride_id)
                continue
            done += await self.hand_to_shard(fresh)
        return done


class Offers:
    """The driver's answers to offers: accept (atomic in the shard, then stored) and decline."""

    def __init__(
        self,
        rides: RideStore,
        views: RideViews,
        shards: RideShards,
        publisher: Publisher,
        requests: RideRequests,
        *,
        vehicle_classes: Sequence[str],
        shard_count: int,
        counters: RideCounters,
    ) -> None:
        self.rides = rides
        self.views = views
        self.shards = shards
        self.publisher = publisher
        self.requests = requests
        self.classes = tuple(vehicle_classes)
        self.shard_count = shard_count
        self.counters = counters

    async def _offer_of(
        self, principal: Principal, ride_id: str, offer_id: str
    ) -> tuple[int, int, Ride | None]:
        """The calling driver's id, the shard that made ``offer_id`` and, when the offer id
        does not name it (dispatch/rides.py: offer_shard), the ride read to find it; all
        checked before the shard takes anything. An offer id names its ride and, from a
        shard actor, its shard: the shard judges the offer, so no read of the ride is
        needed for it."""
        driver_id = acting_driver(principal)
        if not (isinstance(offer_id, str) and offer_id):
            raise InvalidInput("offer_id must be a non-empty string")
        shard_id = offer_shard(offer_id, ride_id)
        if shard_id is not None and shard_id < self.shard_count:
            return driver_id, shard_id, None
        ride = await self.views.load(ride_id)
        if offer_id.rpartition(":")[0] != ride.ride_id:
            raise InvalidInput(f"offer {offer_id!r} is not an offer of ride {ride.ride_id}")
        return driver_id, int(ride.shard_id), ride

    @staticmethod
    def _not_yours(offer_id: str, exc: Forbidden) -> OfferUnavailable:
        # An offer made to another driver is, to this one, an offer it cannot take: the same
        # answer whether the shard holds the caller or not, and whoever asks (REST or socket).
        return OfferUnavailable(f"offer {offer_id!r} is not available to you", offer_id=offer_id)

    async def accept(
        self,
        principal: Principal,
        ride_id: str,
        offer_id: str,
        history: list[dict[str, Any]] | None = None,
    ) -> Ride:
        """The driver takes an offer: atomic in the shard, then written to Postgres.
        ``history``, if given, is filled with the ride's history after it (RideStore.transition).

        Raises OfferUnavailable (expired, taken, declined, made to another driver),
        NotFound, Conflict when the rider cancelled meanwhile (the shard frees the driver
        again), Unavailable when Postgres is down (the shard puts the ride back in its queue).
        """
        driver_id, shard_id, seen = await self._offer_of(principal, ride_id, offer_id)
        try:
            taken = await self.shards.accept(shard_id, offer_id, driver_id)
        except Forbidden as exc:
            raise self._not_yours(offer_id, exc) from None
        eta = taken.get("pickup_eta_s")
        try:
            ride = await self.rides.transition(
                ride_id,
                TripEvent.ACCEPT,
                ActorRole.DRIVER,
                principal.sub,
                driver_id=driver_id,
                offer_pending=True,
                data={"offer_id": offer_id, "pickup_eta_s": eta},
                seen=seen,
                history=history,
            )
        except (IllegalTransition, Conflict, Forbidden, NotFound) as exc:
            # The ride moved on in Postgres (the rider cancelled): give the driver back.
            await free_driver(self.shards, shard_id, driver_id)
            raise Conflict(
                f"ride {ride_id} can no longer be accepted: {exc.message}", ride_id=ride_id
            ) from None
        except Unavailable:
            # Not stored: the shard took the ride out of its queue; put it back (a plain
            # handoff would be a no-op for a ride the shard saw accepted), now if we hold
            # the ride, else once Postgres answers again.
            await free_driver(self.shards, shard_id, driver_id)
            await self.requests.reopen(ride_id, seen)
            raise
        self.counters.add("accepted")
        driver_info = {"driver_id": principal.sub, "vehicle_class": self.classes[ride.vehicle_class]}
        await self.publisher.publish(
            "rider", ride.rider_id, status_message(ride, driver=driver_info, pickup_eta_s=eta)
        )
        return ride

    async def decline(self, principal: Principal, ride_id: str, offer_id: str) -> None:
        driver_id, shard_id, _ = await self._offer_of(principal, ride_id, offer_id)
        try:
            await self.shards.decline(shard_id, offer_id, driver_id)
        except Forbidden as exc:
            raise self._not_yours(offer_id, exc) from None
