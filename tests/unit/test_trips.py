"""The trip state machine and the cancellation-fee rules."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatch.errors import ConfigError, IllegalTransition, InvalidInput
from dispatch.trips import (
    FINAL_STATUSES,
    ActorRole,
    CancellationPolicy,
    FeeReason,
    RideStatus,
    TripEvent,
    allowed_events,
    next_status,
)

S, E, R = RideStatus, TripEvent, ActorRole

# The specification, written out independently of dispatch.trips.TRANSITIONS:
# (status, event, role) -> next status. Every combination not listed must be refused.
LEGAL: dict[tuple[RideStatus, TripEvent, ActorRole], RideStatus] = {
    (S.REQUESTED, E.OFFER, R.SYSTEM): S.OFFERED,
    (S.REQUESTED, E.EXPIRE, R.SYSTEM): S.EXPIRED,
    (S.REQUESTED, E.CANCEL, R.RIDER): S.CANCELLED,
    (S.REQUESTED, E.CANCEL, R.SUPPORT): S.CANCELLED,
    (S.OFFERED, E.OFFER_DECLINED, R.DRIVER): S.REQUESTED,
    (S.OFFERED, E.OFFER_EXPIRED, R.SYSTEM): S.REQUESTED,
    (S.OFFERED, E.ACCEPT, R.DRIVER): S.ACCEPTED,
    (S.OFFERED, E.EXPIRE, R.SYSTEM): S.EXPIRED,
    (S.OFFERED, E.CANCEL, R.RIDER): S.CANCELLED,
    (S.OFFERED, E.CANCEL, R.SUPPORT): S.CANCELLED,
    (S.ACCEPTED, E.ARRIVE, R.DRIVER): S.ARRIVED,
    (S.ACCEPTED, E.CANCEL, R.RIDER): S.CANCELLED,
    (S.ACCEPTED, E.CANCEL, R.DRIVER): S.CANCELLED,
    (S.ACCEPTED, E.CANCEL, R.SUPPORT): S.CANCELLED,
    (S.ARRIVED, E.START, R.DRIVER): S.IN_PROGRESS,
    (S.ARRIVED, E.CANCEL, R.RIDER): S.CANCELLED,
    (S.ARRIVED, E.CANCEL, R.DRIVER): S.CANCELLED,
    (S.ARRIVED, E.CANCEL, R.SUPPORT): S.CANCELLED,
    (S.IN_PROGRESS, E.COMPLETE, R.DRIVER): S.COMPLETED,
    (S.IN_PROGRESS, E.CANCEL, R.SUPPORT): S.CANCELLED,
    # The server ends a trip whose driver was lost (api/services/trips.py: end_orphans).
    (S.ACCEPTED, E.CANCEL, R.SYSTEM): S.CANCELLED,
    (S.ARRIVED, E.CANCEL, R.SYSTEM): S.CANCELLED,
    (S.IN_PROGRESS, E.CANCEL, R.SYSTEM): S.CANCELLED,
}
ALL = list(itertools.product(RideStatus, TripEvent, ActorRole))
ILLEGAL = [c for c in ALL if c not in LEGAL]


def test_the_spec_covers_a_real_share_of_the_space():
    assert len(ALL) == 8 * 9 * 4
    assert len(LEGAL) == 23 and len(ILLEGAL) == 288 - 23


@pytest.mark.parametrize(("status", "event", "role"), list(LEGAL), ids=lambda v: str(v))
def test_every_legal_transition(status, event, role):
    assert next_status(status, event, role) is LEGAL[(status, event, role)]
    # String values work the same (what the edge and storage pass).
    assert next_status(status.value, event.value, role.value) is LEGAL[(status, event, role)]


@pytest.mark.parametrize(("status", "event", "role"), ILLEGAL, ids=lambda v: str(v))
def test_every_illegal_transition_raises(status, event, role):
    with pytest.raises(IllegalTransition) as info:
        next_status(status, event, role)
    assert info.value.detail == {"status": status.value, "event": event.value, "role": role.value}
    assert info.value.code == "illegal_transition"
    assert status.value in info.value.message


def test_final_statuses_have_no_way_out():
    assert {S.COMPLETED, S.CANCELLED, S.EXPIRED} == FINAL_STATUSES
    for status in FINAL_STATUSES:
        assert status.is_final
        for role in ActorRole:
            assert allowed_events(status, role) == frozenset()
        with pytest.raises(IllegalTransition, match="already"):
            next_status(status, E.CANCEL, R.SUPPORT)


def test_messages_say_who_may_do_it():
    with pytest.raises(
        IllegalTransition, match=r"a rider cannot cancel a ride that is in_progress \(only: support, system\)"
    ):
        next_status(S.IN_PROGRESS, E.CANCEL, R.RIDER)
    with pytest.raises(IllegalTransition, match="a driver cannot cancel a ride that is requested"):
        next_status(S.REQUESTED, E.CANCEL, R.DRIVER)
    with pytest.raises(
        IllegalTransition, match=r"cannot start a ride that is accepted \(allowed: arrive, cancel\)"
    ):
        next_status(S.ACCEPTED, E.START, R.DRIVER)


def test_allowed_events_match_the_spec():
    for status, role in itertools.product(RideStatus, ActorRole):
        expected = {e for (s, e, r) in LEGAL if s == status and r == role}
        assert allowed_events(status, role) == expected


@pytest.mark.parametrize(
    "bad",
    [("flying", "offer", "system"), ("requested", "teleport", "system"), ("requested", "offer", "robot")],
)
def test_unknown_names_are_invalid_input_not_illegal_transitions(bad):
    with pytest.raises(InvalidInput):
        next_status(*bad)


def test_the_happy_path_walks_to_completed():
    status = S.REQUESTED
    for event, role in [
        (E.OFFER, R.SYSTEM),
        (E.OFFER_DECLINED, R.DRIVER),
        (E.OFFER, R.SYSTEM),
        (E.OFFER_EXPIRED, R.SYSTEM),
        (E.OFFER, R.SYSTEM),
        (E.ACCEPT, R.DRIVER),
        (E.ARRIVE, R.DRIVER),
        (E.START, R.DRIVER),
        (E.COMPLETE, R.DRIVER),
    ]:
        status = next_status(status, event, role)
    assert status is S.COMPLETED


# --- cancellation fees --------------------------------------------------------------

POLICY = CancellationPolicy(free_cancel_window_s=120.0, driver_late_grace_s=300.0)
FEE = 500
T0 = 1_000_000.0


@pytest.mark.parametrize("status", [S.REQUESTED, S.OFFERED])
def test_rider_cancels_before_acceptance_for_free(status):
    d = POLICY.fee(status, R.RIDER, T0 + 9999, FEE)
    assert (d.charged, d.fee_cents, d.reason) == (False, 0, FeeReason.BEFORE_ACCEPT)


def test_rider_free_window_after_acceptance_is_inclusive_then_charged():
    inside = POLICY.fee(S.ACCEPTED, R.RIDER, T0 + 120.0, FEE, accepted_at=T0)
    assert (inside.charged, inside.fee_cents, inside.reason) == (False, 0, FeeReason.WITHIN_FREE_WINDOW)
    past = POLICY.fee(S.ACCEPTED, R.RIDER, T0 + 120.001, FEE, accepted_at=T0)
    assert (past.charged, past.fee_cents, past.reason) == (True, FEE, FeeReason.AFTER_FREE_WINDOW)


def test_rider_pays_after_the_driver_arrived_even_inside_the_window():
    d = POLICY.fee(S.ARRIVED, R.RIDER, T0 + 30, FEE, accepted_at=T0, arrived_at=T0 + 20)
    assert (d.charged, d.fee_cents, d.reason) == (True, FEE, FeeReason.AFTER_ARRIVAL)


def test_a_late_driver_makes_cancelling_free():
    promised = T0 + 240
    late = POLICY.fee(S.ACCEPTED, R.RIDER, promised + 301, FEE, accepted_at=T0, promised_pickup_at=promised)
    assert (late.charged, late.reason) == (False, FeeReason.DRIVER_LATE)
    on_time = POLICY.fee(
        S.ACCEPTED, R.RIDER, promised + 299, FEE, accepted_at=T0, promised_pickup_at=promised
    )
    assert (on_time.charged, on_time.reason) == (True, FeeReason.AFTER_FREE_WINDOW)


@given(
    status=st.sampled_from([S.ACCEPTED, S.ARRIVED]),
    since_accept=st.floats(0, 10_000),
    fee=st.integers(0, 10_000),
)
def test_driver_cancellation_never_charges_the_rider(status, since_accept, fee):
    now = T0 + since_accept
    d = POLICY.fee(status, R.DRIVER, now, fee, accepted_at=T0, arrived_at=T0 + since_accept / 2)
    assert (d.charged, d.fee_cents, d.reason) == (False, 0, FeeReason.CANCELLED_BY_DRIVER)


def test_support_cancels_a_trip_in_progress_without_a_fee():
    d = POLICY.fee(S.IN_PROGRESS, R.SUPPORT, T0 + 600, FEE, accepted_at=T0, arrived_at=T0 + 60)
    assert (d.charged, d.reason) == (False, FeeReason.CANCELLED_BY_SUPPORT)


@pytest.mark.parametrize(
    ("status", "role"),
    [(S.IN_PROGRESS, R.RIDER), (S.IN_PROGRESS, R.DRIVER), (S.REQUESTED, R.DRIVER), (S.COMPLETED, R.RIDER)],
)
def test_no_fee_is_computed_for_an_impossible_cancellation(status, role):
    with pytest.raises(IllegalTransition):
        POLICY.fee(status, role, T0, FEE, accepted_at=T0 - 10, arrived_at=T0 - 5)


def test_zero_fee_is_never_charged():
    d = POLICY.fee(S.ARRIVED, R.RIDER, T0 + 30, 0, accepted_at=T0, arrived_at=T0 + 20)
    assert (d.charged, d.fee_cents) == (False, 0)


@pytest.mark.parametrize(
    ("status", "kw"),
    [
        (S.ACCEPTED, {}),  # no accepted_at
        (S.ACCEPTED, {"accepted_at": T0 + 10}),  # accepted in the future
        (S.ARRIVED, {"accepted_at": T0 - 10}),  # no arrived_at
        (S.ARRIVED, {"accepted_at": T0 - 10, "arrived_at": T0 - 20}),  # arrived before accepted
    ],
)
def test_inconsistent_timestamps_are_refused(status, kw):
    with pytest.raises(InvalidInput):
        POLICY.fee(status, R.RIDER, T0, FEE, **kw)


def test_policy_from_section():
    assert CancellationPolicy.from_section({"free_cancel_window_s": 60}).free_cancel_window_s == 60.0
    with pytest.raises(ConfigError):
        CancellationPolicy.from_section({"free_cancel_window": 60})
    with pytest.raises(ConfigError):
        CancellationPolicy(free_cancel_window_s=-1)
