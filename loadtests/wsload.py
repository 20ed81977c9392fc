"""A lean WebSocket load generator for the edge's driver and gateway sockets.

    python -m loadtests.wsload drivers --url ws://127.0.0.1:8000 --sockets 2500 --rate 10 --seconds 30
    python -m loadtests.wsload gateway --url ws://127.0.0.1:8000 --sockets 4 --rate 200000 --seconds 30

Tokens are minted here from DISPATCH_JWT_SECRET (the edge's own), one per driver.

Why not a WebSocket library: at 25,000 frames a second the client would need as much
CPU as the edge it measures, on the same two cores. This client speaks RFC 6455 just
enough: a real HTTP upgrade handshake (with the bearer token), then client frames
written straight to the transport. Client frames must be masked; the masking key is
chosen per frame by the client and all-zero is a valid key, which leaves the payload
as is, so a frame costs one msgpack encode and one write. The edge still unmasks,
decodes, validates and routes every frame as it would a phone's. Server frames are read
and counted (errors are parsed to report their codes), never left to fill the buffers.

The last line of output is a JSON object: frames sent, errors received by code.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
import time
from collections import Counter
from urllib.parse import urlparse

import numpy as np

from api import client as proto
from dispatch.fleet import Fleet
from dispatch.region import load_region
from dispatch.shardmap import ShardMap


def frame_header(n: int, opcode: int = 0x2) -> bytes:
    """FIN + opcode, MASK bit set, length, and an all-zero masking key."""
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + b"\x00\x00\x00\x00"


def binary_frame(payload: bytes) -> bytes:
    return frame_header(len(payload)) + payload


class _Reader(asyncio.Protocol):
    """Counts server frames; decodes error messages to tally their codes."""

    def __init__(self, errors: Counter) -> None:
        self.buf = bytearray()
        self.errors = errors
        self.frames = 0
        self.closed = asyncio.Event()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= 2:
            b1 = self.buf[1] & 0x7F
            off = 2
            if b1 == 126:
                if len(self.buf) < 4:
                    return
                b1, off = int.from_bytes(self.buf[2:4], "big"), 4
            elif b1 == 127:
                if len(self.buf) < 10:
                    return
                b1, off = int.from_bytes(self.buf[2:10], "big"), 10
            if len(self.buf) < off + b1:
                return
            opcode = self.buf[0] & 0x0F
            payload = bytes(self.buf[off : off + b1])
            del self.buf[: off + b1]
            self.frames += 1
            if opcode == 0x8:
                self.closed.set()
            elif opcode in (0x1, 0x2):
                try:
                    msg = proto.decode(payload.decode() if opcode == 0x1 else bytes(payload))
                    if msg.get("type") == "error":
                        self.errors[msg.get("code", "?")] += 1
                except Exception:
                    self.errors["undecodable"] += 1

    def connection_lost(self, exc) -> None:
        self.closed.set()


async def connect(url: str, path: str, token: str, errors: Counter) -> tuple[asyncio.Transport, _Reader]:
    """Open a socket: HTTP upgrade with the token, then hand the transport to a _Reader."""
    u = urlparse(url)
    reader, writer = await asyncio.open_connection(u.hostname, u.port or 80)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET {path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {token}\r\n\r\n"
        ).encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    if b" 101 " not in head.split(b"\r\n", 1)[0]:
        raise ConnectionError(f"upgrade refused: {head[:200]!r}")
    transport = writer.transport
    proto = _Reader(errors)
    proto.writer = writer  # a collected StreamWriter closes its transport
    leftover = reader._buffer  # frames that arrived with the handshake (the welcome)
    transport.set_protocol(proto)
    proto.connection_made(transport)
    if leftover:
        proto.data_received(bytes(leftover))
    return transport, proto


def _tokens(subs: list[str], role: str) -> list[str]:
    from api.auth import TokenAuthority
    from api.settings import load_settings

    authority = TokenAuthority(load_settings())
    return [authority.issue(s, role, 3600) for s in subs]


async def _open_all(url: str, path: str, tokens: list[str], errors: Counter, parallel: int = 100):
    conns: list = [None] * len(tokens)
    sem = asyncio.Semaphore(parallel)

    async def one(i: int) -> None:
        async with sem:
            conns[i] = await connect(url, path, tokens[i], errors)

    await asyncio.gather(*(one(i) for i in range(len(tokens))))
    return conns


async def run_drivers(url: str, sockets: int, rate: float, seconds: float, first_id: int, seed: int) -> dict:
    """``sockets`` drivers, each sending one location frame per ``1/rate`` s (spread evenly)."""
    region = load_region()
    fleet = Fleet(region, ShardMap(region), sockets, seed=seed)
    ids = np.arange(first_id, first_id + sockets)
    errors: Counter = Counter()
    conns = await _open_all(url, "/v1/ws/driver", _tokens([f"drv-{i}" for i in ids], "driver"), errors)
    now = time.time()
    for (t, _), j in zip(conns, range(sockets), strict=True):
        t.write(binary_frame(proto.encode(proto.online(float(fleet.lat[j]), float(fleet.lng[j]), ts=now))))
    await asyncio.sleep(1.0)
    sent = 0
    tick_s = 0.01
    per_tick = sockets * rate * tick_s
    owed = 0.0
    cursor = 0
    t0 = time.monotonic()
    next_tick = t0
    while time.monotonic() - t0 < seconds:
        owed += per_tick
        k = int(owed)
        owed -= k
        if k:
            idx = (cursor + np.arange(k)) % sockets
            cursor = int((cursor + k) % sockets)
            ts = time.time()
            fleet.move(idx, time.monotonic() - t0)
            lat, lng = fleet.lat[idx].tolist(), fleet.lng[idx].tolist()
            for j, a, b in zip(idx.tolist(), lat, lng, strict=True):
                transport = conns[j][0]
                transport.write(binary_frame(proto.encode(proto.location(a, b, ts))))
            sent += k
        next_tick += tick_s
        delay = next_tick - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
    elapsed = time.monotonic() - t0
    await asyncio.sleep(0.5)
    for t, _ in conns:
        t.close()
    return {
        "sent": sent,
        "seconds": round(elapsed, 2),
        "sent_per_s": round(sent / elapsed, 1),
        "errors": dict(errors),
    }


async def run_gateway(
    url: str,
    sockets: int,
    rate: float,
    seconds: float,
    drivers: int,
    batch_rows: int,
    first_id: int,
    seed: int,
) -> dict:
    """``sockets`` gateways sending columnar batch frames of ``batch_rows``, ``rate`` rows/s in all."""
    region = load_region()
    fleet = Fleet(region, ShardMap(region), drivers, seed=seed)
    ids = np.arange(first_id, first_id + drivers, dtype=np.int64)
    errors: Counter = Counter()
    conns = await _open_all(
        url, "/v1/ws/gateway", _tokens([f"gateway-{k}" for k in range(sockets)], "gateway"), errors
    )

    def frame(idx: np.ndarray, ts: float, intent: int = 0) -> bytes:
        n = len(idx)
        return binary_frame(
            proto.encode(
                proto.batch_of(
                    driver_id=ids[idx],
                    lat=fleet.lat[idx],
                    lng=fleet.lng[idx],
                    ts=np.full(n, ts),
                    intent=np.full(n, intent, dtype=np.int8),
                )
            )
        )

    # Everyone online first, then the paced phase.
    for k in range(0, drivers, batch_rows):
        conns[(k // batch_rows) % sockets][0].write(
            frame(np.arange(k, min(k + batch_rows, drivers)), time.time(), 1)
        )
        await asyncio.sleep(0.002)
    await asyncio.sleep(2.0)
    sent = 0
    frames = 0
    interval = batch_rows / rate
    cursor = 0
    t0 = time.monotonic()
    next_at = t0
    while time.monotonic() - t0 < seconds:
        idx = (cursor + np.arange(batch_rows)) % drivers
        cursor = int((cursor + batch_rows) % drivers)
        ts = time.time()
        fleet.move(idx, time.monotonic() - t0)
        conns[frames % sockets][0].write(frame(idx, ts))
        frames += 1
        sent += batch_rows
        next_at += interval
        delay = next_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            await asyncio.sleep(0)
    elapsed = time.monotonic() - t0
    await asyncio.sleep(0.5)
    for t, _ in conns:
        t.close()
    return {
        "sent": sent,
        "frames": frames,
        "seconds": round(elapsed, 2),
        "sent_per_s": round(sent / elapsed, 1),
        "errors": dict(errors),
    }


def _allowed(url: str) -> bool:
    """127.0.0.1, or a host of the namespace cluster (loadtests/cluster.py picks its /24
    under 10.213.0.0/16): load never leaves this machine."""
    import ipaddress

    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip in ipaddress.ip_network("10.213.0.0/16")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="loadtests.wsload", description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["drivers", "gateway"])
    p.add_argument("--url", default="ws://127.0.0.1:8000")
    p.add_argument("--sockets", type=int, default=2500)
    p.add_argument(
        "--rate", type=float, default=10.0, help="drivers: frames/s per socket; gateway: rows/s in all"
    )
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--drivers", type=int, default=100_000, help="gateway: fleet size")
    p.add_argument("--batch-rows", type=int, default=2000)
    p.add_argument("--first-id", type=int, default=20_000_000)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    if not _allowed(args.url):
        print("load goes to 127.0.0.1 or the namespace cluster's hosts (10.213.0.0/16) only", file=sys.stderr)
        return 2
    if args.mode == "drivers":
        out = asyncio.run(
            run_drivers(args.url, args.sockets, args.rate, args.seconds, args.first_id, args.seed)
        )
    else:
        out = asyncio.run(
            run_gateway(
                args.url,
                args.sockets,
                args.rate,
                args.seconds,
                args.drivers,
                args.batch_rows,
                args.first_id,
                args.seed,
            )
        )
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
