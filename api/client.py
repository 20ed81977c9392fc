"""The client library: the one implementation of the edge's protocol (docs/protocol.md)
and its REST API, for the simulator, the load tests, the benchmarks, the end-to-end tests
and client apps.

Layers, bottom up:

- **Frames** (Sans-I/O, no sockets): :func:`encode` / :func:`decode`, the message
  builders (:func:`location`, :func:`online`, :func:`accept`, :func:`batch` ...) and
  :class:`CallIds` (numbering calls and matching replies by ``ref``). A client that brings
  its own socket (Locust's gevent users, the raw-socket benchmarks) uses only these.
- **REST**: :class:`Rest`, one method per endpoint, answering the response's JSON body or
  raising :class:`ApiError` (``status``, ``code``, ``retry_after_s``). It retries 429,
  503 and lost connections with the same ``Idempotency-Key``, moving to the next edge
  when one does not answer.
- **Sockets**: :class:`Connection` is one open WebSocket (``welcome`` checked, a reader
  task, :meth:`Connection.call` by ``id``/``ref``). :class:`Client` keeps one alive over a
  list of edges: heartbeats, and when the socket drops (an edge killed, a 1001/1012
  close, a refused connection) it reconnects with backoff to the next edge, then resumes.
  :class:`DriverClient`, :class:`RiderClient` and :class:`GatewayClient` add each
  socket's messages and what resuming means for it: a driver re-sends its online state
  and latest position and re-reads its open rides over REST; a rider re-reads its rides
  (the protocol: a reconnecting client gets its current state from REST).

Events (everything that is not the reply to a call) go to ``on_message(msg)`` when given,
else to a queue read with :meth:`Client.next`. After a resume the client delivers a
``ride_status`` it read over REST for each of its rides whose status changed while it
was away, marked ``"resync": True``.

Example::

    async with DriverClient(["http://edge-a:8000", "http://edge-b:8000"], token) as d:
        await d.go_online(37.7793, -122.4193)
        offer = await d.next("offer")
        ride = await d.accept(offer)          # ride_status, or ClientError("offer_unavailable")
        await d.send_location(37.7795, -122.4190)

Needs ``websockets``, ``httpx`` and ``msgpack`` (all main dependencies); ``numpy`` only
for :func:`batch`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, TypeVar

import httpx
import msgpack

log = logging.getLogger("dispatch.client")

PROTOCOL_VERSION = 1
DRIVER_PATH = "/v1/ws/driver"
GATEWAY_PATH = "/v1/ws/gateway"
RIDER_PATH = "/v1/ws/rider"
TERMINAL = frozenset({"completed", "cancelled", "expired"})
# The driver socket's trip steps, the REST path of each, and the status each leads to.
STEPS = {
    "arrived": ("arrived", "arrived"),
    "start_trip": ("start", "in_progress"),
    "complete_trip": ("complete", "completed"),
}
CALL_TIMEOUT_S = 20.0
# The edge closes a socket silent for 60 s; a client with nothing to say heartbeats.
HEARTBEAT_S = 20.0
# Reconnect backoff: the next edge is tried at once, then after these growing pauses (a
# full round of edges between pauses), so a client is back within ~1 s of a dead edge.
BACKOFF_S = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0)
# A new socket hears relayed events only once its edge has subscribed it on the bus. The
# welcome says whether that is done (``subscribed``); when it is not (the bus is slow or
# down), an event in the gap may be lost, so a resumed client reads its rides over REST
# again after this long. (Reading them twice after every reconnect doubled the REST load
# of a reconnect storm: 3,000 drivers moving to another edge held riders' requests up.)
RESYNC_AGAIN_S = 1.0


# -- errors ---------------------------------------------------------------------------------


class ClientError(Exception):
    """The edge refused something: ``code`` (stable, as in docs/protocol.md), ``message``,
    ``detail``; ``status`` for REST, None for a socket's ``error`` frame;
    ``retry_after_s`` when the edge said when to retry."""

    def __init__(
        self,
        code: str,
        message: str = "",
        *,
        status: int | None = None,
        retry_after_s: float | None = None,
        detail: dict | None = None,
        ref: Any = None,
    ) -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message
        self.status = status
        self.retry_after_s = retry_after_s
        self.detail = detail or {}
        self.ref = ref

    @classmethod
    def from_frame(cls, msg: dict) -> ClientError:
        return cls(
            str(msg.get("code") or "error"),
            str(msg.get("message") or ""),
            detail=msg.get("detail") if isinstance(msg.get("detail"), dict) else None,
            ref=msg.get("ref"),
        )


class ApiError(ClientError):
    """A REST call answered with an error status."""


class ConnectionLost(ClientError, ConnectionError):
    """The socket closed (or no edge could be reached) before the answer came."""

    def __init__(self, message: str = "socket closed", close_code: int | None = None) -> None:
        super().__init__("connection_lost", message)
        self.close_code = close_code


# -- frames (Sans-I/O) ----------------------------------------------------------------------


def encode(msg: dict, encoding: str = "msgpack") -> bytes | str:
    """One message as a frame: msgpack bytes (a binary frame) or JSON text."""
    if encoding == "msgpack":
        return msgpack.packb(msg)
    if encoding == "json":
        return json.dumps(msg, separators=(",", ":"))
    raise ValueError(f"encoding must be 'msgpack' or 'json', not {encoding!r}")


def decode(raw: bytes | str) -> dict:
    """A frame as its message: binary frames are msgpack, text frames JSON. Raises
    ValueError for a frame that is neither, or not a map."""
    try:
        msg = msgpack.unpackb(raw) if isinstance(raw, bytes | bytearray) else json.loads(raw)
    except Exception as exc:
        raise ValueError(f"undecodable frame: {exc}") from None
    if not isinstance(msg, dict):
        raise ValueError(f"a frame must be a map, not {type(msg).__name__}")
    return msg


def ws_url(base_url: str, path: str, encoding: str = "msgpack") -> str:
    """``http://host:port`` (or ``ws://...``) and a socket path → the socket's URL."""
    base = base_url.rstrip("/")
    if base.startswith("http"):
        base = "ws" + base[len("http") :]
    return f"{base}{path}?encoding={encoding}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _opt(msg: dict, **fields: Any) -> dict:
    msg.update({k: v for k, v in fields.items() if v is not None})
    return msg


