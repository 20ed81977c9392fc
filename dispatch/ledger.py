"""Double-entry bookkeeping of rides, Sans-I/O: charges, refunds and cancellation fees.

An :class:`Entry` moves ``amount_cents`` on one account: **positive is a debit, negative a
credit**. Every function here returns a list of entries that sums to exactly zero (one
posting), with no zero entries; ``storage/`` writes a posting in one transaction with
the ride id and kind. Accounts are ``"<kind>:<id>"``:

- ``rider:<rider_id>``: the rider's wallet, a liability of the platform to the rider. A
  charge debits it (the platform owes the rider less); a refund credits it. A wallet may
  go negative (the rider owes the platform; collected on the next top-up).
- ``driver:<driver_id>``: the driver's earnings, owed by the platform to the driver;
  credited by earnings, debited when a refund claws them back.
- ``cash:<driver_id>``: cash a driver collected from riders and holds for the platform.
  A cash trip debits it with the whole fare, so the driver's net position (driver minus
  cash) is what the driver owes the platform: its commission and fees.
- ``platform:commission``: the platform's share of fares (revenue, credited).
- ``platform:fees``: booking fees (revenue, credited).
- ``platform:refunds``: goodwill refunds the platform pays itself (expense, debited).

Reading the signs from outside (receipts, ``GET /v1/drivers/me/earnings``, docs/rest.md):
an account's balance in the books is the sum of its entries, debits positive. So a
liability or revenue account the platform owes on is *negative* when it holds money:
a rider's wallet of 12.00 is ``-1200`` on ``rider:<id>`` (the REST wallet answers
``balance_cents: 1200``, the sign turned for the rider), a driver's earnings are the
negated sum of ``driver:<id>``, and a ride's charge shows on the rider's ledger lines as
a positive (debit) line and on the driver's as a negative (credit) one.

How a charge splits the rider's payment (:func:`split_fare`): the booking fee goes to
``platform:fees`` whole; of the rest (the fare), the commission is ``commission_rate``
of it rounded half up to the cent, and the driver gets the remainder, so the three add
up to the total to the cent. A cancellation fee splits the same way, with no booking
fee. A refund is paid back into the rider's wallet whatever the original method (cash
cannot be handed back by the platform).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from dispatch.errors import InvalidInput
from dispatch.pricing import FareBreakdown, FareRules, round_cents, to_decimal

PLATFORM_COMMISSION = "platform:commission"
PLATFORM_FEES = "platform:fees"
PLATFORM_REFUNDS = "platform:refunds"


@dataclass(frozen=True, slots=True)
class Entry:
    """One leg of a posting. ``amount_cents`` > 0 debits ``account``, < 0 credits it."""

    account: str
    amount_cents: int

    def __post_init__(self) -> None:
        if not isinstance(self.amount_cents, int) or isinstance(self.amount_cents, bool):
            raise InvalidInput(f"amount_cents must be an integer, got {self.amount_cents!r}")
        kind, sep, ident = self.account.partition(":") if isinstance(self.account, str) else ("", "", "")
        if not (kind and sep and ident):
            raise InvalidInput(f"account must be 'kind:id', got {self.account!r}")


class PaymentMethod(StrEnum):
    WALLET = "wallet"  # card or stored balance, settled through the rider's wallet
    CASH = "cash"  # paid to the driver in the car


class RefundBearer(StrEnum):
    PROPORTIONAL = "proportional"  # undo the original split pro rata: driver, commission, fees
    PLATFORM = "platform"  # goodwill: the platform pays it all, the driver keeps its earnings


class RideParties(Protocol):
    """What the ledger needs to know about a ride: who rode and who drove."""

    @property
    def ride_id(self) -> str: ...

    @property
    def rider_id(self) -> str: ...

    @property
    def driver_id(self) -> int | str: ...


@dataclass(frozen=True, slots=True)
class Parties:
    """A plain :class:`RideParties` value."""

    ride_id: str
    rider_id: str
    driver_id: int | str


@dataclass(frozen=True, slots=True)
class FareSplit:
    """Who gets a rider's payment; the three parts add up to ``total_cents``."""

    total_cents: int
    driver_cents: int
    commission_cents: int
    fees_cents: int


