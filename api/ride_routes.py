"""REST for rides and money: quotes, ride requests, the trip steps, receipts, earnings.

Every route authenticates and checks the caller's role (``api/routes.py: require``),
validates its body once (the pydantic models below), builds the typed input of the
service of its job (:mod:`api.services`) and calls it.

``Idempotency-Key`` (1 to 200 printable ASCII characters): ``POST /v1/rides``, the
wallet top-up and the refund require one (422 ``validation_error`` without it); cancel
and the trip steps accept one. The same key with the same body answers the same
(without doing it twice); with another body, 422 ``idempotency_mismatch``; while the
first request with the key is still running, 409 ``conflict`` (retry shortly with the
same key). Concurrent identical requests may also meet the caller's REST rate limit:
429 ``rate_limited`` with ``Retry-After`` (docs/rest.md). Every money amount is a
strict JSON integer of cents: a string, a boolean or a float is 422.
Without a database configured these routes answer 503.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from pydantic import BaseModel, Field, StrictInt

from api.auth import Principal, Role
from api.edge import Edge
from api.fingerprints import fingerprint
from api.rides import RideService
from api.routes import ERRORS, authenticated, edge_of, require
from api.services.values import Point, QuoteInput, RideRequestInput
from api.services.views import check_access
from dispatch.errors import InvalidInput, Unavailable
from dispatch.trips import TripEvent

router = APIRouter()

# The key's limits, as storage.idempotency.check_key enforces them (printable ASCII here:
# an HTTP header carries nothing else reliably).
_KEY_DOC = (
    "a client-chosen key, 1 to 200 printable ASCII characters, that makes retries safe: the same key"
    " with the same body answers the same without doing it twice; another body under it is 422"
    " idempotency_mismatch; a retry while the first is still running is 409 conflict"
)
_KEY_MIN, _KEY_MAX, _KEY_PATTERN = 1, 200, r"^[\x20-\x7e]+$"
KEY_LIMITS = {"min_length": _KEY_MIN, "max_length": _KEY_MAX, "pattern": _KEY_PATTERN}


def key_allowed(key: str) -> bool:
    """Whether ``key`` is within :data:`KEY_LIMITS`, as the Header declarations check it."""
    return _KEY_MIN <= len(key) <= _KEY_MAX and re.fullmatch(_KEY_PATTERN, key) is not None


IdemKey = Annotated[str | None, Header(alias="Idempotency-Key", description=_KEY_DOC, **KEY_LIMITS)]
RequiredIdemKey = Annotated[
    str, Header(alias="Idempotency-Key", description=f"required; {_KEY_DOC}", **KEY_LIMITS)
]


def rides_of(edge: Edge) -> RideService:
    """The edge's ride service; Unavailable (503) without Postgres."""
    rides = edge.rides
    if rides is None:
        raise Unavailable("rides need Postgres; this edge has no DATABASE_URL or cannot reach it")
    return rides


def service(request: Request) -> RideService:
    return rides_of(edge_of(request))


async def idempotent(
    request: Request, principal: Principal, key: str | None, body: dict, fn
) -> tuple[int, Any]:
    """Run ``fn`` (returning ``(status, json)``) once per caller and key; no key: just run it."""
    if key is None:
        return await fn()
    scope = f"{principal.role.value}:{principal.sub}:{request.url.path}"
    return await service(request).idempotency.run(scope, key, fingerprint("POST", request.url.path, body), fn)


# -- schemas ------------------------------------------------------------------------------------


class LatLng(BaseModel):
    """A position: the one place a REST point is validated (finite, in range)."""

    lat: float = Field(ge=-90, le=90, allow_inf_nan=False, examples=[37.7793])
    lng: float = Field(ge=-180, le=180, allow_inf_nan=False, examples=[-122.4193])

    def point(self) -> Point:
        return Point(self.lat, self.lng)


class QuoteRequest(BaseModel):
    pickup: LatLng
    dropoff: LatLng
    vehicle_class: str = Field("standard", examples=["standard"])


