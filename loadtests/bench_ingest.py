"""Location ingest benchmark: a moving fleet through the router into the Ray shard actors.

    python -m loadtests.bench_ingest [--drivers 100000] [--seconds 60] [--rate 200000] [--json]

Phases, all in one run on this machine (Ray's own processes included):

1. warm-up: every driver reports once and its claim settles (all drivers available);
2. paced: the fleet moves and reports at ``--rate`` updates/s for ``--seconds``; reports
   the sustained ``updates_per_s`` applied by the shards, ``p50_ms``/``p99_ms`` from the
   router taking an update to the shard having applied it (the call returns only after
   the update is in the table and index, so it is visible to the next nearby query),
   ``probe_p50_ms``/``probe_p99_ms`` measured the slow, honest way: a probe driver moves
   and nearby queries poll its shard until they return it at its new position, and
   ``cpu_s_per_100k_updates`` of machine-wide CPU;
3. ceiling: the same updates flat out for ``--max-seconds`` (``max_updates_per_s``);
4. baseline: the same updates into Redis with GEOADD, pipelined, one key per shard, flat
   out (``redis_geoadd_per_s``): the approach of the systems this engine replaces.

The last line of output is one JSON object with every figure (with ``--json``), and the
figures are recorded under loadtests/results/ with the machine they ran on.
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
from actors.router import LocationRouter, RouterConfig
from actors.settings import ShardSettings
from dispatch.fleet import Fleet
from dispatch.latency import LatencyHistogram
from dispatch.region import load_region, region_file_text
from dispatch.shardmap import ShardMap
from loadtests.machine import CpuMeter, ProcessCpu, record
from loadtests.redis_baseline import geoadd_args, redis_url

TICK_S = 0.01


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


async def wait_available(dirx, n: int, timeout_s: float = 60.0) -> int:
    deadline = time.monotonic() + timeout_s
    avail = 0
    while time.monotonic() < deadline:
        stats = await dirx.stats()
        avail = sum(s["available"] for s in stats)
        if avail >= n:
            return avail
        await asyncio.sleep(0.2)
    return avail


async def probe_loop(fleet: Fleet, smap: ShardMap, dirx, router, hist: LatencyHistogram, stop: asyncio.Event):
    """Move one driver a metre at a time and time until a nearby query sees it there."""
    rng = np.random.default_rng(99)
    while not stop.is_set():
        await asyncio.sleep(0.25)
        i = int(rng.integers(0, fleet.n))
        lat = float(fleet.lat[i]) + 1e-5
        lng = float(fleet.lng[i])
        fleet.lat[i] = lat  # the fleet carries on from the probed position
        shard = smap.shard_for_point(lat, lng)
        t0 = time.monotonic()
        router.submit(fleet.rows(np.array([i]), time.time()), now=t0)
        handle = dirx.handle(shard)
        while time.monotonic() - t0 < 5.0:
            # A raw actor call, not ShardClient.nearby: the probe's own cost stays out of
            # the figure (the client's reply poller would add its tick to every poll).
            found = await handle.nearby.remote(lat, lng, 0.5, 1)
            if found and found[0]["driver_id"] == int(fleet.ids[i]):
                hist.add(time.monotonic() - t0)
                break
            # Polling is itself load on the shard: every 5 ms is fine-grained enough.
            await asyncio.sleep(0.005)


async def paced(fleet, router, rate: float, seconds: float, on_tick=None) -> int:
    """Report at ``rate`` updates/s for ``seconds``. Returns updates submitted."""
    per_driver_interval = fleet.n / rate
    fleet.interval = per_driver_interval
    fleet.phase = fleet.rng.uniform(0, per_driver_interval, fleet.n)
    start = time.monotonic()
    t_prev = 0.0
    sent = 0
    while True:
        now = time.monotonic() - start
        if now >= seconds:
            break
        idx = fleet.due(t_prev, now)
        t_prev = now
        if len(idx):
            fleet.move(idx, now)
            sent += router.submit(fleet.rows(idx, time.time()))
        if on_tick:
            on_tick()
        # Sleep to the next tick boundary (never busy-wait: the shards need the CPU).
        await asyncio.sleep(max(0.0, TICK_S - (time.monotonic() - start - now)))
    return sent


async def flat_out(fleet, router, seconds: float, batch: int = 20_000) -> int:
    start = time.monotonic()
    sent = 0
    i = 0
    while time.monotonic() - start < seconds:
        if router.buffered_rows() > 8 * router.cfg.max_rows_per_call * router.map.shard_count:
            await asyncio.sleep(0.002)
            continue
        idx = np.arange(i, i + batch) % fleet.n
        i += batch
        fleet.move(idx, time.monotonic() - start)
        sent += router.submit(fleet.rows(idx, time.time()))
        await asyncio.sleep(0)
    return sent


def redis_geoadd(fleet: Fleet, smap: ShardMap, seconds: float, redis_url: str, chunk: int = 1000) -> dict:
    """GEOADD the fleet's updates flat out into one key per shard, pipelined."""
    import redis

    r = redis.Redis.from_url(redis_url)
    r.flushdb()
    start = time.monotonic()
    sent = 0
    i = 0
    cpu = CpuMeter()
    while time.monotonic() - start < seconds:
        idx = np.arange(i, i + 20_000) % fleet.n
        i += 20_000
        fleet.move(idx, time.monotonic() - start)
        shards = smap.shard_of(fleet.lat[idx], fleet.lng[idx])
        pipe = r.pipeline(transaction=False)
        for k in np.unique(shards).tolist():
            sel = idx[shards == k]
            for a in range(0, len(sel), chunk):
                part = sel[a : a + chunk]
                args = geoadd_args(fleet.ids[part], fleet.lat[part], fleet.lng[part])
                pipe.execute_command("GEOADD", f"geo:shard:{k}", *args)
        pipe.execute()
        sent += len(idx)
    elapsed = time.monotonic() - start
    members = sum(r.zcard(f"geo:shard:{k}") for k in range(smap.shard_count))
    return {
        "redis_geoadd_per_s": round(sent / elapsed),
        "redis_members": int(members),
        "redis_cpu_s_per_100k_updates": round(cpu.seconds() / sent * 1e5, 4),
    }


