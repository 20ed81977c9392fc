"""What a finished trip costs: the final-fare decision, Sans-I/O.

The edge gathers the facts (the quote the ride was booked on, the odometer the shard kept
on the driver's positions at pickup and at drop-off, when the trip started) and this
module decides; it reads no clock and no database, so each rule is tested in isolation.

- :func:`trip_measure` — the distance and duration a trip is priced on. The distance is
  the odometer's difference when the shard kept one across the whole trip; when it did
  not (the shard restarted mid-trip, or the driver's positions jumped), the route
  estimate between pickup and drop-off. A trip is never priced on nothing.
- :func:`decide_final_fare` — the quote honoured, or the trip re-metered at the surge
  locked at request time (:func:`dispatch.pricing.final_fare` holds the tolerance rule).
- :func:`orphan_charge` — what the rider pays when the server ends a trip whose driver
  was lost (see its docstring for the rule and why).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from dispatch.numbers import finite_or_none
from dispatch.pricing import DEFAULT_DETOUR_FACTOR, FareBreakdown, FareRules, estimate_trip, final_fare
from dispatch.trips import RideStatus


class DistanceSource(StrEnum):
    ODOMETER = "odometer"  # metered on the driver's positions
    ESTIMATE = "estimate"  # the odometer was lost: the route estimate pickup → drop-off


@dataclass(frozen=True, slots=True)
class TripMeasure:
    """The distance (m) and duration (s) a trip is priced on, and where the distance came from."""

    distance_m: float
    duration_s: float
    source: DistanceSource


@dataclass(frozen=True, slots=True)
class FinalFare:
    """The fare to charge and the trip it was decided on."""

    fare: FareBreakdown
    measure: TripMeasure


_finite = finite_or_none


def trip_measure(
    *,
    pickup: tuple[float, float],
    dropoff: tuple[float, float],
    start_odometer_m: float | None,
    end_odometer_m: float | None,
    started_at: float | None,
    now: float,
    speed_mps: float,
    detour_factor: float = DEFAULT_DETOUR_FACTOR,
) -> TripMeasure:
    """Distance and duration of a trip that ends at ``now`` (epoch seconds).

    The odometer counts when both readings are finite and it did not run backwards (a
    restarted shard starts a new odometer at 0); otherwise the route estimate between
    ``pickup`` and ``dropoff``. The duration runs from ``started_at`` (0 without a start).
    """
    start, end = _finite(start_odometer_m), _finite(end_odometer_m)
    if start is not None and end is not None and end >= start:
        distance_m, source = end - start, DistanceSource.ODOMETER
    else:
        distance_m, _ = estimate_trip(pickup, dropoff, speed_mps, detour_factor)
        source = DistanceSource.ESTIMATE
    began = _finite(started_at)
    duration_s = max(0.0, now - began) if began is not None else 0.0
    return TripMeasure(distance_m, duration_s, source)


def decide_final_fare(
    rules: FareRules, quote: FareBreakdown | None, measure: TripMeasure, surge_locked: float
) -> FinalFare:
    """The fare of a completed trip: the quote when the trip kept within the class's
    reprice tolerances, else metered on ``measure`` at ``surge_locked`` (the multiplier
    in force when the ride was requested). Raises InvalidInput as
    :func:`dispatch.pricing.final_fare`."""
    return FinalFare(final_fare(rules, quote, measure.distance_m, measure.duration_s, surge_locked), measure)


#: Statuses of a trip whose driver can be lost: the driver holds the ride.
ORPHANABLE = frozenset({RideStatus.ACCEPTED, RideStatus.ARRIVED, RideStatus.IN_PROGRESS})


def orphan_charge(status: RideStatus) -> int:
    """What the rider pays, in cents, when the server ends a trip whose driver was lost.

    Always 0. Before pickup (accepted, arrived) the rider got nothing and the fault is not
    theirs, so no cancellation fee either. Once under way (in_progress) the rider may have
    been carried part of the way, but the trip was not finished, the drop-off may be
    anywhere, and what was metered so far is unknown to the server (the shard lost the
    driver with its odometer): the fare is waived rather than guessed, and support can
    charge by hand from the ride's history if a region wants otherwise. Raises
    ValueError for a status that cannot be orphaned.
    """
    if status not in ORPHANABLE:
        raise ValueError(f"a {status.value} ride has no driver to lose")
    return 0
