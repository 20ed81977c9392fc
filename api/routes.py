"""REST under ``/v1``, plus ``/healthz``, ``/readyz`` and ``/metrics``.

Every ``/v1`` route authenticates with a bearer token and checks the caller's role;
errors have the one shape of ``api/errors.py``. Schemas are pydantic models, so the
OpenAPI document at ``/docs`` describes every route.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from api.auth import Principal, Role, Unauthorized, bearer
from api.edge import Edge
from api.errors import RateLimited
from dispatch.drivers import format_driver_id
from dispatch.errors import Forbidden, InvalidInput, InvalidLocation, NotFound
from dispatch.geo import eta_s
from dispatch.rides import MatchingConfig
from dispatch.shardmap import OUTSIDE

router = APIRouter()


def edge_of(request: Request) -> Edge:
    return request.app.state.edge


def caller(edge: Edge, authorization: str | None) -> Principal:
    """The caller of a REST request from its ``Authorization`` header, counted against its
    rate limit: Unauthorized (401) or RateLimited (429) otherwise. Every REST route
    authenticates here, through FastAPI's dependency or ``api.hot_routes``."""
    try:
        principal = edge.auth.verify(bearer(authorization))
    except Unauthorized:
        edge.counters.auth_failures["rest"] += 1
        raise
    bucket = edge.rest_allowed(principal)
    if bucket is not None:
        raise RateLimited(
            f"more than {edge.settings.rest_rate_per_s:g} requests a second; retry later", bucket.wait_s()
        )
    return principal


def check_role(principal: Principal, roles: tuple[Role, ...]) -> Principal:
    """``principal`` if its role is one of ``roles``, else Forbidden (403)."""
    if principal.role not in roles:
        raise Forbidden(f"a {principal.role.value} may not call this", role=principal.role.value)
    return principal


# The dependencies are ``async def`` on purpose: FastAPI runs a plain ``def`` dependency in
# its thread pool, and two thread hops per request cost more than the JWT check itself.
async def authenticated(request: Request, authorization: Annotated[str | None, Header()] = None) -> Principal:
    return caller(edge_of(request), authorization)


def require(*roles: Role):
    async def check(principal: Annotated[Principal, Depends(authenticated)]) -> Principal:
        return check_role(principal, roles)

    return check


# -- schemas ------------------------------------------------------------------------------------


class ErrorBody(BaseModel):
    code: str
    message: str
    detail: dict = {}


class ErrorResponse(BaseModel):
    error: ErrorBody


ERRORS: dict[int | str, dict[str, Any]] = {
    s: {"model": ErrorResponse} for s in (401, 403, 404, 409, 422, 429, 503)
}


class TokenRequest(BaseModel):
    sub: str = Field(min_length=1, max_length=128, examples=["drv-42"])
    role: Role
    ttl_s: int = Field(3600, ge=1, le=30 * 24 * 3600)


