"""Fault drills under simulated load, judged straight from Postgres, the shards and the stream.

    python -m loadtests.drill --json [--drills shard,redis,postgres] [--record]
    python -m loadtests.drill --cluster --json      # on the namespace cluster (root)

Starts a :class:`loadtests.stack.LocalStack` (embedded Redis and Postgres under their
supervisors, local Ray, the shards, one edge, all on 127.0.0.1), runs a simulated city
against it, and for each drill injects one fault, times the recovery, lets the load run
on for ``--settle-s``, then checks the invariants (loadtests/invariants.py has each one):

- from Postgres: one accepted driver per ride, one active ride per driver
  (``double_assignments``); every ride's status and version those of its last applied
  event; the ledger balances (``ledger_imbalance_cents``), each completed ride charged
  once; no shard record applied twice; every ride the edges acknowledged stored
  (``rides_lost``) and none open past its maximum wait (``rides_stuck``);
- from the shards, by id (each shard's ``live_ids``) against Postgres: every acknowledged
  ride that Postgres has open is live in exactly one shard (``rides_not_live``,
  ``rides_live_twice``), no shard holds a ride Postgres ended (``rides_held_after_end``),
  no driver is available in two shards or offered by two (``drivers_in_two_shards``,
  ``drivers_offered_twice``), no driver Postgres has on a trip is available
  (``trip_drivers_available``). A mismatch counts only if it persists when both are read
  again (the load runs on between the reads); the shards' part is also sampled every
  second from the fault to the end of the settling;
- from the ride-records stream: every record the shards had made is sent, read and
  acknowledged by the edges' consumer, so in Postgres (``records_unapplied``), and no
  outbox overflowed (``records_dropped``).

``<drill>_recovery_s`` runs from the fault's start (for a pause or a restart too, which
``<drill>_fault_s`` times) until every edge is ready, every shard answers, is restored and
publishes, and Postgres has an offer made after the fault.

With ``--cluster`` (root) the drills run on the namespace cluster (loadtests/cluster.py:
two shard hosts, two edge hosts, data host, head), deployed by the operator's commands,
with the simulator's load through both edges (:class:`ClusterFaults`; the shards' live ids
through ``GET /v1/admin/shards/live``): ``shard_process``, ``shard_host``, ``partition``
(link cut ``--pause-s``, then healed; recovery is looked for while the cut lasts, since
the cut-off shards restart on the other host; also ``partition_stale_actors``), ``edge``
(kill -9; ``edge_recovery_s`` is ``edge_clients_back_s``), ``redis``, ``postgres`` (also the
status and Retry-After a new ride got meanwhile), ``head``.

Local drills: ``shard`` kills a shard's process (Ray restarts it), ``redis`` pauses Redis with
SIGSTOP for ``--pause-s``, ``postgres`` kills the postmaster with SIGKILL. Each drill is a
function of a :class:`Faults` object (its kill and pause hooks, shard stats and live ids)
and the stack's URLs, so a multi-host cluster supplies its own ``Faults`` and reuses the
drills and the checks.

The last line on stdout (with ``--json``) is one JSON object of figures per drill:
``<drill>_recovery_s``, ``_fault_s``, ``_location_gap_s``, ``_rides_acknowledged`` and
every invariant above, each 0 when it holds (the exit status is 1 otherwise). Everything
it started is torn down at the end, also on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from api.client import run as run_loop
from loadtests.cluster import REDIS_PORT
from loadtests.invariants import (
    LIVE_FIGURES,
    Held,
    LiveSampler,
    check_invariants,
    check_live,
    check_records,
    last_event_id,
    offered_since,
    records_baseline,
    trips_of,
    where,
)

RESULTS = Path(__file__).parent / "results"


def say(msg: str) -> None:
    print(f"[drill {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- the stack's fault hooks --------------------------------------------------------------------


class Faults(Protocol):
    """What a drill may do to a stack. A cluster implements the same hooks per host."""

    edge_url: str
    database_url: str
    redis_url: str
    shard_count: int

    def kill_shard(self, shard_id: int) -> None: ...
    def pause_redis(self) -> None: ...
    def resume_redis(self) -> None: ...
    def kill_postgres(self) -> None: ...
    async def shard_stats(self) -> list[dict]: ...

    async def live_ids(self) -> list[Held | None]:
        """Every shard's live ids (``ShardActor.live_ids``), None for one that does not answer."""
        ...