def rider_account(rider_id: str) -> str:
    return f"rider:{rider_id}"


def driver_account(driver_id: int | str) -> str:
    return f"driver:{driver_id}"


def cash_account(driver_id: int | str) -> str:
    return f"cash:{driver_id}"


def split_amount(amount_cents: int, booking_fee_cents: int, commission_rate: float) -> FareSplit:
    """Split a payment: the booking fee whole to the platform, commission on the rest."""
    if not (0 <= booking_fee_cents <= amount_cents):
        raise InvalidInput(f"booking fee {booking_fee_cents} outside a payment of {amount_cents}")
    fare = amount_cents - booking_fee_cents
    commission = round_cents(fare * to_decimal(commission_rate))
    return FareSplit(amount_cents, fare - commission, commission, booking_fee_cents)


def split_fare(fare: FareBreakdown, rules: FareRules) -> FareSplit:
    """How the total of ``fare`` splits under ``rules``' commission rate."""
    return split_amount(fare.total_cents, fare.booking_fee_cents, rules.commission_rate)


def _posting(entries: Iterable[Entry]) -> list[Entry]:
    out = [e for e in entries if e.amount_cents != 0]
    assert_balanced(out)
    return out


def _check_positive(amount_cents: int, what: str) -> None:
    if not isinstance(amount_cents, int) or isinstance(amount_cents, bool) or amount_cents <= 0:
        raise InvalidInput(f"{what} must be a positive integer of cents, got {amount_cents!r}")


def entries_for_charge(
    ride: RideParties,
    fare: FareBreakdown,
    rules: FareRules,
    method: PaymentMethod | str = PaymentMethod.WALLET,
) -> list[Entry]:
    """The posting of a completed ride's fare.

    Debits the rider's wallet (``wallet``) or the driver's cash in hand (``cash``) with
    the total; credits the driver's earnings, the commission and the booking fee. Raises
    :class:`InvalidInput` for a fare in another currency than ``rules``, a non-positive
    total, or an unknown method.
    """
    method = _method(method)
    if fare.currency != rules.currency:
        raise InvalidInput(f"fare in {fare.currency} but the fare rules are in {rules.currency}")
    _check_positive(fare.total_cents, "fare total")
    split = split_fare(fare, rules)
    payer = rider_account(ride.rider_id) if method is PaymentMethod.WALLET else cash_account(ride.driver_id)
    return _posting(
        [
            Entry(payer, split.total_cents),
            Entry(driver_account(ride.driver_id), -split.driver_cents),
            Entry(PLATFORM_COMMISSION, -split.commission_cents),
            Entry(PLATFORM_FEES, -split.fees_cents),
        ]
    )


def entries_for_cancellation_fee(ride: RideParties, fee_cents: int, rules: FareRules) -> list[Entry]:
    """The posting of a rider's cancellation fee (see :class:`dispatch.trips.CancellationPolicy`).

    Always debits the rider's wallet (there is no cash hand-over when the ride does not
    happen); the driver who drove to the pickup gets the fee less the commission.
    """
    _check_positive(fee_cents, "cancellation fee")
    split = split_amount(fee_cents, 0, rules.commission_rate)
    return _posting(
        [
            Entry(rider_account(ride.rider_id), fee_cents),
            Entry(driver_account(ride.driver_id), -split.driver_cents),
            Entry(PLATFORM_COMMISSION, -split.commission_cents),
        ]
    )


