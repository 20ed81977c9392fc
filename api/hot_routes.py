"""The busiest REST routes served straight from the server, not through FastAPI's stack.

A ride request and a driver's answer to an offer are most of an edge's REST traffic (at
10,000 rides a minute, about three requests a second per ride). Through FastAPI each
walks about twenty middleware, routing and dependency frames (error pages, telemetry,
exit stacks, the dependency solver, a second body validation): py-spy put those at a
fifth of a busy edge's CPU, as much as the routes' own work. :class:`HotRoutes` serves
them with the same steps in a few calls: the body validated by the route's own model,
the caller by :func:`api.routes.caller` and :func:`api.routes.check_role`, the work by
the route's function in :mod:`api.ride_routes`, errors by :mod:`api.errors`.

It takes only a request it can answer exactly as FastAPI would: a JSON body its model
accepts and, for a ride request, a well-formed ``Idempotency-Key``. Anything else (bad
input, another content type) passes on to FastAPI with its body, and gets FastAPI's
answer: one definition of every validation error. FastAPI still declares these routes,
so ``/docs`` and ``/openapi.json`` describe them; the metrics label them by the same
route path (``dispatch_http_request_duration_seconds``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError

from api import errors, ride_routes
from api.auth import Principal, Role
from api.edge import Edge
from api.rides import RideService
from api.routes import caller, check_role
from dispatch.errors import DispatchError

Handler = Callable[[RideService, Principal, str, Any, str | None], Awaitable[tuple[int, bytes]]]


async def _request(svc: RideService, principal: Principal, ride_id: str, body: Any, key: str | None):
    assert key is not None
    return await ride_routes.ride_request(svc, principal, body, key)


async def _accept(svc: RideService, principal: Principal, ride_id: str, body: Any, key: str | None):
    return 200, await ride_routes.offer_accept(svc, principal, ride_id, body)


async def _decline(svc: RideService, principal: Principal, ride_id: str, body: Any, key: str | None):
    await ride_routes.offer_decline(svc, principal, ride_id, body)
    return 204, b""


@dataclass(frozen=True, slots=True)
class HotRoute:
    path: str  # as FastAPI declares it: the metrics' label and the route in ``scope``
    model: type[BaseModel]
    roles: tuple[Role, ...]
    needs_key: bool
    handler: Handler


ROUTES: dict[str, HotRoute] = {
    "request": HotRoute("/v1/rides", ride_routes.RideRequestIn, ride_routes.RIDERS, True, _request),
    "accept": HotRoute(
        "/v1/rides/{ride_id}/accept", ride_routes.OfferAnswer, ride_routes.DRIVERS, False, _accept
    ),
    "decline": HotRoute(
        "/v1/rides/{ride_id}/decline", ride_routes.OfferAnswer, ride_routes.DRIVERS, False, _decline
    ),
}


def match(path: str) -> tuple[HotRoute, str] | None:
    """The hot route of a POST to ``path`` and its ride id, or None."""
    if path == "/v1/rides":
        return ROUTES["request"], ""
    if not path.startswith("/v1/rides/"):
        return None
    ride_id, slash, action = path[10:].partition("/")
    if not (ride_id and slash) or action not in ("accept", "decline"):
        return None
    return ROUTES[action], ride_id


def _json_content(content_type: bytes | None) -> bool:
    # FastAPI reads a body as JSON without a content type, or with application/json.
    return content_type is None or content_type.split(b";", 1)[0].strip().lower() == b"application/json"


class HotRoutes:
    """ASGI middleware: POSTs to the hot routes answered here, everything else passed on."""

    def __init__(self, app, edge: Edge, routes) -> None:
        self.app = app
        self.edge = edge
        declared = {r.path: r for r in routes if isinstance(r, APIRoute) and "POST" in (r.methods or ())}
        missing = [r.path for r in ROUTES.values() if r.path not in declared]
        if missing:
            raise RuntimeError(f"hot routes not declared by the router: {missing}")
        self.declared = declared

    async def __call__(self, scope, receive, send) -> None:
        hit = match(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if hit is None:
            await self.app(scope, receive, send)
            return
        route, ride_id = hit
        body = b""
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            body += message.get("body", b"")
            more = message.get("more_body", False)
        auth = content_type = key = None
        for name, value in scope["headers"]:
            if name == b"authorization" and auth is None:
                auth = value.decode("latin-1")
            elif name == b"content-type" and content_type is None:
                content_type = value
            elif name == b"idempotency-key" and key is None:
                key = value.decode("latin-1")
        parsed = None
        if _json_content(content_type) and (
            not route.needs_key or (key is not None and ride_routes.key_allowed(key))
        ):
            try:
                parsed = route.model.model_validate_json(body)
            except ValidationError:
                parsed = None
        if parsed is None:  # FastAPI answers it, with its validation errors
            replay = [{"type": "http.request", "body": body, "more_body": False}]

            async def replayed():
                return replay.pop() if replay else await receive()

            await self.app(scope, replayed, send)
            return
        scope["route"] = self.declared[route.path]  # the metrics' label
        try:
            principal = check_role(caller(self.edge, auth), route.roles)
            status, content = await route.handler(
                ride_routes.rides_of(self.edge), principal, ride_id, parsed, key
            )
        except DispatchError as exc:
            await errors.error_response(exc)(scope, receive, send)
            return
        except Exception as exc:
            await errors.unexpected_response("POST", scope["path"], exc)(scope, receive, send)
            return
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers if content else []})
        await send({"type": "http.response.body", "body": content})