async def main_async(args) -> dict:
    region = load_region(args.region)
    smap = ShardMap(region)
    namespace = f"bench-{uuid.uuid4().hex[:6]}"
    directory.connect(namespace=namespace, num_cpus=os.cpu_count() or 2)
    directory.deploy_shards(
        ShardSettings.build(region_toml=region_file_text(args.region), namespace=namespace)
    )
    dirx = directory.ShardDirectory(region.name, region.shard_count, namespace)
    router = LocationRouter(smap, dirx, RouterConfig(flush_interval_s=args.flush_ms / 1e3))
    await router.start()
    fleet = Fleet(region, smap, args.drivers, seed=1)
    figures: dict = {"drivers": args.drivers, "shards": region.shard_count, "target_rate": args.rate}
    try:
        log(f"warm-up: {args.drivers} drivers report once")
        for a in range(0, fleet.n, 20_000):
            router.submit(fleet.rows(np.arange(a, min(a + 20_000, fleet.n)), time.time()))
            await asyncio.sleep(0.01)
        await router.drain()
        avail = await wait_available(dirx, args.drivers)
        log(f"warm-up done: {avail} available")
        router.latency = LatencyHistogram()
        c0 = dict(router.counters)
        probes = LatencyHistogram()
        stop = asyncio.Event()
        probe_task = asyncio.create_task(probe_loop(fleet, smap, dirx, router, probes, stop))
        cpu = CpuMeter()
        by_process = ProcessCpu()
        t0 = time.monotonic()
        log(f"paced: {args.rate:,.0f} updates/s for {args.seconds}s")
        sent = await paced(fleet, router, args.rate, args.seconds)
        await router.drain()
        # Everything offered has been applied (or counted): the clock stops here.
        elapsed = time.monotonic() - t0
        cpu_s = cpu.seconds()
        cpu_groups = by_process.seconds_by_group()
        stop.set()
        await probe_task
        applied = router.counters["applied"] - c0.get("applied", 0)
        lat = router.latency.summary_ms()
        stats = await dirx.stats()
        figures.update(
            {
                "seconds": round(elapsed, 1),
                "updates_sent": sent,
                "updates_applied": applied,
                "updates_per_s": round(applied / elapsed),
                "p50_ms": lat["p50_ms"],
                "p99_ms": lat["p99_ms"],
                "probe_count": int(probes.total),
                "probe_p50_ms": round(probes.percentile(50) * 1e3, 2),
                "probe_p99_ms": round(probes.percentile(99) * 1e3, 2),
                "cpu_s_per_100k_updates": round(cpu_s / max(applied, 1) * 1e5, 4),
                "machine_cpu_utilisation": round(cpu_s / elapsed / (os.cpu_count() or 1), 3),
                "cpu_s_by_process": cpu_groups,
                "ray_calls": router.counters["calls"] - c0.get("calls", 0),
                "router_backpressure": router.counters["backpressure"],
                "shard_dropped": dict(router.shard_dropped),
                "handoffs": sum(s["counters"].get("handoff_in", 0) for s in stats),
                "available_after": sum(s["available"] for s in stats),
            }
        )
        log(json.dumps(figures))
        if args.max_seconds > 0:
            log(f"ceiling: flat out for {args.max_seconds}s")
            a0 = router.counters["applied"]
            t1 = time.monotonic()
            await flat_out(fleet, router, args.max_seconds)
            await router.drain()
            figures["max_updates_per_s"] = round((router.counters["applied"] - a0) / (time.monotonic() - t1))
    finally:
        await router.stop()
        directory.teardown_shards(region.name, region.shard_count, namespace=namespace)
        directory.shutdown()
    if args.redis_seconds > 0:
        log(f"baseline: Redis GEOADD flat out for {args.redis_seconds}s")
        with redis_url() as url:
            figures.update(redis_geoadd(fleet, smap, args.redis_seconds, url))
        figures["shard_vs_redis"] = round(
            figures.get("max_updates_per_s", figures["updates_per_s"]) / figures["redis_geoadd_per_s"], 2
        )
    return figures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--drivers", type=int, default=100_000)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument(
        "--rate", type=float, default=220_000.0, help="offered updates per second (10%% over the 200k target)"
    )
    p.add_argument("--max-seconds", type=float, default=10.0, help="flat-out phase (0: skip)")
    p.add_argument("--redis-seconds", type=float, default=10.0, help="Redis baseline (0: skip)")
    p.add_argument("--flush-ms", type=float, default=20.0, help="router flush interval")
    p.add_argument("--region", default=None)
    p.add_argument("--json", action="store_true", help="end with one JSON line of figures")
    p.add_argument("--no-record", action="store_true", help="do not write loadtests/results/")
    args = p.parse_args(argv)
    figures = asyncio.run(main_async(args))
    if not args.no_record:
        log(f"recorded {record('bench_ingest', figures)}")
    if args.json:
        print(json.dumps(figures))
    else:
        for k, v in figures.items():
            print(f"{k:>28}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