class TokenResponse(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int
    role: Role
    sub: str


class NearbyDriverOut(BaseModel):
    driver_id: str
    distance_m: float
    eta_s: float
    lat: float
    lng: float
    heading: float | None
    vehicle_class: str
    shard_id: int


class NearbyResponse(BaseModel):
    count: int = Field(description="available drivers within the radius (up to limit)")
    nearest_eta_s: float | None = Field(description="pickup ETA of the nearest, None if none")
    radius_m: float
    vehicle_class: str | None
    drivers: list[NearbyDriverOut] | None = Field(None, description="admins only: who and where")


class DriverState(BaseModel):
    driver_id: str
    online: bool
    status: str | None
    lat: float | None = None
    lng: float | None = None
    ts: float | None = None
    vehicle_class: str | None = None
    shard_id: int | None = None


# -- auth -----------------------------------------------------------------------------------------


@router.post("/v1/auth/token", response_model=TokenResponse, responses=ERRORS, tags=["auth"])
async def issue_token(
    body: TokenRequest, request: Request, x_operator_key: Annotated[str | None, Header()] = None
) -> TokenResponse:
    """Mint a token for a subject and role. Guarded by the operator key (``X-Operator-Key``);
    without DISPATCH_OPERATOR_KEY set, nobody can mint tokens here."""
    edge = edge_of(request)
    key = edge.settings.operator_key
    if key is None or not x_operator_key or not hmac.compare_digest(x_operator_key, key.get_secret_value()):
        edge.counters.auth_failures["rest"] += 1
        raise Unauthorized("a valid X-Operator-Key is required")
    token = edge.auth.issue(body.sub, body.role, body.ttl_s)
    return TokenResponse(access_token=token, expires_in=body.ttl_s, role=body.role, sub=body.sub)


# -- drivers --------------------------------------------------------------------------------------


@router.get(
    "/v1/drivers/nearby",
    response_model=NearbyResponse,
    response_model_exclude_none=False,
    responses=ERRORS,
    tags=["drivers"],
)
async def nearby(
    request: Request,
    principal: Annotated[Principal, Depends(require(Role.RIDER, Role.ADMIN))],
    lat: Annotated[float, Query(ge=-90, le=90)],
    lng: Annotated[float, Query(ge=-180, le=180)],
    radius_m: Annotated[float, Query(gt=0)] = 1500.0,
    limit: Annotated[int, Query(ge=1)] = 10,
    vehicle_class: str | None = None,
) -> NearbyResponse:
    """Available drivers near a point. A rider sees how many and the nearest pickup ETA,
    never who or where they are; an admin sees the drivers too."""
    edge = edge_of(request)
    s = edge.settings
    if not (math.isfinite(lat) and math.isfinite(lng)):
        raise InvalidLocation("lat and lng must be finite")
    if radius_m > s.nearby_max_radius_m:
        raise InvalidInput(f"radius_m is at most {s.nearby_max_radius_m:g}", radius_m=radius_m)
    if limit > s.nearby_max_limit:
        raise InvalidInput(f"limit is at most {s.nearby_max_limit}", limit=limit)
    classes = edge.region.drivers.vehicle_classes
    vclass = None
    if vehicle_class is not None:
        if vehicle_class not in classes:
            raise InvalidInput(f"vehicle_class must be one of {list(classes)}")
        vclass = classes.index(vehicle_class)
    shard = edge.map.shard_for_point(lat, lng)
    if shard == OUTSIDE:
        raise InvalidLocation(f"({lat}, {lng}) is outside {edge.region.display_name}'s service area")
    found = await edge.shard_client.nearby(shard, lat, lng, radius_m, limit, vclass)
    speed = MatchingConfig.from_section(edge.region.section("matching")).pickup_speed_mps
    etas = [round(float(eta_s(f["distance_m"], speed)), 1) for f in found]
    out = NearbyResponse(
        count=len(found),
        nearest_eta_s=etas[0] if etas else None,
        radius_m=radius_m,
        vehicle_class=vehicle_class,
    )
    if principal.is_admin:
        out.drivers = [
            NearbyDriverOut(
                driver_id=f"drv-{f['driver_id']}",
                distance_m=round(f["distance_m"], 1),
                eta_s=e,
                lat=f["lat"],
                lng=f["lng"],
                heading=None if math.isnan(f["heading"]) else f["heading"],
                vehicle_class=classes[f["vclass"]] if 0 <= f["vclass"] < len(classes) else "unknown",
                shard_id=f["shard_id"],
            )
            for f, e in zip(found, etas, strict=True)
        ]
    return out


async def driver_state(edge: Edge, driver_id: int) -> DriverState:
    """Where a driver is held (any shard), asked of every shard at once."""
    public = f"drv-{driver_id}"
    held = await edge.find_driver(driver_id)
    if held is None:
        return DriverState(driver_id=public, online=False, status=None)
    k, r = held
    classes = edge.region.drivers.vehicle_classes
    vc = r.get("vclass", -1)
    status = str(r.get("status"))
    return DriverState(
        driver_id=public,
        online=status != "offline",
        status=status,
        lat=r.get("lat"),
        lng=r.get("lng"),
        ts=r.get("ts"),
        vehicle_class=classes[vc] if isinstance(vc, int) and 0 <= vc < len(classes) else None,
        shard_id=k,
    )


@router.get("/v1/drivers/me", response_model=DriverState, responses=ERRORS, tags=["drivers"])
async def driver_me(
    request: Request, principal: Annotated[Principal, Depends(require(Role.DRIVER))]
) -> DriverState:
    """The calling driver's state as the shards hold it (status, last position)."""
    assert principal.driver_id is not None
    return await driver_state(edge_of(request), principal.driver_id)


@router.get("/v1/admin/drivers/{driver_id}", response_model=DriverState, responses=ERRORS, tags=["admin"])
async def admin_driver(
    driver_id: str, request: Request, principal: Annotated[Principal, Depends(require(Role.ADMIN))]
) -> DriverState:
    from dispatch.drivers import parse_driver_id

    try:
        did = parse_driver_id(driver_id)
    except (InvalidInput, ValueError):
        raise NotFound(f"no driver {driver_id!r}") from None
    return await driver_state(edge_of(request), did)


@router.get("/v1/admin/shards", responses=ERRORS, tags=["admin"])
async def admin_shards(
    request: Request, principal: Annotated[Principal, Depends(require(Role.ADMIN))]
) -> dict:
    """Every shard's status: drivers by status, rides, update rates, drops, uptime."""
    edge = edge_of(request)
    results = await edge.shard_client.all_stats()
    shards = []
    for k, r in enumerate(results):
        if isinstance(r, BaseException):
            shards.append({"shard_id": k, "up": False, "error": getattr(r, "message", repr(r))})
        else:
            shards.append({"shard_id": k, "up": True, **r})
    return {
        "region": edge.region.name,
        "shards": shards,
        "edge": edge.settings.edge_id,
        "router": edge.router.stats(),
    }


class ShardLiveOut(BaseModel):
    shard_id: int
    up: bool
    error: str | None = None
    requests: list[str] = Field(default_factory=list, description="ride ids waiting for a driver or offered")
    trips: list[str] = Field(default_factory=list, description="ride ids of the trips of drivers held here")
    available: list[str] = Field(default_factory=list, description="drivers that may be offered a ride now")
    offered: list[str] = Field(default_factory=list, description="drivers holding this shard's open offers")


class ShardsLiveResponse(BaseModel):
    region: str
    edge: str
    shards: list[ShardLiveOut]


@router.get("/v1/admin/shards/live", response_model=ShardsLiveResponse, responses=ERRORS, tags=["admin"])
async def admin_shards_live(
    request: Request, principal: Annotated[Principal, Depends(require(Role.ADMIN))]
) -> ShardsLiveResponse:
    """What every shard holds live, by id (each shard asked at once, so two shards' answers
    are moments apart): its open ride requests, the trips of the drivers it holds, its
    available drivers and the drivers holding its open offers. Every open ride should be
    live in exactly one shard, and no driver available in two."""
    edge = edge_of(request)
    client = edge.shard_client
    results = await asyncio.gather(
        *(client.live_ids(k) for k in range(client.shard_count)), return_exceptions=True
    )
    shards = []
    for k, r in enumerate(results):
        if isinstance(r, BaseException):
            shards.append(ShardLiveOut(shard_id=k, up=False, error=getattr(r, "message", repr(r))))
        else:
            shards.append(
                ShardLiveOut(
                    shard_id=k,
                    up=True,
                    requests=list(r.requests),
                    trips=list(r.trips),
                    available=[format_driver_id(d) for d in r.available],
                    offered=[format_driver_id(d) for d in r.offered],
                )
            )
    return ShardsLiveResponse(region=edge.region.name, edge=edge.settings.edge_id, shards=shards)


# -- surge ----------------------------------------------------------------------------------------


class SurgeZoneOut(BaseModel):
    zone: str
    multiplier: float
    demand: int
    supply: float
    updated_at: float


class SurgeResponse(BaseModel):
    multiplier: float | None = Field(None, description="at the point, when lat and lng are given")
    zone: str | None = None
    zones: list[SurgeZoneOut] = Field(default_factory=list, description="zones above 1.0 (area query)")


@router.get("/v1/surge", response_model=SurgeResponse, responses=ERRORS, tags=["pricing"])
async def surge(
    request: Request,
    principal: Annotated[Principal, Depends(authenticated)],
    lat: Annotated[float | None, Query(ge=-90, le=90)] = None,
    lng: Annotated[float | None, Query(ge=-180, le=180)] = None,
) -> SurgeResponse:
    """The surge multiplier at a point (``lat``, ``lng``), or every surging zone of the region."""
    edge = edge_of(request)
    if (lat is None) != (lng is None):
        raise InvalidInput("give both lat and lng, or neither (the whole region)")
    if lat is not None and lng is not None:
        zone = edge.surge.zone_of(lat, lng)
        z = await edge.surge.zone(zone)
        return SurgeResponse(multiplier=1.0 if z is None else z.multiplier, zone=zone)
    zones = await edge.surge.zones()
    return SurgeResponse(
        zones=[
            SurgeZoneOut(
                zone=k, multiplier=z.multiplier, demand=z.demand, supply=z.supply, updated_at=z.updated_at
            )
            for k, z in sorted(zones.items())
            if z.multiplier > 1.0
        ]
    )


# -- health, readiness, metrics ------------------------------------------------------------------


@router.get("/healthz", tags=["ops"])
async def healthz() -> dict:
    """Liveness: the process serves requests. Open to probes; says nothing else."""
    return {"status": "ok"}


@router.get("/readyz", tags=["ops"])
async def readyz(request: Request, response: Response) -> dict:
    """Readiness: what this edge can do now. Each dependency is checked with a short
    timeout and reported in ``checks`` (up or down) and ``dependencies`` (``ok``,
    ``needed``, how long the check took): every shard answers a ping; Redis answers a PING
    within 0.5 s (a paused Redis keeps its sockets open, so being subscribed is not
    enough); Postgres answers ``SELECT 1`` when configured. 503 when a needed one is down.

    Open to probes (load balancers cannot carry tokens); it reveals only up/down.
    """
    edge = edge_of(request)
    checks: dict[str, bool] = {}
    if edge.shards is None or edge.stopping:
        response.status_code = 503
        return {"status": "not_ready", "checks": {"started": False}}

    async def timed(check) -> tuple[bool, float]:
        t0 = time.perf_counter()
        ok = await check
        return ok, round((time.perf_counter() - t0) * 1000, 1)

    async def shards_up() -> list[bool]:
        shards = edge.shard_client
        return list(await asyncio.gather(*(shards.ping(k) for k in range(edge.region.shard_count))))

    async def redis_up() -> bool:
        return edge.relay is not None and await edge.relay.ping(0.5)

    async def postgres_up() -> bool:
        return await _postgres_up(edge) if edge.settings.database_url else False

    t0 = time.perf_counter()
    pings, (redis_ok, redis_ms), (pg_ok, pg_ms) = await asyncio.gather(
        shards_up(), timed(redis_up()), timed(postgres_up())
    )
    shards_ms = round((time.perf_counter() - t0) * 1000, 1)
    checks["shards"] = all(pings)
    checks["redis"] = redis_ok
    needed = {"shards": True, "redis": True, "postgres": bool(edge.settings.database_url)}
    if needed["postgres"]:
        checks["postgres"] = pg_ok
    deps = {
        "shards": {
            "ok": checks["shards"],
            "needed": True,
            "up": sum(pings),
            "of": len(pings),
            "ms": shards_ms,
        },
        "redis": {"ok": redis_ok, "needed": True, "ms": redis_ms},
        "postgres": {"ok": pg_ok, "needed": needed["postgres"], "ms": pg_ms},
    }
    ready = all(checks.values())
    if not ready:
        response.status_code = 503
    return {
        "status": "ready" if ready else "not_ready",
        "checks": checks,
        "dependencies": deps,
        "shards_up": sum(pings),
        "shards": len(pings),
    }


async def _postgres_up(edge: Edge) -> bool:
    if edge.pool is None:
        return False
    try:
        async with asyncio.timeout(1.0), edge.pool.acquire() as conn:
            return await conn.fetchval("SELECT 1") == 1
    except Exception:
        return False


@router.get("/metrics", tags=["ops"])
async def metrics(request: Request, authorization: Annotated[str | None, Header()] = None) -> Response:
    """Prometheus text format. Needs the metrics token (DISPATCH_METRICS_TOKEN) or an admin JWT."""
    edge = edge_of(request)
    token = bearer(authorization)
    mt = edge.settings.metrics_token
    if not (mt is not None and token and hmac.compare_digest(token, mt.get_secret_value())):
        principal = edge.auth.verify(token)
        if not principal.is_admin:
            raise Forbidden("metrics need the metrics token or an admin token")
    return Response(generate_latest(edge.registry), media_type=CONTENT_TYPE_LATEST)
