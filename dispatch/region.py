"""Region configuration: the service area, its shard count and its settings.

A region is loaded from a TOML file (the default ships as ``dispatch/regions/
san_francisco.toml``; copy and edit it). Every process of a deployment must load the
same file, because the shard map is computed from it deterministically.
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from dispatch.errors import ConfigError
from dispatch.pricing import FareSchedule, SurgeConfig
from dispatch.trips import CancellationPolicy, TripRules

DEFAULT_REGION_FILE = "san_francisco.toml"


@dataclass(frozen=True, slots=True)
class Hotspot:
    lat: float
    lng: float
    weight: float
    spread_m: float


@dataclass(frozen=True, slots=True)
class IndexConfig:
    cell_m: float = 250.0
    halo_m: float = 3000.0
    raster_m: float = 100.0


@dataclass(frozen=True, slots=True)
class DriverConfig:
    stale_after_s: float = 30.0
    evict_after_s: float = 600.0
    max_future_skew_s: float = 5.0
    max_age_s: float = 30.0
    max_speed_mps: float = 70.0
    vehicle_classes: tuple[str, ...] = ("standard", "xl", "premium")


@dataclass(frozen=True, slots=True)
class Region:
    """A service area with its shard count and settings. Build with :func:`load_region`."""

    name: str
    display_name: str
    polygon: tuple[tuple[float, float], ...]
    shard_count: int
    shard_h3_resolution: int = 7
    margin_m: float = 3000.0
    timezone: str = "UTC"
    currency: str = "USD"
    hotspots: tuple[Hotspot, ...] = ()
    index: IndexConfig = field(default_factory=IndexConfig)
    drivers: DriverConfig = field(default_factory=DriverConfig)
    # Raw tables for the parts of the config other modules own (matching, fares...).
    sections: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """(south, west, north, east) of the polygon, without the margin."""
        lats = [p[0] for p in self.polygon]
        lngs = [p[1] for p in self.polygon]
        return min(lats), min(lngs), max(lats), max(lngs)

    @property
    def center(self) -> tuple[float, float]:
        s, w, n, e = self.bounds
        return (s + n) / 2.0, (w + e) / 2.0

    def vehicle_class_id(self, name: str) -> int:
        try:
            return self.drivers.vehicle_classes.index(name)
        except ValueError:
            raise ConfigError(
                f"unknown vehicle class {name!r}; this region has {list(self.drivers.vehicle_classes)}"
            ) from None

    def section(self, name: str) -> dict[str, Any]:
        return dict(self.sections.get(name, {}))

    def fare_schedule(self) -> FareSchedule:
        """Fare rules per vehicle class from ``[fares.<class>]``, in the region's currency."""
        return FareSchedule.from_section(self.section("fares"), self.drivers.vehicle_classes, self.currency)

    def trip_rules(self) -> TripRules:
        """The rules for trips under way from ``[trips]`` (defaults when absent)."""
        return TripRules.from_section(self.section("trips"))

    def cancellation_policy(self) -> CancellationPolicy:
        """The rider cancellation rules from ``[cancellation]``."""
        return CancellationPolicy.from_section(self.section("cancellation"))

    def surge_config(self) -> SurgeConfig:
        """The surge zones and model settings from ``[surge]``."""
        return SurgeConfig.from_section(self.section("surge"))


