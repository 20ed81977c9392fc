"""In-memory stand-ins for the ride services' dependencies: a ride store that runs the
real trip state machine, payments that record charges, shards and a publisher that
remember what they were asked. For unit tests of api/services only."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from dispatch.errors import Conflict, IdempotencyMismatch, NotFound, OfferUnavailable
from dispatch.trips import ActorRole, RideStatus, TripEvent, next_status
from storage.rides import Ride

_TIME = {
    RideStatus.ACCEPTED: "accepted_at",
    RideStatus.ARRIVED: "arrived_at",
    RideStatus.IN_PROGRESS: "started_at",
    RideStatus.COMPLETED: "completed_at",
    RideStatus.CANCELLED: "cancelled_at",
    RideStatus.EXPIRED: "expired_at",
}


class FakeRideStore:
    def __init__(self) -> None:
        self.rides: dict[str, Ride] = {}
        self.history: dict[str, list[dict[str, Any]]] = {}
        self.keys: dict[tuple[str, str], tuple[str, str]] = {}

    async def create_ride(
        self,
        *,
        rider_id,
        region,
        shard_id,
        vehicle_class,
        pickup,
        dropoff,
        surge_multiplier,
        fare_estimate_cents,
        currency,
        quote_id=None,
        idempotency_key=None,
        fingerprint=None,
        payment_method="wallet",
    ):
        if idempotency_key is not None and (rider_id, idempotency_key) in self.keys:
            ride_id, fp = self.keys[(rider_id, idempotency_key)]
            if fp != fingerprint:
                raise IdempotencyMismatch("other request", ride_id=ride_id)
            return self.rides[ride_id], False
        now = datetime.now(UTC)
        ride = Ride(
            ride_id=str(uuid.uuid4()),
            rider_id=rider_id,
            driver_id=None,
            region=region,
            shard_id=shard_id,
            vehicle_class=vehicle_class,
            pickup_lat=pickup[0],
            pickup_lng=pickup[1],
            dropoff_lat=dropoff[0],
            dropoff_lng=dropoff[1],
            status=RideStatus.REQUESTED,
            version=1,
            quote_id=quote_id,
            surge_multiplier=surge_multiplier,
            fare_estimate_cents=fare_estimate_cents,
            currency=currency,
            final_fare_cents=None,
            distance_m=None,
            duration_s=None,
            cancel_by=None,
            cancel_fee_cents=None,
            requested_at=now,
            accepted_at=None,
            arrived_at=None,
            started_at=None,
            completed_at=None,
            cancelled_at=None,
            expired_at=None,
            updated_at=now,
            payment_method=payment_method,
        )
        self.rides[ride.ride_id] = ride
        self.history[ride.ride_id] = [self._event(ride, "request", "rider", {})]
        if idempotency_key is not None:
            self.keys[(rider_id, idempotency_key)] = (ride.ride_id, fingerprint)
        return ride, True

    @staticmethod
    def _event(ride: Ride, event: str, role: str, data: dict) -> dict[str, Any]:
        return {
            "version": ride.version,
            "event": event,
            "status": ride.status.value,
            "applied": True,
            "actor_role": role,
            "at": ride.updated_at.isoformat(),
            "data": data,
        }

    async def get(self, ride_id: str) -> Ride | None:
        return self.rides.get(ride_id)

    async def events(self, ride_id: str) -> list[dict[str, Any]]:
        return list(self.history.get(ride_id, []))

    async def rides_of_rider(self, rider_id: str, limit: int) -> list[Ride]:
        return [r for r in self.rides.values() if r.rider_id == rider_id][:limit]

    async def transition(
        self,
        ride_id,
        event,
        role,
        actor_id,
        *,
        expected_version=None,
        driver_id=None,
        data=None,
        offer_pending=False,
        seen=None,
        history=None,
    ) -> Ride:
        ride = self.rides.get(ride_id)
        if ride is None:
            raise NotFound(f"no ride {ride_id}")
        if expected_version is not None and ride.version != expected_version:
            raise Conflict("moved", current_version=ride.version, status=ride.status.value)
        ev, rl = TripEvent(event), ActorRole(role)
        if rl is ActorRole.DRIVER:
            pre = ride.driver_id is None and ev in (TripEvent.ACCEPT, TripEvent.OFFER_DECLINED)
            if not pre and ride.driver_id != driver_id:
                raise Conflict("other driver", reason="other_driver")
        if offer_pending and ev is TripEvent.ACCEPT and ride.status is RideStatus.REQUESTED:
            ride = self._apply(ride, TripEvent.OFFER, ActorRole.SYSTEM, {})
        ride = self._apply(ride, ev, rl, data or {}, driver_id)
        if history is not None:
            history[:] = await self.events(ride_id)
        return ride

    def _apply(self, ride: Ride, ev: TripEvent, rl: ActorRole, data: dict, driver_id=None) -> Ride:
        target = next_status(ride.status, ev, rl)
        now = datetime.now(UTC)
        changes: dict[str, Any] = {"status": target, "version": ride.version + 1, "updated_at": now}
        if target in _TIME:
            changes[_TIME[target]] = now
        if ev is TripEvent.ACCEPT:
            changes["driver_id"] = driver_id
        if ev is TripEvent.COMPLETE:
            changes.update(
                final_fare_cents=data.get("final_fare_cents"),
                distance_m=data.get("distance_m"),
                duration_s=data.get("duration_s"),
            )
        if ev is TripEvent.CANCEL:
            changes.update(cancel_by=rl.value, cancel_fee_cents=data.get("cancel_fee_cents"))
        ride = replace(ride, **changes)
        self.rides[ride.ride_id] = ride
        self.history[ride.ride_id].append(self._event(ride, ev.value, rl.value, data))
        return ride

    async def completed_without_charge(self, older_than_s: float, limit: int = 100) -> list[Ride]:
        return []

    async def open_requested_before(self, age_s: float, limit: int = 100) -> list[str]:
        return []

    async def active_trips_idle(self, age_s: float, limit: int = 100) -> list[Ride]:
        active = (RideStatus.ACCEPTED, RideStatus.ARRIVED, RideStatus.IN_PROGRESS)
        return [r for r in self.rides.values() if r.status in active][:limit]


class FakePayment:
    def __init__(self, kind: str, ride_id: str, amount_cents: int, method: str) -> None:
        self.kind, self.ride_id, self.amount_cents, self.method = kind, ride_id, amount_cents, method
        self.status, self.failure_reason = "succeeded", None


class FakePayments:
    class provider:  # noqa: N801 - stands in for an attribute
        methods = ("wallet", "cash")

    def __init__(self) -> None:
        self.by_key: dict[str, FakePayment] = {}

    async def charge_ride(self, ride_id, *, fare, rules, method, idempotency_key):
        if idempotency_key not in self.by_key:
            self.by_key[idempotency_key] = FakePayment("charge", ride_id, fare.total_cents, method)
        return self.by_key[idempotency_key]

    async def charge_cancellation_fee(self, ride_id, *, rules, idempotency_key):
        if idempotency_key not in self.by_key:
            fee = rules.cancellation_fee_cents
            self.by_key[idempotency_key] = FakePayment("cancellation_fee", ride_id, fee, "wallet")
        return self.by_key[idempotency_key]

    async def receipt(self, ride_id: str) -> dict[str, Any]:
        return {"ride_id": ride_id, "ledger": [], "payments": []}


class FakeQuoteStore:
    async def save(self, rider_id, region, pickup, dropoff, quote):
        raise NotImplementedError

    async def get(self, quote_id):
        return None


class FakeShards:
    """Shards that offer every ride to ``offered_to`` and remember their calls."""

    def __init__(self) -> None:
        self.queued: dict[str, dict] = {}
        self.offers: dict[str, int] = {}  # offer id -> driver
        self.freed: list[int] = []
        self.cancelled: list[str] = []
        self.reopened: list[str] = []
        self.held: dict[int, dict] = {}  # driver id -> the row find_driver answers
        self.asked: list[int] = []  # the shard each accept and decline went to

    def offer(self, ride_id: str, driver_id: int, shard_id: int | None = None) -> str:
        """An open offer; its id names ``shard_id`` as a shard actor's do (else no shard)."""
        offer_id = f"{ride_id}:1" if shard_id is None else f"{ride_id}:{shard_id}.inc-1"
        self.offers[offer_id] = driver_id
        return offer_id

    async def hand_over(self, shard_id: int, request: dict, *, reopen: bool = False) -> None:
        self.queued[request["ride_id"]] = request
        if reopen:
            self.reopened.append(request["ride_id"])

    async def accept(self, shard_id: int, offer_id: str, driver_id: int) -> dict:
        from dispatch.errors import Forbidden

        self.asked.append(shard_id)
        if offer_id not in self.offers:
            raise OfferUnavailable(f"offer {offer_id} is gone")
        if self.offers[offer_id] != driver_id:
            raise Forbidden(f"offer {offer_id!r} was not made to driver {driver_id}")
        del self.offers[offer_id]
        return {"pickup_eta_s": 120.0}

    async def decline(self, shard_id: int, offer_id: str, driver_id: int) -> None:
        from dispatch.errors import Forbidden

        self.asked.append(shard_id)
        if self.offers.get(offer_id) != driver_id:
            raise Forbidden("not yours")
        del self.offers[offer_id]

    async def trip_ended(self, shard_id: int, driver_id: int) -> None:
        self.freed.append(driver_id)

    async def cancel_ride(self, shard_id: int, ride_id: str) -> None:
        self.cancelled.append(ride_id)

    async def find_driver(self, driver_id: int, hint: int | None = None):
        row = self.held.get(driver_id)
        return (0, row) if row is not None else None

    async def find_drivers(self, driver_ids):
        return {d: await self.find_driver(d) for d in driver_ids}


class FakePublisher:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str | int, dict]] = []

    async def publish(self, audience: str, ident, message: dict) -> None:
        self.sent.append((audience, ident, message))

    def to(self, audience: str, ident) -> list[dict]:
        return [m for a, i, m in self.sent if (a, i) == (audience, ident)]
