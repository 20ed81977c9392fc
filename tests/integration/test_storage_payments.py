"""PaymentStore against real Postgres: charges, fees, refunds and top-ups post balanced
ledger rows once, whatever the retries; failures leave no ledger rows; wallets never go
negative and always mirror their ledger account; receipts and earnings add up."""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from dispatch.errors import Conflict, IdempotencyMismatch, InvalidInput
from dispatch.ledger import split_fare
from dispatch.pricing import FareRules, quote_fare
from storage.payments import PaymentStore, ProviderResult
from storage.rides import RideStore

pytestmark = pytest.mark.integration

RULES = FareRules()
FARE = quote_fare(RULES, 5200.0, 780.0, surge=1.3)  # a few dollars above the minimum


class ExplodingProvider:
    name = "exploding"
    methods = ("wallet",)

    async def charge(self, ride_id, rider_id, amount_cents, currency, method, *, conn):
        # Writes first, then fails: the store must roll the write back.
        await conn.execute("UPDATE wallets SET balance_cents = 0 WHERE rider_id = $1", rider_id)
        raise RuntimeError("provider timed out")


class DecliningProvider:
    name = "declining"
    methods = ("wallet", "card")

    async def charge(self, ride_id, rider_id, amount_cents, currency, method, *, conn):
        await conn.execute("UPDATE wallets SET balance_cents = 0 WHERE rider_id = $1", rider_id)
        return ProviderResult(False, "dcl-1", "card_declined")


class CardProvider:
    name = "testcard"
    methods = ("card",)

    async def charge(self, ride_id, rider_id, amount_cents, currency, method, *, conn):
        return ProviderResult(
            method == "card", f"ch_{uuid.uuid4().hex[:8]}", None if method == "card" else "no"
        )


def uid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


async def completed_ride(pg_pool, driver_id: int | None = None, rider_id: str | None = None):
    rides = RideStore(pg_pool)
    ride, _ = await rides.create_ride(
        rider_id=rider_id or uid("r"),
        region="sf",
        shard_id=0,
        vehicle_class=0,
        pickup=(37.77, -122.41),
        dropoff=(37.79, -122.40),
        surge_multiplier=1.3,
        fare_estimate_cents=FARE.total_cents,
        currency="USD",
    )
    driver = f"drv-{driver_id or random.randint(10**6, 10**9)}"
    for event, role, actor in [
        ("offer", "system", "shard-0"),
        ("accept", "driver", driver),
        ("arrive", "driver", driver),
        ("start", "driver", driver),
        ("complete", "driver", driver),
    ]:
        ride = await rides.transition(ride.ride_id, event, role, actor)
    return ride


async def ledger_of(pg_pool, ride_id: str) -> list[asyncpg.Record]:
    return await pg_pool.fetch(
        "SELECT * FROM ledger_entries WHERE ride_id = $1 ORDER BY id", uuid.UUID(ride_id)
    )


@pytest.fixture
def payments(pg_pool):
    return PaymentStore(pg_pool)


async def test_a_wallet_charge_posts_a_balanced_split(pg_pool, payments):
    ride = await completed_ride(pg_pool)
    await payments.top_up_wallet(ride.rider_id, 10_000)
    pay = await payments.charge_ride(ride.ride_id, fare=FARE, rules=RULES, idempotency_key="charge-1")
    assert pay.succeeded and pay.amount_cents == FARE.total_cents and pay.kind == "charge"
    assert await payments.wallet_balance(ride.rider_id) == 10_000 - FARE.total_cents
    split = split_fare(FARE, RULES)
    lines = {r["account"]: r["amount_cents"] for r in await ledger_of(pg_pool, ride.ride_id)}
    assert lines == {
        f"rider:{ride.rider_id}": FARE.total_cents,
        f"driver:{ride.driver_id}": -split.driver_cents,
        "platform:commission": -split.commission_cents,
        "platform:fees": -split.fees_cents,
    }
    assert await payments.account_balance(f"rider:{ride.rider_id}") == -(10_000 - FARE.total_cents)