def _allocate(amount: int, weights: Sequence[int]) -> list[int]:
    """Split ``amount`` in proportion to ``weights`` (largest remainder): exact, fair to the cent."""
    total = sum(weights)
    if total <= 0:
        raise InvalidInput("nothing to allocate a refund against")
    shares = [amount * w // total for w in weights]
    remainders = sorted(range(len(weights)), key=lambda i: (-(amount * weights[i] % total), i))
    for i in remainders[: amount - sum(shares)]:
        shares[i] += 1
    return shares


def entries_for_refund(
    ride: RideParties,
    charge: Sequence[Entry],
    amount_cents: int,
    previous_refunds: Iterable[Sequence[Entry]] = (),
    bearer: RefundBearer | str = RefundBearer.PROPORTIONAL,
) -> list[Entry]:
    """The posting of a refund of ``amount_cents`` against an earlier ``charge`` posting.

    ``previous_refunds`` are the refund postings already made against the same charge.
    The rider's wallet is credited with the amount. ``PROPORTIONAL`` takes it back from
    the accounts the charge credited (driver, commission, fees) in proportion to what each
    still holds of it, to the cent (largest remainder), so partial refunds never take back
    more from an account than it received and refunds adding up to the charge reverse it
    exactly. ``PLATFORM`` debits ``platform:refunds`` with all of it. Raises
    :class:`InvalidInput` if a posting given is unbalanced, the amount is not positive, or
    the refunds would exceed what the charge collected.
    """
    _check_positive(amount_cents, "refund")
    assert_balanced(charge)
    bearer = _bearer(bearer)
    collected = sum(e.amount_cents for e in charge if e.amount_cents > 0)
    returned: dict[str, int] = {}
    refunded = 0
    for posting in previous_refunds:
        assert_balanced(posting)
        for e in posting:
            if e.amount_cents > 0:
                refunded += e.amount_cents
                returned[e.account] = returned.get(e.account, 0) + e.amount_cents
    if refunded + amount_cents > collected:
        raise InvalidInput(
            f"refund of {amount_cents} after {refunded} exceeds the {collected} charged",
            ride_id=ride.ride_id,
        )
    refund = [Entry(rider_account(ride.rider_id), -amount_cents)]
    if bearer is RefundBearer.PLATFORM:
        return _posting([*refund, Entry(PLATFORM_REFUNDS, amount_cents)])
    received: dict[str, int] = {}
    for e in charge:
        if e.amount_cents < 0:
            received[e.account] = received.get(e.account, 0) - e.amount_cents
    accounts = list(received)
    # What each account still holds; their sum covers the amount, since platform-borne
    # refunds took nothing back from them.
    holds = [received[a] - returned.get(a, 0) for a in accounts]
    if any(h < 0 for h in holds):
        raise InvalidInput(
            "the previous refunds took back more than this charge paid out", ride_id=ride.ride_id
        )
    shares = _allocate(amount_cents, holds)
    return _posting([*refund, *(Entry(a, s) for a, s in zip(accounts, shares, strict=True))])


def assert_balanced(entries: Iterable[Entry]) -> None:
    """Raise :class:`InvalidInput` unless the entries are :class:`Entry` values summing to 0."""
    total = 0
    for e in entries:
        if not isinstance(e, Entry):
            raise InvalidInput(f"not a ledger entry: {e!r}")
        total += e.amount_cents
    if total != 0:
        raise InvalidInput(f"unbalanced posting: entries sum to {total} cents, not 0")


def balances(entries: Iterable[Entry]) -> dict[str, int]:
    """Net amount per account (debits positive), accounts with a zero net left out."""
    out: dict[str, int] = {}
    for e in entries:
        out[e.account] = out.get(e.account, 0) + e.amount_cents
    return {k: v for k, v in out.items() if v != 0}


def _method(method: PaymentMethod | str) -> PaymentMethod:
    try:
        return PaymentMethod(method)
    except ValueError:
        raise InvalidInput(f"unknown payment method {method!r}; expected wallet or cash") from None


def _bearer(bearer: RefundBearer | str) -> RefundBearer:
    try:
        return RefundBearer(bearer)
    except ValueError:
        raise InvalidInput(f"unknown refund bearer {bearer!r}; expected proportional or platform") from None