@dataclass
class LocalFaults:
    """:class:`Faults` of a :class:`loadtests.stack.LocalStack` (one machine)."""

    stack: Any
    _client: Any = None

    @property
    def edge_url(self) -> str:
        return self.stack.url

    @property
    def database_url(self) -> str:
        return self.stack.pg.url

    @property
    def redis_url(self) -> str:
        return self.stack.redis.url

    @property
    def shard_count(self) -> int:
        return self.stack.region.shard_count

    def kill_shard(self, shard_id: int) -> None:
        import ray

        ray.kill(self.stack.directory.handle(shard_id), no_restart=False)
        self.stack.directory.forget(shard_id)

    def pause_redis(self) -> None:
        os.kill(self.stack.redis.process.pid, signal.SIGSTOP)

    def resume_redis(self) -> None:
        os.kill(self.stack.redis.process.pid, signal.SIGCONT)

    def kill_postgres(self) -> None:
        os.kill(self.stack.pg.process.pid, signal.SIGKILL)

    async def shard_stats(self) -> list[dict]:
        out = []
        for k in range(self.shard_count):
            try:
                handle = self.stack.directory.handle(k)
                s = await asyncio.wait_for(handle.stats.remote(), 3.0)
                out.append(s)
            except Exception:
                self.stack.directory.forget(k)
                out.append({})
        return out

    async def live_ids(self) -> list[Held | None]:
        from actors.client import ShardClient

        if self._client is None:
            self._client = ShardClient(self.stack.region.name, self.shard_count, self.stack.namespace)
        client = self._client
        answers = await asyncio.gather(
            *(client.live_ids(k) for k in range(self.shard_count)), return_exceptions=True
        )
        return [None if isinstance(a, BaseException) else Held.of(a) for a in answers]


