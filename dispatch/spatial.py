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
        self._updates = 0  # calls to update, so a cached view of the moved list knows it is stale
        # The moved list as queries read it (see :meth:`_moved_view`), with its key.
        self._view: tuple[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None
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
        self._updates += 1  # a listed slot may be back in its sorted cell: the view is stale
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
        """Fold the moved list into the sorted order.

        The first build sorts every slot. Later ones keep the last order's entries still
        in the cell they were sorted under (already in order), sort only the moved slots
        and insert them: a few linear passes instead of a sort of the whole table. A full
        ``argsort`` of 25,000 cells was ~0.5 ms, and under bench_mission an index rebuilt
        every one or two ticks: a sixth of a tick's CPU."""
        t = self.table
        hw = t.high_water
        if self.rebuilds == 0 or not len(self._order):
            slots = np.flatnonzero(t.used[:hw] & (t.cell[:hw] >= 0))
            cells = t.cell[slots]
            order = np.argsort(cells, kind="stable")
            self._order = slots[order]
            self._cells_sorted = cells[order]
            t.built_cell[:hw] = -1
            t.built_cell[self._order] = self._cells_sorted
        else:
            old = self._order
            # A removed slot has cell -1, a reused one built_cell -1: neither stays.
            still = t.cell[old] == t.built_cell[old]
            t.built_cell[old[~still]] = -1
            keep, keep_cells = old[still], self._cells_sorted[still]
            listed = np.concatenate(self._moved) if self._moved else np.empty(0, dtype=np.int64)
            cells = t.cell[listed]
            # Every used slot with a cell is in ``keep`` or listed (``update`` lists each
            # slot whose cell is not the one it was sorted under), each slot once.
            new = listed[t.used[listed] & (cells >= 0) & (cells != t.built_cell[listed])]
            if len(new):
                new_cells = t.cell[new]
                by_cell = np.argsort(new_cells, kind="stable")
                new, new_cells = new[by_cell], new_cells[by_cell]
                at = np.searchsorted(keep_cells, new_cells, side="right")
                self._order = np.insert(keep, at, new)
                self._cells_sorted = np.insert(keep_cells, at, new_cells)
                t.built_cell[new] = new_cells
            else:
                self._order, self._cells_sorted = keep, keep_cells
        self._moved = []
        self._moved_n = 0
        self._listed[:] = False
        self._view = None
        self.rebuilds += 1

    def _maybe_rebuild(self) -> None:
        if self._moved_n > max(256, len(self.table) // 20) or (self.rebuilds == 0 and self._moved_n):
            self._rebuild()

    def _moved_view(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The moved slots a query scans (less those back in the cell they were sorted
        under, removed, or off the grid) with their cells' columns and rows. Worked out
        once between changes to the table or the list, so the queries of one matching
        tick share it instead of each compacting the list again."""
        t = self.table
        key = (t.version, self._updates)
        if self._view is not None and self._view[0] == key:
            return self._view[1]
        if self._moved:
            listed = self._moved[0] if len(self._moved) == 1 else np.concatenate(self._moved)
            keep = (t.cell[listed] != t.built_cell[listed]) & t.used[listed] & (t.cell[listed] >= 0)
            self._listed[listed[~keep]] = False
            moved = listed[keep]
            self._moved = [moved]
            self._moved_n = len(moved)
        else:
            moved = np.empty(0, dtype=np.int64)
        cells = t.cell[moved]
        view = (moved, cells % self.width, cells // self.width)
        self._view = (key, view)
        return view

    def _window(
        self, cx0: int, cy0: int, ring: int, moved: np.ndarray, mx: np.ndarray, my: np.ndarray
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
        moved, mx, my = self._moved_view()
        q = self.cell_of(x, y)
        cx0, cy0 = q % self.width, q // self.width
        max_ring = int(np.ceil(radius_m * _PROJECTION_SLACK / self.cell_m)) + 1
        ring = 1
        while True:
            cand = self._window(cx0, cy0, ring, moved, mx, my)
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
