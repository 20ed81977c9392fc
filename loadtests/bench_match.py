"""Matching benchmark: request-to-offer latency at city load, and match quality by policy.

    python -m loadtests.bench_match [--drivers 100000] [--requests-per-min 10000] [--seconds 60] [--json]

Three parts, in one run (the last line of output is one JSON object with ``--json``;
figures are recorded under loadtests/results/ with the machine they ran on):

1. **end to end** (``p50_ms``/``p95_ms``/``p99_ms``). The benchmark starts the whole stack
   on this machine: embedded Redis and Postgres, local Ray with the region's shard actors,
   and one edge process (``python -m api.cli edge``) that migrates Postgres on start.

   - Drivers: ``--drivers`` go online (``Intent.ONLINE``) through the edge's gateway socket
     (``/v1/ws/gateway``, columnar msgpack ``batch`` frames), then stream positions from
     the moving :class:`~dispatch.fleet.Fleet` at ``--location-rate`` updates/s through
     the same socket, for the whole run.
   - Riders: ``POST /v1/rides`` (:class:`HttpPool`, pooled keep-alive connections, at
     most ``--http-concurrency`` in flight, one rider id and one ``Idempotency-Key``
     per request, so the per-principal REST limit never applies) at
     ``--requests-per-min`` for ``--seconds``, open loop: each request has its arrival
     time from the demand's Poisson schedule, and latency is counted from that time, so a
     request that waits for a free connection pays for it (``send_lag_*`` says how long
     they waited).
   - Offers: the benchmark psubscribes to ``dispatch:driver:*`` on Redis, as an edge does
     for its drivers' channels, and takes the first offer of each ride. Latency runs from
     the POST's arrival time to that offer arriving, keyed by the ``ride_id`` of the 201
     (an offer that comes before the 201 is kept until it does). A request that is never
     offered within the run (or whose POST failed) counts as infinitely late: it is in
     the denominator of every percentile, and a percentile it reaches is reported as
     null. 100k driver sockets are not feasible on 2 cores beside everything else, so
     the last hop (edge -> the driver's socket) is not in these figures; it is measured
     by ``bench_edge`` and the edge's ``dispatch_relay_lag_seconds`` metric.
   - Simulated drivers answer over REST with a driver token of their own (``drv-<id>``):
     85% accept after 2-6 s (``POST /v1/rides/{id}/accept``), 7.5% decline
     (``/decline``), 7.5% let the offer time out, so a ride can be offered again.
     Accepted drivers stay on their trip for the rest of the run (a trip lasts longer
     than the measured minute; with ``--trip-steps`` they also report arrived, start and
     complete over REST after a simulated pickup and ride). At most
     ``--answer-concurrency`` answers are in flight.
   - Also reported: ``offered_share`` (requests offered by ``--drain-s`` after the last
     one), ``post_p50_ms``/``post_p99_ms`` (the POST alone: sent -> answered),
     ``post_status`` and ``driver_answers`` (counts by status and error code),
     ``edge_cpu_share`` (the edge process's CPU seconds per second; 1.0 = one core) and
     ``cpu_s_by_process`` (every group of processes on the machine, edge and Postgres
     by pid), ``location_updates_applied_per_s`` (as the shards count them), and where
     an offer's time goes: ``answered_to_published_*`` (201 received -> the shard
     publishing the offer; negative when the offer beat the 201,
     ``offers_published_before_201`` counts those) and ``published_to_received_*``
     (the Redis hop, measured against the shard's ``sent_at``).

2. **shard only** (``shard_p50_ms``/``shard_p95_ms``/``shard_p99_ms``): the same load
   without the edge and Postgres, as the benchmark measured before they existed. Drivers
   stream positions through an in-process router; every request goes straight to the
   shard of its pickup (``add_ride``) and latency runs from that call to the offer on the
   driver's channel. Simulated drivers answer with actor calls and finish trips after a
   few minutes. ``--skip-shard-only`` leaves it out.
3. **quality** (the pure core with a simulated clock, the same demand for both policies):
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
from collections import Counter
from dataclasses import dataclass

import msgpack
import numpy as np
import psutil

from actors import directory
from actors.client import ShardClient
from actors.router import LocationRouter
from actors.settings import ShardSettings
from api import client as proto
from dispatch.cluster import LocalShards
from dispatch.dispatcher import Dispatcher, DriverStatusChange, Notify, Reserve
from dispatch.drivers import DriverStatus, Intent
from dispatch.fleet import Fleet
from dispatch.latency import LatencyHistogram
from dispatch.region import load_region, region_file_text
from dispatch.rides import MatchingConfig, RideRequest
from dispatch.shardmap import ShardMap
from loadtests import wsload
from loadtests.bench_edge import metric
from loadtests.machine import ProcessCpu, record
from loadtests.redis_baseline import redis_url
from loadtests.stack import LocalStack


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


# -- part 1: end to end, through the edge and Postgres -----------------------------------------


class StackCpu(ProcessCpu):
    """ProcessCpu that also names the edge and Postgres processes (by pid)."""

    def __init__(self, stack: LocalStack) -> None:
        self.stack = stack
        self.known: dict[int, str] = {}
        self.refresh()
        super().__init__()

    def refresh(self) -> None:
        for group, pids in self.stack.pids().items():
            for pid in pids:
                self.known[pid] = group

    def _group(self, p: psutil.Process) -> str:  # type: ignore[override]
        return self.known.get(p.pid) or ProcessCpu._group(p)

    def seconds_by_group(self) -> dict[str, float]:
        self.refresh()
        return super().seconds_by_group()


def _pct_ms(values: np.ndarray, q: float) -> float | None:
    """The q-th percentile in ms, an exact order statistic; None if it is infinite or empty."""
    if not len(values):
        return None
    v = float(np.percentile(values, q, method="inverted_cdf"))
    return round(v * 1e3, 1) if np.isfinite(v) else None


class DueSchedule:
    """``fleet.due`` in O(log n + k): the drivers whose report falls in (t0, t1].

    ``Fleet.due`` looks at every driver on every call; at 100k drivers and a call every
    20 ms that was 14% of the benchmark's CPU. Reports are at ``phase + k * interval``,
    so the due drivers are those whose phase lies in (t0, t1] modulo the interval.
    """

    def __init__(self, fleet: Fleet) -> None:
        self.interval = fleet.interval
        self.order = np.argsort(fleet.phase, kind="stable")
        self.phase = fleet.phase[self.order]

    def due(self, t0: float, t1: float) -> np.ndarray:
        if t1 - t0 >= self.interval:
            return self.order.copy()
        a, b = t0 % self.interval, t1 % self.interval
        i, j = np.searchsorted(self.phase, [a, b], side="right")
        if a <= b:
            return self.order[i:j]
        return np.concatenate([self.order[i:], self.order[:j]])


class _GatewayReader(wsload._Reader):
    """wsload's reader, which also answers the server's pings.

    uvicorn pings every 20 s and closes a socket that has not answered within 20 s
    (``api/app.py``), so a raw client that never pongs loses its socket after ~40 s.
    """

    def data_received(self, data: bytes) -> None:
        # Find ping frames (opcode 0x9) in what arrives; answer each with a masked pong.
        self._scan += data
        while len(self._scan) >= 2:
            n, off = self._scan[1] & 0x7F, 2
            if n == 126:
                if len(self._scan) < 4:
                    break
                n, off = int.from_bytes(self._scan[2:4], "big"), 4
            elif n == 127:
                if len(self._scan) < 10:
                    break
                n, off = int.from_bytes(self._scan[2:10], "big"), 10
            if len(self._scan) < off + n:
                break
            if self._scan[0] & 0x0F == 0x9 and self.transport is not None:
                self.pings += 1
                payload = bytes(self._scan[off : off + n])
                self.transport.write(wsload.frame_header(len(payload), opcode=0xA) + payload)
            del self._scan[: off + n]
        super().data_received(data)


async def _connect_gateway(url: str, token: str, errors: Counter) -> tuple[asyncio.Transport, _GatewayReader]:
    """wsload.connect, with a reader that answers pings."""
    transport, reader = await wsload.connect(url, "/v1/ws/gateway", token, errors)
    proto = _GatewayReader(errors)
    proto._scan = bytearray()
    proto.pings = 0
    proto.writer = reader.writer
    proto.transport = transport
    leftover = bytes(reader.buf)
    transport.set_protocol(proto)
    if leftover:
        proto.data_received(leftover)
    return transport, proto


@dataclass
class Reply:
    status_code: int
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")

    def json(self):
        return json.loads(self.body)


class _HttpConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection: one request at a time, its reply parsed from
    the status line, ``content-length`` (or a chunked body) and nothing else."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future | None = None
        self.closed = False
        self.keep = True
        self.idle_since = 0.0  # when it went back to the pool

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionResetError(f"connection closed mid-reply: {exc!r}"))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is None or self.waiter.done():
            return
        reply = self._parse()
        if reply is not None:
            self.waiter.set_result(reply)

    def _parse(self) -> Reply | None:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return None
        head = bytes(self.buf[:end]).split(b"\r\n")
        status = int(head[0].split(b" ", 2)[1])
        length = None
        chunked = False
        for line in head[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and value.strip().lower() == b"close":
                self.keep = False
        start = end + 4
        if chunked:
            body = bytearray()
            at = start
            while True:
                eol = self.buf.find(b"\r\n", at)
                if eol < 0:
                    return None
                size = int(bytes(self.buf[at:eol]).split(b";")[0], 16)
                if len(self.buf) < eol + 2 + size + 2:
                    return None
                body += self.buf[eol + 2 : eol + 2 + size]
                at = eol + 2 + size + 2
                if size == 0:
                    del self.buf[:at]
                    return Reply(status, bytes(body))
        n = length or 0
        if len(self.buf) < start + n:
            return None
        body_bytes = bytes(self.buf[start : start + n])
        del self.buf[: start + n]
        return Reply(status, body_bytes)

    async def send(self, request: bytes, timeout_s: float) -> Reply:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return await asyncio.wait_for(self.waiter, timeout_s)


class HttpPool:
    """``concurrency`` requests in flight at most, over as many keep-alive HTTP/1.1
    connections of a small client written on asyncio's protocols.

    The load generator shares the 2 cores with the stack it measures, so its client must
    be cheap: aiohttp instead of httpx took the benchmark process from 18.2 s to 7.9 s of
    CPU for a minute at 5,000 requests/min; this client, which does no more than the
    benchmarks need (JSON in, status and body out, content-length or chunked replies),
    costs less again (figures in the commit that made it). ``post`` and ``get`` return a
    :class:`Reply`; a connection that fails raises one of :func:`_http_errors`.
    """

    TIMEOUT_S = 30.0
    # A connection idle this long is not reused: uvicorn closes one idle for 5 s, and a
    # request sent as it does meets a reset (3 rides of 10,037 in one bench_mission run).
    IDLE_REUSE_S = 4.0

    def __init__(self, base_url: str, concurrency: int) -> None:
        from urllib.parse import urlsplit

        u = urlsplit(base_url)
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 80
        self.base_url = base_url
        self.free = asyncio.Semaphore(concurrency)
        self.idle: list[_HttpConnection] = []
        self.open: set[_HttpConnection] = set()
        self._host_header = f"Host: {self.host}:{self.port}\r\n".encode()

    async def _connection(self) -> _HttpConnection:
        now = time.monotonic()
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed and now - conn.idle_since < self.IDLE_REUSE_S:
                return conn
            if not conn.closed and conn.transport is not None:
                conn.transport.close()
            self.open.discard(conn)
        _, conn = await asyncio.get_running_loop().create_connection(_HttpConnection, self.host, self.port)
        self.open.add(conn)
        return conn

    def _encode(self, method: str, path: str, body: bytes | None, headers: dict | None) -> bytes:
        lines = [f"{method} {path} HTTP/1.1\r\n".encode(), self._host_header]
        for k, v in (headers or {}).items():
            lines.append(f"{k}: {v}\r\n".encode("latin-1"))
        if body is not None:
            lines.append(b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body))
            lines.append(body)
        else:
            lines.append(b"\r\n")
        return b"".join(lines)

    async def request(self, method: str, path: str, on_send=None, json=None, headers=None) -> Reply:
        """Send once a slot is free; ``on_send()`` is called just before it goes out."""
        body = None if json is None else _json_dumps(json)
        raw = self._encode(method, path, body, headers)
        async with self.free:
            conn = await self._connection()
            if on_send is not None:
                on_send()
            try:
                reply = await conn.send(raw, self.TIMEOUT_S)
            except BaseException:
                if conn.transport is not None:
                    conn.transport.close()
                self.open.discard(conn)
                raise
            if conn.keep and not conn.closed:
                conn.idle_since = time.monotonic()
                self.idle.append(conn)
            else:
                conn.transport.close()  # type: ignore[union-attr]
                self.open.discard(conn)
            return reply

    async def post(self, path: str, on_send=None, json=None, headers=None) -> Reply:
        return await self.request("POST", path, on_send, json, headers)

    async def get(self, path: str, headers=None) -> Reply:
        return await self.request("GET", path, None, None, headers)

    async def aclose(self) -> None:
        for conn in self.open:
            if conn.transport is not None:
                conn.transport.close()
        self.open.clear()
        self.idle.clear()


def _json_dumps(value) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _http_errors() -> tuple[type[BaseException], ...]:
    # Refused, reset or closed connections, and replies later than HttpPool.TIMEOUT_S.
    return (OSError, TimeoutError)


def _error_code(resp) -> str:
    try:
        return str(resp.json()["error"]["code"])
    except Exception:
        return "?"


class Gateway:
    """One gateway socket to the edge: columnar batch frames of the fleet's drivers."""

    MAX_ROWS = 5000

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.errors: Counter = Counter()
        self.rows_sent = 0
        self.transport = None
        self.reader = None

    async def connect(self, stack: LocalStack) -> None:
        token = stack.authority.issue("bench-gateway", "gateway", 3600)
        self.transport, self.reader = await _connect_gateway(stack.ws, token, self.errors)

    def send(self, idx: np.ndarray, ts: float, intent: int = 0) -> None:
        f = self.fleet
        for a in range(0, len(idx), self.MAX_ROWS):
            part = idx[a : a + self.MAX_ROWS]
            n = len(part)
            # vclass 0 (the first class) with ONLINE; left out otherwise (the shard keeps it).
            vclass = {"vclass": np.zeros(n, dtype=np.int16)} if intent == int(Intent.ONLINE) else {}
            msg = proto.batch_of(
                driver_id=f.ids[part],
                lat=f.lat[part],
                lng=f.lng[part],
                ts=np.full(n, ts),
                intent=np.full(n, intent, dtype=np.int8),
                **vclass,
            )
            self.transport.write(wsload.binary_frame(proto.encode(msg)))
            self.rows_sent += n

    def closed(self) -> bool:
        return self.reader is not None and self.reader.closed.is_set()

    def buffered(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport else 0

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def e2e_part(args, region, smap, demand: Demand) -> dict:
    import redis.asyncio as aioredis

    http_errors = _http_errors()

    stack = LocalStack("bench-match", region, region_file=args.region, postgres=True, keep_tmp=args.keep_tmp)
    log("e2e: starting Redis, Postgres, Ray, the shards and one edge process ...")
    t_boot = time.monotonic()
    stack.start()
    log(f"e2e: stack up in {time.monotonic() - t_boot:.1f}s (edge pid {stack.edge.pid})")
    fleet = Fleet(region, smap, args.drivers, seed=1, report_interval_s=args.drivers / args.location_rate)
    gw = Gateway(fleet)
    stop = asyncio.Event()
    tasks: list[asyncio.Task] = []
    riders = drivers_http = r = ps = None
    try:
        await gw.connect(stack)
        # Everyone online first (Intent.ONLINE with the vehicle class), then positions.
        for a in range(0, fleet.n, Gateway.MAX_ROWS):
            gw.send(np.arange(a, min(a + Gateway.MAX_ROWS, fleet.n)), time.time(), int(Intent.ONLINE))
            while gw.buffered() > 1 << 20:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.005)
        deadline = time.monotonic() + 120
        while True:
            available = sum(s["available"] for s in await stack.directory.stats())
            if available >= args.drivers * 0.99:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"only {available} of {args.drivers} drivers online after 120 s; "
                    f"gateway errors {dict(gw.errors)}; {stack.edge_log_tail()}"
                )
            await asyncio.sleep(0.2)
        log(f"e2e: {available} drivers online through the gateway socket")

        run = uuid.uuid4().hex[:6]
        n = len(demand.t)
        rider_tokens = [stack.authority.issue(f"bm-{run}-r{i}", "rider", 3600) for i in range(n)]
        driver_tokens: dict[int, str] = {}
        bodies = [
            {
                "pickup": {"lat": float(demand.pickup_lat[i]), "lng": float(demand.pickup_lng[i])},
                "dropoff": {"lat": float(demand.drop_lat[i]), "lng": float(demand.drop_lng[i])},
                "vehicle_class": "standard",
                "payment_method": "cash",
            }
            for i in range(n)
        ]
        arrival = np.full(n, np.nan)  # wall time the request arrives (its schedule)
        sent_at = np.full(n, np.nan)  # wall time the POST went out
        answered_at = np.full(n, np.nan)  # wall time its answer came
        ride_of: list[str | None] = [None] * n
        index_of: dict[str, int] = {}
        first_offer: dict[str, tuple[float, float]] = {}  # ride_id -> (received, published by shard)
        statuses: Counter = Counter()
        answers: Counter = Counter()
        answer_lag: list[float] = []  # a driver's answer: due -> sent (waiting for a free slot)
        counts: dict[str, float] = {"offers": 0}
        rng = np.random.default_rng(3)
        riders = HttpPool(stack.url, args.http_concurrency)
        drivers_http = HttpPool(stack.url, args.answer_concurrency)
        r = aioredis.Redis.from_url(stack.redis.url)
        ps = r.pubsub()
        await ps.psubscribe("dispatch:driver:*")

        def driver_token(driver_id: int) -> str:
            tok = driver_tokens.get(driver_id)
            if tok is None:
                tok = driver_tokens[driver_id] = stack.authority.issue(f"drv-{driver_id}", "driver", 3600)
            return tok

        async def driver_post(driver_id: int, path: str, body: dict | None, kind: str) -> int:
            due = time.time()

            def on_send() -> None:
                answer_lag.append(time.time() - due)

            try:
                resp = await drivers_http.post(
                    path,
                    on_send=on_send,
                    json=body,
                    headers={"Authorization": f"Bearer {driver_token(driver_id)}"},
                )
            except http_errors as exc:
                answers[f"{kind}_{type(exc).__name__}"] += 1
                return 0
            if resp.status_code < 300:
                answers[f"{kind}_{resp.status_code}"] += 1
            else:
                answers[f"{kind}_{resp.status_code}_{_error_code(resp)}"] += 1
                if answers[f"{kind}_{resp.status_code}_{_error_code(resp)}"] <= 3:
                    log(f"e2e: {kind} {path}: {resp.status_code} {resp.text[:300]}")
            return resp.status_code

        async def trip(ride_id: str, driver_id: int) -> None:
            # A pickup of 20-60 s, boarding, and a 30-90 s ride, over REST as the app does.
            await asyncio.sleep(float(rng.uniform(20, 60)))
            for step, pause in (("arrived", 5.0), ("start", float(rng.uniform(30, 90))), ("complete", 0.0)):
                if (
                    stop.is_set()
                    or await driver_post(driver_id, f"/v1/rides/{ride_id}/{step}", None, step) != 200
                ):
                    return
                await asyncio.sleep(pause)

        async def answer(offer: dict, driver_id: int) -> None:
            await asyncio.sleep(float(rng.uniform(2, 6)))
            if stop.is_set():
                return
            u = rng.random()
            ride_id = offer["ride_id"]
            if u < 0.85:
                status = await driver_post(
                    driver_id, f"/v1/rides/{ride_id}/accept", {"offer_id": offer["offer_id"]}, "accept"
                )
                if status == 200 and args.trip_steps:
                    tasks.append(asyncio.create_task(trip(ride_id, driver_id)))
            elif u < 0.925:
                await driver_post(
                    driver_id, f"/v1/rides/{ride_id}/decline", {"offer_id": offer["offer_id"]}, "decline"
                )
            else:
                answers["timeout_left"] += 1

        async def listen() -> None:
            while not stop.is_set():
                msg = await ps.get_message(ignore_subscribe_messages=True, timeout=0.1)
                if not msg:
                    continue
                now = time.time()
                body = msgpack.unpackb(msg["data"])
                if body.get("type") != "offer":
                    continue
                counts["offers"] += 1
                rid = body["ride_id"]
                if rid not in first_offer:
                    first_offer[rid] = (now, float(body.get("sent_at", np.nan)))
                driver_id = int(msg["channel"].decode().rsplit(":", 1)[1])
                tasks.append(asyncio.create_task(answer(body, driver_id)))

        schedule = DueSchedule(fleet)

        async def locations() -> None:
            t0 = time.monotonic()
            prev = 0.0
            while not stop.is_set():
                if gw.closed():
                    counts["gateway_closed_at"] = time.time()
                    log("e2e: THE EDGE CLOSED THE GATEWAY SOCKET; positions stopped")
                    return
                now = time.monotonic() - t0
                idx = schedule.due(prev, now)
                prev = now
                if len(idx):
                    fleet.move(idx, now)
                    gw.send(idx, time.time())
                await asyncio.sleep(0.02)

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
                index_of[rid] = i
            else:
                statuses[f"{resp.status_code}_{_error_code(resp)}"] += 1

        tasks.append(asyncio.create_task(listen()))
        tasks.append(asyncio.create_task(locations()))
        await asyncio.sleep(2.0)  # positions flowing before the first request
        cpu = StackCpu(stack)
        edge_proc = psutil.Process(stack.edge.pid)
        edge_cpu0 = edge_proc.cpu_times()
        stats0 = await stack.directory.stats()
        rows0, gw_buffer_max = gw.rows_sent, 0
        log(f"e2e: requests at {args.requests_per_min:g}/min for {args.seconds:g}s")
        start_wall, start = time.time(), time.monotonic()
        posts: list[asyncio.Task] = []
        for i in range(n):
            delay = start + demand.t[i] - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            arrival[i] = start_wall + demand.t[i]
            posts.append(asyncio.create_task(request(i)))
            gw_buffer_max = max(gw_buffer_max, gw.buffered())
            if i % 2000 == 1999:
                log(f"e2e: {i + 1} requests, {statuses}, {len(first_offer)} rides offered")
        sent_s = time.monotonic() - start
        # Let the last requests be answered and offered: up to --drain-s after the last one.
        drain_until = time.monotonic() + args.drain_s
        while time.monotonic() < drain_until:
            if all(p.done() for p in posts) and all(rid in first_offer for rid in index_of):
                break
            await asyncio.sleep(0.1)
        elapsed = time.monotonic() - start
        edge_cpu1 = edge_proc.cpu_times()
        cpu_by_group = cpu.seconds_by_group()
        stats1 = await stack.directory.stats()
        rows_sent = gw.rows_sent - rows0
        stop.set()
        for p in posts:
            p.cancel()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*posts, *tasks, return_exceptions=True)
        try:
            metrics_text = stack.metrics()
        except Exception as exc:
            metrics_text = ""
            log(f"e2e: /metrics failed: {exc!r}")

        # -- figures --------------------------------------------------------------------------
        offer_lat = np.full(n, np.inf)
        publish_lat = np.full(n, np.nan)  # shard published -> received (the Redis hop)
        post_to_publish = np.full(n, np.nan)  # POST answered -> shard published the offer
        for i, rid in enumerate(ride_of):
            if rid is not None and rid in first_offer:
                got, pub = first_offer[rid]
                offer_lat[i] = got - arrival[i]
                publish_lat[i] = got - pub
                post_to_publish[i] = pub - answered_at[i]
        offered = int(np.isfinite(offer_lat).sum())
        post_ms = (answered_at - sent_at)[np.isfinite(answered_at)]
        lag = (sent_at - arrival)[np.isfinite(sent_at)]
        ok = np.isfinite(offer_lat)
        before_201 = int((post_to_publish[ok] < 0).sum())
        edge_cpu_s = (edge_cpu1.user + edge_cpu1.system) - (edge_cpu0.user + edge_cpu0.system)
        applied = sum(
            b["counters"].get("applied", 0) - a["counters"].get("applied", 0)
            for a, b in zip(stats0, stats1, strict=True)
        )
        out = {
            "requests": n,
            "requests_created": sum(1 for x in ride_of if x is not None),
            "requests_offered": offered,
            "offered_share": round(offered / n, 4) if n else None,
            "offers": counts["offers"],
            "p50_ms": _pct_ms(offer_lat, 50),
            "p95_ms": _pct_ms(offer_lat, 95),
            "p99_ms": _pct_ms(offer_lat, 99),
            "max_ms": _pct_ms(offer_lat[ok], 100),
            "post_p50_ms": _pct_ms(post_ms, 50),
            "post_p99_ms": _pct_ms(post_ms, 99),
            "send_lag_p50_ms": _pct_ms(lag, 50),
            "send_lag_p99_ms": _pct_ms(lag, 99),
            "answered_to_published_p50_ms": _pct_ms(post_to_publish[ok], 50),
            "answered_to_published_p99_ms": _pct_ms(post_to_publish[ok], 99),
            "offers_published_before_201": before_201,
            "published_to_received_p50_ms": _pct_ms(publish_lat[ok], 50),
            "published_to_received_p99_ms": _pct_ms(publish_lat[ok], 99),
            "post_status": dict(statuses),
            "driver_answers": dict(sorted(answers.items())),
            "answer_send_lag_p50_ms": _pct_ms(np.array(answer_lag), 50),
            "answer_send_lag_p99_ms": _pct_ms(np.array(answer_lag), 99),
            "seconds": round(elapsed, 1),
            "requests_sent_in_s": round(sent_s, 1),
            "drain_s": args.drain_s,
            "location_rows_sent_per_s": round(rows_sent / elapsed),
            "location_updates_applied_per_s": round(applied / elapsed),
            "drivers_at_end": {
                k: sum(x[k] for x in stats1) for k in ("available", "offered", "on_trip", "stale")
            },
            "gateway_write_buffer_max_bytes": gw_buffer_max,
            "gateway_errors": dict(gw.errors),
            "gateway_pings_answered": gw.reader.pings,
            "gateway_closed_after_s": round(counts["gateway_closed_at"] - start_wall, 1)
            if "gateway_closed_at" in counts
            else None,
            "edge_cpu_share": round(edge_cpu_s / elapsed, 2),
            "cpu_s_by_process": cpu_by_group,
            "tick_s": MatchingConfig.from_section(region.section("matching")).tick_s,
        }
        if metrics_text:
            out["edge_router_rows_applied"] = int(
                metric(metrics_text, "dispatch_router_rows_total", outcome="applied")
            )
            out["edge_http_5xx"] = int(
                sum(
                    metric(metrics_text, "dispatch_http_request_duration_seconds_count", status=s)
                    for s in ("500", "502", "503", "504")
                )
            )
        return out
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
        gw.close()
        for pool in (riders, drivers_http):
            if pool is not None:
                await pool.aclose()
        if ps is not None:
            await ps.aclose()
        if r is not None:
            await r.aclose()
        log(f"e2e: edge log tail:\n{stack.edge_log_tail(1500)}")
        stack.stop()