class ClusterFaults:
    """:class:`Faults` of a :class:`loadtests.cluster.Cluster` (namespaces as hosts), plus
    the host-level hooks the cluster drills use. Shard stats come from the edges' admin
    endpoint (this process is no Ray driver: it runs in the root namespace)."""

    def __init__(self, cluster: Any, jwt_secret: str) -> None:
        from api.client import mint_token

        self.cluster = cluster
        self.admin_token = mint_token(jwt_secret, "drill-admin", "admin", 24 * 3600)
        self.rider_token = mint_token(jwt_secret, "r-drill-probe", "rider", 24 * 3600)

    @property
    def edge_urls(self) -> list[str]:
        return [self.cluster.edge_url(n) for n in self.cluster.edge_hosts]

    @property
    def edge_url(self) -> str:
        return self.edge_urls[0]

    @property
    def database_url(self) -> str:
        return self.cluster.database_url

    @property
    def redis_url(self) -> str:
        return self.cluster.redis_url

    @property
    def shard_count(self) -> int:
        from dispatch.region import load_region

        return load_region(None).shard_count

    async def _admin_shards(self, path: str) -> list[dict] | None:
        """The ``shards`` of an admin answer from the first edge that gives one, or None."""
        import httpx

        async with httpx.AsyncClient(timeout=8.0) as http:
            for url in self.edge_urls:
                try:
                    r = await http.get(
                        f"{url}{path}", headers={"Authorization": f"Bearer {self.admin_token}"}
                    )
                except httpx.HTTPError:
                    continue
                if r.status_code == 200:
                    return r.json()["shards"]
        return None

    async def shard_stats(self) -> list[dict]:
        """Every shard's stats (``{}`` for one that does not answer), from the first edge
        that answers."""
        shards = await self._admin_shards("/v1/admin/shards")
        if shards is None:
            return [{} for _ in range(self.shard_count)]
        return [sh if sh.get("up") else {} for sh in shards]

    async def live_ids(self) -> list[Held | None]:
        """Every shard's live ids (``GET /v1/admin/shards/live`` of the first edge that answers)."""
        shards = await self._admin_shards("/v1/admin/shards/live")
        if shards is None:
            return [None] * self.shard_count
        return [Held.of(sh) if sh.get("up") else None for sh in shards]

    def host_of_ip(self, ip: str) -> str:
        return next(h.name for h in self.cluster.hosts.values() if h.ip == ip)

    def kill_shard(self, shard_id: int) -> None:
        raise NotImplementedError("use kill_shard_pid: the pid comes from the shard's stats")

    def pause_redis(self) -> None:
        os.kill(self._data_proc("redis").pid, signal.SIGSTOP)

    def resume_redis(self) -> None:
        os.kill(self._data_proc("redis").pid, signal.SIGCONT)

    def kill_postgres(self) -> None:
        # Every postgres process, not only the postmaster: backends outliving it would
        # keep the shared memory and refuse the new server.
        import psutil

        for pid in self.cluster.pids("data"):
            try:
                if psutil.Process(pid).name().startswith("postgres"):
                    os.kill(pid, signal.SIGKILL)
            except (psutil.NoSuchProcess, ProcessLookupError):
                pass

    def start_postgres(self) -> None:
        # The killed postmaster was our child: until reaped it is a zombie whose pid, named
        # in postmaster.pid, makes the new server refuse to start ("lock file ... exists").
        self.cluster._reap("data")
        self.cluster._start_postgres(120.0)

    def _data_proc(self, what: str):
        for proc in self.cluster.procs.get("data", []):
            argv = proc.args if isinstance(proc.args, list) else [proc.args]
            name = " ".join(map(str, argv))
            if what == "redis" and "redis-server" in name and f"--port {REDIS_PORT}" in name:
                return proc
        raise RuntimeError(f"no {what} process on the data host")

    def shard_actor_pids(self) -> dict[str, list[int]]:
        """Pids of shard actor processes (``ray::ShardActor``) per shard host."""
        import psutil

        out: dict[str, list[int]] = {}
        for host in self.cluster.shard_hosts:
            pids = []
            for pid in self.cluster.pids(host):
                try:
                    p = psutil.Process(pid)
                    title = " ".join(p.cmdline()[:1]) or p.name()
                    if "ShardActor" in title and p.status() != psutil.STATUS_ZOMBIE:
                        pids.append(pid)
                except psutil.NoSuchProcess:
                    pass
            out[host] = pids
        return out

    def raylet_alive(self, host: str) -> bool:
        import psutil

        for pid in self.cluster.pids(host):
            try:
                if psutil.Process(pid).name() == "raylet":
                    return True
            except psutil.NoSuchProcess:
                pass
        return False

    def restart_host(self, host: str) -> None:
        """Kill what is left of ``host`` and start its services again."""
        self.cluster.kill_host(host)
        self.cluster.start_host(host)
        if self.cluster.hosts[host].role == "edge":
            self.cluster.start_edge(host)
            self.cluster.wait_edge_ready(host)


# -- the load ---------------------------------------------------------------------------------


@dataclass
class Load:
    """A running simulation: ``acknowledged()`` are the ride ids the edges answered with."""

    task: asyncio.Task
    stop: asyncio.Event
    acknowledged: Callable[[], set[str]]
    transport: Any = None


def start_load(urls: str | list[str], jwt_secret: str, drivers: int, requests_per_min: float) -> Load:
    """The simulated city (the client library, failing over between ``urls``) until
    stopped. The one place that knows the simulator's entry points."""
    from api.simulate import EdgeTransport, drive
    from dispatch.city import City
    from dispatch.region import load_region
    from dispatch.shardmap import ShardMap

    region = load_region(None)
    city = City(region, ShardMap(region), drivers, requests_per_min, seed=7, first_driver_id=9_000_000)
    transport = EdgeTransport(
        urls, jwt_secret, city.fleet.ids, city.summary, positions="gateway", log=lambda m: say(f"sim: {m}")
    )
    stop = asyncio.Event()
    task = asyncio.get_running_loop().create_task(
        drive(city, transport, None, on_summary=lambda s: say(s.line()), every_s=15.0, stop=stop)
    )
    return Load(task, stop, lambda: set(transport._rider_of), transport)


# -- waiting and checking ---------------------------------------------------------------------


async def _readyz(url: str) -> tuple[int, dict]:
    def get() -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=3) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")
        except Exception as exc:
            return 0, {"error": repr(exc)}

    return await asyncio.to_thread(get)


