"""The hot REST routes (api/hot_routes.py) answer exactly as FastAPI's routes do.

The edge here is not started (no Ray, no Postgres): a request that passes the checks
meets "rides need Postgres" (503), which is enough to compare the two paths' answers to
every check before the work: tokens, roles, rate limits and bad input.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from api.app import create_app
from api.edge import Edge
from api.hot_routes import HotRoutes, match
from api.ride_routes import router
from api.settings import load_settings

SECRET = "s" * 40
BODY = {"pickup": {"lat": 37.76, "lng": -122.41}, "dropoff": {"lat": 37.77, "lng": -122.42}}
RIDE = "8c0e2a6e-4d61-4f2b-9c39-0d5a3f0e6a11"


def make_edge() -> Edge:
    return Edge(load_settings(jwt_secret=SECRET, rest_rate_per_s=1.0, rest_burst=3))


def plain_app(edge: Edge):
    """The edge's app without the hot routes: FastAPI answers every request."""
    app = create_app(edge.settings, edge)
    app.user_middleware = [m for m in app.user_middleware if m.cls is not HotRoutes]
    return app


async def _send(app, method: str, path: str, content: bytes | None, headers: dict) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://edge") as c:
        return await c.request(method, path, content=content, headers=headers)


def _answer(r: httpx.Response) -> tuple:
    body = r.json() if r.content else None
    keep = ("content-type", "retry-after", "www-authenticate")
    return r.status_code, body, {k: r.headers.get(k) for k in keep}


def _request(edge: Edge, role: str, sub: str, *, path="/v1/rides", body=BODY, key="k-1", extra=None):
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {edge.auth.issue(sub, role)}"}
    if key is not None:
        headers["Idempotency-Key"] = key
    headers.update(extra or {})
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return path, content, headers


def _must_not_pass(scope, receive, send):
    raise AssertionError(f"the hot path passed {scope['method']} {scope['path']} on to FastAPI")


ACCEPT = f"/v1/rides/{RIDE}/accept"
DECLINE = f"/v1/rides/{RIDE}/decline"
OFFER = {"offer_id": f"{RIDE}:1"}

# (name, role, path, body, key, extra headers): each answered by the hot path itself.
HOT = [
    ("rider_requests", "rider", "/v1/rides", BODY, "k-1", None),
    ("no_token", None, "/v1/rides", BODY, "k-1", None),
    ("bad_token", None, "/v1/rides", BODY, "k-1", {"Authorization": "Bearer not.a.token"}),
    ("driver_requests", "driver", "/v1/rides", BODY, "k-1", None),
    ("driver_accepts", "driver", ACCEPT, OFFER, None, None),
    ("rider_accepts", "rider", ACCEPT, OFFER, None, None),
    ("driver_declines", "driver", DECLINE, OFFER, None, None),
    ("charset", "rider", "/v1/rides", BODY, "k-1", {"Content-Type": "application/json; charset=utf-8"}),
]

# Bad input: passed on to FastAPI, which gives its validation error.
PASSED_ON = [
    ("no_key", "rider", "/v1/rides", BODY, None, None),
    ("long_key", "rider", "/v1/rides", BODY, "k" * 201, None),
    ("control_in_key", "rider", "/v1/rides", BODY, "k\t1", None),
    ("not_json", "rider", "/v1/rides", b"{pickup", "k-1", None),
    ("nan", "rider", "/v1/rides", json.dumps(BODY).replace("37.76", "NaN").encode(), "k-1", None),
    ("lat_out_of_range", "rider", "/v1/rides", {**BODY, "pickup": {"lat": 95, "lng": 1}}, "k-1", None),
    ("text_plain", "rider", "/v1/rides", BODY, "k-1", {"Content-Type": "text/plain"}),
    ("empty_offer", "driver", ACCEPT, {"offer_id": ""}, None, None),
    ("no_body", "driver", DECLINE, b"", None, None),
    ("bad_token_bad_body", None, "/v1/rides", b"[", "k-1", {"Authorization": "Bearer x"}),
]


