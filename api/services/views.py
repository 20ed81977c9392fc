"""Rides, lists and receipts as clients see them, and who may see or act on what.

Authorization lives here, not in storage: a rider sees only its own rides, a driver only
the ride it drives, an admin every ride; anyone else is told the ride does not exist
(whether it does is not theirs to know). A driver acts only as itself
(:func:`acting_driver`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from api.auth import Principal, Role
from api.services.values import no_ride
from dispatch.errors import Forbidden
from storage.payments import PaymentStore
from storage.rides import HISTORY_FIELDS, Ride, RideStore


def acting_driver(principal: Principal) -> int:
    """The caller's driver id: Forbidden for anyone who is not a driver."""
    if principal.role is not Role.DRIVER or principal.driver_id is None:
        raise Forbidden("only a driver can do this")
    return principal.driver_id


def may_see(principal: Principal, ride: Ride) -> bool:
    """A rider its rides, a driver the ride it drives, an admin all."""
    if principal.role is Role.ADMIN:
        return True
    if principal.role is Role.RIDER:
        return ride.rider_id == principal.sub
    if principal.role is Role.DRIVER:
        return ride.driver_id is not None and ride.driver_id == principal.driver_id
    return False


def check_access(principal: Principal, ride: Ride) -> None:
    """NotFound unless ``principal`` :func:`may_see` the ride."""
    if not may_see(principal, ride):
        raise no_ride(ride.ride_id)


class RideViews:
    """Reads of rides and their money, each checked against the caller."""

    def __init__(self, rides: RideStore, payments: PaymentStore, vehicle_classes: Sequence[str]) -> None:
        self.rides = rides
        self.payments = payments
        self.classes = tuple(vehicle_classes)

    async def load(self, ride_id: str) -> Ride:
        """The ride, unchecked (NotFound if there is none): for services that check after."""
        ride = await self.rides.get(ride_id)
        if ride is None:
            raise no_ride(ride_id)
        return ride

    async def visible(self, principal: Principal, ride_id: str) -> Ride:
        """The ride if ``principal`` may see it, else NotFound (as if there were none)."""
        ride = await self.load(ride_id)
        check_access(principal, ride)
        return ride

    async def statuses(self, principal: Principal, ride_ids: Sequence[str]) -> dict[str, Any]:
        """Status and version of each of ``ride_ids`` the caller may see, in one query (a
        resumed socket's re-read of its open rides); the others are ``unknown``, whether
        they do not exist or are someone else's."""
        seen = {r.ride_id: r for r in await self.rides.get_many(ride_ids) if may_see(principal, r)}
        return {
            "rides": [
                {"ride_id": r.ride_id, "status": r.status.value, "version": r.version} for r in seen.values()
            ],
            "unknown": [i for i in dict.fromkeys(ride_ids) if i not in seen],
        }

    async def get(self, principal: Principal, ride_id: str) -> dict[str, Any]:
        return await self.view_of(principal, await self.load(ride_id))

    async def view_of(self, principal: Principal, ride: Ride) -> dict[str, Any]:
        """:meth:`get` of a ride already in hand (one transition returned): only its history
        is read."""
        check_access(principal, ride)
        return self.view(ride, await self.rides.events(ride.ride_id))

    def view(self, ride: Ride, events: list[dict[str, Any]] | None) -> dict[str, Any]:
        """The ride as clients see it: class names, public driver ids, its history."""
        out = ride.to_json()
        out["vehicle_class"] = (
            self.classes[ride.vehicle_class] if ride.vehicle_class < len(self.classes) else None
        )
        out["driver_id"] = f"drv-{ride.driver_id}" if ride.driver_id is not None else None
        if events is not None:
            out["events"] = [{k: e[k] for k in HISTORY_FIELDS} for e in events]
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

    async def receipt(self, principal: Principal, ride_id: str) -> dict[str, Any]:
        """The ride's money; riders and drivers see their own ledger lines, admins all."""
        ride = await self.visible(principal, ride_id)
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

    async def event_data(self, ride_id: str, event: str) -> dict[str, Any]:
        """The data stored with the ride's latest applied ``event`` ({} if none)."""
        for e in reversed(await self.rides.events(ride_id)):
            if e["event"] == event and e["applied"]:
                return e.get("data") or {}
        return {}
