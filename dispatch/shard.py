"""One geographic shard's driver state: ingest, handoff, halo and nearby queries.

Sans-I/O: every method takes ``now`` and returns what the caller must send elsewhere.
The actor around it (``actors/shard_actor.py``) only moves those results between shards.

Ownership and handoff
---------------------
Routers send each location row to the shard whose territory contains the position
(``ShardMap.shard_of``). A shard that receives a row for a driver it does not hold takes
it as *pending*: stored, but not offered rides and not visible to queries. Pending
drivers are claimed from every other shard (:meth:`Shard.take_claims` →
:meth:`Shard.release` on each peer → :meth:`Shard.settle_claims`). A peer holding an
older position releases the driver and hands over its status (offered, on trip); a peer
holding a newer one keeps it and the claimant drops its copy. So a driver is available in
at most one shard at any moment, and the handoff record travels with the claim reply:
it is never in none.

Halo
----
Every shard also keeps a read-only table of its neighbours' drivers within
``index.halo_m`` of its border, pushed by their owners (:meth:`Shard.halo_delta` →
:meth:`Shard.apply_halo`), so nearby queries and matching next to a border see both
sides. Halo entries carry their owner; an offer to one is reserved with the owner first.

A position is pushed only when the driver has moved more than :data:`HALO_MOVE_M` since
its last push, or its last push is :data:`HALO_REFRESH_S` old (the neighbour forgets an
entry not refreshed within ``drivers.stale_after_s``); a status change is always pushed.
Halo positions are candidates (the owner reserves with the live one), so tens of metres
do not matter, and pushing every update of every border driver once a second cost the
shards as much as ingesting them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import numpy as np

from dispatch.drivers import LOCATION_DTYPE, DriverStatus, DriverTable, Intent, take_rows
from dispatch.errors import InvalidLocation, RadiusTooLarge
from dispatch.geo import haversine_m
from dispatch.pricing import DEFAULT_DETOUR_FACTOR
from dispatch.region import DriverConfig, Region
from dispatch.shardmap import OUTSIDE, ShardMap
from dispatch.spatial import GridIndex

# A driver's position is pushed to the neighbours again once it is this far from the one
# they have (or its last push is HALO_REFRESH_S old; a status change is pushed at once).
HALO_MOVE_M = 50.0
# Must stay well under drivers.stale_after_s (30 s by default), after which a neighbour
# drops a halo entry that was not refreshed: Shard uses the smaller of this and a third
# of the region's stale_after_s.
HALO_REFRESH_S = 10.0

# What a halo push carries per driver.
HALO_DTYPE = np.dtype(
    [
        ("driver_id", "<i8"),
        ("lat", "<f8"),
        ("lng", "<f8"),
        ("ts", "<f8"),
        ("heading", "<f4"),
        ("speed", "<f4"),
        ("status", "i1"),
        ("vclass", "i1"),
        ("_pad", "V6"),
    ]
)

# What a released driver carries to its new shard: ``ts`` and ``status_ts`` are order
# keys (LOCATION_DTYPE), so the newer of two shards' status wins whatever the clocks of
# the phones said.
HANDOFF_DTYPE = np.dtype(
    [("driver_id", "<i8"), ("ts", "<f8"), ("status_ts", "<f8"), ("status", "i1"), ("vclass", "i1")]
)

# Every reason a location row can be refused. Counted per shard, exported as metrics.
# float32 keeps about 7 significant digits: a 5 s ``fix_dt`` rounds by up to ~0.5 µs.
FIX_DT_SLACK_S = 1e-3

DROP_REASONS = (
    "invalid_driver_id",
    "non_finite",
    "out_of_range",
    "invalid_heading",
    "invalid_speed",
    "invalid_vehicle_class",
    "invalid_intent",
    "from_future",
    "too_old",
    "out_of_region",
    "out_of_order",
)


def drop_codes(
    rows: np.ndarray, now: float, cfg: DriverConfig, n_vclasses: int, shard_map: ShardMap
) -> tuple[np.ndarray, np.ndarray]:
    """Validate LOCATION_DTYPE rows, vectorized: ``(drop, shard)``.

    ``drop[i]`` is 0 for a good row, else 1 + the index of its first failing reason in
    :data:`DROP_REASONS`; ``shard[i]`` is the shard of its position (``OUTSIDE`` if none).
    ``cfg`` is the region's driver settings. The shards and the edge's gateway socket
    apply the same rules. Changes nothing.
    """
    n = len(rows)
    drop = np.zeros(n, dtype=np.int8)
    ids = rows["driver_id"]
    lat = rows["lat"]
    lng = rows["lng"]
    ts = rows["ts"]
    heading = rows["heading"]
    speed = rows["speed"]
    vclass = rows["vclass"]
    intent = rows["intent"]

    def mark(mask: np.ndarray, reason: str) -> None:
        drop[(drop == 0) & mask] = 1 + DROP_REASONS.index(reason)

    with np.errstate(invalid="ignore"):
        mark(ids <= 0, "invalid_driver_id")
        fix = ts + rows["fix_dt"]  # the client's timestamp of the position
        mark(~(np.isfinite(lat) & np.isfinite(lng) & np.isfinite(fix)), "non_finite")
        mark((np.abs(lat) > 90) | (np.abs(lng) > 180), "out_of_range")
        mark(np.isinf(heading) | (heading < 0) | (heading > 360), "invalid_heading")
        mark(np.isinf(speed) | (speed < 0) | (speed > cfg.max_speed_mps), "invalid_speed")
        mark((vclass < -1) | (vclass >= n_vclasses), "invalid_vehicle_class")
        mark((intent < 0) | (intent > 2), "invalid_intent")
        # fix_dt is a float32: a fix the edge accepted at exactly the skew limit can come
        # back a few hundred nanoseconds past it, so the limit gets FIX_DT_SLACK_S of slack.
        mark(np.maximum(ts, fix) > now + cfg.max_future_skew_s + FIX_DT_SLACK_S, "from_future")
        mark(np.minimum(ts, fix) < now - cfg.max_age_s, "too_old")
    shard = shard_map.shard_of(lat, lng)
    mark(shard == OUTSIDE, "out_of_region")
    return drop, shard


# How long a driver whose claim a peer did not answer stays pending (claimed again every
# round) before it is taken as held by nobody (Shard.retry_claims).
CLAIM_GIVE_UP_S = 10.0


@dataclass(frozen=True, slots=True)
class IngestResult:
    received: int
    applied: int  # rows whose position is now in the table (coalesced duplicates included)
    new_pending: int  # drivers taken as pending, to be claimed from the other shards
    dropped: dict[str, int]
    # Rows whose position belongs to another shard (a router with an older map): the
    # caller forwards them to their shard instead of dropping them.
    misrouted: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=LOCATION_DTYPE))


@dataclass(frozen=True, slots=True)
class TripLink:
    """A held driver's current ride: where its positions go while the rider waits or rides."""

    ride_id: str
    rider_id: str
    ride_shard: int
    # Metres the driver has moved since the link was made (its positions, point to point);
    # the edge reads it at pickup and drop-off to meter the trip.
    distance_m: float = 0.0


