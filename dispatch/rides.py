"""The ride book of a shard: open requests, their offers and the offers' timeouts. Sans-I/O.

A :class:`RideBook` holds the requests of one shard that have no driver yet, and the
offers made for them. It never reads the clock and does no I/O: every call takes
``now`` and returns values or effects, which the shard actor applies (send the offer,
free the driver, tell the rider, persist the transition). The shard's loop, every
``MatchingConfig.tick_s``::

    effects = book.tick(now)                   # timeouts first: frees drivers, expires rides
    for request, radius_m, excluded in book.due(now):
        ...                                    # candidates from the spatial index
    ...                                        # matching.assign over the cost matrix
    offer = book.offer(ride_id, driver_id, now)

Invariants, kept by raising before anything changes:

- a request has at most one open offer, a driver at most one (across all requests);
- an offer is accepted at most once, only by its driver, only before it expires
  (``now < expires_at``); accepting takes the request out of the book;
- a driver that declined a request, or let its offer time out, is never offered that
  request again (it is in the request's excluded set);
- a request that left the book (accepted, expired, cancelled) is not taken back by
  :meth:`RideBook.add` or :meth:`RideBook.add_restored`: a handoff or a stored state that
  arrives late (an edge's retry, a call Ray replays on a restarted actor, a state read
  before the accept) must not reopen a ride that a driver took. Only
  :meth:`RideBook.reopen` does, for an accept that could not be stored.

An offer whose ``expires_at`` has passed stays open (its driver stays reserved) until
the next :meth:`RideBook.tick` closes it with an :class:`OfferExpired` effect, so that
exactly one effect frees each driver. Likewise a request past its wait limit is no longer
:meth:`~RideBook.due`, and expires on the next tick once it has no open offer: an offer
already out is allowed to run to its end, since its driver may still accept.

Driver ids are the engine's integer ids (as in :mod:`dispatch.drivers`); ride and rider
ids are the opaque strings of the system of record.
"""

from __future__ import annotations

import math
import numbers
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

from dispatch.errors import (
    ConfigError,
    Conflict,
    DriverUnavailable,
    Forbidden,
    InvalidInput,
    InvalidLocation,
    NotFound,
    OfferUnavailable,
)
from dispatch.matching import MatchPolicy
from dispatch.numbers import is_finite_number

# Requests stamped further ahead of the shard's clock than this are refused: the edge and
# the shards run on NTP-synchronised clocks, so more than a few seconds means a bug.
MAX_FUTURE_SKEW_S = 5.0

# How many closed offer ids the book remembers, to answer a late or repeated accept with
# "already accepted" / "expired" rather than "unknown". About a minute of a busy shard.
_CLOSED_MEMORY = 20_000
# How many rides that left the book it remembers, so that a late handoff of one is a
# no-op: a few minutes of a busy shard, well past an edge's handoff retries.
_GONE_MEMORY = 50_000


