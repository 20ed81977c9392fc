"""The ride side of one shard: matching ticks, offers, reservations and trip links.

Sans-I/O like the rest of the core. A :class:`Dispatcher` wraps one :class:`Shard` (its
drivers) and one :class:`RideBook` (its open requests). Every method takes ``now`` and
returns effects for the actor to carry out:

* :class:`Notify` — a message for a rider's or a driver's sockets (through the event bus);
* :class:`Reserve` — ask the shard that holds a halo driver to reserve it for an offer;
  the answer comes back through :meth:`Dispatcher.reserved`;
* :class:`DriverStatusChange` — a driver this shard does not hold (it crossed a border
  or was a halo driver) must change status in whichever shard holds it;
* :class:`Record` — a ride transition or event to persist in Postgres.

A matching tick takes the due requests, asks the spatial index (own and halo drivers)
for each request's nearest eligible candidates within its current radius, builds the
pickup-ETA matrix and solves it with the configured policy (optimal batch assignment, or
the greedy baseline). Own drivers are offered at once; halo drivers are reserved with
their owner first, so a driver is never offered two rides by two shards.

After a restart (``await_restore=True``) a dispatcher offers nothing until
:meth:`Dispatcher.restore_state` has given it the stored state of its rides and its
drivers' trips: a driver on a trip or holding an open offer in Postgres reappears on a
trip or offered (from its next position update), never available, and a ride's declined
drivers stay excluded. An offer whose publication failed (:meth:`Dispatcher.offer_undelivered`)
is withdrawn without excluding its driver, and offers pause until the bus is back.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dispatch.drivers import DriverStatus
from dispatch.matching import MatchPolicy, build_cost_matrix
from dispatch.rides import (
    MatchingConfig,
    Offer,
    OfferAccepted,
    OfferDeclined,
    OfferExpired,
    OfferWithdrawn,
    RideBook,
    RideCancelled,
    RideExpired,
    RideRecord,
    RideRequest,
    offer_prefix,
)
from dispatch.shard import Shard, TripLink
from dispatch.trips import RideStatus
from dispatch.vocabulary import MessageType, RecordKind, StatusReason


@dataclass(frozen=True, slots=True)
class Notify:
    audience: str  # "rider" or "driver"
    id: str | int
    message: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Reserve:
    owner: int
    driver_id: int
    ride_id: str
    pickup_eta_s: float


@dataclass(frozen=True, slots=True)
class DriverStatusChange:
    driver_id: int
    status: DriverStatus
    trip: TripLink | None = None


@dataclass(frozen=True, slots=True)
class Record:
    ride_id: str
    event: RecordKind
    data: dict[str, Any] = field(default_factory=dict)


Effect = Notify | Reserve | DriverStatusChange | Record


@dataclass(frozen=True, slots=True)
class LiveIds:
    """What one shard holds live, by id, at one moment: for checking across shards that
    every open ride is live in exactly one of them and no driver is free in two.

    ``requests``: rides in the ride book (waiting for a driver, or offered); ``trips``:
    rides past acceptance whose driver this shard holds (a trip lives where its driver
    is, not where its ride was requested); ``available``: held drivers that may be offered
    a ride now (confirmed, fresh; never halo copies); ``offered``: drivers holding an open
    offer of this shard's book (its own drivers, or a neighbour's it reserved).
    """

    shard_id: int
    requests: tuple[str, ...]
    trips: tuple[str, ...]
    available: tuple[int, ...]
    offered: tuple[int, ...]


# A trip read from the system of record before a driver was freed here (its trip ended, its
# offer closed) is older news than the free: :meth:`Dispatcher.relink` leaves it alone. The
# read time is the edge's clock, the free the shard's; NTP keeps them well within this.
RELINK_CLOCK_SLACK_S = 2.0

# How long a restored driver state (on a trip, or holding an offer) waits for its driver to
# reappear in this shard. A connected driver sends a position every few seconds; one that
# has not come back by then is somewhere else (its new shard has the state, or the trip
# ended), and marking it busy here much later would take a free driver out of matching.
RESTORED_STATE_TTL_S = 120.0
# How often the awaited drivers' map is swept of entries past their time.
AWAITED_SWEEP_S = 1.0
_AVAILABLE = int(DriverStatus.AVAILABLE)


@dataclass(frozen=True, slots=True)
class ActiveTrip:
    """A stored ride past acceptance (accepted, arrived, in progress) and its driver."""

    driver_id: int
    ride_id: str
    rider_id: str
    ride_shard: int


@dataclass(frozen=True, slots=True)
class _Awaited:
    status: DriverStatus
    trip: TripLink | None
    until: float


@dataclass
class TickStats:
    ticks: int = 0
    offers: int = 0
    reservations: int = 0
    reservations_refused: int = 0
    last_due: int = 0
    searches: int = 0  # due requests searched for candidates, over all ticks
    last_matrix: tuple[int, int] = (0, 0)


class Dispatcher:
    def __init__(
        self,
        shard: Shard,
        config: MatchingConfig | None = None,
        *,
        incarnation: str = "",
        await_restore: bool = False,
    ) -> None:
        """``incarnation`` names this start of the shard (unique across restarts, no ':'):
        it goes into every offer id, after the shard's id (see :func:`offer_prefix`). With
        ``await_restore`` nothing is offered until :meth:`restore_state` ran (a shard that
        restarted must learn its drivers' trips first).
        """
        self.shard = shard
        section = shard.region.section("matching")
        self.config = config or MatchingConfig.from_section(section, halo_m=shard.region.index.halo_m)
        self.book = RideBook(self.config, offer_prefix=offer_prefix(shard.shard_id, incarnation))
        self.awaiting_restore = await_restore
        # The event bus failed to deliver an offer: offer nothing until it is back.
        self.offers_paused = False
        self.undelivered = 0
        # Drivers whose state is known (from Postgres, or decided here) but who are not
        # held here yet: applied when they appear, until the entry's ``until``.
        self._awaited: dict[int, _Awaited] = {}
        self._next_expiry_sweep = 0.0
        self._now = 0.0
        self.stats = TickStats()
        # Rides whose halo driver is being reserved: ride_id -> driver_id.
        self._reserving: dict[str, int] = {}
        # Every ride offered from here: the pickup ETA it was offered with (for the offer).
        self._eta: dict[str, float] = {}
        # Held drivers freed lately (trip ended, offer closed): driver id -> when.
        self._freed_at: dict[int, float] = {}
        self.relinked = 0
        self.unlinked = 0
        self.offers_reheld = 0

    # -- requests ---------------------------------------------------------------------------

    def add_ride(self, request: RideRequest, now: float, *, reopen: bool = False) -> list[Effect]:
        """Queue a stored request; a no-op for one already queued or that already left the
        book (a late handoff), unless ``reopen``: its accept could not be stored, so it is
        waiting for a driver again (:meth:`RideBook.reopen`)."""
        if reopen:
            self.book.reopen(request, now)
        else:
            self.book.add(request, now)
        return []

    def cancel_ride(self, ride_id: str, now: float) -> list[Effect]:
        """The rider cancels a ride that is still open here (no driver accepted yet)."""
        eff = self.book.cancel(ride_id, now)
        out: list[Effect] = [Record(ride_id, RecordKind.CANCELLED, {"by": "rider", "stage": "open"})]
        self._reserving.pop(ride_id, None)
        if eff.driver_id is not None:
            out += self._free(eff.driver_id)
            out.append(
                Notify(
                    "driver",
                    eff.driver_id,
                    {
                        "type": MessageType.OFFER_WITHDRAWN,
                        "offer_id": eff.offer_id,
                        "ride_id": ride_id,
                        "reason": StatusReason.RIDER_CANCELLED,
                    },
                )
            )
        return out

    # -- the matching tick -------------------------------------------------------------------

    def tick(self, now: float) -> list[Effect]:
        self._now = now
        out: list[Effect] = self.adopt_returning(now)
        for eff in self.book.tick(now):
            out += self._on_book_effect(eff)
        self.stats.ticks += 1
        if self.awaiting_restore or self.offers_paused:
            self.stats.last_due = 0
            return out
        due = [d for d in self.book.due(now) if d.request.ride_id not in self._reserving]
        self.stats.last_due = len(due)
        if not due:
            return out
        self.stats.searches += len(due)
        k = int(self.config.candidates_per_request)
        cand_ids, cand_d, owners = [], [], {}
        for d in due:
            r = d.request
            found = self.shard.nearby(
                r.pickup_lat,
                r.pickup_lng,
                d.search_radius_m,
                k + len(d.excluded_driver_ids),
                now,
                vclass=r.vehicle_class,
            )
            found = [f for f in found if f.driver_id not in d.excluded_driver_ids][:k]
            cand_ids.append([f.driver_id for f in found])
            cand_d.append([f.distance_m for f in found])
            for f in found:
                owners[f.driver_id] = f.owner
        matrix = build_cost_matrix(cand_ids, cand_d, self.config.pickup_speed_mps)
        self.stats.last_matrix = matrix.shape
        for m in matrix.assign(MatchPolicy(self.config.policy)):
            req = due[m.row].request
            owner = owners[m.driver_id]
            if owner == self.shard.shard_id:
                if self.shard.reserve(m.driver_id, now, req.vehicle_class):
                    out += self._offer(req, m.driver_id, m.pickup_eta_s, now)
            else:
                # Not ours: the owner must reserve it first. Hide it from our next ticks.
                self._reserving[req.ride_id] = m.driver_id
                self._eta[req.ride_id] = m.pickup_eta_s
                self._mark_halo(m.driver_id, DriverStatus.OFFERED)
                self.stats.reservations += 1
                out.append(Reserve(owner, m.driver_id, req.ride_id, m.pickup_eta_s))
        return out

    def reserved(self, ride_id: str, driver_id: int, ok: bool, now: float) -> list[Effect]:
        """The owner answered a :class:`Reserve`."""
        if self._reserving.get(ride_id) != driver_id:
            # A stale answer (the ride moved on): give back a reservation we no longer need.
            return [DriverStatusChange(driver_id, DriverStatus.AVAILABLE)] if ok else []
        del self._reserving[ride_id]
        if not ok:
            self.stats.reservations_refused += 1
            return []
        if ride_id not in self.book or self.book.offer_of_ride(ride_id) is not None:
            return [DriverStatusChange(driver_id, DriverStatus.AVAILABLE)]
        return self._offer(self.book.get(ride_id), driver_id, self._eta.get(ride_id, 0.0), now)

    def _offer(self, req: RideRequest, driver_id: int, eta_s: float, now: float) -> list[Effect]:
        offer = self.book.offer(req.ride_id, driver_id, now)
        self.stats.offers += 1
        self._eta[req.ride_id] = eta_s
        return [
            Notify("driver", driver_id, self._offer_message(offer, req, eta_s)),
            Notify(
                "rider",
                req.rider_id,
                {
                    "type": MessageType.RIDE_STATUS,
                    "ride_id": req.ride_id,
                    "status": RideStatus.OFFERED,
                    "pickup_eta_s": round(eta_s, 1),
                },
            ),
            Record(
                req.ride_id,
                RecordKind.OFFERED,
                {
                    "driver_id": driver_id,
                    "offer_id": offer.offer_id,
                    "expires_at": offer.expires_at,
                    "pickup_eta_s": round(eta_s, 1),
                },
            ),
        ]

    def _offer_message(self, offer: Offer, req: RideRequest, eta_s: float) -> dict[str, Any]:
        return {
            "type": MessageType.OFFER,
            "offer_id": offer.offer_id,
            "ride_id": req.ride_id,
            "shard_id": self.shard.shard_id,
            "pickup": {"lat": req.pickup_lat, "lng": req.pickup_lng},
            "dropoff": {"lat": req.dropoff_lat, "lng": req.dropoff_lng},
            "vehicle_class": self.shard.region.drivers.vehicle_classes[req.vehicle_class],
            "pickup_eta_s": round(eta_s, 1),
            "expires_at": offer.expires_at,
        }

    # -- driver answers ------------------------------------------------------------------------

    def accept(
        self, offer_id: str, driver_id: int, now: float
    ) -> tuple[OfferAccepted, list[Effect], float | None]:
        """Atomic in this shard: exactly one accept of an open offer wins.

        Returns the acceptance, its effects and the pickup ETA the offer was made with
        (the rider's promised pickup time, for the cancellation policy).
        """
        eff = self.book.accept(offer_id, driver_id, now)
        link = TripLink(eff.ride_id, eff.rider_id, self.shard.shard_id)
        out = self._set_driver(driver_id, DriverStatus.ON_TRIP, link)
        return eff, out, self._eta.pop(eff.ride_id, None)

    def decline(self, offer_id: str, driver_id: int, now: float) -> list[Effect]:
        return self._on_book_effect(self.book.decline(offer_id, driver_id, now))

    def driver_gone(self, driver_id: int, now: float) -> list[Effect]:
        """The driver went offline: take back its open offer, if any."""
        eff = self.book.withdraw_driver(driver_id, now)
        return [] if eff is None else self._on_book_effect(eff)

    def trip_ended(self, driver_id: int) -> list[Effect]:
        """Completed or cancelled after acceptance: the driver is free again."""
        return self._set_driver(driver_id, DriverStatus.AVAILABLE, None)

    # -- helpers --------------------------------------------------------------------------------

    def _on_book_effect(
        self, eff: OfferExpired | OfferDeclined | OfferWithdrawn | RideExpired
    ) -> list[Effect]:
        if isinstance(eff, OfferExpired | OfferDeclined | OfferWithdrawn):
            kind = {
                OfferExpired: RecordKind.OFFER_EXPIRED,
                OfferDeclined: RecordKind.OFFER_DECLINED,
                OfferWithdrawn: RecordKind.OFFER_WITHDRAWN,
            }[type(eff)]
            out = self._free(eff.driver_id)
            out.append(Record(eff.ride_id, kind, {"driver_id": eff.driver_id, "offer_id": eff.offer_id}))
            if eff.ride_id in self.book:
                # The rider saw "offered": tell it the search goes on.
                rider = self.book.get(eff.ride_id).rider_id
                out.append(
                    Notify(
                        "rider",
                        rider,
                        {
                            "type": MessageType.RIDE_STATUS,
                            "ride_id": eff.ride_id,
                            "status": RideStatus.REQUESTED,
                            "reason": kind,
                        },
                    )
                )
            if isinstance(eff, OfferExpired):
                out.append(
                    Notify(
                        "driver",
                        eff.driver_id,
                        {"type": MessageType.OFFER_EXPIRED, "offer_id": eff.offer_id, "ride_id": eff.ride_id},
                    )
                )
            return out
        if isinstance(eff, RideExpired):
            return [
                Record(
                    eff.ride_id, RecordKind.EXPIRED, {"waited_s": round(eff.expired_at - eff.requested_at, 1)}
                ),
                Notify(
                    "rider",
                    eff.rider_id,
                    {
                        "type": MessageType.RIDE_STATUS,
                        "ride_id": eff.ride_id,
                        "status": RideStatus.EXPIRED,
                        "reason": StatusReason.NO_DRIVER_FOUND,
                    },
                ),
            ]
        if isinstance(eff, RideCancelled):
            return self._free(eff.driver_id) if eff.driver_id is not None else []
        raise TypeError(f"unexpected effect {eff!r}")

    def _free(self, driver_id: int) -> list[Effect]:
        return self._set_driver(driver_id, DriverStatus.AVAILABLE, None)

    def _set_driver(self, driver_id: int, status: DriverStatus, trip: TripLink | None) -> list[Effect]:
        if status in (DriverStatus.AVAILABLE, DriverStatus.OFFLINE):
            self.note_freed(driver_id, self._now)
        if self.shard.set_status(driver_id, status, trip):
            self._awaited.pop(int(driver_id), None)
            return []
        self._mark_halo(driver_id, status)
        if status in (DriverStatus.ON_TRIP, DriverStatus.OFFERED):
            # Not held here (yet): should the driver appear here, it appears busy.
            until = self._now + RESTORED_STATE_TTL_S
            self._awaited[int(driver_id)] = _Awaited(status, trip, until)
        else:
            self._awaited.pop(int(driver_id), None)
        return [DriverStatusChange(driver_id, status, trip)]

    def _mark_halo(self, driver_id: int, status: DriverStatus) -> None:
        slot = self.shard.halo.id_to_slot.get(int(driver_id))
        if slot is not None:
            self.shard.halo.status[slot] = status

    # -- inspection -------------------------------------------------------------------------------

    def live_ids(self, now: float) -> LiveIds:
        """The ids of what this shard holds live at ``now`` (see :class:`LiveIds`).
        Read-only; costs one pass over the driver table's columns and the open rides."""
        return LiveIds(
            shard_id=self.shard.shard_id,
            requests=tuple(r.ride_id for r in self.book.requests()),
            trips=tuple(self.shard.trip_ride_ids()),
            available=tuple(self.shard.available_ids(now).tolist()),
            offered=tuple(self.book.offered_driver_ids()),
        )

    # -- the event bus ----------------------------------------------------------------------------

    def offer_undelivered(self, offer_id: str, now: float) -> list[Effect]:
        """The bus could not publish ``offer_id`` (failed or not confirmed in time).

        An offer the driver never saw is not a decline: the offer is withdrawn (recorded as
        ``offer_withdrawn`` with reason ``undelivered``), the driver is freed and not
        excluded, and offers pause until :meth:`bus_restored`, so the next tick after that
        offers the ride again (to the same driver when it is still the best). An offer
        already closed (accepted, declined, expired) is left alone: nothing is returned.
        """
        self._now = now
        offer = next((o for o in self.book.open_offers() if o.offer_id == offer_id), None)
        if offer is None:
            return []
        self.offers_paused = True
        self.undelivered += 1
        return self._withdraw(offer_id, "undelivered")

    def offered_by_peers(self, driver_ids: Iterable[int], now: float) -> int:
        """Drivers that a neighbour's open offer holds, as the neighbours answered after
        this shard's restart: their reservations at the previous incarnation were lost
        with it. Each is marked offered here if held, or when it appears (until the
        neighbour's offer ends: it then says the driver is free). Returns how many."""
        self._now = now
        until = now + RESTORED_STATE_TTL_S
        n = 0
        for d in driver_ids:
            d = int(d)
            if self.book.offer_of_driver(d) is not None:
                continue
            if self.shard.set_status(d, DriverStatus.OFFERED, None):
                n += 1
                continue
            known = self._awaited.get(d)
            if known is None or known.status != DriverStatus.OFFERED:
                n += 1  # told twice (by the neighbour, then by this shard's restore): once
            self._awaited[d] = _Awaited(DriverStatus.OFFERED, None, until)
        return n

    def offer_held_elsewhere(self, offer_id: str, now: float) -> list[Effect]:
        """A restored open offer whose driver another shard holds busy (or would not
        reserve): withdrawn (``offer_withdrawn``, reason ``held_elsewhere``), the ride back
        in the queue without excluding the driver, whose own shard keeps it. A driver is
        never offered by two shards at once."""
        self._now = now
        return self._withdraw(offer_id, "held_elsewhere", free=False)

    def _withdraw(self, offer_id: str, reason: str, free: bool = True) -> list[Effect]:
        """Withdraw an open offer and record it; ``free``: free its driver (else only stop
        awaiting it here: its own shard keeps it)."""
        eff = self.book.withdraw_offer(offer_id)
        if eff is None:
            return []
        if free:
            out = self._free(eff.driver_id)
        else:
            self._awaited.pop(int(eff.driver_id), None)
            out = []
        out.append(
            Record(
                eff.ride_id,
                RecordKind.OFFER_WITHDRAWN,
                {"driver_id": eff.driver_id, "offer_id": eff.offer_id, "reason": reason},
            )
        )
        return out

    def bus_restored(self, now: float) -> list[Effect]:
        """The bus publishes again: offers resume on the next tick."""
        self._now = now
        self.offers_paused = False
        return []

    # -- recovery -------------------------------------------------------------------------------

    def restore_state(self, state: Mapping[str, Any], now: float) -> tuple[int, list[Effect]]:
        """Take a restarted shard's stored state; returns (rides added, effects). Ends
        ``awaiting_restore``: matching runs from the next tick.

        ``state`` is plain data (it crosses from the edge): ``{"rides": [...], "trips": [...]}``.
        Each ride is the keyword arguments of :class:`RideRequest` plus optional
        ``excluded_driver_ids`` (drivers that declined it or let an offer time out) and
        ``offer`` (``{offer_id, driver_id, offered_at, expires_at}``, the open offer).
        Each trip is ``{driver_id, ride_id, rider_id, ride_shard}``. A driver on a trip or
        holding a restored offer is marked so when it is (or becomes) held here; a
        malformed entry is skipped (and counted in the return), never the whole restore.
        """
        self._now = now
        records: list[RideRecord] = []
        for r in state.get("rides", ()):
            try:
                records.append(_ride_record(r))
            except (TypeError, ValueError, KeyError):
                continue
        trips: list[ActiveTrip] = []
        for t in state.get("trips", ()):
            try:
                trips.append(
                    ActiveTrip(
                        int(t["driver_id"]), str(t["ride_id"]), str(t["rider_id"]), int(t["ride_shard"])
                    )
                )
            except (TypeError, ValueError, KeyError):
                continue
        added, out = self._restore(records, trips, now)
        self.awaiting_restore = False
        return added, out

    def _restore(
        self, records: Iterable[RideRecord], trips: Iterable[ActiveTrip], now: float
    ) -> tuple[int, list[Effect]]:
        until = now + RESTORED_STATE_TTL_S
        for t in trips:
            if t.driver_id in self.shard.trips:
                continue  # the shard already knows (a handoff brought the link)
            link = TripLink(t.ride_id, t.rider_id, t.ride_shard)
            self._awaited[t.driver_id] = _Awaited(DriverStatus.ON_TRIP, link, until)
        added = 0
        for rec in records:
            if rec.request.requested_at > now + 5.0:
                continue
            if self.book.add_restored(rec):
                added += 1
                if rec.offer is not None and self.book.offer_of_ride(rec.request.ride_id) is not None:
                    self._awaited[rec.offer.driver_id] = _Awaited(DriverStatus.OFFERED, None, until)
        return added, self.adopt_returning(now)

    @property
    def awaited_count(self) -> int:
        """How many drivers not held here have a state waiting for them (stats)."""
        return len(self._awaited)

    def adopt_returning(self, now: float) -> list[Effect]:
        """Give each awaited driver that this shard now holds its known state; drop
        entries past their time. Call after every claim round (the actor does) and it is
        called at every tick."""
        self._now = now
        self._hold_offered()
        awaited = self._awaited
        if not awaited:
            return []
        # It runs every 50 ms in each shard, and the map can hold every halo driver offered
        # or on a trip from here for two minutes: one lookup of them all by array, a Python
        # step only for the few held now, and the sweep of entries past their time once a
        # second. A micro-benchmark at the mission's sizes (170 open offers, 10 awaited):
        # 650 µs a call with a Python step per entry and offer, 25 µs so; with 2,000
        # awaited, 849 µs against 54 µs.
        if now >= self._next_expiry_sweep:
            self._next_expiry_sweep = now + AWAITED_SWEEP_S
            for driver_id in [d for d, a in awaited.items() if a.until <= now]:
                del awaited[driver_id]
        ids = np.fromiter(awaited, dtype=np.int64, count=len(awaited))
        # Confirmed only: a claim still pending is settled with the releasing shard's
        # status, which would overwrite this one.
        for driver_id in ids[self.shard.holds_many(ids)].tolist():
            a = awaited.pop(driver_id)
            if a.until <= now:
                continue
            if a.status == DriverStatus.ON_TRIP and driver_id in self.shard.trips:
                continue
            self.shard.set_status(driver_id, a.status, a.trip)
        return []

    def _hold_offered(self) -> None:
        """Every driver this shard holds that an open offer of its book names is offered,
        not available. A claim settles with the releasing shard's status, and that shard
        knows nothing of this book's offers (one restored after a restart, to a driver
        that came back by way of a neighbour): the cluster drill's partition saw a driver
        left available here with an open offer of this shard, so that it could have been
        offered a second ride."""
        offered = self.book.offered_driver_ids()
        if not offered:
            return
        own = self.shard.own
        slots = own.slots_of(np.fromiter(offered, dtype=np.int64, count=len(offered)))
        slots = slots[slots >= 0]
        lost = slots[~own.pending[slots] & (own.status[slots] == _AVAILABLE)]
        if len(lost):
            own.status[lost] = DriverStatus.OFFERED
            own.halo_dirty[lost] = True
            self.offers_reheld += len(lost)

    def note_freed(self, driver_id: int, now: float) -> None:
        """The driver was freed (here, or by another shard's word): a trip read before
        ``now`` must not put it back on that trip (:meth:`relink`)."""
        self._freed_at[int(driver_id)] = now

    def relink(self, trips: Iterable[Mapping[str, Any]], read_at: float, now: float) -> int:
        """Put back on its trip every held driver that the system of record has on a trip
        (``trips``: ``{driver_id, ride_id, rider_id, ride_shard}``, read at ``read_at``) but
        that this shard holds as free: available or offline, without the trip's link, or
        with it but not on the trip. Returns how many it put back.

        A trip's link lives with its driver's state and travels with it on handoff; it is
        lost when the driver changed shards while the shard that held it was down or
        restarting (the claim finds nobody to release it), or when the word of an accept
        reached no shard because the driver was between shards. Then the driver looks
        free, and could be offered a second ride. An edge sends the active trips now and
        then; this repairs what was lost.

        Left alone: a driver freed here since shortly before ``read_at`` (the trip may
        have ended after the read), one on another ride here (newer than the read), one
        holding an offer (it closes first; the next round), and everything while this
        shard waits for its stored state (the restore brings the trips)."""
        self._now = now
        for d, at in list(self._freed_at.items()):
            if at < read_at - RESTORED_STATE_TTL_S:
                del self._freed_at[d]
        if self.awaiting_restore:
            return 0
        own = self.shard.own
        fixed = 0
        for t in trips:
            try:
                driver_id, ride_id = int(t["driver_id"]), str(t["ride_id"])
                rider_id, ride_shard = str(t["rider_id"]), int(t["ride_shard"])
            except (KeyError, TypeError, ValueError):
                continue
            if not self.shard.holds(driver_id):
                continue
            if self._freed_at.get(driver_id, -float("inf")) >= read_at - RELINK_CLOCK_SLACK_S:
                continue
            link = self.shard.trips.get(driver_id)
            if link is not None and link.ride_id != ride_id:
                continue
            status = DriverStatus(int(own.status[own.id_to_slot[driver_id]]))
            if status == DriverStatus.OFFERED or (status == DriverStatus.ON_TRIP and link is not None):
                continue
            if status == DriverStatus.OFFLINE:
                self.shard.offline_after.add(driver_id)
            if link is None:
                link = TripLink(ride_id, rider_id, ride_shard)
                self.shard.set_status(driver_id, DriverStatus.ON_TRIP, link)
            else:  # the link is right, the status is not: keep the link's odometer
                slot = own.id_to_slot[driver_id]
                own.status[slot] = DriverStatus.ON_TRIP
                own.halo_dirty[slot] = True
            self._awaited.pop(driver_id, None)
            fixed += 1
        self.relinked += fixed
        return fixed

    def end_trips(self, ride_ids: Iterable[str], now: float) -> list[Effect]:
        """Free every driver held here on a trip of ``ride_ids``: rides the system of record
        has ended (completed or cancelled), as an edge's unlink round reads them.

        The edge that ends a ride tells the ride's shard, which frees its driver wherever
        it is held. That word can be lost: the write reached Postgres but its answer did
        not (Postgres died in between), or the shard holding the driver missed the status
        change. The driver then stays on a trip that is over, never offered again. A
        terminal ride never becomes live again, so freeing its trip is safe at any time; a
        driver on another ride since (a different link) is left alone. A link whose
        driver this shard no longer holds (evicted while silent) is dropped."""
        self._now = now
        ended = set(ride_ids)
        out: list[Effect] = []
        for driver_id, link in list(self.shard.trips.items()):
            if link.ride_id not in ended:
                continue
            if self.shard.holds(driver_id):
                out += self._set_driver(driver_id, DriverStatus.AVAILABLE, None)
            else:
                self.shard.trips.pop(driver_id, None)
            self.unlinked += 1
        return out

    def forget_awaited(self, driver_id: int) -> None:
        """Another shard decided this driver's status: a state awaited here is stale."""
        self._awaited.pop(int(driver_id), None)

    def reserve_for_peer(self, driver_id: int, now: float) -> bool:
        """Another shard wants to offer a ride to ``driver_id``: reserve it if it is held
        here and available. Refused while this shard has not restored its state (the
        driver may be on a trip that Postgres knows of and this shard does not yet)."""
        self.adopt_returning(now)
        if self.awaiting_restore:
            return False
        return self.shard.reserve(int(driver_id), now)

    def restore(self, requests: list[RideRequest], now: float) -> int:
        """Reload open requests after a restart (from Postgres). Known ones are skipped."""
        added, _ = self._restore([RideRecord(r) for r in requests], [], now)
        self.awaiting_restore = False
        return added


def _ride_record(r: Mapping[str, Any]) -> RideRecord:
    """A stored open ride (see :meth:`Dispatcher.restore_state`) as a :class:`RideRecord`."""
    fields = dict(r)
    excluded = frozenset(int(d) for d in fields.pop("excluded_driver_ids", None) or ())
    raw_offer = fields.pop("offer", None)
    request = RideRequest(**fields)
    offer = None
    if raw_offer:
        offer = Offer(
            request.ride_id,
            int(raw_offer["driver_id"]),
            str(raw_offer["offer_id"]),
            float(raw_offer["offered_at"]),
            float(raw_offer["expires_at"]),
        )
    return RideRecord(request, excluded, 0, offer)
