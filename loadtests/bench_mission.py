"""The whole mission at once: 200,000 location updates/s and 10,000 ride requests/min.

    python -m loadtests.bench_mission [--drivers 100000] [--rate 200000] [--requests-per-min 10000]
                                      [--seconds 60] [--json] [--record]

One stack on this machine (``loadtests/stack.py``): embedded Postgres and Redis, local Ray
with the region's shard actors, one edge process on 127.0.0.1. Then, all at once:

- **Locations.** A separate generator process (``--stream-child``, so it shares the cores
  but not the event loop of the rest of the load) opens gateway sockets, brings every
  driver online (``Intent.ONLINE``, vehicle class 0) and streams ``--rate`` positions/s
  of ``--drivers`` drivers in columnar ``batch`` frames. The frames are encoded once
  before the run (each driver has a few positions along its street, played back and
  forth) and only their ``ts`` column is patched before each write, so a frame costs a
  copy and a ``write``. It reports its schedule lag (how far behind its own pacing it
  fell) and its CPU.
- **Riders.** ``POST /v1/rides`` over REST (HttpPool, pooled) on a Poisson schedule at
  ``--requests-per-min``, open loop: latency counts from each request's scheduled time.
- **Drivers answering.** ``--driver-sockets`` of the drivers (a random sample) hold a
  real driver socket (``/v1/ws/driver``): their offers arrive there, and they answer
  there: 85% accept after 2-6 s, 7.5% decline, 7.5% let the offer time out; an accepted
  trip runs to completion over the socket (``arrived``, ``start_trip``,
  ``complete_trip`` after a short simulated pickup and ride) and its receipt (the
  payment) is fetched over REST. 100k sockets do not fit two cores beside everything
  else, so every other driver is heard where its edge would hear it, on the Redis bus
  (the benchmark psubscribes ``dispatch:driver:*``), and answers over REST.
- Latency of a request: scheduled time → its first offer received, on the driver's
  socket for a socketed driver, on the bus otherwise (``socket_*`` and ``bus_*`` give
  each kind alone). A request never offered within ``--drain-s`` of the last one counts
  as infinitely late.

CPU split. The first ``--warmup-s`` seconds carry locations only: the stack's CPU per
update is measured there (``cpu_us_per_update``: shards, edge, Ray, Redis, Postgres;
the generator excluded). In the measured window the stack's CPU beyond that rate of
updates is the rides' (``cpu_ms_per_ride``). ``cpu_s_by_process`` has each group's
seconds in the measured window.

The last line of output is one JSON object. ``--record`` writes it with the machine
(CPU model included) to ``loadtests/results/bench_mission-<stamp>.json``.

Where the CPU goes: the README's mission section keeps the current split per process
and per unit (a ride's statements, calls and publications), with the runs it comes from.
One thing to know when reading ``cpu_us_per_update``: with 100k drivers online most of
the shards' CPU does not depend on the update rate (peer calls for border claims and halo
pushes, housekeeping, Ray's own threads), so the figure is mostly that fixed cost divided
by the rate; run with ``--rate 20000`` beside a full-rate run to separate the two.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import time
import uuid
from collections import Counter

import numpy as np
import psutil

from api import client as proto
from api.gc_policy import GcPolicy
from dispatch.drivers import Intent
from dispatch.fleet import Fleet
from dispatch.region import load_region
from dispatch.shardmap import ShardMap
from loadtests import wsload
from loadtests.bench_match import Demand, HttpPool, StackCpu, _error_code, _http_errors, _pct_ms, _run
from loadtests.machine import CpuLimit, CpuMeter, machine_info, record
from loadtests.stack import LocalStack


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def _cpu_self() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# -- raw WebSocket client side ----------------------------------------------------------------


class TreeCpu(StackCpu):
    """StackCpu over this process and its descendants only (the stack it started: Ray,
    the shards, the edge, Postgres, Redis, the stream): other work on the machine is
    left out of every figure."""

    generator_pids: set[int] = set()

    def _group(self, p: psutil.Process) -> str:  # type: ignore[override]
        return "generator_stream" if p.pid in self.generator_pids else super()._group(p)

    def _sample(self) -> dict[int, tuple[str, float]]:
        me = psutil.Process()
        out = {}
        for p in [me, *me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                out[p.pid] = (self._group(p), t.user + t.system)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return out


class FrameReader(wsload._Reader):
    """Server frames: pings answered with a pong, messages decoded and handed to ``on_msg``."""

    def __init__(self, on_msg) -> None:
        super().__init__(Counter())
        self.on_msg = on_msg

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= 2:
            n, off = self.buf[1] & 0x7F, 2
            if n == 126:
                if len(self.buf) < 4:
                    return
                n, off = int.from_bytes(self.buf[2:4], "big"), 4
            elif n == 127:
                if len(self.buf) < 10:
                    return
                n, off = int.from_bytes(self.buf[2:10], "big"), 10
            if len(self.buf) < off + n:
                return
            opcode = self.buf[0] & 0x0F
            payload = bytes(self.buf[off : off + n])
            del self.buf[: off + n]
            self.frames += 1
            if opcode == 0x9 and self.transport is not None:
                self.transport.write(wsload.frame_header(len(payload), opcode=0xA) + payload)
            elif opcode == 0x8:
                self.closed.set()
            elif opcode in (0x1, 0x2):
                try:
                    msg = proto.decode(payload.decode() if opcode == 0x1 else payload)
                except ValueError:
                    self.errors["undecodable"] += 1
                    continue
                if msg.get("type") == "error":
                    self.errors[msg.get("code", "?")] += 1
                self.on_msg(msg)


async def open_socket(url: str, path: str, token: str, on_msg) -> tuple[asyncio.Transport, FrameReader]:
    transport, first = await wsload.connect(url, path, token, Counter())
    reader = FrameReader(on_msg)
    reader.writer = first.writer
    leftover = bytes(first.buf)
    transport.set_protocol(reader)
    reader.connection_made(transport)
    if leftover:
        reader.data_received(leftover)
    return transport, reader


# -- the location stream (its own process) ----------------------------------------------------


class PreEncoded:
    """Gateway batch frames encoded once; :meth:`frame` patches the ``ts`` column in place."""

    def __init__(self, fleet: Fleet, rows: int, steps: int, step_s: float) -> None:
        self.frames: list[list[tuple[bytearray, int, int]]] = []  # [step][chunk] -> (frame, ts offset, n)
        sentinel = 1234567.890625
        for s in range(steps):
            if s:
                fleet.move(np.arange(fleet.n), s * step_s)
            chunks = []
            for a in range(0, fleet.n, rows):
                idx = np.arange(a, min(a + rows, fleet.n))
                n = len(idx)
                payload = proto.encode(
                    proto.batch_of(
                        driver_id=fleet.ids[idx],
                        lat=fleet.lat[idx],
                        lng=fleet.lng[idx],
                        ts=np.full(n, sentinel),
                    )
                )
                frame = bytearray(wsload.binary_frame(payload))
                off = bytes(frame).find(np.full(n, sentinel).tobytes())
                assert off > 0
                chunks.append((frame, off, n))
            self.frames.append(chunks)
        # Played back and forth, so no driver jumps from its last position to its first.
        self.order = list(range(steps)) + list(range(steps - 2, 0, -1)) or [0]
        self.chunks = len(self.frames[0])

    def frame(self, k: int, ts: float) -> tuple[bytes, int]:
        """The k-th frame of the endless stream, stamped ``ts``: (bytes, rows)."""
        lap, c = divmod(k, self.chunks)
        frame, off, n = self.frames[self.order[lap % len(self.order)]][c]
        np.frombuffer(frame, dtype="<f8", count=n, offset=off)[:] = ts
        return bytes(frame), n


async def stream_child(args) -> dict:
    """Online everyone, print ``ready``, then stream ``--rate`` rows/s for ``--stream-s``."""
    region = load_region(args.region)
    fleet = Fleet(region, ShardMap(region), args.drivers, seed=1)
    token = os.environ["BENCH_GATEWAY_TOKEN"]
    url = args.url
    socks = [
        await open_socket(url, "/v1/ws/gateway", token, lambda m: None) for _ in range(args.gateway_sockets)
    ]
    rows = args.batch_rows
    cpu0 = _cpu_self()
    for a in range(0, fleet.n, rows):
        idx = np.arange(a, min(a + rows, fleet.n))
        n = len(idx)
        msg = proto.batch_of(
            driver_id=fleet.ids[idx],
            lat=fleet.lat[idx],
            lng=fleet.lng[idx],
            ts=np.full(n, time.time()),
            intent=np.full(n, int(Intent.ONLINE), dtype=np.int8),
            vclass=np.zeros(n, dtype=np.int16),
        )
        t, _ = socks[(a // rows) % len(socks)]
        t.write(wsload.binary_frame(proto.encode(msg)))
        while t.get_write_buffer_size() > 1 << 20:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.002)
    pre = PreEncoded(fleet, rows, args.steps, rows * fleet.n / max(args.rate, 1.0) / rows)
    encode_cpu = _cpu_self() - cpu0
    print("ready", flush=True)
    interval = rows / args.rate
    k = sent = 0
    lag_max = 0.0
    lags: list[float] = []
    cpu1 = _cpu_self()
    t0 = time.monotonic()
    next_at = t0
    while True:
        now = time.monotonic()
        if now - t0 >= args.stream_s:
            break
        # Every frame that is due, then sleep to the next one.
        lag = 0.0
        while next_at <= now:
            lag = max(lag, now - next_at)  # how late the oldest frame sent this round is
            frame, n = pre.frame(k, time.time())
            socks[k % len(socks)][0].write(frame)
            k += 1
            sent += n
            next_at += interval
        lags.append(lag)
        lag_max = max(lag_max, lag)
        await asyncio.sleep(max(next_at - time.monotonic(), 0.0))
    elapsed = time.monotonic() - t0
    cpu = _cpu_self() - cpu1
    buffered = sum(t.get_write_buffer_size() for t, _ in socks)
    for t, _ in socks:
        t.close()
    lag_a = np.array(lags) if lags else np.zeros(1)
    return {
        "sent": sent,
        "seconds": round(elapsed, 2),
        "sent_per_s": round(sent / elapsed, 1),
        "lag_p99_ms": round(float(np.percentile(lag_a, 99)) * 1e3, 1),
        "lag_max_ms": round(lag_max * 1e3, 1),
        "write_buffer_at_end_bytes": buffered,
        "cpu_s": round(cpu, 2),
        "cpu_us_per_row": round(cpu / max(sent, 1) * 1e6, 3),
        "encode_cpu_s": round(encode_cpu, 2),
        "errors": dict(sum((r.errors for _, r in socks), Counter())),
    }


# -- the mission --------------------------------------------------------------------------------


async def mission(args, region, smap) -> dict:
    import msgpack
    import redis.asyncio as aioredis

    http_errors = _http_errors()
    demand = Demand.make(region, smap, args.requests_per_min, args.seconds)
    n = len(demand.t)
    stack = LocalStack("bench-mission", region, region_file=args.region, postgres=True)
    log("mission: starting Redis, Postgres, Ray, the shards and one edge process ...")
    t_boot = time.monotonic()
    stack.start()
    log(f"mission: stack up in {time.monotonic() - t_boot:.1f}s (edge pid {stack.edge.pid})")
    stream_s = args.warmup_s + args.seconds + args.drain_s + 10.0
    child = None
    tasks: list[asyncio.Task] = []
    riders = drivers_http = r = ps = None
    sockets: dict[int, tuple[asyncio.Transport, FrameReader]] = {}
    stop = asyncio.Event()
    gc_policy = GcPolicy()
    try:
        child = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "loadtests.bench_mission",
                "--stream-child",
                "--url",
                stack.ws,
                "--drivers",
                str(args.drivers),
                "--rate",
                str(args.rate),
                "--stream-s",
                str(stream_s),
                "--batch-rows",
                str(args.batch_rows),
                "--gateway-sockets",
                str(args.gateway_sockets),
                *(["--region", args.region] if args.region else []),
            ],
            env={**stack.env, "BENCH_GATEWAY_TOKEN": stack.authority.issue("bench-gateway", "gateway", 7200)},
            stdout=subprocess.PIPE,
            text=True,
        )
        line = await asyncio.to_thread(child.stdout.readline)
        if line.strip() != "ready":
            raise RuntimeError(f"location stream did not start: {line!r}; {stack.edge_log_tail()}")
        deadline = time.monotonic() + 120
        while True:
            available = sum(s["available"] for s in await stack.directory.stats())
            if available >= args.drivers * 0.99:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {available} of {args.drivers} drivers online after 120 s")
            await asyncio.sleep(0.2)
        log(f"mission: {available} drivers online; streaming {args.rate:g}/s from pid {child.pid}")

        # -- driver sockets for a sample of the fleet ------------------------------------------------
        run = uuid.uuid4().hex[:6]
        rng = np.random.default_rng(3)
        sample = rng.choice(
            np.arange(1, args.drivers + 1), size=min(args.driver_sockets, args.drivers), replace=False
        )
        first_offer: dict[str, tuple[float, float, bool]] = {}  # ride -> (received, sent_at, on a socket)
        bus_seen: dict[str, float] = {}
        answers: Counter = Counter()
        counts: Counter = Counter()
        receipts: list[float] = []
        calls: dict[int, asyncio.Future] = {}
        ids = proto.CallIds()

        def on_driver_msg(driver_id: int, msg: dict) -> None:
            typ = msg.get("type")
            ref = msg.get("ref")
            if ref is not None and ref in calls:
                fut = calls.pop(ref)
                if not fut.done():
                    fut.set_result(msg)
            if typ == "offer":
                counts["socket_offers"] += 1
                rid = msg["ride_id"]
                if rid not in first_offer:
                    first_offer[rid] = (time.time(), float(msg.get("sent_at", np.nan)), True)
                tasks.append(asyncio.create_task(socket_answer(driver_id, msg)))

        async def socket_call(driver_id: int, msg: dict, kind: str) -> dict | None:
            num, stamped = ids.stamp(msg)
            fut = asyncio.get_running_loop().create_future()
            calls[num] = fut
            sockets[driver_id][0].write(wsload.binary_frame(proto.encode(stamped)))
            try:
                reply = await asyncio.wait_for(fut, 30.0)
            except TimeoutError:
                calls.pop(num, None)
                answers[f"{kind}_timeout"] += 1
                return None
            if reply.get("type") == "error":
                answers[f"{kind}_{reply.get('code')}"] += 1
                return None
            answers[f"{kind}_ok"] += 1
            return reply

        async def socket_answer(driver_id: int, offer: dict) -> None:
            await asyncio.sleep(float(rng.uniform(2, 6)))
            if stop.is_set():
                return
            u = rng.random()
            rid, oid = offer["ride_id"], offer["offer_id"]
            if u < 0.85:
                if await socket_call(
                    driver_id, {"type": "accept", "ride_id": rid, "offer_id": oid}, "accept"
                ):
                    await socket_trip(driver_id, rid)
            elif u < 0.925:
                await socket_call(driver_id, {"type": "decline", "ride_id": rid, "offer_id": oid}, "decline")
            else:
                answers["timeout_left"] += 1

        async def socket_trip(driver_id: int, rid: str) -> None:
            # A short pickup and ride: the trip must end within the run for its payment.
            for step, pause in (
                ("arrived", float(rng.uniform(2, 4))),
                ("start_trip", 1.0),
                ("complete_trip", float(rng.uniform(2, 5))),
            ):
                await asyncio.sleep(pause)
                if stop.is_set():
                    return
                if not await socket_call(driver_id, {"type": step, "ride_id": rid}, step):
                    return
            counts["trips_completed"] += 1
            rider = rider_of.get(rid)
            if rider is None:
                return
            t = time.time()
            try:
                resp = await riders.get(
                    f"/v1/rides/{rid}/receipt", headers={"Authorization": f"Bearer {rider}"}
                )
                answers[f"receipt_{resp.status_code}"] += 1
                receipts.append(time.time() - t)
            except http_errors as exc:
                answers[f"receipt_{type(exc).__name__}"] += 1

        async def connect_one(driver_id: int, sem: asyncio.Semaphore) -> None:
            async with sem:
                tok = stack.authority.issue(f"drv-{driver_id}", "driver", 7200)
                try:
                    sockets[driver_id] = await open_socket(
                        stack.ws, "/v1/ws/driver", tok, lambda m, d=driver_id: on_driver_msg(d, m)
                    )
                except (OSError, ConnectionError, asyncio.IncompleteReadError) as exc:
                    counts[f"socket_connect_{type(exc).__name__}"] += 1

        t_sock = time.monotonic()
        sem = asyncio.Semaphore(50)
        await asyncio.gather(*(connect_one(int(d), sem) for d in sample.tolist()))
        log(f"mission: {len(sockets)} driver sockets in {time.monotonic() - t_sock:.1f}s")

        # -- everyone else: the bus, and REST answers ---------------------------------------------
        riders = HttpPool(stack.url, args.http_concurrency)
        drivers_http = HttpPool(stack.url, args.answer_concurrency)
        r = aioredis.Redis.from_url(stack.redis.url)
        ps = r.pubsub()
        await ps.psubscribe("dispatch:driver:*")
        driver_tokens: dict[int, str] = {}

        async def rest_answer(driver_id: int, offer: dict) -> None:
            await asyncio.sleep(float(rng.uniform(2, 6)))
            if stop.is_set():
                return
            u = rng.random()
            if u >= 0.925:
                answers["timeout_left"] += 1
                return
            kind = "accept" if u < 0.85 else "decline"
            tok = driver_tokens.get(driver_id)
            if tok is None:
                tok = driver_tokens[driver_id] = stack.authority.issue(f"drv-{driver_id}", "driver", 7200)
            try:
                resp = await drivers_http.post(
                    f"/v1/rides/{offer['ride_id']}/{kind}",
                    json={"offer_id": offer["offer_id"]},
                    headers={"Authorization": f"Bearer {tok}"},
                )
            except http_errors as exc:
                answers[f"rest_{kind}_{type(exc).__name__}"] += 1
                return
            code = "" if resp.status_code < 300 else "_" + _error_code(resp)
            answers[f"rest_{kind}_{resp.status_code}{code}"] += 1

        async def listen() -> None:
            while not stop.is_set():
                msg = await ps.get_message(ignore_subscribe_messages=True, timeout=0.1)
                if not msg:
                    continue
                now = time.time()
                body = msgpack.unpackb(msg["data"])
                if body.get("type") != "offer":
                    continue
                counts["bus_offers"] += 1
                rid = body["ride_id"]
                bus_seen.setdefault(rid, now)
                driver_id = int(msg["channel"].decode().rsplit(":", 1)[1])
                if driver_id in sockets and not sockets[driver_id][1].closed.is_set():
                    continue  # its socket hears it and answers
                if rid not in first_offer:
                    first_offer[rid] = (now, float(body.get("sent_at", np.nan)), False)
                tasks.append(asyncio.create_task(rest_answer(driver_id, body)))

        tasks.append(asyncio.create_task(listen()))

        async def heartbeats() -> None:
            # A driver app sends something at least every idle_timeout_s (60 s), or the edge
            # closes its socket (docs/protocol.md): these drivers' positions go through the
            # gateway, so they send heartbeats, each socket every 20 s.
            beat = 0
            order = list(sockets)
            while not stop.is_set():
                for k, driver_id in enumerate(order):
                    transport, reader = sockets[driver_id]
                    if not reader.closed.is_set():
                        beat += 1
                        transport.write(wsload.binary_frame(proto.encode({"type": "heartbeat", "id": beat})))
                    if k % 250 == 249:
                        await asyncio.sleep(1.0)
                    if stop.is_set():
                        return
                counts["sockets_closed"] = sum(1 for _, rd in sockets.values() if rd.closed.is_set())

        tasks.append(asyncio.create_task(heartbeats()))

        # -- warm-up: locations only; the stack's CPU per update ----------------------------------
        await asyncio.sleep(max(args.warmup_s - 5.0, 0.0))
        TreeCpu.generator_pids = {child.pid}
        cpu_w = TreeCpu(stack)
        meter = CpuMeter()
        stats_w = await stack.directory.stats()
        t_w = time.monotonic()
        await asyncio.sleep(min(args.warmup_s, 5.0))
        warm_s = time.monotonic() - t_w
        stats_w1 = await stack.directory.stats()
        warm_groups = cpu_w.seconds_by_group()
        warm_machine = meter.seconds()
        warm_updates = _applied(stats_w, stats_w1)
        warm_stack_cpu = _stack_s(warm_groups)

        # -- the measured window: rides on top --------------------------------------------------------
        rider_tokens = [stack.authority.issue(f"bm-{run}-r{i}", "rider", 7200) for i in range(n)]
        rider_of: dict[str, str] = {}
        bodies = [
            {
                "pickup": {"lat": float(demand.pickup_lat[i]), "lng": float(demand.pickup_lng[i])},
                "dropoff": {"lat": float(demand.drop_lat[i]), "lng": float(demand.drop_lng[i])},
                "vehicle_class": "standard",
                "payment_method": "cash",
            }
            for i in range(n)
        ]
        arrival = np.full(n, np.nan)
        sent_at = np.full(n, np.nan)
        answered_at = np.full(n, np.nan)
        ride_of: list[str | None] = [None] * n
        statuses: Counter = Counter()

        async def request(i: int) -> None:
            def on_send() -> None:
                sent_at[i] = time.time()

            try:
                resp = await riders.post(
                    "/v1/rides",
                    on_send=on_send,
                    json=bodies[i],
                    headers={
                        "Authorization": f"Bearer {rider_tokens[i]}",
                        "Idempotency-Key": f"bm-{run}-{i}",
                    },
                )
            except http_errors as exc:
                statuses[type(exc).__name__] += 1
                return
            answered_at[i] = time.time()
            if resp.status_code == 201:
                statuses["201"] += 1
                rid = resp.json()["ride_id"]
                ride_of[i] = rid
                rider_of[rid] = rider_tokens[i]
            else:
                statuses[f"{resp.status_code}_{_error_code(resp)}"] += 1

        # The edge's collector policy here too: with the sockets, tokens and bodies held,
        # a full collection of this process stopped its riders for ~0.2 s (a request sent
        # late by that much), every 10-40 s.
        gc_policy.install()
        cpu = TreeCpu(stack)
        meter = CpuMeter()
        ops_token = stack.authority.issue("bench-ops", "admin", 7200)
        stats0 = await stack.directory.stats()
        metrics0 = await _edge_metrics(riders, ops_token)
        log(f"mission: requests at {args.requests_per_min:g}/min for {args.seconds:g}s")
        start_wall, start = time.time(), time.monotonic()
        posts: list[asyncio.Task] = []
        req_lag_max = 0.0
        for i in range(n):
            delay = start + demand.t[i] - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                req_lag_max = max(req_lag_max, -delay)
            arrival[i] = start_wall + demand.t[i]
            posts.append(asyncio.create_task(request(i)))
            if i % 2000 == 1999:
                gc_policy.tick()
                log(f"mission: {i + 1} requests, {dict(statuses)}, {len(first_offer)} offered")
        measured_s = time.monotonic() - start
        stats1 = await stack.directory.stats()
        metrics1 = await _edge_metrics(riders, ops_token)
        groups = cpu.seconds_by_group()
        machine_s = meter.seconds()
        drain_until = time.monotonic() + args.drain_s
        while time.monotonic() < drain_until:
            if (
                all(p.done() for p in posts)
                and all(rid in first_offer for rid in ride_of if rid)
                and counts["trips_completed"] >= answers["accept_ok"]
            ):
                break
            await asyncio.sleep(0.1)
        metrics_end = await _edge_metrics(riders, ops_token)
        batched = _batch_counts(metrics_end, "shard_batched_calls", "shard_batched_items")
        ride_writes = _batch_counts(metrics_end, "ride_writes", "ride_write_rows")
        stop.set()
        for p in posts:
            p.cancel()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*posts, *tasks, return_exceptions=True)
        stream = json.loads(
            (await asyncio.to_thread(child.communicate, timeout=stream_s + 60))[0].strip() or "{}"
        )

        # -- figures --------------------------------------------------------------------------------
        lat = np.full(n, np.inf)
        sock_lat: list[float] = []
        bus_lat = np.full(n, np.inf)
        hop: list[float] = []
        for i, rid in enumerate(ride_of):
            if rid is None:
                continue
            if rid in first_offer:
                got, _sent, on_socket = first_offer[rid]
                lat[i] = got - arrival[i]
                if on_socket:
                    sock_lat.append(got - arrival[i])
                    if rid in bus_seen:
                        hop.append(got - bus_seen[rid])
            if rid in bus_seen:
                bus_lat[i] = bus_seen[rid] - arrival[i]
        offered = int(np.isfinite(lat).sum())
        updates = _applied(stats0, stats1)
        stack_s = _stack_s(groups)
        cpu_per_update = warm_stack_cpu / warm_updates if warm_updates else None
        rides_s = stack_s - (cpu_per_update or 0.0) * updates
        post_s = (answered_at - sent_at)[np.isfinite(answered_at)]
        return {
            "drivers": args.drivers,
            "offered_rate": args.rate,
            "updates_per_s": round(updates / measured_s),
            "requests": n,
            "requests_per_min": round(n / measured_s * 60, 1),
            "requests_created": sum(1 for x in ride_of if x),
            "offered_share": round(offered / n, 4) if n else None,
            "p50_ms": _pct_ms(lat, 50),
            "p95_ms": _pct_ms(lat, 95),
            "p99_ms": _pct_ms(lat, 99),
            "socket_offers_p50_ms": _pct_ms(np.array(sock_lat), 50),
            "socket_offers_p95_ms": _pct_ms(np.array(sock_lat), 95),
            "socket_offers_measured": len(sock_lat),
            # p95 of the requests arriving in each 5 s of the window, in order: a stall
            # (a pause somewhere) shows as one bucket, load as a rise across them.
            "p95_ms_by_5s": [
                _pct_ms(lat[(demand.t >= t0) & (demand.t < t0 + 5.0)], 95)
                for t0 in np.arange(0.0, float(args.seconds), 5.0)
            ],
            "bus_p95_ms": _pct_ms(bus_lat, 95),
            "bus_p99_ms": _pct_ms(bus_lat, 99),
            # Requests first offered more than 5 s after they were sent, and of those the
            # ones whose first offer was on the bus within 5 s (an offer the benchmark's
            # driver socket did not receive, heard only when the ride was offered again).
            "late_over_5s": int((lat > 5.0).sum()),
            "late_over_5s_bus_early": int(((lat > 5.0) & (bus_lat <= 5.0)).sum()),
            "bus_to_socket_p50_ms": _pct_ms(np.array(hop), 50),
            "bus_to_socket_p99_ms": _pct_ms(np.array(hop), 99),
            "post_p50_ms": _pct_ms(post_s, 50),
            "post_p99_ms": _pct_ms(post_s, 99),
            "post_status": dict(statuses),
            "driver_answers": dict(sorted(answers.items())),
            "counts": dict(counts),
            "receipt_p50_ms": _pct_ms(np.array(receipts), 50),
            # The edge's ride calls to the shards, batched: {call: [calls, items]} for the run.
            "batched_calls": batched,
            "ride_writes": ride_writes,
            # Location rows in the measured window at each step (edge counters): what the
            # gateway frames carried, refused, rate-limited; the router's outcomes; the
            # shards' refusals by reason. Where offered rows went that were not applied.
            "location_rows": _metrics_delta(metrics0, metrics1),
            # The edge's garbage collections: seconds in the window, the longest since start.
            "edge_gc": {
                "seconds": round(
                    metrics1.get("edge_gc_seconds", {}).get("", 0.0)
                    - metrics0.get("edge_gc_seconds", {}).get("", 0.0),
                    3,
                ),
                "longest_ms": round(metrics1.get("edge_gc_longest_seconds", {}).get("", 0.0) * 1e3, 1),
            },
            # Matching's own cost in the shards: requests searched per ride (a request is
            # searched again each tick until it has an offer) and the ticks' CPU per ride.
            "searches_per_ride": round(_rides_delta(stats0, stats1, "searches") / n, 2) if n else None,
            "tick_cpu_ms_per_ride": round(_rides_delta(stats0, stats1, "tick_cpu_s") / n * 1e3, 2)
            if n
            else None,
            # Gaps between a shard's matching ticks in the window (due every 0.25 s), by
            # bucket upper bound in seconds, summed over the shards: a loop held up shows here.
            "tick_gaps": _tick_gaps(stats0, stats1),
            # Calls among the shards per second, by method (summed over the shards).
            "peer_calls_per_s": _peer_calls_per_s(stats0, stats1, measured_s),
            # Drivers claimed from another shard after crossing a border (all shards).
            "handoffs_per_s": round(_counted(stats0, stats1, "handoff_in") / measured_s, 1),
            # Drivers not held by a shard whose state it keeps for them, at the window's end
            # (summed over the shards): what each shard's adopt_returning looks up.
            "awaited_drivers": sum(s["rides"].get("awaited", 0) for s in stats1),
            "driver_sockets": len(sockets),
            "cpu_us_per_update": round(cpu_per_update * 1e6, 2) if cpu_per_update else None,
            "cpu_ms_per_ride": round(rides_s / n * 1e3, 2) if n else None,
            "warmup": {
                "seconds": round(warm_s, 1),
                "updates_per_s": round(warm_updates / warm_s),
                "stack_cpu_s": round(warm_stack_cpu, 2),
                "machine_cpu_s": round(warm_machine, 2),
                "cpu_s_by_process": warm_groups,
            },
            # Everything on the machine (other work included); the stack's own is stack_cpu_s.
            "machine_cpu_s": round(machine_s, 2),
            "stack_cpu_s": round(stack_s, 2),
            "machine_cpu_share": round(machine_s / measured_s / (os.cpu_count() or 1), 3),
            "cpu_s_by_process": groups,
            "seconds": round(measured_s, 1),
            "generator": {
                "stream": stream,
                "requests_lag_max_ms": round(req_lag_max * 1e3, 1),
                "kept_schedule": bool(
                    req_lag_max < 0.25
                    and stream.get("lag_p99_ms", 1e9) < 250
                    and stream.get("sent_per_s", 0) >= 0.98 * args.rate
                ),
                "main_cpu_s": groups.get("benchmark", 0.0),
                # This process's collections since the policy was installed (its pauses).
                "main_gc": {
                    "collections": list(gc_policy.collections),
                    "longest_ms": round(gc_policy.longest_s * 1e3, 1),
                    "seconds": round(gc_policy.seconds, 3),
                },
                "stream_cpu_s": groups.get("generator_stream", 0.0),
            },
            "cpu_model": machine_info()["cpu_model"],
        }
    finally:
        gc_policy.uninstall()
        stop.set()
        for t in tasks:
            t.cancel()
        for t, _ in sockets.values():
            t.close()
        for pool in (riders, drivers_http):
            if pool is not None:
                await pool.aclose()
        if ps is not None:
            await ps.aclose()
        if r is not None:
            await r.aclose()
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
        stack.stop()


def _stack_s(groups: dict[str, float]) -> float:
    """The stack's CPU seconds: every group but the load generator's two processes."""
    return sum(v for k, v in groups.items() if k not in ("benchmark", "generator_stream"))


async def _edge_metrics(http: HttpPool, admin_token: str) -> dict[str, dict[str, float]]:
    """``{family: {label value: count}}`` of the edge's /metrics counters this benchmark
    reports: batched shard calls and their items, location rows at each step from the
    gateway frames to the shards (accepted, refused, rate-limited, through the router,
    refused by a shard)."""
    reply = await http.get("/metrics", headers={"Authorization": f"Bearer {admin_token}"})
    out: dict[str, dict[str, float]] = {}
    for line in reply.text.splitlines():
        for family in _EDGE_FAMILIES:
            if line.startswith(family + "{") or line.startswith(family + " "):
                label = line.split('="', 1)[1].split('"', 1)[0] if "{" in line else ""
                out.setdefault(family.removeprefix("dispatch_").removesuffix("_total"), {})[label] = float(
                    line.rsplit(" ", 1)[1]
                )
    return out


_EDGE_FAMILIES = (
    "dispatch_shard_batched_calls_total",
    "dispatch_shard_batched_items_total",
    "dispatch_edge_location_updates_total",
    "dispatch_edge_rows_rejected_total",
    "dispatch_edge_rate_limited_total",
    "dispatch_router_rows_total",
    "dispatch_shard_rows_dropped_total",
    "dispatch_edge_gc_seconds_total",
    "dispatch_edge_gc_longest_seconds",
    "dispatch_ride_writes_total",
    "dispatch_ride_write_rows_total",
)


def _batch_counts(metrics: dict, calls: str, items: str) -> dict[str, list[int]]:
    """``{kind: [calls, items]}`` from the edge's pair of batched-call counters."""
    return {
        kind: [int(n), int(metrics.get(items, {}).get(kind, 0))] for kind, n in metrics.get(calls, {}).items()
    }


