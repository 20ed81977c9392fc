"""The ``direct`` WebSocket protocol (api/ws_server.py) over real sockets, in process.

A raw client writes RFC 6455 frames with random masks, cut into chunks at random
places, so the framer sees every split; what it does not deliver itself (pings,
fragments, bad frames) must come out exactly as websockets and uvicorn make it.
"""

from __future__ import annotations

import asyncio
import base64
import os
import random

import pytest
import uvicorn
from websockets.speedups import apply_mask

from api.protocol import InvalidText
from api.ws_server import EXTENSION, DirectWebSocketProtocol
from tests.helpers import eventually, scaled

pytestmark = pytest.mark.e2e

MAX_SIZE = 100_000


class App:
    """Echoes every message. ``/direct``: via the extension; ``/late``: the same, started
    when the test sets ``late_go`` (the socket's protocol is in ``late`` meanwhile);
    ``/plain``: a receive loop. A message ``sleep`` makes the handler return an awaitable
    that takes 50 ms. Each socket's log of what happened goes in ``logs``."""

    def __init__(self) -> None:
        self.logs: list[list] = []
        self.late = None
        self.late_go = asyncio.Event()

    async def __call__(self, scope, receive, send) -> None:
        assert scope["type"] == "websocket"
        assert (await receive())["type"] == "websocket.connect"
        await send({"type": "websocket.accept"})
        log: list = []
        self.logs.append(log)
        out: asyncio.Queue = asyncio.Queue()

        async def writer():
            while (data := await out.get()) is not None:
                key = "bytes" if isinstance(data, bytes) else "text"
                try:
                    await send({"type": "websocket.send", key: data})
                except Exception:
                    return  # closed under us (a refused frame)

        async def slow():
            log.append("sleep-start")
            await asyncio.sleep(0.05)  # a handler's awaited work, not a wait for anything
            log.append("sleep-end")
            out.put_nowait(b"slept")

        def handler(data):
            log.append(data)
            if data == b"sleep":
                return slow()
            out.put_nowait(data)
            return None

        w = asyncio.get_running_loop().create_task(writer())
        if scope["path"] == "/plain":
            while (m := await receive())["type"] == "websocket.receive":
                handler(m.get("bytes") if m.get("bytes") is not None else m["text"])
        else:
            if scope["path"] == "/late":
                # What the test looks at: the messages uvicorn queues before the start.
                self.late = scope["extensions"][EXTENSION]._protocol
                await self.late_go.wait()
            scope["extensions"][EXTENSION].start(handler)
            while (await receive())["type"] != "websocket.disconnect":
                pass
        log.append("disconnect")
        out.put_nowait(None)
        await w


@pytest.fixture(scope="module")
async def server():
    app = App()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        ws=DirectWebSocketProtocol,
        ws_max_size=MAX_SIZE,
        log_level="warning",
        lifespan="off",
    )
    srv = uvicorn.Server(config)
    task = asyncio.get_running_loop().create_task(srv.serve())
    await eventually(lambda: srv.started)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield app, port
    srv.should_exit = True
    await task