@dataclass(frozen=True, slots=True)
class MatchingConfig:
    """Matching and offer settings of a region (its ``[matching]`` table).

    The search radius of a request starts at ``initial_radius_m`` and grows by
    ``radius_step_m`` every ``radius_step_every_s`` of waiting, up to ``max_radius_m``,
    which must not exceed the shard halo (a shard sees other shards' drivers only that far
    past its border). ``pickup_speed_mps`` converts distances into pickup ETAs.
    ``candidates_per_request`` is the k of the nearby query per request.
    """

    policy: MatchPolicy = MatchPolicy.BATCH
    tick_s: float = 0.25
    offer_timeout_s: float = 15.0
    initial_radius_m: float = 1500.0
    radius_step_m: float = 500.0
    radius_step_every_s: float = 10.0
    max_radius_m: float = 3000.0
    max_wait_s: float = 180.0
    pickup_speed_mps: float = 8.0
    candidates_per_request: int = 8

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "policy", MatchPolicy(self.policy))
        except ValueError:
            raise ConfigError(f"matching.policy must be batch or greedy, got {self.policy!r}") from None
        for f in fields(self):
            if f.name == "policy":
                continue
            v = getattr(self, f.name)
            ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
            if not ok or v < 0 or (v == 0 and f.name != "radius_step_m"):
                raise ConfigError(f"matching.{f.name} must be a positive number, got {v!r}")
        if self.initial_radius_m > self.max_radius_m:
            raise ConfigError(
                f"matching.initial_radius_m ({self.initial_radius_m}) "
                f"exceeds max_radius_m ({self.max_radius_m})"
            )
        if int(self.candidates_per_request) != self.candidates_per_request:
            raise ConfigError("matching.candidates_per_request must be an integer")

    @classmethod
    def from_section(cls, section: Mapping[str, Any], halo_m: float | None = None) -> MatchingConfig:
        """Build from a region's ``[matching]`` table; missing keys keep the defaults.

        With ``halo_m``, a ``max_radius_m`` beyond the halo is a :class:`ConfigError`.
        """
        names = {f.name for f in fields(cls)}
        unknown = set(section) - names
        if unknown:
            raise ConfigError(f"matching: unknown keys {sorted(unknown)}")
        kw: dict[str, Any] = {}
        for k, v in section.items():
            if k == "policy":
                kw[k] = v
            elif k == "candidates_per_request":
                kw[k] = v if isinstance(v, int) else _num(v, k)
            else:
                kw[k] = _num(v, k)
        cfg = cls(**kw)
        if halo_m is not None and cfg.max_radius_m > halo_m:
            raise ConfigError(
                f"matching.max_radius_m ({cfg.max_radius_m:.0f}) exceeds the shard halo ({halo_m:.0f} m)"
            )
        return cfg

    def search_radius_m(self, waited_s: float) -> float:
        """The search radius after ``waited_s`` of waiting (negative waits count as 0)."""
        steps = math.floor(max(waited_s, 0.0) / self.radius_step_every_s)
        return min(self.max_radius_m, self.initial_radius_m + steps * self.radius_step_m)


def _num(v: Any, name: str) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ConfigError(f"matching.{name} must be a number, got {v!r}") from None


@dataclass(frozen=True, slots=True)
class RideRequest:
    """A rider's request as the book holds it. Validated on construction.

    ``max_wait_s`` of ``None`` means the config's; ``quote_id`` ties the request to the
    upfront fare the rider accepted; ``surge_multiplier`` is the one locked at request time.
    """

    ride_id: str
    rider_id: str
    pickup_lat: float
    pickup_lng: float
    dropoff_lat: float
    dropoff_lng: float
    vehicle_class: int
    requested_at: float
    max_wait_s: float | None = None
    quote_id: str | None = None
    surge_multiplier: float = 1.0

    def __post_init__(self) -> None:
        if not (isinstance(self.ride_id, str) and self.ride_id):
            raise InvalidInput("ride_id must be a non-empty string")
        if not (isinstance(self.rider_id, str) and self.rider_id):
            raise InvalidInput("rider_id must be a non-empty string")
        for which in ("pickup", "dropoff"):
            lat, lng = getattr(self, f"{which}_lat"), getattr(self, f"{which}_lng")
            if not (_finite(lat) and _finite(lng) and -90 <= lat <= 90 and -180 <= lng <= 180):
                raise InvalidLocation(f"invalid {which} location ({lat}, {lng})", ride_id=self.ride_id)
        if not isinstance(self.vehicle_class, numbers.Integral) or isinstance(self.vehicle_class, bool):
            raise InvalidInput(f"vehicle_class must be an integer, got {self.vehicle_class!r}")
        # numpy integers (from the driver table) become plain ints, so records compare equal.
        object.__setattr__(self, "vehicle_class", int(self.vehicle_class))
        if self.vehicle_class < 0:
            raise InvalidInput(f"vehicle_class must be >= 0, got {self.vehicle_class}")
        if not _finite(self.requested_at):
            raise InvalidInput(f"requested_at must be a finite time, got {self.requested_at!r}")
        if self.max_wait_s is not None and not (_finite(self.max_wait_s) and self.max_wait_s > 0):
            raise InvalidInput(f"max_wait_s must be a positive number, got {self.max_wait_s!r}")
        if not (_finite(self.surge_multiplier) and self.surge_multiplier >= 1.0):
            raise InvalidInput(f"surge_multiplier must be >= 1, got {self.surge_multiplier!r}")


