"""The trip: the driver's steps (arrived, start, complete), cancellation, and the sweeps
that end rides nobody else will end (requests lost between edge and shard, trips whose
driver was lost).

Every step is written to Postgres (versioned, with its event row) before it is answered
or announced; the rider hears of it on its channel. Completion decides the final fare
(:func:`dispatch.fares.decide_final_fare`) on the distance the shard metered on the
driver's positions and the time since pickup, stores it with the ``complete`` event, and
hands it to :class:`~api.services.settlement.Settlement`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from api.auth import Principal, Role
from api.services.ports import Publisher, RideShards
from api.services.quotes import DETOUR_FACTOR
from api.services.requests import free_driver, status_message
from api.services.settlement import Settlement
from api.services.values import RideCounters, fare_json, no_ride, quote_breakdown
from api.services.views import RideViews, acting_driver, check_access
from dispatch.errors import Conflict, DispatchError, Forbidden, IllegalTransition, InvalidInput, NotFound
from dispatch.fares import ORPHANABLE, FinalFare, decide_final_fare, orphan_charge, trip_measure
from dispatch.pricing import FareSchedule
from dispatch.trips import ActorRole, CancellationPolicy, RideStatus, TripEvent
from dispatch.vocabulary import StatusReason
from storage.quotes import QuoteStore
from storage.rides import Ride, RideStore

log = logging.getLogger("dispatch.rides")

#: the steps a driver reports
DRIVER_STEPS = (TripEvent.ARRIVE, TripEvent.START, TripEvent.COMPLETE)


def _epoch(dt: datetime | None) -> float | None:
    return dt.timestamp() if dt is not None else None


class Trips:
    """The trip's steps, its cancellation and the sweeps that end abandoned rides."""

    def __init__(
        self,
        rides: RideStore,
        quotes: QuoteStore,
        views: RideViews,
        shards: RideShards,
        publisher: Publisher,
        settlement: Settlement,
        *,
        fares: FareSchedule,
        policy: CancellationPolicy,
        pickup_speed_mps: float,
        max_wait_s: float,
        orphan_after_s: float,
        counters: RideCounters,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.rides = rides
        self.quotes = quotes
        self.views = views
        self.shards = shards
        self.publisher = publisher
        self.settlement = settlement
        self.fares = fares
        self.policy = policy
        self.pickup_speed_mps = pickup_speed_mps
        self.max_wait_s = max_wait_s
        self.orphan_after_s = orphan_after_s
        self.counters = counters
        self.clock = clock

    # -- the driver's steps ---------------------------------------------------------------

    async def _odometer(self, driver_id: int, ride_id: str, shard_id: int) -> float | None:
        """The shards' odometer of the driver on ``ride_id`` (metres), None if unknown.
        The ride's shard is asked first: most trips stay in the shard they began in."""
        try:
            held = await self.shards.find_driver(driver_id, hint=shard_id)
        except DispatchError as exc:
            log.warning("could not read driver %s's odometer: %s", driver_id, exc.message)
            return None
        trip = (held[1].get("trip") or {}) if held is not None else {}
        return float(trip["odometer_m"]) if trip.get("ride_id") == ride_id else None

    async def advance(
        self, principal: Principal, ride_id: str, event: TripEvent
    ) -> tuple[Ride, dict[str, Any]]:
        """The driver reports ``arrive``, ``start`` or ``complete``; the ride after it and
        what the driver is told beyond the status (the fare and payment on completion).
        NotFound unless the caller drives this ride."""
        driver_id = acting_driver(principal)
        if event not in DRIVER_STEPS:
            raise InvalidInput(f"a driver cannot report {event.value!r} here")
        ride = await self.views.load(ride_id)
        if ride.driver_id != driver_id:
            raise no_ride(ride_id)
        extra: dict[str, Any] = {}
        data: dict[str, Any] = {}
        final: FinalFare | None = None
        if event is TripEvent.START:
            odo = await self._odometer(driver_id, ride.ride_id, int(ride.shard_id))
            if odo is not None:
                data["odometer_m"] = odo
        elif event is TripEvent.COMPLETE:
            final = await self._final_fare(ride, driver_id)
            # The ride keeps what was driven; the fare, what it was priced on (the quote's
            # estimate when the quote is honoured).
            extra["fare"] = fare_json(final.fare)
            data = {
                "final_fare_cents": final.fare.total_cents,
                "distance_m": round(final.measure.distance_m, 1),
                "duration_s": round(final.measure.duration_s, 1),
                "distance_source": final.measure.source.value,
                "fare": extra["fare"],
            }
        ride = await self.rides.transition(
            ride.ride_id,
            event,
            ActorRole.DRIVER,
            principal.sub,
            driver_id=driver_id,
            expected_version=ride.version,
            data=data,
            seen=ride,
        )
        if final is not None:
            self.counters.add("completed")
            await free_driver(self.shards, ride.shard_id, driver_id)
            payment = await self.settlement.settle(ride, final.fare)
            if payment is not None:
                extra["payment"] = {
                    "status": payment.status,
                    "method": payment.method,
                    "failure_reason": payment.failure_reason,
                }
        await self.publisher.publish("rider", ride.rider_id, status_message(ride, **extra))
        return ride, extra

    async def _final_fare(self, ride: Ride, driver_id: int) -> FinalFare:
        start_odo = (await self.views.event_data(ride.ride_id, TripEvent.START)).get("odometer_m")
        now_odo = await self._odometer(driver_id, ride.ride_id, int(ride.shard_id))
        measure = trip_measure(
            pickup=(ride.pickup_lat, ride.pickup_lng),
            dropoff=(ride.dropoff_lat, ride.dropoff_lng),
            start_odometer_m=start_odo,
            end_odometer_m=now_odo,
            started_at=_epoch(ride.started_at),
            now=self.clock(),
            speed_mps=self.pickup_speed_mps,
            detour_factor=DETOUR_FACTOR,
        )
        if measure.source != "odometer":
            log.warning("ride %s: no odometer from the shards; charging the estimated distance", ride.ride_id)
        quote = None
        if ride.quote_id is not None:
            stored = await self.quotes.get(ride.quote_id)
            quote = quote_breakdown(stored) if stored is not None else None
        return decide_final_fare(
            self.fares.for_class(ride.vehicle_class), quote, measure, float(ride.surge_multiplier)
        )

    # -- cancellation ---------------------------------------------------------------------

    async def cancel(
        self, principal: Principal, ride_id: str, reason: str | None = None
    ) -> tuple[Ride, dict[str, Any]]:
        """Cancel as the rider, the driver (of an accepted ride) or support (an admin).

        The fee follows the region's cancellation policy (rider only, after the free
        window or once the driver has arrived) and is charged at once. Returns the ride
        and ``{"cancelled_by", "fee", "payment"}``. NotFound for a ride the caller may
        not see; IllegalTransition when its status does not allow it.
        """
        if reason is not None and len(reason) > 200:
            raise InvalidInput("reason must be a string of at most 200 characters")
        role = {
            Role.RIDER: ActorRole.RIDER,
            Role.DRIVER: ActorRole.DRIVER,
            Role.ADMIN: ActorRole.SUPPORT,
        }.get(principal.role)
        if role is None:
            raise Forbidden(f"a {principal.role.value} cannot cancel rides")
        for _attempt in range(3):
            ride = await self.views.load(ride_id)
            check_access(principal, ride)
            before = ride.status
            rules = self.fares.for_class(ride.vehicle_class)
            fee = self.policy.fee(
                before,
                role,
                self.clock(),
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
        self.counters.add("cancelled")
        await self._let_go(ride, before)
        fee_out = {"charged": fee.charged, "fee_cents": fee.fee_cents, "reason": fee.reason.value}
        extra: dict[str, Any] = {"cancelled_by": role.value, "fee": fee_out}
        if fee.charged:
            p = await self.settlement.charge_cancellation_fee(ride)
            if p is not None:
                extra["payment"] = {"status": p.status, "failure_reason": p.failure_reason}
        message = status_message(ride, cancelled_by=role.value, reason=reason)
        await self.publisher.publish("rider", ride.rider_id, message)
        if ride.driver_id is not None and role is not ActorRole.DRIVER:
            await self.publisher.publish("driver", ride.driver_id, message)
        return ride, extra

    async def _let_go(self, ride: Ride, before: RideStatus) -> None:
        """The shard lets go of a cancelled ride: an open request leaves its queue (and its
        offer is withdrawn), an accepted driver is free again."""
        if before in (RideStatus.REQUESTED, RideStatus.OFFERED):
            try:
                await self.shards.cancel_ride(int(ride.shard_id), ride.ride_id)
            except NotFound:
                pass  # the shard no longer holds it (a racing accept frees the driver itself)
            except DispatchError as exc:
                log.warning(
                    "shard %s did not take the cancel of %s: %s", ride.shard_id, ride.ride_id, exc.message
                )
        elif ride.driver_id is not None:
            await free_driver(self.shards, ride.shard_id, ride.driver_id)

    async def _promised_pickup(self, ride: Ride) -> float | None:
        """When the driver was due at the pickup: acceptance plus the offered ETA, if known."""
        if ride.accepted_at is None or ride.status is not RideStatus.ACCEPTED:
            return None
        eta = (await self.views.event_data(ride.ride_id, TripEvent.ACCEPT)).get("pickup_eta_s")
        return ride.accepted_at.timestamp() + float(eta) if isinstance(eta, int | float) else None

    # -- sweeps -----------------------------------------------------------------------------

    async def expire_lost(self, grace_s: float = 60.0, limit: int = 100) -> int:
        """Expire rides still open in Postgres well past their maximum wait.

        A shard expires its own requests and records it; a ride it never held (the edge
        that stored it died before handing it over, and nobody retried) would otherwise
        stay open forever. Returns how many were expired (their riders are told).
        """
        done = 0
        for ride_id in await self.rides.open_requested_before(self.max_wait_s + grace_s, limit):
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
            await self.publisher.publish(
                "rider", ride.rider_id, status_message(ride, reason=StatusReason.NO_DRIVER_FOUND)
            )
        return done

    def _silent_for(self, held: tuple[int, dict[str, Any]] | None, now: float) -> float | None:
        """How long a driver (its shard's row, None when no shard holds it) has been
        silent (s), or None when it reported within the limit. A driver no shard holds
        has been silent at least the limit (the shards drop a driver silent for
        ``[drivers] evict_after_s``)."""
        if held is None:
            return self.orphan_after_s
        ts = held[1].get("ts")
        if not isinstance(ts, int | float):
            return self.orphan_after_s
        silent = now - float(ts)
        return silent if silent >= self.orphan_after_s else None

    async def end_orphans(self, limit: int = 100) -> int:
        """End trips whose driver has been silent past ``[trips] orphan_after_s``.

        A ride accepted, arrived or in progress whose driver's app or edge died would
        otherwise stay open forever. The server cancels it (``cancel_by`` system, reason
        ``driver_lost``), tells the rider and the driver, frees the driver at its shard if
        one still holds it, and charges nothing (:func:`dispatch.fares.orphan_charge`).
        Only rides unchanged for the limit are asked about; a shard that cannot be asked
        now leaves the ride for the next round. Returns how many were ended.
        """
        done = 0
        now = self.clock()
        idle = [
            r
            for r in await self.rides.active_trips_idle(self.orphan_after_s, limit)
            if r.driver_id is not None and r.status in ORPHANABLE
        ]
        if not idle:
            return 0
        try:
            held = await self.shards.find_drivers([int(r.driver_id) for r in idle if r.driver_id is not None])
        except DispatchError as exc:
            log.warning("could not ask the shards about %d idle trips' drivers: %s", len(idle), exc.message)
            return 0
        for ride in idle:
            assert ride.driver_id is not None
            if int(ride.driver_id) not in held:
                log.warning("a shard that may hold driver %s did not answer: left for later", ride.driver_id)
                continue
            silent_s = self._silent_for(held[int(ride.driver_id)], now)
            if silent_s is None:
                continue
            charge = orphan_charge(ride.status)
            data = {
                "reason": StatusReason.DRIVER_LOST.value,
                "silent_s": round(silent_s, 1),
                "status_before": ride.status.value,
                "cancel_fee_cents": charge,
            }
            try:
                ended = await self.rides.transition(
                    ride.ride_id,
                    TripEvent.CANCEL,
                    ActorRole.SYSTEM,
                    "edge",
                    expected_version=ride.version,
                    data=data,
                    seen=ride,
                )
            except Conflict:
                continue  # the driver came back and moved it, or someone cancelled: fine
            done += 1
            self.counters.add("orphaned")
            log.warning(
                "ride %s: driver %s silent for %.0f s while %s; ended by the server",
                ride.ride_id,
                ride.driver_id,
                silent_s,
                ride.status.value,
            )
            await free_driver(self.shards, ended.shard_id, ride.driver_id)
            message = status_message(
                ended, cancelled_by=ActorRole.SYSTEM.value, reason=StatusReason.DRIVER_LOST, fee_cents=charge
            )
            await self.publisher.publish("rider", ended.rider_id, message)
            await self.publisher.publish("driver", ride.driver_id, message)
        return done
