"""Locust users of the edge: riders over REST, drivers over their WebSocket.

    locust -f loadtests/locustfile.py --headless -u 200 -r 20 -t 60s --host http://127.0.0.1:8000

against a running ``dispatch up``.

The protocol comes from the client library (``api/client.py``): frames, message builders,
call ids, request bodies and token minting. Its socket clients are asyncio, and Locust
runs its users as gevent greenlets, where an asyncio loop per user would block the other
greenlets; so the driver here holds a gevent-friendly ``websockets.sync`` socket and uses
only the library's Sans-I/O parts, and the rider uses Locust's own HTTP client (for its
statistics) with the library's request bodies. Half the users are riders, half drivers (``-u 200``:
100 of each). Tokens are minted here with the edge's JWT secret: ``DISPATCH_JWT_SECRET``,
else the ``secrets.json`` of the local stack in ``--data-dir`` (default:
``DISPATCH_DATA_DIR`` or ``.dispatch``, as for ``dispatch up``).

- :class:`RiderUser` (an ``HttpUser``): looks at the cars nearby, asks for a quote,
  requests a ride with it (``Idempotency-Key``, cash), polls ``GET /v1/rides/{id}``
  until the ride ends, and sometimes cancels (before or after a driver accepts).
- :class:`DriverUser`: holds a driver WebSocket (``websockets.sync.client``, JSON
  frames), goes online near a hotspot, sends its position about once a second, accepts
  most offers, drives to the pickup and to the drop-off and reports ``arrived``,
  ``start_trip`` and ``complete_trip``.

Socket messages appear in Locust's statistics as request type ``WS``: each message the
driver sends with an ``id`` is timed until the reply that refers to it (``offer→accept``,
``arrived``, ``start_trip``, ``complete_trip``), the connection as ``connect+welcome``,
and ``offer delivery`` is the time from the shard making the offer (its ``expires_at``
less the region's offer timeout) to the offer reaching the socket — both clocks are this
machine's when the load runs beside the stack.

Riders and drivers stay near the region's hotspots, so most requests find a driver; trips
are short (up to ~1.7 km) and drivers drive faster than city traffic (``DRIVER_SPEED_MPS``)
so that trips finish within a run of a minute or two. When the run ends, riders cancel
their open rides and drivers end theirs (reported apart, as ``... (at stop)``).
"""

from __future__ import annotations

import itertools
import math
import os
import random
import time
import uuid
from functools import cache

from locust import HttpUser, User, between, constant, events, task

from api import client as proto
from dispatch.geo import M_PER_DEG_LAT
from dispatch.region import load_region

TERMINAL = frozenset({"completed", "cancelled", "expired"})
DRIVER_SPEED_MPS = 20.0
ARRIVE_WITHIN_M = 30.0
ACCEPT_SHARE = 0.9
CANCEL_SHARE = 0.15
POLL_S = 2.0
# A rider gives up on a ride (and cancels it if it still can) after this long.
RIDE_PATIENCE_S = 240.0
CALL_TIMEOUT_S = 15.0

_ids = itertools.count()


@events.init_command_line_parser.add_listener
def _arguments(parser) -> None:
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("DISPATCH_DATA_DIR", ".dispatch"),
        help="the local stack whose secrets.json holds the JWT secret (unless DISPATCH_JWT_SECRET is set)",
    )


@cache
def _secret(data_dir: str) -> str:
    from api.settings import local_secrets

    secret = os.environ.get("DISPATCH_JWT_SECRET") or local_secrets(data_dir, create=False).get(
        "DISPATCH_JWT_SECRET"
    )
    if not secret:
        raise RuntimeError(
            f"no DISPATCH_JWT_SECRET and no {data_dir}/secrets.json: start `dispatch up` (or pass --data-dir)"
        )
    return secret


def mint(user: User, sub: str, role: str) -> str:
    opts = user.environment.parsed_options
    data_dir = getattr(opts, "data_dir", None) or os.environ.get("DISPATCH_DATA_DIR", ".dispatch")
    return proto.mint_token(_secret(data_dir), sub, role, 24 * 3600)


