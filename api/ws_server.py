"""uvicorn's Sans-I/O WebSocket protocol, with a direct path from the socket to a handler.

Under plain ASGI every message costs a queue put, a pause and resume of the transport's
reading, and a wake-up of the app's task, which resumes through the whole middleware
stack (about twenty coroutine frames under FastAPI) to hand back one frame; and the
websockets Sans-I/O parser spends about 6 µs on a 60-byte frame in its generators. At
25,000 single-location frames a second that was most of the edge's CPU: 30 µs a frame in
all, of which the handler's own decoding and checks were 6 µs (py-spy and perf).

:class:`DirectWebSocketProtocol` is uvicorn's ``websockets-sansio`` protocol (the
handshake, keepalive pings, close handshake, size limit, fragmented messages and UTF-8
checks stay theirs), plus three things:

- one ASGI extension, ``scope["extensions"]["dispatch.direct_receive"]``: a
  :class:`DirectReceive` whose :meth:`~DirectReceive.start` makes the protocol call a
  handler synchronously from ``data_received`` for every message from then on. Apps that
  do not use the extension see uvicorn's plain behaviour.
- a framer: it splits the byte stream into whole frames itself and unmasks the common
  kind (a final, unfragmented, masked text or binary frame without extension bits) in
  one step; every other frame (pings, pongs, close, fragments, compressed, malformed or
  oversized ones) goes whole, in order, through websockets' parser as before, so what is
  accepted, answered and refused does not change.
- a text frame that is not UTF-8 reaches the handler as :class:`api.protocol.InvalidText`
  (which answers ``bad_frame``), where uvicorn logs a traceback and closes with 1007.

Selected with ``DISPATCH_WS_IMPL=direct`` (the default; see api/settings.py). Written
against uvicorn 0.54's ``WebSocketsSansIOProtocol`` and websockets 17: it overrides
``data_received``, ``handle_connect`` and ``send_receive_event_to_app`` and reads the
attributes they use; where it cannot tell that websockets' parser is at a frame boundary
it leaves the parsing to websockets for that socket.
"""

from __future__ import annotations

import asyncio
import inspect
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import State
from websockets.speedups import apply_mask

from api.protocol import InvalidText

EXTENSION = "dispatch.direct_receive"

#: what a handler gets: the message's bytes (binary frame) or str (text frame)
MessageHandler = Callable[[bytes | str], Awaitable[None] | None]


class DirectReceive:
    """The app's side of the extension: one per socket."""

    __slots__ = ("_protocol",)

    def __init__(self, protocol: DirectWebSocketProtocol) -> None:
        self._protocol = protocol

    def start(self, handler: MessageHandler) -> None:
        """From now on, pass each received message to ``handler``, in order.

        ``handler(data)`` is called inside the transport's ``data_received`` callback,
        so it must not block; messages already queued as ``websocket.receive`` events go
        to it first, here. If it returns an awaitable, the protocol awaits it in a task
        and holds later messages (and stops reading the socket) until it is done, so a
        handler that awaits sees the same one-at-a-time order as a receive loop. It
        should not raise: an exception it lets out is logged, and the socket goes on.

        After this the app's ``receive()`` yields only ``websocket.disconnect``; the app
        awaits it to learn that the socket is finished, exactly as before.
        """
        self._protocol.start_direct(handler)


class DirectWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's ``websockets-sansio`` protocol with the ``dispatch.direct_receive`` extension."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handler: MessageHandler | None = None
        self.held: deque[bytes | str] = deque()  # messages waiting for a handler's awaitable
        self.busy: asyncio.Task | None = None  # the awaitable the handler returned, if pending
        # The framer: None until it owns the byte stream (from the end of the upgrade
        # request), then the bytes of an incomplete frame; ``need`` is that frame's size.
        self.partial: bytearray | None = None
        self.need = 0
        self.framer_off = False  # websockets parses this socket's frames, for good

    # -- framing -------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.partial is not None:
            self.receive_frames(data)
            return
        initiated = self.handshake_initiated
        super().data_received(data)
        if initiated or self.framer_off or not self.handshake_initiated:
            return
        # This chunk ended the upgrade request. The framer may take over only at a frame
        # boundary: nothing after the request (a client must wait for the 101 anyway).
        if data.endswith(b"\r\n\r\n") and not getattr(self.conn.reader, "buffer", b"?"):
            self.partial = bytearray()
        else:
            self.framer_off = True

    def receive_frames(self, data: bytes) -> None:
        """Split the stream into whole frames; deliver the common kind, parse the rest."""
        buf: bytes | bytearray
        partial = self.partial
        assert partial is not None
        if partial:
            partial += data
            if len(partial) < self.need:
                return
            buf = partial
        else:
            buf = data
        self.need = 0
        pos, end = 0, len(buf)
        max_size = self.conn.max_message_size
        while end - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            n, head = b1 & 0x7F, 2
            if n == 126:
                if end - pos < 4:
                    break
                n, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif n == 127:
                if end - pos < 10:
                    break
                n, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            masked = b1 & 0x80
            if masked:
                head += 4
            if max_size is not None and n > max_size:
                # websockets refuses it (close 1009): from here on the stream is its own.
                self.hand_over(buf[pos:])
                return
            stop = pos + head + n
            if stop > end:
                self.need = stop - pos
                break
            if (b0 == 0x82 or b0 == 0x81) and masked and not self.frames and self.conn.state is State.OPEN:
                self.frames = [apply_mask(buf[pos + head : stop], buf[pos + head - 4 : pos + head])]
                self.curr_msg_data_type = "bytes" if b0 == 0x82 else "text"
                self.send_receive_event_to_app()
            else:
                super().data_received(bytes(buf[pos:stop]))
                if self.conn.state is not State.OPEN or self.conn.parser_exc is not None:
                    self.hand_over(buf[stop:])  # closing or failed: websockets discards the rest
                    return
            pos = stop
        if buf is partial:
            del partial[:pos]
        else:
            self.partial = bytearray(buf[pos:])

    def hand_over(self, rest: bytes | bytearray) -> None:
        """Leave the rest of the stream to websockets' parser (at a frame boundary)."""
        self.partial = None
        self.framer_off = True
        if rest:
            super().data_received(bytes(rest))

    # -- direct delivery ------------------------------------------------------------------------

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)  # unset when the handshake was refused
        if scope is not None:
            scope["extensions"][EXTENSION] = DirectReceive(self)

    def start_direct(self, handler: MessageHandler) -> None:
        self.handler = handler
        # Messages that came before the app was ready are in uvicorn's queue (and paused
        # the reading): hand them over first, in order, and keep whatever else is there.
        others = []
        while not self.queue.empty():
            event = self.queue.get_nowait()
            if event["type"] == "websocket.receive":
                data = event.get("bytes")
                # An ASGI receive event carries bytes or text, never neither.
                self.held.append(data if data is not None else event.get("text") or "")
            else:
                others.append(event)
        for event in others:
            self.queue.put_nowait(event)
        paused, self.read_paused = self.read_paused, False
        self.deliver_held()
        if paused and self.busy is None:
            self.transport.resume_reading()  # else finish() resumes when the handler is done

    def send_receive_event_to_app(self) -> None:
        if self.handler is None:
            super().send_receive_event_to_app()
            return
        raw = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
        self.frames = []
        if self.close_sent:
            return  # past the app's close: dropped, as uvicorn does
        data: bytes | str = raw
        if self.curr_msg_data_type == "text":
            try:
                data = raw.decode()
            except UnicodeDecodeError:
                # A client's bad frame, not the edge's fault: uvicorn logs a traceback and
                # closes with 1007; the handler answers it as a bad frame and goes on.
                data = InvalidText(raw)
        if self.busy is not None or self.held:
            self.held.append(data)
            return
        self.deliver(data)

    def deliver(self, data: bytes | str) -> bool:
        """Hand one message to the handler; False if it returned work still pending."""
        try:
            result = self.handler(data)  # type: ignore[misc]
        except Exception:
            self.logger.exception("WebSocket message handler failed")
            return True
        if result is None:
            return True
        if not inspect.isawaitable(result):
            return True
        self.busy = self.loop.create_task(self.finish(result))
        self.transport.pause_reading()
        return False

    async def finish(self, work: Awaitable[None]) -> None:
        try:
            await work
        except Exception:
            self.logger.exception("WebSocket message handler failed")
        finally:
            self.busy = None
        if self.deliver_held() and not self.disconnected:
            self.transport.resume_reading()

    def deliver_held(self) -> bool:
        """Deliver held messages in order; False if one left work pending (the rest wait)."""
        while self.held:
            if not self.deliver(self.held.popleft()):
                return False
        return True