async def wait_until(
    check: Callable[[], Awaitable[bool]], timeout_s: float, every_s: float = 0.25
) -> float | None:
    """Seconds until ``check()`` held, or None if it did not within ``timeout_s``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        try:
            if await check():
                return round(time.monotonic() - t0, 2)
        except Exception:
            pass
        await asyncio.sleep(every_s)
    return None


async def recovered(faults: Faults, after_event_id: int = 0, since_wall: float | None = None) -> bool:
    """Every edge is ready, every shard answers, is restored and publishes, and (with
    ``since_wall``) offers flow: Postgres has an offer made after ``since_wall`` (stored
    after trip event ``after_event_id``)."""
    for url in getattr(faults, "edge_urls", [faults.edge_url]):
        status, _ = await _readyz(url)
        if status != 200:
            return False
    stats = await faults.shard_stats()
    if not all(
        s and not s["rides"]["needs_restore"] and s["events"].get("bus", {}).get("ok", True) for s in stats
    ):
        return False
    return since_wall is None or await offered_since(faults.database_url, after_event_id, since_wall)


# -- the drills -----------------------------------------------------------------------------


@dataclass
class DrillContext:
    faults: Faults
    load: Load
    settle_s: float
    pause_s: float
    recover_timeout_s: float
    max_wait_s: float
    drivers: int = 0
    figures: dict[str, Any] = field(default_factory=dict)


async def _run_drill(
    name: str,
    ctx: DrillContext,
    inject: Callable[[], Awaitable[None]],
    fault_seen: Callable[[], Awaitable[bool]] | None = None,
    *,
    recovers_during_fault: bool = False,
) -> None:
    """Inject, time the recovery, let the load run on for ``settle_s``, then check every
    invariant (loadtests/invariants.py).

    ``<name>_recovery_s`` runs from the fault's start until :func:`recovered` holds (every
    shard answering, offers made after the fault in Postgres), looked for once
    ``fault_seen`` held (a fault that takes effect asynchronously) and ``inject`` returned;
    with ``recovers_during_fault`` (a partition, whose shards restart elsewhere while the
    cut lasts) already while it runs. ``<name>_fault_s`` is how long ``inject`` held the
    fault (a pause, or a restart). The shards' live ids are sampled from the fault to the
    end of the settling (:class:`LiveSampler`)."""
    before = ctx.load.acknowledged()
    first_event = await last_event_id(ctx.faults.database_url)
    first_stats = await ctx.faults.shard_stats()
    held = [s.get("drivers", 0) for s in first_stats]
    baseline = records_baseline(first_stats)
    live = LiveSampler(ctx.faults.live_ids)
    live.start()
    t_fault = time.monotonic()
    wall_fault = time.time()
    last_short = [t_fault]
    sampling = asyncio.Event()

    async def sample() -> None:
        # Location gap: until every shard holds at least half the drivers it held before
        # the fault (positions are soft state; they refill with each driver's next report).
        while not sampling.is_set():
            try:
                now = await ctx.faults.shard_stats()
                if any(not st or st.get("drivers", 0) < h / 2 for st, h in zip(now, held, strict=False)):
                    last_short[0] = time.monotonic()
            except Exception:
                last_short[0] = time.monotonic()
            await asyncio.sleep(0.5)

    async def watch() -> float | None:
        if fault_seen is not None and await wait_until(fault_seen, ctx.recover_timeout_s) is None:
            say(f"{name}: the fault never showed")
        ok = await wait_until(lambda: recovered(ctx.faults, first_event, wall_fault), ctx.recover_timeout_s)
        return None if ok is None else time.monotonic()

    sampler = asyncio.get_running_loop().create_task(sample())
    say(f"{name}: injecting")
    if recovers_during_fault:
        watcher = asyncio.get_running_loop().create_task(watch())
        await inject()
        t_injected = time.monotonic()
        at = await watcher
    else:
        await inject()
        t_injected = time.monotonic()
        at = await watch()
    took = None if at is None else round(at - t_fault, 2)
    say(f"{name}: recovered {took}s after the fault" if took is not None else f"{name}: NOT recovered")
    await asyncio.sleep(ctx.settle_s)  # the load runs on through the recovery's aftermath
    sampling.set()
    await sampler
    sampled = await live.stop()
    ctx.figures[f"{name}_fault_s"] = round(t_injected - t_fault, 2)
    ctx.figures[f"{name}_location_gap_s"] = round(last_short[0] - t_fault, 2)
    made = ctx.load.acknowledged() - before
    acknowledged = ctx.load.acknowledged()
    inv = await check_invariants(ctx.faults.database_url, acknowledged, ctx.max_wait_s, first_event)
    found = await check_live(ctx.faults.live_ids, ctx.faults.database_url, acknowledged)
    records = await check_records(ctx.faults.shard_stats, ctx.faults.redis_url, baseline)
    ctx.figures[f"{name}_recovery_s"] = took if took is not None else -1
    ctx.figures[f"{name}_rides_acknowledged"] = len(made)
    for key, value in inv.items():
        ctx.figures[f"{name}_{key}"] = value
    breaches: set = set()
    for key in LIVE_FIGURES:
        ids = found[key] | sampled.get(key, set())
        ctx.figures[f"{name}_{key}"] = len(ids)
        if ids:
            say(f"{name}: {key}: {sorted(map(str, ids))[:10]}")
            breaches |= set(sorted(ids, key=str)[:10])
    if found["trip_drivers_available"] | sampled.get("trip_drivers_available", set()):
        trips = await trips_of(ctx.faults.database_url, found["trip_drivers_available"])
        say(f"{name}: their trips in Postgres: {trips}")
        breaches |= set(trips.values())
    if live.seen_at:
        say(f"{name}: held where, during the fault: {json.dumps(live.seen_at)}")
    if breaches:  # where each is now, for the report
        say(f"{name}: held where: {json.dumps(where(await ctx.faults.live_ids(), breaches))}")
    for key, value in records.items():
        ctx.figures[f"{name}_{key}"] = value
    mine = {k: v for k, v in ctx.figures.items() if k.startswith(name)}
    say(f"{name}: {live.samples} live samples; {json.dumps(mine)}")


async def drill_shard(ctx: DrillContext) -> None:
    """kill -9 of one shard's process; Ray restarts it and an edge restores it."""

    uptime = (await ctx.faults.shard_stats())[0].get("uptime_s", 0.0)

    async def inject() -> None:
        ctx.faults.kill_shard(0)

    async def restarted() -> bool:  # the kill is asynchronous: wait for the new process
        s = (await ctx.faults.shard_stats())[0]
        return bool(s) and s["uptime_s"] < uptime

    await _run_drill("shard", ctx, inject, restarted)


