"""End to end over real sockets: two `dispatch edge` processes, real Ray shards, real Redis."""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
import uuid

import httpx
import msgpack
import numpy as np
import pytest
import websockets

from api import client as proto
from tests.fixtures_edge import OPERATOR_KEY, start_edge, wait_ready
from tests.helpers import eventually, scaled

pytestmark = pytest.mark.e2e

# Mission District: a spot these tests keep to themselves.
SPOT = (37.7599, -122.4148)


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


async def recv(ws, want: str | None = None, timeout_s: float = 10.0) -> dict:
    """The next message (of type ``want``, skipping others), decoded from JSON or msgpack."""
    deadline = time.monotonic() + scaled(timeout_s)
    while True:
        raw = await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic()))
        msg = proto.decode(raw)
        if want is None or msg.get("type") == want:
            return msg


async def driver_socket(edge, token: str, **kw):
    ws = await websockets.connect(f"{edge.ws}/v1/ws/driver", additional_headers=auth(token), **kw)
    welcome = await recv(ws)
    assert welcome["type"] == "welcome" and welcome["role"] == "driver"
    # The edge listens for the driver's events before it welcomes it (Redis is up here).
    assert welcome["subscribed"] is True
    return ws


def new_driver() -> tuple[int, str]:
    n = 5_000_000 + uuid.uuid4().int % 1_000_000
    return n, f"drv-{n}"


async def test_a_driver_streams_positions_and_appears_in_nearby(edges, tokens):
    a = edges[0]
    n, sub = new_driver()
    ws = await driver_socket(a, tokens("driver", sub))
    lat, lng = SPOT
    await ws.send(json.dumps({"type": "online", "lat": lat, "lng": lng, "vehicle_class": "xl", "id": 1}))
    assert (await recv(ws, "status"))["status"] == "online"
    for i in range(5):  # binary frames too
        await ws.send(msgpack.packb({"type": "location", "lat": lat + i * 1e-5, "lng": lng, "speed": 3.0}))
    async with httpx.AsyncClient(base_url=a.url) as c:

        async def seen_by_admin():
            r = await c.get(
                "/v1/drivers/nearby",
                params={"lat": lat, "lng": lng, "radius_m": 500, "limit": 100, "vehicle_class": "xl"},
                headers=auth(tokens("admin", "ops")),
            )
            assert r.status_code == 200, r.text
            mine = [d for d in r.json()["drivers"] if d["driver_id"] == sub]
            return mine and mine[0]

        d = await eventually(seen_by_admin)
        assert d["vehicle_class"] == "xl" and abs(d["lat"] - (lat + 4e-5)) < 1e-9
        # A rider sees a count and an ETA, never who or where.
        r = await c.get(
            "/v1/drivers/nearby",
            params={"lat": lat, "lng": lng, "radius_m": 500},
            headers=auth(tokens("rider", "r-near")),
        )
        body = r.json()
        assert r.status_code == 200 and body["count"] >= 1 and body["nearest_eta_s"] >= 0
        assert body["drivers"] is None and sub not in r.text
        # The driver's own state, and offline takes it out of nearby.
        me = (await c.get("/v1/drivers/me", headers=auth(tokens("driver", sub)))).json()
        assert me["driver_id"] == sub and me["status"] == "available" and me["vehicle_class"] == "xl"
        await ws.send(json.dumps({"type": "offline"}))
        assert (await recv(ws, "status"))["status"] == "offline"

        async def gone():
            return not await seen_by_admin()

        await eventually(gone)
    await ws.close()