_finite = is_finite_number


def offer_prefix(shard_id: int, incarnation: str) -> str:
    """The start of a shard's offer ids after the ride id: ``"{shard_id}.{incarnation}-"``
    (nothing without an incarnation: a book outside a shard actor)."""
    if ":" in incarnation or "." in incarnation:
        raise InvalidInput(f"an incarnation has no ':' or '.', got {incarnation!r}")
    return f"{int(shard_id)}.{incarnation}-" if incarnation else ""


def offer_shard(offer_id: str, ride_id: str) -> int | None:
    """The shard that made ``offer_id``, an offer of ``ride_id``, as its id says; None when
    the id names no shard (made without an incarnation) or another ride. The shard holding
    the offer is the judge of it: this only says where to ask."""
    ride, colon, tail = offer_id.rpartition(":")
    if not colon or ride != ride_id:
        return None
    shard, dot, _ = tail.partition(".")
    if not dot or not shard.isdigit() or len(shard) > 6:
        return None
    return int(shard)


@dataclass(frozen=True, slots=True)
class Offer:
    """An offer of one ride to one driver, open until accepted, declined, expired or withdrawn.

    ``offer_id`` is ``"{ride_id}:{prefix}{attempt}"``: the book's ``offer_prefix`` names the
    shard and its incarnation (:func:`offer_prefix`; a restarted shard has a new one), so
    an offer id is never reused, not even by a shard that lost its attempt counters in a
    crash. The edge relies on the part before the last ``:`` being the ride id, and takes
    a driver's answer straight to the shard the id names (:func:`offer_shard`).
    """

    ride_id: str
    driver_id: int
    offer_id: str
    offered_at: float
    expires_at: float


class DueRequest(NamedTuple):
    """A request waiting for a driver, with where to look and whom to skip.

    A named tuple rather than a dataclass so that the shard loop can unpack it.
    """

    request: RideRequest
    search_radius_m: float
    excluded_driver_ids: frozenset[int]


# --- effects -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OfferAccepted:
    """The driver took the ride: the request left the book; start the trip (status accepted)."""

    ride_id: str
    rider_id: str
    driver_id: int
    offer_id: str
    accepted_at: float
    request: RideRequest


@dataclass(frozen=True, slots=True)
class OfferDeclined:
    """The driver said no: free the driver; the request is back in the queue without it."""

    ride_id: str
    driver_id: int
    offer_id: str


@dataclass(frozen=True, slots=True)
class OfferExpired:
    """The driver did not answer in time: free the driver; the request is back without it."""

    ride_id: str
    driver_id: int
    offer_id: str


@dataclass(frozen=True, slots=True)
class OfferWithdrawn:
    """The offer was taken back (the driver went offline or left the shard): free the driver.

    The request is back in the queue; the driver is not excluded, since it did not refuse.
    """

    ride_id: str
    driver_id: int
    offer_id: str


@dataclass(frozen=True, slots=True)
class RideExpired:
    """Nobody took the ride within its wait limit: tell the rider (status expired)."""

    ride_id: str
    rider_id: str
    requested_at: float
    expired_at: float


@dataclass(frozen=True, slots=True)
class RideCancelled:
    """The rider cancelled before any driver accepted (status cancelled, no fee).

    If an offer was open, ``driver_id`` and ``offer_id`` name it: free that driver and
    tell it the offer is gone.
    """

    ride_id: str
    rider_id: str
    driver_id: int | None
    offer_id: str | None


Effect = OfferAccepted | OfferDeclined | OfferExpired | OfferWithdrawn | RideExpired | RideCancelled


@dataclass(frozen=True, slots=True)
class RideRecord:
    """One open request as stored: what :meth:`RideBook.snapshot` gives and ``restore`` takes.

    ``attempts`` counts the offers made so far (the next offer id uses it).
    """

    request: RideRequest
    excluded_driver_ids: frozenset[int] = frozenset()
    attempts: int = 0
    offer: Offer | None = None