async def drill_redis(ctx: DrillContext) -> None:
    """Redis paused (SIGSTOP) for ``pause_s``, then resumed."""

    async def inject() -> None:
        ctx.faults.pause_redis()
        try:
            await asyncio.sleep(ctx.pause_s)
        finally:
            ctx.faults.resume_redis()

    await _run_drill("redis", ctx, inject)


async def drill_postgres(ctx: DrillContext) -> None:
    """kill -9 of the postmaster; its supervisor restarts it."""

    async def inject() -> None:
        ctx.faults.kill_postgres()

    await _run_drill("postgres", ctx, inject)


# -- drills on the namespace cluster (ClusterFaults) -------------------------------------------


async def _shard(ctx: DrillContext, shard_id: int) -> dict:
    return (await ctx.faults.shard_stats())[shard_id]


async def drill_shard_process(ctx: DrillContext) -> None:
    """kill -9 of shard 0's actor process on its host; Ray restarts it in place."""
    before = await _shard(ctx, 0)

    async def inject() -> None:
        os.kill(before["pid"], signal.SIGKILL)

    async def restarted() -> bool:
        s = await _shard(ctx, 0)
        return bool(s) and s["incarnation"] != before["incarnation"]

    await _run_drill("shard_process", ctx, inject, restarted)


async def drill_shard_host(ctx: DrillContext) -> None:
    """Every process of shard 0's host killed; its shards restart on the other shard
    hosts and their open rides come back from Postgres. The host is started again after."""
    faults: ClusterFaults = ctx.faults  # type: ignore[assignment]
    before = await _shard(ctx, 0)
    victim = faults.host_of_ip(before["node_ip"])

    async def inject() -> None:
        faults.cluster.kill_host(victim)

    async def moved() -> bool:
        s = await _shard(ctx, 0)
        return bool(s) and s["node_ip"] != before["node_ip"]

    await _run_drill("shard_host", ctx, inject, moved)
    await asyncio.to_thread(faults.cluster.start_host, victim)


