"""Fares and surge, Sans-I/O: upfront quotes, final fares, and a per-zone surge model.

Money is integer cents throughout. How a fare is computed (:func:`quote_fare`)::

    base       = base_cents
    distance   = per_km_cents  x distance_m / 1000      rounded to the cent
    time       = per_min_cents x duration_s / 60        rounded to the cent
    metered    = base + distance + time
    surge      = metered x (multiplier - 1)             rounded to the cent
    minimum    = max(0, minimum_cents - (metered + surge))
    booking    = booking_fee_cents                      never surged, on top of the minimum
    total      = metered + surge + minimum + booking

Rounding: each component is computed in decimal arithmetic from the shortest decimal
form of its inputs (``repr`` of the float, so 0.1 is 0.1) and rounded half up to the
cent, once; the total is the sum of the rounded components, so a receipt always adds up.

The surge multiplier applied to a ride is the one in force when it was requested (the
quote's); a quote is honoured at the end of the trip unless the trip ran longer or
farther than the quote assumed by more than the rules' tolerance, in which case the fare
is metered on the actual distance and time at the locked multiplier (:func:`final_fare`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from decimal import ROUND_HALF_UP, Decimal
from enum import StrEnum
from typing import Any

import h3

from dispatch.errors import ConfigError, InvalidInput, InvalidLocation, NotFound
from dispatch.geo import haversine_m
from dispatch.numbers import is_finite_number

DEFAULT_DETOUR_FACTOR = 1.35  # as dispatch.geo.eta_s: roads are longer than the crow flies


def to_decimal(x: float | int) -> Decimal:
    """A number as the decimal it reads as (``0.1`` is exactly ``Decimal('0.1')``)."""
    return Decimal(x) if isinstance(x, int) else Decimal(repr(float(x)))


def round_cents(x: Decimal) -> int:
    """Round a decimal amount of cents half up (away from zero) to an integer."""
    return int(x.quantize(Decimal(1), rounding=ROUND_HALF_UP))


# --- fare rules ----------------------------------------------------------------------


_INT_FIELDS = (
    "base_cents",
    "per_km_cents",
    "per_min_cents",
    "minimum_cents",
    "booking_fee_cents",
    "cancellation_fee_cents",
)


@dataclass(frozen=True, slots=True)
class FareRules:
    """The fare rules of one vehicle class in one region.

    ``commission_rate`` is the platform's share of the fare before the booking fee (the
    booking fee goes to the platform whole). A quote is valid for ``quote_ttl_s``. At the
    end of a trip the quote is replaced by a metered fare when the actual distance exceeds
    the quoted one by more than ``reprice_distance_over_frac`` (0.25 = 25 %), or the actual
    duration exceeds the quoted one by more than ``reprice_duration_over_frac``. A trip
    shorter than quoted still pays the quote: that is the deal of an upfront price.
    """

    currency: str = "USD"
    base_cents: int = 250
    per_km_cents: int = 110
    per_min_cents: int = 30
    minimum_cents: int = 800
    booking_fee_cents: int = 250
    cancellation_fee_cents: int = 500
    commission_rate: float = 0.25
    max_surge: float = 3.0
    quote_ttl_s: float = 300.0
    reprice_distance_over_frac: float = 0.25
    reprice_duration_over_frac: float = 0.5

    def __post_init__(self) -> None:
        if not (isinstance(self.currency, str) and len(self.currency) == 3 and self.currency.isalpha()):
            raise ConfigError(f"fares.currency must be an ISO 4217 code, got {self.currency!r}")
        for name in _INT_FIELDS:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ConfigError(f"fares.{name} must be an integer >= 0 (cents), got {v!r}")
        if not (_num_ok(self.commission_rate) and 0 <= self.commission_rate < 1):
            raise ConfigError(f"fares.commission_rate must be in [0, 1), got {self.commission_rate!r}")
        if not (_num_ok(self.max_surge) and self.max_surge >= 1):
            raise ConfigError(f"fares.max_surge must be >= 1, got {self.max_surge!r}")
        if not (_num_ok(self.quote_ttl_s) and self.quote_ttl_s > 0):
            raise ConfigError(f"fares.quote_ttl_s must be > 0, got {self.quote_ttl_s!r}")
        for name in ("reprice_distance_over_frac", "reprice_duration_over_frac"):
            v = getattr(self, name)
            if not (_num_ok(v) and v >= 0):
                raise ConfigError(f"fares.{name} must be >= 0, got {v!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base: FareRules | None = None) -> FareRules:
        """Rules from a TOML table; keys not given keep ``base``'s values (or the defaults)."""
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"fares: unknown keys {sorted(unknown)}")
        kw: dict[str, Any] = {}
        for k, v in data.items():
            if k in _INT_FIELDS:
                if isinstance(v, float) and v.is_integer():
                    v = int(v)
                kw[k] = v
            elif k == "currency":
                kw[k] = v
            else:
                try:
                    kw[k] = float(v)
                except (TypeError, ValueError):
                    raise ConfigError(f"fares.{k} must be a number, got {v!r}") from None
        return replace(base, **kw) if base is not None else cls(**kw)