BAD_FRAMES = [
    ("neither msgpack nor JSON (text)", "{not json", "bad_frame"),
    ("neither msgpack nor JSON (binary)", b"\xc1\xc1\xc1", "bad_frame"),
    ("not a map", json.dumps([1, 2, 3]), "bad_frame"),
    ("wrong types", json.dumps({"type": "location", "lat": "37.7", "lng": -122.4}), "invalid_field"),
    ("a boolean for a number", json.dumps({"type": "location", "lat": True, "lng": -122.4}), "invalid_field"),
    ("NaN", msgpack.packb({"type": "location", "lat": math.nan, "lng": -122.4}), "invalid_location"),
    ("infinity", msgpack.packb({"type": "location", "lat": 37.7, "lng": math.inf}), "invalid_location"),
    ("out of range", json.dumps({"type": "location", "lat": 137.7, "lng": -122.4}), "invalid_location"),
    ("outside the area", json.dumps({"type": "location", "lat": 40.7, "lng": -74.0}), "outside_service_area"),
    (
        "from the future",
        json.dumps({"type": "location", "lat": 37.76, "lng": -122.41, "ts": time.time() + 3600}),
        "invalid_timestamp",
    ),
    (
        "bad speed",
        json.dumps({"type": "location", "lat": 37.76, "lng": -122.41, "speed": -3}),
        "invalid_field",
    ),
    ("too large", msgpack.packb({"type": "location", "pad": "x" * 10_000}), "frame_too_large"),
    (
        "another driver's id",
        json.dumps({"type": "location", "lat": 37.76, "lng": -122.41, "driver_id": "drv-1"}),
        "forbidden",
    ),
    ("unknown message type", json.dumps({"type": "teleport"}), "unknown_type"),
    ("no type", json.dumps({"lat": 1}), "unknown_type"),
    ("unknown protocol version", json.dumps({"type": "heartbeat", "v": 99}), "unsupported_version"),
    # A JSON integer past what a float holds, written out in full (1e400).
    ("a 401-digit lat", '{"type": "location", "lat": 1' + "0" * 400 + ', "lng": -122.41}', "invalid_field"),
    (
        "a 401-digit ts",
        '{"type": "location", "lat": 37.76, "lng": -122.41, "ts": 1' + "0" * 400 + "}",
        "invalid_field",
    ),
    (
        "msgpack binary keys",
        msgpack.packb({b"type": b"location", b"lat": 37.76, b"lng": -122.41}),
        "bad_frame",
    ),
    ("not UTF-8 (text)", ("text", b'{"type": "heartbeat", "x": "\xff\xfe"}'), "bad_frame"),
    # 3,000 characters but 6,000 bytes: over the 4,096-byte limit.
    (
        "too large in bytes",
        json.dumps({"type": "heartbeat", "pad": "\u00e9" * 3000}, ensure_ascii=False),
        "frame_too_large",
    ),
    (
        "unknown vehicle class",
        json.dumps({"type": "online", "lat": 37.76, "lng": -122.41, "vehicle_class": "jet"}),
        "invalid_field",
    ),
]


async def test_every_bad_frame_gets_its_error_and_the_socket_keeps_working(edges, tokens):
    n, sub = new_driver()
    ws = await driver_socket(edges[0], tokens("driver", sub))
    for i, (what, frame, code) in enumerate(BAD_FRAMES):
        if isinstance(frame, tuple):  # raw bytes sent as a text frame
            await ws.send(frame[1], text=True)
        else:
            await ws.send(frame)
        err = await recv(ws)
        assert err["type"] == "error" and err["code"] == code, (what, err)
        assert err["message"], what
        # ... and the next good frame is served.
        await ws.send(json.dumps({"type": "heartbeat", "id": i}))
        ack = await recv(ws)
        assert ack == {**ack, "type": "heartbeat_ack", "ref": i}, (what, ack)
    # Nothing bad reached the shards: the driver is unknown to them.
    async with httpx.AsyncClient(base_url=edges[0].url) as c:
        me = (await c.get("/v1/drivers/me", headers=auth(tokens("driver", sub)))).json()
        assert me["status"] is None and me["online"] is False
    await ws.close()
    # A client's bad frames are counted, never logged as the edge's errors.
    log = edges[0].log()
    assert "Invalid UTF-8" not in log and "Traceback" not in log, log


async def test_errors_name_the_frame_they_answer(edges, tokens):
    n, sub = new_driver()
    ws = await driver_socket(edges[0], tokens("driver", sub))
    await ws.send(json.dumps({"type": "heartbeat", "v": 99, "id": "v99"}))
    err = await recv(ws, "error")
    assert (err["code"], err.get("ref")) == ("unsupported_version", "v99")
    await ws.send(msgpack.packb({"type": "location", "lat": 1.0, "id": 7, "v": 2}))
    err = await recv(ws, "error")
    assert (err["code"], err.get("ref")) == ("unsupported_version", 7)
    await ws.close()


