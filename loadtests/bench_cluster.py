"""Cluster benchmark: ingest and matching across the namespace hosts, for sizing a cluster.

    python -m loadtests.bench_cluster [--rate 50000] [--requests-per-min 600] [--seconds 30] [--json]

Needs root and iproute2. Brings up the namespace cluster (loadtests/cluster.py): a Ray
head, ``--shard-hosts`` shard hosts with ``--shard-cpus`` each, the data host (Postgres,
Redis) and ``--edge-hosts`` edge hosts; deploys by the operator's commands (``dispatch
migrate``, ``dispatch shards deploy``, ``dispatch edge`` on each edge host). Then, all at
once for ``--seconds``:

- **ingest**: one generator process per edge (``loadtests/wsload.py gateway``, in the root
  namespace, through the bridge) sends columnar batch frames to that edge's gateway
  socket, ``--rate`` rows a second in all, for a fleet of ``--drivers``;
- **matching**: riders POST ``/v1/rides`` over REST (the client library, alternating
  edges) at ``--requests-per-min``, pickups next to fleet drivers; the drivers' offers
  are read on the data host's Redis (the channel an edge relays to the driver's socket)
  and answered over REST after ``--answer-delay-s``: 90% accept, 10% decline.

Figures (the last line, with ``--json``, is one JSON object):

- ``host_cpu``: per host, CPU share over the measured window (1.0 = one core busy), the
  sum of user+system time of every process in its namespace (``ip netns pids``); beside
  it ``generator_cpu`` and ``bench_cpu`` for what runs in the root namespace;
- ``shards``: per shard, its host and updates applied per second (its ``applied``
  counter's change over the window), drivers held; ``applied_updates_per_s`` in all,
  ``offered_updates_per_s`` what the generators were asked for, and per edge the
  router's buffered rows and rows refused for backpressure;
- ``request_to_offer_p50_ms`` / ``_p95_ms`` / ``_p99_ms``: from a POST going out to the
  first offer for its ride on Redis, over requests offered; ``requests_sent``,
  ``requests_acknowledged`` (201), ``requests_offered``, answers by outcome;
- ``cross_host``: per shard, the latency of ``ping`` from a Ray driver on the first
  edge host (after the window, load still running): ``shard_call_*`` through
  :class:`actors.client.ShardClient` (what an edge's call costs, reply poller
  included), ``ray_get_*`` the bare Ray round trip.

Only namespace addresses and 127.0.0.1 are used. Everything is torn down at the end, on
failure and on Ctrl-C too (the cluster's own teardown; the generators are killed here).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter

import numpy as np
import psutil

WSLOAD_FIRST_ID = 40_000_000
EDGE_ID_STRIDE = 10_000_000


def log(msg: str) -> None:
    print(f"[bench_cluster {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _pct_ms(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1e3, 1) if values else None


# -- CPU per host -----------------------------------------------------------------------------


def _cpu_of(pids: list[int]) -> dict[int, float]:
    out = {}
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        out[pid] = t.user + t.system
    return out


class HostCpu:
    """CPU seconds per host between :meth:`start` and :meth:`shares` (processes that
    started in the window count from zero; ones that ended in it are missed)."""

    def __init__(self, cluster, extra: dict[str, list[int]]) -> None:
        self.cluster = cluster
        self.extra = extra
        self.t0 = 0.0
        self.before: dict[str, dict[int, float]] = {}

    def _sample(self) -> dict[str, dict[int, float]]:
        hosts = {name: self.cluster.pids(name) for name in self.cluster.hosts}
        return {name: _cpu_of(pids) for name, pids in {**hosts, **self.extra}.items()}

    def start(self) -> None:
        self.before, self.t0 = self._sample(), time.monotonic()

    def shares(self) -> dict[str, float]:
        after, dt = self._sample(), time.monotonic() - self.t0
        out = {}
        for name, cpu in after.items():
            was = self.before.get(name, {})
            out[name] = round(sum(max(c - was.get(pid, 0.0), 0.0) for pid, c in cpu.items()) / dt, 3)
        return out


# -- shard stats through an edge's admin endpoint ----------------------------------------------


async def admin_shards(http, url: str, token: str) -> dict:
    r = await http.get(f"{url}/v1/admin/shards", headers={"Authorization": f"Bearer {token}"})
    r.raise_for_status()
    return r.json()


async def wait_applied(http, url: str, token: str, at_least: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            doc = await admin_shards(http, url, token)
            if sum(s.get("counters", {}).get("applied", 0) for s in doc["shards"]) >= at_least:
                return
        await asyncio.sleep(0.5)
    raise RuntimeError(f"fewer than {at_least} updates applied after {timeout_s:g} s")


# -- the cross-host probe: a tiny Ray driver inside an edge host --------------------------------


def ping_probe(n: int) -> dict:
    """Run inside a cluster host: ``n`` pings per shard, one at a time, through
    ShardClient and as a bare ``ray.get``; latency quantiles per shard in ms."""
    import ray

    from actors import directory
    from actors.client import ShardClient
    from dispatch.region import load_region

    region = load_region(None)
    # The host's environment carries the cluster's RAY_AUTH_MODE and RAY_AUTH_TOKEN_PATH.
    directory.connect(os.environ["RAY_ADDRESS"], directory.DEFAULT_NAMESPACE, log_to_driver=False)
    client = ShardClient(region.name, region.shard_count)

    async def via_client(k: int) -> list[float]:
        await client.ping(k, timeout_s=10.0)  # the first call also looks the actor up
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            if await client.ping(k):
                out.append(time.perf_counter() - t0)
        return out

    out: dict = {}
    for k in range(region.shard_count):
        calls = asyncio.run(via_client(k))
        handle = client.directory.handle(k)
        bare = []
        for _ in range(n):
            t0 = time.perf_counter()
            ray.get(handle.ping.remote(), timeout=10)
            bare.append(time.perf_counter() - t0)
        out[str(k)] = {
            "shard_call_p50_ms": _pct_ms(calls, 50),
            "shard_call_p99_ms": _pct_ms(calls, 99),
            "ray_get_p50_ms": _pct_ms(bare, 50),
            "ray_get_p99_ms": _pct_ms(bare, 99),
            "pings": len(calls),
        }
    return out


# -- matching: riders over REST, drivers answering their offers -----------------------------------


class Matching:
    """Ride requests at a steady rate and offers answered (see the module docstring)."""

    def __init__(self, cluster, pickups: np.ndarray, args: argparse.Namespace) -> None:
        from api.client import Rest, token_minter

        self.cluster = cluster
        self.args = args
        self.mint = token_minter(cluster.jwt_secret)
        urls = [cluster.edge_url(n) for n in cluster.edge_hosts]
        self.rests = [Rest([u, *[v for v in urls if v != u]], retries=2, timeout_s=10.0) for u in urls]
        self.pickups = pickups
        self.rng = np.random.default_rng(5)
        self.run = uuid.uuid4().hex[:6]
        self.sent_at: dict[int, float] = {}
        self.ride_of: dict[int, str] = {}
        self.first_offer: dict[str, float] = {}
        self.statuses: Counter = Counter()
        self.answers: Counter = Counter()
        self.tasks: set[asyncio.Task] = set()
        self.stop = asyncio.Event()

    def _spawn(self, coro) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)

    async def listen(self) -> None:
        """Offers as the shards publish them on the data host's Redis."""
        import msgpack
        import redis.asyncio as aioredis

        from dispatch.events import driver_channel

        r = aioredis.Redis.from_url(self.cluster.redis_url)
        ps = r.pubsub()
        prefix = driver_channel(0).rsplit(":", 1)[0]
        await ps.psubscribe(f"{prefix}:*")
        try:
            while not self.stop.is_set():
                msg = await ps.get_message(ignore_subscribe_messages=True, timeout=0.1)
                if not msg:
                    continue
                now = time.time()
                try:
                    body = msgpack.unpackb(msg["data"])
                except Exception:
                    continue
                if not isinstance(body, dict) or body.get("type") != "offer":
                    continue
                self.first_offer.setdefault(body["ride_id"], now)
                driver_id = int(msg["channel"].decode().rsplit(":", 1)[1])
                self._spawn(self.answer(body, driver_id))
        finally:
            await ps.aclose()
            await r.aclose()

    async def answer(self, offer: dict, driver_id: int) -> None:
        await asyncio.sleep(self.args.answer_delay_s)
        if self.stop.is_set():
            return
        what = "accept" if self.rng.random() < 0.9 else "decline"
        rest = self.rests[driver_id % len(self.rests)]
        try:
            await rest.call(
                "POST",
                f"/v1/rides/{offer['ride_id']}/{what}",
                json={"offer_id": offer["offer_id"]},
                token=self.mint(f"drv-{driver_id}", "driver"),
            )
            self.answers[f"{what}_ok"] += 1
        except Exception as exc:
            self.answers[f"{what}_{getattr(exc, 'code', type(exc).__name__)}"] += 1

    async def request(self, i: int) -> None:
        lat, lng = self.pickups[i % len(self.pickups)]
        pickup = (float(lat) + 2e-4, float(lng))
        dropoff = (float(lat) + 0.01, float(lng) + 0.01)
        rest = self.rests[i % len(self.rests)]
        self.sent_at[i] = time.time()
        try:
            ride = await rest.call(
                "POST",
                "/v1/rides",
                json={
                    "pickup": {"lat": pickup[0], "lng": pickup[1]},
                    "dropoff": {"lat": dropoff[0], "lng": dropoff[1]},
                    "payment_method": "cash",
                },
                token=self.mint(f"bc-{self.run}-r{i}", "rider"),
                idempotency_key=f"bc-{self.run}-{i}",
            )
        except Exception as exc:
            self.statuses[getattr(exc, "code", type(exc).__name__)] += 1
            return
        self.statuses["201"] += 1
        self.ride_of[i] = ride["ride_id"]

    async def requests(self, seconds: float) -> None:
        interval = 60.0 / self.args.requests_per_min
        n = int(seconds / interval)
        t0 = time.monotonic()
        for i in range(n):
            delay = t0 + i * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self._spawn(self.request(i))

    async def drain(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(rid in self.first_offer for rid in self.ride_of.values()) and len(self.ride_of) + sum(
                v for k, v in self.statuses.items() if k != "201"
            ) >= len(self.sent_at):
                return
            await asyncio.sleep(0.1)

    def figures(self) -> dict:
        lat = [
            self.first_offer[rid] - self.sent_at[i]
            for i, rid in self.ride_of.items()
            if rid in self.first_offer
        ]
        return {
            "requests_sent": len(self.sent_at),
            "requests_acknowledged": self.statuses["201"],
            "requests_offered": len(lat),
            "request_errors": {k: v for k, v in self.statuses.items() if k != "201"},
            "request_to_offer_p50_ms": _pct_ms(lat, 50),
            "request_to_offer_p95_ms": _pct_ms(lat, 95),
            "request_to_offer_p99_ms": _pct_ms(lat, 99),
            "answers": dict(self.answers),
        }

    async def close(self) -> None:
        self.stop.set()
        for t in list(self.tasks):
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for r in self.rests:
            await r.close()


# -- the run -----------------------------------------------------------------------------------


def fleet_positions(args: argparse.Namespace, edges: int) -> np.ndarray:
    """Where the generators' drivers start (the same fleets wsload builds), for pickups."""
    from dispatch.fleet import Fleet
    from dispatch.region import load_region
    from dispatch.shardmap import ShardMap

    region = load_region(None)
    per = args.drivers // edges
    out = []
    for k in range(edges):
        fleet = Fleet(region, ShardMap(region), per, seed=k + 1)
        out.append(np.column_stack([fleet.lat, fleet.lng]))
    return np.concatenate(out)


def start_generators(cluster, args: argparse.Namespace, run_s: float) -> list[subprocess.Popen]:
    edges = cluster.edge_hosts
    gens = []
    for k, name in enumerate(edges):
        argv = [
            sys.executable,
            "-m",
            "loadtests.wsload",
            "gateway",
            "--url",
            f"ws://{cluster.ip(name)}:8000",
            "--sockets",
            str(args.sockets_per_edge),
            "--rate",
            str(args.rate / len(edges)),
            "--drivers",
            str(args.drivers // len(edges)),
            "--batch-rows",
            str(args.batch_rows),
            "--seconds",
            str(run_s),
            "--first-id",
            str(WSLOAD_FIRST_ID + k * EDGE_ID_STRIDE),
            "--seed",
            str(k + 1),
        ]
        env = {**os.environ, "DISPATCH_JWT_SECRET": cluster.jwt_secret}
        log_path = cluster.logs / f"generator-{name}.log"
        with open(log_path, "ab") as out:
            gens.append(subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT))
    return gens


async def measure(cluster, args: argparse.Namespace, gens: list[subprocess.Popen]) -> dict:
    import httpx

    from api.client import mint_token

    admin = mint_token(cluster.jwt_secret, "bench-admin", "admin", 3600)
    edge_urls = {n: cluster.edge_url(n) for n in cluster.edge_hosts}
    first = next(iter(edge_urls.values()))
    ip_to_host = {h.ip: h.name for h in cluster.hosts.values()}
    matching = Matching(cluster, fleet_positions(args, len(edge_urls)), args)
    figures: dict = {}
    async with httpx.AsyncClient(timeout=10.0) as http:
        log("waiting for the fleet's first updates to be applied")
        await wait_applied(http, first, admin, min(args.drivers, 1000), 120.0)
        listener = asyncio.get_running_loop().create_task(matching.listen())
        await asyncio.sleep(args.warmup_s)
        cpu = HostCpu(cluster, {"generator": [g.pid for g in gens], "bench": [os.getpid()]})
        s0 = await admin_shards(http, first, admin)
        cpu.start()
        t0 = time.monotonic()
        log(
            f"measuring {args.seconds:g}s: {args.rate:g} updates/s offered, "
            f"{args.requests_per_min:g} requests/min"
        )
        await matching.requests(args.seconds)
        rest = args.seconds - (time.monotonic() - t0)
        if rest > 0:
            await asyncio.sleep(rest)
        s1 = await admin_shards(http, first, admin)
        shares = cpu.shares()
        dt = time.monotonic() - t0
        routers = {}
        for name, url in edge_urls.items():
            with contextlib.suppress(Exception):
                routers[name] = (await admin_shards(http, url, admin)).get("router", {})
        log("letting the last requests be offered")
        await matching.drain(args.drain_s)
        await matching.close()
        listener.cancel()
        with contextlib.suppress(BaseException):
            await listener

    before = {s["shard_id"]: s for s in s0["shards"]}
    shards = {}
    total = 0.0
    for s in s1["shards"]:
        k = s["shard_id"]
        if not s.get("up"):
            shards[str(k)] = {"up": False}
            continue
        applied = s["counters"].get("applied", 0) - before.get(k, {}).get("counters", {}).get("applied", 0)
        rate = applied / dt
        total += rate
        shards[str(k)] = {
            "host": ip_to_host.get(s.get("node_ip", ""), s.get("node_ip")),
            "updates_per_s": round(rate),
            "drivers": s.get("drivers"),
            "dropped": s.get("dropped", {}),
        }
    host_cpu = {k: v for k, v in shares.items() if k in cluster.hosts}
    figures.update(
        {
            "offered_updates_per_s": args.rate,
            "applied_updates_per_s": round(total),
            "shards": shards,
            "host_cpu": host_cpu,
            "cluster_cpu": round(sum(host_cpu.values()), 3),
            "generator_cpu": shares.get("generator"),
            "bench_cpu": shares.get("bench"),
            # Per edge, since it started: rows by outcome (applied, backpressure, ...),
            # rows still buffered, and the router's submit-to-applied latency.
            "edge_routers": {
                n: {k: r.get(k) for k in ("counters", "buffered_rows", "latency")} for n, r in routers.items()
            },
            "measured_s": round(dt, 1),
        }
    )
    figures.update(matching.figures())
    log(json.dumps({k: figures[k] for k in ("applied_updates_per_s", "host_cpu", "request_to_offer_p50_ms")}))
    log(f"cross-host: {args.pings} pings per shard from a Ray driver on {cluster.edge_hosts[0]}")
    probe = await asyncio.to_thread(
        cluster.run,
        cluster.edge_hosts[0],
        [sys.executable, "-m", "loadtests.bench_cluster", "--ping-probe", str(args.pings)],
        timeout_s=180.0,
    )
    if probe.returncode != 0:
        raise RuntimeError(f"ping probe failed: {probe.stderr[-2000:]}")
    pings = json.loads(probe.stdout.strip().splitlines()[-1])
    figures["cross_host"] = {k: {"host": shards.get(k, {}).get("host"), **v} for k, v in pings.items()}
    return figures


def run(args: argparse.Namespace) -> dict:
    from loadtests.cluster import Cluster

    # One fixed prefix and state dir: a second run while one is up is refused by name, and
    # each run starts the state dir afresh (its logs stay there until the next run).
    cluster = Cluster(
        shard_hosts=args.shard_hosts,
        edge_hosts=args.edge_hosts,
        shard_cpus=args.shard_cpus,
        prefix="dsp-b-",
        state_dir="/tmp/dsp-bench",
    )
    gens: list[subprocess.Popen] = []
    t_boot = time.monotonic()
    with cluster:
        try:
            log(f"cluster up in {time.monotonic() - t_boot:.0f}s; deploying by the operator's commands")
            cluster.deploy()
            log(f"deployed: {len(cluster.edge_hosts)} edges ready after {time.monotonic() - t_boot:.0f}s")
            # Long enough for warm-up, the window, the drain and the probe; stopped after.
            run_s = 60 + args.warmup_s + args.seconds + args.drain_s + 120
            gens = start_generators(cluster, args, run_s)
            figures = asyncio.run(measure(cluster, args, gens))
        finally:
            for g in gens:
                with contextlib.suppress(Exception):
                    g.kill()
                    g.wait(5)
            log("tearing down")
    figures["parameters"] = {k: v for k, v in vars(args).items() if k not in ("json", "record", "ping_probe")}
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m loadtests.bench_cluster", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--rate", type=float, default=50_000, help="location updates/s offered, all edges together"
    )
    p.add_argument("--drivers", type=int, default=50_000, help="fleet size, split over the edges")
    p.add_argument("--batch-rows", type=int, default=1000)
    p.add_argument("--sockets-per-edge", type=int, default=2)
    p.add_argument("--requests-per-min", type=float, default=600)
    p.add_argument("--answer-delay-s", type=float, default=0.5)
    p.add_argument("--seconds", type=float, default=30.0, help="measured window")
    p.add_argument("--warmup-s", type=float, default=5.0)
    p.add_argument("--drain-s", type=float, default=10.0)
    p.add_argument("--pings", type=int, default=200, help="cross-host pings per shard")
    p.add_argument("--shard-hosts", type=int, default=2)
    p.add_argument("--shard-cpus", type=float, default=1)
    p.add_argument("--edge-hosts", type=int, default=2)
    p.add_argument("--json", action="store_true", help="last line: one JSON object")
    p.add_argument("--record", action="store_true", help="write loadtests/results/bench_cluster-<ts>.json")
    p.add_argument("--ping-probe", type=int, default=0, help=argparse.SUPPRESS)  # inside a host
    args = p.parse_args(argv)
    if args.ping_probe:
        print(json.dumps(ping_probe(args.ping_probe)), flush=True)
        return 0
    if os.geteuid() != 0:
        print("the namespace cluster needs root", file=sys.stderr)
        return 2
    figures = run(args)
    if args.record:
        from loadtests.machine import record

        log(f"recorded {record('bench_cluster', figures)}")
    if args.json:
        print(json.dumps(figures), flush=True)
    else:
        for k, v in figures.items():
            print(f"{k:>28}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