def location(
    lat: float,
    lng: float,
    ts: float | None = None,
    heading: float | None = None,
    speed: float | None = None,
) -> dict:
    """A driver's ``location`` (``ts`` absent: the edge's time of receipt)."""
    return _opt({"type": "location", "lat": lat, "lng": lng}, ts=ts, heading=heading, speed=speed)


def online(
    lat: float | None = None,
    lng: float | None = None,
    vehicle_class: str | None = None,
    ts: float | None = None,
    heading: float | None = None,
    speed: float | None = None,
) -> dict:
    """``online`` (without a position the edge uses the last one sent on the socket)."""
    msg: dict[str, Any] = {"type": "online"}
    if lat is not None and lng is not None:
        msg.update(lat=lat, lng=lng)
    return _opt(msg, vehicle_class=vehicle_class, ts=ts, heading=heading, speed=speed)


def offline() -> dict:
    return {"type": "offline"}


def heartbeat() -> dict:
    return {"type": "heartbeat"}


def accept(ride_id: str, offer_id: str) -> dict:
    return {"type": "accept", "ride_id": ride_id, "offer_id": offer_id}


def decline(ride_id: str, offer_id: str) -> dict:
    return {"type": "decline", "ride_id": ride_id, "offer_id": offer_id}


def trip_step(step: str, ride_id: str) -> dict:
    """``arrived``, ``start_trip`` or ``complete_trip`` of ``ride_id``."""
    if step not in STEPS:
        raise ValueError(f"step must be one of {sorted(STEPS)}, not {step!r}")
    return {"type": step, "ride_id": ride_id}


def cancel_ride(ride_id: str, reason: str | None = None) -> dict:
    return _opt({"type": "cancel_ride", "ride_id": ride_id}, reason=reason)


# The columns of a gateway ``batch`` frame as raw little-endian arrays, by row field.
BATCH_COLUMNS = (
    ("driver_id", "<i8"),
    ("lat", "<f8"),
    ("lng", "<f8"),
    ("ts", "<f8"),
    ("heading", "<f4"),
    ("speed", "<f4"),
    ("vclass", "<i2"),
    ("intent", "<i1"),
)


def sync(ride_ids: Sequence[str]) -> dict:
    """Ask the socket's edge for the status of these rides (answered with ``rides``)."""
    return {"type": "sync", "ride_ids": list(ride_ids)}


def batch(rows: Any, *, ack: bool = False, id: Any = None) -> dict:
    """A gateway ``batch`` of location rows (a numpy structured array with the fields of
    ``dispatch.drivers.LOCATION_DTYPE``; missing fields are left out), columns as ``bin``."""
    names = rows.dtype.names or ()
    return batch_of(ack=ack, id=id, **{name: rows[name] for name, _ in BATCH_COLUMNS if name in names})


def batch_of(*, ack: bool = False, id: Any = None, **columns: Any) -> dict:
    """A gateway ``batch`` from columns by name (``driver_id``, ``lat``, ``lng`` and any of
    ``ts``, ``heading``, ``speed``, ``vclass``, ``intent``: arrays or sequences of one
    length), each sent as raw little-endian bytes of its wire type."""
    import numpy as np

    wire = dict(BATCH_COLUMNS)
    unknown = set(columns) - set(wire)
    if unknown:
        raise ValueError(f"not batch columns: {sorted(unknown)}")
    msg: dict[str, Any] = {"type": "batch"}
    for name, dtype in BATCH_COLUMNS:
        if name in columns:
            msg[name] = np.ascontiguousarray(columns[name], dtype=dtype).tobytes()
    if ack:
        msg["ack"] = True
    return _opt(msg, id=id)


