"""The per-shard driver table: columnar numpy arrays indexed by a dense slot.

One row per driver the shard holds. ``id_to_slot`` maps a driver id to its slot; freed
slots are reused. Every column is a numpy array of ``capacity`` rows, grown by doubling;
rows at or past ``high_water`` were never used. A loop over drivers is always a numpy
expression over these columns, never a Python loop over objects.

Driver ids are positive int64s. The public id of driver 42 is ``drv-42``
(:func:`format_driver_id` / :func:`parse_driver_id`): integers make the hot path a
vectorized gather instead of string hashing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from enum import IntEnum
from itertools import repeat
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from dispatch.errors import InvalidInput


class DriverStatus(IntEnum):
    OFFLINE = 0
    AVAILABLE = 1
    OFFERED = 2
    ON_TRIP = 3


class Intent(IntEnum):
    """What a location row says about the driver's status besides its position.

    A driver socket stamps every row with the status its driver last asked for (ONLINE
    or OFFLINE), so the newest row always carries it; POSITION rows (gateways that send
    no intent column) never change a known driver's status.
    """

    POSITION = 0  # position only; a driver the shard has never seen comes online
    ONLINE = 1  # the driver is online (available), vehicle class in the row
    OFFLINE = 2  # the driver is offline


# One location update on the wire between edge and shard: 48 bytes, little-endian.
#
# ``ts`` orders a driver's rows and ``fix_dt`` dates its position. The edge stamps ``ts``
# with its own clock when the frame arrives (strictly increasing per driver socket), so a
# phone whose clock runs ahead cannot make a position outrank the ``offline`` that
# follows it; the client's own timestamp travels as ``fix_dt`` (client ts minus ``ts``,
# bounded by the skew and age limits, so float32 keeps it to a few microseconds) and is
# used only for the position's age and speed. Rows built with the client's time in
# ``ts`` and ``fix_dt`` 0 (tests, simulators) mean the same as before the split.
LOCATION_DTYPE = np.dtype(
    [
        ("driver_id", "<i8"),
        ("lat", "<f8"),
        ("lng", "<f8"),
        ("ts", "<f8"),  # order key: server time the row was received, seconds since the epoch
        ("heading", "<f4"),  # degrees clockwise from north; NaN if unknown
        ("speed", "<f4"),  # metres a second; NaN if unknown
        ("vclass", "i1"),  # vehicle class index in the region's list; -1 keep
        ("intent", "i1"),  # Intent
        ("fix_dt", "<f4"),  # the client's timestamp of the position minus ts, seconds
        ("_pad", "V2"),
    ]
)
assert LOCATION_DTYPE.itemsize == 48


def take_rows(rows: np.ndarray, which: np.ndarray) -> np.ndarray:
    """``rows[which]`` (positions or a mask) for rows of a structured dtype (LOCATION_DTYPE,
    HALO_DTYPE), copied as whole records. numpy copies a structured dtype field by field:
    indexing 2,000 LOCATION_DTYPE rows by position took 108 us so, 6 us as opaque 48-byte
    records (numpy 2.4)."""
    if not rows.flags.c_contiguous:
        out: np.ndarray = rows[which]
        return out
    out = rows.view(np.dtype((np.void, rows.dtype.itemsize)))[which]
    return out.view(rows.dtype)


def concat_rows(parts: Sequence[np.ndarray]) -> np.ndarray:
    """``np.concatenate(parts)`` for rows of one structured dtype, copied as whole records."""
    if not parts or not all(p.flags.c_contiguous for p in parts):
        return np.concatenate(parts)
    dtype = parts[0].dtype
    whole = np.dtype((np.void, dtype.itemsize))
    return np.concatenate([p.view(whole) for p in parts]).view(dtype)


_ID_RE = re.compile(r"^drv-([1-9][0-9]{0,17})$")


def format_driver_id(driver_id: int) -> str:
    return f"drv-{int(driver_id)}"


def parse_driver_id(public_id: str) -> int:
    """``"drv-42"`` → 42. Raises InvalidInput for anything else."""
    m = _ID_RE.match(public_id) if isinstance(public_id, str) else None
    if not m:
        raise InvalidInput(f"driver id must look like drv-<positive integer>, got {public_id!r}")
    return int(m.group(1))


def location_rows(
    driver_id: ArrayLike,
    lat: ArrayLike,
    lng: ArrayLike,
    ts: ArrayLike,
    heading: ArrayLike = np.nan,
    speed: ArrayLike = np.nan,
    vclass: ArrayLike = -1,
    intent: ArrayLike = Intent.POSITION,
    fix_dt: ArrayLike = 0.0,
) -> NDArray[np.void]:
    """Build a LOCATION_DTYPE array from columns (scalars broadcast)."""
    n = int(np.broadcast(np.asarray(driver_id), np.asarray(lat), np.asarray(lng)).size)
    rows = np.zeros(n, dtype=LOCATION_DTYPE)
    rows["driver_id"] = driver_id
    rows["lat"] = lat
    rows["lng"] = lng
    rows["ts"] = ts
    rows["heading"] = heading
    rows["speed"] = speed
    rows["vclass"] = vclass
    rows["intent"] = intent
    rows["fix_dt"] = fix_dt
    return rows


class DriverTable:
    """Columnar state of the drivers one shard holds (or sees, for a halo table).

    Not thread-safe: a shard is single-threaded by design.
    """

    # The columns, created from COLUMNS in __init__ and _grow; declared here for the type checker.
    driver_id: NDArray[np.int64]
    lat: NDArray[np.float64]
    lng: NDArray[np.float64]
    x: NDArray[np.float64]
    y: NDArray[np.float64]
    ts: NDArray[np.float64]
    fix_ts: NDArray[np.float64]
    status_ts: NDArray[np.float64]
    seen_at: NDArray[np.float64]
    heading: NDArray[np.float32]
    speed: NDArray[np.float32]
    status: NDArray[np.int8]
    vclass: NDArray[np.int8]
    pending: NDArray[np.bool_]
    halo_mask: NDArray[np.uint64]
    halo_dirty: NDArray[np.bool_]
    owner: NDArray[np.int16]
    cell: NDArray[np.int64]
    built_cell: NDArray[np.int64]
    used: NDArray[np.bool_]
    halo_x: NDArray[np.float64]
    halo_y: NDArray[np.float64]
    halo_at: NDArray[np.float64]
    on_trip: NDArray[np.bool_]

    COLUMNS: dict[str, tuple[type, object]] = {
        "driver_id": (np.int64, 0),
        "lat": (np.float64, np.nan),
        "lng": (np.float64, np.nan),
        "x": (np.float64, np.nan),  # metres east of the region centre
        "y": (np.float64, np.nan),  # metres north of the region centre
        "ts": (np.float64, -np.inf),  # order key (LOCATION_DTYPE) of the position
        "fix_ts": (np.float64, -np.inf),  # the client's timestamp of the position
        "status_ts": (np.float64, -np.inf),  # order key of the last status row applied
        "seen_at": (np.float64, -np.inf),  # server time the position arrived
        "heading": (np.float32, np.nan),
        "speed": (np.float32, np.nan),
        "status": (np.int8, DriverStatus.OFFLINE),
        "vclass": (np.int8, 0),
        "pending": (np.bool_, False),  # taken, waiting for other shards to release it
        "halo_mask": (np.uint64, 0),  # other shards that currently see this driver
        "halo_dirty": (np.bool_, False),  # changed since the last halo sync
        # Where and when the driver was last pushed to the neighbours (own tables).
        "halo_x": (np.float64, np.nan),
        "halo_y": (np.float64, np.nan),
        "halo_at": (np.float64, -np.inf),
        "on_trip": (np.bool_, False),  # own tables: the driver has a trip here (Shard.trips)
        "owner": (np.int16, -1),  # for halo tables: the shard that holds the driver
        "cell": (np.int64, -1),  # spatial index cell of the current position
        "built_cell": (np.int64, -1),  # the cell the index last sorted this slot under
        "used": (np.bool_, False),
    }

    def __init__(self, capacity: int = 1024) -> None:
        self.capacity = max(16, int(capacity))
        for name, (dtype, fill) in self.COLUMNS.items():
            setattr(self, name, np.full(self.capacity, fill, dtype=dtype))
        self.id_to_slot: dict[int, int] = {}
        # id_to_slot again, as an array indexed by id for ids in [0, LUT_MAX_ID): a batch's
        # slots in one fancy index instead of a dict lookup per row (see slots_of).
        self._lut = np.full(0, -1, dtype=np.int32)
        self.free: list[int] = []
        self.high_water = 0
        # Bumped whenever a position or membership changes; the spatial index uses it.
        self.version = 0

    def __len__(self) -> int:
        return len(self.id_to_slot)

    def _grow(self, need: int) -> None:
        cap = self.capacity
        while cap < need:
            cap *= 2
        if cap == self.capacity:
            return
        for name, (dtype, fill) in self.COLUMNS.items():
            old = getattr(self, name)
            new: NDArray[Any] = np.full(cap, fill, dtype=dtype)
            new[: self.capacity] = old
            setattr(self, name, new)
        self.capacity = cap

    #: Ids below this are also kept in a lookup array (4 bytes an id up to the largest id
    #: held: 400 KB for a fleet numbered to 100,000, at most 16 MB); larger ids only in the dict.
    LUT_MAX_ID = 1 << 22

    def slots_of(self, ids: np.ndarray) -> np.ndarray:
        """Slot of each id (int64), -1 for ids the table does not hold."""
        # A dict lookup per id was a sixth of a shard's ingest CPU (py-spy, bench_mission);
        # the lookup array answers ids below LUT_MAX_ID in one fancy index.
        n = len(ids)
        if not n:
            return np.empty(0, dtype=np.int64)
        lut = self._lut
        inside = (ids >= 0) & (ids < len(lut))
        if inside.all():
            held: np.ndarray = lut[ids].astype(np.int64)
            return held
        out = np.full(n, -1, dtype=np.int64)
        out[inside] = lut[ids[inside]]
        # Ids past the array: held only if they are too large for it (else never allocated).
        far = np.flatnonzero((ids < 0) | (ids >= self.LUT_MAX_ID))
        if len(far):
            # map() over two iterables calls dict.get with no Python frame per id.
            get = self.id_to_slot.get
            out[far] = np.fromiter(
                map(get, ids[far].tolist(), repeat(-1, len(far))), dtype=np.int64, count=len(far)
            )
        return out

    def _lut_set(self, ids: np.ndarray, slots: np.ndarray | int) -> None:
        inside = (ids >= 0) & (ids < self.LUT_MAX_ID)
        if not inside.any():
            return
        ids = ids[inside]
        top = int(ids.max()) + 1
        if top > len(self._lut):
            grown = np.full(min(max(top, 2 * len(self._lut), 1024), self.LUT_MAX_ID), -1, dtype=np.int32)
            grown[: len(self._lut)] = self._lut
            self._lut = grown
        self._lut[ids] = slots if isinstance(slots, int) else slots[inside]

    def allocate(self, ids: np.ndarray) -> np.ndarray:
        """Give each new id (not held, unique) a slot; columns reset to their defaults."""
        n = len(ids)
        reuse = min(n, len(self.free))
        slots = np.empty(n, dtype=np.int64)
        if reuse:
            slots[:reuse] = self.free[-reuse:]
            del self.free[-reuse:]
        fresh = n - reuse
        if fresh:
            self._grow(self.high_water + fresh)
            slots[reuse:] = np.arange(self.high_water, self.high_water + fresh)
            self.high_water += fresh
        for name, (_dtype, fill) in self.COLUMNS.items():
            getattr(self, name)[slots] = fill
        self.driver_id[slots] = ids
        self.used[slots] = True
        self.id_to_slot.update(zip(ids.tolist(), slots.tolist(), strict=True))
        self._lut_set(np.asarray(ids, dtype=np.int64), slots)
        self.version += 1
        return slots

    def remove(self, slots: np.ndarray) -> None:
        """Drop the drivers in these slots and free the slots for reuse."""
        slots = np.asarray(slots, dtype=np.int64)
        if not len(slots):
            return
        pop = self.id_to_slot.pop
        gone = self.driver_id[slots]
        for i in gone.tolist():
            pop(i, None)
        self._lut_set(gone, -1)
        self.used[slots] = False
        self.status[slots] = DriverStatus.OFFLINE
        self.x[slots] = np.nan
        self.y[slots] = np.nan
        self.cell[slots] = -1
        self.free.extend(slots.tolist())
        self.version += 1

    def used_slots(self) -> np.ndarray:
        return np.flatnonzero(self.used[: self.high_water])

    def eligible(
        self, slots: np.ndarray, now: float, stale_after_s: float, vclass: int | None = None
    ) -> NDArray[np.bool_]:
        """Which of ``slots`` may be offered a ride: available, confirmed, fresh, of the class."""
        ok: NDArray[np.bool_] = (
            self.used[slots]
            & (self.status[slots] == DriverStatus.AVAILABLE)
            & ~self.pending[slots]
            & (self.seen_at[slots] >= now - stale_after_s)
        )
        if vclass is not None:
            ok &= self.vclass[slots] == vclass
        return ok

    def available_mask(self, now: float, stale_after_s: float) -> NDArray[np.bool_]:
        """Over slots [0, high_water): available, confirmed and heard from recently."""
        hw = self.high_water
        mask: NDArray[np.bool_] = (
            self.used[:hw]
            & (self.status[:hw] == DriverStatus.AVAILABLE)
            & ~self.pending[:hw]
            & (self.seen_at[:hw] >= now - stale_after_s)
        )
        return mask

    def row(self, slot: int) -> dict[str, Any]:
        """One driver as a plain dict (for status pages and tests)."""
        return {
            "driver_id": int(self.driver_id[slot]),
            "lat": float(self.lat[slot]),
            "lng": float(self.lng[slot]),
            "ts": float(self.ts[slot]),
            "fix_ts": float(self.fix_ts[slot]),
            "seen_at": float(self.seen_at[slot]),
            "heading": float(self.heading[slot]),
            "speed": float(self.speed[slot]),
            "status": DriverStatus(int(self.status[slot])).name.lower(),
            "vclass": int(self.vclass[slot]),
            "pending": bool(self.pending[slot]),
        }
