"""Geometry on the hot path: distances, local projections and ETAs, vectorized.

Every function accepts scalars or numpy arrays and broadcasts. Distances are great-circle
(haversine) in metres; the spatial index works in a local equirectangular projection in
metres, which over a city (tens of km) is within 0.1% of the great-circle distance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias, overload

import numpy as np
from numpy.typing import NDArray

EARTH_RADIUS_M = 6_371_008.8
M_PER_DEG_LAT = np.pi * EARTH_RADIUS_M / 180.0

Floats: TypeAlias = NDArray[np.float64]
# An input of the functions below: one number, or an array of them (broadcast together).
# Given only numbers they return numpy float64 scalars (a subclass of float); given an array
# anywhere, arrays. (mypy flags such overloads as overlapping, since a value typed
# FloatOrFloats may hold a plain number at run time; numpy's own stubs accept the same, and
# so do we, with a targeted ignore on each first overload.)
FloatOrFloats: TypeAlias = float | Floats


@overload
def haversine_m(lat1: float, lng1: float, lat2: float, lng2: float) -> np.float64: ...  # type: ignore[overload-overlap]
@overload
def haversine_m(
    lat1: FloatOrFloats, lng1: FloatOrFloats, lat2: FloatOrFloats, lng2: FloatOrFloats
) -> Floats: ...
def haversine_m(
    lat1: FloatOrFloats, lng1: FloatOrFloats, lat2: FloatOrFloats, lng2: FloatOrFloats
) -> np.float64 | Floats:
    """Great-circle distance in metres between points given in degrees."""
    p1 = np.radians(lat1)
    p2 = np.radians(lat2)
    dphi = p2 - p1
    dlmb = np.radians(np.asarray(lng2) - np.asarray(lng1))
    a = np.sin(dphi / 2.0) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dlmb / 2.0) ** 2
    distance_m: np.float64 | Floats = 2.0 * EARTH_RADIUS_M * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))
    return distance_m


@overload
def bearing_deg(lat1: float, lng1: float, lat2: float, lng2: float) -> np.float64: ...  # type: ignore[overload-overlap]
@overload
def bearing_deg(
    lat1: FloatOrFloats, lng1: FloatOrFloats, lat2: FloatOrFloats, lng2: FloatOrFloats
) -> Floats: ...
def bearing_deg(
    lat1: FloatOrFloats, lng1: FloatOrFloats, lat2: FloatOrFloats, lng2: FloatOrFloats
) -> np.float64 | Floats:
    """Initial bearing from point 1 to point 2, degrees clockwise from north in [0, 360)."""
    p1 = np.radians(lat1)
    p2 = np.radians(lat2)
    dl = np.radians(np.asarray(lng2) - np.asarray(lng1))
    y = np.sin(dl) * np.cos(p2)
    x = np.cos(p1) * np.sin(p2) - np.sin(p1) * np.cos(p2) * np.cos(dl)
    bearing: np.float64 | Floats = (np.degrees(np.arctan2(y, x)) + 360.0) % 360.0
    return bearing


@overload
def destination(  # type: ignore[overload-overlap]
    lat: float, lng: float, bearing: float, distance_m: float
) -> tuple[np.float64, np.float64]: ...
@overload
def destination(
    lat: FloatOrFloats, lng: FloatOrFloats, bearing: FloatOrFloats, distance_m: FloatOrFloats
) -> tuple[Floats, Floats]: ...
def destination(
    lat: FloatOrFloats, lng: FloatOrFloats, bearing: FloatOrFloats, distance_m: FloatOrFloats
) -> tuple[np.float64 | Floats, np.float64 | Floats]:
    """The point reached from (lat, lng) after distance_m along bearing (degrees)."""
    d = np.asarray(distance_m) / EARTH_RADIUS_M
    b = np.radians(bearing)
    p1 = np.radians(lat)
    l1 = np.radians(lng)
    p2 = np.arcsin(np.sin(p1) * np.cos(d) + np.cos(p1) * np.sin(d) * np.cos(b))
    l2 = l1 + np.arctan2(np.sin(b) * np.sin(d) * np.cos(p1), np.cos(d) - np.sin(p1) * np.sin(p2))
    lat2: np.float64 | Floats = np.degrees(p2)
    lng2: np.float64 | Floats = (np.degrees(l2) + 540.0) % 360.0 - 180.0
    return lat2, lng2


@dataclass(frozen=True, slots=True)
class LocalProjection:
    """Equirectangular projection around a region's centre: degrees to metres and back."""

    lat0: float
    lng0: float

    @property
    def m_per_deg_lng(self) -> float:
        return float(M_PER_DEG_LAT * np.cos(np.radians(self.lat0)))

    @overload
    def to_xy(self, lat: float, lng: float) -> tuple[np.float64, np.float64]: ...  # type: ignore[overload-overlap]
    @overload
    def to_xy(self, lat: FloatOrFloats, lng: FloatOrFloats) -> tuple[Floats, Floats]: ...
    def to_xy(
        self, lat: FloatOrFloats, lng: FloatOrFloats
    ) -> tuple[np.float64 | Floats, np.float64 | Floats]:
        x = (np.asarray(lng, dtype=np.float64) - self.lng0) * self.m_per_deg_lng
        y = (np.asarray(lat, dtype=np.float64) - self.lat0) * M_PER_DEG_LAT
        return x, y

    @overload
    def to_latlng(self, x: float, y: float) -> tuple[np.float64, np.float64]: ...  # type: ignore[overload-overlap]
    @overload
    def to_latlng(self, x: FloatOrFloats, y: FloatOrFloats) -> tuple[Floats, Floats]: ...
    def to_latlng(
        self, x: FloatOrFloats, y: FloatOrFloats
    ) -> tuple[np.float64 | Floats, np.float64 | Floats]:
        lat = np.asarray(y, dtype=np.float64) / M_PER_DEG_LAT + self.lat0
        lng = np.asarray(x, dtype=np.float64) / self.m_per_deg_lng + self.lng0
        return lat, lng


@overload
def eta_s(distance_m: float, speed_mps: float, detour_factor: float = 1.35) -> np.float64: ...  # type: ignore[overload-overlap]
@overload
def eta_s(distance_m: FloatOrFloats, speed_mps: float, detour_factor: float = 1.35) -> Floats: ...
def eta_s(distance_m: FloatOrFloats, speed_mps: float, detour_factor: float = 1.35) -> np.float64 | Floats:
    """Drive-time estimate from a straight-line distance.

    The road network is longer than the crow flies; 1.35 is the usual urban detour
    factor for grid-like cities. Speeds come from the region config.
    """
    return np.asarray(distance_m) * detour_factor / max(speed_mps, 0.1)