async def test_concurrent_retries_with_one_key_charge_once(pg_pool, payments):
    ride = await completed_ride(pg_pool)
    await payments.top_up_wallet(ride.rider_id, 10 * FARE.total_cents)
    results = await asyncio.gather(
        *(payments.charge_ride(ride.ride_id, fare=FARE, rules=RULES, idempotency_key="k") for _ in range(20))
    )
    assert len({p.payment_id for p in results}) == 1 and all(p.succeeded for p in results)
    assert await payments.wallet_balance(ride.rider_id) == 9 * FARE.total_cents
    assert (
        await pg_pool.fetchval("SELECT count(*) FROM payments WHERE ride_id = $1", uuid.UUID(ride.ride_id))
        == 1
    )
    assert len(await ledger_of(pg_pool, ride.ride_id)) == 4
    with pytest.raises(Conflict):  # another key cannot charge the ride twice either
        await payments.charge_ride(ride.ride_id, fare=FARE, rules=RULES, idempotency_key="k2")
    other = quote_fare(RULES, 9000.0, 900.0)
    with pytest.raises(IdempotencyMismatch):
        await payments.charge_ride(ride.ride_id, fare=other, rules=RULES, idempotency_key="k")
    assert await payments.wallet_balance(ride.rider_id) == 9 * FARE.total_cents


async def test_insufficient_funds_fail_without_ledger_rows(pg_pool, payments):
    ride = await completed_ride(pg_pool)
    await payments.top_up_wallet(ride.rider_id, FARE.total_cents - 1)
    failed = await payments.charge_ride(ride.ride_id, fare=FARE, rules=RULES, idempotency_key="a")
    assert not failed.succeeded and failed.failure_reason == "insufficient_funds"
    assert await ledger_of(pg_pool, ride.ride_id) == []
    assert await payments.wallet_balance(ride.rider_id) == FARE.total_cents - 1
    # The same key answers the same failure; a new attempt after a top-up succeeds.
    again = await payments.charge_ride(ride.ride_id, fare=FARE, rules=RULES, idempotency_key="a")
    assert again.payment_id == failed.payment_id and not again.succeeded
    await payments.top_up_wallet(ride.rider_id, 1)
    ok = await payments.charge_ride(ride.ride_id, fare=FARE, rules=RULES, idempotency_key="b")
    assert ok.succeeded and await payments.wallet_balance(ride.rider_id) == 0


async def test_a_provider_that_raises_leaves_nothing(pg_pool):
    ride = await completed_ride(pg_pool)
    store = PaymentStore(pg_pool, ExplodingProvider())
    await store.top_up_wallet(ride.rider_id, 10_000)
    with pytest.raises(RuntimeError):
        await store.charge_ride(ride.ride_id, fare=FARE, rules=RULES, idempotency_key="x")
    assert (
        await pg_pool.fetchval("SELECT count(*) FROM payments WHERE ride_id = $1", uuid.UUID(ride.ride_id))
        == 0
    )
    assert await ledger_of(pg_pool, ride.ride_id) == []
    assert await store.wallet_balance(ride.rider_id) == 10_000


async def test_a_declining_provider_keeps_a_failed_payment_and_its_writes_are_undone(pg_pool):
    ride = await completed_ride(pg_pool)
    store = PaymentStore(pg_pool, DecliningProvider())
    await store.top_up_wallet(ride.rider_id, 10_000)
    pay = await store.charge_ride(ride.ride_id, fare=FARE, rules=RULES, idempotency_key="x")
    assert (pay.status, pay.failure_reason, pay.provider_ref) == ("failed", "card_declined", "dcl-1")
    assert await ledger_of(pg_pool, ride.ride_id) == []
    assert await store.wallet_balance(ride.rider_id) == 10_000


async def test_a_card_charge_funds_the_wallet_then_pays(pg_pool):
    ride = await completed_ride(pg_pool)
    store = PaymentStore(pg_pool, CardProvider())
    pay = await store.charge_ride(ride.ride_id, fare=FARE, rules=RULES, method="card", idempotency_key="c")
    assert pay.succeeded and pay.provider == "testcard" and pay.provider_ref.startswith("ch_")
    rows = await ledger_of(pg_pool, ride.ride_id)
    assert {r["posting"] for r in rows} == {"funding", "charge"}
    assert sum(r["amount_cents"] for r in rows if r["account"] == f"rider:{ride.rider_id}") == 0
    assert await store.wallet_balance(ride.rider_id) == 0


