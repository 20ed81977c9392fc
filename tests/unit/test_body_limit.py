"""REST bodies over their route's limit get 413 before anything parses them."""

import asyncio

import httpx
from fastapi import FastAPI, Request

from api.body_limit import BodyLimit


def _app(parsed: list):
    app = FastAPI()

    @app.post("/v1/quotes")
    async def quotes(request: Request):
        body = await request.body()
        parsed.append(len(body))
        return {"bytes": len(body)}

    @app.post("/v1/big/thing")
    async def big(request: Request):
        body = await request.body()
        parsed.append(len(body))
        return {"bytes": len(body)}

    app.add_middleware(BodyLimit, default_bytes=1024, limits={"/v1/big/": 8192})
    return app


def _post(app, path, content):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://edge") as c:
            return await c.post(path, content=content, headers={"content-type": "application/json"})

    return asyncio.run(go())


def _chunks(n: int, size: int = 300):
    async def gen():
        for _ in range(n):
            yield b"x" * size

    return gen()


def test_a_body_over_the_limit_is_refused_before_it_is_parsed():
    parsed: list = []
    app = _app(parsed)
    r = _post(app, "/v1/quotes", b"x" * 1025)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "payload_too_large"
    assert r.json()["error"]["detail"] == {"limit_bytes": 1024}
    assert parsed == []
    assert _post(app, "/v1/quotes", b"x" * 1024).json() == {"bytes": 1024}


def test_a_chunked_body_is_counted_as_it_arrives():
    parsed: list = []
    app = _app(parsed)
    r = _post(app, "/v1/quotes", _chunks(4))  # 1,200 bytes, no Content-Length
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    assert parsed == []
    assert _post(app, "/v1/quotes", _chunks(3)).json() == {"bytes": 900}


def test_a_route_can_take_more():
    parsed: list = []
    app = _app(parsed)
    assert _post(app, "/v1/big/thing", b"x" * 8000).json() == {"bytes": 8000}
    assert _post(app, "/v1/big/thing", _chunks(30)).status_code == 413
