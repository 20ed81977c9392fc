"""The WebSocket endpoints: ``/v1/ws/driver``, ``/v1/ws/gateway``, ``/v1/ws/rider``.

Each handler authenticates (close 4401 for a missing, bad or expired token, 4403 for
the wrong role), greets with a ``welcome``, then loops over frames. A bad frame is
answered with an ``error`` message and the loop goes on; only the client, the idle
timeout or the edge shutting down (1001) end a socket. The protocol is in
docs/protocol.md; the decoding and checks in ``api/protocol.py``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, WebSocket

from actors.directory import remote_error
from api.auth import Principal, Role, Unauthorized, bearer
from api.edge import Connection, Edge, TokenBucket
from api.protocol import (
    PROTOCOL_VERSION,
    DriverState,
    FrameError,
    decode,
    error_message,
    field_str,
    parse_batch,
)
from dispatch.errors import DispatchError
from dispatch.trips import TripEvent

log = logging.getLogger("dispatch.edge")

router = APIRouter()

CLOSE_UNAUTHORIZED = 4401
CLOSE_FORBIDDEN = 4403


async def _authenticate(ws: WebSocket, edge: Edge, roles: set[Role], socket: str) -> Principal | None:
    """Accept the socket and check its token (``Authorization: Bearer`` or ``?access_token=``).

    On failure sends an error message and closes with 4401/4403; returns None.
    """
    await ws.accept()
    token = bearer(ws.headers.get("authorization")) or ws.query_params.get("access_token")
    try:
        principal = edge.auth.verify(token)
    except Unauthorized as exc:
        edge.counters.auth_failures["socket"] += 1
        await ws.send_json(error_message("unauthorized", exc.message))
        await ws.close(CLOSE_UNAUTHORIZED, exc.message[:120])
        return None
    if principal.role not in roles:
        edge.counters.auth_failures["socket"] += 1
        msg = f"a {principal.role.value} token cannot open the {socket} socket"
        await ws.send_json(error_message("forbidden", msg))
        await ws.close(CLOSE_FORBIDDEN, msg)
        return None
    return principal


def _frame_data(message: dict) -> bytes | str | None:
    data = message.get("bytes")
    return data if data is not None else message.get("text")


def _frame_handler(session: _Session, handle: Callable[[dict, float], Awaitable[None] | None]):
    """``on_frame(data)`` for :meth:`_Session.run`: decode, count, ``handle``, answer errors.

    Returns None when the frame is done with, or an awaitable that finishes it (when
    ``handle`` returned one). Never raises. Locals instead of attribute lookups, and the
    counter keys built once: this runs for every frame (25,000 a second per edge).
    """
    conn, counters, max_bytes = session.conn, session.edge.counters, session.max_bytes
    socket, frames = conn.socket, counters.frames
    keys = {t: (socket, t) for t in session.TYPES}
    unknown = (socket, "unknown")
    monotonic, wall = time.monotonic, time.time

    def fail(exc: Exception, msg) -> None:
        ref = msg.get("id") if isinstance(msg, dict) else None
        if not isinstance(exc, DispatchError):
            mapped = remote_error(exc)
            if not isinstance(mapped, DispatchError):
                log.error("%s socket: frame handling failed", socket, exc_info=exc)
                counters.rejected[(socket, "internal_error")] += 1
                conn.send(error_message("internal_error", "internal error; it has been logged", ref))
                return
            exc = mapped
        session.reject(exc, ref)

    async def finish(work: Awaitable[None], msg: dict) -> None:
        try:
            await work
        except Exception as exc:
            fail(exc, msg)

    def on_frame(data: bytes | str):
        if conn.closed:
            return None
        conn.last_seen = monotonic()
        conn.binary = type(data) is bytes
        msg = None
        try:
            msg = decode(data, max_bytes)
            typ = msg.get("type")
            frames[keys.get(typ, unknown) if type(typ) is str else unknown] += 1
            work = handle(msg, wall())
            if work is not None:
                return finish(work, msg)
        except Exception as exc:
            fail(exc, msg)
        return None

    return on_frame


class _Session:
    """Shared loop of the three sockets: receive, decode, dispatch to a handler, answer errors."""

    TYPES: tuple[str, ...] = ()

    def __init__(self, edge: Edge, conn: Connection, max_bytes: int) -> None:
        self.edge = edge
        self.conn = conn
        self.max_bytes = max_bytes

    def ack_heartbeat(self, msg: dict, now: float) -> None:
        """``heartbeat`` (every socket): answered ``heartbeat_ack`` with the server's time."""
        self.conn.send(
            {"type": "heartbeat_ack", "v": PROTOCOL_VERSION, "server_time": now, "ref": msg.get("id")}
        )

    async def sync_rides(self, msg: dict) -> None:
        """``sync``: the status and version of the caller's rides among ``ride_ids`` (a
        resumed client's re-read of its open rides, one query instead of a REST read per
        ride); answered with ``rides``."""
        ref = msg.get("id")
        rides = self.edge.rides
        if rides is None:
            raise FrameError("unavailable", "rides need Postgres, which this edge cannot reach", ref)
        ids = msg.get("ride_ids")
        if (
            not isinstance(ids, list)
            or not 0 < len(ids) <= MAX_SYNC_RIDES
            or not all(isinstance(i, str) and 0 < len(i) <= 64 for i in ids)
        ):
            raise FrameError(
                "invalid_field", f"'ride_ids' must be a list of 1 to {MAX_SYNC_RIDES} ride ids", ref
            )
        found = await rides.views.statuses(self.conn.principal, ids)
        self.conn.send({"type": "rides", "v": PROTOCOL_VERSION, "ref": ref, **found})

    def reject(self, exc: DispatchError, ref=None) -> None:
        ref = getattr(exc, "ref", None) if ref is None else ref
        self.edge.counters.rejected[(self.conn.socket, exc.code)] += 1
        self.conn.send(error_message(exc.code, exc.message, ref))

    async def run(self, handle: Callable[[dict, float], Awaitable[None] | None]) -> None:
        """Pass each frame, decoded, to ``handle(msg, now)`` until the socket is finished.

        Frames are handled one at a time, in order: when ``handle`` returns an awaitable,
        the next frame waits for it. A frame that fails is answered with an ``error``
        message (its ``ref`` is the frame's ``id``) and the socket goes on. Returns when
        the client disconnects or the edge closes the socket.

        Under the ``direct`` WebSocket implementation (api/ws_server.py) frames reach
        ``handle`` straight from the transport's callback, without a wake-up of this task
        per frame; otherwise this task receives them one by one.
        """
        from api.ws_server import EXTENSION

        ws, conn = self.conn.ws, self.conn
        on_frame = _frame_handler(self, handle)
        direct = (ws.scope.get("extensions") or {}).get(EXTENSION)
        if direct is not None:
            direct.start(on_frame)
            while (await ws.receive())["type"] != "websocket.disconnect":
                pass  # after start() only the disconnect comes this way
            return
        while not conn.closed:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = _frame_data(message)
            if data is not None:
                work = on_frame(data)
                if work is not None:
                    await work


