"""A cap on the size of REST request bodies, enforced before anything parses them.

A plain ASGI middleware (like ``api.app.RestTiming``): a body larger than its route's
limit is answered ``413`` with the error shape of every route, ``{"error": {"code":
"payload_too_large", ...}}``, and never reaches the app. A declared ``Content-Length``
over the limit is refused before a byte of the body is read; a body without one
(chunked) is counted as it arrives and refused as soon as it passes the limit.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

#: Every JSON route's bodies are a few hundred bytes (a quote, a ride request, a top-up);
#: 64 KiB leaves room for any of them and keeps a 16 MB body from being parsed.
DEFAULT_MAX_BODY_BYTES = 64 * 1024


class BodyLimit:
    """Refuse request bodies over their route's limit with 413.

    ``limits`` maps a path prefix to its limit in bytes (the longest matching prefix
    wins); other paths get ``default_bytes``.
    """

    def __init__(
        self, app, default_bytes: int = DEFAULT_MAX_BODY_BYTES, limits: Mapping[str, int] | None = None
    ) -> None:
        self.app = app
        self.default_bytes = int(default_bytes)
        self.limits = sorted((limits or {}).items(), key=lambda kv: -len(kv[0]))

    def limit_of(self, path: str) -> int:
        return next((n for prefix, n in self.limits if path.startswith(prefix)), self.default_bytes)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_of(scope["path"])
        declared = None
        for name, value in scope.get("headers") or ():
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = None
                break
        if declared is not None:
            if declared > limit:
                await _too_large(send, limit)
                return
            # The server holds the body to its declared length: nothing more to count.
            await self.app(scope, receive, send)
            return
        # No length declared (chunked): read it here, up to the limit, then replay it.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client went away; the app sees the disconnect
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                await _too_large(send, limit)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
        if message["type"] != "http.request":
            replay = [message]

        async def replayed():
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)


async def _too_large(send, limit: int) -> None:
    body = json.dumps(
        {
            "error": {
                "code": "payload_too_large",
                "message": f"request body over this route's limit of {limit} bytes",
                "detail": {"limit_bytes": limit},
            }
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
