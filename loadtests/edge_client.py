"""The city simulation over the edge's real sockets and REST: :class:`EdgeTransport`.

What each simulated party does, the way the real clients do it:

- **Drivers' positions** go as a fleet gateway sends them: columnar msgpack ``batch``
  frames over a few ``/v1/ws/gateway`` sockets, the path built for thousands of
  drivers. With ``positions="driver"`` each update is instead one ``location`` frame on
  the driver's own socket (what a phone sends; ``online``/``offline`` frames for the
  intents).
- **Every driver holds its own** ``/v1/ws/driver`` socket (msgpack), as the app does:
  offers arrive there and are answered there with ``accept``/``decline``, then
  ``arrived``, ``start_trip``, ``complete_trip``; each call carries an ``id`` and waits
  for the reply that refers to it. Sockets that carry no positions send a ``heartbeat``
  every ``heartbeat_s`` so the edge's idle timeout (60 s) leaves them open.
- **Riders** ask for a quote and request with it over REST (``POST /v1/quotes``, then
  ``POST /v1/rides`` with an ``Idempotency-Key``, retried with the same key on 429, 503
  or a lost connection), from one pooled HTTP client with a bounded number of requests
  in flight. Each rider holds a ``/v1/ws/rider`` socket from just before its request
  until the ride ends; past ``max_rider_sockets`` open at once, a rider polls
  ``GET /v1/rides/{id}`` every ``poll_s`` instead.

The city names rides ``sim-...``; the edge answers a request with the ride's Postgres
UUID. The transport maps between the two: events reach the city with its own id (and
the edge's as ``edge_ride_id``), and the city's steps reach the edge with the UUID. An
offer can arrive before the POST that created its ride has returned; it is held until
the mapping is known (and declined if no request of ours is in flight).

Match latency is measured here, at both ends: from the moment the ``POST /v1/rides``
left to the moment the offer arrived on the driver's socket (``sim_sent_at``,
``sim_received_at`` on the offer; :meth:`loadtests.city.City.on_offer` uses them).

:func:`drive` runs a city through the transport and leaves the engine clean: rides still
open are cancelled by their riders, rides in a driver's hands are cancelled by the
driver (or completed, once under way), and every driver goes offline.
:func:`simulate` is ``dispatch simulate``; :func:`run_simulation_against` starts it as a
child process for ``dispatch up --simulate``.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import httpx
import msgpack
import numpy as np

from dispatch.drivers import Intent
from loadtests.city import City, Summary, run_city

TERMINAL = frozenset({"completed", "cancelled", "expired"})
# Steps the city reports, the driver socket's message for each, and the status it leads to.
STEPS = {
    "arrived": ("arrived", "arrived"),
    "started": ("start_trip", "in_progress"),
    "completed": ("complete_trip", "completed"),
}
# An offer for a ride whose request is still in flight waits this long for its id.
HOLD_OFFER_S = 8.0
# Rows per gateway frame: ~45 bytes a row, far below the edge's 4 MiB frame limit.
GATEWAY_FRAME_ROWS = 5000
CALL_TIMEOUT_S = 20.0


def token_minter(jwt_secret: str, ttl_s: int = 24 * 3600) -> Callable[[str, str], str]:
    """``mint(sub, role)`` → a token the edge sharing ``jwt_secret`` accepts."""
    from api.auth import TokenAuthority
    from api.settings import load_settings

    authority = TokenAuthority(load_settings(jwt_secret=jwt_secret))
    return lambda sub, role: authority.issue(sub, role, ttl_s)


def ws_url(url: str) -> str:
    return "ws" + url[len("http") :] if url.startswith("http") else url


class Socket:
    """One open WebSocket that speaks msgpack.

    :meth:`call` numbers a message and returns the reply that refers to it (``ref``);
    every other message goes to ``on_message``. The reader runs until the socket closes;
    calls waiting then fail with ConnectionError.
    """

    def __init__(self, ws, on_message: Callable[[dict], None]) -> None:
        self.ws = ws
        self.on_message = on_message
        self.pending: dict[int, asyncio.Future] = {}
        self.n = 0
        self.last_sent = time.monotonic()
        self.closed = False
        self.task = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(
        cls, url: str, path: str, token: str, on_message: Callable[[dict], None], timeout_s: float = 15.0
    ) -> Socket:
        """Connect, check the ``welcome``; ConnectionError (or the client's) on refusal."""
        from websockets.asyncio.client import connect

        # No protocol pings (the edge counts only messages as life) and no compression:
        # small msgpack frames, and CPU is what a simulator on the same machine lacks.
        ws = await connect(
            f"{ws_url(url)}{path}?encoding=msgpack",
            additional_headers={"Authorization": f"Bearer {token}"},
            ping_interval=None,
            compression=None,
            open_timeout=timeout_s,
            max_queue=64,
        )
        try:
            first = _decode(await asyncio.wait_for(ws.recv(), timeout_s))
        except BaseException:
            await ws.close()
            raise
        if first.get("type") != "welcome":
            await ws.close()
            raise ConnectionError(f"{path}: {first.get('code')}: {first.get('message')}")
        return cls(ws, on_message)

    async def send(self, msg: dict) -> None:
        await self.ws.send(msgpack.packb(msg))
        self.last_sent = time.monotonic()

    async def call(self, msg: dict, timeout_s: float = CALL_TIMEOUT_S) -> dict:
        """Send ``msg`` with an ``id``; the reply (``ride_status``, ``error``...) to it."""
        if self.closed:
            raise ConnectionError("socket closed")
        self.n += 1
        n = self.n
        fut = asyncio.get_running_loop().create_future()
        self.pending[n] = fut
        try:
            await self.send({**msg, "id": n})
            return await asyncio.wait_for(fut, timeout_s)
        finally:
            self.pending.pop(n, None)

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                msg = _decode(raw)
                ref = msg.get("ref")
                fut = self.pending.get(ref) if isinstance(ref, int) else None
                if fut is not None and not fut.done():
                    fut.set_result(msg)
                else:
                    self.on_message(msg)
        except Exception:
            pass  # closed by either side: what is pending fails below
        finally:
            self.closed = True
            for fut in self.pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("socket closed"))

    async def close(self) -> None:
        self.closed = True
        try:
            await asyncio.wait_for(self.ws.close(), 5.0)
        except Exception:
            pass
        self.task.cancel()