_num_ok = is_finite_number


# Sensible starting points for the classes a region ships with; a region's [fares.<class>]
# table overrides any of these keys.
DEFAULT_FARES: Mapping[str, FareRules] = {
    "standard": FareRules(),
    "xl": FareRules(base_cents=400, per_km_cents=180, per_min_cents=45, minimum_cents=1200),
    "premium": FareRules(
        base_cents=800, per_km_cents=250, per_min_cents=60, minimum_cents=1800, cancellation_fee_cents=1000
    ),
}


@dataclass(frozen=True, slots=True)
class FareSchedule:
    """Fare rules per vehicle class; ``by_class[i]`` is the rules of class index ``i``."""

    by_class: tuple[FareRules, ...]

    def for_class(self, vehicle_class: int) -> FareRules:
        if not (isinstance(vehicle_class, int) and 0 <= vehicle_class < len(self.by_class)):
            raise NotFound(f"no fare rules for vehicle class {vehicle_class!r}")
        return self.by_class[vehicle_class]

    @classmethod
    def from_section(
        cls, section: Mapping[str, Any], class_names: Sequence[str], currency: str = "USD"
    ) -> FareSchedule:
        """From a region's ``[fares]`` table, one sub-table per class name.

        Each class starts from :data:`DEFAULT_FARES` for its name (``standard``'s for an
        unknown name) in the region's ``currency``; its table overrides keys.
        """
        unknown = set(section) - set(class_names)
        if unknown:
            raise ConfigError(f"fares: tables for unknown vehicle classes {sorted(unknown)}")
        rules = []
        for name in class_names:
            base = replace(DEFAULT_FARES.get(name, DEFAULT_FARES["standard"]), currency=currency)
            table = section.get(name, {})
            if not isinstance(table, Mapping):
                raise ConfigError(f"fares.{name} must be a table")
            rules.append(FareRules.from_dict(table, base))
        return cls(tuple(rules))


# --- estimates, quotes and fares ---------------------------------------------------------


def estimate_trip(
    pickup: tuple[float, float],
    dropoff: tuple[float, float],
    speed_mps: float,
    detour_factor: float = DEFAULT_DETOUR_FACTOR,
) -> tuple[float, float]:
    """``(distance_m, duration_s)`` of a trip between two ``(lat, lng)`` points.

    Road distance is the great-circle distance times ``detour_factor``; the duration is
    that distance at ``speed_mps``. Raises :class:`InvalidLocation` for bad coordinates and
    :class:`InvalidInput` for a non-positive speed or a detour factor below 1.
    """
    for name, (lat, lng) in (("pickup", pickup), ("dropoff", dropoff)):
        if not (_num_ok(lat) and _num_ok(lng) and -90 <= lat <= 90 and -180 <= lng <= 180):
            raise InvalidLocation(f"invalid {name} location ({lat}, {lng})")
    if not (_num_ok(speed_mps) and speed_mps > 0):
        raise InvalidInput(f"speed_mps must be > 0, got {speed_mps!r}")
    if not (_num_ok(detour_factor) and detour_factor >= 1):
        raise InvalidInput(f"detour_factor must be >= 1, got {detour_factor!r}")
    distance_m = float(haversine_m(pickup[0], pickup[1], dropoff[0], dropoff[1])) * detour_factor
    return distance_m, distance_m / speed_mps


