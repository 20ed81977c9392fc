"""Upfront fares: the trip checked against the region, the surge at the pickup, the quote stored."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from api.services.ports import SurgeSource
from api.services.values import Point, QuoteInput, fare_json
from dispatch.errors import InvalidInput, InvalidLocation
from dispatch.pricing import FareBreakdown, FareSchedule, estimate_trip, make_quote
from dispatch.shardmap import OUTSIDE, ShardMap
from storage.quotes import QuoteStore

log = logging.getLogger("dispatch.rides")

# Trips are estimated at the pickup speed of the region's matching config, along the
# great circle times this detour factor (a street grid runs ~1.3x the straight line).
DETOUR_FACTOR = 1.3
# A drop-off may lie outside the service area (airports, the next town), but not absurdly far.
MAX_TRIP_M = 300_000.0
SURGE_CACHE_S = 1.0


@dataclass(frozen=True, slots=True)
class Trip:
    """A trip whose points the region serves: pickup, drop-off, class index, pickup shard."""

    pickup: Point
    dropoff: Point
    vehicle_class: int
    shard_id: int


class Quotes:
    """Quotes, and the checks and estimates every ride request shares with them."""

    def __init__(
        self,
        store: QuoteStore,
        *,
        region_name: str,
        region_display_name: str,
        shard_map: ShardMap,
        fares: FareSchedule,
        vehicle_classes: Sequence[str],
        pickup_speed_mps: float,
        surge: SurgeSource | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.region_name = region_name
        self.region_display_name = region_display_name
        self.map = shard_map
        self.fares = fares
        self.classes = tuple(vehicle_classes)
        self.pickup_speed_mps = pickup_speed_mps
        self.surge = surge
        self.clock = clock
        self._surge: dict[Any, Any] = {}
        self._surge_at = -math.inf

    def vehicle_class(self, name: str) -> int:
        if name not in self.classes:
            raise InvalidInput(f"vehicle_class must be one of {list(self.classes)}", vehicle_class=name)
        return self.classes.index(name)

    def trip(self, pickup: Point, dropoff: Point, vehicle_class: str) -> Trip:
        """The trip, if the region serves it: the pickup inside its area (InvalidLocation),
        the drop-off at most ``MAX_TRIP_M`` away, a known class (InvalidInput)."""
        shard = self.map.shard_for_point(pickup.lat, pickup.lng)
        if shard == OUTSIDE:
            raise InvalidLocation(
                f"pickup ({pickup.lat}, {pickup.lng}) is outside {self.region_display_name}'s service area"
            )
        distance_m, _ = estimate_trip(pickup.pair(), dropoff.pair(), 1.0, DETOUR_FACTOR)
        if distance_m > MAX_TRIP_M:
            raise InvalidLocation(
                f"the drop-off is {distance_m / 1000:.0f} km away; at most {MAX_TRIP_M / 1000:.0f}"
            )
        return Trip(pickup, dropoff, self.vehicle_class(vehicle_class), int(shard))

    async def surge_at(self, p: Point) -> float:
        """The multiplier in force at ``p`` now (1.0 when surge data is unavailable).

        The shards rewrite the readings every few seconds; the edge reads all zones at
        most once per ``SURGE_CACHE_S`` instead of asking Redis on every quote and request.
        """
        if self.surge is None:
            return 1.0
        now = time.monotonic()
        if now - self._surge_at >= SURGE_CACHE_S:
            self._surge_at = now
            try:
                self._surge = await self.surge.zones()
            except Exception as exc:
                log.warning("surge unavailable, quoting 1.0: %r", exc)
                self._surge = {}
        z = self._surge.get(self.surge.zone_of(p.lat, p.lng))
        return 1.0 if z is None else max(1.0, float(z.multiplier))

    async def estimate(self, trip: Trip) -> FareBreakdown:
        """The fare of ``trip`` at today's surge (a ride requested without a quote)."""
        surge = await self.surge_at(trip.pickup)
        return make_quote(
            self.fares.for_class(trip.vehicle_class),
            trip.vehicle_class,
            trip.pickup.pair(),
            trip.dropoff.pair(),
            self.pickup_speed_mps,
            surge,
            self.clock(),
            DETOUR_FACTOR,
        ).fare

    async def quote(self, q: QuoteInput) -> dict[str, Any]:
        """An upfront fare for a trip, stored and valid for the class's ``quote_ttl_s``."""
        trip = self.trip(q.pickup, q.dropoff, q.vehicle_class)
        rules = self.fares.for_class(trip.vehicle_class)
        surge = await self.surge_at(trip.pickup)
        made = make_quote(
            rules,
            trip.vehicle_class,
            trip.pickup.pair(),
            trip.dropoff.pair(),
            self.pickup_speed_mps,
            surge,
            self.clock(),
            DETOUR_FACTOR,
        )
        stored = await self.store.save(
            q.rider_id, self.region_name, trip.pickup.pair(), trip.dropoff.pair(), made
        )
        return {
            "quote_id": stored.quote_id,
            "vehicle_class": self.classes[trip.vehicle_class],
            "fare": fare_json(made.fare),
            "expires_at": made.expires_at,
            "valid_for_s": round(made.expires_at - made.issued_at, 1),
            "reprice_rules": {
                "distance_over_frac": rules.reprice_distance_over_frac,
                "duration_over_frac": rules.reprice_duration_over_frac,
                "note": "the quoted total is charged unless the trip runs farther or longer than the quote "
                "by more than these fractions; then it is metered on the actual trip at the locked surge",
            },
        }