class TripLinks(dict[int, TripLink]):
    """The shard's trips by driver id, mirrored in the own table's ``on_trip`` column.

    Every ingest batch asks which of its rows' drivers are on a trip (their odometers
    run). Asked of the dict, that was a Python lookup per row or an ``np.isin`` that sorts
    the batch and the trips' ids: py-spy put it at a tenth of a shard's CPU under
    bench_mission (200k updates/s, thousands of trips a shard). The column answers it
    with one fancy index. Each change here sets the driver's slot, if it has one; a slot
    allocated later is set by :meth:`mark_new`.
    """

    __slots__ = ("_table",)

    def __init__(self, table: DriverTable) -> None:
        super().__init__()
        self._table = table

    def _set(self, driver_id: int, on_trip: bool) -> None:
        slot = self._table.id_to_slot.get(driver_id)
        if slot is not None:
            self._table.on_trip[slot] = on_trip

    def mark_new(self, slots: np.ndarray, ids: np.ndarray) -> None:
        """Slots just allocated to ``ids``: set the column for those with a trip."""
        if self:
            self._table.on_trip[slots] = np.fromiter(
                (i in self for i in ids.tolist()), dtype=bool, count=len(ids)
            )

    def __setitem__(self, key: int, value: TripLink) -> None:
        super().__setitem__(key, value)
        self._set(key, True)

    def __delitem__(self, key: int) -> None:
        super().__delitem__(key)
        self._set(key, False)

    def pop(self, key: int, *default: Any) -> Any:
        had = key in self
        out = super().pop(key, *default)
        if had:
            self._set(key, False)
        return out

    def popitem(self) -> tuple[int, TripLink]:
        key, value = super().popitem()
        self._set(key, False)
        return key, value

    def clear(self) -> None:
        for key in self:
            self._set(key, False)
        super().clear()

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key: int, default: TripLink) -> TripLink:
        if key not in self:
            self[key] = default
        return self[key]

    def __ior__(self, other: Any) -> TripLinks:  # type: ignore[override,misc]
        self.update(other)
        return self


class Release(NamedTuple):
    """A shard's answer to a claim: what it released (with trips) and what it keeps."""

    released: np.ndarray  # HANDOFF_DTYPE rows
    kept: np.ndarray  # int64 ids whose newer position this shard holds
    trips: dict[int, TripLink]


@dataclass(frozen=True, slots=True)
class HaloDelta:
    upserts: np.ndarray  # HALO_DTYPE rows
    removals: np.ndarray  # int64 driver ids


@dataclass(frozen=True, slots=True)
class NearbyDriver:
    driver_id: int
    distance_m: float
    lat: float
    lng: float
    heading: float
    vclass: int
    owner: int  # the shard that holds the driver (this shard, or a neighbour for halo)


