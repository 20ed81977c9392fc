"""Double-entry postings: every posting balances, whatever happens to a ride's money."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatch.errors import InvalidInput
from dispatch.ledger import (
    PLATFORM_COMMISSION,
    PLATFORM_FEES,
    PLATFORM_REFUNDS,
    Entry,
    Parties,
    PaymentMethod,
    RefundBearer,
    assert_balanced,
    balances,
    entries_for_cancellation_fee,
    entries_for_charge,
    entries_for_refund,
    split_fare,
)
from dispatch.pricing import FareRules, quote_fare

RULES = FareRules(commission_rate=0.25, booking_fee_cents=250, cancellation_fee_cents=500)
RIDE = Parties(ride_id="ride-1", rider_id="u1", driver_id=7)
FARE = quote_fare(RULES, 5000.0, 900.0, surge=1.5)  # total 2125: fare 1875 + booking fee 250


def as_dict(entries: list[Entry]) -> dict[str, int]:
    return {e.account: e.amount_cents for e in entries}


def test_wallet_charge_by_hand():
    entries = entries_for_charge(RIDE, FARE, RULES, PaymentMethod.WALLET)
    # Commission: 25 % of 1875 = 468.75 -> 469; the driver gets the rest, 1406.
    assert as_dict(entries) == {
        "rider:u1": 2125,
        "driver:7": -1406,
        PLATFORM_COMMISSION: -469,
        PLATFORM_FEES: -250,
    }
    split = split_fare(FARE, RULES)
    assert (split.driver_cents, split.commission_cents, split.fees_cents) == (1406, 469, 250)


def test_cash_charge_leaves_the_driver_owing_commission_and_fees():
    entries = entries_for_charge(RIDE, FARE, RULES, "cash")
    assert as_dict(entries) == {
        "cash:7": 2125,
        "driver:7": -1406,
        PLATFORM_COMMISSION: -469,
        PLATFORM_FEES: -250,
    }
    b = balances(entries)
    # Net position of the driver towards the platform: cash held minus earnings owed.
    assert b["cash:7"] + b["driver:7"] == 469 + 250
    assert "rider:u1" not in b


def test_zero_booking_fee_produces_no_zero_entry():
    rules = FareRules(booking_fee_cents=0, commission_rate=0.0)
    entries = entries_for_charge(RIDE, quote_fare(rules, 5000.0, 900.0), rules)
    assert all(e.amount_cents != 0 for e in entries)
    assert [e.account for e in entries] == ["rider:u1", "driver:7"]


def test_cancellation_fee_goes_to_the_driver_less_commission():
    entries = entries_for_cancellation_fee(RIDE, 500, RULES)
    assert as_dict(entries) == {"rider:u1": 500, "driver:7": -375, PLATFORM_COMMISSION: -125}
    with pytest.raises(InvalidInput):
        entries_for_cancellation_fee(RIDE, 0, RULES)


def test_full_refund_reverses_the_charge_exactly():
    charge = entries_for_charge(RIDE, FARE, RULES)
    refund = entries_for_refund(RIDE, charge, FARE.total_cents)
    assert balances(charge + refund) == {}


def test_partial_refund_is_proportional_to_the_cent():
    charge = entries_for_charge(RIDE, FARE, RULES)
    refund = entries_for_refund(RIDE, charge, 1000)
    got = as_dict(refund)
    assert got["rider:u1"] == -1000
    # 1000 x (1406, 469, 250) / 2125 = 661.6, 220.7, 117.6 -> 662, 221, 117 by largest remainder.
    assert (got["driver:7"], got[PLATFORM_COMMISSION], got[PLATFORM_FEES]) == (662, 221, 117)


def test_many_small_refunds_never_take_back_more_than_an_account_received():
    # Largest remainder on the original split alone would send every 1-cent refund to
    # the driver (the biggest share) and overdraw it; allocating over what each account
    # still holds keeps every account between 0 and what it received.
    charge = entries_for_charge(RIDE, FARE, RULES)
    refunds: list[list[Entry]] = []
    for _ in range(FARE.total_cents):
        refunds.append(entries_for_refund(RIDE, charge, 1, previous_refunds=refunds))
        net = balances(charge + [e for r in refunds for e in r])
        assert net.get("driver:7", 0) <= 0 and net.get(PLATFORM_COMMISSION, 0) <= 0
        assert net.get(PLATFORM_FEES, 0) <= 0
    assert balances(charge + [e for r in refunds for e in r]) == {}
    with pytest.raises(InvalidInput, match="exceeds"):
        entries_for_refund(RIDE, charge, 1, previous_refunds=refunds)


def test_platform_borne_refund_leaves_the_driver_whole():
    charge = entries_for_charge(RIDE, FARE, RULES)
    refund = entries_for_refund(RIDE, charge, 300, bearer=RefundBearer.PLATFORM)
    assert as_dict(refund) == {"rider:u1": -300, PLATFORM_REFUNDS: 300}


def test_cash_refund_goes_to_the_wallet():
    charge = entries_for_charge(RIDE, FARE, RULES, "cash")
    refund = entries_for_refund(RIDE, charge, FARE.total_cents)
    b = balances(charge + refund)
    assert b == {"cash:7": 2125, "rider:u1": -2125}  # the driver hands the cash over; the rider has credit


def test_refunds_cannot_exceed_the_charge():
    charge = entries_for_charge(RIDE, FARE, RULES)
    with pytest.raises(InvalidInput, match="exceeds"):
        entries_for_refund(RIDE, charge, FARE.total_cents + 1)
    first = entries_for_refund(RIDE, charge, 2000)
    with pytest.raises(InvalidInput, match="exceeds"):
        entries_for_refund(RIDE, charge, 200, previous_refunds=[first])
    assert entries_for_refund(RIDE, charge, 125, previous_refunds=[first])[0] == Entry("rider:u1", -125)
    with pytest.raises(InvalidInput):
        entries_for_refund(RIDE, charge, 0)
    with pytest.raises(InvalidInput, match="unbalanced"):
        entries_for_refund(RIDE, charge[:-1], 100)


def test_assert_balanced_and_entry_validation():
    assert_balanced([])
    assert_balanced([Entry("a:1", 5), Entry("b:2", -5)])
    with pytest.raises(InvalidInput, match="sum to 1"):
        assert_balanced([Entry("a:1", 5), Entry("b:2", -4)])
    with pytest.raises(InvalidInput):
        assert_balanced([("a:1", 0)])  # type: ignore[list-item]
    with pytest.raises(InvalidInput):
        Entry("a:1", 1.5)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput):
        Entry("nocolon", 1)
    with pytest.raises(InvalidInput):
        entries_for_charge(RIDE, FARE, RULES, "barter")
    with pytest.raises(InvalidInput, match="EUR"):
        entries_for_charge(RIDE, FARE, FareRules(currency="EUR"))


# --- property: any history of a ride's money stays balanced ---------------------------

rules_st = st.builds(
    FareRules,
    booking_fee_cents=st.integers(0, 500),
    commission_rate=st.floats(0.0, 0.5),
    minimum_cents=st.integers(0, 2000),
    per_km_cents=st.integers(0, 300),
    per_min_cents=st.integers(0, 100),
)
charge_st = st.tuples(
    st.just("charge"),
    st.floats(0, 50_000),
    st.floats(0, 7200),
    st.floats(1.0, 3.0),
    st.sampled_from(list(PaymentMethod)),
)
refund_st = st.tuples(st.just("refund"), st.integers(1, 10_000), st.sampled_from(list(RefundBearer)))
fee_st = st.tuples(st.just("fee"), st.integers(1, 2000))


@settings(max_examples=300, deadline=None)
@given(
    rules=rules_st,
    ops=st.lists(st.tuples(st.integers(0, 3), st.one_of(charge_st, refund_st, fee_st)), max_size=30),
)
def test_any_sequence_of_charges_refunds_and_fees_balances(rules, ops):
    ledger: list[Entry] = []
    charges: dict[int, list[Entry]] = {}  # ride -> its charge posting
    refunds: dict[int, list[list[Entry]]] = {}  # ride -> its refund postings
    expected_wallet: dict[str, int] = {}
    platform_refunds = 0
    for ride_no, op in ops:
        ride = Parties(f"ride-{ride_no}", f"u{ride_no % 2}", ride_no + 100)
        wallet = f"rider:{ride.rider_id}"
        if op[0] == "charge":
            if ride_no in charges:
                continue  # a ride is charged once
            fare = quote_fare(rules, op[1], op[2], op[3])
            posting = entries_for_charge(ride, fare, rules, op[4])
            split = split_fare(fare, rules)
            assert split.driver_cents + split.commission_cents + split.fees_cents == fare.total_cents
            assert split.driver_cents >= 0 and split.commission_cents >= 0
            charges[ride_no], refunds[ride_no] = posting, []
            if op[4] is PaymentMethod.WALLET:
                expected_wallet[wallet] = expected_wallet.get(wallet, 0) + fare.total_cents
        elif op[0] == "refund":
            if ride_no not in charges:
                continue
            charge, previous = charges[ride_no], refunds[ride_no]
            collected = sum(e.amount_cents for e in charge if e.amount_cents > 0)
            left = collected - sum(e.amount_cents for r in previous for e in r if e.amount_cents > 0)
            if op[1] > left:
                with pytest.raises(InvalidInput, match="exceeds"):
                    entries_for_refund(ride, charge, op[1], previous, op[2])
            amount = min(op[1], left)
            if amount <= 0:
                continue
            posting = entries_for_refund(ride, charge, amount, previous, op[2])
            previous.append(posting)
            expected_wallet[wallet] = expected_wallet.get(wallet, 0) - amount
            if op[2] is RefundBearer.PLATFORM:
                platform_refunds += amount
            # However the refunds came, no account the charge credited is overdrawn by them.
            net = balances(charge + [e for r in previous for e in r])
            assert all(e.amount_cents > 0 or net.get(e.account, 0) <= 0 for e in charge)
        else:
            posting = entries_for_cancellation_fee(ride, op[1], rules)
            expected_wallet[wallet] = expected_wallet.get(wallet, 0) + op[1]
        assert_balanced(posting)
        assert sum(e.amount_cents for e in posting) == 0
        assert all(isinstance(e.amount_cents, int) and e.amount_cents != 0 for e in posting)
        ledger += posting
    b = balances(ledger)
    assert sum(b.values()) == 0
    for wallet, amount in expected_wallet.items():
        assert b.get(wallet, 0) == amount
    assert b.get(PLATFORM_REFUNDS, 0) == platform_refunds