def _metrics_delta(before: dict, after: dict) -> dict[str, dict[str, int]]:
    return {
        fam: {k: int(v - before.get(fam, {}).get(k, 0.0)) for k, v in sorted(vals.items())}
        for fam, vals in sorted(after.items())
        if not fam.startswith(("shard_batched", "edge_gc", "ride_write"))
    }


def _rides_delta(before: list[dict], after: list[dict], key: str) -> float:
    return sum(b["rides"].get(key, 0) - a["rides"].get(key, 0) for a, b in zip(before, after, strict=True))


def _grown(before: list[dict], after: list[dict], counters) -> Counter:
    """How much each of the shards' counters ``counters(stats)`` grew, summed over the shards."""
    out: Counter = Counter()
    for a, b in zip(before, after, strict=True):
        out.update(counters(b))
        out.subtract(counters(a))
    return out


def _tick_gaps(before: list[dict], after: list[dict]) -> dict[str, int]:
    out = _grown(before, after, lambda s: s["rides"].get("tick_gaps", {}))
    return {k: out[k] for k in sorted(out, key=float) if out[k]}


def _peer_calls_per_s(before: list[dict], after: list[dict], seconds: float) -> dict[str, float]:
    out = _grown(before, after, lambda s: s.get("peer_calls", {}))
    return {k: round(v / seconds, 1) for k, v in sorted(out.items())}


