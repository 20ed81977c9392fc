"""The typed inputs of the ride services and the small values they share.

The routes build these from their pydantic models (validated there, once); the socket
builds them from frames it has checked. The services trust them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dispatch.errors import NotFound
from dispatch.pricing import FareBasis, FareBreakdown
from storage.quotes import StoredQuote


@dataclass(frozen=True, slots=True)
class Point:
    """A position already checked finite and in range (at the boundary)."""

    lat: float
    lng: float

    def pair(self) -> tuple[float, float]:
        return (self.lat, self.lng)


@dataclass(frozen=True, slots=True)
class QuoteInput:
    rider_id: str
    pickup: Point
    dropoff: Point
    vehicle_class: str


@dataclass(frozen=True, slots=True)
class RideRequestInput:
    rider_id: str
    pickup: Point
    dropoff: Point
    vehicle_class: str
    quote_id: str | None
    payment_method: str
    idempotency_key: str
    #: what makes two requests with one key "the same request" (computed at the API
    #: boundary from the request as it arrived, see api/ride_routes.py)
    fingerprint: str


@dataclass(slots=True)
class RideCounters:
    """Ride steps taken through this edge (exported as ``dispatch_rides{step}``)."""

    steps: dict[str, int] = field(
        default_factory=lambda: {
            "requested": 0,
            "accepted": 0,
            "completed": 0,
            "cancelled": 0,
            "refused_busy": 0,
            "orphaned": 0,
        }
    )

    def add(self, step: str, n: int = 1) -> None:
        self.steps[step] = self.steps.get(step, 0) + n


def no_ride(ride_id: str) -> NotFound:
    """The one answer for a ride that does not exist or is not the caller's to know of."""
    return NotFound(f"no ride {ride_id!r}", ride_id=str(ride_id))


def charge_key(ride_id: str) -> str:
    """The idempotency key of a ride's fare charge: one per ride, whoever triggers it."""
    return f"ride-charge-{ride_id}"


def fee_key(ride_id: str) -> str:
    return f"ride-cancel-fee-{ride_id}"


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
