"""Publishing on the Redis bus over a connection of its own, in Redis' protocol directly.

The edge tells riders and drivers what happened (a ride accepted, a trip started) with one
``PUBLISH`` each, mostly one at a time. Through redis-py a lone publish cost ~130 µs of the
edge's CPU on a small machine (its connection pool, command packing and reply parsing,
all Python); written here it costs ~35-55 µs (``loadtests`` micro-run, 3,000 publishes).

:class:`RedisPublisher` writes each ``PUBLISH`` as it comes and reads the replies (one line
each, in order) as they arrive, without waiting for them: :meth:`RedisPublisher.publish`
returns once the command is handed to the socket. A publish that cannot be sent (Redis
down, refusing us, or so slow that a few MB are waiting for it) is dropped and counted,
never raised and never waited for: bus events are hints a client re-reads over REST
(docs/protocol.md), and an accept must not hang on a stalled Redis.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from urllib.parse import parse_qs, unquote, urlsplit

log = logging.getLogger("dispatch.bus")

# Waiting to be written before publishes are dropped: a Redis that does not read.
MAX_BUFFERED_BYTES = 4 << 20
CONNECT_TIMEOUT_S = 2.0
# After a failed connect, publishes are dropped this long before the next attempt.
RETRY_AFTER_S = 1.0


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def command(*args: bytes) -> bytes:
    """One Redis command in RESP."""
    return b"*%d\r\n" % len(args) + b"".join(_bulk(a) for a in args)


class _Replies(asyncio.Protocol):
    """A publishing connection's reading side: one reply line per command, in order
    (``:n`` for a PUBLISH, ``+OK`` for AUTH, ``-...`` for an error)."""

    def __init__(self, owner: RedisPublisher) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self._buf = b""

    def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        start = 0
        while (end := buf.find(b"\r\n", start)) >= 0:
            line = buf[start:end]
            start = end + 2
            kind = line[:1]
            if kind == b"-":
                self.owner.on_error(line[1:].decode("utf-8", "replace"))
            elif kind not in (b":", b"+"):
                # Not a reply to anything this connection sends: not a Redis we understand.
                self.owner.on_error(f"unexpected reply {line[:40]!r}")
                if self.transport is not None:
                    self.transport.close()
                return
        self._buf = buf[start:]

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner.on_lost(self, exc)


class RedisPublisher:
    """``PUBLISH`` on one connection of its own to the Redis at ``url`` (``redis://``,
    ``rediss://`` or ``unix://``, with a user and password if it has them). Opened on
    the first publish and again after it breaks. Counts what it sent, dropped and what
    Redis refused (``sent``, ``dropped``, ``errors``)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"not a Redis URL: {url!r} (redis://, rediss:// or unix://)")
        self.scheme = parts.scheme
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 6379
        self.path = unquote(parts.path)
        self.username = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password else None
        # As redis-py reads it: ``rediss://...?ssl_cert_reqs=none`` for a self-signed server.
        self.verify = parse_qs(parts.query).get("ssl_cert_reqs", ["required"])[-1].lower() != "none"
        self.sent = 0
        self.dropped = 0
        self.errors = 0
        self._conn: _Replies | None = None
        self._connecting: asyncio.Task[_Replies | None] | None = None
        self._retry_at = 0.0

    async def publish(self, channel: str, payload: bytes) -> bool:
        """Send ``payload`` on ``channel``; False if it was dropped (see the module)."""
        conn = self._conn  # None once its connection is lost (on_lost) or closed
        if conn is None:
            conn = await self._connect()
            if conn is None:
                self.dropped += 1
                return False
        transport = conn.transport
        assert transport is not None
        if transport.get_write_buffer_size() > MAX_BUFFERED_BYTES:
            self.dropped += 1
            return False
        transport.write(command(b"PUBLISH", channel.encode(), payload))
        self.sent += 1
        return True

    async def _connect(self) -> _Replies | None:
        """The open connection, or None (dropping). One attempt at a time, in a task of its
        own: a publish cancelled meanwhile (its request went away) neither abandons the
        attempt nor leaves the publishes after it waiting on one that never ends."""
        if self._connecting is None:
            if time.monotonic() < self._retry_at:
                return None
            self._connecting = asyncio.get_running_loop().create_task(self._attempt())
        return await asyncio.shield(self._connecting)

    async def _attempt(self) -> _Replies | None:
        conn: _Replies | None = None
        try:
            conn = await asyncio.wait_for(self._open(), CONNECT_TIMEOUT_S)
        except asyncio.CancelledError:
            pass  # closed meanwhile (close): the publishes waiting on it are dropped
        except Exception as exc:
            self._retry_at = time.monotonic() + RETRY_AFTER_S
            log.warning("bus publisher cannot reach Redis (%r); dropping for %.1f s", exc, RETRY_AFTER_S)
        finally:
            self._conn = conn
            self._connecting = None
        return conn

    async def _open(self) -> _Replies:
        loop = asyncio.get_running_loop()
        conn: _Replies
        if self.scheme == "unix":
            _, conn = await loop.create_unix_connection(lambda: _Replies(self), self.path)
        else:
            context = ssl.create_default_context() if self.scheme == "rediss" else None
            if context is not None and not self.verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            _, conn = await loop.create_connection(lambda: _Replies(self), self.host, self.port, ssl=context)
        if self.password is not None:
            auth = (self.username.encode(),) if self.username else ()
            assert conn.transport is not None
            conn.transport.write(command(b"AUTH", *auth, self.password.encode()))
        return conn

    def on_error(self, message: str) -> None:
        self.errors += 1
        if self.errors <= 10 or self.errors % 1000 == 0:
            log.warning("Redis refused a bus command (%d so far): %s", self.errors, message)

    def on_lost(self, conn: _Replies, exc: Exception | None) -> None:
        if conn is self._conn:
            self._conn = None
            log.warning("bus publisher lost Redis (%r); reconnecting on the next event", exc)

    def close(self) -> None:
        """Close the connection, and give up an attempt to open one (it would stay open)."""
        if self._connecting is not None:
            self._connecting.cancel()
        conn, self._conn = self._conn, None
        if conn is not None and conn.transport is not None:
            conn.transport.close()
