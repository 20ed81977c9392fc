"""A city simulation: drivers who cruise, accept offers, drive to pickups and drop-offs,
and riders who ask for rides where the demand is. Pure (no I/O): a model of the city.

:class:`City` keeps the drivers' trip states beside the moving :class:`Fleet` and turns
time into actions: location rows, ride requests, offer answers and trip milestones
(arrived, started, completed). A transport carries them to the engine and feeds back
the events the engine sends (offers, ride status): over the edge's real sockets and REST
(``api/simulate.py``, what ``dispatch simulate`` uses, built on the client library) or
straight into the shard actors (the load tests' direct transport).

Ride ids in the city are its own (``sim-...``); a transport whose engine names rides
otherwise (the edge's Postgres UUIDs) translates in both directions.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dispatch.fleet import Fleet
from dispatch.geo import M_PER_DEG_LAT, haversine_m
from dispatch.latency import LatencyHistogram
from dispatch.region import Region
from dispatch.shardmap import ShardMap

CRUISING, TO_PICKUP, BOARDING, ON_TRIP = 0, 1, 2, 3
ARRIVE_WITHIN_M = 30.0
BOARDING_S = 20.0
ACCEPT_PROBABILITY = 0.85
# A driver reads an offer and taps accept or decline after this long (seconds, uniform).
ANSWER_DELAY_S = (1.0, 4.0)


@dataclass
class Summary:
    """What a run did. ``arrived`` and ``completed`` count steps the engine confirmed;
    ``pickup_eta_s`` is the ETA the engine offered with, ``pickup_s`` the time the
    simulated drivers took; ``errors`` counts refusals by code, ``payments`` completed
    rides' payment status."""

    requests: int = 0
    offered: int = 0
    accepted: int = 0
    declined: int = 0
    arrived: int = 0
    completed: int = 0
    expired: int = 0
    cancelled: int = 0
    match_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    pickup_eta_s: list[float] = field(default_factory=list)
    pickup_s: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    payments: Counter[str] = field(default_factory=Counter)

    def line(self) -> str:
        eta = f"{np.mean(self.pickup_eta_s):.0f}s" if self.pickup_eta_s else "-"
        p95 = f"{self.match_latency.percentile(95) * 1e3:.0f}ms" if self.match_latency.total else "-"
        out = (
            f"requests {self.requests}  offered {self.offered}  accepted {self.accepted}  "
            f"picked up {self.arrived}  completed {self.completed}  expired {self.expired}  "
            f"mean pickup ETA {eta}  p95 match latency {p95}"
        )
        if self.errors:
            out += "  errors " + " ".join(f"{k}={v}" for k, v in self.errors.most_common())
        return out

    def as_dict(self) -> dict[str, Any]:
        def mean(xs: list[float]) -> float | None:
            return round(float(np.mean(xs)), 1) if xs else None

        return {
            "requests": self.requests,
            "offered": self.offered,
            "accepted": self.accepted,
            "declined": self.declined,
            "arrived": self.arrived,
            "completed": self.completed,
            "expired": self.expired,
            "cancelled": self.cancelled,
            "mean_pickup_eta_s": mean(self.pickup_eta_s),
            "mean_pickup_s": mean(self.pickup_s),
            "match_latency": self.match_latency.summary_ms(),
            "payments": dict(self.payments),
            "errors": dict(self.errors),
        }