async def drill_partition(ctx: DrillContext) -> None:
    """Shard 0's host cut off (link down) for ``pause_s``, then healed. Its shards restart
    on the other shard host while the cut lasts, so ``partition_recovery_s`` runs from the
    cut to shard 0 answering on its new host with offers flowing, during the cut. Checked
    as well: never two live shard actor processes for one shard once healed (the cut
    host's are killed when its node learns it was declared dead,
    ``partition_stale_actors``); and, by id, from the cut to the end (the shards' live ids
    every second, :class:`LiveSampler`): no driver available in two shards
    (``partition_drivers_in_two_shards``), none offered by two, no ride held twice."""
    faults: ClusterFaults = ctx.faults  # type: ignore[assignment]
    before = await _shard(ctx, 0)
    victim = faults.host_of_ip(before["node_ip"])

    async def inject() -> None:
        faults.cluster.cut(victim)
        try:
            await asyncio.sleep(ctx.pause_s)
        finally:
            faults.cluster.heal(victim)

    async def moved() -> bool:
        s = await _shard(ctx, 0)
        return bool(s) and s["incarnation"] != before["incarnation"]

    await _run_drill("partition", ctx, inject, moved, recovers_during_fault=True)

    async def one_each() -> bool:
        return sum(len(p) for p in faults.shard_actor_pids().values()) <= ctx.faults.shard_count

    await wait_until(one_each, 30.0, 0.5)
    live = sum(len(p) for p in faults.shard_actor_pids().values())
    ctx.figures["partition_stale_actors"] = max(0, live - ctx.faults.shard_count)
    if not faults.raylet_alive(victim):
        say(f"partition: {victim}'s Ray node left the cluster when cut off; starting it again")
        await asyncio.to_thread(faults.restart_host, victim)
        # A starting node's agents take seconds of CPU: the next drill's fault should not
        # be measured on top of this one's aftermath.
        await asyncio.sleep(ctx.settle_s)


async def drill_edge(ctx: DrillContext) -> None:
    """kill -9 of the first edge; the clients on it (the simulator spreads its sockets over
    both edges: about half, ``edge_clients_moved``) move to another edge.
    ``edge_recovery_s`` is until every socket is connected to a live edge again; the edge
    is started again after."""
    faults: ClusterFaults = ctx.faults  # type: ignore[assignment]
    host = faults.cluster.edge_hosts[0]
    proc = next(p for p in faults.cluster.procs[host] if "edge" in " ".join(map(str, p.args)))
    transport = ctx.load.transport
    sockets = [*transport.links.values(), *transport.gateways]

    async def inject() -> None:
        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait)

    reconnects_before = sum(c.reconnects for c in sockets)
    t0 = time.monotonic()
    await inject()

    dead = faults.cluster.edge_url(host)
    shares = {"p50": 0.5, "p90": 0.9, "p99": 0.99}
    marks: dict[str, float] = {}

    # Only the sockets not back yet are looked at again: the poll shares the simulator's
    # loop with the reconnects it measures.
    def not_back(c) -> bool:
        return not (c.connected and c.url != dead)

    away = [c for c in sockets if not_back(c)]
    ctx.figures["edge_clients_moved"] = len(away)

    async def back() -> bool:
        away[:] = [c for c in away if not_back(c)]
        n = len(sockets) - len(away)
        for name, share in shares.items():
            if name not in marks and n >= share * len(sockets):
                marks[name] = round(time.monotonic() - t0, 2)
        return not away

    took = await wait_until(back, ctx.recover_timeout_s, 0.05)
    ctx.figures["edge_clients_back_s"] = round(time.monotonic() - t0, 2) if took is not None else -1
    for name in shares:  # how the sockets came back: half, nine in ten, all but one in a hundred
        ctx.figures[f"edge_clients_back_{name}_s"] = marks.get(name, -1)
    # Reconnects it took (one each for the moved sockets, more if a socket's first new
    # edge did not take it or dropped it again).
    ctx.figures["edge_clients_reconnects"] = sum(c.reconnects for c in sockets) - reconnects_before
    say(
        f"edge: {len(sockets)} clients on live edges in {ctx.figures['edge_clients_back_s']}s,"
        f" {ctx.figures['edge_clients_moved']} of them moved from the dead one"
        f" (half in {marks.get('p50')}s, 90% in {marks.get('p90')}s)"
    )
    faults.cluster.procs[host].remove(proc)
    faults.cluster.start_edge(host)
    await asyncio.to_thread(faults.cluster.wait_edge_ready, host)

    async def nothing() -> None:
        return None

    await _run_drill("edge", ctx, nothing)
    ctx.figures["edge_recovery_s"] = ctx.figures["edge_clients_back_s"]


