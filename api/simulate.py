"""``dispatch simulate``: the city model (``dispatch/city.py``) driven through the edge's
real sockets and REST by the client library (``api/client.py``): :class:`EdgeTransport`.

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
``sim_received_at`` on the offer; :meth:`dispatch.city.City.on_offer` uses them).

**Several edges** (``urls``): every socket is a library client over all of them. When an
edge dies, its drivers, gateways and riders reconnect to another one within about a
second and resume (a driver re-sends its online state and position; open rides are
re-read over REST); a step or an answer cut off by the drop is checked over REST and
sent again if it did not happen.

:func:`drive` runs a city through the transport and leaves the engine clean: rides still
open are cancelled by their riders, rides in a driver's hands are cancelled by the
driver (or completed, once under way), and every driver goes offline.
:func:`simulate` is ``dispatch simulate``; :func:`run_simulation_against` starts it as a
child process for ``dispatch up --simulate``.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable
from typing import Protocol

import httpx
import numpy as np

from api import client as proto
from api.client import (
    TERMINAL,
    ClientError,
    ConnectionLost,
    DriverClient,
    GatewayClient,
    Rest,
    RiderClient,
    edge_list,
    token_minter,
)
from dispatch.city import City, Summary
from dispatch.drivers import Intent, parse_driver_id

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
# A socket that finds no edge for this long gives up; when every position carrier has,
# the run ends (the stack went away).
GIVE_UP_S = 30.0


class Transport(Protocol):
    """How the city reaches the engine. Only ``accept`` and ``milestone`` answer whether
    the engine took the step; everything else is fire-and-forget and must not block the
    city's loop for long.

    ``events`` returns what arrived since the last call, as ``(audience, id, message)``
    with audience ``"driver"`` (id: the integer driver id as a string) or ``"rider"``.
    An offer may carry ``sim_sent_at`` and ``sim_received_at`` (``time.monotonic()``
    when the request left and the offer arrived) for an exact match latency.
    """

    async def send_locations(self, rows: np.ndarray) -> None: ...
    async def request_ride(self, ride: dict) -> None: ...
    async def accept(self, offer: dict, driver_id: int) -> bool: ...
    async def decline(self, offer: dict, driver_id: int) -> None: ...
    async def milestone(self, ride_id: str, driver_id: int, what: str) -> bool: ...
    async def events(self) -> list[tuple[str, str, dict]]: ...


class EdgeTransport:
    """The :class:`Transport` of a city that drives real edges at ``urls`` (one or more;
    sockets fail over between them). Sockets are spread over the edges as a load balancer
    would: each starts on the edge its driver id (gateway number, rider) picks and fails
    over to the others in turn, so an edge that dies takes only its share with it.

    Call :meth:`start` before the city runs (it opens every driver's socket, so offers
    have somewhere to go before any position makes a driver available) and :meth:`close`
    after. ``summary`` (the city's) receives errors by code and payment outcomes.
    ``rides_completed`` lists ``(ride UUID, rider token)`` of trips the edge completed;
    ``rides_polled`` counts rides whose rider polled for want of a socket.
    """

    def __init__(
        self,
        urls: str | Iterable[str],
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
        give_up_s: float = GIVE_UP_S,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if positions not in ("gateway", "driver"):
            raise ValueError("positions must be 'gateway' or 'driver'")
        self.urls = edge_list(urls)
        self.url = self.urls[0]
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
        self.give_up_s = give_up_s
        self.log = log or (lambda _msg: None)
        self.run_id = secrets.token_hex(3)  # riders and keys of this run are its own
        self.http: httpx.AsyncClient | None = None  # riders' requests
        # The sockets' own REST (a resumed socket re-reads its rides): a pool of its own,
        # as phones' requests do not queue behind each other's. Shared, 3,000 drivers'
        # re-reads after their edge died held riders' requests up for 15 s.
        self.socket_http: httpx.AsyncClient | None = None
        self.rest: Rest | None = None
        self.links: dict[int, DriverClient] = {}  # driver id -> its socket
        self.gateways: list[GatewayClient] = []
        self.riders: dict[str, RiderClient] = {}  # rider sub -> its socket while its ride is open
        self.rides_completed: list[tuple[str, str]] = []
        self.rides_polled = 0  # rides whose rider had no socket and polled instead
        self._connected = np.zeros(0, dtype=np.int64)  # sorted ids of drivers with a socket
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
        self._closing = False

    def _socket(self, kind: type, token: str, on_message: Callable[[dict], None], spread: int):
        k = spread % len(self.urls)  # the first edge this socket tries; the others follow in turn
        return kind(
            self.urls[k:] + self.urls[:k],
            token,
            on_message=on_message,
            heartbeat_s=self.heartbeat_s,
            give_up_s=self.give_up_s,
            http=self.socket_http,
        )

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the HTTP pool, the gateway sockets and every driver's socket. Drivers whose
        socket could not open are left out of the run (their positions are not sent, so
        the engine never offers them a ride nobody would answer)."""
        limits = httpx.Limits(
            max_connections=self.rest_concurrency, max_keepalive_connections=self.rest_concurrency
        )
        self.http = httpx.AsyncClient(limits=limits, timeout=30.0)
        self.socket_http = httpx.AsyncClient(limits=limits, timeout=30.0)
        self.rest = Rest(self.urls, http=self.http)
        if self.positions == "gateway":
            for k in range(self.n_gateways):
                tok = self.mint(f"sim-gateway-{self.run_id}-{k}", "gateway")
                self.gateways.append(await self._socket(GatewayClient, tok, self._on_gateway, k).start())
        t0 = time.monotonic()

        async def one(driver_id: int) -> None:
            tok = self.mint(f"drv-{driver_id}", "driver")

            def on_message(msg: dict) -> None:
                self._on_driver(driver_id, msg)

            for attempt in range(3):
                async with self._connect:
                    try:
                        link = self._socket(DriverClient, tok, on_message, driver_id)
                        self.links[driver_id] = await link.start()
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
        await asyncio.sleep(0.5)  # the last frames reach the edge before their sockets close
        socks = [*self.links.values(), *self.riders.values(), *self.gateways]
        for k in range(0, len(socks), 200):
            await asyncio.gather(*(s.close() for s in socks[k : k + 200]))
        self.riders.clear()
        for pool in (self.http, self.socket_http):
            if pool is not None:
                await pool.aclose()

    @property
    def lost(self) -> bool:
        """True once every socket that carries positions gave up on every edge."""
        carriers = self.gateways if self.positions == "gateway" else list(self.links.values())
        return bool(carriers) and all(s.ended for s in carriers)

    @property
    def reconnects(self) -> int:
        """Reconnects of every socket of the run (to the same or another edge)."""
        socks = [*self.links.values(), *self.riders.values(), *self.gateways]
        return sum(s.reconnects for s in socks)

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

    # -- what the edge sends -----------------------------------------------------------------

    def _error(self, err: dict | ClientError, where: str = "") -> None:
        code = err.code if isinstance(err, ClientError) else err.get("code") or err.get("type") or "unknown"
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
            if link.ended:
                continue
            lat, lng, ts = float(r["lat"]), float(r["lng"]), float(r["ts"])
            heading, speed = proto.finite(r["heading"]), proto.finite(r["speed"])
            try:
                if intent == Intent.OFFLINE:
                    await link.go_offline(wait=False)
                elif intent == Intent.ONLINE or not link.is_online:
                    vc = classes.get(int(r["vclass"]), self.vehicle_class)
                    await link.go_online(lat, lng, vc, ts=ts, wait=False)
                else:
                    await link.send_location(lat, lng, ts, heading, speed)
            except ConnectionLost:
                self.summary.errors["driver_socket_closed"] += 1

    async def _send_batch(self, rows: np.ndarray) -> None:
        for _ in range(len(self.gateways)):
            gw = self.gateways[self._gw_next % len(self.gateways)]
            self._gw_next += 1
            if gw.connected:
                try:
                    await gw.send_batch(rows)
                    return
                except ConnectionLost:
                    continue
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
        rest = self.rest
        assert rest is not None
        sim = ride["ride_id"]
        sub = f"sim-{self.run_id}-{ride['rider_id']}"
        token = self.mint(sub, "rider")
        sock = None
        if len(self.riders) < self.max_rider_sockets:
            try:
                async with self._connect:
                    sock = await self._socket(
                        RiderClient, token, lambda m: self._on_rider(sub, m), zlib.crc32(sub.encode())
                    ).start()
                self.riders[sub] = sock
            except Exception as exc:
                self.summary.errors[f"rider_connect:{type(exc).__name__}"] += 1
        pickup = (ride["pickup_lat"], ride["pickup_lng"])
        dropoff = (ride["dropoff_lat"], ride["dropoff_lng"])
        self._posting += 1
        try:
            quote_id = None
            if self.quote_first:
                try:
                    async with self._rest:
                        quote_id = (
                            await rest.call(
                                "POST",
                                "/v1/quotes",
                                json=proto.trip_body(pickup, dropoff, self.vehicle_class),
                                token=token,
                            )
                        )["quote_id"]
                except ClientError as exc:
                    self._error(exc, "quotes:")
            body = proto.trip_body(
                pickup, dropoff, self.vehicle_class, quote_id=quote_id, payment_method=self.payment_method
            )
            try:
                async with self._rest:
                    t_sent = time.monotonic()
                    created = await rest.call(
                        "POST",
                        "/v1/rides",
                        json=body,
                        token=token,
                        idempotency_key=f"sim-{self.run_id}-{sim}",
                    )
            except ClientError as exc:
                self._error(exc, "rides:")
                if sock is not None:
                    self.riders.pop(sub, None)
                    await sock.close()
                return
            rid = created["ride_id"]
            self._sim_of[rid], self._edge_of[sim] = sim, rid
            self._sent_at[sim] = t_sent
            self._rider_of[rid] = (sub, token)
            self._status.setdefault(rid, created.get("status", "requested"))
        finally:
            self._posting -= 1
        if sock is None:
            self.rides_polled += 1
            self._spawn(self._poll(rid, sub, token), self._polls)

    async def _poll(self, rid: str, sub: str, token: str) -> None:
        """A rider without a socket: re-read the ride until it ends (or the run does)."""
        assert self.rest is not None
        while not self._closing:
            await asyncio.sleep(self.poll_s * float(np.random.uniform(0.8, 1.2)))
            try:
                async with self._rest:
                    status = (await self.rest.call("GET", f"/v1/rides/{rid}", token=token))["status"]
            except ClientError:
                continue
            if status != self._status.get(rid):
                msg = {"type": "ride_status", "ride_id": rid, "status": status}
                self._inbox.append(("rider", sub, msg, time.monotonic()))
            if status in TERMINAL:
                return

    async def _ride_now(self, rid: str, driver_id: int) -> dict | None:
        """The ride as REST has it, read with the driver's token (after a lost reply)."""
        link = self.links.get(driver_id)
        if link is None:
            return None
        try:
            return await link.rest.ride(rid)
        except ClientError:
            return None

    async def _answer(self, driver_id: int, offer: dict, typ: str) -> dict | None:
        """``accept`` or ``decline``: the reply, None if refused (counted) or cut off."""
        link = self.links.get(driver_id)
        if link is None:
            return None
        ride_id = offer.get("edge_ride_id", offer.get("ride_id"))
        try:
            return await link.call(
                {"type": typ, "ride_id": ride_id, "offer_id": offer["offer_id"]}, CALL_TIMEOUT_S
            )
        except ClientError as exc:
            self._error(exc, f"{typ}:")
        except TimeoutError as exc:
            self.summary.errors[f"{typ}:{type(exc).__name__}"] += 1
        return None

    async def accept(self, offer: dict, driver_id: int) -> bool:
        rid = offer["edge_ride_id"]
        reply = await self._answer(driver_id, offer, "accept")
        if reply is None:
            # Cut off by a drop, or refused: what REST says is what happened.
            ride = await self._ride_now(rid, driver_id)
            if not (
                ride and ride.get("status") == "accepted" and ride.get("driver_id") == f"drv-{driver_id}"
            ):
                return False
        elif reply.get("status") != "accepted":
            self._error(reply, "accept:")
            return False
        self._driver_of[rid] = driver_id
        self._status[rid] = "accepted"
        self.links[driver_id].rides[rid] = "accepted"
        return True

    async def decline(self, offer: dict, driver_id: int) -> None:
        await self._answer(driver_id, offer, "decline")

    async def milestone(self, ride_id: str, driver_id: int, what: str) -> bool:
        rid = self._edge_of.get(ride_id)
        link = self.links.get(driver_id)
        if rid is None or link is None:
            return False
        typ, want = STEPS[what]
        reply: dict | None = None
        for attempt in range(2):
            try:
                reply = await link.step(typ, rid)
                break
            except ConnectionLost:
                # The socket dropped before the answer: the step may or may not have
                # happened. REST says; if not, send it again on the new connection.
                ride = await self._ride_now(rid, driver_id)
                if ride is not None and ride.get("status") == want:
                    reply = {"type": "ride_status", "status": want, **ride}
                    break
                if attempt == 1:
                    self.summary.errors[f"{typ}:connection_lost"] += 1
                    return False
            except ClientError as exc:
                self._error(exc, f"{typ}:")
                return False
            except TimeoutError:
                self.summary.errors[f"{typ}:TimeoutError"] += 1
                return False
        assert reply is not None
        if reply.get("status") != want:
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
        rest = self.rest
        assert rest is not None
        open_rides = [rid for rid in self._rider_of if self._status.get(rid) not in TERMINAL]

        async def end(rid: str, tries: int = 3) -> None:
            _sub, token = self._rider_of[rid]
            try:
                async with self._rest:
                    ride = await rest.call("GET", f"/v1/rides/{rid}", token=token)
            except ClientError:
                return
            status = ride["status"]
            # The ride's driver as the run knows it, or as the ride says: an accept whose
            # answer had not come back when the run ended is stored all the same.
            driver = self._driver_of.get(rid)
            if driver is None and isinstance(ride.get("driver_id"), str):
                driver = parse_driver_id(ride["driver_id"])
            link = self.links.get(driver if driver is not None else -1)
            if status in ("requested", "offered"):
                try:
                    async with self._rest:
                        await rest.call(
                            "POST",
                            f"/v1/rides/{rid}/cancel",
                            json={"reason": "simulation ended"},
                            token=token,
                        )
                except ClientError as exc:
                    if exc.status != 409:
                        raise
                    # Accepted meanwhile: by one of the run's drivers whose accept is still
                    # on its way back (look again shortly), or by a driver the run no
                    # longer answers for (nothing to end).
                    if tries > 1:
                        await asyncio.sleep(0.5)
                        await end(rid, tries - 1)
                    elif self._driver_of.get(rid) is not None:
                        raise
            elif link is not None and status in ("accepted", "arrived"):
                await link.cancel_ride(rid, "simulation ended")
            elif link is not None and status == "in_progress":
                await link.complete_trip(rid)

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


async def run_city(
    city: City,
    transport: Transport,
    seconds: float | None,
    on_summary=None,
    every_s: float = 5.0,
    stop: asyncio.Event | None = None,
) -> Summary:
    """Drive ``city`` through ``transport`` for ``seconds`` of wall time (None: until
    ``stop`` is set). Returns the city's summary; ``on_summary(summary)`` is called every
    ``every_s`` seconds. Offers to drivers that are not the city's are ignored (the
    engine may have other clients). Tasks still waiting at the end are cancelled."""
    start = time.monotonic()
    prev = 0.0
    last_summary = 0.0
    f = city.fleet
    # Everyone online first: a driver the shard knows from an earlier run as offline
    # would not come back with a plain position.
    first = f.all_rows(time.time())
    first["intent"] = int(Intent.ONLINE)
    first["vclass"] = 0
    await transport.send_locations(first)
    pending: set[asyncio.Task] = set()
    chain: dict[str, asyncio.Task] = {}  # ride id -> its latest milestone, so steps keep their order

    def spawn(coro) -> asyncio.Task:
        t = asyncio.create_task(coro)
        pending.add(t)
        t.add_done_callback(pending.discard)
        return t

    async def answer(driver_id: int, offer: dict, accept: bool) -> None:
        await asyncio.sleep(float(city.rng.uniform(*city.answer_delay_s)))
        if accept:
            if await transport.accept(offer, driver_id):
                city.on_accepted(driver_id, offer)
        else:
            city.summary.declined += 1
            await transport.decline(offer, driver_id)

    async def step(before: asyncio.Task | None, ride_id: str, driver_id: int, what: str) -> None:
        if before is not None:
            await asyncio.wait([before])
        if await transport.milestone(ride_id, driver_id, what):
            if what == "arrived":
                city.summary.arrived += 1
            elif what == "completed":
                city.summary.completed += 1
        if what == "completed" and chain.get(ride_id) is asyncio.current_task():
            del chain[ride_id]

    while True:
        now = time.monotonic() - start
        if (seconds is not None and now >= seconds) or (stop is not None and stop.is_set()):
            break
        idx = f.due(prev, now)
        for ride in city.new_requests(now - prev, time.time()):
            await transport.request_ride(ride)
        prev = now
        if len(idx):
            city.move(idx, now)
            await transport.send_locations(f.rows(idx, time.time()))
        for ride_id, driver_id, what in city.milestones(time.time()):
            chain[ride_id] = spawn(step(chain.get(ride_id), ride_id, driver_id, what))
        for kind, ident, msg in await transport.events():
            typ = msg.get("type")
            if kind == "driver":
                driver_id = int(ident)
                if driver_id not in city.index_of:
                    continue
                if typ == "offer":
                    spawn(answer(driver_id, msg, city.on_offer(driver_id, msg)))
                elif typ == "ride_status" and msg.get("status") == "cancelled":
                    city.drop_ride(driver_id, str(msg.get("ride_id")))
            elif kind == "rider" and typ == "ride_status":
                if msg.get("status") == "expired":
                    city.summary.expired += 1
                elif msg.get("status") == "cancelled":
                    city.summary.cancelled += 1
        if on_summary and now - last_summary >= every_s:
            last_summary = now
            on_summary(city.summary)
        await asyncio.sleep(0.05)
    for t in list(pending):
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return city.summary


async def drive(
    city: City,
    transport: EdgeTransport,
    seconds: float | None,
    on_summary: Callable[[Summary], None] | None = None,
    every_s: float = 5.0,
    stop: asyncio.Event | None = None,
    cleanup: bool = True,
) -> Summary:
    """Start ``transport``, run ``city`` through it (see :func:`run_city`),
    then end the run's open rides (``cleanup``), take the drivers offline and close it.
    The run ends early, without the clean-up, if every edge is gone (the sockets gave up
    reconnecting)."""
    from api.gc_policy import GcPolicy

    stop = stop or asyncio.Event()
    await transport.start()
    # Thousands of sockets' objects, as in an edge: without the edge's policy, full
    # collections walking them all were half the simulator's CPU while 3,000 sockets
    # reconnected to another edge (after the first died), and held the reconnects up.
    gc_policy = GcPolicy()
    gc_policy.install()

    async def watch() -> None:
        # Sockets move to another edge when theirs dies; only when no edge took them back
        # within their give-up time does the run end, rather than send into nothing forever.
        while not stop.is_set():
            await asyncio.sleep(1.0)
            gc_policy.tick()
            if transport.lost:
                transport.log("lost every edge: no socket could reconnect; ending the run")
                transport.summary.errors["edge_lost"] += 1
                stop.set()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        return await run_city(city, transport, seconds, on_summary=on_summary, every_s=every_s, stop=stop)
    finally:
        watcher.cancel()
        gc_policy.uninstall()
        await transport.close(cleanup=cleanup and not transport.lost, offline=offline_rows(city))


async def simulate(
    url: str | Iterable[str],
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
    edges at ``url`` (one, a comma list or a list: sockets fail over between them) for
    ``seconds`` (None: until ``stop``), printing the summary line every ``every_s``
    seconds through ``out``."""
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
    edges = ", ".join(edge_list(url))
    out(
        f"simulating {drivers} drivers and {requests_per_min:g} requests/min against {edges} "
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