class Shard:
    """The state of one shard. Single-threaded; every call runs to completion."""

    def __init__(self, region: Region, shard_map: ShardMap, shard_id: int) -> None:
        if not 0 <= shard_id < region.shard_count:
            raise ValueError(f"shard {shard_id} not in region {region.name}")
        self.region = region
        self.map = shard_map
        self.shard_id = shard_id
        self.cfg = region.drivers
        self.projection = shard_map.projection
        self.own = DriverTable()
        self.halo = DriverTable()
        self.own_index = GridIndex(self.own, region.index.cell_m)
        self.halo_index = GridIndex(self.halo, region.index.cell_m)
        self.dropped: Counter[str] = Counter()
        self.counters: Counter[str] = Counter()
        # Pending driver id -> (ts claimed with, the shard that probably holds it or -1).
        self._claims_out: dict[int, tuple[float, int]] = {}
        # driver id -> when a claim of it first went unanswered (Shard.retry_claims)
        self._claim_first: dict[int, float] = {}
        self._halo_gone: dict[int, list[int]] = {}  # neighbour -> ids it must forget
        self.n_vclasses = len(region.drivers.vehicle_classes)
        self.halo_refresh_s = min(HALO_REFRESH_S, self.cfg.stale_after_s / 3)
        # Held drivers with an accepted ride; travels with the driver on handoff.
        self.trips = TripLinks(self.own)
        # The odometer of each linked driver (metres since the link was made).
        self.trip_m: dict[int, float] = {}
        # Drivers who went offline with an offer open or on a trip: offline once it ends.
        self.offline_after: set[int] = set()
        self._trip_published: dict[int, float] = {}
        # driver id -> until when its trip positions are not taken (nobody was listening)
        self._trip_muted: dict[int, float] = {}
        # Linked drivers whose last move was faster than a car: driver id -> (the last
        # good (lat, lng, fix_ts), metres metered for the jump). See _odometer_step.
        self._odo_jumps: dict[int, tuple[tuple[float, float, float], float]] = {}

    # -- ingest ----------------------------------------------------------------------------

    def ingest(self, rows: np.ndarray, now: float) -> IngestResult:
        """Apply a batch of LOCATION_DTYPE rows received at ``now``.

        Each row is validated on its own; a refused row is counted under its reason and
        changes nothing. Of several rows for one driver the newest wins. Rows for drivers
        this shard does not hold make them pending (see the module docstring).
        """
        if rows.dtype != LOCATION_DTYPE:
            raise TypeError(f"expected LOCATION_DTYPE rows, got {rows.dtype}")
        n = len(rows)
        self.counters["received"] += n
        drop, shard = drop_codes(rows, now, self.cfg, self.n_vclasses, self.map)
        ids, ts = rows["driver_id"], rows["ts"]

        ok = drop == 0
        misrouted_mask = ok & (shard != self.shard_id)
        keep = ok & ~misrouted_mask
        idx = np.flatnonzero(keep)
        status_idx = idx[rows["intent"][idx] != Intent.POSITION]
        if len(idx):
            # Newest row per driver: sort by (id, order key, fix time, arrival) and take the
            # last of each run. Its position wins.
            fix = ts + rows["fix_dt"]
            order = idx[np.lexsort((idx, fix[idx], ts[idx], ids[idx]))]
            sid = ids[order]
            last = np.ones(len(order), dtype=bool)
            last[:-1] = sid[1:] != sid[:-1]
            coalesced = len(order) - int(last.sum())
            idx = order[last]
            # A status change is never lost to a position that follows it: the newest
            # status row of each driver is applied on its own, even when a plain position
            # (a gateway's) is newer.
            if len(status_idx):
                order = status_idx[np.lexsort((status_idx, ts[status_idx], ids[status_idx]))]
                sid = ids[order]
                last = np.ones(len(order), dtype=bool)
                last[:-1] = sid[1:] != sid[:-1]
                status_idx = order[last]
        else:
            coalesced = 0
        applied, new_pending, stale_ids = self._apply(take_rows(rows, idx), now)
        changed = self._apply_status(take_rows(rows, status_idx))
        # A row whose position was older than the held one but whose status was news
        # still did its job; only rows that changed nothing are out of order.
        out_of_order = int(np.count_nonzero(~np.isin(stale_ids, changed)))
        drop_counts = {"out_of_order": out_of_order} if out_of_order else {}
        for code in np.flatnonzero(np.bincount(drop, minlength=len(DROP_REASONS) + 1)[1:]):
            reason = DROP_REASONS[code]
            drop_counts[reason] = drop_counts.get(reason, 0) + int(np.count_nonzero(drop == code + 1))
        self.dropped.update(drop_counts)
        self.counters["applied"] += applied + coalesced
        return IngestResult(
            received=n,
            applied=applied + coalesced,
            new_pending=new_pending,
            dropped=drop_counts,
            misrouted=take_rows(rows, misrouted_mask),
        )

    def _apply(self, rows: np.ndarray, now: float) -> tuple[int, int, np.ndarray]:
        """Write the positions of validated, deduplicated, in-territory rows.

        Returns (applied, new drivers, ids of the rows older than the held position).
        """
        if not len(rows):
            return 0, 0, np.empty(0, dtype=np.int64)
        t = self.own
        ids = rows["driver_id"]
        slots = t.slots_of(ids)
        known = slots >= 0
        fresh = ~known | (rows["ts"] > t.ts[np.where(known, slots, 0)])
        stale = ids[~fresh]
        rows, slots, known = take_rows(rows, fresh), slots[fresh], known[fresh]
        new_ids = rows["driver_id"][~known]
        if len(new_ids):
            new_slots = t.allocate(new_ids)
            self.trips.mark_new(new_slots, new_ids)
            slots[~known] = new_slots
            t.pending[new_slots] = True
            t.status[new_slots] = DriverStatus.AVAILABLE
            t.vclass[new_slots] = 0
            # A driver crossing a border was in our halo, pushed by its owner: that owner
            # is where to claim it from. Unknown drivers are claimed from every shard.
            hs = self.halo.slots_of(new_ids)
            hint = np.where(hs >= 0, self.halo.owner[np.where(hs >= 0, hs, 0)], -1)
            for i, s, h in zip(new_ids.tolist(), rows["ts"][~known].tolist(), hint.tolist(), strict=True):
                self._claims_out[i] = (s, h)
            # Our own halo copy of a driver we now hold is older news: forget it.
            self.halo.remove(hs[hs >= 0])
        if self.trips:
            self._advance_odometers(rows, slots, known)
        t.lat[slots] = rows["lat"]
        t.lng[slots] = rows["lng"]
        x, y = self.projection.to_xy(rows["lat"], rows["lng"])
        t.x[slots] = x
        t.y[slots] = y
        t.ts[slots] = rows["ts"]
        t.seen_at[slots] = now
        t.heading[slots] = rows["heading"]
        t.speed[slots] = rows["speed"]
        t.fix_ts[slots] = rows["ts"] + rows["fix_dt"]
        self.own_index.update(slots)
        vc = rows["vclass"]
        has_vc = vc >= 0
        t.vclass[slots[has_vc]] = vc[has_vc]
        # Pushed to the neighbours only once it moved far enough or its last push is old
        # (never pushed: NaN, so the comparison is False and it goes).
        near = np.hypot(x - t.halo_x[slots], y - t.halo_y[slots]) <= HALO_MOVE_M
        t.halo_dirty[slots[~near | (now - t.halo_at[slots] >= self.halo_refresh_s)]] = True
        t.version += 1
        return len(rows), len(new_ids), stale

    def _apply_status(self, rows: np.ndarray) -> np.ndarray:
        """Apply the newest status row (ONLINE/OFFLINE) of each driver, by order key.

        ``rows`` holds at most one row per driver, each validated and in territory (its
        driver is held: :meth:`_apply` has run). A row older than the driver's last
        status changes nothing; one older than the held position still sets the status,
        so no position, in this batch or an earlier one, can hide it. Returns the ids
        whose status row was applied.
        """
        if not len(rows):
            return np.empty(0, dtype=np.int64)
        t = self.own
        slots = t.slots_of(rows["driver_id"])
        held = slots >= 0
        newer = held & (rows["ts"] > t.status_ts[np.where(held, slots, 0)])
        rows, slots = take_rows(rows, newer), slots[newer]
        if not len(rows):
            return rows["driver_id"]
        t.status_ts[slots] = rows["ts"]
        vc = rows["vclass"]
        has_vc = vc >= 0
        t.vclass[slots[has_vc]] = vc[has_vc]
        intent = rows["intent"]
        # Going online or offline changes only free drivers: a driver with an offer or on
        # a trip finishes it first (the ride logic frees it).
        free = (t.status[slots] == DriverStatus.AVAILABLE) | (t.status[slots] == DriverStatus.OFFLINE)
        t.status[slots[(intent == Intent.ONLINE) & free]] = DriverStatus.AVAILABLE
        t.status[slots[(intent == Intent.OFFLINE) & free]] = DriverStatus.OFFLINE
        ids = rows["driver_id"]
        # A busy driver's app said offline (or online again): honour it when the ride ends.
        self.offline_after.update(ids[(intent == Intent.OFFLINE) & ~free].tolist())
        self.offline_after.difference_update(ids[(intent == Intent.ONLINE) & ~free].tolist())
        t.halo_dirty[slots] = True
        t.version += 1
        return ids

    def _advance_odometers(self, rows: np.ndarray, slots: np.ndarray, known: np.ndarray) -> None:
        """Add each linked driver's move (old position → this row's) to its odometer."""
        linked = known & self.own.on_trip[np.where(known, slots, 0)]
        if not linked.any():
            return
        s = slots[linked]
        t = self.own
        lat, lng = rows["lat"][linked], rows["lng"][linked]
        fix = rows["ts"][linked] + rows["fix_dt"][linked]
        moved = np.asarray(haversine_m(t.lat[s], t.lng[s], lat, lng))
        dt = fix - t.fix_ts[s]
        plausible = (dt > 0) & (moved <= self.cfg.max_speed_mps * np.maximum(dt, 0.0))
        ids = rows["driver_id"][linked].tolist()
        if plausible.all() and not self._odo_jumps:
            for i, m in zip(ids, moved.tolist(), strict=True):
                self.trip_m[i] = self.trip_m.get(i, 0.0) + m
            return
        prev = zip(t.lat[s].tolist(), t.lng[s].tolist(), t.fix_ts[s].tolist(), strict=True)
        new = zip(lat.tolist(), lng.tolist(), fix.tolist(), strict=True)
        for i, m, ok, p, q in zip(ids, moved.tolist(), plausible.tolist(), prev, new, strict=True):
            self.trip_m[i] = self.trip_m.get(i, 0.0) + self._odometer_step(i, m, ok, p, q)

    def _odometer_step(
        self,
        driver_id: int,
        moved_m: float,
        plausible: bool,
        prev: tuple[float, float, float],
        new: tuple[float, float, float],
    ) -> float:
        """Metres to add for one move ``prev`` → ``new`` (``(lat, lng, fix_ts)`` each).

        A move faster than any car is either a glitch (one bad fix, then the driver is back
        where it was) or a gap (a tunnel, a phone asleep, a clock that stood still): until
        the next fix tells which, it is metered at the route estimate from the last good
        point (straight line × the detour factor pricing uses), never at nothing. A fix
        that continues from the jump confirms it; one that continues from the last good
        point takes the estimate back and meters the move from there.
        """
        jump = self._odo_jumps.pop(driver_id, None)
        if jump is not None:
            anchor, estimate_m = jump
            if plausible:
                return moved_m  # the jump was real: its estimate stays
            back_m = float(haversine_m(anchor[0], anchor[1], new[0], new[1]))
            dt = new[2] - anchor[2]
            if dt > 0 and back_m <= self.cfg.max_speed_mps * dt:
                return back_m - estimate_m  # a glitch: metered from the last good point
            # Another jump: the previous one stands, and this one starts from its end.
        elif plausible:
            return moved_m
        estimate_m = float(haversine_m(prev[0], prev[1], new[0], new[1])) * DEFAULT_DETOUR_FACTOR
        self._odo_jumps[driver_id] = (prev, estimate_m)
        return estimate_m

    # -- handoff ---------------------------------------------------------------------------

    @property
    def claims_waiting(self) -> int:
        """Drivers taken and not yet claimed (:meth:`take_claims` would return them)."""
        return len(self._claims_out)

    def take_claims(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Drivers taken since the last call: (ids, ts, owner hints).

        The caller claims each id from its hinted shard (the owner that pushed it into our
        halo), and from every other shard when the hint is -1 or the hinted shard neither
        released nor kept it; then it calls :meth:`settle_claims` with every answer.
        """
        n = len(self._claims_out)
        if not n:
            return np.empty(0, dtype=np.int64), np.empty(0), np.empty(0, dtype=np.int64)
        ids = np.fromiter(self._claims_out.keys(), dtype=np.int64, count=n)
        vals = np.array(list(self._claims_out.values()), dtype=np.float64).reshape(n, 2)
        self._claims_out.clear()
        # Claim with the newest position held now, not the one that made the driver
        # pending: rows that came since are newer, and a peer comparing against the
        # first one would keep a driver whose newest row is here.
        slots = self.own.slots_of(ids)
        ts = np.where(slots >= 0, self.own.ts[np.where(slots >= 0, slots, 0)], vals[:, 0])
        return ids, ts, vals[:, 1].astype(np.int64)

    def retry_claims(self, ids: np.ndarray, ts: np.ndarray, hints: np.ndarray, now: float) -> list[int]:
        """Claims a peer did not answer: the drivers stay pending and are claimed again in
        the next round, for up to :data:`CLAIM_GIVE_UP_S` from their first try. Returns the
        ids given up on (to settle as held by nobody)."""
        given_up = []
        for i, s, h in zip(ids.tolist(), ts.tolist(), hints.tolist(), strict=True):
            first = self._claim_first.setdefault(i, now)
            if now - first >= CLAIM_GIVE_UP_S:
                given_up.append(i)
                self._claim_first.pop(i, None)
            elif i not in self._claims_out:
                self._claims_out[i] = (s, h)
        self.counters["claims_retried"] += len(ids) - len(given_up)
        return given_up

    def release(self, ids: np.ndarray, ts: np.ndarray, claimer: int) -> Release:
        """Another shard claims these drivers with positions at ``ts``.

        Releases each driver this shard holds with an older position (ties go to the
        lower shard id) and returns (released HANDOFF_DTYPE rows, ids it keeps because
        its own position is newer).
        """
        t = self.own
        slots = t.slots_of(ids)
        held = slots >= 0
        s_held = slots[held]
        mine_ts = t.ts[s_held]
        their_ts = ts[held]
        give = (mine_ts < their_ts) | ((mine_ts == their_ts) & (claimer < self.shard_id))
        give_slots = s_held[give]
        released = np.zeros(len(give_slots), dtype=HANDOFF_DTYPE)
        released["driver_id"] = t.driver_id[give_slots]
        released["ts"] = t.ts[give_slots]
        released["status_ts"] = t.status_ts[give_slots]
        released["status"] = t.status[give_slots]
        released["vclass"] = t.vclass[give_slots]
        # A pending driver we release was never confirmed here: its claim is void.
        for i in released["driver_id"].tolist():
            self._claims_out.pop(i, None)
        trips = {
            i: replace(self.trips.pop(i), distance_m=self.trip_m.pop(i, 0.0))
            for i in released["driver_id"].tolist()
            if i in self.trips
        }
        for i in released["driver_id"].tolist():
            self._trip_published.pop(i, None)
            self._trip_muted.pop(i, None)
            self._odo_jumps.pop(i, None)
        self._drop_own(give_slots)
        self.counters["handoff_out"] += len(give_slots)
        kept = ids[held][~give]
        return Release(released, kept, trips)

    def settle_claims(
        self,
        ids: np.ndarray,
        released: list[np.ndarray],
        kept: list[np.ndarray],
        trips: list[dict[int, TripLink]] | None = None,
    ) -> None:
        """Finish a claim round: every other shard answered :meth:`release` for ``ids``."""
        t = self.own
        if self._claim_first:
            for i in ids.tolist():
                self._claim_first.pop(i, None)
        for part in trips or []:
            for i, link in part.items():
                if i in t.id_to_slot:
                    self.trips[i] = link
                    self.trip_m[i] = link.distance_m
        kept_ids = np.concatenate(kept) if kept else np.empty(0, dtype=np.int64)
        rel = np.concatenate(released) if released else np.zeros(0, dtype=HANDOFF_DTYPE)
        # Someone holds a newer position: it is theirs, our copy goes.
        lose = t.slots_of(np.unique(kept_ids))
        lose = lose[lose >= 0]
        lose = lose[t.pending[lose]]
        t.remove(lose)
        self.counters["claims_lost"] += len(lose)
        slots = t.slots_of(ids)
        slots = slots[slots >= 0]
        slots = slots[t.pending[slots]]
        if len(rel):
            rs = t.slots_of(rel["driver_id"])
            ok = (rs >= 0) & t.pending[np.where(rs >= 0, rs, 0)]
            rs, rel = rs[ok], rel[ok]
            busy = (rel["status"] == DriverStatus.OFFERED) | (rel["status"] == DriverStatus.ON_TRIP)
            # Our rows asked for a status after theirs (the driver went offline or online
            # on the way over): a busy driver honours it when its ride ends.
            ours_newer = t.status_ts[rs] > rel["status_ts"]
            mine = t.status[rs]
            self.offline_after.update(
                rel["driver_id"][busy & ours_newer & (mine == DriverStatus.OFFLINE)].tolist()
            )
            # Otherwise the older shard's status stands: a plain position that crossed the
            # border does not bring an offline driver back online.
            theirs = busy | ~ours_newer
            t.status[rs[theirs]] = rel["status"][theirs]
            t.status_ts[rs[~ours_newer]] = rel["status_ts"][~ours_newer]
            t.vclass[rs[~ours_newer]] = rel["vclass"][~ours_newer]
            self.counters["handoff_in"] += len(rs)
        t.pending[slots] = False
        t.halo_dirty[slots] = True
        t.version += 1

    def _drop_own(self, slots: np.ndarray) -> None:
        t = self.own
        masks = t.halo_mask[slots]
        ids = t.driver_id[slots]
        for k in range(self.region.shard_count):
            bit = np.uint64(1 << k)
            gone = ids[(masks & bit) != 0]
            if len(gone):
                self._halo_gone.setdefault(k, []).extend(gone.tolist())
        t.remove(slots)

    # -- ride-side driver state ------------------------------------------------------------

    def holds(self, driver_id: int) -> bool:
        slot = self.own.id_to_slot.get(int(driver_id))
        return slot is not None and not self.own.pending[slot]

    def holds_many(self, driver_ids: np.ndarray) -> np.ndarray:
        """:meth:`holds` for an array of ids: held here and not pending a claim."""
        slots = self.own.slots_of(driver_ids)
        held = slots >= 0
        held[held] = ~self.own.pending[slots[held]]
        return held

    def reserve(self, driver_id: int, now: float, vclass: int | None = None) -> bool:
        """Reserve a held, available driver for an offer (another shard's, or our own)."""
        slot = self.own.id_to_slot.get(int(driver_id))
        if slot is None:
            return False
        ok = bool(self.own.eligible(np.array([slot]), now, self.cfg.stale_after_s, vclass)[0])
        if ok:
            self.own.status[slot] = DriverStatus.OFFERED
            self.own.halo_dirty[slot] = True
        return ok

    def set_status(self, driver_id: int, status: DriverStatus, trip: TripLink | None = None) -> bool:
        """Set a held driver's status (and its trip link). False if this shard does not hold it.

        ``AVAILABLE`` and ``OFFLINE`` end any trip link; ``ON_TRIP`` needs ``trip``. A driver
        whose app went offline during the offer or trip becomes ``OFFLINE``, not ``AVAILABLE``.
        """
        slot = self.own.id_to_slot.get(int(driver_id))
        if slot is None:
            return False
        if status == DriverStatus.AVAILABLE and int(driver_id) in self.offline_after:
            status = DriverStatus.OFFLINE
        if status in (DriverStatus.AVAILABLE, DriverStatus.OFFLINE):
            self.offline_after.discard(int(driver_id))
        self.own.status[slot] = status
        self.own.halo_dirty[slot] = True
        if status == DriverStatus.ON_TRIP and trip is not None:
            self.trips[int(driver_id)] = trip
            self.trip_m[int(driver_id)] = trip.distance_m
        elif status in (DriverStatus.AVAILABLE, DriverStatus.OFFLINE):
            self.trips.pop(int(driver_id), None)
            self.trip_m.pop(int(driver_id), None)
            self._odo_jumps.pop(int(driver_id), None)
            self._trip_published.pop(int(driver_id), None)
            self._trip_muted.pop(int(driver_id), None)
        return True

    def available_ids(self, now: float) -> np.ndarray:
        """Ids (int64) of the held drivers that may be offered a ride now: available,
        confirmed (not pending a handoff) and heard from within ``stale_after_s``. Halo
        copies are not held here and never included. Changes nothing."""
        t = self.own
        mask = t.available_mask(now, self.cfg.stale_after_s)
        return t.driver_id[: t.high_water][mask].astype(np.int64)

    def trip_ride_ids(self) -> list[str]:
        """The rides of the trips whose driver this shard holds (confirmed, not pending).

        A link can outlive its driver here (evicted while silent); such a trip is not live
        in this shard, so it is left out. Changes nothing."""
        t = self.own
        out = []
        for driver_id, link in self.trips.items():
            slot = t.id_to_slot.get(driver_id)
            if slot is not None and not t.pending[slot]:
                out.append(link.ride_id)
        return out

    def trip_positions(self, now: float) -> list[dict[str, Any]]:
        """Positions of held drivers on a trip that changed since they were last taken.

        The rider of each trip sees its driver move from acceptance to drop-off. Drivers
        muted by :meth:`mute_trip_positions` are skipped until their mute ends.
        """
        out = []
        t = self.own
        muted = self._trip_muted
        for driver_id, link in self.trips.items():
            if muted and muted.get(driver_id, 0.0) > now:
                continue
            slot = t.id_to_slot.get(driver_id)
            if slot is None:
                continue
            seen = float(t.seen_at[slot])
            if self._trip_published.get(driver_id, -1.0) >= seen:
                continue
            self._trip_published[driver_id] = seen
            out.append(
                {
                    "rider_id": link.rider_id,
                    "ride_id": link.ride_id,
                    "driver_id": driver_id,
                    "lat": float(t.lat[slot]),
                    "lng": float(t.lng[slot]),
                    "heading": float(t.heading[slot]) if np.isfinite(t.heading[slot]) else None,
                    "ts": float(t.fix_ts[slot]),
                }
            )
        return out

    def mute_trip_positions(self, driver_ids: list[int], until: float) -> None:
        """Take no trip positions of these drivers before ``until``: the last one reached
        no rider (nobody holds the rider's socket). At city scale most riders are not
        watching: a trip is ten minutes, and publishing every moving trip's driver twice a
        second to nobody cost as much as the trips' matching. A rider who opens the app
        sees positions again within the mute."""
        for d in driver_ids:
            if d in self.trips:
                self._trip_muted[d] = until

    # -- halo ------------------------------------------------------------------------------

    def halo_delta(self) -> dict[int, HaloDelta]:
        """What each neighbour must learn about this shard's drivers since the last call."""
        t = self.own
        hw = t.high_water
        dirty = np.flatnonzero(t.halo_dirty[:hw] & t.used[:hw] & ~t.pending[:hw])
        out: dict[int, HaloDelta] = {}
        old = t.halo_mask[dirty]
        new = self.map.halo_mask_of(t.lat[dirty], t.lng[dirty])
        rows = np.zeros(len(dirty), dtype=HALO_DTYPE)
        for name in ("driver_id", "lat", "lng", "ts", "heading", "speed", "status", "vclass"):
            rows[name] = getattr(t, name)[dirty]
        for k in range(self.region.shard_count):
            if k == self.shard_id:
                continue
            bit = np.uint64(1 << k)
            has_new = (new & bit) != 0
            left = ((old & bit) != 0) & ~has_new
            gone = self._halo_gone.pop(k, [])
            removals = np.concatenate([rows["driver_id"][left], np.asarray(gone, dtype=np.int64)]).astype(
                np.int64
            )
            upserts = take_rows(rows, has_new)
            if len(upserts) or len(removals):
                out[k] = HaloDelta(upserts=upserts, removals=removals)
        t.halo_mask[dirty] = new
        t.halo_dirty[dirty] = False
        t.halo_x[dirty] = t.x[dirty]
        t.halo_y[dirty] = t.y[dirty]
        t.halo_at[dirty] = t.seen_at[dirty]
        return out

    def apply_halo(self, owner: int, delta: HaloDelta, now: float) -> None:
        """Take a neighbour's halo push. Removals only remove that owner's entries."""
        h = self.halo
        if len(delta.removals):
            slots = h.slots_of(delta.removals)
            slots = slots[slots >= 0]
            h.remove(slots[h.owner[slots] == owner])
        up = delta.upserts
        if not len(up):
            return
        # Drivers we hold ourselves are not halo drivers (a handoff in flight).
        up = up[self.own.slots_of(up["driver_id"]) < 0]
        slots = h.slots_of(up["driver_id"])
        known = slots >= 0
        newer = ~known | (up["ts"] >= h.ts[np.where(known, slots, 0)])
        up, slots, known = up[newer], slots[newer], known[newer]
        if (~known).any():
            slots[~known] = h.allocate(up["driver_id"][~known])
        h.lat[slots] = up["lat"]
        h.lng[slots] = up["lng"]
        x, y = self.projection.to_xy(up["lat"], up["lng"])
        h.x[slots] = x
        h.y[slots] = y
        h.ts[slots] = up["ts"]
        h.seen_at[slots] = now
        h.heading[slots] = up["heading"]
        h.speed[slots] = up["speed"]
        h.status[slots] = up["status"]
        h.vclass[slots] = up["vclass"]
        h.owner[slots] = owner
        self.halo_index.update(slots)
        h.version += 1

    # -- queries ---------------------------------------------------------------------------

    def nearby(
        self,
        lat: float,
        lng: float,
        radius_m: float,
        k: int,
        now: float,
        vclass: int | None = None,
    ) -> list[NearbyDriver]:
        """The k nearest available drivers within radius_m, own and halo, nearest first."""
        if not (np.isfinite(lat) and np.isfinite(lng)) or abs(lat) > 90 or abs(lng) > 180:
            raise InvalidLocation(f"invalid query point ({lat}, {lng})")
        if not np.isfinite(radius_m) or radius_m <= 0:
            raise InvalidLocation(f"radius must be a positive number of metres, got {radius_m}")
        if radius_m > self.region.index.halo_m:
            raise RadiusTooLarge(
                f"radius {radius_m:.0f} m exceeds the shard halo of {self.region.index.halo_m:.0f} m"
            )
        x, y = self.projection.to_xy(lat, lng)
        found: list[NearbyDriver] = []
        stale = self.cfg.stale_after_s
        within = radius_m
        for table, index, is_halo in ((self.own, self.own_index, False), (self.halo, self.halo_index, True)):

            def eligible(slots: np.ndarray, table: DriverTable = table) -> np.ndarray:
                return table.eligible(slots, now, stale, vclass)

            slots, dist = index.nearest(lat, lng, float(x), float(y), within, k, eligible)
            if not is_halo and len(dist) == k:
                # k own drivers within this distance: a halo driver farther away cannot
                # be among the k nearest, so the halo is searched only that far (inclusive:
                # a tie is broken by driver id below). Away from a border that is a few
                # rings of an empty halo index instead of every ring to the full radius.
                within = max(float(dist[-1]), 1e-6)
            for s, d in zip(slots.tolist(), dist.tolist(), strict=True):
                found.append(
                    NearbyDriver(
                        driver_id=int(table.driver_id[s]),
                        distance_m=d,
                        lat=float(table.lat[s]),
                        lng=float(table.lng[s]),
                        heading=float(table.heading[s]),
                        vclass=int(table.vclass[s]),
                        owner=int(table.owner[s]) if is_halo else self.shard_id,
                    )
                )
        found.sort(key=lambda f: (f.distance_m, f.driver_id))
        return found[:k]

    # -- housekeeping ----------------------------------------------------------------------

    def sweep(self, now: float) -> int:
        """Evict own drivers silent past evict_after_s and stale halo entries."""
        t = self.own
        hw = t.high_water
        gone = np.flatnonzero(t.used[:hw] & (t.seen_at[:hw] < now - self.cfg.evict_after_s))
        self._drop_own(gone)
        self.counters["evicted"] += len(gone)
        h = self.halo
        hh = h.high_water
        # Owners push every change; a halo entry not refreshed for this long lost its owner.
        h.remove(np.flatnonzero(h.used[:hh] & (h.seen_at[:hh] < now - self.cfg.stale_after_s)))
        return len(gone)

    def stats(self, now: float) -> dict[str, Any]:
        t = self.own
        hw = t.high_water
        used = t.used[:hw]
        status = t.status[:hw][used]
        fresh = t.seen_at[:hw][used] >= now - self.cfg.stale_after_s
        return {
            "shard_id": self.shard_id,
            "drivers": int(used.sum()),
            "available": int(np.count_nonzero(t.available_mask(now, self.cfg.stale_after_s))),
            "offline": int(np.count_nonzero(status == DriverStatus.OFFLINE)),
            "offered": int(np.count_nonzero(status == DriverStatus.OFFERED)),
            "on_trip": int(np.count_nonzero(status == DriverStatus.ON_TRIP)),
            "stale": int(np.count_nonzero(~fresh)),
            "pending": int(np.count_nonzero(t.pending[:hw] & used)),
            "halo_drivers": len(self.halo),
            "counters": dict(self.counters),
            "dropped": dict(self.dropped),
        }
