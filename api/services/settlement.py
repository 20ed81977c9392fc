"""Money of rides: the fare charge at completion, the cancellation fee, the unpaid sweep.

Every charge runs under a key derived from the ride (:func:`~api.services.values.charge_key`,
:func:`~api.services.values.fee_key`), so a retry, a racing edge or the sweep after a crash
can never charge a ride twice. A charge that cannot run now (Postgres down) is left to the
sweep.
"""

from __future__ import annotations

import logging

from api.services.values import charge_key, fare_from_json, fee_key
from api.services.views import RideViews
from dispatch.errors import Unavailable
from dispatch.pricing import FareBreakdown, FareSchedule
from dispatch.trips import TripEvent
from storage.payments import Payment, PaymentStore
from storage.rides import Ride, RideStore

log = logging.getLogger("dispatch.rides")


class Settlement:
    def __init__(
        self, rides: RideStore, payments: PaymentStore, views: RideViews, fares: FareSchedule
    ) -> None:
        self.rides = rides
        self.payments = payments
        self.views = views
        self.fares = fares

    async def settle(self, ride: Ride, fare: FareBreakdown | None = None) -> Payment | None:
        """Charge a completed ride its final fare: ``fare`` as stored with its ``complete``
        event (read from there when not given). Idempotent; failures are kept as failed
        payments. Returns the payment, or None if the charge could not run now (Postgres
        down): the settlement sweep retries it."""
        if fare is None:
            fare_data = (await self.views.event_data(ride.ride_id, TripEvent.COMPLETE)).get("fare")
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

    async def charge_cancellation_fee(self, ride: Ride) -> Payment | None:
        """Charge the class's cancellation fee (once per ride); None when Postgres is down."""
        try:
            return await self.payments.charge_cancellation_fee(
                ride.ride_id,
                rules=self.fares.for_class(ride.vehicle_class),
                idempotency_key=fee_key(ride.ride_id),
            )
        except Unavailable:
            log.warning("ride %s: cancellation fee deferred, Postgres unavailable", ride.ride_id)
            return None

    async def settle_unpaid(self, limit: int = 100) -> int:
        """Charge completed rides that have no charge yet (an edge died between the two)."""
        done = 0
        for ride in await self.rides.completed_without_charge(older_than_s=10.0, limit=limit):
            if await self.settle(ride) is not None:
                done += 1
        return done
