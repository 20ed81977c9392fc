"""Matching benchmark: request-to-offer latency at city load, and match quality by policy.

    python -m loadtests.bench_match [--drivers 100000] [--requests-per-min 10000] [--seconds 60] [--json]

Two parts, in one run:

1. **latency** (real Ray shard actors, real Redis): 100k drivers stream positions through
   the router while riders request at ``--requests-per-min``; every request goes to the
   shard of its pickup (``add_ride``) and the benchmark listens on the drivers' channels
   the way the edges do. ``p50_ms``/``p95_ms``/``p99_ms`` run from the request reaching
   the shard to the offer arriving on the driver's channel. Simulated drivers accept 85%
   of offers after 2-6 s (the rest time out or are declined) and finish trips after a
   few minutes, so the fleet's availability moves as it would.
2. **quality** (the pure core with a simulated clock, the same demand for both policies):
   the mean pickup ETA of accepted offers and the share of requests offered a driver
   within 2 minutes, for optimal batch matching and for the greedy baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass

import msgpack
import numpy as np

from actors import directory
from actors.router import LocationRouter
from dispatch.cluster import LocalShards
from dispatch.dispatcher import Dispatcher, DriverStatusChange, Notify, Reserve
from dispatch.drivers import DriverStatus
from dispatch.latency import LatencyHistogram
from dispatch.region import load_region, region_file_text
from dispatch.rides import MatchingConfig, RideRequest
from dispatch.shardmap import ShardMap
from loadtests.fleet import Fleet
from loadtests.machine import ProcessCpu, record
from loadtests.redis_baseline import redis_url


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


@dataclass
class Demand:
    """Ride requests with hotspot-weighted pickups, generated once and replayed."""

    t: np.ndarray
    pickup_lat: np.ndarray
    pickup_lng: np.ndarray
    drop_lat: np.ndarray
    drop_lng: np.ndarray

    @classmethod
    def make(cls, region, smap, per_min: float, seconds: float, seed: int = 7) -> Demand:
        rng = np.random.default_rng(seed)
        n = rng.poisson(per_min / 60.0 * seconds)
        t = np.sort(rng.uniform(0, seconds, n))
        p = Fleet(region, smap, n, seed=seed + 1)
        d = Fleet(region, smap, n, seed=seed + 2)
        return cls(t, p.lat.copy(), p.lng.copy(), d.lat.copy(), d.lng.copy())


# -- part 1: latency through the shard actors ---------------------------------------------------


async def latency_part(args, region, smap, demand: Demand) -> dict:
    namespace = f"bench-{uuid.uuid4().hex[:6]}"
    directory.connect(namespace=namespace, num_cpus=os.cpu_count() or 2)
    with redis_url() as url:
        import redis.asyncio as aioredis

        directory.deploy_shards(
            region.name, region.shard_count, region_file_text(args.region), namespace=namespace, redis_url=url
        )
        dirx = directory.ShardDirectory(region.name, region.shard_count, namespace)
        router = LocationRouter(smap, dirx)
        await router.start()
        fleet = Fleet(region, smap, args.drivers, seed=1, report_interval_s=args.drivers / args.location_rate)
        try:
            for a in range(0, fleet.n, 20_000):
                router.submit(fleet.rows(np.arange(a, min(a + 20_000, fleet.n)), time.time()))
            await router.drain()
            while sum(s["available"] for s in await dirx.stats()) < args.drivers * 0.99:
                await asyncio.sleep(0.2)
            log(f"{args.drivers} drivers online; requests at {args.requests_per_min}/min for {args.seconds}s")
            r = aioredis.Redis.from_url(url)
            ps = r.pubsub()
            await ps.psubscribe("dispatch:driver:*")
            requested_at: dict[str, float] = {}
            hist = LatencyHistogram()
            counts = {"requests": 0, "offers": 0, "accepted": 0, "declined": 0}
            stop = asyncio.Event()
            rng = np.random.default_rng(3)

            async def answer(offer: dict, driver_id: int, shard_id: int) -> None:
                await asyncio.sleep(float(rng.uniform(2, 6)))
                h = dirx.handle(shard_id)
                try:
                    if rng.random() < 0.85:
                        await h.accept_offer.remote(offer["offer_id"], driver_id)
                        counts["accepted"] += 1
                        await asyncio.sleep(float(rng.uniform(60, 240)))
                        await h.trip_ended.remote(driver_id)
                    elif rng.random() < 0.5:
                        await h.decline_offer.remote(offer["offer_id"], driver_id)
                        counts["declined"] += 1
                except Exception:
                    pass

            async def listen() -> None:
                while not stop.is_set():
                    msg = await ps.get_message(ignore_subscribe_messages=True, timeout=0.1)
                    if not msg:
                        continue
                    body = msgpack.unpackb(msg["data"])
                    if body.get("type") != "offer":
                        continue
                    t0 = requested_at.pop(body["ride_id"], None)
                    if t0 is not None:
                        hist.add(time.time() - t0)
                    counts["offers"] += 1
                    driver_id = int(msg["channel"].decode().rsplit(":", 1)[1])
                    asyncio.create_task(answer(body, driver_id, body["shard_id"]))

            async def locations() -> None:
                start = time.monotonic()
                prev = 0.0
                while not stop.is_set():
                    now = time.monotonic() - start
                    idx = fleet.due(prev, now)
                    prev = now
                    if len(idx):
                        fleet.move(idx, now)
                        router.submit(fleet.rows(idx, time.time()))
                    await asyncio.sleep(0.02)

            listener = asyncio.create_task(listen())
            mover = asyncio.create_task(locations())
            cpu = ProcessCpu()
            start = time.monotonic()
            owners = smap.shard_of(demand.pickup_lat, demand.pickup_lng)
            for i in range(len(demand.t)):
                delay = start + demand.t[i] - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                ride_id = f"bm-{i}"
                now = time.time()
                requested_at[ride_id] = now
                counts["requests"] += 1
                await dirx.handle(int(owners[i])).add_ride.remote(
                    {"ride_id": ride_id, "rider_id": f"rider-{i}", "pickup_lat": float(demand.pickup_lat[i]),
                     "pickup_lng": float(demand.pickup_lng[i]), "dropoff_lat": float(demand.drop_lat[i]),
                     "dropoff_lng": float(demand.drop_lng[i]), "vehicle_class": 0, "requested_at": now}
                )  # fmt: skip
            await asyncio.sleep(3.0)  # let the last requests be offered
            elapsed = time.monotonic() - start
            stop.set()
            await asyncio.gather(listener, mover)
            stats = await dirx.stats()
            s = hist.summary_ms()
            out = {
                "requests": counts["requests"],
                "offers": counts["offers"],
                "requests_offered": int(hist.total),
                "accepted": counts["accepted"],
                "seconds": round(elapsed, 1),
                "p50_ms": s["p50_ms"],
                "p95_ms": s["p95_ms"],
                "p99_ms": s["p99_ms"],
                "tick_s": MatchingConfig.from_section(region.section("matching")).tick_s,
                "location_updates_per_s": round(sum(x["updates_per_s"] for x in stats)),
                "cpu_s_by_process": cpu.seconds_by_group(),
            }
            await ps.aclose()
            await r.aclose()
            return out
        finally:
            await router.stop()
            directory.teardown_shards(region.name, region.shard_count, namespace=namespace)
            directory.shutdown()


# -- part 2: quality with a simulated clock ----------------------------------------------------


def quality_part(args, region, smap, demand: Demand, policy: str, drivers: int, label: str) -> dict:
    """Replay the demand against the pure core with drivers that accept and drive trips."""
    rng = np.random.default_rng(11)
    shards = LocalShards(region, smap)
    section = {**region.section("matching"), "policy": policy}
    if args.quality_tick_s:
        section["tick_s"] = args.quality_tick_s
    cfg = MatchingConfig.from_section(section, region.index.halo_m)
    disp = [Dispatcher(s, cfg) for s in shards]
    fleet = Fleet(region, smap, drivers, seed=1, report_interval_s=5.0)
    t0 = 1_800_000_000.0
    shards.load(fleet.all_rows(t0 - 1), t0)
    answers: list[tuple[float, int, str, int, bool]] = []  # (at, shard, offer_id, driver, accept)
    trip_ends: list[tuple[float, int]] = []  # (at, driver_id)
    offered_at: dict[str, float] = {}
    etas: list[float] = []
    req_t = {f"q-{i}": t for i, t in enumerate(demand.t)}
    owners = smap.shard_of(demand.pickup_lat, demand.pickup_lng)
    next_req = 0
    step = cfg.tick_s
    sim_t = 0.0
    end_t = demand.t[-1] + 150.0 if len(demand.t) else 0.0
    driver_index = {int(i): j for j, i in enumerate(fleet.ids)}
    while sim_t < end_t:
        now = t0 + sim_t
        while next_req < len(demand.t) and demand.t[next_req] <= sim_t:
            i = next_req
            req = RideRequest(
                f"q-{i}", f"rider-{i}", float(demand.pickup_lat[i]), float(demand.pickup_lng[i]),
                float(demand.drop_lat[i]), float(demand.drop_lng[i]), 0, t0 + demand.t[i],
            )  # fmt: skip
            disp[int(owners[i])].add_ride(req, now)
            next_req += 1
        # Drivers report every 5 s of simulated time; a driver on a trip heads for drop-off.
        idx = fleet.due(sim_t - step, sim_t)
        if len(idx):
            fleet.move(idx, sim_t)
            shards.route(fleet.rows(idx, now - 0.2), now)
        shards.settle()
        if int(sim_t / 1.0) != int((sim_t - step) / 1.0):
            shards.push_halo(now)
        for k, d in enumerate(disp):
            for e in d.tick(now):
                if isinstance(e, Notify) and e.audience == "driver" and e.message["type"] == "offer":
                    accept = bool(rng.random() < 0.85)
                    answers.append(
                        (now + float(rng.uniform(2, 6)), k, e.message["offer_id"], int(e.id), accept)
                    )
                    offered_at.setdefault(e.message["ride_id"], now)
                elif isinstance(e, Reserve):
                    ok = shards[e.owner].reserve(e.driver_id, now)
                    for e2 in d.reserved(e.ride_id, e.driver_id, ok, now):
                        if (
                            isinstance(e2, Notify)
                            and e2.audience == "driver"
                            and e2.message["type"] == "offer"
                        ):
                            accept = bool(rng.random() < 0.85)
                            answers.append(
                                (
                                    now + float(rng.uniform(2, 6)),
                                    k,
                                    e2.message["offer_id"],
                                    int(e2.id),
                                    accept,
                                )
                            )
                            offered_at.setdefault(e2.message["ride_id"], now)
                        elif isinstance(e2, DriverStatusChange):
                            _apply_status(shards, e2)
                elif isinstance(e, DriverStatusChange):
                    _apply_status(shards, e)
        due_answers = [a for a in answers if a[0] <= now]
        answers = [a for a in answers if a[0] > now]
        for _at, k, offer_id, driver_id, accept in due_answers:
            d = disp[k]
            try:
                if accept:
                    acc, effs, _eta = d.accept(offer_id, driver_id, now)
                    for e in effs:
                        _apply_status(shards, e)
                    etas.append(_eta_s(cfg, acc, fleet, driver_index))
                    trip_ends.append((now + float(rng.uniform(300, 900)), driver_id))
                else:
                    for e in d.decline(offer_id, driver_id, now):
                        _apply_status(shards, e)
            except Exception:
                pass  # expired or already answered
        for _at, driver_id in [t for t in trip_ends if t[0] <= now]:
            for s in shards:
                s.set_status(driver_id, DriverStatus.AVAILABLE)
        trip_ends = [t for t in trip_ends if t[0] > now]
        sim_t += step
    within = sum(1 for rid, t in offered_at.items() if t - (t0 + req_t[rid]) <= 120.0)
    n = len(demand.t)
    return {
        f"{label}{policy}_mean_pickup_eta_s": round(float(np.nanmean(etas)), 1) if etas else None,
        f"{label}{policy}_matched_within_2min": round(within / n, 4) if n else None,
        f"{label}{policy}_accepted": len(etas),
    }


def _apply_status(shards: LocalShards, e) -> None:
    if isinstance(e, DriverStatusChange):
        for s in shards:
            if s.set_status(e.driver_id, e.status, e.trip):
                break


def _eta_s(cfg, acc, fleet, driver_index) -> float:
    """Pickup ETA of an accepted offer: the driver's distance to pickup at offer time."""
    from dispatch.geo import eta_s, haversine_m

    j = driver_index[acc.driver_id]
    req = acc.request
    d = haversine_m(req.pickup_lat, req.pickup_lng, fleet.lat[j], fleet.lng[j])
    return float(eta_s(d, cfg.pickup_speed_mps))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--drivers", type=int, default=100_000)
    p.add_argument("--requests-per-min", type=float, default=10_000)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--location-rate", type=float, default=50_000, help="location updates/s during the run")
    p.add_argument("--quality-drivers", type=int, default=100_000, help="fleet of the simulated-clock part")
    p.add_argument("--quality-requests-per-min", type=float, default=10_000)
    p.add_argument("--quality-minutes", type=float, default=5, help="simulated minutes of demand")
    p.add_argument("--tight-drivers", type=int, default=1500)
    p.add_argument("--tight-requests-per-min", type=float, default=600)
    p.add_argument(
        "--quality-tick-s", type=float, default=0.0, help="batching window (default: the region's)"
    )
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--region", default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    region = load_region(args.region)
    smap = ShardMap(region)
    figures: dict = {"drivers": args.drivers, "requests_per_min": args.requests_per_min}
    if not args.skip_latency:
        demand = Demand.make(region, smap, args.requests_per_min, args.seconds)
        figures.update(asyncio.run(latency_part(args, region, smap, demand)))
        log(json.dumps(figures))
    # The demand on the fleet, then a fleet too small for its demand, where
    # who gets which driver matters.
    scenarios = [
        ("", args.quality_drivers, args.quality_requests_per_min),
        ("tight_", args.tight_drivers, args.tight_requests_per_min),
    ]
    for label, drivers, rpm in scenarios:
        qd = Demand.make(region, smap, rpm, args.quality_minutes * 60, seed=21)
        figures[f"{label}quality_drivers"] = drivers
        figures[f"{label}quality_requests"] = len(qd.t)
        for policy in ("batch", "greedy"):
            t = time.monotonic()
            figures.update(quality_part(args, region, smap, qd, policy, drivers, label))
            log(f"quality {label}{policy}: {time.monotonic() - t:.1f}s", json.dumps(figures))
    if not args.no_record:
        log(f"recorded {record('bench_match', figures)}")
    print(json.dumps(figures) if args.json else json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