async def drill_postgres_down(ctx: DrillContext) -> None:
    """Every Postgres process killed; ``pause_s`` later the server is started again. A
    new ride meanwhile must get 503 with Retry-After (``postgres_new_ride_status``,
    ``postgres_retry_after``)."""
    import httpx

    faults: ClusterFaults = ctx.faults  # type: ignore[assignment]

    async def inject() -> None:
        faults.kill_postgres()
        await asyncio.sleep(2.0)
        body = {"pickup": {"lat": 37.77, "lng": -122.42}, "dropoff": {"lat": 37.78, "lng": -122.41}}
        async with httpx.AsyncClient(timeout=10.0) as http:
            try:
                r = await http.post(
                    f"{faults.edge_url}/v1/rides",
                    json=body,
                    headers={"Authorization": f"Bearer {faults.rider_token}", "Idempotency-Key": "drill-pg"},
                )
                ctx.figures["postgres_new_ride_status"] = r.status_code
                ctx.figures["postgres_retry_after"] = r.headers.get("retry-after")
            except httpx.HTTPError as exc:
                ctx.figures["postgres_new_ride_status"] = repr(exc)
        await asyncio.sleep(max(0.0, ctx.pause_s - 2.0))
        await asyncio.to_thread(faults.start_postgres)

    await _run_drill("postgres", ctx, inject)


async def drill_head(ctx: DrillContext) -> None:
    """The Ray head killed (every process of its host) and started again; its GCS reads
    its tables back from the data host's Redis. Recovery counts from the kill."""
    faults: ClusterFaults = ctx.faults  # type: ignore[assignment]

    async def inject() -> None:
        faults.cluster.kill_host("head")
        await asyncio.to_thread(faults.cluster.start_host, "head")

    await _run_drill("head", ctx, inject)


# The cluster drills' load: enough rides that each drill sees a few dozen of every kind of
# change (requests, offers, accepts, handoffs, completions) while its fault lasts, on the
# namespace cluster's two cores shared with the simulator. Trips take minutes, so the fleet
# must outlast the run: at 400 requests/min over the ~4 minutes of the seven drills about
# 1,500 rides are requested, most of them accepted and many still on their trips at the end.
CLUSTER_DRIVERS = 3000
CLUSTER_REQUESTS_PER_MIN = 400.0

CLUSTER_DRILLS: dict[str, Callable[[DrillContext], Awaitable[None]]] = {
    "shard_process": drill_shard_process,
    "shard_host": drill_shard_host,
    "partition": drill_partition,
    "edge": drill_edge,
    "redis": lambda ctx: drill_redis(ctx),
    "postgres": drill_postgres_down,
    "head": drill_head,
}


DRILLS: dict[str, Callable[[DrillContext], Awaitable[None]]] = {
    "shard": drill_shard,
    "redis": drill_redis,
    "postgres": drill_postgres,
}