async def _my_status(c, tokens, sub):
    me = (await c.get("/v1/drivers/me", headers=auth(tokens("driver", sub)))).json()
    return me["status"]


async def test_a_driver_back_online_with_a_position_right_after_is_available(edges, tokens):
    """Online then a position within milliseconds, five times over: available each time."""
    n, sub = new_driver()
    ws = await driver_socket(edges[0], tokens("driver", sub))
    lat, lng = SPOT
    async with httpx.AsyncClient(base_url=edges[0].url) as c:

        async def status_is(want):
            return await _my_status(c, tokens, sub) == want

        await ws.send(json.dumps({"type": "online", "lat": lat, "lng": lng}))
        assert (await recv(ws, "status"))["status"] == "online"
        await ws.send(json.dumps({"type": "offline"}))
        assert (await recv(ws, "status"))["status"] == "offline"
        await eventually(lambda: status_is("offline"))
        for _ in range(5):
            await ws.send(json.dumps({"type": "online"}))
            await ws.send(json.dumps({"type": "location", "lat": lat + 1e-5, "lng": lng}))
            assert (await recv(ws, "status"))["status"] == "online"
            await eventually(lambda: status_is("available"))
            for _ in range(3):
                await ws.send(json.dumps({"type": "location", "lat": lat, "lng": lng}))
            await ws.send(json.dumps({"type": "offline"}))
            assert (await recv(ws, "status"))["status"] == "offline"
            await eventually(lambda: status_is("offline"))
    await ws.close()


async def test_offline_wins_over_a_position_from_a_phone_clock_running_ahead(edges, tokens):
    n, sub = new_driver()
    ws = await driver_socket(edges[0], tokens("driver", sub))
    lat, lng = SPOT
    async with httpx.AsyncClient(base_url=edges[0].url) as c:

        async def status_is(want):
            return await _my_status(c, tokens, sub) == want

        await ws.send(json.dumps({"type": "online", "lat": lat, "lng": lng}))
        assert (await recv(ws, "status"))["status"] == "online"
        await eventually(lambda: status_is("available"))
        await ws.send(json.dumps({"type": "location", "lat": lat, "lng": lng, "ts": time.time() + 3}))
        await ws.send(json.dumps({"type": "offline"}))
        assert (await recv(ws, "status"))["status"] == "offline"
        await eventually(lambda: status_is("offline"))
    await ws.close()


async def test_location_frames_over_the_rate_limit_are_dropped_counted_and_told_once(edges, tokens):
    n, sub = new_driver()
    ws = await driver_socket(edges[0], tokens("driver", sub))
    lat, lng = SPOT
    for _ in range(60):  # burst 20 at 10/s: most of these are over the limit
        await ws.send(json.dumps({"type": "location", "lat": lat, "lng": lng}))
    await ws.send(json.dumps({"type": "heartbeat", "id": "end"}))
    seen = []
    while True:
        m = await recv(ws)
        seen.append(m)
        if m["type"] == "heartbeat_ack":
            break
    limited = [m for m in seen if m.get("code") == "rate_limited"]
    assert len(limited) == 1 and limited[0]["detail"]["limit_per_s"] == 10
    async with httpx.AsyncClient(base_url=edges[0].url) as c:
        text = (await c.get("/metrics", headers=auth(tokens("admin", "ops")))).text
    line = next(
        x for x in text.splitlines() if x.startswith('dispatch_edge_rate_limited_total{socket="driver"}')
    )
    assert float(line.split()[-1]) >= 30
    await ws.close()


