"""One JSON error shape for every REST error, and the map from domain errors to statuses.

Every error answers::

    {"error": {"code": "invalid_location", "message": "...", "detail": {...}}}

``code`` is stable and machine-readable (the ``code`` of the :mod:`dispatch.errors`
class, or one of the edge's own: ``unauthorized``, ``rate_limited``, ``validation_error``,
``not_found``, ``internal_error``). Sockets send the same code in their error messages.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from actors.directory import remote_error
from api.auth import Unauthorized
from dispatch.errors import (
    Conflict,
    DispatchError,
    Forbidden,
    IdempotencyMismatch,
    InvalidInput,
    NotFound,
    Unavailable,
)
from storage.db import unavailable

log = logging.getLogger("dispatch.edge")


class RateLimited(DispatchError):
    code = "rate_limited"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message, retry_after_s=round(retry_after_s, 2))
        self.retry_after_s = retry_after_s


#: most specific first
STATUS: tuple[tuple[type[DispatchError], int], ...] = (
    (Unauthorized, 401),
    (Forbidden, 403),
    (NotFound, 404),
    (IdempotencyMismatch, 422),
    (Conflict, 409),
    (InvalidInput, 422),
    (RateLimited, 429),
    (Unavailable, 503),
)


def status_of(exc: DispatchError) -> int:
    for cls, status in STATUS:
        if isinstance(exc, cls):
            return status
    return 400


def error_body(code: str, message: str, detail: dict | None = None) -> dict:
    return {"error": {"code": code, "message": message, "detail": detail or {}}}


def error_response(exc: DispatchError) -> JSONResponse:
    status = status_of(exc)
    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(exc, RateLimited):
        headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    elif status == 503:
        # Every 503 says when to come back (a dependency is down: the client retries with
        # the same Idempotency-Key); 1 s when the error did not say.
        wait = exc.detail.get("retry_after_s")
        headers["Retry-After"] = str(max(1, round(wait if isinstance(wait, int | float) else 1)))
    detail = {
        k: v for k, v in exc.detail.items() if isinstance(v, str | int | float | bool | None | list | dict)
    }
    return JSONResponse(error_body(exc.code, exc.message, detail), status_code=status, headers=headers)


def install(app: FastAPI) -> None:
    """Register the handlers that give every error the one shape."""

    @app.exception_handler(DispatchError)
    async def _domain(request: Request, exc: DispatchError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = [
            {
                "loc": [str(x) for x in e.get("loc", ())],
                "message": e.get("msg", ""),
                "type": e.get("type", ""),
            }
            for e in exc.errors()
        ]
        return JSONResponse(
            error_body(
                "validation_error",
                # Name the fields in the message too: a client's log shows the message first.
                "the request does not match the schema: "
                + "; ".join(f"{'.'.join(e['loc'])}: {e['message']}" for e in errors[:5]),
                {"errors": errors},
            ),
            status_code=422,
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        return unexpected_response(request.method, request.url.path, exc)


def unexpected_response(method: str, path: str, exc: Exception) -> JSONResponse:
    """The answer to an exception that is not a domain error: a shard's or Postgres' error
    translated (503 when down), else 500, logged with its traceback."""
    mapped = remote_error(exc)
    if isinstance(mapped, DispatchError):
        return error_response(mapped)
    down = unavailable(exc)  # a database error that escaped storage's translation
    if down is not None:
        log.warning("Postgres unavailable on %s %s: %r", method, path, exc)
        return error_response(down)
    log.error("unhandled error on %s %s", method, path, exc_info=exc)
    return JSONResponse(error_body("internal_error", "internal error; it has been logged"), status_code=500)