class CallIds:
    """Numbers calls and recognises their replies: :meth:`stamp` gives a message its
    ``id``; :meth:`is_reply` says whether a received message answers it."""

    def __init__(self) -> None:
        self._n = itertools.count(1)

    def stamp(self, msg: dict) -> tuple[int, dict]:
        n = next(self._n)
        return n, {**msg, "id": n}

    @staticmethod
    def is_reply(msg: dict, n: int) -> bool:
        return msg.get("ref") == n


def reply_or_raise(reply: dict) -> dict:
    """A call's reply, or its ``error`` raised as :class:`ClientError`."""
    if reply.get("type") == "error":
        raise ClientError.from_frame(reply)
    return reply


def mint_token(
    secret: str,
    sub: str,
    role: str,
    ttl_s: int = 3600,
    *,
    issuer: str = "dispatch",
    audience: str = "dispatch",
    now: float | None = None,
) -> str:
    """An HS256 token the edges sharing ``secret`` accept (tests, simulations, load
    tests; production clients get theirs from the identity provider)."""
    import jwt

    now = time.time() if now is None else now
    claims = {
        "sub": sub,
        "role": role,
        "iat": int(now),
        "exp": int(now) + ttl_s,
        "iss": issuer,
        "aud": audience,
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, secret, algorithm="HS256")


def token_minter(secret: str, ttl_s: int = 24 * 3600) -> Callable[[str, str], str]:
    """``mint(sub, role)`` with ``secret``."""
    return lambda sub, role: mint_token(secret, sub, role, ttl_s)


T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to its end on uvloop when it is installed (it comes with the edge's
    uvicorn), else on asyncio's own loop. For processes that hold many of this library's
    sockets: 3,000 of them reconnecting to another edge took a quarter less CPU on uvloop
    (1.70 -> 1.29 s, all back 2.84 -> 2.29 s on this machine)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def edge_list(urls: str | Iterable[str]) -> list[str]:
    """``"http://a,http://b"`` or a list of them (each may hold commas) → base URLs."""
    items = [urls] if isinstance(urls, str) else list(urls)
    out = [u.strip().rstrip("/") for item in items for u in item.split(",") if u.strip()]
    if not out:
        raise ValueError("at least one edge URL is needed")
    return out


# -- REST -----------------------------------------------------------------------------------


def _point(p: Sequence[float] | dict) -> dict:
    if isinstance(p, dict):
        return {"lat": p["lat"], "lng": p["lng"]}
    return {"lat": p[0], "lng": p[1]}


def trip_body(pickup, dropoff, vehicle_class: str | None = None, **extra: Any) -> dict:
    """The body of ``POST /v1/quotes`` and ``POST /v1/rides``; points as ``(lat, lng)``
    or ``{"lat", "lng"}``; ``extra`` (``quote_id``, ``payment_method``) unless None."""
    body = {"pickup": _point(pickup), "dropoff": _point(dropoff)}
    return _opt(body, vehicle_class=vehicle_class, **extra)


