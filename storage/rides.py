"""Rides and their history in Postgres: the trip state machine, made durable.

:class:`RideStore` is the only writer of ``rides`` and ``trip_events``. Every change of
a ride is one transaction that locks the ride row (``SELECT ... FOR UPDATE``), asks
:func:`dispatch.trips.next_status` whether the event is legal, bumps ``version`` by one,
stamps the status's time column and appends a ``trip_events`` row at the new version.
So the versions of a ride's applied events are exactly 1..n, and two writers racing on
one ride are serialized by the row lock; ``expected_version`` lets a caller insist on
the version it saw (optimistic concurrency: a mismatch is a Conflict, nothing changes).

Two writers feed it:

- the edge, with :meth:`RideStore.transition`, on behalf of riders, drivers and support
  (who may see or act on a ride is the edge's to decide, before it calls; this store
  checks only what the state machine allows each role, and that a driver's step comes
  from the ride's driver);
- the shards' ride records on the Redis stream, with :meth:`RideStore.apply_records`
  (a ride's records in one transaction): idempotent by the record's id, and tolerant
  of records that arrive after the ride moved on (they are kept with ``applied = false``
  and change nothing).

Two copies of one shard can be alive at once: a host cut off from the cluster keeps its
shard actor running while Ray starts the shard again elsewhere and an edge gives the new
incarnation its stored state, open offers included. Both may then record the same offer
(each expires it) under different record ids. Two guards keep that out of a ride:

- fencing: the edge registers every incarnation it restores
  (:meth:`RideStore.register_incarnation`, table ``shard_incarnations``); a record of an
  earlier incarnation of that shard made after the newer one was registered is refused
  (stored with ``applied = false`` and ``data.refused = "superseded_incarnation"``,
  counted in :attr:`RideStore.refused_superseded`). Its records made before the takeover
  are applied as usual. The comparison is of the record's ``at`` (the old actor's clock)
  with the registration time (Postgres' clock): the hosts' clocks are assumed synchronized;
- per offer: an ``offer`` whose ``offer_id`` the ride already had applied, and an
  ``offer_declined`` / ``offer_expired`` of an offer already closed (declined or timed
  out), change nothing (stored with ``applied = false``, ``data.refused = "stale_offer"``):
  without it a second expiry of an offer would close the ride's next one.

New rides and drivers' accepts of offered rides are written by statements that take
many: the edge groups what arrives at once (``grouping``, :class:`actors.batching.Batcher`
in ``api/rides.py``). A statement alone costs the edge and Postgres ~0.4 ms of CPU on a
small machine, a row of a four-row one ~0.1. Each ride in a batch gets exactly what it
would have got alone.

Ride ids are uuids (made by Postgres, or by this store for a batch of new rides); an id
that is not a uuid is simply not found.
Values arrive typed and validated at the edge (positions, amounts); Postgres' own checks
are the last guard (a violation is InvalidInput, see :mod:`storage.db`).
Connection failures raise :class:`~dispatch.errors.Unavailable` (see :mod:`storage.db`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import Any

import asyncpg

from dispatch.drivers import parse_driver_id
from dispatch.errors import (
    Conflict,
    DispatchError,
    IdempotencyMismatch,
    IllegalTransition,
    InvalidInput,
    NotFound,
    Unavailable,
)
from dispatch.numbers import is_finite_number
from dispatch.trips import FINAL_STATUSES, ActorRole, RideStatus, TripEvent, next_status
from dispatch.vocabulary import RecordKind
from storage.db import connection, parse_uuid, transaction
from storage.idempotency import check_key

# A ride row: as Postgres returned it, or as a caller saw it (RideStore.transition's ``seen``).
_RowLike = asyncpg.Record | Mapping[str, Any]

log = logging.getLogger(__name__)

OPEN_STATUSES = (RideStatus.REQUESTED.value, RideStatus.OFFERED.value)

# The time column each status stamps when a ride enters it.
_STATUS_TIME = {
    RideStatus.ACCEPTED: "accepted_at",
    RideStatus.ARRIVED: "arrived_at",
    RideStatus.IN_PROGRESS: "started_at",
    RideStatus.COMPLETED: "completed_at",
    RideStatus.CANCELLED: "cancelled_at",
    RideStatus.EXPIRED: "expired_at",
}

_TIME_COLUMNS = tuple(_STATUS_TIME.values())

_RIDE_COLUMNS = (
    "rider_id, region, shard_id, vehicle_class, pickup_lat, pickup_lng, dropoff_lat, dropoff_lng,"
    " surge_multiplier, fare_estimate_cents, currency, quote_id, idempotency_key, request_fingerprint,"
    " payment_method"
)
# Where the quote is in create_ride's arguments (in the order of _RIDE_COLUMNS).
_QUOTE_AT = _RIDE_COLUMNS.split(", ").index("quote_id")
# A new ride without a quote, in one statement. The foreign keys are checked at the end of
# the statement, when the rider row of the first part exists.
_CREATE_RIDE = (
    "WITH rider AS (INSERT INTO riders (rider_id) VALUES ($1) ON CONFLICT DO NOTHING),"
    f" ride AS (INSERT INTO rides ({_RIDE_COLUMNS})"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)"
    " ON CONFLICT (rider_id, idempotency_key) DO NOTHING RETURNING *),"
    " event AS (INSERT INTO trip_events (ride_id, version, event, status, actor_role, actor_id, at)"
    " SELECT ride_id, 1, 'request', 'requested', 'rider', $1, requested_at FROM ride)"
    " SELECT * FROM ride"
)

# The fields of a ride's history that clients see (api/services/views.py). With them, oldest first,
# the events of a ride before the statement that moves it, one array a field (RideStore._apply);
# with ``only_if``, only for the rows where that holds (NULL for the others).
HISTORY_FIELDS = ("version", "event", "status", "applied", "actor_role", "at")


def _prior_events(only_if: str | None = None) -> str:
    case, end = (f"CASE WHEN {only_if} THEN ", " END") if only_if else ("", "")
    return "".join(
        f", {case}ARRAY(SELECT {f} FROM trip_events e WHERE e.ride_id = new.ride_id ORDER BY e.id){end}"
        f" AS prior_{f}"
        for f in HISTORY_FIELDS
    )


_PRIOR_EVENTS = _prior_events()

# Many new rides in one statement (RideStore._create_batch): each value of the requests as
# an array, one element a ride. The ride ids are chosen by the caller, so each request finds
# its row; a request whose (rider, key) was used before gets none. A ride with a quote is
# written only if its quote is the rider's, of its class, unused and unexpired (locked, so
# two statements cannot both use it), takes the quote's price and marks it used; any other
# gets no row and is then done alone (RideStore.create_ride), which tells what was wrong.
# Quotes, riders and rides are locked in key order, so two edges' statements wait on each
# other's rows in the same order and cannot deadlock.
_CREATE_RIDES = (
    "WITH input AS (SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int[], $5::int[],"
    " $6::float8[], $7::float8[], $8::float8[], $9::float8[], $10::float8[], $11::int[], $12::text[],"
    " $13::uuid[], $14::text[], $15::text[], $16::text[]) AS i(ride_id, rider_id, region, shard_id,"
    " vehicle_class, pickup_lat, pickup_lng, dropoff_lat, dropoff_lng, surge_multiplier,"
    " fare_estimate_cents, currency, quote_id, idempotency_key, request_fingerprint, payment_method)),"
    " q AS (SELECT quote_id, rider_id, vehicle_class, surge_multiplier, fare_cents, currency FROM quotes"
    " WHERE quote_id IN (SELECT quote_id FROM input) AND used_by_ride IS NULL AND expires_at > now()"
    " ORDER BY quote_id FOR UPDATE),"
    " rider AS (INSERT INTO riders (rider_id) SELECT DISTINCT rider_id FROM input ORDER BY rider_id"
    " ON CONFLICT DO NOTHING),"
    f" ride AS (INSERT INTO rides (ride_id, {_RIDE_COLUMNS})"
    " SELECT i.ride_id, i.rider_id, i.region, i.shard_id, i.vehicle_class, i.pickup_lat, i.pickup_lng,"
    " i.dropoff_lat, i.dropoff_lng, COALESCE(q.surge_multiplier, i.surge_multiplier),"
    " COALESCE(q.fare_cents, i.fare_estimate_cents), COALESCE(q.currency, i.currency), i.quote_id,"
    " i.idempotency_key, i.request_fingerprint, i.payment_method FROM input i"
    " LEFT JOIN q ON q.quote_id = i.quote_id WHERE i.quote_id IS NULL"
    " OR (q.rider_id = i.rider_id AND q.vehicle_class = i.vehicle_class)"
    " ORDER BY i.rider_id, i.idempotency_key"
    " ON CONFLICT (rider_id, idempotency_key) DO NOTHING RETURNING *),"
    " used AS (UPDATE quotes SET used_by_ride = ride.ride_id FROM ride"
    " WHERE quotes.quote_id = ride.quote_id),"
    " event AS (INSERT INTO trip_events (ride_id, version, event, status, actor_role, actor_id, at)"
    " SELECT ride_id, 1, 'request', 'requested', 'rider', rider_id, requested_at FROM ride)"
    " SELECT * FROM ride"
)

# Many drivers' accepts of rides still offered to no driver in one statement
# (RideStore._accept_batch), as RideStore._apply does one: a ride that is not (any more)
# offered to no driver is left alone and returns no row. Drivers in id order, as above.
_ACCEPT_OFFERED = (
    "WITH input AS (SELECT * FROM unnest($1::uuid[], $2::bigint[], $3::text[], $4::text[], $5::bool[])"
    " AS i(ride_id, driver_id, actor_id, data, history)),"
    " driver AS (INSERT INTO drivers (driver_id) SELECT DISTINCT driver_id FROM input"
    " ORDER BY driver_id ON CONFLICT DO NOTHING),"
    " new AS (UPDATE rides r SET status = $6, version = r.version + 1, updated_at = $7,"
    f" {_STATUS_TIME[RideStatus.ACCEPTED]} = $7, driver_id = i.driver_id FROM input i"
    " WHERE r.ride_id = i.ride_id AND r.status = 'offered' AND r.driver_id IS NULL RETURNING r.*),"
    " event AS (INSERT INTO trip_events"
    " (ride_id, version, event, status, actor_role, actor_id, data, source, at)"
    " SELECT n.ride_id, n.version, 'accept', n.status, 'driver', i.actor_id, i.data::jsonb, NULL, $7"
    " FROM new n JOIN input i USING (ride_id))"
    # With its history before the accept for an accept that asked for it (as _apply).
    f" SELECT new.*{_prior_events(only_if='i.history')}"
    " FROM new JOIN input i USING (ride_id)"
)

_ACTIVE_TRIPS = (
    "SELECT ride_id, rider_id, driver_id, shard_id FROM rides WHERE region = $1"
    " AND status IN ('accepted', 'arrived', 'in_progress') AND driver_id IS NOT NULL"
)


def _fill_history(history: list[dict[str, Any]], moved: asyncpg.Record, ev: TripEvent, rl: ActorRole) -> None:
    """``history`` made the ride's history after the statement that moved it by ``ev``:
    the events before it (its ``prior_*`` arrays) and the one it added."""
    history[:] = [
        dict(zip(HISTORY_FIELDS, (*e[:5], e[5].isoformat()), strict=True))
        for e in zip(*(moved[f"prior_{f}"] for f in HISTORY_FIELDS), strict=True)
    ]
    history.append(
        {
            "version": moved["version"],
            "event": ev.value,
            "status": moved["status"],
            "applied": True,
            "actor_role": rl.value,
            "at": moved["updated_at"].isoformat(),
        }
    )


# Writes that one statement makes many of (RideStore._create_batch, _accept_batch): given
# the name of the kind and the function writing a list of them (answering, in order, each
# one's outcome: a value or the exception it failed with), a function writing one.
WriteMany = Callable[[list[Any]], Awaitable[list[Any]]]
Grouping = Callable[[str, WriteMany], Callable[[Any], Awaitable[Any]]]


def one_at_a_time(name: str, write_many: WriteMany) -> Callable[[Any], Awaitable[Any]]:
    """The grouping of no grouping: each write a list of one."""

    async def write(item: Any) -> Any:
        (outcome,) = await write_many([item])
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return write


async def _outcome(write: Awaitable[Any]) -> Any:
    """What ``write`` returned, or the DispatchError it raised (one item's outcome of a batch)."""
    try:
        return await write
    except Unavailable:
        raise
    except DispatchError as exc:
        return exc


def _trip_items(rows: Any) -> list[dict[str, Any]]:
    return [
        {
            "driver_id": int(t["driver_id"]),
            "ride_id": str(t["ride_id"]),
            "rider_id": t["rider_id"],
            "ride_shard": int(t["shard_id"]),
        }
        for t in rows
    ]


# A shard's record kind -> (the trip event it is, who caused it).
RECORD_EVENTS: dict[str, tuple[TripEvent, ActorRole]] = {
    RecordKind.OFFERED: (TripEvent.OFFER, ActorRole.SYSTEM),
    RecordKind.OFFER_DECLINED: (TripEvent.OFFER_DECLINED, ActorRole.DRIVER),
    RecordKind.OFFER_EXPIRED: (TripEvent.OFFER_EXPIRED, ActorRole.SYSTEM),
    # The driver went offline with the offer open: for the ride, the same as a timeout.
    RecordKind.OFFER_WITHDRAWN: (TripEvent.OFFER_EXPIRED, ActorRole.SYSTEM),
    RecordKind.EXPIRED: (TripEvent.EXPIRE, ActorRole.SYSTEM),
    RecordKind.CANCELLED: (TripEvent.CANCEL, ActorRole.RIDER),
}


@dataclass(frozen=True, slots=True)
class Ride:
    """One ``rides`` row. Times are aware datetimes (UTC); ids of uuids are strings."""

    ride_id: str
    rider_id: str
    driver_id: int | None
    region: str
    shard_id: int
    vehicle_class: int
    pickup_lat: float
    pickup_lng: float
    dropoff_lat: float
    dropoff_lng: float
    status: RideStatus
    version: int
    quote_id: str | None
    surge_multiplier: float
    fare_estimate_cents: int
    currency: str
    final_fare_cents: int | None
    distance_m: float | None
    duration_s: float | None
    cancel_by: str | None
    cancel_fee_cents: int | None
    requested_at: datetime
    accepted_at: datetime | None
    arrived_at: datetime | None
    started_at: datetime | None
    completed_at: datetime | None
    cancelled_at: datetime | None
    expired_at: datetime | None
    updated_at: datetime
    payment_method: str = "wallet"

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Ride:
        kw = {name: row[name] for name in _RIDE_FIELDS}
        kw["ride_id"] = str(kw["ride_id"])
        kw["quote_id"] = str(kw["quote_id"]) if kw["quote_id"] is not None else None
        kw["status"] = RideStatus(kw["status"])
        return cls(**kw)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict: every column, times in ISO 8601, status as its string."""
        out: dict[str, Any] = {}
        for name in _RIDE_FIELDS:
            v = getattr(self, name)
            out[name] = v.isoformat() if isinstance(v, datetime) else v
        out["status"] = self.status.value
        return out

    def to_request(self) -> dict[str, Any]:
        """The keyword arguments of a :class:`dispatch.rides.RideRequest` for this ride."""
        return {
            "ride_id": self.ride_id,
            "rider_id": self.rider_id,
            "pickup_lat": self.pickup_lat,
            "pickup_lng": self.pickup_lng,
            "dropoff_lat": self.dropoff_lat,
            "dropoff_lng": self.dropoff_lng,
            "vehicle_class": self.vehicle_class,
            "requested_at": self.requested_at.timestamp(),
            "quote_id": self.quote_id,
            "surge_multiplier": float(self.surge_multiplier),
        }


# Ride's fields, looked up once (dataclasses.fields() builds its tuple at every call).
_RIDE_FIELDS = tuple(f.name for f in fields(Ride))


# A well-formed ride record: (ride id, event, who caused it, data, time or None for now).
_Parsed = tuple[uuid.UUID, TripEvent, ActorRole, dict[str, Any], datetime | None]

_BASE36 = "0123456789abcdefghijklmnopqrstuvwxyz"
# The events that close an offer: they name the offer they close.
_OFFER_CLOSERS = (TripEvent.OFFER_DECLINED, TripEvent.OFFER_EXPIRED)


def record_incarnation(record_id: object) -> tuple[int, str] | None:
    """``(shard id, incarnation)`` of a shard's record id ``"<shard>:<incarnation>:<seq>"``
    (``actors/events.py``); None for any other source (a stream message id)."""
    if not isinstance(record_id, str):
        return None
    parts = record_id.split(":")
    if len(parts) != 3 or not parts[0].isdigit() or not parts[1]:
        return None
    return int(parts[0]), parts[1]


def incarnation_started(token: str) -> float | None:
    """When the incarnation ``token`` started (epoch seconds): its leading characters are
    milliseconds in base 36, the last two random (``actors.shard_actor.incarnation_token``).
    None for a token not of that form."""
    digits = token[:-2]
    if not digits or any(c not in _BASE36 for c in digits):
        return None
    return int(digits, 36) / 1000.0


def superseded_at(incarnations: list[tuple[str, float]], token: str) -> tuple[float, str] | None:
    """When incarnation ``token`` of a shard was superseded, and by which: the first of the
    shard's registered ``(incarnation, since)`` registered after it (after its own
    registration, or after its start for one not registered); None while it is the newest."""
    mine = next((since for inc, since in incarnations if inc == token), None)
    if mine is None:
        mine = incarnation_started(token)
        if mine is None:
            return None
    later = [(since, inc) for inc, since in incarnations if inc != token and since > mine]
    return min(later) if later else None


_uuid = parse_uuid


def _uuids(ids: Iterable[str]) -> list[uuid.UUID]:
    """The ride uuids among ``ids`` (an id that is not a uuid names no ride)."""
    return [u for u in map(parse_uuid, ids) if u is not None]


def _digest(*values: object) -> str:
    """sha256 (hex) of ``values``: what a ride request asked for, when no fingerprint came."""
    return hashlib.sha256(json.dumps(values, default=str).encode()).hexdigest()


def _jsonable(data: dict[str, Any] | None) -> dict[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvalidInput(f"event data must be a JSON object, got {type(data).__name__}")
    plain: dict[str, Any] = json.loads(json.dumps(data, default=str))
    return plain


def _opt_number(data: dict[str, Any], key: str, integer: bool) -> int | float | None:
    v = data.get(key)
    if v is None:
        return None
    ok = is_finite_number(v) and v >= 0
    if not ok or (integer and int(v) != v):
        raise InvalidInput(f"{key} must be a {'whole ' if integer else ''}number >= 0, got {v!r}")
    return int(v) if integer else float(v)


def _record_time(at: object) -> datetime | None:
    """The shard's epoch ``at`` as a datetime; None (meaning now) if it is not a sane time."""
    if not is_finite_number(at) or at <= 0:
        return None
    try:
        return datetime.fromtimestamp(at, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return None


def _enum(enum: Any, value: object, what: str) -> Any:
    try:
        return enum(value)
    except ValueError:
        raise InvalidInput(f"unknown {what} {value!r}", **{what: str(value)}) from None


def _driver_of(actor_id: str, driver_id: int | None) -> int:
    """The driver a driver's step is written for: ``driver_id``, else the id in the driver
    subject ``actor_id``. Who the caller is was the edge's to establish."""
    if driver_id is not None:
        return int(driver_id)
    if isinstance(actor_id, str) and actor_id.isdigit():
        return int(actor_id)
    return parse_driver_id(actor_id)


def _record_actor(role: ActorRole, data: dict[str, Any], rider_id: str, shard_id: object) -> str:
    """Who a shard's record speaks for in the ride's history: the driver, the rider, or
    the shard itself."""
    if role == ActorRole.DRIVER:
        return str(data.get("driver_id", "unknown"))
    if role == ActorRole.RIDER:
        return rider_id
    return f"shard-{shard_id}"


class RideStore:
    """Rides, their transitions and their history (see the module docstring)."""

    def __init__(self, pool: asyncpg.Pool, *, grouping: Grouping | None = None) -> None:
        self.pool = pool
        # New rides and drivers' accepts are written by statements that take many: how
        # the single writes are grouped into them is the caller's (the edge batches them,
        # api/rides.py); without a grouping each is a statement of its own.
        group = grouping or one_at_a_time
        self._create = group("create_ride", self._create_batch)
        self._accept = group("accept", self._accept_batch)
        self._bad_records_logged: set[str] = set()
        # Records refused (stored, not applied) by the guards of the module docstring.
        self.refused_superseded = 0
        self.refused_stale_offer = 0
        self._fenced_logged: set[tuple[int, str]] = set()

    # -- shard incarnations -----------------------------------------------------------------

    async def latest_incarnation_at(self, region: str) -> float | None:
        """When a shard of the region last restarted (epoch seconds): the newest incarnation
        registered after an earlier one of its shard. None if none was: a shard's first
        incarnation took over from nothing, so no trip link can have been lost with it."""
        async with connection(self.pool) as conn:
            since = await conn.fetchval(
                "SELECT extract(epoch FROM max(i.since))::float8 FROM shard_incarnations i"
                " WHERE i.region = $1 AND EXISTS (SELECT 1 FROM shard_incarnations e"
                " WHERE e.region = i.region AND e.shard_id = i.shard_id AND e.since < i.since)",
                region,
            )
        return float(since) if since is not None else None

    async def register_incarnation(self, region: str, shard_id: int, incarnation: str) -> float:
        """Record that ``incarnation`` of the shard takes over from now (idempotent: a second
        registration keeps the first time); returns its registration time (epoch seconds).
        Records of the shard's earlier incarnations made after it are refused
        (:meth:`apply_records`). Call before reading the state the incarnation is given."""
        if not (isinstance(incarnation, str) and incarnation and ":" not in incarnation):
            raise InvalidInput(f"bad incarnation {incarnation!r}")
        async with connection(self.pool) as conn:
            since = await conn.fetchval(
                "WITH ins AS (INSERT INTO shard_incarnations (region, shard_id, incarnation)"
                " VALUES ($1, $2, $3) ON CONFLICT DO NOTHING RETURNING since)"
                " SELECT since FROM ins UNION ALL SELECT since FROM shard_incarnations"
                " WHERE region = $1 AND shard_id = $2 AND incarnation = $3 LIMIT 1",
                region,
                int(shard_id),
                incarnation,
            )
        return float(since.timestamp())

    async def incarnations(self, region: str, shard_id: int) -> list[tuple[str, float]]:
        """The shard's registered ``(incarnation, since)``, oldest first."""
        async with connection(self.pool) as conn:
            rows = await conn.fetch(
                "SELECT incarnation, since FROM shard_incarnations WHERE region = $1 AND shard_id = $2"
                " ORDER BY since",
                region,
                int(shard_id),
            )
        return [(r["incarnation"], r["since"].timestamp()) for r in rows]

    # -- creating ---------------------------------------------------------------------------

    async def create_ride(
        self,
        *,
        rider_id: str,
        region: str,
        shard_id: int,
        vehicle_class: int,
        pickup: tuple[float, float],
        dropoff: tuple[float, float],
        surge_multiplier: float,
        fare_estimate_cents: int,
        currency: str,
        quote_id: str | None = None,
        idempotency_key: str | None = None,
        fingerprint: str | None = None,
        payment_method: str = "wallet",
    ) -> tuple[Ride, bool]:
        """Store a new requested ride (version 1, with its ``request`` event); ``(ride, created)``.

        With ``idempotency_key``: the first call creates the ride; a call with the same
        ``(rider_id, key)`` and the same ``fingerprint`` returns that ride with
        ``created=False`` (also when the calls race: one creates, the others wait for it
        and get it); another fingerprint raises IdempotencyMismatch. The fingerprint is
        the caller's (the edge makes it from the request, ``api/fingerprints.py``);
        without one, a digest of the ride's own values stands in.

        With ``quote_id``: the quote must exist and belong to the rider (else InvalidInput),
        be of the same vehicle class (InvalidInput), not be expired or used by another
        ride (Conflict); it is then marked used, and the ride takes the quote's surge
        multiplier, fare and currency (the caller's are ignored). Nothing is stored when
        anything is refused. Positions arrive validated (the edge's boundary); Postgres' range
        checks refuse an impossible one (InvalidInput), as they do other bad values.
        """
        if not (isinstance(rider_id, str) and rider_id):
            raise InvalidInput("rider_id must be a non-empty string")
        if not (isinstance(surge_multiplier, int | float) and surge_multiplier >= 1):
            raise InvalidInput(f"surge_multiplier must be >= 1, got {surge_multiplier!r}")
        if not (isinstance(fare_estimate_cents, int) and fare_estimate_cents >= 0):
            raise InvalidInput(f"fare_estimate_cents must be an integer >= 0, got {fare_estimate_cents!r}")
        if payment_method not in ("wallet", "cash", "card"):
            raise InvalidInput(f"payment_method must be wallet, cash or card, got {payment_method!r}")
        qid = None
        if quote_id is not None:
            qid = _uuid(quote_id)
            if qid is None:
                raise InvalidInput(f"unknown quote {quote_id!r}", quote_id=str(quote_id))
        if idempotency_key is not None:
            check_key(idempotency_key)
            if fingerprint is None:
                fingerprint = _digest(region, vehicle_class, pickup, dropoff, qid, payment_method)
        args = (
            rider_id,
            region,
            int(shard_id),
            int(vehicle_class),
            float(pickup[0]),
            float(pickup[1]),
            float(dropoff[0]),
            float(dropoff[1]),
            float(surge_multiplier),
            fare_estimate_cents,
            currency,
            qid,
            idempotency_key,
            fingerprint,
            payment_method,
        )
        # In one statement with the other rides requested meanwhile (one round trip instead
        # of five): the rider, the ride, its quote used and its first event, atomically.
        row = await self._create(args)
        if row is not None:
            return Ride.from_row(row), True
        if qid is None:
            async with connection(self.pool) as conn:
                return await self._existing_ride(conn, rider_id, idempotency_key, fingerprint), False
        # Not written (a key used before, or a quote not there to use): alone, on the locked
        # quote, which tells which.
        async with transaction(self.pool) as conn:
            await conn.execute("INSERT INTO riders (rider_id) VALUES ($1) ON CONFLICT DO NOTHING", rider_id)
            row = await conn.fetchrow(
                f"INSERT INTO rides ({_RIDE_COLUMNS})"
                " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)"
                " ON CONFLICT (rider_id, idempotency_key) DO NOTHING RETURNING *",
                *args,
            )
            if row is None:  # the key was used before (perhaps a moment ago, by a racing call)
                return await self._existing_ride(conn, rider_id, idempotency_key, fingerprint), False
            if qid is not None:
                row = await self._use_quote(conn, row, qid, rider_id, int(vehicle_class))
            await conn.execute(
                "INSERT INTO trip_events (ride_id, version, event, status, actor_role, actor_id, at)"
                " VALUES ($1, 1, 'request', 'requested', 'rider', $2, $3)",
                row["ride_id"],
                rider_id,
                row["requested_at"],
            )
        return Ride.from_row(row), True

    async def _create_batch(
        self, batch: list[tuple[Any, ...]]
    ) -> list[asyncpg.Record | None | BaseException]:
        """:meth:`create_ride`'s statement for each of ``batch`` (its arguments, in the order
        of ``_RIDE_COLUMNS``): the new ride's row, or None when it was not written (its key
        was used before, or its quote cannot be used; a second ride with one quote is left
        for later too). If Postgres refuses the statement (a value its checks refuse), each
        ride is tried alone, so only the refused one fails."""
        quoted: set[uuid.UUID] = set()
        take = []
        for args in batch:
            qid = args[_QUOTE_AT]
            take.append(qid is None or qid not in quoted)
            if qid is not None:
                quoted.add(qid)
        if len(batch) == 1 and batch[0][_QUOTE_AT] is None:
            return [await self._create_alone(batch[0])]
        items = [args for args, ok in zip(batch, take, strict=True) if ok]
        ids = [uuid.uuid4() for _ in items]
        try:
            async with connection(self.pool) as conn:
                rows = await conn.fetch(_CREATE_RIDES, ids, *zip(*items, strict=True))
        except Unavailable:
            raise
        except DispatchError:
            return [
                await _outcome(self._create_alone(args)) if args[_QUOTE_AT] is None else None
                for args in batch
            ]
        by_id = {row["ride_id"]: row for row in rows}
        written = iter(by_id.get(ride_id) for ride_id in ids)
        return [next(written) if ok else None for ok in take]

    async def _create_alone(self, args: tuple[Any, ...]) -> asyncpg.Record | None:
        async with connection(self.pool) as conn:
            return await conn.fetchrow(_CREATE_RIDE, *args)

    async def _existing_ride(
        self, conn: asyncpg.Connection, rider_id: str, key: str | None, fingerprint: str | None
    ) -> Ride:
        """The ride an earlier request with this key created; IdempotencyMismatch if it asked
        for something else."""
        prev = await conn.fetchrow(
            "SELECT * FROM rides WHERE rider_id = $1 AND idempotency_key = $2", rider_id, key
        )
        assert prev is not None  # the insert with this key conflicted, so the ride exists
        if prev["request_fingerprint"] != fingerprint:
            raise IdempotencyMismatch(
                "this Idempotency-Key was used for a different ride request", ride_id=str(prev["ride_id"])
            )
        return Ride.from_row(prev)

    async def _use_quote(
        self, conn: asyncpg.Connection, ride: asyncpg.Record, qid: uuid.UUID, rider_id: str, vclass: int
    ) -> asyncpg.Record:
        q = await conn.fetchrow(
            "SELECT *, expires_at <= now() AS expired FROM quotes WHERE quote_id = $1 FOR UPDATE", qid
        )
        if q is None or q["rider_id"] != rider_id:
            raise InvalidInput(f"unknown quote {qid}", quote_id=str(qid))
        if q["vehicle_class"] != vclass:
            raise InvalidInput(
                f"quote {qid} is for vehicle class {q['vehicle_class']}, not {vclass}", quote_id=str(qid)
            )
        if q["used_by_ride"] is not None:
            raise Conflict(f"quote {qid} was already used", quote_id=str(qid), ride_id=str(q["used_by_ride"]))
        if q["expired"]:
            raise Conflict(f"quote {qid} has expired; ask for a new one", quote_id=str(qid))
        await conn.execute("UPDATE quotes SET used_by_ride = $2 WHERE quote_id = $1", qid, ride["ride_id"])
        row = await conn.fetchrow(
            "UPDATE rides SET surge_multiplier = $2, fare_estimate_cents = $3, currency = $4"
            " WHERE ride_id = $1 RETURNING *",
            ride["ride_id"],
            q["surge_multiplier"],
            q["fare_cents"],
            q["currency"],
        )
        assert row is not None  # the ride is locked by this transaction
        return row

    # -- reading ------------------------------------------------------------------------------

    async def get(self, ride_id: str) -> Ride | None:
        """The ride, or None (also for an id that is not a uuid)."""
        rid = _uuid(ride_id)
        if rid is None:
            return None
        async with connection(self.pool) as conn:
            row = await conn.fetchrow("SELECT * FROM rides WHERE ride_id = $1", rid)
        return Ride.from_row(row) if row is not None else None

    async def get_many(self, ride_ids: Iterable[str]) -> list[Ride]:
        """The rides of ``ride_ids`` that exist (ids that are not uuids name none), in one
        query."""
        ids = _uuids(ride_ids)
        if not ids:
            return []
        async with connection(self.pool) as conn:
            rows = await conn.fetch("SELECT * FROM rides WHERE ride_id = ANY($1::uuid[])", ids)
        return [Ride.from_row(r) for r in rows]

    async def events(self, ride_id: str) -> list[dict[str, Any]]:
        """The ride's history, oldest first: JSON-able dicts (``at`` in ISO 8601)."""
        rid = _uuid(ride_id)
        if rid is None:
            return []
        async with connection(self.pool) as conn:
            rows = await conn.fetch(
                "SELECT id, ride_id, version, event, status, applied, actor_role, actor_id, data, source, at"
                " FROM trip_events WHERE ride_id = $1 ORDER BY id",
                rid,
            )
        return [{**dict(r), "ride_id": str(r["ride_id"]), "at": r["at"].isoformat()} for r in rows]

    async def rides_of_rider(self, rider_id: str, limit: int = 20) -> list[Ride]:
        """The rider's latest rides, newest first (at most ``limit``, capped at 100)."""
        limit = max(1, min(int(limit), 100))
        async with connection(self.pool) as conn:
            rows = await conn.fetch(
                "SELECT * FROM rides WHERE rider_id = $1 ORDER BY requested_at DESC, ride_id LIMIT $2",
                rider_id,
                limit,
            )
        return [Ride.from_row(r) for r in rows]

    async def open_rides(self, region: str, shard_id: int | None = None) -> list[dict[str, Any]]:
        """The rides of ``region`` (and shard) still requested or offered, oldest first.

        Each as the keyword arguments of :class:`dispatch.rides.RideRequest` (ride ids as
        strings, ``requested_at`` in epoch seconds): what a restarted shard reloads.
        """
        sql = "SELECT * FROM rides WHERE status IN ('requested', 'offered') AND region = $1"
        args: list[Any] = [region]
        if shard_id is not None:
            sql += " AND shard_id = $2"
            args.append(int(shard_id))
        async with connection(self.pool) as conn:
            rows = await conn.fetch(sql + " ORDER BY requested_at, ride_id", *args)
        return [Ride.from_row(r).to_request() for r in rows]

    async def restore_state(self, region: str, shard_id: int) -> dict[str, Any]:
        """What a restarted shard must know before it offers anything (see
        :meth:`dispatch.dispatcher.Dispatcher.restore_state`), in one snapshot:

        - ``rides``: the shard's open rides as :meth:`open_rides` gives them, each with
          ``excluded_driver_ids`` (drivers that declined it or let an offer time out; a
          withdrawn offer excludes nobody) and, for an ``offered`` ride, its open ``offer``;
        - ``trips``: every ride of the region past acceptance and not finished, with its
          driver (a driver may have carried its trip into this shard from another).
        """
        async with transaction(self.pool) as conn:
            rows = await conn.fetch(
                "SELECT * FROM rides WHERE status IN ('requested', 'offered') AND region = $1"
                " AND shard_id = $2 ORDER BY requested_at, ride_id",
                region,
                int(shard_id),
            )
            ids = [r["ride_id"] for r in rows]
            events = await conn.fetch(
                "SELECT ride_id, event, data, at, applied FROM trip_events WHERE ride_id = ANY($1::uuid[])"
                " AND event IN ('offer', 'offer_declined', 'offer_expired') ORDER BY id",
                ids,
            )
            trips = await conn.fetch(_ACTIVE_TRIPS, region)
        excluded: dict[Any, set[int]] = {}
        last_offer: dict[Any, dict[str, Any] | None] = {}
        for e in events:
            data = e["data"] if isinstance(e["data"], dict) else json.loads(e["data"] or "{}")
            rid = e["ride_id"]
            # The open offer is the last applied one not closed since: a record that
            # changed nothing (late, or refused) opens and closes nothing.
            if e["event"] == "offer":
                if e["applied"]:
                    last_offer[rid] = {**data, "at": e["at"].timestamp()}
                continue
            if e["applied"]:
                last_offer[rid] = None
            driver = data.get("driver_id")
            if data.get("record") == "offer_withdrawn" or not isinstance(driver, int):
                continue
            excluded.setdefault(rid, set()).add(driver)
        out_rides = []
        for r in rows:
            item = Ride.from_row(r).to_request()
            item["excluded_driver_ids"] = sorted(excluded.get(r["ride_id"], ()))
            offer = last_offer.get(r["ride_id"])
            if r["status"] == RideStatus.OFFERED.value and offer and "offer_id" in offer:
                try:
                    item["offer"] = {
                        "offer_id": str(offer["offer_id"]),
                        "driver_id": int(offer["driver_id"]),
                        "offered_at": float(offer["at"]),
                        "expires_at": float(offer["expires_at"]),
                    }
                except (KeyError, TypeError, ValueError):
                    pass
            out_rides.append(item)
        return {"rides": out_rides, "trips": _trip_items(trips)}

    async def active_trips(self, region: str) -> list[dict[str, Any]]:
        """Every ride of the region past acceptance and not finished, with its driver, as
        :meth:`restore_state` gives ``trips`` (``{driver_id, ride_id, rider_id, ride_shard}``)."""
        async with connection(self.pool) as conn:
            return _trip_items(await conn.fetch(_ACTIVE_TRIPS, region))

    async def ended(self, ride_ids: Iterable[str]) -> set[str]:
        """Which of ``ride_ids`` Postgres has ended (completed, cancelled or expired); ids
        that are not ride UUIDs are none of them."""
        ids = _uuids(ride_ids)
        if not ids:
            return set()
        async with connection(self.pool) as conn:
            rows = await conn.fetch(
                "SELECT ride_id::text FROM rides"
                " WHERE ride_id = ANY($1::uuid[]) AND status = ANY($2::text[])",
                ids,
                sorted(s.value for s in FINAL_STATUSES),
            )
        return {r["ride_id"] for r in rows}

    async def completed_without_charge(self, older_than_s: float, limit: int = 100) -> list[Ride]:
        """Completed rides, completed over ``older_than_s`` ago, with no charge payment at
        all (not even a failed one), oldest first."""
        async with connection(self.pool) as conn:
            rows = await conn.fetch(
                "SELECT * FROM rides r WHERE r.status = 'completed'"
                " AND r.completed_at < now() - make_interval(secs => $1)"
                " AND NOT EXISTS (SELECT 1 FROM payments p WHERE p.ride_id = r.ride_id AND p.kind = 'charge')"
                " ORDER BY r.completed_at LIMIT $2",
                float(older_than_s),
                int(limit),
            )
        return [Ride.from_row(r) for r in rows]

    async def open_requested_before(self, age_s: float, limit: int = 100) -> list[str]:
        """Ids of rides still requested or offered that were requested over ``age_s`` ago."""
        async with connection(self.pool) as conn:
            rows = await conn.fetch(
                "SELECT ride_id FROM rides WHERE status IN ('requested', 'offered')"
                " AND requested_at < now() - make_interval(secs => $1) ORDER BY requested_at LIMIT $2",
                float(age_s),
                int(limit),
            )
        return [str(r["ride_id"]) for r in rows]

    async def active_trips_idle(self, age_s: float, limit: int = 100) -> list[Ride]:
        """Rides accepted, arrived or in progress that have not changed for ``age_s``,
        least recently changed first: the candidates for an orphaned trip."""
        async with connection(self.pool) as conn:
            rows = await conn.fetch(
                "SELECT * FROM rides WHERE status IN ('accepted', 'arrived', 'in_progress')"
                " AND updated_at < now() - make_interval(secs => $1) ORDER BY updated_at LIMIT $2",
                float(age_s),
                int(limit),
            )
        return [Ride.from_row(r) for r in rows]

    # -- changing -------------------------------------------------------------------------------

    async def transition(
        self,
        ride_id: str,
        event: TripEvent | str,
        role: ActorRole | str,
        actor_id: str,
        *,
        expected_version: int | None = None,
        driver_id: int | None = None,
        data: dict[str, Any] | None = None,
        offer_pending: bool = False,
        seen: Ride | None = None,
        history: list[dict[str, Any]] | None = None,
    ) -> Ride:
        """Apply ``event`` caused by ``role``/``actor_id`` to the ride; return the ride after it.

        Checks, in this order, with nothing changed when one fails:

        - the ride exists (NotFound, also for an id that is not a uuid);
        - ``expected_version``, if given, is the ride's version (Conflict, ``detail``
          carries ``current_version`` and ``status``);
        - for a driver's step, ``driver_id`` (or the driver subject ``actor_id``, "drv-42"
          or "42"; InvalidInput for anything else) is the ride's
          driver (Conflict, ``detail.reason`` "other_driver"), except before any driver
          accepted, when the shard that made the offer vouched for the driver of
          ``accept`` and ``offer_declined``. Whether the caller may act on the ride at
          all (its rider, its driver, support) is the edge's to check before calling;
        - the state machine allows it (IllegalTransition, InvalidInput for unknown names).

        ``accept`` sets ``driver_id`` on the ride. ``data`` (a JSON object) is stored with the event;
        on ``complete`` its ``final_fare_cents``, ``distance_m``, ``duration_s`` and on
        ``cancel`` its ``cancel_fee_cents`` are also set on the ride.

        ``offer_pending``: for an ``accept`` the shard already granted. The shard's
        ``offered`` record travels through Redis and may not have been applied yet; with
        this flag a ride still ``requested`` first gets the system's ``offer`` (one more
        version), and the late record is then stored as not applied.

        ``seen``: the ride as the caller just read it. The transition is then first tried
        in one statement that applies only if the ride is still at that version (one round
        trip instead of four: no transaction, no lock); if it moved on meanwhile, or the
        checks fail on what was seen, it is done as without ``seen``, on the locked row.
        Without ``seen``, an ``accept`` with ``offer_pending`` is first tried the same way on
        a ride still ``offered`` to no driver (the usual state when a driver answers: the
        shard's record came long before), so an accept needs no read of the ride.

        ``history``: a list to fill with the ride's history after the transition, as
        :meth:`events` gives it (the fields clients see), read by the same statement.
        """
        rid = _uuid(ride_id)
        if rid is None:
            raise NotFound(f"no ride {ride_id!r}", ride_id=str(ride_id))
        ev, rl = _enum(TripEvent, event, "event"), _enum(ActorRole, role, "role")
        payload = _jsonable(data)
        # First, in one statement on the ride as it is assumed to be: as the caller saw it
        # (applied only if still at that version), or, for a granted accept with nothing
        # seen, still offered to no driver. Judged stale, it is decided on the locked row.
        assumed: _RowLike | None = None
        if seen is not None and seen.ride_id == str(rid):
            assumed = {
                "ride_id": rid,
                "status": seen.status.value,
                "version": seen.version,
                "driver_id": seen.driver_id,
            }
        elif seen is None and offer_pending and ev == TripEvent.ACCEPT and expected_version is None:
            assumed = {"ride_id": rid, "status": RideStatus.OFFERED.value, "driver_id": None}
        if assumed is not None:
            try:
                acting_driver = self._check(assumed, ev, rl, actor_id, driver_id, expected_version)
                if (
                    offer_pending
                    and ev == TripEvent.ACCEPT
                    and assumed["status"] == RideStatus.REQUESTED.value
                ):
                    raise Conflict("two events: needs the lock")  # the locked path below does both
                if seen is None:
                    # A granted accept of a ride offered to no driver: with the others
                    # arriving meanwhile, in one statement.
                    moved = await self._accept(
                        (rid, acting_driver, str(actor_id), payload, history is not None)
                    )
                    if moved is not None and history is not None:
                        _fill_history(history, moved, ev, rl)
                else:
                    async with connection(self.pool) as conn:
                        moved = await self._apply(
                            conn,
                            assumed,
                            ev,
                            rl,
                            actor_id,
                            payload,
                            driver_id=acting_driver,
                            if_version=seen.version,
                            history=history,
                        )
                if moved is not None:
                    return Ride.from_row(moved)
            except (Conflict, IllegalTransition, InvalidInput):
                pass  # judged on what may be stale: decided again below, on the locked row
        async with transaction(self.pool) as conn:
            row = await conn.fetchrow("SELECT * FROM rides WHERE ride_id = $1 FOR UPDATE", rid)
            if row is None:
                raise NotFound(f"no ride {ride_id}", ride_id=str(ride_id))
            acting_driver = self._check(row, ev, rl, actor_id, driver_id, expected_version)
            if offer_pending and ev == TripEvent.ACCEPT and row["status"] == RideStatus.REQUESTED.value:
                implied = {"driver_id": acting_driver, "implied_by": "accept"}
                row = await self._apply(conn, row, TripEvent.OFFER, ActorRole.SYSTEM, "shard", implied)
                assert row is not None  # locked: it moved
            row = await self._apply(
                conn, row, ev, rl, actor_id, payload, driver_id=acting_driver, history=history
            )
        assert row is not None  # the ride is locked by this transaction
        return Ride.from_row(row)

    async def _accept_batch(
        self, batch: list[tuple[Any, ...]]
    ) -> list[asyncpg.Record | None | BaseException]:
        """The accepts of ``batch`` (ride id, driver id, actor id, data, whether its history
        is wanted: the row then carries it, see :func:`_fill_history`), each applied only
        to a ride still offered to no driver: its new row, or None for a ride that was not
        (:meth:`transition` then decides it on the locked row). A ride twice in the batch,
        or a statement Postgres refuses, is done one accept at a time."""
        first: dict[uuid.UUID, int] = {}
        for i, item in enumerate(batch):
            first.setdefault(item[0], i)
        out: list[asyncpg.Record | None | BaseException] = [None] * len(batch)
        together = sorted(first.values()) if len(first) > 1 else []
        if together:
            items = [batch[i] for i in together]
            target = next_status(RideStatus.OFFERED.value, TripEvent.ACCEPT, ActorRole.DRIVER)
            try:
                async with connection(self.pool) as conn:
                    rows = await conn.fetch(
                        _ACCEPT_OFFERED,
                        [rid for rid, _, _, _, _ in items],
                        [driver for _, driver, _, _, _ in items],
                        [actor for _, _, actor, _, _ in items],
                        [json.dumps(data) for _, _, _, data, _ in items],
                        [history for _, _, _, _, history in items],
                        target.value,
                        datetime.now(UTC),
                    )
            except Unavailable:
                raise
            except DispatchError:
                together = []  # each alone, below
            else:
                by_id = {row["ride_id"]: row for row in rows}
                for i in together:
                    out[i] = by_id.get(batch[i][0])
        done = set(together)
        for i, item in enumerate(batch):
            if i not in done:
                out[i] = await _outcome(self._accept_alone(*item))
        return out

    async def _accept_alone(
        self, rid: uuid.UUID, driver_id: int, actor_id: str, data: dict[str, Any], history: bool
    ) -> asyncpg.Record | None:
        offered: _RowLike = {"ride_id": rid, "status": RideStatus.OFFERED.value, "driver_id": None}
        async with connection(self.pool) as conn:
            return await self._apply(
                conn,
                offered,
                TripEvent.ACCEPT,
                ActorRole.DRIVER,
                actor_id,
                data,
                driver_id=driver_id,
                if_offered=True,
                history=[] if history else None,  # the row then carries it (_fill_history)
            )

    @staticmethod
    def _check(
        row: _RowLike,
        ev: TripEvent,
        rl: ActorRole,
        actor_id: str,
        driver_id: int | None,
        expected_version: int | None,
    ) -> int | None:
        """:meth:`transition`'s checks of the version and the driver on ``row``; the acting
        driver's id for a driver's step (else None). The state machine is checked by
        :meth:`_apply`."""
        rid = row["ride_id"]
        if expected_version is not None and row["version"] != expected_version:
            raise Conflict(
                f"ride {rid} is at version {row['version']}, not {expected_version}",
                ride_id=str(rid),
                current_version=row["version"],
                status=row["status"],
            )
        if rl != ActorRole.DRIVER:
            return None
        acting_driver = _driver_of(actor_id, driver_id)
        pre_accept = row["driver_id"] is None and ev in (TripEvent.ACCEPT, TripEvent.OFFER_DECLINED)
        if not pre_accept and row["driver_id"] != acting_driver:
            # The ride's driver is part of its state, like its version: a step from another
            # driver does not apply to it.
            raise Conflict(
                f"ride {rid} is driven by another driver",
                ride_id=str(rid),
                status=row["status"],
                reason="other_driver",
            )
        return acting_driver

    async def _apply(
        self,
        conn: asyncpg.Connection,
        row: _RowLike,
        event: TripEvent | str,
        role: ActorRole | str,
        actor_id: str,
        data: dict[str, Any],
        *,
        driver_id: int | None = None,
        source: str | None = None,
        at: datetime | None = None,
        if_version: int | None = None,
        if_offered: bool = False,
        history: list[dict[str, Any]] | None = None,
    ) -> asyncpg.Record | None:
        """Move the locked ride ``row`` by ``event`` (raises IllegalTransition); the new row.
        With ``if_version``, the ride need not be locked: it moves only if it is still at
        that version, and None says it was not. ``if_offered`` likewise: only if it is
        still ``offered`` to no driver. ``history``, if given, is filled with the ride's
        history after the move (:meth:`transition`)."""
        target = next_status(row["status"], event, role)
        ev, rl = TripEvent(event), ActorRole(role)
        sets = ["status = $2", "version = version + 1", "updated_at = $3"]
        args: list[Any] = [row["ride_id"], target.value, at or datetime.now(UTC)]

        def put(column: str, value: Any) -> None:
            args.append(value)
            sets.append(f"{column} = ${len(args)}")

        if target in _STATUS_TIME:
            sets.append(f"{_STATUS_TIME[target]} = $3")
        driver = ""
        if ev == TripEvent.ACCEPT:
            put("driver_id", driver_id)
            # The driver's row in the same statement: the foreign key from rides.driver_id
            # is checked at the end of the statement, when that row exists.
            driver = (
                f"driver AS (INSERT INTO drivers (driver_id) VALUES (${len(args)}) ON CONFLICT DO NOTHING), "
            )
        elif ev == TripEvent.COMPLETE:
            for key, integer in (("final_fare_cents", True), ("distance_m", False), ("duration_s", False)):
                value = _opt_number(data, key, integer)
                if value is not None:
                    put(key, value)
        elif ev == TripEvent.CANCEL:
            put("cancel_by", rl.value)
            fee = _opt_number(data, "cancel_fee_cents", True)
            if fee is not None:
                put("cancel_fee_cents", fee)
        where = "ride_id = $1"
        if if_version is not None:
            args.append(int(if_version))
            where += f" AND version = ${len(args)}"
        if if_offered:
            where += " AND status = 'offered' AND driver_id IS NULL"
        n = len(args)
        args += [ev.value, rl.value, str(actor_id), data, source]
        # The new version and its event row in one statement (one round trip, not two); with
        # ``history``, the events before it too (the statement does not see its own insert).
        moved = await conn.fetchrow(
            f"WITH {driver}new AS (UPDATE rides SET {', '.join(sets)} WHERE {where} RETURNING *),"
            " event AS (INSERT INTO trip_events"
            " (ride_id, version, event, status, actor_role, actor_id, data, source, at)"
            f" SELECT ride_id, version, ${n + 1}, status, ${n + 2}, ${n + 3}, ${n + 4}::jsonb, ${n + 5}, $3"
            " FROM new)"
            f" SELECT *{_PRIOR_EVENTS if history is not None else ''} FROM new",
            *args,
        )
        if moved is not None and history is not None:
            _fill_history(history, moved, ev, rl)
        return moved

    # -- the shards' records -------------------------------------------------------------------

    async def apply_record(self, source: str, record: dict[str, Any]) -> bool:
        """Persist one of a shard's ride records; True if it moved the ride, else False.

        ``source`` is the record's Redis stream message id: a record whose source is
        already stored is a replay and changes nothing. ``record`` is ``{"ride_id",
        "event", "data", "shard_id", "at"}`` (see :data:`RECORD_EVENTS` for the events).
        A record the ride's status no longer allows (an ``offer_expired`` after the accept)
        is stored with ``applied = false`` and changes nothing. A malformed record, an
        unknown event or ride stores nothing and is logged, once per kind of problem:
        this never raises for bad records (only Unavailable when Postgres is down).
        """
        return (await self.apply_records([(source, record)]))[0]

    async def apply_records(self, records: list[tuple[str, dict[str, Any]]]) -> list[bool]:
        """:meth:`apply_record` for ``(source, record)`` pairs, in order; each one's outcome.

        Meant for the records of one ride: each run of records of the same ride is applied
        in one transaction that locks the ride once (four round trips for one record, one
        more per further record, instead of five per record). Per record it is exactly
        :meth:`apply_record`: a replay changes nothing, a record the ride no longer allows
        is stored not applied, a bad record stores nothing. When this raises, nothing of
        the run that failed is stored (earlier runs are; their replays are harmless).
        """
        out = [False] * len(records)
        runs: list[list[tuple[int, str, _Parsed, Any]]] = []  # (index, source, parsed, shard id)
        for i, (source, record) in enumerate(records):
            parsed = self._parse_record(source, record)
            if parsed is None:
                continue
            item = (i, source, parsed, record.get("shard_id", "?"))
            if runs and runs[-1][0][2][0] == parsed[0]:
                runs[-1].append(item)
            else:
                runs.append([item])
        for run in runs:
            try:
                outcomes = await self._apply_run(run)
            except Conflict as exc:
                # Another consumer stored one of these records while we waited for the ride's
                # lock (a lease handover): our replay check ran before it committed. Again,
                # now that it has: the check sees it.
                if exc.detail.get("constraint") != "trip_events_source_key":
                    raise
                outcomes = await self._apply_run(run)
            for (i, *_), applied in zip(run, outcomes, strict=True):
                out[i] = applied
        return out

    async def apply_many(
        self, records: list[tuple[str, dict[str, Any]]]
    ) -> tuple[list[bool | None], list[DispatchError]]:
        """:meth:`apply_records` for the records of many rides at once; ``(outcomes, errors)``.

        Each record's outcome is as :meth:`apply_record`'s (a replay or a record the ride no
        longer allows is False, a bad record False and logged), and None for the records
        of a ride that failed (nothing of that ride is stored): ``errors`` holds why. A
        ride's records apply in their order; rides are independent. All rides go in one
        transaction that locks them in ``ride_id`` order, reads which sources are stored in
        one query and writes every ride's new state and every event row in one statement
        (``unnest``), instead of a transaction and a few round trips per ride. If Postgres
        refuses that statement, each ride is applied on its own so that only the rides
        refused fail. Raises Unavailable when Postgres is down (nothing stored).
        """
        out: list[bool | None] = [False] * len(records)
        rides: dict[uuid.UUID, list[tuple[int, str, _Parsed, Any]]] = {}
        for i, (source, record) in enumerate(records):
            parsed = self._parse_record(source, record)
            if parsed is not None:
                rides.setdefault(parsed[0], []).append((i, source, parsed, record.get("shard_id", "?")))
        if not rides:
            return out, []
        try:
            try:
                failed = await self._apply_batch(rides, out)
            except Conflict as exc:
                # Another consumer stored one of these records while we waited for a lock
                # (a lease handover): our replay check ran before it committed. Again.
                if exc.detail.get("constraint") != "trip_events_source_key":
                    raise
                failed = await self._apply_batch(rides, out)
        except (Conflict, InvalidInput):
            # Postgres refused the batch: ride by ride, so the rides it refuses fail alone.
            failed = {}
            for rid, run in rides.items():
                try:
                    outcomes = await self.apply_records([(source, records[i][1]) for i, source, *_ in run])
                except (Conflict, InvalidInput) as exc:
                    failed[rid] = exc
                    continue
                for (i, *_), applied in zip(run, outcomes, strict=True):
                    out[i] = applied
        for rid in failed:
            for i, *_ in rides[rid]:
                out[i] = None
        return out, list(failed.values())

    async def _apply_batch(
        self, rides: dict[uuid.UUID, list[tuple[int, str, _Parsed, Any]]], out: list[bool | None]
    ) -> dict[uuid.UUID, DispatchError]:
        """:meth:`apply_many`'s one transaction; fills ``out``, returns the rides refused
        before anything was written (a bad value in a record)."""
        rids = sorted(rides)
        sources = [source for run in rides.values() for _, source, *_ in run]
        failed: dict[uuid.UUID, DispatchError] = {}
        async with transaction(self.pool) as conn:
            rows = await conn.fetch(
                "SELECT ride_id, rider_id, region, status, version FROM rides"
                " WHERE ride_id = ANY($1::uuid[]) ORDER BY ride_id FOR UPDATE",
                rids,
            )
            stored = {
                r[0]
                for r in await conn.fetch(
                    "SELECT source FROM trip_events WHERE source = ANY($1::text[])", sources
                )
            }
            found = {row["ride_id"]: row for row in rows}
            # The guards of the module docstring: each ride's applied offers (made, closed)
            # and the registered incarnations of the shards that sent these records.
            offers: dict[uuid.UUID, tuple[set[str], set[str]]] = {rid: (set(), set()) for rid in rids}
            for r in await conn.fetch(
                "SELECT ride_id, event, data->>'offer_id' AS offer_id FROM trip_events"
                " WHERE ride_id = ANY($1::uuid[]) AND applied AND data ? 'offer_id'"
                " AND event IN ('offer', 'offer_declined', 'offer_expired')",
                rids,
            ):
                made, closed = offers[r["ride_id"]]
                (made if r["event"] == TripEvent.OFFER.value else closed).add(r["offer_id"])
            shards = sorted({inc[0] for inc in map(record_incarnation, sources) if inc is not None})
            registered: dict[tuple[str, int], list[tuple[str, float]]] = {}
            for r in await conn.fetch(
                "SELECT region, shard_id, incarnation, extract(epoch FROM since)::float8 AS since"
                " FROM shard_incarnations WHERE shard_id = ANY($1::int[])",
                shards,
            ):
                registered.setdefault((r["region"], r["shard_id"]), []).append((r["incarnation"], r["since"]))
            ev_cols: list[list[Any]] = [[] for _ in range(10)]
            upd_cols: list[list[Any]] = [[] for _ in range(6 + len(_TIME_COLUMNS))]
            outcome: dict[int, bool] = {}
            for rid in rids:
                run = rides[rid]
                row = found.get(rid)
                if row is None:
                    self._log_bad("unknown_ride", f"ride record for an unknown ride {rid} ({run[0][1]})")
                    continue
                region_incs = {k: v for (region, k), v in registered.items() if region == row["region"]}
                try:
                    events, state = self._plan(row, run, stored, offers[rid], region_incs)
                except InvalidInput as exc:
                    failed[rid] = exc
                    continue
                for ev in events:
                    outcome[ev[0]] = ev[4]
                    for col, value in zip(ev_cols, (rid, *ev[1:]), strict=True):
                        col.append(value)
                if state is not None:
                    for col, value in zip(upd_cols, (rid, *state), strict=True):
                        col.append(value)
            if ev_cols[0]:
                times = ", ".join(f"{c} = COALESCE(u.{c}, r.{c})" for c in _TIME_COLUMNS)
                time_args = ", ".join(f"${7 + k}::timestamptz[]" for k in range(len(_TIME_COLUMNS)))
                n = 6 + len(_TIME_COLUMNS)
                await conn.execute(
                    "WITH upd AS (UPDATE rides r SET status = u.status, version = u.version,"
                    f" updated_at = u.updated_at, {times},"
                    " cancel_by = COALESCE(u.cancel_by, r.cancel_by),"
                    " cancel_fee_cents = COALESCE(u.cancel_fee_cents, r.cancel_fee_cents)"
                    " FROM unnest($1::uuid[], $2::text[], $3::int[], $4::timestamptz[], $5::text[],"
                    f" $6::int[], {time_args}) AS u(ride_id, status, version, updated_at, cancel_by,"
                    f" cancel_fee_cents, {', '.join(_TIME_COLUMNS)})"
                    " WHERE r.ride_id = u.ride_id)"
                    " INSERT INTO trip_events"
                    " (ride_id, version, event, status, applied, actor_role, actor_id, data, source, at)"
                    " SELECT ride_id, version, event, status, applied, actor_role, actor_id, data::jsonb,"
                    " source, at FROM unnest("
                    f"${n + 1}::uuid[], ${n + 2}::int[], ${n + 3}::text[], ${n + 4}::text[],"
                    f" ${n + 5}::bool[], ${n + 6}::text[], ${n + 7}::text[], ${n + 8}::text[],"
                    f" ${n + 9}::text[], ${n + 10}::timestamptz[])"
                    " WITH ORDINALITY AS e(ride_id, version, event, status, applied, actor_role, actor_id,"
                    " data, source, at, n) ORDER BY n",
                    *upd_cols,
                    *ev_cols,
                )
        for i, applied in outcome.items():
            out[i] = applied
        return failed

    def _plan(
        self,
        row: asyncpg.Record,
        run: list[tuple[int, str, _Parsed, Any]],
        stored: set[str],
        offers: tuple[set[str], set[str]],
        registered: dict[int, list[tuple[str, float]]],
    ) -> tuple[list[tuple[Any, ...]], tuple[Any, ...] | None]:
        """One locked ride's records worked out in Python, as :meth:`_apply_run` applies
        them (the same guards: :meth:`_refusal`): the event rows ``(index, version, event,
        status, applied, role, actor, data json, source, at)`` and the ride's new state for
        the UPDATE (None: unchanged). ``stored`` gains the sources taken, ``offers`` (the
        ride's made and closed offer ids) the offers applied. Raises InvalidInput for a bad
        value."""
        made, closed = offers
        status, version = row["status"], row["version"]
        events: list[tuple[Any, ...]] = []
        updated_at: datetime | None = None
        stamps: dict[str, datetime] = {}
        cancel_by: str | None = None
        fee: int | None = None
        taken: list[str] = []
        for i, source, (_, event, role, data, at), shard_id in run:
            if source in stored or source in taken:  # a replay
                continue
            taken.append(source)
            actor_id = _record_actor(role, data, row["rider_id"], shard_id)
            when = at or datetime.now(UTC)
            # Refused by a guard, or a step the ride no longer allows: kept, not applied.
            refused = self._refusal(source, event, data, at, made, closed, registered)
            target = None
            if refused is None:
                with contextlib.suppress(IllegalTransition):
                    target = next_status(status, event, role)
            if target is None:
                kept = json.dumps(refused if refused is not None else data)
                events.append(
                    (i, version, event.value, status, False, role.value, actor_id, kept, source, when)
                )
                continue
            if event == TripEvent.CANCEL:
                cancel_by = role.value
                value = _opt_number(data, "cancel_fee_cents", True)
                if value is not None:
                    fee = int(value)
            status, version, updated_at = target.value, version + 1, when
            if target in _STATUS_TIME:
                stamps[_STATUS_TIME[target]] = when
            events.append(
                (i, version, event.value, status, True, role.value, actor_id, json.dumps(data), source, when)
            )
            if data.get("offer_id") is not None:
                (made if event == TripEvent.OFFER else closed).add(str(data["offer_id"]))
        stored.update(taken)
        if updated_at is None:
            return events, None
        state = (status, version, updated_at, cancel_by, fee, *(stamps.get(c) for c in _TIME_COLUMNS))
        return events, state

    async def _apply_run(self, run: list[tuple[int, str, _Parsed, Any]]) -> list[bool]:
        """One ride's records in one transaction; each one's outcome."""
        rid = run[0][2][0]
        sources = [source for _, source, *_ in run]
        shards = sorted({inc[0] for inc in map(record_incarnation, sources) if inc is not None})
        outcomes: list[bool] = []
        async with transaction(self.pool) as conn:
            # The lock, the replay check of every record, the ride's applied offers and the
            # incarnations of the shards that sent the records, in one round trip.
            row = await conn.fetchrow(
                "SELECT r.*, ARRAY(SELECT source FROM trip_events WHERE source = ANY($2::text[])) AS stored,"
                " ARRAY(SELECT e.event || ' ' || (e.data->>'offer_id') FROM trip_events e"
                "  WHERE e.ride_id = r.ride_id AND e.applied AND e.data ? 'offer_id'"
                "  AND e.event IN ('offer', 'offer_declined', 'offer_expired')) AS offer_events,"
                " ARRAY(SELECT i.shard_id || ' ' || i.incarnation || ' ' || extract(epoch FROM i.since)"
                "  FROM shard_incarnations i WHERE i.region = r.region AND i.shard_id = ANY($3::int[]))"
                "  AS incarnations"
                " FROM rides r WHERE ride_id = $1 FOR UPDATE OF r",
                rid,
                sources,
                shards,
            )
            if row is None:
                self._log_bad("unknown_ride", f"ride record for an unknown ride {rid} ({sources[0]})")
                return [False] * len(run)
            stored = set(row["stored"])
            # Offer ids the ride has applied: made, and closed (declined or timed out).
            made: set[str] = set()
            closed: set[str] = set()
            for entry in row["offer_events"]:
                kind, _, offer = entry.partition(" ")
                (made if kind == TripEvent.OFFER.value else closed).add(offer)
            registered: dict[int, list[tuple[str, float]]] = {}
            for entry in row["incarnations"]:
                k, inc, since = entry.split(" ")
                registered.setdefault(int(k), []).append((inc, float(since)))
            for _, source, (_, event, role, data, at), shard_id in run:
                if source in stored:  # a replay
                    outcomes.append(False)
                    continue
                stored.add(source)
                actor_id = _record_actor(role, data, row["rider_id"], shard_id)
                refused = self._refusal(source, event, data, at, made, closed, registered)
                if refused is not None:
                    await self._store_not_applied(conn, row, event, role, actor_id, refused, source, at)
                    outcomes.append(False)
                    continue
                try:
                    moved = await self._apply(conn, row, event, role, actor_id, data, source=source, at=at)
                    assert moved is not None  # locked: it moved
                    row = moved
                    outcomes.append(True)
                    if data.get("offer_id") is not None:
                        offer = str(data["offer_id"])
                        (made if event == TripEvent.OFFER else closed).add(offer)
                except IllegalTransition:
                    await self._store_not_applied(conn, row, event, role, actor_id, data, source, at)
                    outcomes.append(False)
        return outcomes

    def _refusal(
        self,
        source: str,
        event: TripEvent,
        data: dict[str, Any],
        at: datetime | None,
        made: set[str],
        closed: set[str],
        registered: dict[int, list[tuple[str, float]]],
    ) -> dict[str, Any] | None:
        """The data to store a record with when a guard of the module docstring refuses it
        (it is then not applied), else None."""
        origin = record_incarnation(source)
        if origin is not None:
            shard, token = origin
            newer = superseded_at(registered.get(shard, []), token)
            made_at = at.timestamp() if at is not None else datetime.now(UTC).timestamp()
            if newer is not None and made_at > newer[0]:
                self.refused_superseded += 1
                if origin not in self._fenced_logged:
                    self._fenced_logged.add(origin)
                    log.warning(
                        "refusing ride records of shard %s incarnation %s made after incarnation %s"
                        " took over (%s first); counted in refused_superseded",
                        shard,
                        token,
                        newer[1],
                        source,
                    )
                return {**data, "refused": "superseded_incarnation", "superseded_by": newer[1]}
        offer_id = data.get("offer_id")
        if offer_id is None:
            return None
        offer_id = str(offer_id)
        # The same offer made again, or closed again (by a second live copy of the shard,
        # under its own record id), is no new offer and closes nothing.
        if event == TripEvent.OFFER:
            stale = offer_id in made
        else:
            stale = event in _OFFER_CLOSERS and offer_id in closed
        if not stale:
            return None
        self.refused_stale_offer += 1
        return {**data, "refused": "stale_offer"}

    async def _store_not_applied(
        self,
        conn: asyncpg.Connection,
        row: asyncpg.Record,
        event: TripEvent,
        role: ActorRole,
        actor_id: str,
        data: dict[str, Any],
        source: str,
        at: datetime | None,
    ) -> None:
        """Keep a record that changes nothing (``applied = false``) in the ride's history."""
        await conn.execute(
            "INSERT INTO trip_events (ride_id, version, event, status, applied, actor_role,"
            " actor_id, data, source, at) VALUES ($1, $2, $3, $4, false, $5, $6, $7, $8, $9)",
            row["ride_id"],
            row["version"],
            event.value,
            row["status"],
            role.value,
            actor_id,
            data,
            source,
            at or datetime.now(UTC),
        )

    def _parse_record(self, source: str, record: Any) -> _Parsed | None:
        if not (isinstance(source, str) and source):
            self._log_bad("no_source", f"ride record without a source: {record!r}")
            return None
        if not isinstance(record, dict):
            self._log_bad("not_a_dict", f"ride record {source} is not a mapping: {record!r}")
            return None
        kind = record.get("event")
        if kind not in RECORD_EVENTS:
            self._log_bad(f"event:{kind}", f"ride record {source} has an unknown event {kind!r}")
            return None
        rid = _uuid(record.get("ride_id"))
        if rid is None:
            self._log_bad("bad_ride_id", f"ride record {source} has a bad ride id {record.get('ride_id')!r}")
            return None
        try:
            data = _jsonable(record.get("data") or {})
        except InvalidInput:
            self._log_bad("bad_data", f"ride record {source} has data that is not an object")
            return None
        event, role = RECORD_EVENTS[kind]
        if kind != event.value:
            data = {**data, "record": kind}
        return rid, event, role, data, _record_time(record.get("at"))

    def _log_bad(self, kind: str, message: str) -> None:
        if kind not in self._bad_records_logged:
            self._bad_records_logged.add(kind)
            log.warning("%s (further records like this are dropped silently)", message)