async def test_refunds_balance_and_never_exceed_the_charge(pg_pool, payments):
    ride = await completed_ride(pg_pool)
    await payments.top_up_wallet(ride.rider_id, FARE.total_cents)
    charge = await payments.charge_ride(ride.ride_id, fare=FARE, rules=RULES, idempotency_key="c")
    part = 333
    refunds = await asyncio.gather(
        *(payments.refund(charge.payment_id, part, "detour", "r-1") for _ in range(10))
    )
    assert len({r.payment_id for r in refunds}) == 1
    assert await payments.wallet_balance(ride.rider_id) == part
    with pytest.raises(IdempotencyMismatch):
        await payments.refund(charge.payment_id, part + 1, "detour", "r-1")
    with pytest.raises(InvalidInput):
        await payments.refund(charge.payment_id, FARE.total_cents, "too much", "r-2")
    await payments.refund(charge.payment_id, FARE.total_cents - part, "rest", "r-3")
    assert await payments.wallet_balance(ride.rider_id) == FARE.total_cents
    with pytest.raises(InvalidInput):
        await payments.refund(charge.payment_id, 1, "nothing left", "r-4")
    # Refunds adding up to the charge reverse it exactly: every account of the ride nets 0.
    net: dict[str, int] = {}
    for r in await ledger_of(pg_pool, ride.ride_id):
        net[r["account"]] = net.get(r["account"], 0) + r["amount_cents"]
    assert all(v == 0 for v in net.values()), net
    receipt = await payments.receipt(ride.ride_id)
    assert receipt["totals"]["refunded_cents"] == FARE.total_cents and receipt["totals"]["net_cents"] == 0


async def test_a_platform_borne_refund_leaves_the_driver_paid(pg_pool, payments):
    ride = await completed_ride(pg_pool)
    await payments.top_up_wallet(ride.rider_id, FARE.total_cents)
    charge = await payments.charge_ride(ride.ride_id, fare=FARE, rules=RULES, idempotency_key="c")
    await payments.refund(charge.payment_id, 200, "goodwill", "g", bearer="platform")
    driver_net = await payments.account_balance(f"driver:{ride.driver_id}")
    assert driver_net == -split_fare(FARE, RULES).driver_cents
    assert await payments.account_balance("platform:refunds") >= 200


async def test_cash_trips_and_earnings_over_a_period(pg_pool, payments):
    driver = random.randint(10**6, 10**9)
    start = datetime.now(UTC) - timedelta(seconds=1)
    cash_ride = await completed_ride(pg_pool, driver)
    wallet_ride = await completed_ride(pg_pool, driver)
    await payments.top_up_wallet(wallet_ride.rider_id, FARE.total_cents)
    await payments.charge_ride(cash_ride.ride_id, fare=FARE, rules=RULES, method="cash", idempotency_key="c")
    await payments.charge_ride(wallet_ride.ride_id, fare=FARE, rules=RULES, idempotency_key="w")
    split = split_fare(FARE, RULES)
    got = await payments.earnings(driver, start, datetime.now(UTC) + timedelta(seconds=1))
    assert got["trips"] == 2
    assert got["earned_cents"] == 2 * split.driver_cents
    assert got["cash_collected_cents"] == FARE.total_cents
    # Cash in hand covers this trip's share; the driver is owed the rest of the wallet trip.
    assert got["net_payout_cents"] == 2 * split.driver_cents - FARE.total_cents
    before = await payments.earnings(driver, start - timedelta(days=1), start)
    assert before["trips"] == 0 and before["earned_cents"] == 0
    # Epoch seconds work as bounds too.
    assert (await payments.earnings(driver, start.timestamp(), datetime.now(UTC).timestamp() + 1))[
        "trips"
    ] == 2