# Ride ids one ``sync`` may name.
MAX_SYNC_RIDES = 100

# Driver messages about rides (docs/protocol.md), and the trip event each step is.
RIDE_STEPS = {"arrived": TripEvent.ARRIVE, "start_trip": TripEvent.START, "complete_trip": TripEvent.COMPLETE}
RIDE_TYPES = ("accept", "decline", "cancel_ride", *RIDE_STEPS)


def _unknown(typ, allowed: tuple[str, ...], ref) -> FrameError:
    return FrameError("unknown_type", f"unknown message type {typ!r}; this socket takes {list(allowed)}", ref)


# -- driver ------------------------------------------------------------------------------------


class DriverSession(_Session):
    """One driver's socket: its own positions, going online and offline, heartbeats.

    The connection remembers whether the driver is online and its vehicle class, and
    stamps them on every position it forwards (:class:`api.protocol.DriverState`): a
    shard that restarted and never heard the ``online`` learns them from the next
    position, and a position that follows a status change carries that change too.
    """

    TYPES = ("location", "online", "offline", "heartbeat", "sync", *RIDE_TYPES)

    def __init__(self, edge: Edge, conn: Connection) -> None:
        super().__init__(edge, conn, edge.settings.driver_max_frame_bytes)
        s = edge.settings
        driver_id = conn.principal.driver_id
        assert driver_id is not None, "the driver socket admits drivers only"
        self.driver_id = driver_id
        self.bucket = TokenBucket(s.driver_location_rate_per_s, s.driver_location_burst, time.monotonic())
        self.told_rate_limited = False
        self.state = DriverState(self.driver_id)
        # Bound once: location() runs for every frame.
        self._fields = edge.rules.fields
        self._submit = edge.router.submit_one
        self._updates = edge.counters.updates

    def limits(self) -> dict:
        s = self.edge.settings
        return {
            "max_frame_bytes": s.driver_max_frame_bytes,
            "location_rate_per_s": s.driver_location_rate_per_s,
            "location_burst": s.driver_location_burst,
            "idle_timeout_s": s.idle_timeout_s,
        }

    def handle(self, msg: dict, now: float):
        typ = msg.get("type")
        if typ == "location":
            return self.location(msg, now)
        if typ == "heartbeat":
            self.ack_heartbeat(msg, now)
            return None
        if typ == "online":
            return self.go_online(msg, now)
        if typ == "offline":
            return self.go_offline(msg, now)
        if typ in RIDE_TYPES:
            return self.ride_step(typ, msg)
        if typ == "sync":
            return self.sync_rides(msg)
        raise _unknown(typ, self.TYPES, msg.get("id"))

    def _own(self, msg: dict) -> None:
        claimed = msg.get("driver_id")
        if claimed is not None and claimed not in (self.driver_id, self.conn.principal.sub):
            raise FrameError("forbidden", "a driver reports only its own position", msg.get("id"))

    def location(self, msg: dict, now: float) -> None:
        self._own(msg)
        if not self.bucket.take(time.monotonic()):
            self.edge.counters.rate_limited["driver"] += 1
            if not self.told_rate_limited:
                self.told_rate_limited = True
                limit = self.edge.settings.driver_location_rate_per_s
                self.conn.send(
                    error_message(
                        "rate_limited",
                        f"more than {limit:g} location frames a second; the excess is dropped "
                        "(this is said once per connection)",
                        msg.get("id"),
                        limit_per_s=limit,
                    )
                )
            return
        self._submit(*self.state.position(*self._fields(msg, now), now))
        self._updates["driver"] += 1

    def go_online(self, msg: dict, now: float) -> None:
        self._own(msg)
        vclass = self.edge.rules.vehicle_class(msg)
        pos = None
        if "lat" in msg or "lng" in msg:
            pos = self.edge.rules.position(msg, now)
        elif self.state.last is None:
            raise FrameError(
                "invalid_field", "'online' needs 'lat' and 'lng' (no position sent yet)", msg.get("id")
            )
        self._submit(*self.state.go_online(vclass, pos, now))
        self.conn.send(
            {
                "type": "status",
                "v": PROTOCOL_VERSION,
                "status": "online",
                "ref": msg.get("id"),
                "vehicle_class": self.edge.region.drivers.vehicle_classes[vclass],
            }
        )

    def go_offline(self, msg: dict, now: float):
        self._own(msg)
        row = self.state.go_offline(now)
        if row is not None:
            self._submit(*row)
        self.conn.send({"type": "status", "v": PROTOCOL_VERSION, "status": "offline", "ref": msg.get("id")})

    async def ride_step(self, typ: str, msg: dict) -> None:
        """``accept``/``decline`` an offer, or a step of the driver's trip (api/rides.py)."""
        rides = self.edge.rides
        ref = msg.get("id")
        if rides is None:
            raise FrameError("unavailable", "rides need Postgres, which this edge cannot reach", ref)
        ride_id = field_str(msg, "ride_id")
        principal = self.conn.principal
        if typ in ("accept", "decline"):
            offer_id = field_str(msg, "offer_id")
            if typ == "decline":
                await rides.decline(principal, ride_id, offer_id)
                self.conn.send(
                    {
                        "type": "offer_declined",
                        "v": PROTOCOL_VERSION,
                        "offer_id": offer_id,
                        "ride_id": ride_id,
                        "ref": ref,
                    }
                )
                return
            ride = await rides.accept(principal, ride_id, offer_id)
            extra: dict = {
                "pickup": {"lat": ride.pickup_lat, "lng": ride.pickup_lng},
                "dropoff": {"lat": ride.dropoff_lat, "lng": ride.dropoff_lng},
            }
        elif typ == "cancel_ride":
            reason = msg.get("reason")
            if reason is not None and not isinstance(reason, str):
                raise FrameError("invalid_field", "'reason' must be a string", ref)
            ride, extra = await rides.cancel(principal, ride_id, reason)
        else:
            ride, extra = await rides.advance(principal, ride_id, RIDE_STEPS[typ])
        self.conn.send(
            {
                "type": "ride_status",
                "v": PROTOCOL_VERSION,
                "ride_id": ride.ride_id,
                "status": ride.status.value,
                "version": ride.version,
                "ref": ref,
                **extra,
            }
        )