def error_of(status: int, body: Any, headers: Any = None) -> ApiError:
    """The :class:`ApiError` of an error response (``{"error": {code, message, detail}}``)."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        err = {"code": str(status), "message": str(body)[:200]}
    retry = headers.get("Retry-After") if headers is not None else None
    try:
        retry_s = float(retry) if retry is not None else None
    except ValueError:
        retry_s = None
    return ApiError(
        str(err.get("code") or status),
        str(err.get("message") or ""),
        status=status,
        retry_after_s=retry_s,
        detail=err.get("detail") if isinstance(err.get("detail"), dict) else None,
    )


class Rest:
    """The REST API of the edges at ``urls`` as ``token``.

    Every method answers the response's JSON body (a dict; None for 204) or raises
    :class:`ApiError`. 429 and 503 are retried after their ``Retry-After`` (at most
    ``max_retry_after_s``), a lost connection on the next edge, up to ``retries`` tries in
    all, with the same ``Idempotency-Key``: a POST that creates something gets one made
    here when the caller gives none. ``http`` shares a connection pool among clients
    (closed by its owner); without it the client makes and closes its own.
    """

    def __init__(
        self,
        urls: str | Iterable[str],
        token: str | None = None,
        *,
        http: httpx.AsyncClient | None = None,
        retries: int = 3,
        timeout_s: float = 30.0,
        max_retry_after_s: float = 5.0,
    ) -> None:
        self.urls = edge_list(urls)
        self.token = token
        self.retries = max(1, retries)
        self.max_retry_after_s = max_retry_after_s
        self.timeout_s = timeout_s
        self._own = http is None
        self._http = http
        self._edge = 0

    @property
    def http(self) -> httpx.AsyncClient:
        """The connection pool (made on first use when none was given)."""
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self.timeout_s)
        return self._http

    @property
    def url(self) -> str:
        """The edge this client talks to now."""
        return self.urls[self._edge % len(self.urls)]

    async def close(self) -> None:
        if self._own and self._http is not None:
            await self._http.aclose()
            self._http = None

    async def __aenter__(self) -> Rest:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict | None = None,
        idempotency_key: str | None = None,
        token: str | None = None,
    ) -> Any:
        """One request with the retries above; the JSON body, or ApiError."""
        headers: dict[str, str] = {}
        tok = token or self.token
        if tok:
            headers.update(bearer(tok))
        if idempotency_key:
            headers["Idempotency-Key"] = idempotency_key
        last: Exception | None = None
        for attempt in range(self.retries):
            edge = self._edge
            try:
                r = await self.http.request(
                    method, self.urls[edge % len(self.urls)] + path, json=json, params=params, headers=headers
                )
            except httpx.TransportError as exc:
                last = exc
                # This edge did not answer: the next one. Once, however many requests in
                # flight failed on it (each moving on would cycle back to the dead edge).
                if self._edge == edge:
                    self._edge += 1
                await asyncio.sleep(min(0.1 * attempt, 1.0))
                continue
            if r.status_code < 400:
                return r.json() if r.content else None
            try:
                body = r.json()
            except ValueError:
                body = r.text
            err = error_of(r.status_code, body, r.headers)
            if r.status_code not in (429, 503) or attempt == self.retries - 1:
                raise err
            last = err
            await asyncio.sleep(min(err.retry_after_s or 0.5 * (attempt + 1), self.max_retry_after_s))
        if isinstance(last, ClientError):
            raise last
        raise ConnectionLost(f"{method} {path}: no edge answered ({last!r})")

    # -- riders ------------------------------------------------------------------------------

    async def quote(self, pickup, dropoff, vehicle_class: str | None = None) -> dict:
        return await self.call("POST", "/v1/quotes", json=trip_body(pickup, dropoff, vehicle_class))

    async def request_ride(
        self,
        pickup,
        dropoff,
        vehicle_class: str | None = None,
        *,
        quote_id: str | None = None,
        payment_method: str | None = None,
        idempotency_key: str | None = None,
        **extra: Any,
    ) -> dict:
        """``POST /v1/rides``; ``idempotency_key`` made here if not given (retries reuse it)."""
        body = trip_body(
            pickup, dropoff, vehicle_class, quote_id=quote_id, payment_method=payment_method, **extra
        )
        key = idempotency_key or f"ride-{uuid.uuid4().hex}"
        return await self.call("POST", "/v1/rides", json=body, idempotency_key=key)

    async def ride(self, ride_id: str) -> dict:
        return await self.call("GET", f"/v1/rides/{ride_id}")

    async def my_rides(self, limit: int = 20) -> list[dict]:
        return await self.call("GET", "/v1/rides", params={"limit": limit})

    async def cancel(
        self, ride_id: str, reason: str | None = None, idempotency_key: str | None = None
    ) -> dict:
        body = {"reason": reason} if reason is not None else None
        return await self.call(
            "POST", f"/v1/rides/{ride_id}/cancel", json=body, idempotency_key=idempotency_key
        )

    async def receipt(self, ride_id: str) -> dict:
        return await self.call("GET", f"/v1/rides/{ride_id}/receipt")

    async def wallet(self) -> dict:
        return await self.call("GET", "/v1/riders/me/wallet")

    async def nearby(self, lat: float, lng: float, **params: Any) -> dict:
        """``GET /v1/drivers/nearby`` (``radius_m``, ``limit``, ``vehicle_class``)."""
        return await self.call("GET", "/v1/drivers/nearby", params={"lat": lat, "lng": lng, **params})

    # -- drivers -----------------------------------------------------------------------------

    async def me(self) -> dict:
        return await self.call("GET", "/v1/drivers/me")

    async def earnings(self) -> dict:
        return await self.call("GET", "/v1/drivers/me/earnings")

    async def accept(self, ride_id: str, offer_id: str) -> dict:
        return await self.call("POST", f"/v1/rides/{ride_id}/accept", json={"offer_id": offer_id})

    async def decline(self, ride_id: str, offer_id: str) -> None:
        await self.call("POST", f"/v1/rides/{ride_id}/decline", json={"offer_id": offer_id})

    async def step(self, step: str, ride_id: str) -> dict:
        """``arrived``, ``start_trip`` or ``complete_trip`` over REST."""
        path, _status = STEPS[step]
        return await self.call("POST", f"/v1/rides/{ride_id}/{path}")

    # -- admin -------------------------------------------------------------------------------

    async def top_up(self, rider_id: str, amount_cents: int, idempotency_key: str | None = None) -> dict:
        return await self.call(
            "POST",
            f"/v1/admin/riders/{rider_id}/wallet/top-up",
            json={"amount_cents": amount_cents},
            idempotency_key=idempotency_key or f"top-up-{uuid.uuid4().hex}",
        )


# -- sockets --------------------------------------------------------------------------------


class Connection:
    """One open WebSocket to one edge. :meth:`call` numbers a message and returns the
    reply that refers to it; every other message goes to ``on_message``. When the socket
    closes, waiting calls fail with :class:`ConnectionLost` and ``closed`` is set."""

    def __init__(self, ws: Any, url: str, welcome: dict, encoding: str, on_message: Callable[[dict], None]):
        self.ws = ws
        self.url = url
        self.welcome = welcome
        self.encoding = encoding
        self.on_message = on_message
        self.ids = CallIds()
        self.pending: dict[int, asyncio.Future] = {}
        self.last_sent = time.monotonic()
        self.closed = asyncio.Event()
        self.close_code: int | None = None
        self.task = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(
        cls,
        url: str,
        path: str,
        token: str,
        on_message: Callable[[dict], None],
        *,
        encoding: str = "msgpack",
        timeout_s: float = 10.0,
        max_queue: int = 64,
    ) -> Connection:
        """Connect and read the ``welcome``; ClientError (``unauthorized``, ``forbidden``)
        if the edge refuses, OSError or TimeoutError if it cannot be reached."""
        from websockets.asyncio.client import connect

        # No protocol pings (the edge counts only messages as life; heartbeats keep the
        # socket open) and no compression: small frames, and CPU is what clients lack.
        # No proxy: edges are reached directly, and looking the proxy settings up in the
        # environment on every connect was a tenth of a reconnect's CPU.
        ws = await connect(
            ws_url(url, path, encoding),
            additional_headers=bearer(token),
            ping_interval=None,
            compression=None,
            proxy=None,
            open_timeout=timeout_s,
            max_queue=max_queue,
        )
        try:
            first = decode(await asyncio.wait_for(ws.recv(), timeout_s))
        except BaseException:
            await ws.close()
            raise
        if first.get("type") != "welcome":
            await ws.close()
            raise ClientError.from_frame(first)
        return cls(ws, url, first, encoding, on_message)

    @property
    def is_open(self) -> bool:
        return not self.closed.is_set()

    async def send(self, msg: dict) -> None:
        if self.closed.is_set():
            raise ConnectionLost("socket closed", self.close_code)
        try:
            await self.ws.send(encode(msg, self.encoding))
        except Exception as exc:
            raise ConnectionLost(f"send failed: {exc!r}", self.close_code) from None
        self.last_sent = time.monotonic()

    async def call(self, msg: dict, timeout_s: float = CALL_TIMEOUT_S) -> dict:
        """Send ``msg`` with an ``id``; its reply (an ``error`` reply too, not raised).
        ConnectionLost if the socket closes first, TimeoutError after ``timeout_s``."""
        n, stamped = self.ids.stamp(msg)
        fut = asyncio.get_running_loop().create_future()
        self.pending[n] = fut
        try:
            await self.send(stamped)
            return await asyncio.wait_for(fut, timeout_s)
        finally:
            self.pending.pop(n, None)

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                try:
                    msg = decode(raw)
                except ValueError:
                    log.warning("undecodable frame from %s", self.url)
                    continue
                ref = msg.get("ref")
                fut = self.pending.get(ref) if isinstance(ref, int) else None
                if fut is not None and not fut.done():
                    fut.set_result(msg)
                else:
                    try:
                        self.on_message(msg)
                    except Exception:
                        log.exception("on_message failed")
        except Exception:
            pass  # closed by either side, or the edge died: what is pending fails below
        finally:
            self.close_code = getattr(self.ws, "close_code", None)
            self.closed.set()
            for fut in self.pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionLost("socket closed", self.close_code))

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ws.close(), 5.0)
        self.task.cancel()
        with contextlib.suppress(BaseException):
            await self.task


class Client:
    """A socket kept open over the edges at ``urls``, resumed after every reconnect.

    :meth:`start` connects to the first edge that answers. When the socket drops, the
    client reconnects with backoff (:data:`BACKOFF_S`), trying the edges in turn from the
    one after the lost one, re-authenticates with the same token, then runs
    :meth:`resume`. It gives up, and ends with ``failed`` set, after ``give_up_s`` without
    any edge (None: never), or at once when an edge refuses the token.

    Sends wait up to ``wait_s`` for a connection; calls interrupted by a drop raise
    :class:`ConnectionLost` (resending a step is the caller's decision: after a resume,
    the ride's state is what REST says). Sockets silent for ``heartbeat_s`` heartbeat.
    """

    path = DRIVER_PATH

    def __init__(
        self,
        urls: str | Iterable[str],
        token: str,
        *,
        encoding: str = "msgpack",
        on_message: Callable[[dict], None] | None = None,
        heartbeat_s: float | None = HEARTBEAT_S,
        give_up_s: float | None = 30.0,
        wait_s: float = 10.0,
        connect_timeout_s: float = 10.0,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.urls = edge_list(urls)
        self.token = token
        self.encoding = encoding
        self.on_message = on_message
        self.heartbeat_s = heartbeat_s
        self.give_up_s = give_up_s
        self.wait_s = wait_s
        self.connect_timeout_s = connect_timeout_s
        self.rest = Rest(self.urls, token, http=http)
        self.events: asyncio.Queue[dict] = asyncio.Queue()
        self.conn: Connection | None = None
        self.reconnects = 0
        self.failed: BaseException | None = None
        self._edge = 0
        self._up = asyncio.Event()
        self._done = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task | None = None
        self._later: asyncio.Task | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> Client:
        """Connect (the first edge that answers, in order) and start keeping the socket;
        raises what the last edge raised if none would take it."""
        self.conn = await self._connect_any(rounds=1)
        self._up.set()
        self._task = asyncio.get_running_loop().create_task(self._keep())
        return self

    async def close(self) -> None:
        """Close for good (no reconnect)."""
        self._closing = True
        if self._later is not None:
            self._later.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self.conn is not None:
            await self.conn.close()
        self._up.clear()
        self._done.set()
        await self.rest.close()

    async def __aenter__(self):
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self.conn is not None and self.conn.is_open

    @property
    def ended(self) -> bool:
        """Closed, or given up on every edge."""
        return self._done.is_set()

    @property
    def url(self) -> str | None:
        """The edge the socket is on now."""
        return self.conn.url if self.conn is not None else None

    async def _connect_any(self, rounds: int | None) -> Connection:
        """Try the edges in turn from ``self._edge``, with backoff between full rounds."""
        started = time.monotonic()
        last: BaseException | None = None
        for r in itertools.count():
            if rounds is not None and r >= rounds:
                break
            pause = BACKOFF_S[min(r, len(BACKOFF_S) - 1)]
            if pause:
                await asyncio.sleep(pause)
            for _ in range(len(self.urls)):
                url = self.urls[self._edge % len(self.urls)]
                try:
                    return await Connection.open(
                        url,
                        self.path,
                        self.token,
                        self._deliver,
                        encoding=self.encoding,
                        timeout_s=self.connect_timeout_s,
                    )
                except ClientError:
                    raise  # refused (a bad token): another edge would say the same
                except Exception as exc:  # refused, reset, timed out: the next edge
                    last = exc
                    self._edge += 1
            if self.give_up_s is not None and time.monotonic() - started > self.give_up_s:
                break
        raise ConnectionLost(f"no edge of {self.urls} took the socket ({last!r})")

    async def _keep(self) -> None:
        beat = asyncio.get_running_loop().create_task(self._beat()) if self.heartbeat_s else None
        try:
            while not self._closing:
                assert self.conn is not None
                await self.conn.closed.wait()
                if self._closing:
                    return
                self._up.clear()
                code = self.conn.close_code
                log.info("socket to %s closed (%s); reconnecting", self.conn.url, code)
                self._edge += 1  # the lost edge last: it may be the one that died
                try:
                    self.conn = await self._connect_any(rounds=None)
                except BaseException as exc:
                    self.failed = exc
                    self._done.set()
                    return
                self.reconnects += 1
                try:
                    await self.resume()
                except Exception:
                    log.exception("resume after reconnect failed")
                self._up.set()
                if not self.conn.welcome.get("subscribed"):
                    self._later = asyncio.get_running_loop().create_task(self._resync_later())
        finally:
            if beat is not None:
                beat.cancel()

    async def _beat(self) -> None:
        assert self.heartbeat_s is not None
        while True:
            await asyncio.sleep(self.heartbeat_s / 4)
            c = self.conn
            if c is not None and c.is_open and time.monotonic() - c.last_sent >= self.heartbeat_s:
                with contextlib.suppress(ClientError):
                    await c.send(heartbeat())

    async def resume(self) -> None:
        """What to do on a new connection before the client's own sends go on (the base
        client: nothing). Runs with ``self.conn`` open; sends on it directly."""

    async def resync(self) -> None:
        """Read over REST what events may have been missed (the base client: nothing)."""

    async def _resync_later(self) -> None:
        await asyncio.sleep(RESYNC_AGAIN_S)
        try:
            await self.resync()
        except Exception:
            log.exception("resync after reconnect failed")

    # -- messages ----------------------------------------------------------------------------

    def _deliver(self, msg: dict) -> None:
        self.observe(msg)
        if self.on_message is not None:
            self.on_message(msg)
        else:
            self.events.put_nowait(msg)

    def observe(self, msg: dict) -> None:
        """Every event received (before delivery): subclasses keep their state from it."""

    async def next(self, want: str | None = None, timeout_s: float = 15.0) -> dict:
        """The next queued event (of type ``want``, dropping others); TimeoutError after
        ``timeout_s``. Only without ``on_message``."""
        deadline = time.monotonic() + timeout_s
        while True:
            msg = await asyncio.wait_for(self.events.get(), max(0.001, deadline - time.monotonic()))
            if want is None or msg.get("type") == want:
                return msg

    async def _connection(self) -> Connection:
        if not self._up.is_set():
            if self._done.is_set():
                raise ConnectionLost("client closed" if self._closing else f"gave up: {self.failed!r}")
            try:
                await asyncio.wait_for(self._up.wait(), self.wait_s)
            except TimeoutError:
                raise ConnectionLost(f"no connection within {self.wait_s}s") from None
        assert self.conn is not None
        return self.conn

    async def send(self, msg: dict) -> None:
        """Send one message (no reply awaited); waits for a connection (``wait_s``)."""
        conn = await self._connection()
        try:
            await conn.send(msg)
        except ConnectionLost:
            if self._closing:
                raise
            conn = await self._connection()  # dropped as we sent: once more on the new one
            await conn.send(msg)

    async def call(self, msg: dict, timeout_s: float = CALL_TIMEOUT_S) -> dict:
        """Send ``msg`` with an ``id`` and return its reply; an ``error`` reply raised as
        ClientError, a drop before the reply as ConnectionLost."""
        conn = await self._connection()
        return reply_or_raise(await conn.call(msg, timeout_s))


class DriverClient(Client):
    """A driver app's socket (``/v1/ws/driver``).

    Keeps what resuming needs: whether the driver is online and in which class, its
    latest position, and its open rides (from its calls' replies and ``ride_status``
    events). On a new connection it re-sends ``online`` (or ``offline``) with the latest
    position stamped now, then re-reads each open ride over REST and delivers a
    ``ride_status`` (``"resync": True``) for each whose status changed meanwhile.
    """

    path = DRIVER_PATH

    def __init__(self, urls, token: str, **kw: Any) -> None:
        super().__init__(urls, token, **kw)
        self.is_online = False
        self.vehicle_class: str | None = None
        self.position: dict | None = None  # the latest location sent: lat, lng, heading, speed
        self.rides: dict[str, str] = {}  # open ride id -> latest status known

    def _remember(self, msg: dict) -> None:
        if "lat" in msg and "lng" in msg:
            self.position = {k: msg.get(k) for k in ("lat", "lng", "heading", "speed")}

    def _track(self, msg: dict) -> None:
        rid, status = msg.get("ride_id"), msg.get("status")
        if msg.get("type") != "ride_status" or not isinstance(rid, str) or not isinstance(status, str):
            return
        if status in TERMINAL:
            self.rides.pop(rid, None)
        else:
            self.rides[rid] = status

    def observe(self, msg: dict) -> None:
        self._track(msg)

    async def go_online(
        self, lat: float | None = None, lng: float | None = None, vehicle_class=None, *, wait=True, **kw
    ) -> dict | None:
        """``online``; the ``status`` reply (ClientError if refused). ``wait=False``
        sends it without waiting (a refusal then comes back as an ``error`` event)."""
        msg = online(lat, lng, vehicle_class, **kw)
        self._remember(msg)
        self.is_online = True
        self.vehicle_class = vehicle_class or self.vehicle_class
        if not wait:
            await self.send(msg)
            return None
        reply = await self.call(msg)
        self.vehicle_class = reply.get("vehicle_class", vehicle_class)
        return reply

    async def go_offline(self, *, wait: bool = True) -> dict | None:
        self.is_online = False
        if not wait:
            await self.send(offline())
            return None
        return await self.call(offline())

    async def send_location(self, lat: float, lng: float, ts: float | None = None, heading=None, speed=None):
        """One ``location`` (no reply; a refused one comes back as an ``error`` event)."""
        msg = location(lat, lng, ts, heading, speed)
        self._remember(msg)
        await self.send(msg)

    async def _ride_call(self, msg: dict) -> dict:
        reply = await self.call(msg)
        self._track(reply)
        return reply

    async def accept(self, offer: dict) -> dict:
        """Accept an ``offer``; the ride's ``ride_status`` (ClientError ``offer_unavailable``...)."""
        return await self._ride_call(accept(offer["ride_id"], offer["offer_id"]))

    async def decline(self, offer: dict) -> dict:
        return await self.call(decline(offer["ride_id"], offer["offer_id"]))

    async def step(self, step: str, ride_id: str) -> dict:
        """``arrived``, ``start_trip`` or ``complete_trip``; the new ``ride_status``."""
        return await self._ride_call(trip_step(step, ride_id))

    async def arrived(self, ride_id: str) -> dict:
        return await self.step("arrived", ride_id)

    async def start_trip(self, ride_id: str) -> dict:
        return await self.step("start_trip", ride_id)

    async def complete_trip(self, ride_id: str) -> dict:
        return await self.step("complete_trip", ride_id)

    async def cancel_ride(self, ride_id: str, reason: str | None = None) -> dict:
        return await self._ride_call(cancel_ride(ride_id, reason))

    async def resume(self) -> None:
        conn = self.conn
        assert conn is not None
        p = self.position
        if self.is_online:
            kw = {"heading": p.get("heading"), "speed": p.get("speed")} if p else {}
            msg = online(
                p["lat"] if p else None, p["lng"] if p else None, self.vehicle_class, ts=time.time(), **kw
            )
            reply = await conn.call(msg)
            if reply.get("type") == "error":
                log.warning("online refused on resume: %s", reply)
        elif p is not None:
            await conn.send(location(p["lat"], p["lng"], time.time(), p.get("heading"), p.get("speed")))
        await self.resync()

    async def resync(self) -> None:
        await resync_rides(self, list(self.rides))