def frame(payload: bytes, opcode: int = 0x2, fin: bool = True, mask: bool = True, rsv: int = 0) -> bytes:
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | rsv << 4 | opcode])
    m = 0x80 if mask else 0
    if n < 126:
        head += bytes([m | n])
    elif n < 65536:
        head += bytes([m | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([m | 127]) + n.to_bytes(8, "big")
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + apply_mask(payload, key)


class Client:
    """Raw RFC 6455: writes what it is given, reads server frames (unmasked)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, path: str) -> Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        assert b" 101 " in head.split(b"\r\n")[0], head
        return cls(reader, writer)

    async def write_in_pieces(self, data: bytes, rng: random.Random) -> None:
        pos = 0
        while pos < len(data):
            step = 70_000 if rng.random() < 0.02 else rng.choice([1, 2, 3, 5, 9, 64, 300, 2000])
            self.writer.write(data[pos : pos + step])
            await self.writer.drain()
            if rng.random() < 0.5:
                await asyncio.sleep(0.002)  # so the server reads this piece on its own
            pos += step

    async def read_frame(self) -> tuple[int, bytes]:
        async with asyncio.timeout(scaled(10)):
            b0, b1 = await self.reader.readexactly(2)
            n = b1 & 0x7F
            if n == 126:
                n = int.from_bytes(await self.reader.readexactly(2), "big")
            elif n == 127:
                n = int.from_bytes(await self.reader.readexactly(8), "big")
            return b0 & 0x0F, await self.reader.readexactly(n)

    async def close_code(self) -> int:
        """Read until the server's close frame; its code."""
        while True:
            op, data = await self.read_frame()
            if op == 0x8:
                return int.from_bytes(data[:2], "big")


@pytest.mark.parametrize("path", ["/direct", "/plain"])
async def test_every_message_arrives_whole_and_in_order_however_the_stream_is_cut(server, path):
    app, port = server
    rng = random.Random(7)
    c = await Client.open(port, path)
    sizes = [0, 1, 60, 125, 126, 127, 1000, 65535, 65536, 90_000] + [rng.randrange(200) for _ in range(200)]
    messages = [(rng.random() < 0.2, os.urandom(n)) for n in sizes]
    messages = [(text, d.hex()[: len(d)].encode() if text else d) for text, d in messages]
    stream = b"".join(frame(d, 0x1 if text else 0x2) for text, d in messages)
    await c.write_in_pieces(stream, rng)
    for text, d in messages:
        op, data = await c.read_frame()
        assert (op, data) == ((0x1, d) if text else (0x2, d))
    c.writer.write(frame(b"\x03\xe8", 0x8))
    assert await c.close_code() == 1000
    log = await eventually(lambda: app.logs[-1][-1] == "disconnect" and app.logs[-1])
    assert log[:-1] == [d.decode() if text else d for text, d in messages]


async def test_pings_and_fragmented_messages_go_through_websockets_between_fast_frames(server):
    app, port = server
    c = await Client.open(port, "/direct")
    stream = (
        frame(b"one")
        + frame(b"are you there", 0x9)
        + frame(b"fr", 0x1, fin=False)
        + frame(b"agm", 0x0, fin=False)
        + frame(b"ent", 0x0)
        + frame(b"two")
    )
    await c.write_in_pieces(stream, random.Random(3))
    got = [await c.read_frame() for _ in range(4)]
    # The pong is the protocol's own, written at once; echoes go through the app's writer.
    assert (0xA, b"are you there") in got
    assert [f for f in got if f[0] != 0xA] == [(0x2, b"one"), (0x1, b"fragment"), (0x2, b"two")]


async def test_a_handler_that_awaits_holds_the_messages_after_it(server):
    app, port = server
    c = await Client.open(port, "/direct")
    c.writer.write(frame(b"sleep") + frame(b"a") + frame(b"b"))
    assert [await c.read_frame() for _ in range(3)] == [(0x2, b"slept"), (0x2, b"a"), (0x2, b"b")]
    assert app.logs[-1][:5] == [b"sleep", "sleep-start", "sleep-end", b"a", b"b"]


async def test_messages_sent_before_the_handler_starts_come_first(server):
    app, port = server
    c = await Client.open(port, "/late")
    c.writer.write(b"".join(frame(bytes([i])) for i in range(5)))
    await eventually(lambda: app.late is not None and app.late.queue.qsize() == 5)
    app.late_go.set()
    await eventually(lambda: app.late.handler is not None)  # started: the rest go straight to it
    c.writer.write(b"".join(frame(bytes([i])) for i in range(5, 10)))
    assert [await c.read_frame() for _ in range(10)] == [(0x2, bytes([i])) for i in range(10)]


async def test_text_that_is_not_utf8_reaches_the_handler_as_invalid_text_and_the_socket_goes_on(server):
    """uvicorn would log a traceback and close with 1007; the handler answers it instead
    (the edge's: bad_frame)."""
    app, port = server
    c = await Client.open(port, "/direct")
    c.writer.write(frame(b"before") + frame(b"\xff\xfe", 0x1) + frame(b"after"))
    assert [await c.read_frame() for _ in range(3)] == [(0x2, b"before"), (0x2, b"\xff\xfe"), (0x2, b"after")]
    got = app.logs[-1][:3]
    assert got == [b"before", b"\xff\xfe", b"after"] and type(got[1]) is InvalidText


@pytest.mark.parametrize(
    "bad, code",
    [
        (frame(b"x" * (MAX_SIZE + 1)), 1009),  # over the size limit
        (frame(b"hello", mask=False), 1002),  # client frames must be masked
        (frame(b"hello", 0x3), 1002),  # reserved opcode
        (frame(b"hello", rsv=4), 1002),  # extension bit without the extension
        (frame(b"tail", 0x0), 1002),  # continuation of nothing
    ],
)
async def test_bad_frames_are_refused_as_websockets_refuses_them(server, bad, code):
    app, port = server
    c = await Client.open(port, "/direct")
    c.writer.write(frame(b"before") + bad + frame(b"after"))
    assert await c.close_code() == code
    log = await eventually(lambda: app.logs[-1][-1] == "disconnect" and app.logs[-1])
    assert log == [b"before", "disconnect"]