async def _serve(ws: WebSocket, roles: set[Role], socket: str, audience: str | None, make_session) -> None:
    edge: Edge = ws.app.state.edge
    if edge.stopping:
        await ws.accept()
        await ws.close(1001, "edge shutting down")
        return
    principal = await _authenticate(ws, edge, roles, socket)
    if principal is None:
        return
    binary = ws.query_params.get("encoding", "json") == "msgpack"
    conn = Connection(ws, principal, socket, binary)
    ident = str(principal.driver_id) if audience == "driver" else principal.sub
    session = make_session(edge, conn)
    conn.start()
    edge.register(conn, audience or socket, ident)
    try:
        welcome = {
            "type": "welcome",
            "v": PROTOCOL_VERSION,
            "role": principal.role.value,
            "sub": principal.sub,
            "edge": edge.settings.edge_id,
            "limits": session.limits(),
        }
        # Events reach a socket once its bus channel is subscribed: say whether it is, so
        # a client reading its state now (a resume) knows it has missed nothing after.
        subscribed = await edge.subscribed(audience or socket, ident)
        if subscribed is not None:
            welcome["subscribed"] = subscribed
        conn.send(welcome)
        await session.run(session.handle)
    except Exception as exc:
        # starlette raises on receive after a close; anything else is ours to log
        if type(exc).__name__ not in ("WebSocketDisconnect", "RuntimeError"):
            log.exception("%s socket failed", socket)
    finally:
        edge.unregister(conn, audience or socket, ident)
        await conn.close(1000)