# -- part 2: shard only (the figures before the edge and Postgres existed) -------------------


async def shard_latency_part(args, region, smap, demand: Demand) -> dict:
    namespace = f"bench-{uuid.uuid4().hex[:6]}"
    directory.connect(namespace=namespace, num_cpus=os.cpu_count() or 2)
    with redis_url() as url:
        import redis.asyncio as aioredis

        directory.deploy_shards(
            ShardSettings.build(region_toml=region_file_text(args.region), namespace=namespace, redis_url=url)
        )
        shards = ShardClient(region.name, region.shard_count, namespace)
        dirx = shards.directory
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
                try:
                    if rng.random() < 0.85:
                        await shards.accept(shard_id, offer["offer_id"], driver_id)
                        counts["accepted"] += 1
                        await asyncio.sleep(float(rng.uniform(60, 240)))
                        await shards.trip_ended(shard_id, driver_id)
                    elif rng.random() < 0.5:
                        await shards.decline(shard_id, offer["offer_id"], driver_id)
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
            # Open loop: each handoff waits for its shard's next batched call (up to the
            # client's interval), so awaiting them one by one would send ~5 a second.
            handoffs: list[asyncio.Task] = []
            for i in range(len(demand.t)):
                delay = start + demand.t[i] - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                ride_id = f"bm-{i}"
                now = time.time()
                requested_at[ride_id] = now
                counts["requests"] += 1
                handoff = shards.hand_over(
                    int(owners[i]),
                    {
                        "ride_id": ride_id,
                        "rider_id": f"rider-{i}",
                        "pickup_lat": float(demand.pickup_lat[i]),
                        "pickup_lng": float(demand.pickup_lng[i]),
                        "dropoff_lat": float(demand.drop_lat[i]),
                        "dropoff_lng": float(demand.drop_lng[i]),
                        "vehicle_class": 0,
                        "requested_at": now,
                    },
                )
                handoffs.append(asyncio.create_task(handoff))
            await asyncio.gather(*handoffs)
            await asyncio.sleep(3.0)  # let the last requests be offered
            elapsed = time.monotonic() - start
            stop.set()
            await asyncio.gather(listener, mover)
            stats = await dirx.stats()
            s = hist.summary_ms()
            out = {
                "shard_requests": counts["requests"],
                "shard_offers": counts["offers"],
                "shard_requests_offered": int(hist.total),
                "shard_accepted": counts["accepted"],
                "shard_seconds": round(elapsed, 1),
                "shard_p50_ms": s["p50_ms"],
                "shard_p95_ms": s["p95_ms"],
                "shard_p99_ms": s["p99_ms"],
                "shard_location_updates_per_s": round(sum(x["updates_per_s"] for x in stats)),
                "shard_cpu_s_by_process": cpu.seconds_by_group(),
            }
            await ps.aclose()
            await r.aclose()
            return out
        finally:
            await router.stop()
            directory.teardown_shards(region.name, region.shard_count, namespace=namespace)
            directory.shutdown()