@cache
def _region():
    return load_region(os.environ.get("DISPATCH_REGION_FILE"))


def near_hotspot(rng: random.Random) -> tuple[float, float]:
    """A point where demand is: a hotspot by weight, spread like the region says."""
    hs = _region().hotspots
    h = rng.choices(hs, weights=[x.weight for x in hs])[0]
    return offset(h.lat, h.lng, rng.gauss(0, h.spread_m), rng.gauss(0, h.spread_m))


def offset(lat: float, lng: float, north_m: float, east_m: float) -> tuple[float, float]:
    return lat + north_m / M_PER_DEG_LAT, lng + east_m / (M_PER_DEG_LAT * math.cos(math.radians(lat)))


def distance_m(a: tuple[float, float], b: tuple[float, float]) -> float:
    dy = (b[0] - a[0]) * M_PER_DEG_LAT
    dx = (b[1] - a[1]) * M_PER_DEG_LAT * math.cos(math.radians(a[0]))
    return math.hypot(dx, dy)


# -- riders ----------------------------------------------------------------------------------


class RiderUser(HttpUser):
    """A rider app without its socket: REST only, polling its ride."""

    weight = 1
    wait_time = between(2, 8)

    def on_start(self) -> None:
        self.rng = random.Random()
        self.sub = f"locust-r-{uuid.uuid4().hex[:10]}"
        self.auth = {"Authorization": f"Bearer {mint(self, self.sub, 'rider')}"}
        self.open_ride: str | None = None

    def on_stop(self) -> None:
        # The run ends: leave no ride waiting in the engine (named apart, not to skew the
        # statistics of the riders' own cancellations).
        if self.open_ride is not None:
            self._cancel(self.open_ride, "load test ended", "/v1/rides/[id]/cancel (at stop)")

    @task
    def ride(self) -> None:
        pickup = near_hotspot(self.rng)
        dropoff = offset(*pickup, self.rng.uniform(-1200, 1200), self.rng.uniform(-1200, 1200))
        where = proto.trip_body(pickup, dropoff, "standard")
        self.client.get(
            "/v1/drivers/nearby",
            params={"lat": pickup[0], "lng": pickup[1]},
            headers=self.auth,
            name="/v1/drivers/nearby",
        )
        q = self.client.post("/v1/quotes", json=where, headers=self.auth, name="/v1/quotes")
        if q.status_code != 200:
            return
        body = {**where, "quote_id": q.json()["quote_id"], "payment_method": "cash"}
        key = f"locust-{uuid.uuid4().hex}"
        r = self.client.post(
            "/v1/rides", json=body, headers={**self.auth, "Idempotency-Key": key}, name="/v1/rides"
        )
        if r.status_code not in (200, 201):
            return
        ride_id = r.json()["ride_id"]
        self.open_ride = ride_id
        cancel_at = self.rng.uniform(3.0, 30.0) if self.rng.random() < CANCEL_SHARE else None
        t0 = time.monotonic()
        status = r.json()["status"]
        while status not in TERMINAL and time.monotonic() - t0 < RIDE_PATIENCE_S:
            time.sleep(POLL_S)
            g = self.client.get(f"/v1/rides/{ride_id}", headers=self.auth, name="/v1/rides/[id]")
            if g.status_code == 200:
                status = g.json()["status"]
            if cancel_at is not None and time.monotonic() - t0 >= cancel_at:
                if status in ("requested", "offered", "accepted"):
                    status = self._cancel(ride_id, "plans changed") or status
                cancel_at = None
        if status not in TERMINAL:
            self._cancel(ride_id, "waited too long")
        self.open_ride = None

    def _cancel(self, ride_id: str, reason: str, name: str = "/v1/rides/[id]/cancel") -> str | None:
        with self.client.post(
            f"/v1/rides/{ride_id}/cancel",
            json={"reason": reason},
            headers=self.auth,
            name=name,
            catch_response=True,
        ) as r:
            if r.status_code == 409:
                r.success()  # the ride moved on (accepted, started) meanwhile: not an error
                return None
            return r.json().get("status") if r.status_code == 200 else None


# -- drivers ---------------------------------------------------------------------------------