class FareOut(BaseModel):
    total_cents: int
    currency: str
    lines: dict[str, int] = Field(
        description="base, distance, time, surge, minimum_fare_adjustment, booking_fee"
    )
    surge_multiplier: float
    distance_m: float
    duration_s: float
    basis: Literal["estimate", "quoted", "repriced", "metered"]


class QuoteOut(BaseModel):
    quote_id: str
    vehicle_class: str
    fare: FareOut
    expires_at: float = Field(description="epoch seconds")
    valid_for_s: float
    reprice_rules: dict[str, Any]


class RideRequestIn(BaseModel):
    pickup: LatLng
    dropoff: LatLng
    vehicle_class: str = Field("standard", examples=["standard"])
    quote_id: str | None = Field(None, description="charge this quote's price (see reprice_rules)")
    payment_method: Literal["wallet", "cash", "card"] = "wallet"


class RideEventOut(BaseModel):
    version: int
    event: str
    status: str
    applied: bool
    actor_role: str
    at: str


class RideOut(BaseModel):
    ride_id: str
    rider_id: str
    driver_id: str | None
    status: str
    version: int
    vehicle_class: str | None
    pickup_lat: float
    pickup_lng: float
    dropoff_lat: float
    dropoff_lng: float
    quote_id: str | None
    surge_multiplier: float
    fare_estimate_cents: int
    currency: str
    final_fare_cents: int | None
    distance_m: float | None
    duration_s: float | None
    payment_method: str
    cancel_by: str | None
    cancel_fee_cents: int | None
    requested_at: str
    accepted_at: str | None
    arrived_at: str | None
    started_at: str | None
    completed_at: str | None
    cancelled_at: str | None
    expired_at: str | None
    events: list[RideEventOut] | None = None
    outcome: dict[str, Any] | None = Field(None, description="fare, payment or fee of this step")


class OfferAnswer(BaseModel):
    offer_id: str = Field(min_length=1, max_length=200)


class CancelIn(BaseModel):
    reason: str | None = Field(None, max_length=200)


# Money is a strict JSON integer of cents everywhere: "100", true and 1.5 are 422, never
# coerced (a coerced true once credited a wallet 1 cent).
Cents = Annotated[StrictInt, Field(description="an amount in cents (a JSON integer)")]


class TopUpIn(BaseModel):
    amount_cents: Annotated[StrictInt, Field(gt=0, le=1_000_000, description="cents to credit")]


class RefundIn(BaseModel):
    amount_cents: Annotated[StrictInt, Field(gt=0, description="cents to give back")]
    reason: str = Field(min_length=1, max_length=200)
    bearer: Literal["proportional", "platform"] = "proportional"


class PaymentOut(BaseModel):
    payment_id: str
    ride_id: str | None
    rider_id: str
    kind: str = Field(description="charge, cancellation_fee, refund or top_up")
    amount_cents: Cents
    currency: str
    method: str
    provider: str
    provider_ref: str | None
    status: str = Field(description="succeeded or failed")
    failure_reason: str | None
    refund_of: str | None
    breakdown: dict[str, Any]
    created_at: str


class LedgerLineOut(BaseModel):
    txn_id: str
    payment_id: str
    posting: str
    account: str = Field(description="rider:<id>, driver:<id>, cash:<id>, platform:*, wallet:*, card:*")
    amount_cents: int = Field(
        description="debit positive, credit negative; one txn_id's lines sum to zero (dispatch/ledger.py)"
    )
    currency: str
    created_at: str


class ReceiptTotals(BaseModel):
    charged_cents: int
    cancellation_fee_cents: int
    refunded_cents: int
    net_cents: int = Field(description="what the rider paid in the end: charges + fees - refunds")


class ReceiptOut(BaseModel):
    ride_id: str
    rider_id: str
    driver_id: str | None
    status: str
    currency: str
    fare: dict[str, Any] | None = Field(description="the charged fare's lines, if charged")
    payments: list[PaymentOut]
    ledger: list[LedgerLineOut] = Field(description="the caller's own lines (admins: every line)")
    totals: ReceiptTotals
    distance_m: float | None
    duration_s: float | None
    surge_multiplier: float
    quote_id: str | None
    payment_method: str


class WalletOut(BaseModel):
    rider_id: str
    balance_cents: int
    currency: str