class FareBasis(StrEnum):
    ESTIMATE = "estimate"  # an upfront quote, before the trip
    QUOTED = "quoted"  # the final fare is the quote, honoured
    REPRICED = "repriced"  # the trip deviated from the quote: metered on actuals
    METERED = "metered"  # there was no quote: metered on actuals


@dataclass(frozen=True, slots=True)
class FareBreakdown:
    """A fare, component by component (see the module docstring for the formula).

    ``total_cents`` is what the rider pays; ``fare_cents`` (total minus booking fee) is
    what the commission applies to. ``distance_m``/``duration_s`` are the figures the
    fare was computed from (estimates in a quote, actuals in a metered fare).
    """

    currency: str
    base_cents: int
    distance_cents: int
    time_cents: int
    surge_multiplier: float
    surge_cents: int
    minimum_adjustment_cents: int
    booking_fee_cents: int
    total_cents: int
    distance_m: float
    duration_s: float
    basis: FareBasis = FareBasis.ESTIMATE

    @property
    def fare_cents(self) -> int:
        return self.total_cents - self.booking_fee_cents

    def lines(self) -> dict[str, int]:
        """The receipt lines in cents; they add up to ``total_cents``."""
        return {
            "base": self.base_cents,
            "distance": self.distance_cents,
            "time": self.time_cents,
            "surge": self.surge_cents,
            "minimum_fare_adjustment": self.minimum_adjustment_cents,
            "booking_fee": self.booking_fee_cents,
        }


def quote_fare(
    rules: FareRules,
    distance_m: float,
    duration_s: float,
    surge: float = 1.0,
    basis: FareBasis = FareBasis.ESTIMATE,
) -> FareBreakdown:
    """The fare for a distance and a duration under ``rules`` and a surge multiplier.

    A multiplier above ``rules.max_surge`` is capped at it. Raises :class:`InvalidInput`
    for a negative or non-finite distance or duration, or a multiplier below 1.
    """
    if not (_num_ok(distance_m) and distance_m >= 0 and _num_ok(duration_s) and duration_s >= 0):
        raise InvalidInput(
            f"distance and duration must be finite and >= 0, got {distance_m!r}, {duration_s!r}"
        )
    if not (_num_ok(surge) and surge >= 1.0):
        raise InvalidInput(f"surge multiplier must be >= 1, got {surge!r}")
    mult = min(float(surge), float(rules.max_surge))
    distance_cents = round_cents(rules.per_km_cents * to_decimal(distance_m) / 1000)
    time_cents = round_cents(rules.per_min_cents * to_decimal(duration_s) / 60)
    metered = rules.base_cents + distance_cents + time_cents
    surge_cents = round_cents(metered * (to_decimal(mult) - 1))
    minimum_adjustment = max(0, rules.minimum_cents - (metered + surge_cents))
    total = metered + surge_cents + minimum_adjustment + rules.booking_fee_cents
    return FareBreakdown(
        currency=rules.currency,
        base_cents=rules.base_cents,
        distance_cents=distance_cents,
        time_cents=time_cents,
        surge_multiplier=mult,
        surge_cents=surge_cents,
        minimum_adjustment_cents=minimum_adjustment,
        booking_fee_cents=rules.booking_fee_cents,
        total_cents=total,
        distance_m=float(distance_m),
        duration_s=float(duration_s),
        basis=basis,
    )


def deviates(
    rules: FareRules, quote: FareBreakdown, actual_distance_m: float, actual_duration_s: float
) -> bool:
    """Whether the trip ran farther or longer than the quote by more than the tolerance."""
    too_far = actual_distance_m > quote.distance_m * (1.0 + rules.reprice_distance_over_frac)
    too_long = actual_duration_s > quote.duration_s * (1.0 + rules.reprice_duration_over_frac)
    return too_far or too_long


