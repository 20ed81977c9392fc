"""Payments and the double-entry ledger in Postgres: charges, refunds, fees, wallets.

Every money movement is one Postgres transaction that writes a ``payments`` row and the
``ledger_entries`` of its posting(s), as computed by :mod:`dispatch.ledger` (this module
does no money maths of its own) and checked with :func:`~dispatch.ledger.assert_balanced`
before the insert; a deferred trigger checks again at commit that every ``txn_id`` sums
to zero. Wallet balances move in the same transaction, and always equal minus the sum of
the rider's ``rider:<id>`` ledger account.

Retries are safe: each call takes an idempotency key, unique per payment scope (a ride's
charge, a ride's fee, a payment's refunds, a rider's top-ups). A retry with the same key
returns the payment of the first call (succeeded or failed) without moving money again;
the same key for different amounts is IdempotencyMismatch. Concurrent calls on one ride
are serialized by locking the ride row, and a unique index allows one succeeded charge
and one succeeded cancellation fee per ride whatever the keys.

Providers (:class:`PaymentProvider`) are called inside the transaction, with its
connection. A failed result stores the payment with ``status = 'failed'`` and no ledger
rows (a retry with the same key returns that failure; a new attempt needs a new key); a
provider that raises rolls everything back: no payment row, no ledger rows. Holding the
transaction across an external provider's call keeps this simple and exact; a provider
with slow network calls would want a reserve-then-settle flow instead.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from typing import Any, Protocol

import asyncpg

from dispatch.errors import Conflict, IdempotencyMismatch, InvalidInput, NotFound
from dispatch.ledger import (
    Entry,
    Parties,
    PaymentMethod,
    RefundBearer,
    assert_balanced,
    cash_account,
    driver_account,
    entries_for_cancellation_fee,
    entries_for_charge,
    entries_for_refund,
    rider_account,
)
from dispatch.pricing import FareBreakdown, FareRules
from storage.db import connection, parse_uuid, transaction
from storage.idempotency import check_key

TOP_UP_ACCOUNT = "funding:top_ups"  # money received from outside into riders' wallets
METHODS = ("wallet", "cash", "card")
_CREDIT_WALLET = (
    "UPDATE wallets SET balance_cents = balance_cents + $2, updated_at = now() WHERE rider_id = $1"
)


@dataclass(frozen=True, slots=True)
class ProviderResult:
    """What a provider answered: ``ok``, its reference, or why it refused."""

    ok: bool
    ref: str | None = None
    failure_reason: str | None = None


class PaymentProvider(Protocol):
    """Takes a rider's money for a payment.

    ``charge`` runs inside the payment's database transaction and gets its connection:
    a provider that settles in the database (the wallet) writes through ``conn``; an
    external one ignores it. It returns a failed result for a refusal (insufficient
    funds, card declined) and must not have moved money then; raising rolls back the
    whole payment. ``method`` is "wallet", "cash" or "card".
    """

    name: str
    #: the payment methods this provider settles ("wallet", "cash", "card")
    methods: tuple[str, ...]

    async def charge(
        self,
        ride_id: str | None,
        rider_id: str,
        amount_cents: int,
        currency: str,
        method: str,
        *,
        conn: asyncpg.Connection,
    ) -> ProviderResult: ...


class WalletProvider:
    """The built-in provider: the rider's stored balance, and cash in the car.

    ``wallet`` debits ``wallets.balance_cents`` if it covers the amount (else a failed
    result, ``insufficient_funds``); ``cash`` always succeeds (the driver holds the money
    and owes the platform its share, see :func:`dispatch.ledger.entries_for_charge`);
    ``card`` is refused (``unsupported_method``): cards need an external provider.
    """

    name = "wallet"
    methods = ("wallet", "cash")

    async def charge(
        self,
        ride_id: str | None,
        rider_id: str,
        amount_cents: int,
        currency: str,
        method: str,
        *,
        conn: asyncpg.Connection,
    ) -> ProviderResult:
        if method == "cash":
            return ProviderResult(True, "cash")
        if method != "wallet":
            return ProviderResult(False, None, "unsupported_method")
        row = await conn.fetchrow(
            "UPDATE wallets SET balance_cents = balance_cents - $2, updated_at = now()"
            " WHERE rider_id = $1 AND currency = $3 AND balance_cents >= $2 RETURNING balance_cents",
            rider_id,
            amount_cents,
            currency,
        )
        if row is None:
            return ProviderResult(False, None, "insufficient_funds")
        return ProviderResult(True, f"wallet:{rider_id}")


@dataclass(frozen=True, slots=True)
class Payment:
    """One ``payments`` row; ids as strings."""

    payment_id: str
    ride_id: str | None
    rider_id: str
    kind: str
    amount_cents: int
    currency: str
    method: str
    provider: str
    provider_ref: str | None
    status: str
    failure_reason: str | None
    refund_of: str | None
    breakdown: dict[str, Any]
    created_at: datetime

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"

    @classmethod
    def from_row(cls, row: asyncpg.Record) -> Payment:
        kw = {f.name: row[f.name] for f in fields(cls)}
        for k in ("payment_id", "ride_id", "refund_of"):
            kw[k] = str(kw[k]) if kw[k] is not None else None
        return cls(**kw)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["created_at"] = self.created_at.isoformat()
        return d


class _Declined(Exception):
    """Rolls back the provider's savepoint when it answered a failed result."""

    def __init__(self, result: ProviderResult) -> None:
        self.result = result


