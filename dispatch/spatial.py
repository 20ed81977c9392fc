"""The spatial index of a shard: k nearest drivers within a radius, vectorized.

Drivers are bucketed by a square grid cell (``cell_m``) of the region's local projection.
The index is a sort of the table's slots by cell (CSR layout), rebuilt lazily when the
table's version moved since the last build: one argsort of the used slots, a few ms for
25k drivers, paid at most once per query batch rather than on every ingest.

A query expands a square window ring by ring until it has k candidates within the radius
the window is guaranteed to cover, so a k=10 query in a dense city touches a handful of
cells, not every driver within 3 km. Each window row is one contiguous slice of the
sorted order. Final distances are great-circle (haversine), so results equal a brute
force over the whole table.
"""

from __future__ import annotations

import numpy as np

from dispatch.drivers import DriverTable
from dispatch.geo import haversine_m

# The local projection differs from the great circle by far less than this over a region;
# windows are widened by it so that no driver within the radius is missed.
_PROJECTION_SLACK = 1.01


class GridIndex:
    def __init__(self, table: DriverTable, cell_m: float, extent_m: float = 200_000.0) -> None:
        self.table = table
        self.cell_m = float(cell_m)
        # Cells are numbered on a fixed grid centred on the region centre.
        self.half = int(np.ceil(extent_m / self.cell_m))
        self.width = 2 * self.half + 1
        self._built_version = -1
        self._order = np.empty(0, dtype=np.int64)
        self._cells_sorted = np.empty(0, dtype=np.int64)
        self.rebuilds = 0

    def _cell_xy(self, x, y):
        cx = np.clip(np.floor(np.asarray(x) / self.cell_m).astype(np.int64) + self.half, 0, self.width - 1)
        cy = np.clip(np.floor(np.asarray(y) / self.cell_m).astype(np.int64) + self.half, 0, self.width - 1)
        return cx, cy

    def _ensure(self) -> None:
        t = self.table
        if self._built_version == t.version:
            return
        slots = t.used_slots()
        ok = np.isfinite(t.x[slots]) & np.isfinite(t.y[slots])
        slots = slots[ok]
        cx, cy = self._cell_xy(t.x[slots], t.y[slots])
        cells = cy * self.width + cx
        order = np.argsort(cells, kind="stable")
        self._order = slots[order]
        self._cells_sorted = cells[order]
        self._built_version = t.version
        self.rebuilds += 1

    def invalidate(self) -> None:
        self._built_version = -1

    def _window(self, cx0: int, cy0: int, ring: int) -> np.ndarray:
        """Slots in the square of cells [cx0-ring, cx0+ring] x [cy0-ring, cy0+ring]."""
        x_lo = max(cx0 - ring, 0)
        x_hi = min(cx0 + ring, self.width - 1)
        rows = np.arange(max(cy0 - ring, 0), min(cy0 + ring, self.width - 1) + 1)
        lo = np.searchsorted(self._cells_sorted, rows * self.width + x_lo, side="left")
        hi = np.searchsorted(self._cells_sorted, rows * self.width + x_hi, side="right")
        parts = [self._order[a:b] for a, b in zip(lo.tolist(), hi.tolist(), strict=True) if b > a]
        if not parts:
            return np.empty(0, dtype=np.int64)
        return np.concatenate(parts)

    def nearest(
        self,
        lat: float,
        lng: float,
        x: float,
        y: float,
        radius_m: float,
        k: int,
        eligible: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest eligible slots within radius_m, nearest first.

        ``eligible`` is a boolean mask over slots [0, table.high_water). Returns
        (slots int64, distances in metres float64), at most k of each.
        """
        if k <= 0 or radius_m <= 0:
            return np.empty(0, dtype=np.int64), np.empty(0)
        self._ensure()
        t = self.table
        cx0, cy0 = self._cell_xy(x, y)
        cx0, cy0 = int(cx0), int(cy0)
        max_ring = int(np.ceil(radius_m * _PROJECTION_SLACK / self.cell_m)) + 1
        ring = 1
        while True:
            cand = self._window(cx0, cy0, ring)
            if len(cand):
                cand = cand[cand < len(eligible)]
                cand = cand[eligible[cand]]
            d = haversine_m(lat, lng, t.lat[cand], t.lng[cand]) if len(cand) else np.empty(0)
            within = d <= radius_m
            # Every point within `covered` metres of the query lies inside this window.
            covered = ((ring) * self.cell_m) / _PROJECTION_SLACK
            sure = d <= covered
            if ring >= max_ring or int(np.count_nonzero(sure & within)) >= k:
                break
            ring = min(max(ring * 2, ring + 1), max_ring)
        cand, d = cand[within], d[within]
        if len(cand) > k:
            part = np.argpartition(d, k - 1)[:k]
            cand, d = cand[part], d[part]
        order = np.lexsort((t.driver_id[cand], d))
        return cand[order], d[order]


def brute_force_nearest(
    table: DriverTable, lat: float, lng: float, radius_m: float, k: int, eligible: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The reference answer: distances to every eligible driver, sorted. For tests."""
    slots = np.flatnonzero(eligible)
    d = haversine_m(lat, lng, table.lat[slots], table.lng[slots])
    keep = d <= radius_m
    slots, d = slots[keep], d[keep]
    order = np.lexsort((table.driver_id[slots], d))[:k]
    return slots[order], d[order]
