"""Nearby-query benchmark: k nearest drivers within a radius among a city-sized fleet.

    python -m loadtests.bench_nearby [--drivers 100000] [--queries 2000] [--k 10] [--radius-m 3000] [--json]

Three ways to answer the same queries on the same fleet, in one run:

* ``core``: the shard's index in this process (no I/O): what matching pays per request;
* ``shard_call``: a Ray call to the owning shard actor, as the edge makes it;
* ``redis``: GEOSEARCH FROMLONLAT BYRADIUS ASC COUNT k on one key holding the same fleet,
  through redis-py on loopback, as systems built on Redis GEO do it.

It also reports how often the core's and Redis's k nearest agree (Redis stores positions
as 52-bit geohashes, ~0.6 m, so near-ties may order differently).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid

import numpy as np

from actors import directory
from actors.router import LocationRouter
from actors.settings import ShardSettings
from dispatch.cluster import LocalShards
from dispatch.fleet import Fleet
from dispatch.latency import LatencyHistogram
from dispatch.region import load_region, region_file_text
from dispatch.shardmap import ShardMap
from loadtests.machine import record
from loadtests.redis_baseline import geoadd_args, redis_url


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def query_points(fleet: Fleet, n: int, seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Riders ask where drivers are: the same hotspot-weighted spread as the fleet."""
    other = Fleet(fleet.region, fleet.map, n, seed=seed)
    return other.lat.copy(), other.lng.copy()


def summary(h: LatencyHistogram) -> dict:
    return {"p50_ms": round(h.percentile(50) * 1e3, 4), "p99_ms": round(h.percentile(99) * 1e3, 4)}


async def run(args) -> dict:
    region = load_region(args.region)
    smap = ShardMap(region)
    fleet = Fleet(region, smap, args.drivers, seed=1)
    now = time.time()
    rows = fleet.all_rows(now - 1)
    qlat, qlng = query_points(fleet, args.queries)
    owners = smap.shard_of(qlat, qlng)
    figures: dict = {"drivers": args.drivers, "queries": args.queries, "k": args.k, "radius_m": args.radius_m}

    # 1. The core, in process.
    shards = LocalShards(region, smap)
    shards.load(rows, now)
    core = LatencyHistogram()
    core_ids = []
    for la, lo, o in zip(qlat.tolist(), qlng.tolist(), owners.tolist(), strict=True):
        t = time.perf_counter()
        found = shards[o].nearby(la, lo, args.radius_m, args.k, now)
        core.add(time.perf_counter() - t)
        core_ids.append([f.driver_id for f in found])
    figures["core"] = summary(core)
    log("core", figures["core"])

    # 2. Through the shard actors.
    namespace = f"bench-{uuid.uuid4().hex[:6]}"
    directory.connect(namespace=namespace, num_cpus=os.cpu_count() or 2)
    directory.deploy_shards(
        ShardSettings.build(region_toml=region_file_text(args.region), namespace=namespace)
    )
    dirx = directory.ShardDirectory(region.name, region.shard_count, namespace)
    try:
        router = LocationRouter(smap, dirx)
        await router.start()
        router.submit(fleet.all_rows(time.time() - 1))
        await router.drain()
        await router.stop()
        while sum(s["available"] for s in await dirx.stats()) < args.drivers:
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.5)  # one halo push, so border queries see both sides
        call = LatencyHistogram()
        for la, lo, o in zip(qlat.tolist(), qlng.tolist(), owners.tolist(), strict=True):
            t = time.perf_counter()
            # The raw actor call is what this column measures (ShardClient adds its poller).
            await dirx.handle(o).nearby.remote(la, lo, args.radius_m, args.k)
            call.add(time.perf_counter() - t)
        figures["shard_call"] = summary(call)
        log("shard_call", figures["shard_call"])
    finally:
        directory.teardown_shards(region.name, region.shard_count, namespace=namespace)
        directory.shutdown()

    # 3. Redis GEOSEARCH on the same fleet.
    import redis

    with redis_url() as url:
        r = redis.Redis.from_url(url)
        r.flushdb()
        for a in range(0, fleet.n, 10_000):
            sl = slice(a, a + 10_000)
            r.execute_command(
                "GEOADD", "geo:drivers", *geoadd_args(fleet.ids[sl], fleet.lat[sl], fleet.lng[sl])
            )
        rh = LatencyHistogram()
        agree = 0
        for j, (la, lo) in enumerate(zip(qlat.tolist(), qlng.tolist(), strict=True)):
            t = time.perf_counter()
            got = r.execute_command(
                "GEOSEARCH",
                "geo:drivers",
                "FROMLONLAT",
                lo,
                la,
                "BYRADIUS",
                args.radius_m,
                "m",
                "ASC",
                "COUNT",
                args.k,
            )
            rh.add(time.perf_counter() - t)
            agree += set(int(x) for x in got) == set(core_ids[j])
        figures["redis"] = summary(rh)
        figures["top_k_agreement"] = round(agree / args.queries, 4)
        log("redis", figures["redis"])
    figures["redis_vs_core_p50"] = round(figures["redis"]["p50_ms"] / figures["core"]["p50_ms"], 1)
    figures["redis_vs_shard_call_p50"] = round(
        figures["redis"]["p50_ms"] / figures["shard_call"]["p50_ms"], 2
    )
    return figures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--drivers", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--radius-m", type=float, default=3000.0)
    p.add_argument("--region", default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    figures = asyncio.run(run(args))
    if not args.no_record:
        log(f"recorded {record('bench_nearby', figures)}")
    print(json.dumps(figures) if args.json else json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
