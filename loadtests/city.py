"""A city simulation: drivers who cruise, accept offers, drive to pickups and drop-offs,
and riders who ask for rides where the demand is. Transport-agnostic.

:class:`City` keeps the drivers' trip states beside the moving :class:`Fleet` and turns
time into actions for a :class:`Transport`: location batches, ride requests, offer
answers and trip milestones (arrived, started, completed). The transport carries them to
the engine — straight into the shard actors (:class:`DirectTransport`, the ride side of
the engine without the edge) or, later, over the edge's sockets — and feeds back the
events the engine sends (offers, ride status).

Used by ``dispatch simulate`` (live summary) and by the benchmarks.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from dispatch.geo import M_PER_DEG_LAT, haversine_m
from dispatch.latency import LatencyHistogram
from dispatch.region import Region
from dispatch.shardmap import ShardMap
from loadtests.fleet import Fleet

CRUISING, TO_PICKUP, BOARDING, ON_TRIP = 0, 1, 2, 3
ARRIVE_WITHIN_M = 30.0
BOARDING_S = 20.0
ACCEPT_PROBABILITY = 0.85


class Transport(Protocol):
    async def send_locations(self, rows: np.ndarray) -> None: ...
    async def request_ride(self, ride: dict) -> None: ...
    async def accept(self, offer: dict, driver_id: int) -> bool: ...
    async def decline(self, offer: dict, driver_id: int) -> None: ...
    async def milestone(self, ride_id: str, driver_id: int, what: str) -> None: ...
    async def events(self) -> list[tuple[str, str, dict]]: ...


@dataclass
class Summary:
    requests: int = 0
    offered: int = 0
    accepted: int = 0
    declined: int = 0
    arrived: int = 0
    completed: int = 0
    expired: int = 0
    match_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    pickup_s: list[float] = field(default_factory=list)

    def line(self) -> str:
        lat = self.match_latency
        eta = float(np.mean(self.pickup_s)) if self.pickup_s else float("nan")
        return (
            f"requests {self.requests}  offered {self.offered}  accepted {self.accepted}  "
            f"completed {self.completed}  expired {self.expired}  mean pickup {eta:.0f}s  "
            f"p95 match latency {lat.percentile(95) * 1e3:.0f}ms"
        )

    def as_dict(self) -> dict:
        return {
            "requests": self.requests,
            "offered": self.offered,
            "accepted": self.accepted,
            "declined": self.declined,
            "arrived": self.arrived,
            "completed": self.completed,
            "expired": self.expired,
            "mean_pickup_s": round(float(np.mean(self.pickup_s)), 1) if self.pickup_s else None,
            "match_latency": self.match_latency.summary_ms(),
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
        self.fleet = Fleet(region, shard_map, drivers, report_interval_s=report_interval_s, seed=seed,
                           first_id=first_driver_id)  # fmt: skip
        self.rng = np.random.default_rng(seed + 100)
        self.rate_per_s = requests_per_min / 60.0
        self.state = np.zeros(drivers, dtype=np.int8)
        self.target_lat = np.zeros(drivers)
        self.target_lng = np.zeros(drivers)
        self.ride_of = {}  # driver index -> ride dict
        self.index_of = {int(i): j for j, i in enumerate(self.fleet.ids)}
        self.requested_at: dict[str, float] = {}
        self.accepted_at: dict[str, float] = {}
        self.boarding_until: dict[int, float] = {}
        self.summary = Summary()
        self._n = 0
        self._demand = Fleet(region, shard_map, 1, seed=seed + 200)

    # -- demand ------------------------------------------------------------------------------

    def new_requests(self, dt_s: float, now: float) -> list[dict]:
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
            out.append({"ride_id": ride_id, "rider_id": f"rider-sim-{self._n}",
                        "pickup_lat": float(pick.lat[j]), "pickup_lng": float(pick.lng[j]),
                        "dropoff_lat": float(drop.lat[j]), "dropoff_lng": float(drop.lng[j]),
                        "vehicle_class": 0, "requested_at": now})  # fmt: skip
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
        """(ride_id, driver_id, arrived|started|completed) for drivers that reached a target."""
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
                    self.summary.arrived += 1
                    out.append((ride["ride_id"], driver_id, "arrived"))
                else:
                    self.state[j] = CRUISING
                    del self.ride_of[j]
                    self.summary.completed += 1
                    out.append((ride["ride_id"], driver_id, "completed"))
            elif st == BOARDING and now_wall >= self.boarding_until.get(j, 0.0):
                self.state[j] = ON_TRIP
                self.target_lat[j] = ride["dropoff_lat"]
                self.target_lng[j] = ride["dropoff_lng"]
                out.append((ride["ride_id"], driver_id, "started"))
        return out

    # -- offers -----------------------------------------------------------------------------------

    def on_offer(self, driver_id: int, offer: dict) -> bool:
        """Decide: accept (most drivers) or decline. Records the match latency."""
        t0 = self.requested_at.pop(offer["ride_id"], None)
        if t0 is not None:
            self.summary.match_latency.add(time.monotonic() - t0)
        self.summary.offered += 1
        return bool(self.rng.random() < ACCEPT_PROBABILITY)

    def on_accepted(self, driver_id: int, offer: dict) -> None:
        j = self.index_of[driver_id]
        self.state[j] = TO_PICKUP
        self.target_lat[j] = offer["pickup"]["lat"]
        self.target_lng[j] = offer["pickup"]["lng"]
        self.ride_of[j] = {"ride_id": offer["ride_id"], "dropoff_lat": offer["dropoff"]["lat"],
                           "dropoff_lng": offer["dropoff"]["lng"]}  # fmt: skip
        self.accepted_at[offer["ride_id"]] = time.monotonic()
        self.summary.accepted += 1


async def run_city(city: City, transport: Transport, seconds: float, on_summary=None, every_s: float = 5.0):
    """Drive ``city`` through ``transport`` for ``seconds`` of wall time."""
    start = time.monotonic()
    prev = 0.0
    last_summary = 0.0
    f = city.fleet
    await transport.send_locations(f.all_rows(time.time()))
    pending: set[asyncio.Task] = set()

    async def answer(driver_id: int, offer: dict, accept: bool) -> None:
        await asyncio.sleep(float(city.rng.uniform(1.0, 4.0)))
        if accept:
            if await transport.accept(offer, driver_id):
                city.on_accepted(driver_id, offer)
        else:
            city.summary.declined += 1
            await transport.decline(offer, driver_id)

    while True:
        now = time.monotonic() - start
        if now >= seconds:
            break
        idx = f.due(prev, now)
        for ride in city.new_requests(now - prev, time.time()):
            await transport.request_ride(ride)
        prev = now
        if len(idx):
            city.move(idx, now)
            await transport.send_locations(f.rows(idx, time.time()))
        for ride_id, driver_id, what in city.milestones(time.time()):
            await transport.milestone(ride_id, driver_id, what)
        for kind, ident, msg in await transport.events():
            if kind == "driver" and msg.get("type") == "offer":
                driver_id = int(ident)
                t = asyncio.create_task(answer(driver_id, msg, city.on_offer(driver_id, msg)))
                pending.add(t)
                t.add_done_callback(pending.discard)
            elif kind == "rider" and msg.get("status") == "expired":
                city.summary.expired += 1
        if on_summary and now - last_summary >= every_s:
            last_summary = now
            on_summary(city.summary)
        await asyncio.sleep(0.05)
    for t in pending:
        t.cancel()
    return city.summary


class DirectTransport:
    """Straight into the shard actors (router + actor calls) and Redis, without the edge.

    What the edge will do for real clients: route location batches, hand requests to the
    pickup's shard, relay offers and answers. Use it to exercise the engine's ride side
    at scale, or before an edge is up.
    """

    def __init__(self, shard_map: ShardMap, shard_directory, redis_url: str) -> None:
        import redis.asyncio as aioredis

        from actors.router import LocationRouter

        self.map = shard_map
        self.dir = shard_directory
        self.router = LocationRouter(shard_map, shard_directory)
        self.redis = aioredis.Redis.from_url(redis_url)
        self.pubsub = self.redis.pubsub()
        self.ride_shard: dict[str, int] = {}

    async def start(self) -> None:
        await self.router.start()
        await self.pubsub.psubscribe("dispatch:driver:*", "dispatch:rider:*")

    async def close(self) -> None:
        await self.router.stop()
        await self.pubsub.aclose()
        await self.redis.aclose()

    async def send_locations(self, rows: np.ndarray) -> None:
        self.router.submit(rows)

    async def request_ride(self, ride: dict) -> None:
        shard = self.map.shard_for_point(ride["pickup_lat"], ride["pickup_lng"])
        self.ride_shard[ride["ride_id"]] = shard
        await self.dir.handle(shard).add_ride.remote(ride)

    async def accept(self, offer: dict, driver_id: int) -> bool:
        try:
            await self.dir.handle(offer["shard_id"]).accept_offer.remote(offer["offer_id"], driver_id)
            return True
        except Exception:  # expired or taken: the driver carries on cruising
            return False

    async def decline(self, offer: dict, driver_id: int) -> None:
        try:
            await self.dir.handle(offer["shard_id"]).decline_offer.remote(offer["offer_id"], driver_id)
        except Exception:
            pass

    async def milestone(self, ride_id: str, driver_id: int, what: str) -> None:
        if what == "completed":
            shard = self.ride_shard.pop(ride_id, None)
            if shard is not None:
                await self.dir.handle(shard).trip_ended.remote(driver_id)

    async def events(self) -> list[tuple[str, str, dict]]:
        import msgpack

        out = []
        while True:
            msg = await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=0.0)
            if not msg:
                return out
            _, kind, ident = msg["channel"].decode().split(":", 2)
            out.append((kind, ident, msgpack.unpackb(msg["data"])))
