"""The benchmarks' HTTP client (loadtests.bench_match.HttpPool) against a real server socket."""

from __future__ import annotations

import asyncio
import json

import pytest

from loadtests.bench_match import HttpPool, _http_errors


async def _serve(replies: list[bytes], seen: list[bytes]) -> tuple[asyncio.Server, int]:
    """A server that answers each request on a connection with the next canned reply
    (split in two writes, to exercise partial reads); an empty reply closes it."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while replies:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                (
                    int(h.split(b":")[1])
                    for h in head.split(b"\r\n")
                    if h.lower().startswith(b"content-length")
                ),
                0,
            )
            seen.append(head + await reader.readexactly(length))
            reply = replies.pop(0)
            if not reply:
                writer.close()
                return
            writer.write(reply[:10])
            await writer.drain()
            await asyncio.sleep(0.01)
            writer.write(reply[10:])
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_replies_by_length_and_chunked_on_one_kept_alive_connection():
    body = json.dumps({"ride_id": "r-1"}).encode()
    replies = [
        b"HTTP/1.1 201 Created\r\ncontent-length: %d\r\ncontent-type: application/json\r\n\r\n%s"
        % (len(body), body),
        b'HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\n{"a"\r\n3\r\n:1}\r\n0\r\n\r\n',
        b"HTTP/1.1 204 No Content\r\n\r\n",
    ]
    seen: list[bytes] = []

    async def run():
        server, port = await _serve(replies, seen)
        pool = HttpPool(f"http://127.0.0.1:{port}", 4)
        sent = []
        first = await pool.post(
            "/v1/rides", on_send=lambda: sent.append(1), json={"x": 1}, headers={"A": "b"}
        )
        second = await pool.get("/v1/rides/r-1")
        third = await pool.post("/v1/rides/r-1/decline", json={"offer_id": "o"})
        opened = len(pool.open)
        await pool.aclose()
        server.close()
        return first, second, third, sent, opened

    first, second, third, sent, opened = asyncio.run(run())
    assert (first.status_code, first.json()) == (201, {"ride_id": "r-1"})
    assert (second.status_code, second.json()) == (200, {"a": 1})
    assert (third.status_code, third.body) == (204, b"")
    assert sent == [1] and opened == 1  # one connection carried all three
    assert seen[0].startswith(b"POST /v1/rides HTTP/1.1\r\n") and seen[0].endswith(b'\r\n\r\n{"x":1}')
    assert b"\r\nA: b\r\n" in seen[0] and seen[1].startswith(b"GET /v1/rides/r-1 HTTP/1.1\r\n")


def test_a_connection_closed_mid_request_is_an_http_error():
    seen: list[bytes] = []

    async def run():
        server, port = await _serve([b""], seen)
        pool = HttpPool(f"http://127.0.0.1:{port}", 1)
        try:
            with pytest.raises(_http_errors()):
                await pool.post("/v1/rides", json={})
            assert not pool.open and not pool.idle
        finally:
            server.close()

    asyncio.run(run())


def test_a_refused_connection_is_an_http_error():
    async def run():
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        with pytest.raises(_http_errors()):
            await HttpPool(f"http://127.0.0.1:{port}", 1).post("/v1/rides", json={})

    asyncio.run(run())


def test_a_connection_idle_longer_than_the_server_keeps_it_is_not_reused(monkeypatch):
    """uvicorn closes a connection idle for 5 s; a request sent on it as it does meets a
    reset. The pool opens a new one instead of reusing one idle that long."""
    monkeypatch.setattr(HttpPool, "IDLE_REUSE_S", 0.2)
    ok = b"HTTP/1.1 204 No Content\r\n\r\n"
    seen: list[bytes] = []

    async def run():
        server, port = await _serve([ok, ok, ok], seen)
        pool = HttpPool(f"http://127.0.0.1:{port}", 1)
        await pool.post("/v1/rides/r-1/decline", json={})
        await pool.post("/v1/rides/r-1/decline", json={})  # reused at once
        assert len(pool.open) == 1
        (first,) = pool.open
        await asyncio.sleep(0.3)
        await pool.post("/v1/rides/r-1/decline", json={})  # the idle one is closed, a new one opened
        (second,) = pool.open
        await pool.aclose()
        server.close()
        return first, second

    first, second = asyncio.run(run())
    assert second is not first and first.transport.is_closing() and len(seen) == 3