async def run_drills(faults: Faults, jwt_secret: str, args: argparse.Namespace) -> dict[str, Any]:
    from dispatch.region import load_region
    from dispatch.rides import MatchingConfig

    region = load_region(None)
    max_wait_s = MatchingConfig.from_section(region.section("matching")).max_wait_s
    load = start_load(
        getattr(faults, "edge_urls", [faults.edge_url]), jwt_secret, args.drivers, args.requests_per_min
    )
    ctx = DrillContext(
        faults, load, args.settle_s, args.pause_s, args.recover_timeout_s, max_wait_s, args.drivers
    )
    drills = CLUSTER_DRILLS if args.cluster else DRILLS
    try:
        say(f"warming up for {args.warmup_s:.0f}s")
        await asyncio.sleep(args.warmup_s)
        for name in args.drills.split(","):
            await drills[name.strip()](ctx)
            if load.task.done():
                say(f"the simulation ended early: {load.task.exception()!r}")
                break
    finally:
        load.stop.set()
        try:
            await asyncio.wait_for(load.task, 60)
        except Exception as exc:
            say(f"simulation stop: {exc!r}")
    return ctx.figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true", help="print the figures as one JSON line last")
    p.add_argument("--record", action="store_true", help="also write them to loadtests/results/")
    p.add_argument("--drills", default="shard,redis,postgres")
    p.add_argument("--drivers", type=int, default=500)
    p.add_argument("--requests-per-min", type=float, default=200)
    p.add_argument("--warmup-s", type=float, default=30)
    p.add_argument("--settle-s", type=float, default=20)
    p.add_argument("--pause-s", type=float, default=10)
    p.add_argument("--recover-timeout-s", type=float, default=120)
    p.add_argument(
        "--cluster",
        action="store_true",
        help="on the namespace cluster (loadtests/cluster.py; root): drills "
        + ",".join(CLUSTER_DRILLS)
        + f"; defaults become {CLUSTER_DRIVERS} drivers, {CLUSTER_REQUESTS_PER_MIN:g} requests/min,"
        " 15 s faults",
    )
    args = p.parse_args(argv)
    known = CLUSTER_DRILLS if args.cluster else DRILLS
    if args.cluster:
        given = set(argv if argv is not None else sys.argv[1:])
        defaults = {
            "--drills": ("drills", ",".join(CLUSTER_DRILLS)),
            "--drivers": ("drivers", CLUSTER_DRIVERS),
            "--requests-per-min": ("requests_per_min", CLUSTER_REQUESTS_PER_MIN),
            "--warmup-s": ("warmup_s", 15.0),
            "--settle-s": ("settle_s", 8.0),
            "--pause-s": ("pause_s", 15.0),
            "--recover-timeout-s": ("recover_timeout_s", 90.0),
        }
        for flag, (dest, value) in defaults.items():
            if not any(g == flag or g.startswith(flag + "=") for g in given):
                setattr(args, dest, value)
    for name in args.drills.split(","):
        if name.strip() not in known:
            p.error(f"unknown drill {name!r} (known: {', '.join(known)})")

    figures: dict[str, Any] = {}
    if args.cluster:
        from loadtests.cluster import Cluster

        cluster = Cluster(
            shard_hosts=2, edge_hosts=2, shard_cpus=2, prefix="dsp-d-", state_dir="/tmp/dsp-drill"
        )
        with cluster:
            say("cluster up; deploying by the operator's commands")
            cluster.deploy()
            figures = run_loop(
                run_drills(ClusterFaults(cluster, cluster.jwt_secret), cluster.jwt_secret, args)
            )
            say("tearing down")
    else:
        from dispatch.region import load_region
        from loadtests.stack import LocalStack

        stack = LocalStack("drill", load_region(None), postgres=True)
        try:
            say("starting the local stack")
            stack.start()
            stack.redis.supervise()
            stack.pg.supervise()
            figures = run_loop(run_drills(LocalFaults(stack), stack.secret, args))
        finally:
            say("tearing down")
            stack.stop()
    figures["drills"] = args.drills
    figures["at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if args.record:
        from loadtests.machine import record

        say(f"recorded {record('drill', figures)} (with the machine and its CPU model)")
    if args.json:
        print(json.dumps(figures))
    bad = [k for k, v in figures.items() if isinstance(v, int) and v and _must_be_zero(k)]
    return 1 if bad else 0


def _must_be_zero(key: str) -> bool:
    return key.rpartition("_")[0] != "" and not key.endswith(_NOT_BREACHES)


# Figures that are counts or times, not breaches.
_NOT_BREACHES = (
    "_acknowledged",
    "_moved",
    "_reconnects",
    "_recovery_s",
    "_fault_s",
    "_gap_s",
    "_back_s",
    "_status",
    "_retry_after",
)


if __name__ == "__main__":
    sys.exit(main())