def _counted(before: list[dict], after: list[dict], key: str) -> int:
    """How much the shards' counter ``key`` grew between two rounds of their stats."""
    return sum(
        b["counters"].get(key, 0) - a["counters"].get(key, 0) for a, b in zip(before, after, strict=True)
    )


def _applied(before: list[dict], after: list[dict]) -> int:
    return _counted(before, after, "applied")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--drivers", type=int, default=100_000)
    p.add_argument("--rate", type=float, default=200_000, help="location updates/s offered")
    p.add_argument("--requests-per-min", type=float, default=10_000)
    p.add_argument("--seconds", type=float, default=60.0, help="measured window (requests)")
    p.add_argument("--warmup-s", type=float, default=15.0, help="locations only before the requests")
    # Three of the engine's radius steps ([matching] radius_step_every_s = 10): a request
    # whose first radius holds no free driver is offered at a later step, and a drain of
    # one step counted such late-but-offered requests as never offered.
    p.add_argument("--drain-s", type=float, default=30.0, help="wait for offers after the last request")
    p.add_argument("--driver-sockets", type=int, default=5000, help="drivers with a real socket")
    p.add_argument("--gateway-sockets", type=int, default=2)
    p.add_argument("--batch-rows", type=int, default=2000)
    p.add_argument("--http-concurrency", type=int, default=64)
    p.add_argument("--answer-concurrency", type=int, default=64)
    p.add_argument("--region", default=None)
    p.add_argument(
        "--cpus",
        type=float,
        default=None,
        help="run everything limited to this many cores of CPU time, as on a slower machine (needs root)",
    )
    p.add_argument("--json", action="store_true")
    p.add_argument("--record", action="store_true", help="write loadtests/results/bench_mission-<ts>.json")
    # The location stream's own process.
    p.add_argument("--stream-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--stream-s", type=float, default=60.0, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=6, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.stream_child:
        if not (args.url or "").startswith("ws://127.0.0.1"):
            print("load goes to 127.0.0.1 only", file=sys.stderr)
            return 2
        print(json.dumps(_run(stream_child(args))), flush=True)
        return 0
    region = load_region(args.region)
    limit = CpuLimit(args.cpus) if args.cpus else None
    try:
        figures = _run(mission(args, region, ShardMap(region)))
    finally:
        if limit is not None:
            limited = limit.stats()
            limit.close()
    if limit is not None:
        # Everything ran in a cgroup with this many cores: the share of them its processes
        # used (the machine-wide figure also has kernel work no cgroup is charged for, such
        # as the loopback network's softirqs), and how often the kernel held it back.
        allowed_s = limit.cpus * figures["seconds"]
        used_s = sum(s for group, s in figures["cpu_s_by_process"].items() if group != "other")
        limited["busy_share_of_limit"] = round(used_s / allowed_s, 3)
        figures["cpu_limit"] = limited
    figures["config"] = {
        k: v for k, v in vars(args).items() if k not in ("json", "record", "url", "stream_child")
    }
    if args.record:
        log(f"recorded {record('bench_mission', figures)}")
    print(json.dumps(figures) if args.json else json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