def _positive(value: Any, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise ConfigError(f"{what} must be a positive number, got {value!r}")
    return v


def region_from_dict(data: dict[str, Any], source: str = "<dict>") -> Region:
    """Validate a parsed region file. Raises ConfigError naming the bad key."""
    try:
        r = data["region"]
    except KeyError:
        raise ConfigError(f"{source}: missing [region] table") from None
    poly_raw = r.get("polygon")
    if not isinstance(poly_raw, list) or len(poly_raw) < 3:
        raise ConfigError(f"{source}: region.polygon needs at least 3 [lat, lng] points")
    polygon = []
    for p in poly_raw:
        if not (isinstance(p, list) and len(p) == 2):
            raise ConfigError(f"{source}: polygon point {p!r} is not [lat, lng]")
        lat, lng = float(p[0]), float(p[1])
        if not (-90 <= lat <= 90 and -180 <= lng <= 180):
            raise ConfigError(f"{source}: polygon point {p!r} is out of range")
        polygon.append((lat, lng))
    shard_count = int(r.get("shard_count", 4))
    if not 1 <= shard_count <= 64:
        # The halo membership of a driver is a 64-bit mask of shards.
        raise ConfigError(f"{source}: region.shard_count must be 1..64, got {shard_count}")
    res = int(r.get("shard_h3_resolution", 7))
    if not 3 <= res <= 10:
        raise ConfigError(f"{source}: region.shard_h3_resolution must be 3..10, got {res}")
    hotspots = tuple(
        Hotspot(float(h[0]), float(h[1]), float(h[2]), float(h[3])) for h in r.get("hotspots", [])
    )
    ix = data.get("index", {})
    index = IndexConfig(
        cell_m=_positive(ix.get("cell_m", 250), "index.cell_m"),
        halo_m=_positive(ix.get("halo_m", 3000), "index.halo_m"),
        raster_m=_positive(ix.get("raster_m", 100), "index.raster_m"),
    )
    dv = data.get("drivers", {})
    drivers = DriverConfig(
        stale_after_s=_positive(dv.get("stale_after_s", 30), "drivers.stale_after_s"),
        evict_after_s=_positive(dv.get("evict_after_s", 600), "drivers.evict_after_s"),
        max_future_skew_s=_positive(dv.get("max_future_skew_s", 5), "drivers.max_future_skew_s"),
        max_age_s=_positive(dv.get("max_age_s", 30), "drivers.max_age_s"),
        max_speed_mps=_positive(dv.get("max_speed_mps", 70), "drivers.max_speed_mps"),
        vehicle_classes=tuple(dv.get("vehicle_classes", ["standard", "xl", "premium"])),
    )
    if not drivers.vehicle_classes or len(drivers.vehicle_classes) > 100:
        raise ConfigError(f"{source}: drivers.vehicle_classes must list 1..100 names")
    sections = {k: v for k, v in data.items() if k not in ("region", "index", "drivers")}
    for name in ("fares", "cancellation", "surge"):
        if not isinstance(sections.get(name, {}), dict):
            raise ConfigError(f"{source}: [{name}] must be a table")
    region = Region(
        name=str(r.get("name", "region")),
        display_name=str(r.get("display_name", r.get("name", "region"))),
        polygon=tuple(polygon),
        shard_count=shard_count,
        shard_h3_resolution=res,
        margin_m=float(r.get("margin_m", 3000)),
        timezone=str(r.get("timezone", "UTC")),
        currency=str(r.get("currency", "USD")),
        hotspots=hotspots,
        index=index,
        drivers=drivers,
        sections=sections,
        source=source,
    )
    # Fail at load, naming the file, rather than at the first quote.
    try:
        region.fare_schedule()
        region.cancellation_policy()
        region.surge_config()
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc.message}") from None
    return region


def default_region_path() -> Path:
    return Path(str(resources.files("dispatch.regions").joinpath(DEFAULT_REGION_FILE)))


def load_region(path: str | os.PathLike[str] | None = None) -> Region:
    """Load a region file; with no path, the shipped default (San Francisco)."""
    chosen = path or default_region_path()
    p = Path(chosen)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"region file not found: {p}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    return region_from_dict(data, source=str(p))


def region_from_toml(text: str, source: str = "<toml>") -> Region:
    """Parse a region from TOML text (how shard actors receive their region)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return region_from_dict(data, source=source)


def region_file_text(path: str | os.PathLike[str] | None = None) -> str:
    """The TOML text of the region file :func:`load_region` would read."""
    chosen = path or default_region_path()
    try:
        return Path(chosen).read_text()
    except FileNotFoundError:
        raise ConfigError(f"region file not found: {chosen}") from None
