"""The REST boundary without a server: money types, and database outages as 503."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from pydantic import ValidationError

from api.errors import error_response
from api.ride_routes import RefundIn, TopUpIn
from dispatch.errors import Unavailable
from storage.db import connection, unavailable


@pytest.mark.parametrize("amount", ["100", True, 1.5, 100.0, None])
def test_every_money_amount_is_a_strict_integer(amount):
    with pytest.raises(ValidationError):
        TopUpIn(amount_cents=amount)
    with pytest.raises(ValidationError):
        RefundIn(amount_cents=amount, reason="r")


def test_an_integer_amount_is_taken():
    assert TopUpIn(amount_cents=100).amount_cents == 100
    assert TopUpIn.model_validate_json('{"amount_cents": 100}').amount_cents == 100
    with pytest.raises(ValidationError):
        TopUpIn.model_validate_json('{"amount_cents": "100"}')


DOWN = [
    asyncpg.InternalClientError("cannot perform operation: another operation is in progress"),
    asyncpg.InterfaceError("pool is closed"),
    asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    asyncpg.CannotConnectNowError("the database system is starting up"),
    ConnectionRefusedError(111, "Connection refused"),
    ConnectionResetError(104, "Connection reset by peer"),
    TimeoutError(),
]


@pytest.mark.parametrize("exc", DOWN, ids=lambda e: type(e).__name__)
def test_every_database_unavailable_error_is_a_503_with_retry_after(exc):
    mapped = unavailable(exc)
    assert isinstance(mapped, Unavailable)
    response = error_response(mapped)
    assert response.status_code == 503 and int(response.headers["Retry-After"]) >= 1

    class Pool:  # a pool whose every use fails as the database does during an outage
        def acquire(self):
            raise exc

    async def use():
        async with connection(Pool()):
            pass

    with pytest.raises(Unavailable):
        asyncio.run(use())


def test_a_bad_query_is_not_an_outage():
    assert unavailable(asyncpg.UndefinedColumnError("no such column")) is None
    assert unavailable(ValueError("x")) is None


def test_a_503_without_a_hint_still_says_when_to_retry():
    assert error_response(Unavailable("shard down")).headers["Retry-After"] == "1"