def final_fare(
    rules: FareRules,
    quote: FareBreakdown | None,
    actual_distance_m: float,
    actual_duration_s: float,
    surge_locked: float,
) -> FareBreakdown:
    """What the rider pays at the end of a trip.

    With a quote and no deviation (:func:`deviates`), the quote's amounts exactly
    (basis QUOTED). Otherwise the fare metered on the actual distance and duration at
    ``surge_locked``, the multiplier in force at request time (basis REPRICED when a
    quote was replaced, METERED without one). Raises :class:`InvalidInput` as
    :func:`quote_fare`, and if the quote is in another currency than the rules.
    """
    if not (_num_ok(actual_distance_m) and actual_distance_m >= 0):
        raise InvalidInput(f"actual distance must be finite and >= 0, got {actual_distance_m!r}")
    if not (_num_ok(actual_duration_s) and actual_duration_s >= 0):
        raise InvalidInput(f"actual duration must be finite and >= 0, got {actual_duration_s!r}")
    if quote is None:
        return quote_fare(rules, actual_distance_m, actual_duration_s, surge_locked, FareBasis.METERED)
    if quote.currency != rules.currency:
        raise InvalidInput(f"quote in {quote.currency} but the fare rules are in {rules.currency}")
    if deviates(rules, quote, actual_distance_m, actual_duration_s):
        return quote_fare(rules, actual_distance_m, actual_duration_s, surge_locked, FareBasis.REPRICED)
    return replace(quote, basis=FareBasis.QUOTED)


@dataclass(frozen=True, slots=True)
class Quote:
    """An upfront fare offered to a rider, valid until ``expires_at``."""

    fare: FareBreakdown
    vehicle_class: int
    issued_at: float
    expires_at: float

    def is_valid(self, now: float) -> bool:
        return self.issued_at <= now < self.expires_at


def make_quote(
    rules: FareRules,
    vehicle_class: int,
    pickup: tuple[float, float],
    dropoff: tuple[float, float],
    speed_mps: float,
    surge: float,
    now: float,
    detour_factor: float = DEFAULT_DETOUR_FACTOR,
) -> Quote:
    """Estimate the trip and quote it, valid for ``rules.quote_ttl_s`` from ``now``."""
    distance_m, duration_s = estimate_trip(pickup, dropoff, speed_mps, detour_factor)
    fare = quote_fare(rules, distance_m, duration_s, surge)
    return Quote(fare, vehicle_class, now, now + rules.quote_ttl_s)


