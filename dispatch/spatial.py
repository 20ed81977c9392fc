"""The spatial index of a shard: k nearest drivers within a radius, vectorized.

Drivers are bucketed by a square grid cell (``cell_m``) of the region's local projection.
The index is a sort of the table's slots by cell (CSR layout) plus a *moved* list: slots
whose cell changed (or that appeared) since the last sort. A query reads the sorted
buckets, keeping only entries whose slot is still in the cell it was sorted under, and
scans the moved list directly; so results are exact at every moment, while the sort (a
few ms for 50k drivers) is redone only when the moved list outgrows a few percent of the
table, about once a second at city speeds with 250 m cells, instead of on every query.

A query expands a square window ring by ring until it has k candidates within the radius
the window is guaranteed to cover, so a k=10 query in a dense city touches a handful of
cells, not every driver within 3 km. Each window row is one contiguous slice of the
sorted order. Final distances are great-circle (haversine), so results equal a brute
force over the whole table.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from numpy.typing import ArrayLike

from dispatch.drivers import DriverTable
from dispatch.geo import haversine_m

# The local projection differs from the great circle by far less than this over a region;
# windows are widened by it so that no driver within the radius is missed.
_PROJECTION_SLACK = 1.01

Eligible = Callable[[np.ndarray], np.ndarray]


class GridIndex:
    def __init__(self, table: DriverTable, cell_m: float, extent_m: float = 200_000.0) -> None:
        self.table = table
        self.cell_m = float(cell_m)
        # Cells are numbered on a fixed grid centred on the region centre.
        self.half = int(np.ceil(extent_m / self.cell_m))
        self.width = 2 * self.half + 1
        self._order = np.empty(0, dtype=np.int64)
        self._cells_sorted = np.empty(0, dtype=np.int64)
        # The moved list, in parts; each slot at most once across the parts (``_listed``
        # marks them), so a query reads it without deduplicating: ``np.unique`` of the
        # list on every query was a quarter of a search's CPU under bench_mission.
        self._moved: list[np.ndarray] = []
        self._moved_n = 0
        self._listed = np.zeros(0, dtype=bool)
        self.rebuilds = 0

    def cells_of(self, x: ArrayLike, y: ArrayLike) -> np.ndarray:
        with np.errstate(invalid="ignore"):
            cx = np.clip(np.floor(np.asarray(x) / self.cell_m), -self.half, self.half).astype(np.int64)
            cy = np.clip(np.floor(np.asarray(y) / self.cell_m), -self.half, self.half).astype(np.int64)
        cells = (cy + self.half) * self.width + (cx + self.half)
        return np.where(np.isfinite(x) & np.isfinite(y), cells, -1)

    def cell_of(self, x: float, y: float) -> int:
        """:meth:`cells_of` for one point, without numpy's per-call cost (a query's cell)."""
        if not (math.isfinite(x) and math.isfinite(y)):
            return -1
        cx = min(max(math.floor(x / self.cell_m), -self.half), self.half)
        cy = min(max(math.floor(y / self.cell_m), -self.half), self.half)
        return (cy + self.half) * self.width + (cx + self.half)

    def update(self, slots: np.ndarray) -> None:
        """The positions of ``slots`` changed (or they were allocated): re-bucket them."""
        t = self.table
        slots = np.asarray(slots, dtype=np.int64)
        if not len(slots):
            return
        cells = self.cells_of(t.x[slots], t.y[slots])
        t.cell[slots] = cells
        changed = slots[cells != t.built_cell[slots]]
        if len(changed):
            if len(self._listed) < t.high_water:
                grown = np.zeros(max(t.high_water, 2 * len(self._listed)), dtype=bool)
                grown[: len(self._listed)] = self._listed
                self._listed = grown
            changed = changed[~self._listed[changed]]
            if len(changed) > 1:
                changed = np.unique(changed)  # a caller's batch may name a slot twice
            self._listed[changed] = True
            self._moved.append(changed)
            self._moved_n += len(changed)

    def _rebuild(self) -> None:
        t = self.table
        hw = t.high_water
        slots = np.flatnonzero(t.used[:hw] & (t.cell[:hw] >= 0))
        cells = t.cell[slots]
        order = np.argsort(cells, kind="stable")
        self._order = slots[order]
        self._cells_sorted = cells[order]
        t.built_cell[:hw] = -1
        t.built_cell[self._order] = self._cells_sorted
        self._moved = []
        self._moved_n = 0
        self._listed[:] = False
        self.rebuilds += 1

    def _maybe_rebuild(self) -> None:
        if self._moved_n > max(256, len(self.table) // 20) or (self.rebuilds == 0 and self._moved_n):
            self._rebuild()

    def _window(
        self, cx0: int, cy0: int, ring: int, moved: np.ndarray, moved_cells: np.ndarray
    ) -> np.ndarray:
        """Slots in the square of cells [cx0-ring, cx0+ring] x [cy0-ring, cy0+ring]."""
        t = self.table
        x_lo = max(cx0 - ring, 0)
        x_hi = min(cx0 + ring, self.width - 1)
        y_lo = max(cy0 - ring, 0)
        y_hi = min(cy0 + ring, self.width - 1)
        rows = np.arange(y_lo, y_hi + 1)
        lo = np.searchsorted(self._cells_sorted, rows * self.width + x_lo, side="left")
        hi = np.searchsorted(self._cells_sorted, rows * self.width + x_hi, side="right")
        parts = [self._order[a:b] for a, b in zip(lo.tolist(), hi.tolist(), strict=True) if b > a]
        sorted_part: np.ndarray = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
        # Entries sorted under a cell the slot has since left are served by the moved list.
        sorted_part = sorted_part[t.cell[sorted_part] == t.built_cell[sorted_part]]
        if len(moved):
            mx = moved_cells % self.width
            my = moved_cells // self.width
            inside = (mx >= x_lo) & (mx <= x_hi) & (my >= y_lo) & (my <= y_hi)
            return np.concatenate([sorted_part, moved[inside]])
        return sorted_part

    def nearest(
        self,
        lat: float,
        lng: float,
        x: float,
        y: float,
        radius_m: float,
        k: int,
        eligible: Eligible,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest eligible slots within radius_m, nearest first.

        ``eligible(slots) -> bool mask`` decides which candidate slots may be returned
        (available, fresh, the right vehicle class...). Returns (slots int64, distances in
        metres float64), at most k of each.
        """
        if k <= 0 or radius_m <= 0:
            return np.empty(0, dtype=np.int64), np.empty(0)
        self._maybe_rebuild()
        t = self.table
        if self._moved:
            listed = self._moved[0] if len(self._moved) == 1 else np.concatenate(self._moved)
            keep = (t.cell[listed] != t.built_cell[listed]) & t.used[listed] & (t.cell[listed] >= 0)
            self._listed[listed[~keep]] = False
            moved = listed[keep]
            self._moved = [moved]
            self._moved_n = len(moved)
        else:
            moved = np.empty(0, dtype=np.int64)
        moved_cells = t.cell[moved]
        q = self.cell_of(x, y)
        cx0, cy0 = q % self.width, q // self.width
        max_ring = int(np.ceil(radius_m * _PROJECTION_SLACK / self.cell_m)) + 1
        ring = 1
        while True:
            cand = self._window(cx0, cy0, ring, moved, moved_cells)
            if len(cand):
                cand = cand[eligible(cand)]
            d = haversine_m(lat, lng, t.lat[cand], t.lng[cand]) if len(cand) else np.empty(0)
            within = d <= radius_m
            # Every point within `covered` metres of the query lies inside this window.
            covered = (ring * self.cell_m) / _PROJECTION_SLACK
            if ring >= max_ring or int(np.count_nonzero((d <= covered) & within)) >= k:
                break
            ring = min(max(ring * 2, ring + 1), max_ring)
        cand, d = cand[within], d[within]
        if len(cand) > k:
            part = np.argpartition(d, k - 1)[:k]
            cand, d = cand[part], d[part]
        order = np.lexsort((t.driver_id[cand], d))
        return cand[order], d[order]


def brute_force_nearest(
    table: DriverTable, lat: float, lng: float, radius_m: float, k: int, eligible: Eligible
) -> tuple[np.ndarray, np.ndarray]:
    """The reference answer: distances to every eligible driver, sorted. For tests."""
    slots = table.used_slots()
    slots = slots[eligible(slots)]
    d = haversine_m(lat, lng, table.lat[slots], table.lng[slots])
    keep = d <= radius_m
    slots, d = slots[keep], d[keep]
    order = np.lexsort((table.driver_id[slots], d))[:k]
    return slots[order], d[order]
