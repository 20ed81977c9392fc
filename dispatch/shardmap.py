"""The shard map: which shard owns a position, and which shards see it in their halo.

Shards are contiguous groups of H3 cells (``region.shard_h3_resolution``) covering the
service polygon, split by recursive coordinate bisection so that every shard is one
compact piece with about the same number of cells.

Calling H3 per point costs ~0.7 µs in Python, 140 ms of CPU a second at 200k updates/s.
So the map is rasterised once at startup: a grid of ``raster_m`` cells over the region
(plus its margin), each holding the shard of the H3 cell under its centre. The raster is
the authority: every process builds the same one from the same region file, and
``shard_of`` is two multiplications and a gather over a whole batch. A second raster
holds, per grid cell, the bitmask of *other* shards whose territory lies within
``index.halo_m``: the shards that must see a driver standing there.
"""

from __future__ import annotations

from dataclasses import dataclass

import h3
import numpy as np
from numpy.typing import NDArray
from scipy import ndimage
from scipy.spatial import cKDTree

from dispatch.geo import M_PER_DEG_LAT, FloatOrFloats, LocalProjection
from dispatch.region import Region

OUTSIDE = -1


@dataclass(frozen=True, slots=True)
class ShardInfo:
    shard_id: int
    cells: tuple[str, ...]
    center: tuple[float, float]
    area_km2: float
    neighbours: tuple[int, ...]


def _bisect(
    ids: NDArray[np.int64], pts: NDArray[np.float64], parts: int, first: int, out: NDArray[np.int16]
) -> None:
    """Recursive coordinate bisection: split along the longer axis, proportionally."""
    if parts == 1:
        out[ids] = first
        return
    left_parts = parts // 2
    sub = pts[ids]
    axis = int(np.argmax(sub.max(axis=0) - sub.min(axis=0)))
    # Sort by the axis, then by the other one, so equal coordinates split deterministically.
    order = np.lexsort((sub[:, 1 - axis], sub[:, axis]))
    cut = int(round(len(ids) * left_parts / parts))
    _bisect(ids[order[:cut]], pts, left_parts, first, out)
    _bisect(ids[order[cut:]], pts, parts - left_parts, first + left_parts, out)