class DriverUser(User):
    """A driver app: one WebSocket, a position a second, offers answered, trips driven."""

    weight = 1
    wait_time = constant(0)

    def on_start(self) -> None:
        from websockets.sync.client import connect

        self.rng = random.Random()
        # Ids of their own: 8,000,000 + 10,000 per Locust process (dispatch simulate uses 9,000,000+).
        self.driver_id = 8_000_000 + (os.getpid() % 100) * 10_000 + next(_ids) % 10_000
        self.sub = f"drv-{self.driver_id}"
        url = proto.ws_url(self.host or "http://127.0.0.1:8000", proto.DRIVER_PATH, "json")
        self.ids = proto.CallIds()
        self.backlog: list[dict] = []
        self.ride: dict | None = None  # the ride being driven: ids, targets, stage
        self.pos = near_hotspot(self.rng)
        self.heading = self.rng.uniform(0, 360)
        self.offer_timeout_s = float(_region().section("matching").get("offer_timeout_s", 15))
        t0 = time.perf_counter()
        try:
            token = mint(self, self.sub, "driver")
            # legacy=True: the connection itself, held for the user's life (closed in on_stop).
            self.ws = connect(
                url,
                additional_headers={"Authorization": f"Bearer {token}"},
                compression=None,
                ping_interval=None,
                open_timeout=CALL_TIMEOUT_S,
                legacy=True,
            )
            welcome = proto.decode(self.ws.recv(timeout=CALL_TIMEOUT_S))
            if welcome.get("type") != "welcome":
                raise proto.ClientError.from_frame(welcome)
        except Exception as exc:
            self._fire("connect+welcome", t0, exc)
            raise
        self._fire("connect+welcome", t0)
        self.call(proto.online(self.pos[0], self.pos[1], "standard"), "online")

    def on_stop(self) -> None:
        ws = getattr(self, "ws", None)
        if ws is None:
            return
        try:
            if self.ride is not None:  # leave no ride behind in the engine
                step = "complete_trip" if self.ride["stage"] == "to_dropoff" else "cancel_ride"
                # Its rider may be cancelling at the same moment: that is no error here.
                msg = (
                    proto.trip_step(step, self.ride["ride_id"])
                    if step == "complete_trip"
                    else proto.cancel_ride(self.ride["ride_id"])
                )
                self.call(
                    msg,
                    f"{step} (at stop)",
                    fine=("illegal_transition",),
                )
            self.send(proto.offline())
        except Exception:
            pass
        ws.close()

    # -- socket helpers ----------------------------------------------------------------------

    def _fire(self, name: str, t0: float, exc: Exception | None = None, length: int = 0) -> None:
        self.environment.events.request.fire(
            request_type="WS",
            name=name,
            response_time=(time.perf_counter() - t0) * 1000.0,
            response_length=length,
            exception=exc,
            context={},
        )

    def send(self, msg: dict) -> None:
        self.ws.send(proto.encode(msg, "json"))

    def call(self, msg: dict, name: str, fine: tuple[str, ...] = ()) -> dict | None:
        """Send ``msg`` with an id and wait for the reply that refers to it (other messages
        meanwhile are kept for :meth:`handle`); timed as a ``WS`` request ``name``, failed
        on an ``error`` reply unless its code is in ``fine``. None unless it succeeded."""
        ref, stamped = self.ids.stamp(msg)
        t0 = time.perf_counter()
        self.send(stamped)
        deadline = time.monotonic() + CALL_TIMEOUT_S
        try:
            while True:
                raw = self.ws.recv(timeout=max(0.01, deadline - time.monotonic()))
                reply = proto.decode(raw)
                if self.ids.is_reply(reply, ref):
                    break
                self.backlog.append(reply)
        except Exception as exc:
            self._fire(name, t0, exc)
            return None
        if reply.get("type") == "error":
            code = reply.get("code")
            failure = None if code in fine else RuntimeError(f"{code}: {reply.get('message')}")
            self._fire(name, t0, failure, len(raw))
            return None
        self._fire(name, t0, length=len(raw))
        return reply

    # -- the app's loop ----------------------------------------------------------------------

    @task
    def drive(self) -> None:
        """One second of driving: move, report the position, read what came in."""
        self.move(1.0)
        self.send(proto.location(self.pos[0], self.pos[1], time.time(), self.heading, DRIVER_SPEED_MPS))
        deadline = time.monotonic() + 1.0
        while self.backlog:
            self.handle(self.backlog.pop(0))
        while (left := deadline - time.monotonic()) > 0:
            try:
                self.handle(proto.decode(self.ws.recv(timeout=left)))
            except TimeoutError:
                break
        self.advance()

    def move(self, dt_s: float) -> None:
        step = DRIVER_SPEED_MPS * dt_s
        if self.ride is not None and self.ride["stage"] in ("to_pickup", "to_dropoff"):
            target = self.ride["pickup" if self.ride["stage"] == "to_pickup" else "dropoff"]
            d = distance_m(self.pos, target)
            f = min(1.0, step / d) if d > 0 else 1.0
            dlat, dlng = target[0] - self.pos[0], target[1] - self.pos[1]
            self.heading = math.degrees(math.atan2(dlng * math.cos(math.radians(self.pos[0])), dlat)) % 360
            self.pos = (self.pos[0] + dlat * f, self.pos[1] + dlng * f)
        elif self.ride is None:  # cruise, turning now and then
            if self.rng.random() < 0.1:
                self.heading = (self.heading + self.rng.choice((-90, 90))) % 360
            rad = math.radians(self.heading)
            self.pos = offset(*self.pos, step * math.cos(rad) * 0.3, step * math.sin(rad) * 0.3)

    def handle(self, msg: dict) -> None:
        typ = msg.get("type")
        if typ == "offer":
            offered_at = float(msg.get("expires_at", time.time())) - self.offer_timeout_s
            self.environment.events.request.fire(
                request_type="WS",
                name="offer delivery",
                response_time=max(0.0, time.time() - offered_at) * 1000.0,
                response_length=0,
                exception=None,
                context={},
            )
            if self.ride is not None:
                return  # busy (a late offer): let it expire
            if self.rng.random() >= ACCEPT_SHARE:
                self.call(proto.decline(msg["ride_id"], msg["offer_id"]), "offer→decline")
                return
            time.sleep(self.rng.uniform(0.3, 1.5))  # reading the offer
            reply = self.call(proto.accept(msg["ride_id"], msg["offer_id"]), "offer→accept")
            if reply is not None and reply.get("status") == "accepted":
                p, d = msg["pickup"], msg["dropoff"]
                self.ride = {
                    "ride_id": msg["ride_id"],
                    "pickup": (p["lat"], p["lng"]),
                    "dropoff": (d["lat"], d["lng"]),
                    "stage": "to_pickup",
                    "until": 0.0,
                }
        elif (
            typ == "ride_status"
            and msg.get("status") == "cancelled"
            and self.ride is not None
            and self.ride["ride_id"] == msg.get("ride_id")
        ):
            self.ride = None  # the rider cancelled: back to cruising

    def advance(self) -> None:
        """The trip's next step once its place or time is reached."""
        r = self.ride
        if r is None:
            return
        stage = r["stage"]
        if stage == "to_pickup" and distance_m(self.pos, r["pickup"]) <= ARRIVE_WITHIN_M:
            if self._step("arrived", "arrived"):
                r["stage"], r["until"] = "boarding", time.monotonic() + self.rng.uniform(3.0, 8.0)
        elif stage == "boarding" and time.monotonic() >= r["until"]:
            if self._step("start_trip", "in_progress"):
                r["stage"] = "to_dropoff"
        elif stage == "to_dropoff" and distance_m(self.pos, r["dropoff"]) <= ARRIVE_WITHIN_M:
            self._step("complete_trip", "completed")
            self.ride = None

    def _step(self, typ: str, want: str) -> bool:
        assert self.ride is not None
        reply = self.call(proto.trip_step(typ, self.ride["ride_id"]), typ)
        if reply is None:
            self.ride = None  # refused (the rider cancelled meanwhile): cruise on
            return False
        return reply.get("status") == want