async def test_auth_failures_are_refused_everywhere(edges, tokens):
    a = edges[0]
    _, sub = new_driver()
    cases = [
        ({}, 4401),  # no token
        (auth("not.a.jwt"), 4401),
        (auth(tokens("driver", sub)[:-4] + "AAAA"), 4401),  # bad signature
        (auth(tokens("driver", sub, ttl_s=60, now=time.time() - 3600)), 4401),  # expired
        (auth(tokens("rider", "r-1")), 4403),  # wrong role for the socket
    ]
    for headers, code in cases:
        async with websockets.connect(f"{a.ws}/v1/ws/driver", additional_headers=headers) as ws:
            err = await recv(ws)
            assert err["type"] == "error"
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await recv(ws)
            assert closed.value.rcvd.code == code, (headers, closed.value.rcvd)
    # The gateway socket takes only gateway tokens; the query-string token works too.
    async with websockets.connect(f"{a.ws}/v1/ws/gateway?access_token={tokens('driver', sub)}") as ws:
        await recv(ws)
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await recv(ws)
        assert closed.value.rcvd.code == 4403
    async with httpx.AsyncClient(base_url=a.url) as c:
        for headers in (
            {},
            auth("garbage"),
            {"Authorization": "Basic abc"},
            auth(tokens("rider", "r-1", ttl_s=60, now=time.time() - 3600)),
        ):
            r = await c.get("/v1/drivers/nearby", params={"lat": SPOT[0], "lng": SPOT[1]}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"
        r = await c.get("/v1/admin/shards", headers=auth(tokens("rider", "r-1")))
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        r = await c.get("/v1/drivers/me", headers=auth(tokens("rider", "r-1")))
        assert r.status_code == 403
        r = await c.get("/metrics", headers=auth(tokens("rider", "r-1")))
        assert r.status_code == 403
        # Minting tokens takes the operator key.
        body = {"sub": "drv-77", "role": "driver", "ttl_s": 600}
        assert (await c.post("/v1/auth/token", json=body)).status_code == 401
        assert (
            await c.post("/v1/auth/token", json=body, headers={"X-Operator-Key": "nope"})
        ).status_code == 401
        r = await c.post("/v1/auth/token", json=body, headers={"X-Operator-Key": OPERATOR_KEY})
        assert r.status_code == 200 and r.json()["expires_in"] == 600
        minted = r.json()["access_token"]
        me = await c.get("/v1/drivers/me", headers=auth(minted))
        assert me.status_code == 200 and me.json()["driver_id"] == "drv-77"
        # A driver's subject must be a driver id.
        r = await c.post(
            "/v1/auth/token", json={"sub": "bob", "role": "driver"}, headers={"X-Operator-Key": OPERATOR_KEY}
        )
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_input"


async def test_a_rider_hears_a_driver_on_another_edge_through_redis(edges, tokens, shards, shard_map):
    """Driver on edge A, rider on edge B; the shard's events cross through Redis."""
    a, b = edges
    n, sub = new_driver()
    rider = f"r-{uuid.uuid4().hex[:8]}"
    lat, lng = 37.7652, -122.4307  # Castro
    dws = await driver_socket(a, tokens("driver", sub))
    rws = await websockets.connect(
        f"{b.ws}/v1/ws/rider?encoding=msgpack", additional_headers=auth(tokens("rider", rider))
    )
    welcome = await recv(rws)
    assert welcome["type"] == "welcome" and welcome["subscribed"] is True
    await dws.send(json.dumps({"type": "online", "lat": lat, "lng": lng, "vehicle_class": "premium"}))
    await recv(dws, "status")
    shard = shards.handle(shard_map.shard_for_point(lat, lng))

    async def held():
        d = await shard.driver.remote(n)
        return d and not d["pending"]

    await eventually(held)
    ride_id = f"ride-{uuid.uuid4().hex[:8]}"
    await shard.add_ride.remote(
        {
            "ride_id": ride_id,
            "rider_id": rider,
            "pickup_lat": lat + 0.001,
            "pickup_lng": lng,
            "dropoff_lat": lat + 0.02,
            "dropoff_lng": lng,
            "vehicle_class": 2,
            "requested_at": time.time(),
        }
    )
    offer = await recv(dws, "offer", timeout_s=15)
    assert offer["ride_id"] == ride_id and offer["offer_id"]
    status = await recv(rws, "ride_status", timeout_s=15)
    assert status["ride_id"] == ride_id and status["status"] == "offered"
    # The relay counted the crossing on B and measured its lag.
    async with httpx.AsyncClient(base_url=b.url) as c:
        text = (await c.get("/metrics", headers=auth(tokens("admin", "ops")))).text
    assert 'dispatch_edge_events_relayed_total{audience="rider"}' in text
    assert "dispatch_relay_lag_seconds_count" in text
    await shard.cancel_ride.remote(ride_id)
    await dws.close()
    await rws.close()


async def test_a_gateway_batch_reaches_the_shards_and_bad_rows_are_counted(edges, tokens):
    a = edges[0]
    rng = np.random.default_rng(11)
    k = 200
    ids = np.arange(6_100_000, 6_100_000 + k, dtype=np.int64)
    lat = SPOT[0] + rng.uniform(-0.005, 0.005, k)
    lng = SPOT[1] + rng.uniform(-0.005, 0.005, k)
    ts = np.full(k, time.time())
    lat[:3] = np.nan  # three bad rows
    lng[3] = 200.0  # one out of range
    frame = {
        "type": "batch",
        "id": "b1",
        "ack": True,
        "driver_id": ids.tobytes(),
        "lat": lat.tobytes(),
        "lng": lng.tolist(),
        "ts": ts.tobytes(),
        "intent": np.ones(k, dtype=np.int8).tobytes(),
    }
    async with websockets.connect(
        f"{a.ws}/v1/ws/gateway", additional_headers=auth(tokens("gateway", "fleet-1"))
    ) as ws:
        assert (await recv(ws))["type"] == "welcome"
        await ws.send(msgpack.packb(frame))
        ack = await recv(ws, "batch_ack")
        assert ack["ref"] == "b1" and ack["received"] == k and ack["accepted"] == k - 4
        assert ack["rejected"] == {"non_finite": 3, "out_of_range": 1}
        # A batch with columns of different lengths is refused whole.
        await ws.send(msgpack.packb({**frame, "lat": lat[:10].tobytes()}))
        err = await recv(ws, "error")
        assert err["code"] == "invalid_field" and "lat" in err["message"]
    async with httpx.AsyncClient(base_url=a.url) as c:

        async def all_there():
            r = await c.get(
                "/v1/drivers/nearby",
                params={"lat": SPOT[0], "lng": SPOT[1], "radius_m": 1500, "limit": 100},
                headers=auth(tokens("admin", "ops")),
            )
            got = {d["driver_id"] for d in r.json()["drivers"]}
            return len(got & {f"drv-{i}" for i in ids[4:]}) >= 90

        await eventually(all_there)


async def test_health_readiness_metrics_and_openapi(edges, tokens):
    a = edges[0]
    async with httpx.AsyncClient(base_url=a.url) as c:
        assert (await c.get("/healthz")).json() == {"status": "ok"}
        r = await c.get("/readyz")
        assert r.status_code == 200
        assert r.json()["checks"] == {"shards": True, "redis": True, "postgres": True}
        text = (await c.get("/metrics", headers=auth(tokens("admin", "ops")))).text
        families = (
            "dispatch_edge_frames_total",
            "dispatch_edge_connections",
            "dispatch_router_rows_total",
            "dispatch_router_flush_latency_seconds",
            "dispatch_relay_up",
            "dispatch_relay_lag_seconds",
            "dispatch_http_request_duration_seconds",
            'dispatch_shard_batched_calls_total{call="add_rides"}',
            'dispatch_shard_batched_items_total{call="accept_offers"}',
            'dispatch_ride_writes_total{write="create_ride"}',
            'dispatch_ride_write_rows_total{write="accept"}',
            'dispatch_edge_bus_publishes_total{outcome="dropped"}',
        )
        for family in families:
            assert family in text, family
        # REST requests are timed by route, method and status.
        timed = 'dispatch_http_request_duration_seconds_count{method="GET",route="/readyz",status="200"}'
        assert timed in text, [ln for ln in text.splitlines() if "duration_seconds_count" in ln]
        spec = (await c.get("/openapi.json")).json()
        for path in (
            "/v1/drivers/nearby",
            "/v1/drivers/me",
            "/v1/admin/shards",
            "/v1/admin/shards/live",
            "/v1/auth/token",
            "/v1/surge",
            "/v1/quotes",
            "/v1/rides",
            "/v1/rides/{ride_id}",
            "/v1/rides/{ride_id}/accept",
            "/v1/rides/{ride_id}/complete",
            "/v1/rides/{ride_id}/receipt",
            "/v1/drivers/me/earnings",
        ):
            assert path in spec["paths"], path
        # The docs pages load everything from the edge itself (no CDN).
        for page in ("/docs", "/redoc"):
            r = await c.get(page)
            assert r.status_code == 200
            assets = re.findall(r'(?:src|href)="([^"]+)"', r.text)
            assert assets and all(u.startswith("/") and not u.startswith("//") for u in assets), assets
            assert "http://" not in r.text and "https://" not in r.text
            for u in assets:
                assert (await c.get(u)).status_code == 200, u
        r = await c.get("/v1/admin/shards", headers=auth(tokens("admin", "ops")))
        assert r.status_code == 200 and all(s["up"] for s in r.json()["shards"])
        r = await c.get("/v1/admin/shards/live", headers=auth(tokens("admin", "ops")))
        live = r.json()["shards"]
        assert r.status_code == 200 and [s["shard_id"] for s in live] == list(range(len(live)))
        assert all(s["up"] and {"requests", "trips", "available", "offered"} <= set(s) for s in live)
        assert (await c.get("/v1/admin/shards/live", headers=auth(tokens("rider", "r-1")))).status_code == 403
        r = await c.get("/v1/nothing-here", headers=auth(tokens("admin", "ops")))
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = await c.get(
            "/v1/drivers/nearby", params={"lat": "x", "lng": 1}, headers=auth(tokens("rider", "r"))
        )
        assert r.status_code == 422 and r.json()["error"]["code"] == "validation_error"
        r = await c.get(
            "/v1/drivers/nearby", params={"lat": 40.7, "lng": -74.0}, headers=auth(tokens("rider", "r"))
        )
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_location"


async def test_a_rest_body_over_the_limit_is_refused_with_413(edges, tokens):
    def body(pad: int) -> bytes:
        return b'{"pickup": {"lat": 37.76, "lng": -122.41}, "pad": "' + b"x" * pad + b'"}'

    async def chunks():  # no Content-Length: 68 KiB in 4 KiB chunks
        for _ in range(17):
            yield b"x" * 4096

    async with httpx.AsyncClient(base_url=edges[0].url, timeout=scaled(30)) as c:
        headers = {**auth(tokens("rider", "r-big")), "content-type": "application/json"}
        for content in (body(70_000), chunks()):
            r = await c.post("/v1/quotes", content=content, headers=headers)
            assert r.status_code == 413, r.text
            assert r.json()["error"]["code"] == "payload_too_large"
        # 16 MB: refused from its Content-Length; the client may still be writing when the
        # edge answers and closes, so it may see the close instead of the 413.
        try:
            r = await c.post("/v1/quotes", content=body(16 * 1024 * 1024), headers=headers)
            assert r.status_code == 413, r.text
        except httpx.TransportError:
            pass
        # The edge is fine and answers the next request.
        assert (await c.get("/healthz")).status_code == 200


async def test_shutdown_flushes_buffered_updates_and_closes_sockets_with_1001(
    edge_env, tokens, tmp_path, shards, shard_map
):
    # A long flush interval: the update is still in the edge's buffer when SIGTERM lands.
    edge = start_edge(edge_env, tmp_path, "edge-c", DISPATCH_FLUSH_INTERVAL_S="30")
    wait_ready([edge])
    n, sub = new_driver()
    lat, lng = 37.7880, -122.4075  # Union Square
    ws = await driver_socket(edge, tokens("driver", sub))
    await ws.send(json.dumps({"type": "online", "lat": lat, "lng": lng}))
    await recv(ws, "status")
    await asyncio.to_thread(edge.stop)
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await recv(ws)
    assert closed.value.rcvd.code == 1001
    # uvicorn re-raises the SIGTERM it handled once shut down: -15 is a clean exit.
    assert edge.proc.returncode in (0, -15) and "Traceback" not in edge.log(), edge.log()
    handle = shards.handle(shard_map.shard_for_point(lat, lng))

    async def applied():
        d = await handle.driver.remote(n)
        return d is not None and d["status"] == "available"

    await eventually(applied)