class TopUpOut(BaseModel):
    payment: PaymentOut
    balance_cents: int


class RefundOut(BaseModel):
    payment: PaymentOut


async def ride_out(svc, principal: Principal, ride_id: str, outcome: dict | None = None) -> dict[str, Any]:
    out = await svc.views.get(principal, ride_id)
    out["outcome"] = outcome or None
    return RideOut(**out).model_dump(mode="json")


def _ride_json(out: dict[str, Any]) -> bytes:
    """``out`` checked against RideOut and encoded: the route's ``response_model`` stays for
    the docs, but a returned Response skips FastAPI's second validation and encoding of the
    same dict (about 13 us of an answer on the busiest routes)."""
    return RideOut(**out).model_dump_json().encode()


def _json_response(content: bytes, status: int = 200) -> Response:
    return Response(content, status_code=status, media_type="application/json")


def _json(status: int, body: Any, response: Response) -> Any:
    response.status_code = status
    return body


# -- quotes and requests -----------------------------------------------------------------------


@router.post("/v1/quotes", response_model=QuoteOut, responses=ERRORS, tags=["rides"])
async def create_quote(
    body: QuoteRequest, request: Request, principal: Annotated[Principal, Depends(require(Role.RIDER))]
) -> dict:
    """An upfront fare for a trip: the price a ride requested with this ``quote_id`` pays,
    unless the trip deviates beyond ``reprice_rules``. Includes the surge at the pickup."""
    svc = service(request)
    q = QuoteInput(principal.sub, body.pickup.point(), body.dropoff.point(), body.vehicle_class)
    async with svc.requests.admitted():
        return await svc.quotes.quote(q)


# The busiest routes (a ride request, a driver's answer to an offer) are also served by
# ``api.hot_routes`` without FastAPI's stack; both call the functions below, which hold
# what the routes do. FastAPI's declarations stay the routes' schema, docs, and the path
# of any request the hot path does not take (bad input among them).
RIDERS = (Role.RIDER,)
DRIVERS = (Role.DRIVER,)


async def ride_request(
    svc: RideService, principal: Principal, body: RideRequestIn, idempotency_key: str
) -> tuple[int, bytes]:
    """``POST /v1/rides``: ``(status, JSON body)``."""
    req = RideRequestInput(
        rider_id=principal.sub,
        pickup=body.pickup.point(),
        dropoff=body.dropoff.point(),
        vehicle_class=body.vehicle_class,
        quote_id=body.quote_id,
        payment_method=body.payment_method,
        idempotency_key=idempotency_key,
        fingerprint=fingerprint("POST", "/v1/rides", body.model_dump(mode="json")),
    )
    async with svc.requests.admitted():
        ride, created = await svc.requests.request_ride(req)
    if not created:  # a retry: the ride as it is now
        out = await svc.views.get(principal, ride.ride_id)
        out["outcome"] = None
        return 200, _ride_json(out)
    # Just stored: answer from what we hold (two fewer queries on the busiest POST).
    views = svc.views
    return 201, _ride_json(views.view(ride, views.created_events(ride)))


async def offer_accept(svc: RideService, principal: Principal, ride_id: str, body: OfferAnswer) -> bytes:
    """``POST /v1/rides/{ride_id}/accept``: the JSON body of the 200."""
    history: list[dict[str, Any]] = []
    ride = await svc.accept(principal, ride_id, body.offer_id, history)
    # The ride and its history as the accept's own statement left them.
    check_access(principal, ride)
    out = svc.views.view(ride, history)
    out["outcome"] = None
    return _ride_json(out)


async def offer_decline(svc: RideService, principal: Principal, ride_id: str, body: OfferAnswer) -> None:
    """``POST /v1/rides/{ride_id}/decline`` (answered 204)."""
    await svc.decline(principal, ride_id, body.offer_id)


@router.post("/v1/rides", response_model=RideOut, status_code=201, responses=ERRORS, tags=["rides"])
async def request_ride(
    body: RideRequestIn,
    request: Request,
    principal: Annotated[Principal, Depends(require(*RIDERS))],
    idempotency_key: RequiredIdemKey,
) -> Any:
    """Request a ride. Stored before the answer, then matched by the pickup's shard; the
    rider's socket gets ``ride_status`` events. 201 when created, 200 for a retry."""
    status, content = await ride_request(service(request), principal, body, idempotency_key)
    return _json_response(content, status)