def _uuid(value: object, what: str) -> uuid.UUID:
    parsed = parse_uuid(value)
    if parsed is None:
        raise NotFound(f"no {what} {value!r}")
    return parsed


def _positive(amount: object, what: str) -> int:
    if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
        raise InvalidInput(f"{what} must be a positive integer of cents, got {amount!r}")
    return amount


def _fingerprint(**parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _ts(value: datetime | float | int) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.fromtimestamp(float(value), tz=UTC)


class PaymentStore:
    """Payments, ledger postings and wallets (see the module docstring)."""

    def __init__(self, pool: asyncpg.Pool, provider: PaymentProvider | None = None) -> None:
        self.pool = pool
        self.provider = provider or WalletProvider()

    # -- shared steps ---------------------------------------------------------------------------

    async def _existing(
        self, conn: asyncpg.Connection, scope: str, key: str, fingerprint: str
    ) -> Payment | None:
        row = await conn.fetchrow(
            "SELECT * FROM payments WHERE idempotency_scope = $1 AND idempotency_key = $2", scope, key
        )
        if row is None:
            return None
        if row["fingerprint"] != fingerprint:
            raise IdempotencyMismatch(
                "this Idempotency-Key was used for a different payment", payment_id=str(row["payment_id"])
            )
        return Payment.from_row(row)

    async def _locked_ride(self, conn: asyncpg.Connection, ride_id: str) -> asyncpg.Record:
        row = await conn.fetchrow("SELECT * FROM rides WHERE ride_id = $1 FOR UPDATE", _uuid(ride_id, "ride"))
        if row is None:
            raise NotFound(f"no ride {ride_id}", ride_id=str(ride_id))
        return row

    async def _settle(
        self,
        conn: asyncpg.Connection,
        *,
        ride_id: uuid.UUID | None,
        rider_id: str,
        amount_cents: int,
        currency: str,
        method: str,
    ) -> ProviderResult:
        """Ask the provider inside a savepoint, so a refusal leaves no trace of it."""
        try:
            async with conn.transaction():
                result = await self.provider.charge(
                    str(ride_id) if ride_id else None, rider_id, amount_cents, currency, method, conn=conn
                )
                if not result.ok:
                    raise _Declined(result)
        except _Declined as declined:
            return ProviderResult(False, declined.result.ref, declined.result.failure_reason or "declined")
        return result

    async def _insert_payment(self, conn: asyncpg.Connection, **cols: Any) -> asyncpg.Record:
        names = list(cols)
        marks = ", ".join(f"${i + 1}" for i in range(len(names)))
        row = await conn.fetchrow(
            f"INSERT INTO payments ({', '.join(names)}) VALUES ({marks}) RETURNING *", *cols.values()
        )
        assert row is not None  # INSERT ... RETURNING returns the row or raises
        return row

    async def _post(
        self,
        conn: asyncpg.Connection,
        payment_id: uuid.UUID,
        posting: str,
        entries: Sequence[Entry],
        currency: str,
        ride_id: uuid.UUID | None,
    ) -> None:
        assert_balanced(entries)
        txn = uuid.uuid4()
        await conn.executemany(
            "INSERT INTO ledger_entries"
            " (txn_id, payment_id, posting, account, amount_cents, currency, ride_id)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7)",
            [(txn, payment_id, posting, e.account, e.amount_cents, currency, ride_id) for e in entries],
        )

    # -- money in -------------------------------------------------------------------------------

    async def charge_ride(
        self,
        ride_id: str,
        *,
        fare: FareBreakdown,
        rules: FareRules,
        method: str = "wallet",
        idempotency_key: str,
    ) -> Payment:
        """Charge a completed ride its final fare (:func:`dispatch.pricing.final_fare`).

        Returns the payment: succeeded with its ledger posting, or failed (provider's
        reason, no ledger rows). Raises NotFound for an unknown ride, Conflict if the ride
        is not completed or already charged (under another key), IdempotencyMismatch for
        a key reused with another amount or method, InvalidInput for a bad key, method or
        fare (currency other than the rules', non-positive total).
        """
        check_key(idempotency_key)
        if method not in METHODS:
            raise InvalidInput(f"unknown payment method {method!r}; expected one of {METHODS}")
        scope = f"ride:{ride_id}:charge"
        fp = _fingerprint(kind="charge", amount=fare.total_cents, currency=fare.currency, method=method)
        async with transaction(self.pool) as conn:
            ride = await self._locked_ride(conn, ride_id)
            done = await self._existing(conn, scope, idempotency_key, fp)
            if done is not None:
                return done
            if ride["status"] != "completed" or ride["driver_id"] is None:
                raise Conflict(f"ride {ride_id} is {ride['status']}, not completed", status=ride["status"])
            await self._refuse_second(conn, ride["ride_id"], "charge")
            parties = Parties(str(ride["ride_id"]), ride["rider_id"], ride["driver_id"])
            ledger_method = PaymentMethod.CASH if method == "cash" else PaymentMethod.WALLET
            entries = entries_for_charge(parties, fare, rules, ledger_method)
            result = await self._settle(
                conn,
                ride_id=ride["ride_id"],
                rider_id=ride["rider_id"],
                amount_cents=fare.total_cents,
                currency=fare.currency,
                method=method,
            )
            breakdown = {
                **fare.lines(),
                "total": fare.total_cents,
                "basis": fare.basis.value,
                "surge_multiplier": fare.surge_multiplier,
                "distance_m": fare.distance_m,
                "duration_s": fare.duration_s,
            }
            row = await self._insert_payment(
                conn,
                ride_id=ride["ride_id"],
                rider_id=ride["rider_id"],
                kind="charge",
                amount_cents=fare.total_cents,
                currency=fare.currency,
                method=method,
                provider=self.provider.name,
                provider_ref=result.ref,
                status="succeeded" if result.ok else "failed",
                failure_reason=result.failure_reason,
                breakdown=breakdown,
                fingerprint=fp,
                idempotency_scope=scope,
                idempotency_key=idempotency_key,
            )
            if result.ok:
                if method == "card":  # the card paid into the wallet, which paid the ride
                    funding = [
                        Entry(f"card:{self.provider.name}", fare.total_cents),
                        Entry(rider_account(ride["rider_id"]), -fare.total_cents),
                    ]
                    await self._post(
                        conn, row["payment_id"], "funding", funding, fare.currency, ride["ride_id"]
                    )
                await self._post(conn, row["payment_id"], "charge", entries, fare.currency, ride["ride_id"])
        return Payment.from_row(row)

    async def charge_cancellation_fee(
        self,
        ride_id: str,
        *,
        rules: FareRules,
        idempotency_key: str,
        fee_cents: int | None = None,
    ) -> Payment:
        """Charge a cancelled ride's fee from the rider's wallet (the ledger's rule: no cash).

        ``fee_cents`` defaults to the ride's ``cancel_fee_cents`` (set by the cancel
        transition from :class:`dispatch.trips.CancellationPolicy`'s decision). Raises
        Conflict unless the ride was cancelled after a driver accepted it, InvalidInput
        for no or a non-positive fee, and as :meth:`charge_ride` for keys. A wallet
        without the funds gives a failed payment.
        """
        check_key(idempotency_key)
        scope = f"ride:{ride_id}:cancellation_fee"
        async with transaction(self.pool) as conn:
            ride = await self._locked_ride(conn, ride_id)
            fee = fee_cents if fee_cents is not None else ride["cancel_fee_cents"]
            fee = _positive(fee, "cancellation fee")
            fp = _fingerprint(kind="cancellation_fee", amount=fee, currency=rules.currency)
            done = await self._existing(conn, scope, idempotency_key, fp)
            if done is not None:
                return done
            if ride["status"] != "cancelled" or ride["driver_id"] is None:
                raise Conflict(f"ride {ride_id} has no cancellation to charge", status=ride["status"])
            await self._refuse_second(conn, ride["ride_id"], "cancellation_fee")
            parties = Parties(str(ride["ride_id"]), ride["rider_id"], ride["driver_id"])
            entries = entries_for_cancellation_fee(parties, fee, rules)
            result = await self._settle(
                conn,
                ride_id=ride["ride_id"],
                rider_id=ride["rider_id"],
                amount_cents=fee,
                currency=rules.currency,
                method="wallet",
            )
            row = await self._insert_payment(
                conn,
                ride_id=ride["ride_id"],
                rider_id=ride["rider_id"],
                kind="cancellation_fee",
                amount_cents=fee,
                currency=rules.currency,
                method="wallet",
                provider=self.provider.name,
                provider_ref=result.ref,
                status="succeeded" if result.ok else "failed",
                failure_reason=result.failure_reason,
                breakdown={"cancellation_fee": fee},
                fingerprint=fp,
                idempotency_scope=scope,
                idempotency_key=idempotency_key,
            )
            if result.ok:
                await self._post(
                    conn, row["payment_id"], "cancellation_fee", entries, rules.currency, ride["ride_id"]
                )
        return Payment.from_row(row)

    async def _refuse_second(self, conn: asyncpg.Connection, ride_id: uuid.UUID, kind: str) -> None:
        paid = await conn.fetchval(
            "SELECT payment_id FROM payments WHERE ride_id = $1 AND kind = $2 AND status = 'succeeded'",
            ride_id,
            kind,
        )
        if paid is not None:
            raise Conflict(f"ride {ride_id} already has a {kind}", payment_id=str(paid))

    async def top_up_wallet(
        self, rider_id: str, amount_cents: int, *, currency: str = "USD", idempotency_key: str | None = None
    ) -> Payment:
        """Add money to a rider's wallet (dev and admin tool); the wallet is created if needed.

        Posts ``funding:top_ups`` (debit) against ``rider:<id>`` (credit). Without a key
        every call is a new top-up. Raises InvalidInput for a non-positive amount or a
        wallet in another currency.
        """
        _positive(amount_cents, "top-up")
        key = check_key(idempotency_key) if idempotency_key is not None else str(uuid.uuid4())
        scope = f"rider:{rider_id}:top_up"
        fp = _fingerprint(kind="top_up", amount=amount_cents, currency=currency)
        async with transaction(self.pool) as conn:
            await conn.execute("INSERT INTO riders (rider_id) VALUES ($1) ON CONFLICT DO NOTHING", rider_id)
            await conn.execute(
                "INSERT INTO wallets (rider_id, currency) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                rider_id,
                currency,
            )
            wallet = await conn.fetchrow("SELECT * FROM wallets WHERE rider_id = $1 FOR UPDATE", rider_id)
            assert wallet is not None  # inserted just above in this transaction
            done = await self._existing(conn, scope, key, fp)
            if done is not None:
                return done
            if wallet["currency"] != currency:
                raise InvalidInput(f"the wallet is in {wallet['currency']}, not {currency}")
            row = await self._insert_payment(
                conn,
                ride_id=None,
                rider_id=rider_id,
                kind="top_up",
                amount_cents=amount_cents,
                currency=currency,
                method="card",
                provider="top_up",
                provider_ref=None,
                status="succeeded",
                failure_reason=None,
                fingerprint=fp,
                idempotency_scope=scope,
                idempotency_key=key,
            )
            entries = [Entry(TOP_UP_ACCOUNT, amount_cents), Entry(rider_account(rider_id), -amount_cents)]
            await self._post(conn, row["payment_id"], "top_up", entries, currency, None)
            await conn.execute(
                _CREDIT_WALLET,
                rider_id,
                amount_cents,
            )
        return Payment.from_row(row)

    # -- money back -----------------------------------------------------------------------------

    async def refund(
        self,
        payment_id: str,
        amount_cents: int,
        reason: str,
        idempotency_key: str,
        *,
        bearer: RefundBearer | str = RefundBearer.PROPORTIONAL,
    ) -> Payment:
        """Refund part or all of a succeeded charge or cancellation fee into the rider's wallet.

        The posting is :func:`dispatch.ledger.entries_for_refund` against the original
        posting and the refunds before it (so refunds never exceed the payment, and refunds
        adding up to it reverse it exactly). Raises NotFound for an unknown payment,
        Conflict for one that failed or is not a charge or fee, InvalidInput for an amount
        beyond what is left or a bad key, IdempotencyMismatch as :meth:`charge_ride`.
        """
        check_key(idempotency_key)
        _positive(amount_cents, "refund")
        pid = _uuid(payment_id, "payment")
        scope = f"payment:{pid}:refund"
        fp = _fingerprint(kind="refund", amount=amount_cents, reason=reason, bearer=str(bearer))
        async with transaction(self.pool) as conn:
            orig = await conn.fetchrow("SELECT * FROM payments WHERE payment_id = $1 FOR UPDATE", pid)
            if orig is None:
                raise NotFound(f"no payment {payment_id}", payment_id=str(payment_id))
            done = await self._existing(conn, scope, idempotency_key, fp)
            if done is not None:
                return done
            if orig["status"] != "succeeded" or orig["kind"] not in ("charge", "cancellation_fee"):
                raise Conflict(f"payment {pid} is a {orig['status']} {orig['kind']}: nothing to refund")
            ride = await conn.fetchrow("SELECT * FROM rides WHERE ride_id = $1", orig["ride_id"])
            assert ride is not None  # payments.ride_id references rides; a charge always has one
            original = await self._posting(conn, "payment_id = $1 AND posting = $2", pid, orig["kind"])
            previous = await self._postings(conn, pid)
            parties = Parties(str(ride["ride_id"]), ride["rider_id"], ride["driver_id"])
            entries = entries_for_refund(parties, original, amount_cents, previous, bearer)
            row = await self._insert_payment(
                conn,
                ride_id=ride["ride_id"],
                rider_id=ride["rider_id"],
                kind="refund",
                amount_cents=amount_cents,
                currency=orig["currency"],
                method="wallet",
                provider="wallet",
                provider_ref=None,
                status="succeeded",
                failure_reason=None,
                refund_of=pid,
                breakdown={"reason": reason, "bearer": str(bearer)},
                fingerprint=fp,
                idempotency_scope=scope,
                idempotency_key=idempotency_key,
            )
            await self._post(conn, row["payment_id"], "refund", entries, orig["currency"], ride["ride_id"])
            await conn.execute(
                "INSERT INTO wallets (rider_id, currency) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                ride["rider_id"],
                orig["currency"],
            )
            await conn.execute(
                _CREDIT_WALLET,
                ride["rider_id"],
                amount_cents,
            )
        return Payment.from_row(row)

    async def _posting(self, conn: asyncpg.Connection, where: str, *args: Any) -> list[Entry]:
        sql = f"SELECT account, amount_cents FROM ledger_entries WHERE {where} ORDER BY id"
        rows = await conn.fetch(sql, *args)
        return [Entry(r["account"], int(r["amount_cents"])) for r in rows]

    async def _postings(self, conn: asyncpg.Connection, refund_of: uuid.UUID) -> list[list[Entry]]:
        rows = await conn.fetch(
            "SELECT l.txn_id, l.account, l.amount_cents"
            " FROM ledger_entries l JOIN payments p USING (payment_id)"
            " WHERE p.refund_of = $1 AND p.status = 'succeeded' ORDER BY l.id",
            refund_of,
        )
        by_txn: dict[uuid.UUID, list[Entry]] = {}
        for r in rows:
            by_txn.setdefault(r["txn_id"], []).append(Entry(r["account"], int(r["amount_cents"])))
        return list(by_txn.values())

    # -- reading --------------------------------------------------------------------------------

    async def receipt(self, ride_id: str) -> dict[str, Any]:
        """The ride's money: fare lines, payments, ledger lines and totals (JSON-able).

        ``totals``: ``charged_cents`` (succeeded charges), ``cancellation_fee_cents``,
        ``refunded_cents`` and ``net_cents`` (what the rider paid in the end). Raises
        NotFound for an unknown ride.
        """
        rid = _uuid(ride_id, "ride")
        async with connection(self.pool) as conn:
            ride = await conn.fetchrow("SELECT * FROM rides WHERE ride_id = $1", rid)
            if ride is None:
                raise NotFound(f"no ride {ride_id}", ride_id=str(ride_id))
            rows = await conn.fetch("SELECT * FROM payments WHERE ride_id = $1 ORDER BY created_at", rid)
            pays = [Payment.from_row(r) for r in rows]
            lines = await conn.fetch(
                "SELECT txn_id, payment_id, posting, account, amount_cents, currency, created_at"
                " FROM ledger_entries WHERE ride_id = $1 ORDER BY id",
                rid,
            )
        ok = [p for p in pays if p.succeeded]
        charge = next((p for p in ok if p.kind == "charge"), None)
        totals = {
            "charged_cents": sum(p.amount_cents for p in ok if p.kind == "charge"),
            "cancellation_fee_cents": sum(p.amount_cents for p in ok if p.kind == "cancellation_fee"),
            "refunded_cents": sum(p.amount_cents for p in ok if p.kind == "refund"),
        }
        paid = totals["charged_cents"] + totals["cancellation_fee_cents"]
        totals["net_cents"] = paid - totals["refunded_cents"]
        return {
            "ride_id": str(rid),
            "rider_id": ride["rider_id"],
            "driver_id": ride["driver_id"],
            "status": ride["status"],
            "currency": ride["currency"],
            "fare": charge.breakdown if charge else None,
            "payments": [p.to_json() for p in pays],
            "ledger": [
                {
                    **dict(r),
                    "txn_id": str(r["txn_id"]),
                    "payment_id": str(r["payment_id"]),
                    "amount_cents": int(r["amount_cents"]),
                    "created_at": r["created_at"].isoformat(),
                }
                for r in lines
            ],
            "totals": totals,
        }

    async def earnings(
        self, driver_id: int, from_ts: datetime | float, to_ts: datetime | float
    ) -> dict[str, Any]:
        """A driver's ledger over ``[from_ts, to_ts)`` (datetimes or epoch seconds).

        ``earned_cents``: net credits to ``driver:<id>`` (earnings less refunds clawed
        back); ``cash_collected_cents``: fares taken in cash (``cash:<id>`` debits);
        ``net_payout_cents``: earned minus cash held, what the platform owes the driver
        (negative: the driver owes the platform); ``trips``: rides charged in the period.
        """
        start, end = _ts(from_ts), _ts(to_ts)
        async with connection(self.pool) as conn:
            row = await conn.fetchrow(
                "SELECT"
                " coalesce(-sum(amount_cents) FILTER (WHERE account = $1), 0) AS earned,"
                " coalesce(sum(amount_cents) FILTER (WHERE account = $2), 0) AS cash,"
                " count(DISTINCT ride_id) FILTER (WHERE account = $1 AND posting = 'charge') AS trips"
                " FROM ledger_entries WHERE account IN ($1, $2) AND created_at >= $3 AND created_at < $4",
                driver_account(int(driver_id)),
                cash_account(int(driver_id)),
                start,
                end,
            )
        assert row is not None  # an aggregate without GROUP BY always returns one row
        earned, cash = int(row["earned"]), int(row["cash"])
        return {
            "driver_id": int(driver_id),
            "from": start.isoformat(),
            "to": end.isoformat(),
            "earned_cents": earned,
            "cash_collected_cents": cash,
            "net_payout_cents": earned - cash,
            "trips": int(row["trips"]),
        }

    async def wallet_balance(self, rider_id: str) -> int:
        """The rider's wallet balance in cents (0 without a wallet)."""
        async with connection(self.pool) as conn:
            v = await conn.fetchval("SELECT balance_cents FROM wallets WHERE rider_id = $1", rider_id)
        return int(v or 0)

    async def account_balance(self, account: str) -> int:
        """Net of an account's ledger entries (debits positive), e.g. ``rider:r-1``."""
        async with connection(self.pool) as conn:
            v = await conn.fetchval(
                "SELECT coalesce(sum(amount_cents), 0) FROM ledger_entries WHERE account = $1", account
            )
        return int(v)