def _decode(raw: bytes | str) -> dict:
    msg = msgpack.unpackb(raw) if isinstance(raw, bytes) else json.loads(raw)
    return msg if isinstance(msg, dict) else {}


class EdgeTransport:
    """The :class:`loadtests.city.Transport` of a city that drives a real edge at ``url``.

    Call :meth:`start` before the city runs (it opens every driver's socket, so offers
    have somewhere to go before any position makes a driver available) and :meth:`close`
    after. ``summary`` (the city's) receives errors by code and payment outcomes.
    ``rides_completed`` lists ``(ride UUID, rider token)`` of trips the edge completed;
    ``rides_polled`` counts rides whose rider polled for want of a socket.
    """

    def __init__(
        self,
        url: str,
        jwt_secret: str,
        driver_ids: np.ndarray,
        summary: Summary,
        *,
        positions: str = "gateway",
        gateways: int = 2,
        vehicle_class: str = "standard",
        payment_method: str = "cash",
        quote_first: bool = True,
        max_rider_sockets: int = 1000,
        rest_concurrency: int = 32,
        connect_parallelism: int = 64,
        heartbeat_s: float = 20.0,
        poll_s: float = 10.0,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if positions not in ("gateway", "driver"):
            raise ValueError("positions must be 'gateway' or 'driver'")
        self.url = url.rstrip("/")
        self.mint = token_minter(jwt_secret)
        self.driver_ids = [int(i) for i in driver_ids]
        self.summary = summary
        self.positions = positions
        self.n_gateways = max(1, gateways)
        self.vehicle_class = vehicle_class
        self.payment_method = payment_method
        self.quote_first = quote_first
        self.max_rider_sockets = max_rider_sockets
        self.rest_concurrency = rest_concurrency
        self.connect_parallelism = connect_parallelism
        self.heartbeat_s = heartbeat_s
        self.poll_s = poll_s
        self.log = log or (lambda _msg: None)
        self.run_id = secrets.token_hex(3)  # riders and keys of this run are its own
        self.http: httpx.AsyncClient | None = None
        self.links: dict[int, Socket] = {}  # driver id -> its socket
        self.gateways: list[Socket] = []
        self.riders: dict[str, Socket] = {}  # rider sub -> its socket while its ride is open
        self.rides_completed: list[tuple[str, str]] = []
        self.rides_polled = 0  # rides whose rider had no socket and polled instead
        self._connected = np.zeros(0, dtype=np.int64)  # sorted ids of drivers with a socket
        self._online: set[int] = set()  # positions="driver": drivers that sent "online"
        self._gw_next = 0
        self._rest = asyncio.Semaphore(rest_concurrency)
        self._connect = asyncio.Semaphore(connect_parallelism)
        self._inbox: deque[tuple[str, str, dict, float]] = deque()
        self._held: list[tuple[str, str, dict, float]] = []
        self._sim_of: dict[str, str] = {}  # edge ride id -> city ride id
        self._edge_of: dict[str, str] = {}  # city ride id -> edge ride id
        self._sent_at: dict[str, float] = {}  # city ride id -> when its POST left (monotonic)
        self._rider_of: dict[str, tuple[str, str]] = {}  # edge ride id -> (rider sub, token)
        self._driver_of: dict[str, int] = {}  # edge ride id -> the driver who accepted it
        self._status: dict[str, str] = {}  # edge ride id -> latest status heard
        self._posting = 0
        self._tasks: set[asyncio.Task] = set()
        self._polls: set[asyncio.Task] = set()
        self._heartbeat: asyncio.Task | None = None
        self._closing = False

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the HTTP pool, the gateway sockets and every driver's socket. Drivers whose
        socket could not open are left out of the run (their positions are not sent, so
        the engine never offers them a ride nobody would answer)."""
        limits = httpx.Limits(
            max_connections=self.rest_concurrency, max_keepalive_connections=self.rest_concurrency
        )
        self.http = httpx.AsyncClient(base_url=self.url, limits=limits, timeout=30.0)
        if self.positions == "gateway":
            for k in range(self.n_gateways):
                tok = self.mint(f"sim-gateway-{self.run_id}-{k}", "gateway")
                self.gateways.append(await Socket.open(self.url, "/v1/ws/gateway", tok, self._on_gateway))
        t0 = time.monotonic()

        async def one(driver_id: int) -> None:
            tok = self.mint(f"drv-{driver_id}", "driver")

            def on_message(msg: dict) -> None:
                self._on_driver(driver_id, msg)

            for attempt in range(3):
                async with self._connect:
                    try:
                        self.links[driver_id] = await Socket.open(self.url, "/v1/ws/driver", tok, on_message)
                        return
                    except Exception as exc:
                        if attempt == 2:
                            self.summary.errors[f"driver_connect:{type(exc).__name__}"] += 1
                await asyncio.sleep(0.5 * (attempt + 1))

        await asyncio.gather(*(one(i) for i in self.driver_ids))
        self._connected = np.array(sorted(self.links), dtype=np.int64)
        self.log(
            f"{len(self.links)} driver sockets open in {time.monotonic() - t0:.1f}s"
            + (
                f" ({len(self.driver_ids) - len(self.links)} failed)"
                if len(self.links) < len(self.driver_ids)
                else ""
            )
        )
        self._heartbeat = asyncio.get_running_loop().create_task(self._beat())

    async def close(self, cleanup: bool = True, offline: np.ndarray | None = None) -> None:
        """End the run: wait briefly for requests in flight; with ``cleanup``, end every
        ride of this run still open; send ``offline`` (location rows, OFFLINE intent);
        close every socket and the HTTP pool.

        Rides end before the drivers go offline: a shard ignores ``offline`` from a driver
        with a ride and makes it available again when the ride ends.
        """
        self._closing = True
        for t in self._polls:
            t.cancel()
        if self._tasks:
            _done, late = await asyncio.wait(list(self._tasks), timeout=10.0)
            for t in late:
                t.cancel()
        if cleanup:
            await self._end_open_rides()
        if offline is not None:
            await self.send_locations(offline)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        await asyncio.sleep(0.5)  # the last frames reach the edge before their sockets close
        socks = [*self.links.values(), *self.riders.values(), *self.gateways]
        for k in range(0, len(socks), 200):
            await asyncio.gather(*(s.close() for s in socks[k : k + 200]))
        self.riders.clear()
        if self.http is not None:
            await self.http.aclose()

    @property
    def lost(self) -> bool:
        """True once every socket that carries positions is closed (the edge went away)."""
        carriers = self.gateways if self.positions == "gateway" else list(self.links.values())
        return bool(carriers) and all(s.closed for s in carriers)

    def _spawn(self, coro, group: set[asyncio.Task] | None = None) -> asyncio.Task:
        group = self._tasks if group is None else group
        t = asyncio.get_running_loop().create_task(self._guard(coro))
        group.add(t)
        t.add_done_callback(group.discard)
        return t

    async def _guard(self, coro) -> None:
        """A background step that fails is counted, never left unretrieved."""
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.summary.errors[f"client:{type(exc).__name__}"] += 1

    async def _beat(self) -> None:
        """Heartbeats on the sockets that have sent nothing for ``heartbeat_s``, a few
        at a time so they spread over the interval."""
        while True:
            await asyncio.sleep(1.0)
            cutoff = time.monotonic() - self.heartbeat_s
            for s in [*self.links.values(), *self.riders.values(), *self.gateways]:
                if not s.closed and s.last_sent < cutoff:
                    try:
                        await s.send({"type": "heartbeat"})
                    except Exception:
                        pass

    # -- what the edge sends -----------------------------------------------------------------

    def _error(self, msg: dict, where: str = "") -> None:
        code = msg.get("code") or msg.get("type") or "unknown"
        self.summary.errors[f"{where}{code}"] += 1

    def _on_driver(self, driver_id: int, msg: dict) -> None:
        typ = msg.get("type")
        if typ in ("heartbeat_ack", "status", "offer_declined"):
            return
        if typ == "error":
            self._error(msg)
            return
        self._inbox.append(("driver", str(driver_id), msg, time.monotonic()))

    def _on_rider(self, sub: str, msg: dict) -> None:
        if msg.get("type") != "ride_status":
            return  # driver_position, heartbeat_ack: the app draws them; the city needs none
        self._inbox.append(("rider", sub, msg, time.monotonic()))
        if msg.get("status") in TERMINAL:
            sock = self.riders.pop(sub, None)
            if sock is not None:
                self._spawn(sock.close())

    def _on_gateway(self, msg: dict) -> None:
        if msg.get("type") == "error":
            self._error(msg, "gateway:")
        elif msg.get("type") == "batch_ack":
            for reason, n in (msg.get("rejected") or {}).items():
                self.summary.errors[f"gateway_rows:{reason}"] += n
            if msg.get("backpressure"):
                self.summary.errors["gateway_rows:backpressure"] += msg["backpressure"]

    async def events(self) -> list[tuple[str, str, dict]]:
        """What arrived since the last call, with the city's ride ids (see the module doc)."""
        out: list[tuple[str, str, dict]] = []
        now = time.monotonic()
        items, self._held = self._held, []
        while self._inbox:
            items.append(self._inbox.popleft())
        for kind, ident, msg, at in items:
            rid = msg.get("ride_id")
            sim = self._sim_of.get(rid) if isinstance(rid, str) else None
            if sim is None or not isinstance(rid, str):
                if kind == "driver" and msg.get("type") == "offer":
                    if self._posting and now - at < HOLD_OFFER_S:
                        self._held.append((kind, ident, msg, at))
                    else:  # not a ride of ours: let the engine offer it to someone else
                        self.summary.errors["offer_for_unknown_ride"] += 1
                        self._spawn(self._answer(int(ident), msg, "decline"))
                continue
            status = msg.get("status")
            if msg.get("type") == "ride_status" and isinstance(status, str):
                self._status[rid] = status
            m = {**msg, "ride_id": sim, "edge_ride_id": rid}
            if msg.get("type") == "offer":
                m["sim_received_at"] = at
                if sim in self._sent_at:
                    m["sim_sent_at"] = self._sent_at[sim]
            out.append((kind, ident, m))
        return out

    # -- what the city does ------------------------------------------------------------------

    async def send_locations(self, rows: np.ndarray) -> None:
        rows = rows[np.isin(rows["driver_id"], self._connected)]
        if not len(rows):
            return
        if self.positions == "gateway":
            for k in range(0, len(rows), GATEWAY_FRAME_ROWS):
                await self._send_batch(rows[k : k + GATEWAY_FRAME_ROWS])
            return
        classes = {0: "standard", 1: "xl", 2: "premium"}
        for r in rows:
            driver_id, intent = int(r["driver_id"]), int(r["intent"])
            link = self.links[driver_id]
            if link.closed:
                continue
            lat, lng, ts = float(r["lat"]), float(r["lng"]), float(r["ts"])
            if intent == Intent.OFFLINE:
                self._online.discard(driver_id)
                msg: dict[str, Any] = {"type": "offline"}
            elif intent == Intent.ONLINE or driver_id not in self._online:
                self._online.add(driver_id)
                vc = classes.get(int(r["vclass"]), self.vehicle_class)
                msg = {"type": "online", "lat": lat, "lng": lng, "ts": ts, "vehicle_class": vc}
            else:
                msg = {"type": "location", "lat": lat, "lng": lng, "ts": ts}
                if np.isfinite(r["heading"]):
                    msg["heading"] = float(r["heading"])
                if np.isfinite(r["speed"]):
                    msg["speed"] = float(r["speed"])
            try:
                await link.send(msg)
            except Exception:
                self.summary.errors["driver_socket_closed"] += 1

    async def _send_batch(self, rows: np.ndarray) -> None:
        frame = {
            "type": "batch",
            "driver_id": np.ascontiguousarray(rows["driver_id"], dtype="<i8").tobytes(),
            "lat": np.ascontiguousarray(rows["lat"], dtype="<f8").tobytes(),
            "lng": np.ascontiguousarray(rows["lng"], dtype="<f8").tobytes(),
            "ts": np.ascontiguousarray(rows["ts"], dtype="<f8").tobytes(),
            "heading": np.ascontiguousarray(rows["heading"], dtype="<f4").tobytes(),
            "speed": np.ascontiguousarray(rows["speed"], dtype="<f4").tobytes(),
            "vclass": np.ascontiguousarray(rows["vclass"], dtype="<i2").tobytes(),
            "intent": np.ascontiguousarray(rows["intent"], dtype="<i1").tobytes(),
        }
        for _ in range(len(self.gateways)):
            gw = self.gateways[self._gw_next % len(self.gateways)]
            self._gw_next += 1
            if not gw.closed:
                await gw.send(frame)
                return
        self.summary.errors["gateway_closed"] += 1

    async def request_ride(self, ride: dict) -> None:
        """Starts the rider's request in the background (the city's loop goes on)."""
        if self._closing:
            return
        if len(self._tasks) > 20 * self.rest_concurrency:
            # The edge answers slower than the city asks: shed load here, and say so.
            self.summary.errors["client_backlog"] += 1
            return
        self._spawn(self._request(ride))

    async def _request(self, ride: dict) -> None:
        assert self.http is not None
        sim = ride["ride_id"]
        sub = f"sim-{self.run_id}-{ride['rider_id']}"
        token = self.mint(sub, "rider")
        headers = {"Authorization": f"Bearer {token}"}
        sock = None
        if len(self.riders) < self.max_rider_sockets:
            try:
                async with self._connect:
                    sock = await Socket.open(
                        self.url, "/v1/ws/rider", token, lambda m: self._on_rider(sub, m)
                    )
                self.riders[sub] = sock
            except Exception as exc:
                self.summary.errors[f"rider_connect:{type(exc).__name__}"] += 1
        trip = {
            "pickup": {"lat": ride["pickup_lat"], "lng": ride["pickup_lng"]},
            "dropoff": {"lat": ride["dropoff_lat"], "lng": ride["dropoff_lng"]},
            "vehicle_class": self.vehicle_class,
        }
        self._posting += 1
        try:
            body = {**trip, "payment_method": self.payment_method}
            if self.quote_first:
                async with self._rest:
                    r = await self._post("/v1/quotes", trip, headers)
                if r is not None and r.status_code == 200:
                    body["quote_id"] = r.json()["quote_id"]
            key = f"sim-{self.run_id}-{sim}"
            async with self._rest:
                t_sent = time.monotonic()
                r = await self._post("/v1/rides", body, {**headers, "Idempotency-Key": key})
            if r is None or r.status_code not in (200, 201):
                if sock is not None:
                    self.riders.pop(sub, None)
                    await sock.close()
                return
            rid = r.json()["ride_id"]
            self._sim_of[rid], self._edge_of[sim] = sim, rid
            self._sent_at[sim] = t_sent
            self._rider_of[rid] = (sub, token)
            self._status.setdefault(rid, r.json().get("status", "requested"))
        finally:
            self._posting -= 1
        if sock is None:
            self.rides_polled += 1
            self._spawn(self._poll(rid, sub, headers), self._polls)

    async def _post(self, path: str, body: dict, headers: dict) -> httpx.Response | None:
        """POST with up to three tries (same headers, so the same Idempotency-Key) on
        429, 503 or a lost connection; errors counted by code. None if it never answered."""
        assert self.http is not None
        for attempt in range(3):
            try:
                r = await self.http.post(path, json=body, headers=headers)
            except httpx.TransportError as exc:
                self.summary.errors[f"http:{type(exc).__name__}"] += 1
                await asyncio.sleep(0.5 * (attempt + 1))
                continue
            if r.status_code < 400:
                return r
            try:
                code = r.json()["error"]["code"]
            except Exception:
                code = str(r.status_code)
            self.summary.errors[f"{path.rsplit('/', 1)[-1]}:{code}"] += 1
            if r.status_code not in (429, 503):
                return r
            await asyncio.sleep(float(r.headers.get("Retry-After", 0.5 * (attempt + 1))))
        return None

    async def _poll(self, rid: str, sub: str, headers: dict) -> None:
        """A rider without a socket: re-read the ride until it ends (or the run does)."""
        assert self.http is not None
        while not self._closing:
            await asyncio.sleep(self.poll_s * float(np.random.uniform(0.8, 1.2)))
            try:
                async with self._rest:
                    r = await self.http.get(f"/v1/rides/{rid}", headers=headers)
            except httpx.TransportError:
                continue
            if r.status_code != 200:
                continue
            status = r.json()["status"]
            if status != self._status.get(rid):
                self._inbox.append(
                    (
                        "rider",
                        sub,
                        {"type": "ride_status", "ride_id": rid, "status": status},
                        time.monotonic(),
                    )
                )
            if status in TERMINAL:
                return

    async def _answer(self, driver_id: int, offer: dict, typ: str) -> dict | None:
        link = self.links.get(driver_id)
        if link is None:
            return None
        ride_id = offer.get("edge_ride_id", offer.get("ride_id"))
        try:
            return await link.call({"type": typ, "ride_id": ride_id, "offer_id": offer["offer_id"]})
        except (TimeoutError, ConnectionError) as exc:
            self.summary.errors[f"{typ}:{type(exc).__name__}"] += 1
            return None

    async def accept(self, offer: dict, driver_id: int) -> bool:
        reply = await self._answer(driver_id, offer, "accept")
        if reply is None:
            return False
        if reply.get("type") == "ride_status" and reply.get("status") == "accepted":
            self._driver_of[offer["edge_ride_id"]] = driver_id
            self._status[offer["edge_ride_id"]] = "accepted"
            return True
        self._error(reply, "accept:")
        return False

    async def decline(self, offer: dict, driver_id: int) -> None:
        reply = await self._answer(driver_id, offer, "decline")
        if reply is not None and reply.get("type") == "error":
            self._error(reply, "decline:")

    async def milestone(self, ride_id: str, driver_id: int, what: str) -> bool:
        rid = self._edge_of.get(ride_id)
        link = self.links.get(driver_id)
        if rid is None or link is None:
            return False
        typ, want = STEPS[what]
        try:
            reply = await link.call({"type": typ, "ride_id": rid})
        except (TimeoutError, ConnectionError) as exc:
            self.summary.errors[f"{typ}:{type(exc).__name__}"] += 1
            return False
        if reply.get("type") != "ride_status" or reply.get("status") != want:
            self._error(reply, f"{typ}:")
            return False
        self._status[rid] = want
        if what == "completed":
            pay = reply.get("payment") or {}
            self.summary.payments[pay.get("status", "none")] += 1
            self.rides_completed.append((rid, self._rider_of[rid][1]))
        return True

    # -- the end of a run ------------------------------------------------------------------

    async def _end_open_rides(self) -> None:
        """Every ride of this run not yet ended: its rider cancels it while no driver has
        it; its driver cancels it once accepted, or completes it once under way."""
        http = self.http
        assert http is not None
        open_rides = [rid for rid in self._rider_of if self._status.get(rid) not in TERMINAL]

        async def end(rid: str) -> None:
            sub, token = self._rider_of[rid]
            headers = {"Authorization": f"Bearer {token}"}
            async with self._rest:
                r = await http.get(f"/v1/rides/{rid}", headers=headers)
            if r.status_code != 200:
                return
            status = r.json()["status"]
            link = self.links.get(self._driver_of.get(rid, -1))
            if status in ("requested", "offered"):
                async with self._rest:
                    r = await http.post(
                        f"/v1/rides/{rid}/cancel", json={"reason": "simulation ended"}, headers=headers
                    )
                if r.status_code == 409 and self._driver_of.get(rid) is None:
                    return  # accepted meanwhile by a driver the run no longer answers for
            elif link is not None and status in ("accepted", "arrived"):
                await link.call({"type": "cancel_ride", "ride_id": rid, "reason": "simulation ended"})
            elif link is not None and status == "in_progress":
                await link.call({"type": "complete_trip", "ride_id": rid})

        results = await asyncio.gather(*(end(rid) for rid in open_rides), return_exceptions=True)
        failed = sum(isinstance(r, BaseException) for r in results)
        if failed:
            self.summary.errors["cleanup_failed"] += failed
        if open_rides:
            self.log(f"ended {len(open_rides) - failed} rides still open at the end of the run")


def offline_rows(city: City) -> np.ndarray:
    """Every driver of ``city`` going offline where it is."""
    rows = city.fleet.all_rows(time.time())
    rows["intent"] = int(Intent.OFFLINE)
    return rows


async def drive(
    city: City,
    transport: EdgeTransport,
    seconds: float | None,
    on_summary: Callable[[Summary], None] | None = None,
    every_s: float = 5.0,
    stop: asyncio.Event | None = None,
    cleanup: bool = True,
) -> Summary:
    """Start ``transport``, run ``city`` through it (see :func:`loadtests.city.run_city`),
    then end the run's open rides (``cleanup``), take the drivers offline and close it.
    The run ends early, without the clean-up, if the edge closes the sockets."""
    stop = stop or asyncio.Event()
    await transport.start()

    async def watch() -> None:
        # An edge that goes away (stopped, crashed) ends the run rather than leaving a
        # simulation sending into closed sockets forever.
        while not stop.is_set():
            await asyncio.sleep(1.0)
            if transport.lost:
                transport.log("lost the edge: its sockets closed; ending the run")
                transport.summary.errors["edge_lost"] += 1
                stop.set()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        return await run_city(city, transport, seconds, on_summary=on_summary, every_s=every_s, stop=stop)
    finally:
        watcher.cancel()
        await transport.close(cleanup=cleanup and not transport.lost, offline=offline_rows(city))


async def simulate(
    url: str,
    jwt_secret: str,
    drivers: int,
    requests_per_min: float,
    seconds: float | None,
    *,
    region_file: str | None = None,
    report_interval_s: float = 1.0,
    positions: str = "gateway",
    first_driver_id: int = 9_000_000,
    every_s: float = 5.0,
    stop: asyncio.Event | None = None,
    out: Callable[[str], None] = print,
) -> Summary:
    """``dispatch simulate``: a city of ``drivers`` and ``requests_per_min`` against the
    edge at ``url`` for ``seconds`` (None: until ``stop``), printing the summary line
    every ``every_s`` seconds through ``out``."""
    from dispatch.region import load_region
    from dispatch.shardmap import ShardMap

    region = load_region(region_file)
    city = City(
        region,
        ShardMap(region),
        drivers,
        requests_per_min,
        report_interval_s=report_interval_s,
        seed=int(time.time()) % 1000,
        first_driver_id=first_driver_id,
    )
    transport = EdgeTransport(url, jwt_secret, city.fleet.ids, city.summary, positions=positions, log=out)
    out(
        f"simulating {drivers} drivers and {requests_per_min:g} requests/min against {url} "
        f"(positions via {positions} sockets)"
    )
    return await drive(
        city, transport, seconds, on_summary=lambda s: out(s.line()), every_s=every_s, stop=stop
    )


def run_simulation_against(
    url: str, data_dir: str, drivers: int, requests_per_min: int, seconds: float | None
) -> subprocess.Popen:
    """Start ``dispatch simulate`` against the edge at ``url`` as a child process, with
    the JWT secret of the local stack in ``data_dir``; ``seconds=None`` runs until it is
    stopped. Returns the process: its summary lines go to this process's stdout.

    To stop it, call :func:`stop_simulation` *before* stopping the edge: on SIGINT the
    simulation cancels its open rides and takes its drivers offline, which needs the edge.
    The child runs in its own session, so a Ctrl-C in the terminal reaches only the parent.
    """
    cmd = [
        sys.executable,
        "-m",
        "api.cli",
        "simulate",
        "--url",
        url,
        "--data-dir",
        str(data_dir),
        "--drivers",
        str(drivers),
        "--requests-per-min",
        str(requests_per_min),
        "--seconds",
        str(0 if seconds is None else seconds),
    ]
    return subprocess.Popen(cmd, env=dict(os.environ), start_new_session=True)


def stop_simulation(proc: subprocess.Popen, timeout_s: float = 60.0) -> int | None:
    """Ask a simulation started by :func:`run_simulation_against` to finish (SIGINT:
    it ends its rides and prints its final line), wait for it, kill it if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