class RiderClient(Client):
    """A rider app's socket (``/v1/ws/rider``): it only listens. On a new connection it
    re-reads the rider's latest rides over REST and delivers a ``ride_status``
    (``"resync": True``) for each open one whose status changed meanwhile."""

    path = RIDER_PATH

    def __init__(self, urls, token: str, **kw: Any) -> None:
        super().__init__(urls, token, **kw)
        self.rides: dict[str, str] = {}

    def observe(self, msg: dict) -> None:
        rid, status = msg.get("ride_id"), msg.get("status")
        if msg.get("type") == "ride_status" and isinstance(rid, str) and isinstance(status, str):
            self.rides[rid] = status

    def track(self, ride: dict) -> None:
        """Follow a ride made over REST (``ride`` as ``Rest.request_ride`` answered it):
        its status is re-read on reconnect like those heard on the socket. Until an event
        arrives the socket knows of the ride only this way."""
        rid, status = ride.get("ride_id"), ride.get("status")
        if isinstance(rid, str) and isinstance(status, str):
            self.rides.setdefault(rid, status)

    async def resume(self) -> None:
        await self.resync()

    async def resync(self) -> None:
        await resync_rides(self, [r for r, s in self.rides.items() if s not in TERMINAL])


# Ride ids per ``sync`` (the edge takes up to 100).
SYNC_CHUNK = 100