class City:
    def __init__(
        self,
        region: Region,
        shard_map: ShardMap,
        drivers: int,
        requests_per_min: float,
        report_interval_s: float = 1.0,
        seed: int = 0,
        first_driver_id: int = 1,
    ) -> None:
        self.region = region
        self.map = shard_map
        self.fleet = Fleet(
            region,
            shard_map,
            drivers,
            report_interval_s=report_interval_s,
            seed=seed,
            first_id=first_driver_id,
        )
        self.rng = np.random.default_rng(seed + 100)
        self.rate_per_s = requests_per_min / 60.0
        self.answer_delay_s = ANSWER_DELAY_S
        self.state = np.zeros(drivers, dtype=np.int8)
        self.target_lat = np.zeros(drivers)
        self.target_lng = np.zeros(drivers)
        self.ride_of: dict[int, dict[str, Any]] = {}  # driver index -> ride dict
        self.index_of = {int(i): j for j, i in enumerate(self.fleet.ids)}
        self.requested_at: dict[str, float] = {}
        self.accepted_at: dict[str, float] = {}
        self.boarding_until: dict[int, float] = {}
        self.summary = Summary()
        self._n = 0
        self._demand = Fleet(region, shard_map, 1, seed=seed + 200)

    # -- demand ------------------------------------------------------------------------------

    def new_requests(self, dt_s: float, now: float) -> list[dict[str, Any]]:
        n = int(self.rng.poisson(self.rate_per_s * dt_s))
        if not n:
            return []
        pick = Fleet(self.region, self.map, n, seed=int(self.rng.integers(1 << 30)))
        drop = Fleet(self.region, self.map, n, seed=int(self.rng.integers(1 << 30)))
        out = []
        for j in range(n):
            self._n += 1
            ride_id = f"sim-{int(now)}-{self._n}"
            self.requested_at[ride_id] = time.monotonic()
            out.append(
                {
                    "ride_id": ride_id,
                    "rider_id": f"rider-sim-{self._n}",
                    "pickup_lat": float(pick.lat[j]),
                    "pickup_lng": float(pick.lng[j]),
                    "dropoff_lat": float(drop.lat[j]),
                    "dropoff_lng": float(drop.lng[j]),
                    "vehicle_class": 0,
                    "requested_at": now,
                }
            )
        self.summary.requests += n
        return out

    # -- driving -------------------------------------------------------------------------------

    def move(self, idx: np.ndarray, t: float) -> None:
        """Cruisers wander; drivers with a ride head straight for their target."""
        busy = (self.state[idx] == TO_PICKUP) | (self.state[idx] == ON_TRIP)
        cruise = idx[~busy & (self.state[idx] != BOARDING)]
        self.fleet.move(cruise, t)
        go = idx[busy]
        if not len(go):
            return
        f = self.fleet
        dt = np.maximum(t - f._moved_at[go], 0.0)
        f._moved_at[go] = t
        step = np.maximum(f.speed[go], 6.0) * dt
        dlat = self.target_lat[go] - f.lat[go]
        dlng = self.target_lng[go] - f.lng[go]
        dy = dlat * M_PER_DEG_LAT
        dx = dlng * f.proj.m_per_deg_lng
        dist = np.hypot(dx, dy)
        frac = np.where(dist > 0, np.minimum(step / np.maximum(dist, 1e-9), 1.0), 1.0)
        f.lat[go] += dlat * frac
        f.lng[go] += dlng * frac
        f.heading[go] = (np.degrees(np.arctan2(dx, dy)) + 360.0) % 360.0

    def milestones(self, now_wall: float) -> list[tuple[str, int, str]]:
        """(ride_id, driver_id, arrived|started|completed) for drivers that reached a target.

        The city moves on at once (a driver at the drop-off cruises again); whether the
        engine took the step is the transport's answer, counted by :func:`run_city`.
        """
        out = []
        f = self.fleet
        for j, ride in list(self.ride_of.items()):
            st = self.state[j]
            driver_id = int(f.ids[j])
            if st in (TO_PICKUP, ON_TRIP):
                d = haversine_m(f.lat[j], f.lng[j], self.target_lat[j], self.target_lng[j])
                if d > ARRIVE_WITHIN_M:
                    continue
                if st == TO_PICKUP:
                    self.state[j] = BOARDING
                    self.boarding_until[j] = now_wall + BOARDING_S * float(self.rng.uniform(0.5, 1.5))
                    acc = self.accepted_at.pop(ride["ride_id"], None)
                    if acc is not None:
                        self.summary.pickup_s.append(time.monotonic() - acc)
                    out.append((ride["ride_id"], driver_id, "arrived"))
                else:
                    self.state[j] = CRUISING
                    del self.ride_of[j]
                    out.append((ride["ride_id"], driver_id, "completed"))
            elif st == BOARDING and now_wall >= self.boarding_until.get(j, 0.0):
                self.state[j] = ON_TRIP
                self.target_lat[j] = ride["dropoff_lat"]
                self.target_lng[j] = ride["dropoff_lng"]
                out.append((ride["ride_id"], driver_id, "started"))
        return out

    # -- offers -----------------------------------------------------------------------------------

    def on_offer(self, driver_id: int, offer: dict[str, Any]) -> bool:
        """Decide: accept (most drivers) or decline. Records the match latency of a ride's
        first offer: from the transport's send and receive times when it gives them,
        else from when the city made the request to now."""
        t_req = self.requested_at.pop(offer["ride_id"], None)
        if t_req is not None:
            t0 = offer.get("sim_sent_at", t_req)
            t1 = offer.get("sim_received_at", time.monotonic())
            self.summary.match_latency.add(max(0.0, t1 - t0))
        self.summary.offered += 1
        return bool(self.rng.random() < ACCEPT_PROBABILITY)

    def on_accepted(self, driver_id: int, offer: dict[str, Any]) -> None:
        j = self.index_of[driver_id]
        self.state[j] = TO_PICKUP
        self.target_lat[j] = offer["pickup"]["lat"]
        self.target_lng[j] = offer["pickup"]["lng"]
        self.ride_of[j] = {
            "ride_id": offer["ride_id"],
            "dropoff_lat": offer["dropoff"]["lat"],
            "dropoff_lng": offer["dropoff"]["lng"],
        }
        self.accepted_at[offer["ride_id"]] = time.monotonic()
        if isinstance(offer.get("pickup_eta_s"), int | float):
            self.summary.pickup_eta_s.append(float(offer["pickup_eta_s"]))
        self.summary.accepted += 1

    def drop_ride(self, driver_id: int, ride_id: str) -> None:
        """The ride was taken from the driver (cancelled by the rider or support): cruise on."""
        j = self.index_of.get(driver_id)
        if j is None or self.ride_of.get(j, {}).get("ride_id") != ride_id:
            return
        del self.ride_of[j]
        self.state[j] = CRUISING
        self.accepted_at.pop(ride_id, None)
        self.boarding_until.pop(j, None)