@dataclass(slots=True)
class _Open:
    """Mutable bookkeeping of one open request (private to the book)."""

    request: RideRequest
    deadline: float
    excluded: set[int] = field(default_factory=set)
    attempts: int = 0
    offer: Offer | None = None


class RideBook:
    """Open requests and offers of one shard. Single-threaded, like the shard that owns it."""

    def __init__(self, config: MatchingConfig | None = None, offer_prefix: str = "") -> None:
        if ":" in offer_prefix:
            raise InvalidInput(f"offer_prefix must not contain ':', got {offer_prefix!r}")
        self.config = config or MatchingConfig()
        self.offer_prefix = offer_prefix
        self._rides: dict[str, _Open] = {}
        self._offers: dict[str, Offer] = {}  # offer_id -> open offer
        self._driver_offer: dict[int, str] = {}  # driver_id -> its open offer_id
        self._closed: OrderedDict[str, str] = OrderedDict()  # offer_id -> how it closed
        # ride_id -> (how it left the book, the offers made for it): a reopened ride goes
        # on numbering its offers, so an offer id is never made twice.
        self._gone: OrderedDict[str, tuple[str, int]] = OrderedDict()

    # --- queries ---------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._rides)

    def __contains__(self, ride_id: object) -> bool:
        return ride_id in self._rides

    def get(self, ride_id: str) -> RideRequest:
        """The open request ``ride_id``; :class:`NotFound` if the book does not hold it."""
        return self._open(ride_id).request

    def requests(self) -> list[RideRequest]:
        """Every open request (offered or not), in the order they were added. Changes nothing."""
        return [o.request for o in self._rides.values()]

    def offer_of_ride(self, ride_id: str) -> Offer | None:
        return self._open(ride_id).offer

    def offer_of_driver(self, driver_id: int) -> Offer | None:
        oid = self._driver_offer.get(driver_id)
        return None if oid is None else self._offers[oid]

    def open_offers(self) -> list[Offer]:
        return list(self._offers.values())

    def offered_driver_ids(self) -> list[int]:
        """The drivers holding an open offer of this book (own or another shard's)."""
        return list(self._driver_offer)

    def excluded(self, ride_id: str) -> frozenset[int]:
        return frozenset(self._open(ride_id).excluded)

    def _open(self, ride_id: str) -> _Open:
        try:
            return self._rides[ride_id]
        except KeyError:
            raise NotFound(f"ride {ride_id!r} is not open in this shard", ride_id=ride_id) from None

    # --- requests --------------------------------------------------------------

    def add(self, request: RideRequest, now: float) -> None:
        """Queue a new request. Adding the identical request again is a no-op (retries),
        and so is adding one that already left this book (see the module docstring):
        :meth:`gone` says how.

        Raises :class:`Conflict` for a different request under a known ride id, and
        :class:`InvalidInput` for a request stamped more than a few seconds in the future.
        """
        if request.ride_id in self._gone:
            return
        known = self._rides.get(request.ride_id)
        if known is not None:
            if known.request == request:
                return
            raise Conflict(f"ride {request.ride_id!r} is already open with different details")
        if request.requested_at > now + MAX_FUTURE_SKEW_S:
            raise InvalidInput(
                f"ride {request.ride_id!r} is requested at {request.requested_at}, in the future of {now}"
            )
        self._rides[request.ride_id] = _Open(request, self._deadline(request))

    def reopen(self, request: RideRequest, now: float) -> None:
        """Queue a request again although it left the book: its accept could not be
        stored (the system of record was down), so it is still waiting for a driver. Same
        errors as :meth:`add`."""
        left = self._gone.pop(request.ride_id, None)
        self.add(request, now)
        if left is not None and request.ride_id in self._rides:
            o = self._rides[request.ride_id]
            o.attempts = max(o.attempts, left[1])

    def gone(self, ride_id: str) -> str | None:
        """How ``ride_id`` left this book ("accepted", "expired", "cancelled"), or None."""
        left = self._gone.get(ride_id)
        return None if left is None else left[0]

    def _leave(self, ride_id: str, how: str) -> None:
        self._gone[ride_id] = (how, self._rides.pop(ride_id).attempts)
        while len(self._gone) > _GONE_MEMORY:
            self._gone.popitem(last=False)

    def _deadline(self, request: RideRequest) -> float:
        wait = self.config.max_wait_s if request.max_wait_s is None else request.max_wait_s
        return request.requested_at + wait

    def due(self, now: float) -> list[DueRequest]:
        """Requests waiting for a driver at ``now``, oldest first.

        Those with an open offer, and those past their wait limit (the next tick expires
        them), are left out. Each comes with its search radius for its waiting time and
        the drivers it must not be offered to. Changes nothing.
        """
        out = [
            DueRequest(
                o.request,
                self.config.search_radius_m(now - o.request.requested_at),
                frozenset(o.excluded),
            )
            for o in self._rides.values()
            if o.offer is None and now < o.deadline
        ]
        out.sort(key=lambda d: (d.request.requested_at, d.request.ride_id))
        return out

    def cancel(self, ride_id: str, now: float) -> RideCancelled:
        """The rider cancels an open request: it leaves the book with any open offer.

        Raises :class:`NotFound` if the ride is not open here (already accepted, expired,
        cancelled, or never added): past acceptance, cancelling is the trip's business.
        """
        o = self._open(ride_id)
        offer = o.offer
        if offer is not None:
            self._close(offer, "withdrawn because the rider cancelled")
        self._leave(ride_id, "cancelled")
        return RideCancelled(
            ride_id,
            o.request.rider_id,
            None if offer is None else offer.driver_id,
            None if offer is None else offer.offer_id,
        )

    # --- offers ----------------------------------------------------------------

    def offer(self, ride_id: str, driver_id: int, now: float) -> Offer:
        """Offer ``ride_id`` to ``driver_id`` until ``now + offer_timeout_s``.

        Raises :class:`NotFound` for a ride not open here; :class:`Conflict` if the ride
        already has an open offer; :class:`OfferUnavailable` if the ride has waited past
        its limit; :class:`DriverUnavailable` if the driver holds another open offer or
        was excluded from this ride. Nothing changes when it raises.
        """
        o = self._open(ride_id)
        driver_id = int(driver_id)
        if o.offer is not None:
            raise Conflict(
                f"ride {ride_id!r} already has an open offer "
                f"({o.offer.offer_id}) to driver {o.offer.driver_id}",
                ride_id=ride_id,
            )
        if now >= o.deadline:
            raise OfferUnavailable(f"ride {ride_id!r} has waited past its limit", ride_id=ride_id)
        held = self._driver_offer.get(driver_id)
        if held is not None:
            raise DriverUnavailable(
                f"driver {driver_id} already holds open offer {held}", driver_id=driver_id, offer_id=held
            )
        if driver_id in o.excluded:
            raise DriverUnavailable(
                f"driver {driver_id} declined or let an offer of ride {ride_id!r} expire",
                driver_id=driver_id,
                ride_id=ride_id,
            )
        o.attempts += 1
        now = float(now)
        offer_id = f"{ride_id}:{self.offer_prefix}{o.attempts}"
        offer = Offer(ride_id, driver_id, offer_id, now, now + self.config.offer_timeout_s)
        o.offer = offer
        self._offers[offer.offer_id] = offer
        self._driver_offer[driver_id] = offer.offer_id
        return offer

    def _take_open_offer(self, offer_id: str, driver_id: int) -> Offer:
        offer = self._offers.get(offer_id)
        if offer is None:
            how = self._closed.get(offer_id)
            if how is None:
                raise NotFound(f"no offer {offer_id!r}", offer_id=offer_id)
            raise OfferUnavailable(f"offer {offer_id!r} was {how}", offer_id=offer_id)
        if offer.driver_id != int(driver_id):
            raise Forbidden(f"offer {offer_id!r} was not made to driver {driver_id}", offer_id=offer_id)
        return offer

    def accept(self, offer_id: str, driver_id: int, now: float) -> OfferAccepted:
        """The driver accepts: atomic and exactly once.

        Only the offered driver (else :class:`Forbidden`), only while ``now < expires_at``
        (else :class:`OfferUnavailable`; the next tick expires it), and only once (a
        second accept raises :class:`OfferUnavailable`). On success the request leaves
        the book and the driver's reservation ends: the trip owns both from here.
        """
        offer = self._take_open_offer(offer_id, driver_id)
        if now >= offer.expires_at:
            raise OfferUnavailable(f"offer {offer_id!r} expired at {offer.expires_at}", offer_id=offer_id)
        o = self._rides[offer.ride_id]
        self._leave(offer.ride_id, "accepted")
        self._close(offer, "already accepted")
        return OfferAccepted(offer.ride_id, o.request.rider_id, offer.driver_id, offer_id, now, o.request)

    def accept_ride(self, ride_id: str, driver_id: int, now: float) -> OfferAccepted:
        """Accept by ride id, for clients that only know the ride. Same rules as :meth:`accept`.

        :class:`OfferUnavailable` if the ride has no open offer to this driver.
        """
        o = self._rides.get(ride_id)
        if o is None or o.offer is None or o.offer.driver_id != int(driver_id):
            raise OfferUnavailable(
                f"ride {ride_id!r} has no open offer to driver {driver_id}", ride_id=ride_id
            )
        return self.accept(o.offer.offer_id, driver_id, now)

    def decline(self, offer_id: str, driver_id: int, now: float) -> OfferDeclined:
        """The driver declines: the request is queued again without this driver.

        Same errors as :meth:`accept` for unknown, closed or someone else's offers. A
        decline that arrives after ``expires_at`` but before the tick still counts (the
        outcome is the same: the driver is excluded and freed once).
        """
        offer = self._take_open_offer(offer_id, driver_id)
        o = self._rides[offer.ride_id]
        o.excluded.add(offer.driver_id)
        self._close(offer, "declined")
        return OfferDeclined(offer.ride_id, offer.driver_id, offer_id)

    def withdraw_driver(self, driver_id: int, now: float) -> OfferWithdrawn | None:
        """Take back the open offer of a driver that went offline or left the shard.

        Returns ``None`` if the driver holds no open offer. The request is queued again
        and the driver is not excluded from it.
        """
        oid = self._driver_offer.get(int(driver_id))
        if oid is None:
            return None
        offer = self._offers[oid]
        self._close(offer, "withdrawn")
        return OfferWithdrawn(offer.ride_id, offer.driver_id, oid)

    def withdraw_offer(self, offer_id: str) -> OfferWithdrawn | None:
        """Take back one open offer that never reached its driver (its publication failed).

        Returns ``None`` if ``offer_id`` is not open. The request is queued again and the
        driver is not excluded: an offer the driver never saw is not a refusal.
        """
        offer = self._offers.get(offer_id)
        if offer is None:
            return None
        self._close(offer, "withdrawn")
        return OfferWithdrawn(offer.ride_id, offer.driver_id, offer_id)

    def _close(self, offer: Offer, how: str) -> None:
        del self._offers[offer.offer_id]
        del self._driver_offer[offer.driver_id]
        o = self._rides.get(offer.ride_id)
        if o is not None and o.offer is offer:
            o.offer = None
        self._closed[offer.offer_id] = how
        while len(self._closed) > _CLOSED_MEMORY:
            self._closed.popitem(last=False)

    # --- time --------------------------------------------------------------------

    def tick(self, now: float) -> list[OfferExpired | RideExpired]:
        """Close what timed out by ``now``, oldest first.

        First every offer with ``expires_at <= now``: an :class:`OfferExpired` each, the
        driver excluded from that request, which is queued again. Then every request
        without an open offer whose wait limit has passed (``now >= requested_at +
        max_wait_s``): a :class:`RideExpired` each, and it leaves the book.
        """
        effects: list[OfferExpired | RideExpired] = []
        expired_offers = sorted(
            (f for f in self._offers.values() if f.expires_at <= now),
            key=lambda f: (f.expires_at, f.offer_id),
        )
        for offer in expired_offers:
            self._rides[offer.ride_id].excluded.add(offer.driver_id)
            self._close(offer, "expired")
            effects.append(OfferExpired(offer.ride_id, offer.driver_id, offer.offer_id))
        late = sorted(
            (o for o in self._rides.values() if o.offer is None and now >= o.deadline),
            key=lambda o: (o.deadline, o.request.ride_id),
        )
        for o in late:
            self._leave(o.request.ride_id, "expired")
            effects.append(RideExpired(o.request.ride_id, o.request.rider_id, o.request.requested_at, now))
        return effects

    def next_deadline(self) -> float | None:
        """The earliest time at which :meth:`tick` would do something, or ``None``.

        Lets an idle shard sleep until then instead of ticking.
        """
        times = [f.expires_at for f in self._offers.values()]
        times += [o.deadline for o in self._rides.values() if o.offer is None]
        return min(times, default=None)

    # --- persistence -----------------------------------------------------------------

    def add_restored(self, record: RideRecord) -> bool:
        """Reload one stored open request (a restarted shard's), with the drivers that
        declined it or let it time out, and its open offer if one was out.

        Returns False, changing nothing, for a ride the book holds already or that left it
        (a state read before it was accepted, expired or cancelled here). An offer to a
        driver that holds another one is left out. The offer keeps its ``expires_at``, so
        one that ran out while the shard was down closes on the next :meth:`tick` (freeing
        its driver).
        """
        req = record.request
        if req.ride_id in self._rides or req.ride_id in self._gone:
            return False
        offer = record.offer
        if offer is not None and (offer.ride_id != req.ride_id or offer.offer_id in self._offers):
            offer = None
        if offer is not None and offer.driver_id in self._driver_offer:
            offer = None
        o = _Open(req, self._deadline(req), set(record.excluded_driver_ids), int(record.attempts))
        if offer is not None:
            o.offer = offer
            self._offers[offer.offer_id] = offer
            self._driver_offer[offer.driver_id] = offer.offer_id
        self._rides[req.ride_id] = o
        return True

    def snapshot(self) -> tuple[RideRecord, ...]:
        """Every open request with its exclusions, attempt count and open offer, oldest first."""
        records = [
            RideRecord(o.request, frozenset(o.excluded), o.attempts, o.offer) for o in self._rides.values()
        ]
        records.sort(key=lambda r: (r.request.requested_at, r.request.ride_id))
        return tuple(records)

    @classmethod
    def restore(cls, records: Iterable[RideRecord], config: MatchingConfig | None = None) -> RideBook:
        """Rebuild a book from stored records (a restarted shard's open rides).

        Offers come back open with their original ``expires_at``: the next tick expires
        those that ran out while the shard was down, which frees their drivers through
        the usual effect. Raises :class:`Conflict` if the records break an invariant (a
        ride twice, a driver holding two offers, an offer of another ride) and nothing is
        built.
        """
        book = cls(config)
        for rec in records:
            req = rec.request
            if req.ride_id in book._rides:
                raise Conflict(f"ride {req.ride_id!r} appears twice in the stored records")
            o = _Open(req, book._deadline(req), set(rec.excluded_driver_ids), int(rec.attempts))
            offer = rec.offer
            if offer is not None:
                if offer.ride_id != req.ride_id:
                    raise Conflict(f"stored offer {offer.offer_id} belongs to ride {offer.ride_id!r}")
                if offer.driver_id in book._driver_offer:
                    raise Conflict(f"driver {offer.driver_id} holds two stored offers")
                o.offer = offer
                book._offers[offer.offer_id] = offer
                book._driver_offer[offer.driver_id] = offer.offer_id
                # Never reuse an offer id, even if the stored counter lags the offer.
                tail = offer.offer_id.rpartition(":")[2].rpartition("-")[2]
                if tail.isdigit():
                    o.attempts = max(o.attempts, int(tail))
            book._rides[req.ride_id] = o
        return book