class ShardMap:
    """Position → shard id, vectorized, and position → halo shards, for one region."""

    def __init__(self, region: Region) -> None:
        self.region = region
        self.shard_count = region.shard_count
        self.projection = LocalProjection(*region.center)
        res = region.shard_h3_resolution
        poly = h3.LatLngPoly(list(region.polygon))
        cells = sorted(h3.h3shape_to_cells(poly, res))
        if len(cells) < region.shard_count:
            # A tiny polygon at a coarse resolution: take the cells touching its outline too.
            cells = sorted(set(cells) | {h3.latlng_to_cell(lat, lng, res) for lat, lng in region.polygon})
        if len(cells) < region.shard_count:
            raise ValueError(
                f"region {region.name} has {len(cells)} H3 cells at res {res}, "
                f"fewer than its {region.shard_count} shards"
            )
        centers = np.array([h3.cell_to_latlng(c) for c in cells])
        cx, cy = self.projection.to_xy(centers[:, 0], centers[:, 1])
        pts = np.column_stack([cx, cy])
        cell_shard = np.empty(len(cells), dtype=np.int16)
        _bisect(np.arange(len(cells)), pts, region.shard_count, 0, cell_shard)
        self.cells = cells
        self.cell_shard = {c: int(s) for c, s in zip(cells, cell_shard, strict=True)}

        # The raster over the polygon's bounds plus the margin.
        s, w, n, e = region.bounds
        m = region.margin_m
        m_per_deg_lng = self.projection.m_per_deg_lng
        self.south = s - m / M_PER_DEG_LAT
        self.west = w - m / m_per_deg_lng
        north = n + m / M_PER_DEG_LAT
        east = e + m / m_per_deg_lng
        self.dlat = region.index.raster_m / M_PER_DEG_LAT
        self.dlng = region.index.raster_m / m_per_deg_lng
        self.ny = int(np.ceil((north - self.south) / self.dlat))
        self.nx = int(np.ceil((east - self.west) / self.dlng))
        glat = self.south + (np.arange(self.ny) + 0.5) * self.dlat
        glng = self.west + (np.arange(self.nx) + 0.5) * self.dlng
        raster = np.full((self.ny, self.nx), OUTSIDE, dtype=np.int16)
        missing: list[tuple[int, int]] = []
        for i, la in enumerate(glat):
            for j, lo in enumerate(glng):
                shard = self.cell_shard.get(h3.latlng_to_cell(float(la), float(lo), res))
                if shard is None:
                    missing.append((i, j))
                else:
                    raster[i, j] = shard
        if missing:
            # Margin cells belong to the nearest covered cell's shard.
            tree = cKDTree(pts)
            mi = np.array(missing)
            mx, my = self.projection.to_xy(glat[mi[:, 0]], glng[mi[:, 1]])
            _, nearest = tree.query(np.column_stack([mx, my]))
            raster[mi[:, 0], mi[:, 1]] = cell_shard[nearest]
        # Only the polygon plus the margin is in service.
        gx, gy = self.projection.to_xy(
            np.repeat(glat, self.nx).reshape(self.ny, self.nx),
            np.tile(glng, self.ny).reshape(self.ny, self.nx),
        )
        # query gives arrays for an array of points (scipy's stubs also allow the scalar case).
        dist, _ = cKDTree(pts).query(np.column_stack([gx.ravel(), gy.ravel()]))
        d = np.asarray(dist)
        cell_radius_m = float(np.sqrt(h3.average_hexagon_area(res, unit="m^2")))
        too_far = (d > m + cell_radius_m).reshape(self.ny, self.nx)
        raster[too_far] = OUTSIDE
        self.raster = raster
        self._flat = raster.ravel()
        self._flat_list = self._flat.tolist()

        # Halo raster: bit k set where shard k's territory is within halo_m.
        halo = np.zeros((self.ny, self.nx), dtype=np.uint64)
        sampling = (region.index.raster_m, region.index.raster_m)
        for k in range(self.shard_count):
            dist = ndimage.distance_transform_edt(raster != k, sampling=sampling)
            near = (dist <= region.index.halo_m) & (raster != k) & (raster != OUTSIDE)
            halo[near] |= np.uint64(1 << k)
        self.halo_raster = halo
        self._halo_flat = halo.ravel()

        # Shards touching each other (or within the halo) are neighbours.
        self.neighbours: dict[int, tuple[int, ...]] = {}
        for k in range(self.shard_count):
            mask = np.bitwise_or.reduce(halo[raster == k]) if (raster == k).any() else 0
            self.neighbours[k] = tuple(j for j in range(self.shard_count) if int(mask) >> j & 1)

    # -- lookups ---------------------------------------------------------------------------

    def _grid_index(
        self, lat: FloatOrFloats, lng: FloatOrFloats
    ) -> tuple[NDArray[np.int64], NDArray[np.bool_]]:
        lat_a = np.asarray(lat, dtype=np.float64)
        lng_a = np.asarray(lng, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            i = np.floor((lat_a - self.south) / self.dlat)
            j = np.floor((lng_a - self.west) / self.dlng)
            inside = (i >= 0) & (i < self.ny) & (j >= 0) & (j < self.nx)
        flat = np.where(inside, i * self.nx + j, 0).astype(np.int64)
        return flat, inside

    def shard_of(self, lat: FloatOrFloats, lng: FloatOrFloats) -> NDArray[np.int16]:
        """Shard id of each position (int16), ``OUTSIDE`` (-1) where not in service.

        NaN and out-of-range inputs map to ``OUTSIDE``; never raises for bad numbers.
        """
        flat, inside = self._grid_index(lat, lng)
        return np.where(inside, self._flat[flat], OUTSIDE).astype(np.int16)

    def halo_mask_of(self, lat: FloatOrFloats, lng: FloatOrFloats) -> NDArray[np.uint64]:
        """Bitmask (uint64) of the other shards that must see a driver at each position."""
        flat, inside = self._grid_index(lat, lng)
        return np.where(inside, self._halo_flat[flat], np.uint64(0)).astype(np.uint64)

    def shard_for_point(self, lat: float, lng: float) -> int:
        """The shard of one point, ``OUTSIDE`` if not in service (scalar: ~0.5 µs, for a
        per-frame check at the edge; use :meth:`shard_of` for batches)."""
        y = (lat - self.south) / self.dlat
        x = (lng - self.west) / self.dlng
        if not (0 <= y < self.ny and 0 <= x < self.nx):  # also False for NaN
            return OUTSIDE
        i, j = int(y), int(x)
        return int(self._flat_list[i * self.nx + j])

    def info(self, shard_id: int) -> ShardInfo:
        cells = tuple(c for c in self.cells if self.cell_shard[c] == shard_id)
        ll = np.array([h3.cell_to_latlng(c) for c in cells])
        area = sum(h3.cell_area(c, unit="km^2") for c in cells)
        return ShardInfo(
            shard_id=shard_id,
            cells=cells,
            center=(float(ll[:, 0].mean()), float(ll[:, 1].mean())),
            area_km2=float(area),
            neighbours=self.neighbours[shard_id],
        )