def _case(edge: Edge, n: int, role, path, body, key, extra):
    sub = {"driver": f"drv-{n}", "rider": f"r-{n}"}.get(role or "", "")
    p, content, headers = _request(
        edge, role or "rider", sub or "r-x", path=path, body=body, key=key, extra=extra
    )
    if role is None and "Authorization" not in (extra or {}):
        del headers["Authorization"]
    return p, content, headers


def _hot_and_fastapi(edge: Edge, inner, request) -> tuple[httpx.Response, httpx.Response]:
    """``request`` through HotRoutes (over ``inner``), then, with the rate limits reset,
    through FastAPI alone."""
    p, content, headers = request

    async def run():
        via_hot = await _send(HotRoutes(inner, edge, router.routes), "POST", p, content, headers)
        edge.rest_buckets.clear()
        return via_hot, await _send(plain_app(edge), "POST", p, content, headers)

    return asyncio.run(run())


@pytest.mark.parametrize("n, case", list(enumerate(HOT)), ids=[c[0] for c in HOT])
def test_the_hot_path_answers_as_fastapi_does(n, case):
    _, role, path, body, key, extra = case
    edge = make_edge()
    hot, fastapi = _hot_and_fastapi(edge, _must_not_pass, _case(edge, n, role, path, body, key, extra))
    assert _answer(hot) == _answer(fastapi)
    assert hot.status_code in (401, 403, 503), hot.text


@pytest.mark.parametrize("n, case", list(enumerate(PASSED_ON)), ids=[c[0] for c in PASSED_ON])
def test_bad_input_is_passed_on_to_fastapi_with_its_body(n, case):
    _, role, path, body, key, extra = case
    edge = make_edge()
    request = _case(edge, 100 + n, role, path, body, key, extra)
    seen: list[str] = []
    inner = plain_app(edge)

    async def recording(scope, receive, send):
        seen.append(scope["path"])
        await inner(scope, receive, send)

    via_hot, direct = _hot_and_fastapi(edge, recording, request)
    assert seen == [request[0]]
    assert _answer(via_hot) == _answer(direct)
    assert via_hot.status_code in (401, 422), via_hot.text


def test_the_rate_limit_holds_on_the_hot_path():
    edge = make_edge()
    p, content, headers = _request(edge, "rider", "r-busy")
    app = HotRoutes(_must_not_pass, edge, router.routes)

    async def run():
        return [(await _send(app, "POST", p, content, headers)) for _ in range(5)]

    answers = asyncio.run(run())
    assert [r.status_code for r in answers] == [503, 503, 503, 429, 429]
    assert (
        answers[-1].json()["error"]["code"] == "rate_limited" and int(answers[-1].headers["Retry-After"]) >= 1
    )


def test_only_posts_to_the_three_routes_are_hot():
    assert match("/v1/rides")[0].path == "/v1/rides"
    assert match(f"/v1/rides/{RIDE}/accept") == (match(ACCEPT)[0], RIDE)
    assert match(DECLINE)[0].path == "/v1/rides/{ride_id}/decline"
    for path in (
        "/v1/rides/",
        f"/v1/rides/{RIDE}",
        f"/v1/rides/{RIDE}/cancel",
        f"/v1/rides/{RIDE}/accept/x",
        "/v1/rides//accept",
        "/v1/ridesx",
    ):
        assert match(path) is None, path


def test_the_whole_app_times_hot_requests_under_their_route():
    edge = make_edge()
    p, content, headers = _request(edge, "rider", "r-timed")

    async def run():
        return await _send(create_app(edge.settings, edge), "POST", p, content, headers)

    assert asyncio.run(run()).status_code == 503
    sample = edge.rest_latency.labels("/v1/rides", "POST", "503")
    assert sample._sum.get() > 0  # observed under the declared route's path