async def test_cancellation_fee_after_arrival(pg_pool, payments):
    rides = RideStore(pg_pool)
    ride, _ = await rides.create_ride(
        rider_id=uid("r"),
        region="sf",
        shard_id=0,
        vehicle_class=0,
        pickup=(37.77, -122.41),
        dropoff=(37.79, -122.40),
        surge_multiplier=1.0,
        fare_estimate_cents=1500,
        currency="USD",
    )
    with pytest.raises(Conflict):  # nothing to charge yet
        await payments.charge_cancellation_fee(ride.ride_id, rules=RULES, fee_cents=500, idempotency_key="f")
    for event, role, actor in [
        ("offer", "system", "s"),
        ("accept", "driver", "drv-77"),
        ("arrive", "driver", "drv-77"),
    ]:
        ride = await rides.transition(ride.ride_id, event, role, actor)
    fee = RULES.cancellation_fee_cents
    ride = await rides.transition(
        ride.ride_id, "cancel", "rider", ride.rider_id, data={"cancel_fee_cents": fee}
    )
    await payments.top_up_wallet(ride.rider_id, 1000)
    with pytest.raises(Conflict):  # a cancelled ride has no fare to charge
        await payments.charge_ride(ride.ride_id, fare=FARE, rules=RULES, idempotency_key="c")
    pays = await asyncio.gather(
        *(payments.charge_cancellation_fee(ride.ride_id, rules=RULES, idempotency_key="f") for _ in range(5))
    )
    assert len({p.payment_id for p in pays}) == 1 and pays[0].amount_cents == fee
    assert await payments.wallet_balance(ride.rider_id) == 1000 - fee
    lines = {r["account"]: r["amount_cents"] for r in await ledger_of(pg_pool, ride.ride_id)}
    assert lines[f"rider:{ride.rider_id}"] == fee and lines["driver:77"] < 0 and sum(lines.values()) == 0
    receipt = await payments.receipt(ride.ride_id)
    assert receipt["totals"]["cancellation_fee_cents"] == fee and receipt["fare"] is None


async def test_receipt_numbers_equal_the_ledger(pg_pool, payments):
    ride = await completed_ride(pg_pool)
    await payments.top_up_wallet(ride.rider_id, 5 * FARE.total_cents)
    charge = await payments.charge_ride(ride.ride_id, fare=FARE, rules=RULES, idempotency_key="c")
    await payments.refund(charge.payment_id, 150, "late pickup", "r")
    receipt = await payments.receipt(ride.ride_id)
    assert sum(receipt["fare"][k] for k in FARE.lines()) == receipt["fare"]["total"] == FARE.total_cents
    rider = f"rider:{ride.rider_id}"
    charged = sum(
        x["amount_cents"] for x in receipt["ledger"] if x["posting"] == "charge" and x["amount_cents"] > 0
    )
    refunded = -sum(
        x["amount_cents"] for x in receipt["ledger"] if x["posting"] == "refund" and x["account"] == rider
    )
    assert receipt["totals"]["charged_cents"] == charged == FARE.total_cents
    assert receipt["totals"]["refunded_cents"] == refunded == 150
    assert receipt["totals"]["net_cents"] == sum(
        x["amount_cents"] for x in receipt["ledger"] if x["account"] == rider
    )
    assert [p["kind"] for p in receipt["payments"]] == ["charge", "refund"]


async def test_top_ups_are_idempotent_and_amounts_checked(pg_pool, payments):
    rider = uid("r")
    a = await payments.top_up_wallet(rider, 700, idempotency_key="t")
    b = await payments.top_up_wallet(rider, 700, idempotency_key="t")
    assert a.payment_id == b.payment_id and await payments.wallet_balance(rider) == 700
    for bad in (0, -5, 1.5):
        with pytest.raises(InvalidInput):
            await payments.top_up_wallet(rider, bad)
    with pytest.raises(InvalidInput):
        await payments.top_up_wallet(rider, 100, currency="EUR")


async def test_the_database_guards_the_books(pg_pool, payments):
    """Run last in this file: every txn in the run sums to zero, no wallet is negative and
    each wallet mirrors its ledger account; an unbalanced posting cannot be committed."""
    assert (
        await pg_pool.fetch("SELECT txn_id FROM ledger_entries GROUP BY txn_id HAVING sum(amount_cents) <> 0")
        == []
    )
    assert await pg_pool.fetchval("SELECT count(*) FROM wallets WHERE balance_cents < 0") == 0
    mismatched = await pg_pool.fetch(
        "SELECT w.rider_id FROM wallets w LEFT JOIN ledger_entries l ON l.account = 'rider:' || w.rider_id"
        " GROUP BY w.rider_id, w.balance_cents HAVING w.balance_cents <> -coalesce(sum(l.amount_cents), 0)"
    )
    assert mismatched == []
    top_up = await payments.top_up_wallet(uid("r"), 100)
    with pytest.raises(asyncpg.CheckViolationError):
        async with pg_pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO ledger_entries (txn_id, payment_id, posting, account, amount_cents, currency)"
                " VALUES ($1, $2, 'top_up', 'platform:fees', 5, 'USD')",
                uuid.uuid4(),
                uuid.UUID(top_up.payment_id),
            )
    with pytest.raises(asyncpg.CheckViolationError):
        await pg_pool.execute("UPDATE wallets SET balance_cents = -1 WHERE rider_id = $1", top_up.rider_id)
