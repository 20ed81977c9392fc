"""The surge feed of one shard: demand and supply per surge zone, observed and fed to the model.

Sans-I/O. Every ``SurgeConfig.interval_s`` the shard actor calls :meth:`SurgeFeed.observe`
with ``now``; :meth:`SurgeFeed.readings` then gives, for every zone the shard owns, the
multiplier to quote and the demand and supply it came from, which the actor publishes
for the edges (``actors/events.py``).

Zones
-----
A surge zone is an H3 cell at ``SurgeConfig.resolution`` (San Francisco: 7, about 5 km2,
much coarser than the spatial index). H3 costs about a microsecond a call in Python, a
cost paid per driver per observation; so, like the shard raster, :class:`ZoneGrid`
computes once the zone of the centre of every raster cell of the
:class:`~dispatch.shardmap.ShardMap`, and a whole driver table becomes zone ids with two
multiplications and a gather.

The raster approximation: a position gets the zone of its raster cell's centre. That is
``h3.latlng_to_cell`` exactly wherever a raster cell lies inside one zone; in the raster
cells a zone boundary crosses, the zone given is the zone of a point at most half a
raster cell's diagonal away (``raster_m / sqrt(2)``: 71 m with 100 m cells, against zone
edges of 1.2 km at res 7), always one of the zones of the cell's corners. The shard
raster makes the same approximation, so with a surge resolution equal to the shard
resolution (the shipped region) every zone inside the service polygon lies in exactly
one shard.

Ownership
---------
Each zone is published by one shard, its owner: the shard holding most of the zone's
raster cells (ties go to the lower shard id). A zone several shards share (in the
margin around the polygon, or any zone when the surge resolution is coarser than the
shard resolution) is counted by its owner with the supply of its own drivers *and of its
halo* (the neighbours' drivers within ``index.halo_m`` of the border, which covers the
zone's other part as long as a zone is narrower than the halo: 2.6 km across at res 7
against a 3 km halo), but with the demand of its own ride book only: requests whose
pickup lies in another shard's part are not counted. Hence: keep the surge resolution no
coarser than the shard resolution.

Demand and supply
-----------------
Demand is a flow: the requests of the shard's ride book first seen since the previous
observation, by pickup zone. Each request counts once, in the observation that first
sees it; one that arrives and leaves the book (accepted, cancelled) between two
observations is not seen, which under-counts only where drivers are plentiful (and a
shard that restarts and reloads its open requests counts them again, once). Supply is a
stock: the available drivers (idle, confirmed, heard from within ``stale_after_s``) at
the observation, of every vehicle class. The model turns "requests over the window" and
"mean idle drivers over the window" into a multiplier (:class:`~dispatch.pricing.SurgeConfig`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import h3
import numpy as np
from numpy.typing import NDArray

from dispatch.errors import ConfigError
from dispatch.geo import FloatOrFloats
from dispatch.pricing import SurgeConfig, SurgeModel, ZoneSurge
from dispatch.rides import RideBook
from dispatch.shard import Shard
from dispatch.shardmap import OUTSIDE, ShardMap

NO_ZONE = -1


class ZoneGrid:
    """Position -> surge zone over a shard map's raster, vectorized. Immutable once built.

    ``zones[i]`` is the H3 cell of zone id ``i`` (sorted, so every process that builds
    the grid from the same region file gets the same ids); ``owner[i]`` is the shard that
    publishes zone ``i``, or -1 for a zone with no raster cell in service. Building costs
    one H3 call per raster cell (about 35k, 35 ms, for San Francisco at 100 m).
    """

    def __init__(self, shard_map: ShardMap, resolution: int) -> None:
        if not (isinstance(resolution, int) and not isinstance(resolution, bool) and 0 <= resolution <= 15):
            raise ConfigError(f"surge zone resolution must be an H3 resolution 0..15, got {resolution!r}")
        m = shard_map
        self.map = m
        self.resolution = resolution
        glat = m.south + (np.arange(m.ny) + 0.5) * m.dlat
        glng = m.west + (np.arange(m.nx) + 0.5) * m.dlng
        lat = np.repeat(glat, m.nx).tolist()
        lng = np.tile(glng, m.ny).tolist()
        cells = np.array([h3.latlng_to_cell(a, b, resolution) for a, b in zip(lat, lng, strict=True)])
        zones, inverse = np.unique(cells, return_inverse=True)
        self.zones: tuple[str, ...] = tuple(str(z) for z in zones)
        self.zone_id: dict[str, int] = {z: i for i, z in enumerate(self.zones)}
        self.raster = inverse.reshape(m.ny, m.nx).astype(np.int32)
        self._flat = self.raster.ravel()
        # Owner: the shard with most of the zone's in-service raster cells (argmax takes
        # the lowest shard id on a tie).
        shard_flat = m.raster.ravel()
        served = shard_flat != OUTSIDE
        counts = np.zeros((len(self.zones), m.shard_count), dtype=np.int64)
        np.add.at(counts, (self._flat[served], shard_flat[served].astype(np.int64)), 1)
        self.owner = np.where(counts.max(axis=1) > 0, counts.argmax(axis=1), -1).astype(np.int16)

    def __len__(self) -> int:
        return len(self.zones)

    def zone_ids(self, lat: FloatOrFloats, lng: FloatOrFloats) -> NDArray[np.int32]:
        """Zone id (int32) of each position; ``NO_ZONE`` (-1) outside the raster or for NaN.

        Vectorized over arrays (scalars broadcast); never raises for bad numbers. See the
        module docstring for how close to ``h3.latlng_to_cell`` it is.
        """
        flat, inside = self.map._grid_index(lat, lng)
        return np.where(inside, self._flat[flat], NO_ZONE).astype(np.int32)

    def zone_of(self, lat: float, lng: float) -> str | None:
        """The zone cell of one position, or None outside the raster."""
        i = int(self.zone_ids(np.array([lat]), np.array([lng]))[0])
        return None if i == NO_ZONE else self.zones[i]

    def owned_by(self, shard_id: int) -> NDArray[np.int32]:
        """Ids of the zones ``shard_id`` publishes (int32, ascending)."""
        return np.flatnonzero(self.owner == shard_id).astype(np.int32)

    def corners(self, lat: FloatOrFloats, lng: FloatOrFloats) -> list[set[str]]:
        """The zones (by H3) of the four corners of each position's raster cell.

        For tests and diagnostics: the zone :meth:`zone_ids` gives is always among them,
        and when they are one zone it is the exact zone of every point of the cell.
        """
        m = self.map
        flat, inside = m._grid_index(lat, lng)
        out: list[set[str]] = []
        for f, ok in zip(flat.tolist(), inside.tolist(), strict=True):
            if not ok:
                out.append(set())
                continue
            i, j = divmod(f, m.nx)
            s, w = m.south + i * m.dlat, m.west + j * m.dlng
            out.append(
                {
                    h3.latlng_to_cell(s + di * m.dlat, w + dj * m.dlng, self.resolution)
                    for di in (0, 1)
                    for dj in (0, 1)
                }
            )
        return out


@dataclass(frozen=True, slots=True)
class SurgeObservation:
    """What one observation counted, per zone the shard owns (zeros included)."""

    at: float
    demand: dict[str, int]  # requests first seen since the previous observation
    supply: dict[str, int]  # available drivers at ``at``


class SurgeFeed:
    """Observes one shard's open requests and available drivers per surge zone.

    Holds a :class:`~dispatch.pricing.SurgeModel` over the zones the shard owns
    (:meth:`ZoneGrid.owned_by`). Single-threaded, like the shard. Reads ``shard`` and
    ``book``, never changes them.
    """

    def __init__(
        self,
        shard: Shard,
        book: RideBook,
        config: SurgeConfig | None = None,
        grid: ZoneGrid | None = None,
    ) -> None:
        """``grid`` may be shared by the feeds of one process (it is immutable); it must be
        built from ``shard.map`` at ``config.resolution``, else :class:`ConfigError`."""
        self.shard = shard
        self.book = book
        self.config = config or SurgeConfig()
        self.grid = grid or ZoneGrid(shard.map, self.config.resolution)
        if self.grid.resolution != self.config.resolution or self.grid.map is not shard.map:
            raise ConfigError("the zone grid must be built from the shard's map at the surge resolution")
        self.model = SurgeModel(self.config)
        self._owned_ids = self.grid.owned_by(shard.shard_id)
        self._owned = np.zeros(len(self.grid), dtype=bool)
        self._owned[self._owned_ids] = True
        self.owned_zones: tuple[str, ...] = tuple(self.grid.zones[i] for i in self._owned_ids.tolist())
        self._seen: set[str] = set()  # ride ids the previous observation saw in the book
        self.last_observed_at = -math.inf

    def due(self, now: float) -> bool:
        """Whether ``config.interval_s`` has passed since the last observation."""
        return now - self.last_observed_at >= self.config.interval_s

    def _count(self, lat: NDArray[np.float64], lng: NDArray[np.float64]) -> NDArray[np.intp]:
        """Counts per zone id (all zones) of the positions that fall in owned zones."""
        ids = self.grid.zone_ids(lat, lng)
        ids = ids[ids != NO_ZONE]
        ids = ids[self._owned[ids]]
        return np.bincount(ids, minlength=len(self.grid))

    def observe(self, now: float) -> SurgeObservation:
        """Count demand and supply per owned zone at ``now`` and feed the model.

        A ``now`` before the previous observation (a wall clock stepped back) is taken as
        the previous observation's time, so this never raises for time.
        """
        now = max(float(now), self.last_observed_at)
        requests = self.book.requests()
        new = [r for r in requests if r.ride_id not in self._seen]
        self._seen = {r.ride_id for r in requests}
        demand = self._count(
            np.fromiter((r.pickup_lat for r in new), dtype=np.float64, count=len(new)),
            np.fromiter((r.pickup_lng for r in new), dtype=np.float64, count=len(new)),
        )
        stale_s = self.shard.cfg.stale_after_s
        supply = np.zeros(len(self.grid), dtype=np.int64)
        # Own drivers and halo drivers: a shared zone's other part is in the halo.
        for table in (self.shard.own, self.shard.halo):
            slots = np.flatnonzero(table.available_mask(now, stale_s))
            supply += self._count(table.lat[slots], table.lng[slots])
        ids = self._owned_ids.tolist()
        d = {self.grid.zones[i]: int(demand[i]) for i in ids}
        s = {self.grid.zones[i]: int(supply[i]) for i in ids}
        self.model.observe(d, s, now)
        self.last_observed_at = now
        return SurgeObservation(now, d, s)

    def readings(self, now: float) -> dict[str, ZoneSurge]:
        """Every owned zone with its multiplier, window demand and mean supply at ``now``."""
        return {z: self.model.reading(z, now) for z in self.owned_zones}

    def multipliers(self, now: float) -> dict[str, float]:
        """Every owned zone's multiplier at ``now`` (1.0 for a quiet or unobserved zone)."""
        return {z: self.model.multiplier(z, now) for z in self.owned_zones}