# -- part 3: quality with a simulated clock ----------------------------------------------------


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
                f"q-{i}",
                f"rider-{i}",
                float(demand.pickup_lat[i]),
                float(demand.pickup_lng[i]),
                float(demand.drop_lat[i]),
                float(demand.drop_lng[i]),
                0,
                t0 + demand.t[i],
            )
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


def _run(coro):
    """Run on uvloop when it is installed (it comes with uvicorn[standard], and the edge runs
    on it too): the load generator's own event loop costs less of the cores it shares."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


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
    p.add_argument("--http-concurrency", type=int, default=64, help="rider POSTs in flight at most")
    p.add_argument("--answer-concurrency", type=int, default=64, help="driver answers in flight at most")
    p.add_argument("--drain-s", type=float, default=10.0, help="wait for offers after the last request")
    p.add_argument(
        "--trip-steps",
        action="store_true",
        help="accepted drivers also report arrived/start/complete (default: they stay on trip)",
    )
    p.add_argument("--skip-latency", action="store_true", help="no end-to-end and no shard-only part")
    p.add_argument("--skip-shard-only", action="store_true")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--keep-tmp", action="store_true", help="keep the stack's data dir (edge log, Postgres)")
    p.add_argument("--region", default=None)
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    region = load_region(args.region)
    smap = ShardMap(region)
    figures: dict = {
        "drivers": args.drivers,
        "requests_per_min": args.requests_per_min,
        "seconds_of_demand": args.seconds,
        "location_rate": args.location_rate,
    }
    if not args.skip_latency:
        demand = Demand.make(region, smap, args.requests_per_min, args.seconds)
        figures.update(_run(e2e_part(args, region, smap, demand)))
        log(json.dumps(figures))
        if not args.skip_shard_only:
            figures.update(_run(shard_latency_part(args, region, smap, demand)))
            log(json.dumps(figures))
    # The issue's demand on the issue's fleet, then a fleet too small for its demand, where
    # who gets which driver matters.
    scenarios = [
        ("", args.quality_drivers, args.quality_requests_per_min),
        ("tight_", args.tight_drivers, args.tight_requests_per_min),
    ]
    for label, drivers, rpm in [] if args.skip_quality else scenarios:
        qd = Demand.make(region, smap, rpm, args.quality_minutes * 60, seed=21)
        figures[f"{label}quality_drivers"] = drivers
        figures[f"{label}quality_requests"] = len(qd.t)
        for policy in ("batch", "greedy"):
            t = time.monotonic()
            figures.update(quality_part(args, region, smap, qd, policy, drivers, label))
            log(f"quality {label}{policy}: {time.monotonic() - t:.1f}s", json.dumps(figures))
    figures["config"] = {k: v for k, v in vars(args).items() if k not in ("json", "no_record", "keep_tmp")}
    if not args.no_record:
        log(f"recorded {record('bench_match', figures)}")
    print(json.dumps(figures) if args.json else json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