async def _read_statuses(client: DriverClient | RiderClient, ride_ids: list[str]) -> list[dict]:
    """``[{ride_id, status, version}]`` of ``ride_ids``: one ``sync`` on the socket per
    hundred rides (an edge without it: one REST read each). A reconnect storm's re-reads
    over REST were most of a 3,000-socket client process's CPU (its HTTP pool's
    scheduling of hundreds of queued requests, py-spy); on the socket, one message."""
    out: list[dict] = []
    conn = client.conn
    for k in range(0, len(ride_ids), SYNC_CHUNK):
        chunk = ride_ids[k : k + SYNC_CHUNK]
        if conn is None:
            return out
        try:
            out += reply_or_raise(await conn.call(sync(chunk))).get("rides", [])
            continue
        except ClientError as exc:
            if exc.code != "unknown_type":
                log.warning("sync of %d rides failed: %s", len(chunk), exc)
                continue
        for rid in chunk:  # an edge that does not know ``sync``
            try:
                out.append(await client.rest.ride(rid))
            except ClientError as exc:
                log.warning("resync of ride %s failed: %s", rid, exc)
    return out


async def resync_rides(client: DriverClient | RiderClient, ride_ids: list[str]) -> None:
    """Read the status of ``ride_ids``; deliver a ``ride_status`` for each whose status is
    not the one the client last heard."""
    if not ride_ids:
        return
    for ride in await _read_statuses(client, ride_ids):
        rid, status = ride.get("ride_id"), ride.get("status")
        if isinstance(rid, str) and status != client.rides.get(rid):
            client._deliver(
                {
                    "type": "ride_status",
                    "v": PROTOCOL_VERSION,
                    "ride_id": rid,
                    "status": status,
                    "version": ride.get("version"),
                    "resync": True,
                }
            )


class GatewayClient(Client):
    """A fleet gateway's socket (``/v1/ws/gateway``): columnar ``batch`` frames of many
    drivers. Nothing to resume: each row carries its own intent, and shards keep state."""

    path = GATEWAY_PATH

    async def send_batch(self, rows: Any) -> None:
        """Location rows (``dispatch.drivers.LOCATION_DTYPE``) as one ``batch``."""
        await self.send(batch(rows))

    async def send_batch_acked(self, rows: Any, timeout_s: float = CALL_TIMEOUT_S) -> dict:
        """One ``batch`` with ``ack``; its ``batch_ack``."""
        return await self.call(batch(rows, ack=True), timeout_s)


def finite(x: Any) -> float | None:
    """``x`` as a float if it is a finite number, else None (for optional fields)."""
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None