# --- surge -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SurgeConfig:
    """How demand and supply in a zone become a multiplier.

    Zones are H3 cells at ``resolution`` (7: about 5 km2, coarser than the shard index,
    so a zone has enough drivers for its ratio to mean something). Over the last
    ``window_s``, demand is the requests observed in the zone and supply the mean number
    of available drivers across the observations; ``ratio = demand / max(supply,
    min_supply)``. Up to ``dead_band`` the target multiplier is 1.0 (normal fluctuations
    do not surge); above it the target rises by ``sensitivity`` per unit of ratio. Each
    observation moves the multiplier a fraction ``smoothing`` of the way to its target
    (exponential smoothing: with observations every 30 s and 0.3, a time constant of
    about 100 s, so prices do not flap). The quoted multiplier is capped at
    ``max_surge``, floored at 1.0 and rounded half up to 0.1. With no observation for
    ``window_s``, a zone is back to 1.0.

    ``interval_s`` is how often each shard observes its zones
    (:class:`dispatch.surge_feed.SurgeFeed`). The smoothing is per observation, so the
    two go together: the time constant is ``-interval_s / ln(1 - smoothing)``.
    """

    resolution: int = 7
    window_s: float = 300.0
    dead_band: float = 1.2
    sensitivity: float = 0.5
    smoothing: float = 0.3
    max_surge: float = 3.0
    min_supply: float = 1.0
    interval_s: float = 30.0

    def __post_init__(self) -> None:
        if not (isinstance(self.resolution, int) and 0 <= self.resolution <= 15):
            raise ConfigError(f"surge.resolution must be an H3 resolution 0..15, got {self.resolution!r}")
        for name in ("window_s", "sensitivity", "min_supply", "interval_s"):
            v = getattr(self, name)
            if not (_num_ok(v) and v > 0):
                raise ConfigError(f"surge.{name} must be > 0, got {v!r}")
        if not (_num_ok(self.dead_band) and self.dead_band >= 0):
            raise ConfigError(f"surge.dead_band must be >= 0, got {self.dead_band!r}")
        if not (_num_ok(self.smoothing) and 0 < self.smoothing <= 1):
            raise ConfigError(f"surge.smoothing must be in (0, 1], got {self.smoothing!r}")
        if not (_num_ok(self.max_surge) and self.max_surge >= 1):
            raise ConfigError(f"surge.max_surge must be >= 1, got {self.max_surge!r}")
        if self.interval_s > self.window_s:
            raise ConfigError(
                f"surge.interval_s ({self.interval_s}) must not exceed surge.window_s ({self.window_s})"
            )

    @classmethod
    def from_section(cls, section: Mapping[str, Any]) -> SurgeConfig:
        """Build from a region's ``[surge]`` table; missing keys keep the defaults.

        Raises :class:`ConfigError` for unknown keys and bad values (a fractional or
        non-numeric resolution included).
        """
        names = {f.name for f in fields(cls)}
        unknown = set(section) - names
        if unknown:
            raise ConfigError(f"surge: unknown keys {sorted(unknown)}")
        kw: dict[str, Any] = {}
        for k, v in section.items():
            if isinstance(v, bool) or not isinstance(v, int | float | str):
                raise ConfigError(f"surge.{k} must be a number, got {v!r}")
            try:
                if k == "resolution":
                    if isinstance(v, float) and not v.is_integer():
                        raise ValueError(v)
                    kw[k] = int(v)
                else:
                    kw[k] = float(v)
            except (TypeError, ValueError):
                raise ConfigError(f"surge.{k} must be a number, got {v!r}") from None
        return cls(**kw)


def round_multiplier(x: float) -> float:
    """Round half up to one decimal (1.25 -> 1.3), tolerant of float noise (1.15 -> 1.2)."""
    return math.floor(x * 10.0 + 0.5 + 1e-9) / 10.0


@dataclass(slots=True)
class _Zone:
    smoothed: float = 1.0
    last_seen: float = -math.inf
    demand: int = 0  # requests in the window at the last observation
    supply: float = 0.0  # mean available drivers over the window at the last observation


@dataclass(frozen=True, slots=True)
class ZoneSurge:
    """What a surge zone reads at a time: the quoted multiplier and what it came from.

    ``demand`` is the requests observed in the zone over the window, ``supply`` the mean
    number of available drivers across the window's observations (both 0 for a zone the
    model does not know, or one whose data is older than the window).
    """

    multiplier: float
    raw: float
    demand: int
    supply: float


