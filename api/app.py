"""The edge as an ASGI app: ``create_app(settings)``, served by uvicorn (``dispatch edge``).

The lifespan joins the Ray cluster, finds the shards, starts the location router and
the event relay; on shutdown it flushes buffered updates and closes sockets with 1001.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI

from api import errors, ride_routes, routes, sockets
from api.body_limit import BodyLimit
from api.edge import Edge
from api.hot_routes import HotRoutes
from api.settings import Settings, load_settings

log = logging.getLogger("dispatch.edge")

DESCRIPTION = """\
The edge of the dispatch engine: REST under `/v1` and three WebSocket endpoints
(`/v1/ws/driver`, `/v1/ws/gateway`, `/v1/ws/rider`, described in docs/protocol.md).
Every `/v1` route needs `Authorization: Bearer <JWT>` with a role: rider, driver,
gateway or admin. Errors have one shape: `{"error": {"code", "message", "detail"}}`.
"""


class RestTiming:
    """Times every REST request into ``dispatch_http_request_duration_seconds``.

    A plain ASGI middleware: Starlette's ``@app.middleware("http")`` wraps each request in
    extra tasks and streams, measured at about a quarter of the edge's CPU per ride POST.
    """

    def __init__(self, app, edge: Edge) -> None:
        self.app = app
        self.edge = edge

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500

        async def send_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = getattr(scope.get("route"), "path", "unmatched")
            self.edge.rest_latency.labels(path, scope["method"], str(status)).observe(
                time.perf_counter() - t0
            )


class SocketRoutes:
    """The WebSocket endpoints straight from the server, not through the REST stack.

    Opening a socket through FastAPI walks about twenty middleware and routing frames
    (error pages, telemetry, body limits, exit stacks, route matching), none of which a
    socket uses: its handler accepts, authenticates, answers and closes it itself. That
    was four tenths of an edge's CPU per socket when 3,000 drivers reconnected to it at
    once after another edge died (py-spy), and the storm's length is that CPU. The
    handlers are the ones ``routes`` declares (FastAPI's ``@router.websocket``, so they
    stay in one place); anything else passes on to ``app``.
    """

    def __init__(self, app, routes, owner) -> None:
        from fastapi.routing import APIWebSocketRoute

        self.app = app
        self.owner = owner  # what handlers reach as ``ws.app`` (its ``state.edge``)
        self.handlers = {r.path: r.endpoint for r in routes if isinstance(r, APIWebSocketRoute)}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "websocket":
            handler = self.handlers.get(scope["path"])
            if handler is not None:
                from starlette.websockets import WebSocket

                scope["app"] = self.owner
                await handler(WebSocket(scope, receive, send))
                return
        await self.app(scope, receive, send)


DOCS_ASSETS = "/docs/assets"


def install_docs(app: FastAPI) -> None:
    """``/docs`` (Swagger UI) and ``/redoc`` with their scripts and styles served by the
    edge from the ``fastapi-offline`` package, not from a CDN: the pages work offline."""
    from importlib.resources import files

    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
    from fastapi.staticfiles import StaticFiles

    static = files("fastapi_offline") / "static"
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(static)), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui():
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=app.swagger_ui_oauth2_redirect_url,
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png",
        )

    @app.get(app.swagger_ui_oauth2_redirect_url or "/docs/oauth2-redirect", include_in_schema=False)
    async def swagger_ui_redirect():
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc():
        return get_redoc_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{DOCS_ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{DOCS_ASSETS}/favicon.png",
            with_google_fonts=False,
        )


def create_app(settings: Settings | None = None, edge: Edge | None = None) -> FastAPI:
    """The app; ``settings`` default to the environment's (built now, not at import)."""
    settings = settings or load_settings()
    edge = edge or Edge(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await edge.start()
        try:
            yield
        finally:
            await edge.stop()

    app = FastAPI(
        title="dispatch edge",
        version="1",
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    install_docs(app)
    app.state.edge = edge
    errors.install(app)
    app.include_router(routes.router)
    app.include_router(ride_routes.router)
    app.include_router(sockets.router)

    # Innermost first: the hot routes get bodies BodyLimit let through, timed by RestTiming.
    app.add_middleware(HotRoutes, edge=edge, routes=ride_routes.router.routes)
    app.add_middleware(BodyLimit, default_bytes=settings.http_max_body_bytes)
    app.add_middleware(RestTiming, edge=edge)
    app.add_middleware(SocketRoutes, routes=sockets.router.routes, owner=app)  # outermost
    return app


class EdgeServer(uvicorn.Server):
    """uvicorn, with the edge closing its sockets itself (1001, after flushing) before
    uvicorn's own shutdown would close them with 1012."""

    def __init__(self, config: uvicorn.Config, edge: Edge) -> None:
        super().__init__(config)
        self.edge = edge

    async def shutdown(self, sockets=None) -> None:
        for server in self.servers:
            server.close()  # no new connections while we close the old ones
        try:
            await self.edge.quiesce()
        except Exception:
            log.exception("closing sockets on shutdown failed")
        await super().shutdown(sockets)


def ws_protocol(name: str):
    """What uvicorn's ``ws`` option gets for the ``ws_impl`` setting: our protocol class
    for ``direct``, else the name of one of uvicorn's own."""
    if name == "direct":
        try:
            from api.ws_server import DirectWebSocketProtocol
        except ImportError as exc:  # a uvicorn or websockets other than the pinned ones
            log.warning("direct WebSocket protocol unavailable (%r); using websockets-sansio", exc)
            return "websockets-sansio"
        return DirectWebSocketProtocol
    return name


def serve(settings: Settings, host: str, port: int, log_level: str = "warning") -> None:
    """Run one edge process until SIGINT/SIGTERM (``dispatch edge``)."""
    edge = Edge(settings)
    config = uvicorn.Config(
        create_app(settings, edge),
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,  # tokens may ride in socket URLs; requests are counted in /metrics
        ws=ws_protocol(settings.ws_impl),
        ws_max_size=settings.gateway_max_frame_bytes,
        ws_ping_interval=20.0,
        ws_ping_timeout=20.0,
        timeout_graceful_shutdown=15,
    )
    EdgeServer(config, edge).run()


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory api.app:app_from_env``."""
    return create_app()