@router.get("/v1/rides", response_model=list[RideOut], responses=ERRORS, tags=["rides"])
async def my_rides(
    request: Request,
    principal: Annotated[Principal, Depends(require(Role.RIDER))],
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> list[dict]:
    """The calling rider's latest rides, newest first."""
    rides = await service(request).views.list_mine(principal, limit)
    return [RideOut(**r).model_dump(mode="json") for r in rides]


@router.get("/v1/rides/{ride_id}", response_model=RideOut, responses=ERRORS, tags=["rides"])
async def get_ride(
    ride_id: str, request: Request, principal: Annotated[Principal, Depends(authenticated)]
) -> dict:
    """A ride and its history: for its rider, its driver or an admin (404 for anyone else)."""
    return await ride_out(service(request), principal, ride_id)


@router.post("/v1/rides/{ride_id}/cancel", response_model=RideOut, responses=ERRORS, tags=["rides"])
async def cancel_ride(
    ride_id: str,
    request: Request,
    response: Response,
    principal: Annotated[Principal, Depends(require(Role.RIDER, Role.DRIVER, Role.ADMIN))],
    body: CancelIn | None = None,
    idempotency_key: IdemKey = None,
) -> Any:
    """Cancel: the rider (a fee after the free window or once the driver arrived), the
    driver of an accepted ride (free for the rider), or support (an admin)."""
    svc = service(request)
    reason = body.reason if body else None

    async def run():
        ride, extra = await svc.cancel(principal, ride_id, reason)
        return 200, await ride_out(svc, principal, ride.ride_id, extra)

    return _json(*await idempotent(request, principal, idempotency_key, {"reason": reason}, run), response)


# -- the driver's steps -------------------------------------------------------------------------


@router.post("/v1/rides/{ride_id}/accept", response_model=RideOut, responses=ERRORS, tags=["trip"])
async def accept_offer(
    ride_id: str,
    body: OfferAnswer,
    request: Request,
    principal: Annotated[Principal, Depends(require(*DRIVERS))],
) -> Any:
    """Accept an offer (the socket's ``accept``). One accept of an offer wins; the others,
    late ones and accepts of an offer made to another driver get 409 ``offer_unavailable``."""
    return _json_response(await offer_accept(service(request), principal, ride_id, body))


@router.post("/v1/rides/{ride_id}/decline", status_code=204, responses=ERRORS, tags=["trip"])
async def decline_offer(
    ride_id: str,
    body: OfferAnswer,
    request: Request,
    principal: Annotated[Principal, Depends(require(*DRIVERS))],
) -> Response:
    """Decline an offer: the ride goes back to matching without this driver."""
    await offer_decline(service(request), principal, ride_id, body)
    return Response(status_code=204)


async def _step(
    request: Request,
    response: Response,
    principal: Principal,
    ride_id: str,
    event: TripEvent,
    key: str | None,
) -> Any:
    svc = service(request)

    async def run():
        ride, extra = await svc.advance(principal, ride_id, event)
        return 200, await ride_out(svc, principal, ride.ride_id, extra)

    return _json(*await idempotent(request, principal, key, {"event": event.value}, run), response)


def _step_route(path: str, event: TripEvent, summary: str, doc: str) -> None:
    async def step(
        ride_id: str,
        request: Request,
        response: Response,
        principal: Annotated[Principal, Depends(require(Role.DRIVER))],
        idempotency_key: IdemKey = None,
    ) -> Any:
        return await _step(request, response, principal, ride_id, event, idempotency_key)

    step.__doc__ = doc
    router.post(
        f"/v1/rides/{{ride_id}}/{path}",
        response_model=RideOut,
        responses=ERRORS,
        tags=["trip"],
        name=f"trip_{path}",
        summary=summary,
    )(step)


for _path, _event, _summary, _doc in (
    ("arrived", TripEvent.ARRIVE, "Arrived", "The driver is at the pickup."),
    ("start", TripEvent.START, "Start trip", "The rider is on board: the trip is metered from here."),
    (
        "complete",
        TripEvent.COMPLETE,
        "Complete trip",
        "Drop-off: the final fare (quote honoured, or metered) is charged; ``outcome`` has it.",
    ),
):
    _step_route(_path, _event, _summary, _doc)


# -- money -----------------------------------------------------------------------------------


@router.get("/v1/rides/{ride_id}/receipt", response_model=ReceiptOut, responses=ERRORS, tags=["payments"])
async def receipt(
    ride_id: str, request: Request, principal: Annotated[Principal, Depends(authenticated)]
) -> dict:
    """The ride's fare lines, payments, refunds and totals. Riders and drivers see their own
    ledger lines; admins every line of the ride's postings."""
    return await service(request).views.receipt(principal, ride_id)


def _when(value: str | None, default: datetime) -> datetime:
    if value is None:
        return default
    try:
        dt = datetime.fromisoformat(value)
    except ValueError:
        try:
            dt = datetime.fromtimestamp(float(value), UTC)
        except (ValueError, OverflowError, OSError):
            raise InvalidInput(f"{value!r} is neither an ISO 8601 time nor epoch seconds") from None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


@router.get("/v1/drivers/me/earnings", responses=ERRORS, tags=["payments"])
async def my_earnings(
    request: Request,
    principal: Annotated[Principal, Depends(require(Role.DRIVER))],
    from_: Annotated[
        str | None, Query(alias="from", description="ISO 8601 or epoch s; default 7 days ago")
    ] = None,
    to: Annotated[str | None, Query(description="ISO 8601 or epoch s; default now")] = None,
) -> dict:
    """The calling driver's earnings, cash collected and net payout over ``[from, to)``."""
    now = datetime.now(UTC)
    end = _when(to, now)
    start = _when(from_, datetime.fromtimestamp(end.timestamp() - 7 * 86400, UTC))
    if start >= end:
        raise InvalidInput("'from' must be before 'to'")
    assert principal.driver_id is not None
    out = await service(request).payments.earnings(principal.driver_id, start, end)
    out["driver_id"] = principal.sub
    return out


@router.get("/v1/riders/me/wallet", response_model=WalletOut, responses=ERRORS, tags=["payments"])
async def my_wallet(request: Request, principal: Annotated[Principal, Depends(require(Role.RIDER))]) -> dict:
    """The calling rider's wallet balance."""
    svc = service(request)
    return {
        "rider_id": principal.sub,
        "balance_cents": await svc.payments.wallet_balance(principal.sub),
        "currency": edge_of(request).region.currency,
    }


@router.post(
    "/v1/admin/riders/{rider_id}/wallet/top-up", response_model=TopUpOut, responses=ERRORS, tags=["admin"]
)
async def top_up(
    rider_id: str,
    body: TopUpIn,
    request: Request,
    principal: Annotated[Principal, Depends(require(Role.ADMIN))],
    idempotency_key: RequiredIdemKey,
) -> dict:
    """Credit a rider's wallet (support and testing; riders fund wallets through a card
    processor in a real deployment). Requires an Idempotency-Key."""
    svc = service(request)
    p = await svc.payments.top_up_wallet(
        rider_id,
        body.amount_cents,
        currency=edge_of(request).region.currency,
        idempotency_key=idempotency_key,
    )
    return {"payment": p.to_json(), "balance_cents": await svc.payments.wallet_balance(rider_id)}


@router.post(
    "/v1/admin/payments/{payment_id}/refund", response_model=RefundOut, responses=ERRORS, tags=["admin"]
)
async def refund(
    payment_id: str,
    body: RefundIn,
    request: Request,
    principal: Annotated[Principal, Depends(require(Role.ADMIN))],
    idempotency_key: RequiredIdemKey,
) -> dict:
    """Refund part or all of a charge or fee into the rider's wallet. Requires an
    Idempotency-Key; ``bearer``: who gives the money back (driver and platform in
    proportion, or the platform alone)."""
    p = await service(request).payments.refund(
        payment_id, body.amount_cents, body.reason, idempotency_key, bearer=body.bearer
    )
    return {"payment": p.to_json()}
