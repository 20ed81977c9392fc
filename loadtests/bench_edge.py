"""Edge benchmark: location updates over real WebSockets through one edge process.

    python -m loadtests.bench_edge [--single-sockets 2750] [--single-rate 10] [--batch-rate 220000] [--json]

Starts its own stack on this machine: embedded Redis, local Ray with the region's shard
actors, and one edge process (``dispatch edge``) on 127.0.0.1. Then two phases:

1. ``single``: ``--single-sockets`` driver sockets, each sending one location frame
   (msgpack) ``--single-rate`` times a second, from a generator process
   (``loadtests/wsload.py``); by default 2,750 x 10/s, 10% over the 25,000/s target.
   Reports ``single_frame_updates_per_s``: updates the shards applied per second, as
   the edge's router counts them; ``single_edge_cpu_share``: the edge process's CPU
   (1.0 = one core busy; an edge is one Python process, so 1.0 is its ceiling).
2. ``batch``: gateway sockets sending columnar batch frames of ``--batch-rows`` rows,
   ``--batch-rate`` rows a second in all, for a fleet of ``--batch-drivers``. Reports
   ``batch_frame_updates_per_s`` and ``batch_edge_cpu_share`` the same way.

In each phase a probe measures update-to-visible latency the honest way: a probe driver
(its own socket, the same kind as the load's) moves every 200 ms and the benchmark polls
the probe's shard until the shard returns the new position; ``*_visible_p50_ms`` and
``*_visible_p99_ms`` are from sending the frame to the shard answering with it (polling
every 2 ms, so they include up to 2 ms of polling and one actor call).

Beside them, what explains a gap between what the edge accepted and what the shards
applied: the router's submit-to-applied latency (p50/p99, since the edge started, so
the batch phase's include the single phase's), its calls per second, the
rows still buffered at the end, rows refused for backpressure, and rows the shards
dropped, by reason.

The last line is one JSON object with every figure (with ``--json``); figures are
recorded under loadtests/results/ with the machine they ran on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time

import msgpack
import psutil
import websockets

from dispatch.latency import LatencyHistogram
from dispatch.region import load_region
from loadtests.machine import record
from loadtests.stack import LocalStack


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def metric_labels(text: str, name: str, label: str) -> dict[str, float]:
    """``name``'s samples by the value of ``label``."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{") and f'{label}="' in line:
            head, _, value = line.rpartition(" ")
            key = head.split(f'{label}="', 1)[1].split('"', 1)[0]
            out[key] = out.get(key, 0.0) + float(value)
    return out


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        if head != name and not head.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


def edge_stack(args) -> LocalStack:
    """Redis, Ray with the shards, and one edge process, all local (no Postgres)."""
    # The load sends each driver's frames at --single-rate; let them all through.
    rate = {
        "DISPATCH_DRIVER_LOCATION_RATE_PER_S": str(max(10.0, args.single_rate * 1.5)),
        "DISPATCH_DRIVER_LOCATION_BURST": "50",
    }
    return LocalStack("bench-edge", load_region(), edge_env=rate, keep_tmp=True)


async def probe_loop(
    stack: LocalStack, send, probe_id: int, stop: asyncio.Event, hist: LatencyHistogram
) -> int:
    """Move the probe every 200 ms with ``send(lat, lng, ts)``; poll its shard until it is there."""
    lat0, lng0 = 37.7793, -122.4193  # Civic Center
    k = 0
    misses = 0
    while not stop.is_set():
        k += 1
        lat, lng = lat0 + (k % 50) * 2e-5, lng0
        ts = round(time.time(), 6)
        handle = stack.directory.handle(stack.map.shard_for_point(lat, lng))
        t0 = time.perf_counter()
        await send(lat, lng, ts)
        deadline = t0 + 5.0
        while time.perf_counter() < deadline:
            # A raw actor call, not ShardClient.driver: the probe's own cost stays out of
            # the figure (the client's reply poller would add its tick to every poll).
            d = await handle.driver.remote(probe_id)
            # The row's ts is the edge's receive time (it orders a driver's rows); the
            # probe knows its position by its latitude, which differs from the last one.
            if d is not None and abs(d["lat"] - lat) < 1e-9 and not d["pending"]:
                hist.add(time.perf_counter() - t0)
                break
            await asyncio.sleep(0.002)
        else:
            misses += 1
        await asyncio.sleep(0.2)
    return misses


