"""The surge multipliers on the bus: what a shard writes, and a reader for the edge.

Every ``SurgeConfig.interval_s`` each shard actor observes its zones
(:class:`dispatch.surge_feed.SurgeFeed`) and writes one field per zone it owns into the
region's hash :func:`dispatch.events.surge_key` (``dispatch:surge:<region>``): the field is
the zone's H3 cell, the value the msgpack of :func:`zone_record`. The edge quotes with
:meth:`SurgeReader.surge_multiplier`: point -> zone (``h3.latlng_to_cell`` at the surge
resolution) -> the zone's multiplier, 1.0 when the zone is unknown, its value stale, or
Redis unreachable (a rider is never charged a surge nobody can vouch for).

Freshness: a value older than :func:`surge_stale_after_s` (three missed writes: its
shard is down or cut off) reads 1.0, and the hash itself expires
:func:`surge_hash_ttl_s` after the last write of any shard. Ages compare the shard's
clock with the edge's, which NTP keeps within milliseconds of each other.

The shards bucket positions with a raster (:class:`dispatch.surge_feed.ZoneGrid`): within
about 70 m of a zone edge a shard may have counted a point in the neighbouring zone,
which the reader, exact, does not; the two zones touch, so the price is the one next door.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import h3
import msgpack
import redis.asyncio as aioredis

from dispatch.errors import InvalidLocation
from dispatch.events import surge_key
from dispatch.pricing import SurgeConfig, ZoneSurge
from dispatch.region import Region

log = logging.getLogger("dispatch.surge")


def surge_stale_after_s(config: SurgeConfig) -> float:
    """A zone value older than this reads 1.0: three writes missed (at least 15 s)."""
    return max(15.0, 3.0 * config.interval_s)


def surge_hash_ttl_s(config: SurgeConfig) -> float:
    """The hash expires this long after the last write by any shard."""
    return 2.0 * surge_stale_after_s(config)


def zone_record(reading: ZoneSurge, now: float, shard_id: int) -> dict[str, Any]:
    """What a shard writes for one zone: ``{multiplier, demand, supply, updated_at, shard_id}``.

    ``demand`` is the requests of the model's window, ``supply`` the mean available
    drivers over it, ``updated_at`` the shard's clock (seconds since the epoch).
    """
    return {
        "multiplier": float(reading.multiplier),
        "demand": int(reading.demand),
        "supply": round(float(reading.supply), 2),
        "updated_at": float(now),
        "shard_id": int(shard_id),
    }


@dataclass(frozen=True, slots=True)
class PublishedZone:
    """One zone as read from the hash."""

    zone: str
    multiplier: float
    demand: int
    supply: float
    updated_at: float
    shard_id: int | None = None


def _real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _decode(zone: str, raw: bytes | str) -> PublishedZone | None:
    """A field's value, or None if it is not a well-formed reading (never raises; the
    client reads bytes, and a str is not one)."""
    if isinstance(raw, str):
        return None
    try:
        d = msgpack.unpackb(raw)
        m, at = float(d["multiplier"]), float(d["updated_at"])
        if not (math.isfinite(m) and math.isfinite(at)):
            return None
        shard = d.get("shard_id")
        return PublishedZone(
            zone,
            max(m, 1.0),
            int(d.get("demand", 0)),
            float(d.get("supply", 0.0)),
            at,
            int(shard) if shard is not None else None,
        )
    except Exception:
        return None


class SurgeReader:
    """Reads a region's surge hash (redis.asyncio). One per edge process; safe to share
    between coroutines.

    Never raises for Redis trouble: reads then answer 1.0 (or no zones), the first
    failure of an outage is logged, and :attr:`available` says whether the last read
    went through.
    """

    def __init__(
        self,
        redis_url: str | None,
        region_name: str,
        config: SurgeConfig | None = None,
        clock: Callable[[], float] = time.time,
        timeout_s: float = 1.0,
    ) -> None:
        self.config = config or SurgeConfig()
        self.key = surge_key(region_name)
        self.stale_after_s = surge_stale_after_s(self.config)
        self._clock = clock
        self._r = (
            aioredis.Redis.from_url(redis_url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
            if redis_url
            else None
        )
        self.available = self._r is not None
        self._down_logged = False

    @classmethod
    def for_region(cls, region: Region, redis_url: str | None, **kw: Any) -> SurgeReader:
        return cls(redis_url, region.name, region.surge_config(), **kw)

    def zone_of(self, lat: float, lng: float) -> str:
        """The surge zone of a point. Raises :class:`InvalidLocation` for bad coordinates."""
        ok = all(_real(v) and math.isfinite(v) for v in (lat, lng))
        if not (ok and -90 <= lat <= 90 and -180 <= lng <= 180):
            raise InvalidLocation(f"invalid location ({lat}, {lng})")
        return h3.latlng_to_cell(float(lat), float(lng), self.config.resolution)

    def _fresh(self, z: PublishedZone | None) -> PublishedZone | None:
        if z is None or self._clock() - z.updated_at > self.stale_after_s:
            return None
        return z

    def _failed(self, exc: BaseException) -> None:
        self.available = False
        if not self._down_logged:
            log.warning("surge hash %s unreadable, quoting without surge: %r", self.key, exc)
            self._down_logged = True

    def _ok(self) -> None:
        if self._down_logged:
            log.warning("surge hash %s readable again", self.key)
        self.available = True
        self._down_logged = False

    async def zone(self, cell: str) -> PublishedZone | None:
        """The fresh reading of one zone, or None (unknown, stale, malformed, Redis down)."""
        if self._r is None:
            return None
        try:
            raw = await self._r.hget(self.key, cell)
        except Exception as exc:
            self._failed(exc)
            return None
        self._ok()
        return self._fresh(_decode(cell, raw)) if raw is not None else None

    async def surge_multiplier(self, lat: float, lng: float) -> float:
        """The multiplier to quote at a point: its zone's, 1.0 when there is none fresh.

        Raises :class:`InvalidLocation` for bad coordinates, nothing else.
        """
        z = await self.zone(self.zone_of(lat, lng))
        return 1.0 if z is None else z.multiplier

    async def zones(self) -> dict[str, PublishedZone]:
        """Every zone with a fresh reading (for the console's map); {} when Redis is down."""
        if self._r is None:
            return {}
        try:
            raw = await self._r.hgetall(self.key)
        except Exception as exc:
            self._failed(exc)
            return {}
        self._ok()
        out = {}
        for k, v in raw.items():
            cell = k.decode() if isinstance(k, bytes) else str(k)
            z = self._fresh(_decode(cell, v))
            if z is not None:
                out[cell] = z
        return out

    async def close(self) -> None:
        if self._r is not None:
            await self._r.aclose()
