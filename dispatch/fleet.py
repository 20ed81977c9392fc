"""A moving fleet for benchmarks and the simulator, vectorized over every driver.

Drivers start where demand is (the region's hotspots) or anywhere in the service area,
drive along a street grid (headings snap to the grid's two axes, as in most of San
Francisco), turn at random intersections, keep to the service polygon and change speed
like city traffic. Each driver reports every ``report_interval_s`` with its own phase.
"""

from __future__ import annotations

import numpy as np

from dispatch.drivers import LOCATION_DTYPE
from dispatch.geo import M_PER_DEG_LAT, LocalProjection
from dispatch.region import Region
from dispatch.shardmap import OUTSIDE, ShardMap

GRID_ANGLE_DEG = 0.0  # the street grid's axis; downtown SF runs at ~45 deg, the rest at 0


class Fleet:
    def __init__(
        self,
        region: Region,
        shard_map: ShardMap,
        n: int,
        report_interval_s: float = 0.5,
        seed: int = 0,
        first_id: int = 1,
    ) -> None:
        self.region = region
        self.map = shard_map
        self.n = n
        self.rng = np.random.default_rng(seed)
        self.proj = LocalProjection(*region.center)
        self.ids = np.arange(first_id, first_id + n, dtype=np.int64)
        self.lat, self.lng = self._initial_positions(n)
        self.heading = GRID_ANGLE_DEG + 90.0 * self.rng.integers(0, 4, n)
        self.speed = self.rng.uniform(3.0, 14.0, n)
        self.interval = report_interval_s
        self.phase = self.rng.uniform(0, report_interval_s, n)
        self._t = 0.0
        self._moved_at = np.zeros(n)

    def _initial_positions(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        lat = np.empty(n)
        lng = np.empty(n)
        hs = self.region.hotspots
        n_hot = n // 2 if hs else 0
        if n_hot:
            w = np.array([h.weight for h in hs])
            pick = self.rng.choice(len(hs), size=n_hot, p=w / w.sum())
            spread = np.array([h.spread_m for h in hs])[pick]
            dx = self.rng.normal(0, 1, n_hot) * spread
            dy = self.rng.normal(0, 1, n_hot) * spread
            lat[:n_hot] = np.array([h.lat for h in hs])[pick] + dy / M_PER_DEG_LAT
            lng[:n_hot] = np.array([h.lng for h in hs])[pick] + dx / self.proj.m_per_deg_lng
        s, w_, nn, e = self.region.bounds
        lat[n_hot:] = self.rng.uniform(s, nn, n - n_hot)
        lng[n_hot:] = self.rng.uniform(w_, e, n - n_hot)
        self._fix_outside(lat, lng)
        return lat, lng

    def _fix_outside(self, lat: np.ndarray, lng: np.ndarray) -> None:
        """Put drivers outside the polygon's shard cells back near the centre."""
        bad = self._outside(lat, lng)
        while bad.any():
            s, w, n, e = self.region.bounds
            lat[bad] = self.rng.uniform(s, n, bad.sum())
            lng[bad] = self.rng.uniform(w, e, bad.sum())
            bad = self._outside(lat, lng)

    def _outside(self, lat: np.ndarray, lng: np.ndarray) -> np.ndarray:
        s, w, n, e = self.region.bounds
        outside: np.ndarray = (
            (self.map.shard_of(lat, lng) == OUTSIDE) | (lat < s) | (lat > n) | (lng < w) | (lng > e)
        )
        return outside

    def advance(self, dt_s: float) -> None:
        """Move every driver by dt_s seconds of driving."""
        self._t += dt_s
        self.move(np.arange(self.n), self._t)

    def move(self, idx: np.ndarray, t: float) -> None:
        """Bring drivers ``idx`` to fleet time ``t`` (each from its own last move).

        Only the drivers about to report move, so the generator's cost follows the update
        rate rather than the fleet size.
        """
        if not len(idx):
            return
        rng = self.rng
        n = len(idx)
        dt_s = np.maximum(t - self._moved_at[idx], 0.0)
        self._moved_at[idx] = t
        speed = np.clip(self.speed[idx] + rng.normal(0, 0.5, n) * np.sqrt(dt_s), 0.0, 20.0)
        heading = self.heading[idx]
        # Turn at intersections (~every 150 m) with probability 0.3.
        turn = rng.random(n) < np.minimum(speed * dt_s / 150.0 * 0.3, 1.0)
        heading[turn] = (heading[turn] + rng.choice([-90.0, 90.0], int(turn.sum()))) % 360.0
        d = speed * dt_s
        rad = np.radians(heading)
        lat = self.lat[idx] + d * np.cos(rad) / M_PER_DEG_LAT
        lng = self.lng[idx] + d * np.sin(rad) / self.proj.m_per_deg_lng
        out = self._outside(lat, lng)
        # Drivers reaching the edge of the service area turn around.
        heading[out] = (heading[out] + 180.0) % 360.0
        lat[out] = self.lat[idx][out]
        lng[out] = self.lng[idx][out]
        self.lat[idx] = lat
        self.lng[idx] = lng
        self.heading[idx] = heading
        self.speed[idx] = speed

    def due(self, t0: float, t1: float) -> np.ndarray:
        """Indices of drivers whose report falls in [t0, t1) of the fleet's clock."""
        k0 = np.floor((t0 - self.phase) / self.interval)
        k1 = np.floor((t1 - self.phase) / self.interval)
        return np.flatnonzero(k1 > k0)

    def rows(self, idx: np.ndarray, ts: float) -> np.ndarray:
        rows = np.zeros(len(idx), dtype=LOCATION_DTYPE)
        rows["driver_id"] = self.ids[idx]
        rows["lat"] = self.lat[idx]
        rows["lng"] = self.lng[idx]
        rows["ts"] = ts
        rows["heading"] = self.heading[idx]
        rows["speed"] = self.speed[idx]
        rows["vclass"] = -1
        return rows

    def all_rows(self, ts: float) -> np.ndarray:
        return self.rows(np.arange(self.n), ts)