@router.websocket("/v1/ws/driver")
async def driver_socket(ws: WebSocket) -> None:
    await _serve(ws, {Role.DRIVER}, "driver", "driver", DriverSession)


# -- gateway -----------------------------------------------------------------------------------


class GatewaySession(_Session):
    """A fleet gateway: ``batch`` frames of many drivers' updates (columnar), ``heartbeat``."""

    TYPES = ("batch", "heartbeat")

    def __init__(self, edge: Edge, conn: Connection) -> None:
        super().__init__(edge, conn, edge.settings.gateway_max_frame_bytes)
        self._key = 0.0  # order key of the last batch (LOCATION_DTYPE)

    def limits(self) -> dict:
        from api.protocol import MAX_BATCH_ROWS

        return {
            "max_frame_bytes": self.max_bytes,
            "max_batch_rows": MAX_BATCH_ROWS,
            "idle_timeout_s": self.edge.settings.idle_timeout_s,
        }

    def handle(self, msg: dict, now: float) -> None:
        typ = msg.get("type")
        if typ == "heartbeat":
            self.ack_heartbeat(msg, now)
            return
        if typ != "batch":
            raise _unknown(typ, self.TYPES, msg.get("id"))
        self._key = now if now > self._key else math.nextafter(self._key, math.inf)
        batch = parse_batch(msg, self.edge.region, self.edge.map, now, self._key)
        accepted = self.edge.router.submit(batch.rows) if len(batch.rows) else 0
        c = self.edge.counters
        c.updates["gateway"] += accepted
        for reason, n in batch.rejected.items():
            c.rows_rejected[reason] += n
        if batch.rejected or accepted < len(batch.rows) or msg.get("ack"):
            self.conn.send(
                {
                    "type": "batch_ack",
                    "v": PROTOCOL_VERSION,
                    "ref": msg.get("id"),
                    "received": batch.received,
                    "accepted": accepted,
                    "rejected": batch.rejected,
                    "backpressure": len(batch.rows) - accepted,
                }
            )


@router.websocket("/v1/ws/gateway")
async def gateway_socket(ws: WebSocket) -> None:
    await _serve(ws, {Role.GATEWAY}, "gateway", None, GatewaySession)


# -- rider ---------------------------------------------------------------------------------------


class RiderSession(_Session):
    """A rider's socket: receives its own events (ride status, driver positions); sends
    ``heartbeat`` and ``sync``. Ride requests and cancellations go over REST."""

    TYPES = ("heartbeat", "sync")

    def __init__(self, edge: Edge, conn: Connection) -> None:
        super().__init__(edge, conn, edge.settings.driver_max_frame_bytes)

    def limits(self) -> dict:
        return {"max_frame_bytes": self.max_bytes, "idle_timeout_s": self.edge.settings.idle_timeout_s}

    def handle(self, msg: dict, now: float):
        typ = msg.get("type")
        if typ == "heartbeat":
            self.ack_heartbeat(msg, now)
            return None
        if typ == "sync":
            return self.sync_rides(msg)
        raise _unknown(typ, self.TYPES, msg.get("id"))


@router.websocket("/v1/ws/rider")
async def rider_socket(ws: WebSocket) -> None:
    await _serve(ws, {Role.RIDER}, "rider", "rider", RiderSession)