class SurgeModel:
    """Per-zone surge multipliers from a stream of demand and supply observations.

    Feed :meth:`observe` at a steady cadence (every shard surge interval), read
    :meth:`multiplier`. Times must not go backwards. Not thread-safe (one per owner).
    """

    def __init__(self, config: SurgeConfig | None = None) -> None:
        self.config = config or SurgeConfig()
        self._window: deque[tuple[float, dict[str, int], dict[str, int]]] = deque()
        self._zones: dict[str, _Zone] = {}
        self._last_now = -math.inf

    def zone_of(self, lat: float, lng: float) -> str:
        """The surge zone (H3 cell at the configured resolution) of a point."""
        if not (_num_ok(lat) and _num_ok(lng) and -90 <= lat <= 90 and -180 <= lng <= 180):
            raise InvalidLocation(f"invalid location ({lat}, {lng})")
        cell: str = h3.latlng_to_cell(lat, lng, self.config.resolution)
        return cell

    def _zone_key(self, cell: str) -> str:
        if not (isinstance(cell, str) and h3.is_valid_cell(cell)):
            raise InvalidInput(f"not an H3 cell: {cell!r}")
        res = h3.get_resolution(cell)
        if res < self.config.resolution:
            raise InvalidInput(
                f"cell {cell} has resolution {res}, coarser than the surge zones ({self.config.resolution})"
            )
        return cell if res == self.config.resolution else h3.cell_to_parent(cell, self.config.resolution)

    def _aggregate(self, counts: Mapping[str, int], what: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for cell, n in counts.items():
            if not (isinstance(n, int) and not isinstance(n, bool) and n >= 0):
                raise InvalidInput(f"{what} count for {cell} must be an integer >= 0, got {n!r}")
            key = self._zone_key(cell)
            out[key] = out.get(key, 0) + n
        return out

    def observe(self, zone_demand: Mapping[str, int], zone_supply: Mapping[str, int], now: float) -> None:
        """Record one observation: requests per zone since the last one, available drivers now.

        Cells finer than the zone resolution are summed into their zone. A zone absent
        from a mapping counts 0 there. Raises :class:`InvalidInput` (and records nothing)
        for a bad cell or count or a time before the previous observation.
        """
        if not _num_ok(now) or now < self._last_now:
            raise InvalidInput(f"observation time {now!r} is before the previous one ({self._last_now})")
        demand = self._aggregate(zone_demand, "demand")
        supply = self._aggregate(zone_supply, "supply")
        cfg = self.config
        self._last_now = now
        self._window.append((now, demand, supply))
        while self._window and self._window[0][0] <= now - cfg.window_s:
            self._window.popleft()
        n_obs = len(self._window)
        total_demand: dict[str, int] = {}
        total_supply: dict[str, int] = {}
        for _, d, s in self._window:
            for k, v in d.items():
                total_demand[k] = total_demand.get(k, 0) + v
            for k, v in s.items():
                total_supply[k] = total_supply.get(k, 0) + v
        active = set(total_demand) | set(total_supply)
        for key in active | set(self._zones):
            ratio = total_demand.get(key, 0) / max(total_supply.get(key, 0) / n_obs, cfg.min_supply)
            target = 1.0 if ratio <= cfg.dead_band else 1.0 + cfg.sensitivity * (ratio - cfg.dead_band)
            target = min(target, cfg.max_surge)
            zone = self._zones.get(key)
            if zone is None:
                zone = self._zones[key] = _Zone()
            zone.smoothed += cfg.smoothing * (target - zone.smoothed)
            zone.demand = total_demand.get(key, 0)
            zone.supply = total_supply.get(key, 0) / n_obs
            if key in active:
                zone.last_seen = now
            elif zone.smoothed < 1.05:
                # Calm again and out of the window: forget the zone, it reads 1.0 anyway.
                del self._zones[key]

    def raw(self, cell: str, now: float) -> float:
        """The smoothed, unrounded multiplier of the zone of ``cell`` (1.0 when unknown or stale)."""
        zone = self._zones.get(self._zone_key(cell))
        if zone is None or now - zone.last_seen >= self.config.window_s:
            return 1.0
        return zone.smoothed

    def multiplier(self, cell: str, now: float) -> float:
        """The surge multiplier to quote in the zone of ``cell`` at ``now``.

        ``cell`` is an H3 cell at the zone resolution or finer. Floored at 1.0, capped
        at ``max_surge``, rounded half up to 0.1.
        """
        m = round_multiplier(self.raw(cell, now))
        return min(max(m, 1.0), self.config.max_surge)

    def multiplier_at(self, lat: float, lng: float, now: float) -> float:
        return self.multiplier(self.zone_of(lat, lng), now)

    def reading(self, cell: str, now: float) -> ZoneSurge:
        """The zone of ``cell`` at ``now``: multiplier, raw value, window demand and supply."""
        zone = self._zones.get(self._zone_key(cell))
        if zone is None or now - zone.last_seen >= self.config.window_s:
            return ZoneSurge(1.0, 1.0, 0, 0.0)
        return ZoneSurge(self.multiplier(cell, now), zone.smoothed, zone.demand, zone.supply)

    def zones(self, now: float) -> dict[str, float]:
        """Every zone currently above 1.0 with its multiplier (for the console's map)."""
        out = {k: self.multiplier(k, now) for k in self._zones}
        return {k: v for k, v in out.items() if v > 1.0}