async def run_phase(
    stack: LocalStack, name: str, gen_args: list[str], seconds: float, probe_kind: str
) -> dict:
    """Run the generator; measure the middle of the run (after 3 s of ramp-up)."""
    gen = subprocess.Popen(
        [sys.executable, "-m", "loadtests.wsload", *gen_args, "--url", stack.ws],
        env=stack.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    edge_proc = psutil.Process(stack.edge.pid)
    gen_proc = psutil.Process(gen.pid)
    probe_id = 31_000_000 + (1 if name == "single" else 2)
    hist = LatencyHistogram()
    stop = asyncio.Event()
    if probe_kind == "driver":
        token = stack.authority.issue(f"drv-{probe_id}", "driver", 3600)
        ws = await websockets.connect(
            f"{stack.ws}/v1/ws/driver?encoding=msgpack",
            additional_headers={"Authorization": f"Bearer {token}"},
        )
        await ws.recv()
        await ws.send(msgpack.packb({"type": "online", "lat": 37.7793, "lng": -122.4193}))

        async def send(lat, lng, ts):
            await ws.send(msgpack.packb({"type": "location", "lat": lat, "lng": lng, "ts": ts}))
    else:
        token = stack.authority.issue("bench-probe", "gateway", 3600)
        ws = await websockets.connect(
            f"{stack.ws}/v1/ws/gateway", additional_headers={"Authorization": f"Bearer {token}"}
        )
        await ws.recv()

        async def send(lat, lng, ts):
            await ws.send(
                msgpack.packb(
                    {
                        "type": "batch",
                        "driver_id": [probe_id],
                        "lat": [lat],
                        "lng": [lng],
                        "ts": [ts],
                        "intent": [1],
                    }
                )
            )

    # Wait for the generator to connect everything and start sending.
    start_text = stack.metrics()
    base = metric(start_text, "dispatch_router_rows_total", outcome="applied")
    t_wait = time.time()
    while time.time() - t_wait < 120:
        await asyncio.sleep(0.5)
        if metric(stack.metrics(), "dispatch_router_rows_total", outcome="applied") > base + 1000:
            break
    await asyncio.sleep(3.0)  # ramp-up
    probe = asyncio.get_running_loop().create_task(probe_loop(stack, send, probe_id, stop, hist))
    m0, t0 = stack.metrics(), time.time()
    cpu0 = edge_proc.cpu_times()
    gcpu0 = gen_proc.cpu_times()
    await asyncio.sleep(seconds)
    m1, t1 = stack.metrics(), time.time()
    cpu1 = edge_proc.cpu_times()
    gcpu1 = gen_proc.cpu_times()
    stop.set()
    misses = await probe
    await ws.close()
    out, err = await asyncio.to_thread(gen.communicate)
    if gen.returncode != 0:
        raise RuntimeError(f"generator failed: {err[-2000:]}")
    gen_out = json.loads(out.strip().splitlines()[-1])
    dt = t1 - t0

    def rate(family: str, **labels) -> float:
        return (metric(m1, family, **labels) - metric(m0, family, **labels)) / dt

    edge_cpu = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / dt
    d0, d1 = (metric_labels(m, "dispatch_shard_rows_dropped_total", "reason") for m in (m0, m1))
    shard_dropped = {k: round(v - d0.get(k, 0.0)) for k, v in d1.items() if v > d0.get(k, 0.0)}
    router_latency = metric_labels(m1, "dispatch_router_flush_latency_seconds", "quantile")
    return {
        f"{name}_frame_updates_per_s": round(rate("dispatch_router_rows_total", outcome="applied")),
        f"{name}_edge_accepted_per_s": round(rate("dispatch_edge_location_updates_total")),
        f"{name}_offered_per_s": gen_out["sent_per_s"],
        f"{name}_edge_cpu_share": round(edge_cpu, 2),
        f"{name}_generator_cpu_share": round((gcpu1.user + gcpu1.system - gcpu0.user - gcpu0.system) / dt, 2),
        f"{name}_visible_p50_ms": round(hist.percentile(50) * 1e3, 1),
        f"{name}_visible_p99_ms": round(hist.percentile(99) * 1e3, 1),
        f"{name}_probes": int(hist.total),
        f"{name}_probe_misses": misses,
        f"{name}_rejected": {k: v for k, v in gen_out["errors"].items()},
        f"{name}_router_calls_per_s": round(rate("dispatch_router_rows_total", outcome="calls")),
        f"{name}_router_p50_ms": round(router_latency.get("0.5", 0.0) * 1e3, 1),
        f"{name}_router_p99_ms": round(router_latency.get("0.99", 0.0) * 1e3, 1),
        f"{name}_router_buffered_rows_at_end": round(metric(m1, "dispatch_router_buffered_rows")),
        f"{name}_backpressure_per_s": round(rate("dispatch_router_rows_total", outcome="backpressure")),
        f"{name}_rate_limited_per_s": round(rate("dispatch_edge_rate_limited_total")),
        f"{name}_shard_dropped": shard_dropped,
        f"{name}_measured_s": round(dt, 1),
    }


async def main_async(args) -> dict:
    stack = edge_stack(args)
    log("starting Redis, Ray, shards and one edge process ...")
    stack.start()
    figures: dict = {}
    try:
        if args.single_sockets:
            log(
                f"single frames: {args.single_sockets} sockets x {args.single_rate:g}/s for {args.seconds:g}s"
            )
            gen = [
                "drivers",
                "--sockets",
                str(args.single_sockets),
                "--rate",
                str(args.single_rate),
                "--seconds",
                str(args.seconds + 30),
            ]
            figures.update(await run_phase(stack, "single", gen, args.seconds, "driver"))
            log(json.dumps({k: v for k, v in figures.items() if k.startswith("single")}))
        if args.batch_rate:
            log(
                f"batch frames: {args.batch_rate:g} rows/s in {args.batch_rows}-row frames,"
                f" {args.batch_drivers} drivers"
            )
            gen = [
                "gateway",
                "--sockets",
                str(args.batch_sockets),
                "--rate",
                str(args.batch_rate),
                "--drivers",
                str(args.batch_drivers),
                "--batch-rows",
                str(args.batch_rows),
                "--seconds",
                str(args.seconds + 30),
                "--first-id",
                "40000000",
            ]
            figures.update(await run_phase(stack, "batch", gen, args.seconds, "gateway"))
            log(json.dumps({k: v for k, v in figures.items() if k.startswith("batch")}))
    finally:
        stack.stop()
    figures["config"] = {k: v for k, v in vars(args).items() if k not in ("json", "no_record")}
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="loadtests.bench_edge", description=__doc__.split("\n\n")[0])
    p.add_argument("--single-sockets", type=int, default=2750)
    p.add_argument("--single-rate", type=float, default=10.0, help="frames/s per driver socket")
    p.add_argument("--batch-rate", type=float, default=220_000, help="rows/s over the gateway sockets")
    p.add_argument("--batch-rows", type=int, default=2000)
    p.add_argument("--batch-sockets", type=int, default=4)
    p.add_argument("--batch-drivers", type=int, default=100_000)
    p.add_argument("--seconds", type=float, default=30.0, help="measured seconds per phase")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    figures = asyncio.run(main_async(args))
    if not args.no_record:
        log(f"recorded {record('bench_edge', figures)}")
    if args.json:
        print(json.dumps(figures))
    else:
        for k, v in figures.items():
            print(f"{k:>32}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
