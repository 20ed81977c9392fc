"""The ride book: offers and timeouts against a fake clock."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatch.errors import (
    ConfigError,
    Conflict,
    DriverUnavailable,
    Forbidden,
    InvalidInput,
    InvalidLocation,
    NotFound,
    OfferUnavailable,
)
from dispatch.matching import MatchPolicy
from dispatch.region import load_region
from dispatch.rides import (
    MatchingConfig,
    OfferAccepted,
    OfferDeclined,
    OfferExpired,
    OfferWithdrawn,
    RideBook,
    RideCancelled,
    RideExpired,
    RideRecord,
    RideRequest,
)

T0 = 1_800_000_000.0
CFG = MatchingConfig()  # 15 s offers, 1500 m + 500 m per 10 s up to 3000 m, 180 s wait


def request(ride_id: str = "r1", at: float = T0, **kw) -> RideRequest:
    return RideRequest(
        ride_id=ride_id,
        rider_id=kw.pop("rider_id", f"rider-{ride_id}"),
        pickup_lat=37.78,
        pickup_lng=-122.41,
        dropoff_lat=37.76,
        dropoff_lng=-122.42,
        vehicle_class=0,
        requested_at=at,
        **kw,
    )


def book_with(*ride_ids: str, at: float = T0) -> RideBook:
    book = RideBook(CFG)
    for i, rid in enumerate(ride_ids):
        book.add(request(rid, at + i * 0.001), at + i * 0.001)
    return book


def due_ids(book: RideBook, now: float) -> list[str]:
    return [d.request.ride_id for d in book.due(now)]


# --- config and requests -------------------------------------------------------------


def test_config_defaults_are_the_documented_ones():
    assert (CFG.tick_s, CFG.offer_timeout_s, CFG.initial_radius_m, CFG.radius_step_m) == (0.25, 15, 1500, 500)
    assert (CFG.radius_step_every_s, CFG.max_radius_m, CFG.max_wait_s, CFG.pickup_speed_mps) == (
        10,
        3000,
        180,
        8,
    )
    assert CFG.policy is MatchPolicy.BATCH


def test_config_from_the_shipped_region_section():
    region = load_region()
    cfg = MatchingConfig.from_section(region.section("matching"), halo_m=region.index.halo_m)
    assert cfg.max_radius_m <= region.index.halo_m
    assert cfg.policy is MatchPolicy(region.section("matching")["policy"])
    with pytest.raises(ConfigError, match="halo"):
        MatchingConfig.from_section({"max_radius_m": 5000}, halo_m=3000)
    with pytest.raises(ConfigError, match="unknown"):
        MatchingConfig.from_section({"offer_timeout": 10})
    with pytest.raises(ConfigError):
        MatchingConfig(policy="auction")
    with pytest.raises(ConfigError):
        MatchingConfig(offer_timeout_s=0)
    with pytest.raises(ConfigError):
        MatchingConfig(initial_radius_m=4000)


@pytest.mark.parametrize(
    ("kw", "error"),
    [
        ({"pickup_lat": 95.0}, InvalidLocation),
        ({"dropoff_lng": float("nan")}, InvalidLocation),
        ({"ride_id": ""}, InvalidInput),
        ({"vehicle_class": -1}, InvalidInput),
        ({"max_wait_s": 0}, InvalidInput),
        ({"requested_at": float("inf")}, InvalidInput),
    ],
)
def test_bad_requests_are_refused(kw, error):
    with pytest.raises(error):
        dataclasses.replace(request(), **kw)


def test_numpy_vehicle_class_is_stored_as_int():
    import numpy as np

    req = dataclasses.replace(request(), vehicle_class=np.int8(2))
    assert type(req.vehicle_class) is int and req == dataclasses.replace(request(), vehicle_class=2)
    with pytest.raises(InvalidInput):
        dataclasses.replace(request(), vehicle_class=1.0)


def test_add_is_idempotent_for_the_same_request_and_refuses_a_different_one():
    book = book_with("r1")
    book.add(request("r1"), T0 + 1)
    assert len(book) == 1
    with pytest.raises(Conflict):
        book.add(request("r1", rider_id="someone-else"), T0 + 1)
    with pytest.raises(InvalidInput, match="future"):
        book.add(request("r2", at=T0 + 60), T0)
    assert len(book) == 1 and "r2" not in book


# --- due and the search radius ---------------------------------------------------------


def test_radius_widens_with_waiting_up_to_the_halo():
    book = book_with("r1")
    radii = {t: book.due(T0 + t)[0].search_radius_m for t in (0, 9.99, 10, 19.9, 20, 29, 30, 170)}
    assert radii == {0: 1500, 9.99: 1500, 10: 2000, 19.9: 2000, 20: 2500, 29: 2500, 30: 3000, 170: 3000}
    assert book.due(T0 - 3)[0].search_radius_m == 1500  # clock skew does not shrink it


def test_due_lists_waiting_requests_oldest_first():
    book = RideBook(CFG)
    book.add(request("late", at=T0 + 5), T0 + 5)
    book.add(request("early", at=T0), T0 + 5)
    assert due_ids(book, T0 + 6) == ["early", "late"]
    book.offer("early", 1, T0 + 6)
    assert due_ids(book, T0 + 6) == ["late"]


# --- offers ------------------------------------------------------------------------------


def test_one_open_offer_per_request():
    book = book_with("r1")
    offer = book.offer("r1", 7, T0 + 1)
    assert (offer.ride_id, offer.driver_id, offer.expires_at) == ("r1", 7, T0 + 16)
    with pytest.raises(Conflict, match="already has an open offer"):
        book.offer("r1", 8, T0 + 2)
    assert book.offer_of_ride("r1") == offer and book.offer_of_driver(8) is None


def test_one_open_offer_per_driver():
    book = book_with("r1", "r2")
    book.offer("r1", 7, T0 + 1)
    with pytest.raises(DriverUnavailable, match="already holds"):
        book.offer("r2", 7, T0 + 1)
    assert book.offer_of_ride("r2") is None
    assert book.offer("r2", 8, T0 + 1).driver_id == 8


def test_offer_of_unknown_ride_or_past_the_wait_limit():
    book = book_with("r1")
    with pytest.raises(NotFound):
        book.offer("nope", 7, T0)
    with pytest.raises(OfferUnavailable, match="waited past"):
        book.offer("r1", 7, T0 + 180)
    assert book.offer_of_driver(7) is None


def test_accept_is_atomic_and_exactly_once():
    book = book_with("r1")
    offer = book.offer("r1", 7, T0 + 1)
    effect = book.accept(offer.offer_id, 7, T0 + 5)
    assert effect == OfferAccepted("r1", "rider-r1", 7, offer.offer_id, T0 + 5, request("r1"))
    assert "r1" not in book and book.offer_of_driver(7) is None and book.open_offers() == []
    with pytest.raises(OfferUnavailable, match="already accepted"):
        book.accept(offer.offer_id, 7, T0 + 6)
    with pytest.raises(NotFound):
        book.cancel("r1", T0 + 7)  # past acceptance the trip owns it
    assert book.tick(T0 + 100) == []  # no timeout fires for an accepted offer


def test_only_the_offered_driver_may_accept_or_decline():
    book = book_with("r1")
    offer = book.offer("r1", 7, T0)
    with pytest.raises(Forbidden):
        book.accept(offer.offer_id, 8, T0 + 1)
    with pytest.raises(Forbidden):
        book.decline(offer.offer_id, 8, T0 + 1)
    assert book.offer_of_ride("r1") == offer  # nothing changed
    with pytest.raises(NotFound):
        book.accept("r1:99", 7, T0 + 1)


def test_accept_at_or_after_expiry_fails_and_the_tick_frees_the_driver():
    book = book_with("r1")
    offer = book.offer("r1", 7, T0)
    with pytest.raises(OfferUnavailable, match="expired"):
        book.accept(offer.offer_id, 7, offer.expires_at)
    assert book.offer_of_driver(7) == offer  # still reserved until the tick
    assert book.tick(offer.expires_at) == [OfferExpired("r1", 7, offer.offer_id)]
    assert book.offer_of_driver(7) is None
    with pytest.raises(OfferUnavailable, match="expired"):
        book.accept(offer.offer_id, 7, offer.expires_at + 1)


def test_accept_just_before_expiry_wins():
    book = book_with("r1")
    offer = book.offer("r1", 7, T0)
    assert isinstance(book.accept(offer.offer_id, 7, offer.expires_at - 0.001), OfferAccepted)


def test_accept_by_ride_id():
    book = book_with("r1")
    book.offer("r1", 7, T0)
    with pytest.raises(OfferUnavailable):
        book.accept_ride("r1", 8, T0 + 1)
    assert book.accept_ride("r1", 7, T0 + 1).driver_id == 7
    with pytest.raises(OfferUnavailable):
        book.accept_ride("r1", 7, T0 + 2)


def test_decline_requeues_without_that_driver():
    book = book_with("r1")
    first = book.offer("r1", 7, T0)
    assert book.decline(first.offer_id, 7, T0 + 2) == OfferDeclined("r1", 7, first.offer_id)
    (due,) = book.due(T0 + 2)
    assert due.request.ride_id == "r1" and due.excluded_driver_ids == {7}
    with pytest.raises(DriverUnavailable, match="declined"):
        book.offer("r1", 7, T0 + 3)
    second = book.offer("r1", 8, T0 + 3)
    assert second.offer_id != first.offer_id
    with pytest.raises(OfferUnavailable, match="declined"):
        book.decline(first.offer_id, 7, T0 + 4)
    # The driver that declined is free for other rides.
    book.add(request("r2", at=T0 + 4), T0 + 4)
    assert book.offer("r2", 7, T0 + 4).driver_id == 7


def test_timeout_requeues_without_that_driver_exactly_once():
    book = book_with("r1")
    offer = book.offer("r1", 7, T0)
    assert book.tick(T0 + 14.99) == []
    assert book.tick(T0 + 15) == [OfferExpired("r1", 7, offer.offer_id)]
    assert book.tick(T0 + 15.25) == []
    (due,) = book.due(T0 + 15.25)
    assert due.excluded_driver_ids == {7}
    book.offer("r1", 8, T0 + 16)
    book.tick(T0 + 31)
    assert book.excluded("r1") == {7, 8}


# --- expiry ------------------------------------------------------------------------------


def test_request_expires_at_its_wait_limit_and_the_rider_is_told():
    book = book_with("r1")
    assert book.tick(T0 + 179.9) == []
    assert due_ids(book, T0 + 179.9) == ["r1"]
    assert due_ids(book, T0 + 180) == []
    assert book.tick(T0 + 180) == [RideExpired("r1", "rider-r1", T0, T0 + 180)]
    assert "r1" not in book and book.tick(T0 + 181) == []


def test_per_request_wait_limit():
    book = RideBook(CFG)
    book.add(request("short", max_wait_s=30), T0)
    book.add(request("default"), T0)
    assert [e.ride_id for e in book.tick(T0 + 30)] == ["short"]
    assert [e.ride_id for e in book.tick(T0 + 180)] == ["default"]


def test_an_open_offer_runs_to_its_end_past_the_wait_limit():
    book = book_with("r1")
    offer = book.offer("r1", 7, T0 + 175)
    assert book.tick(T0 + 181) == []  # the driver may still accept
    assert book.tick(offer.expires_at) == [
        OfferExpired("r1", 7, offer.offer_id),
        RideExpired("r1", "rider-r1", T0, offer.expires_at),
    ]
    # And had the driver accepted in time, the ride would have been matched.
    book2 = book_with("r1")
    offer2 = book2.offer("r1", 7, T0 + 175)
    assert isinstance(book2.accept(offer2.offer_id, 7, T0 + 185), OfferAccepted)


def test_next_deadline():
    book = book_with("r1")
    assert book.next_deadline() == T0 + 180
    book.offer("r1", 7, T0 + 10)
    assert book.next_deadline() == T0 + 25
    assert RideBook(CFG).next_deadline() is None


# --- cancel at each stage ----------------------------------------------------------------


def test_cancel_a_queued_request():
    book = book_with("r1")
    assert book.cancel("r1", T0 + 5) == RideCancelled("r1", "rider-r1", None, None)
    assert "r1" not in book and book.due(T0 + 5) == [] and book.tick(T0 + 500) == []


def test_cancel_an_offered_request_frees_the_driver():
    book = book_with("r1", "r2")
    offer = book.offer("r1", 7, T0 + 1)
    assert book.cancel("r1", T0 + 2) == RideCancelled("r1", "rider-r1", 7, offer.offer_id)
    assert book.offer_of_driver(7) is None and book.open_offers() == []
    with pytest.raises(OfferUnavailable, match="rider cancelled"):
        book.accept(offer.offer_id, 7, T0 + 3)
    assert book.offer("r2", 7, T0 + 3).driver_id == 7
    assert book.tick(T0 + 17.9) == []  # no stray timeout of the withdrawn r1 offer (due T0 + 16)
    assert book.tick(T0 + 18) == [OfferExpired("r2", 7, "r2:1")]


def test_cancel_after_expiry_or_twice_is_not_found():
    book = book_with("r1")
    book.tick(T0 + 180)
    with pytest.raises(NotFound):
        book.cancel("r1", T0 + 181)
    book = book_with("r2")
    book.cancel("r2", T0)
    with pytest.raises(NotFound):
        book.cancel("r2", T0)


def test_withdraw_a_driver_that_went_offline():
    book = book_with("r1")
    offer = book.offer("r1", 7, T0)
    assert book.withdraw_driver(7, T0 + 1) == OfferWithdrawn("r1", 7, offer.offer_id)
    assert book.withdraw_driver(7, T0 + 1) is None
    (due,) = book.due(T0 + 1)
    assert due.excluded_driver_ids == frozenset()  # it did not refuse


# --- snapshot and restore ----------------------------------------------------------------


def test_snapshot_restore_round_trip_keeps_offers_exclusions_and_ids():
    book = book_with("r1", "r2", "r3")
    first = book.offer("r1", 7, T0 + 1)
    book.decline(first.offer_id, 7, T0 + 2)
    live = book.offer("r1", 8, T0 + 3)
    book.offer("r2", 9, T0 + 3)
    book.tick(T0 + 18.5)  # r2's offer to 9 timed out; r1's to 8 (expires T0 + 18) too
    live = book.offer("r1", 10, T0 + 19)
    snap = book.snapshot()
    restored = RideBook.restore(snap, CFG)
    assert restored.snapshot() == snap
    assert [r.request.ride_id for r in snap] == ["r1", "r2", "r3"]
    assert restored.excluded("r1") == {7, 8} and restored.excluded("r2") == {9}
    assert restored.offer_of_driver(10) == live
    assert due_ids(restored, T0 + 20) == due_ids(book, T0 + 20) == ["r2", "r3"]
    # The restored offer expires on the restored clock, and ids never repeat.
    assert restored.tick(live.expires_at) == [OfferExpired("r1", 10, live.offer_id)]
    assert restored.offer("r1", 11, T0 + 40).offer_id == "r1:4"


def test_restore_never_reuses_an_offer_id_even_with_a_lagging_counter():
    offer = book_with("r1").offer("r1", 7, T0)
    rec = RideRecord(request("r1"), attempts=0, offer=dataclasses.replace(offer, offer_id="r1:5"))
    book = RideBook.restore([rec], CFG)
    book.decline("r1:5", 7, T0 + 1)
    assert book.offer("r1", 8, T0 + 2).offer_id == "r1:6"


def test_restore_refuses_records_that_break_an_invariant():
    o1 = book_with("r1").offer("r1", 7, T0)
    o2 = book_with("r2").offer("r2", 7, T0)
    with pytest.raises(Conflict, match="two"):
        RideBook.restore([RideRecord(request("r1"), offer=o1), RideRecord(request("r2"), offer=o2)], CFG)
    with pytest.raises(Conflict, match="twice"):
        RideBook.restore([RideRecord(request("r1")), RideRecord(request("r1"))], CFG)
    with pytest.raises(Conflict, match="belongs"):
        RideBook.restore([RideRecord(request("r2"), offer=o1)], CFG)


# --- property: every reservation is freed exactly once ------------------------------------

ops = st.lists(
    st.tuples(
        st.sampled_from(["add", "offer", "accept", "decline", "tick", "cancel", "withdraw"]),
        st.integers(0, 5),  # ride index
        st.integers(0, 3),  # driver id
        st.floats(0, 8),  # time step
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops=ops)
def test_reservations_match_the_effects_under_any_sequence(ops):
    """Model the shard: a driver is reserved by an offer and freed by exactly one effect."""
    book = RideBook(dataclasses.replace(CFG, offer_timeout_s=5, max_wait_s=30))
    now = T0
    reserved: dict[int, str] = {}  # driver -> offer_id, as the shard would track it
    accepted: set[str] = set()
    for op, ri, driver, dt in ops:
        now += dt
        rid = f"r{ri}"
        try:
            if op == "add":
                if rid not in accepted:
                    book.add(request(rid, at=now), now)
            elif op == "offer":
                offer = book.offer(rid, driver, now)
                assert driver not in reserved
                reserved[driver] = offer.offer_id
            elif op in ("accept", "decline"):
                current = book.offer_of_ride(rid)
                if current is None:
                    continue
                if op == "accept":
                    eff = book.accept(current.offer_id, current.driver_id, now)
                    accepted.add(rid)
                else:
                    eff = book.decline(current.offer_id, current.driver_id, now)
                assert reserved.pop(eff.driver_id) == eff.offer_id
            elif op == "tick":
                for eff in book.tick(now):
                    if isinstance(eff, OfferExpired):
                        assert reserved.pop(eff.driver_id) == eff.offer_id
            elif op == "cancel":
                eff = book.cancel(rid, now)
                if eff.driver_id is not None:
                    assert reserved.pop(eff.driver_id) == eff.offer_id
            elif op == "withdraw":
                eff = book.withdraw_driver(driver, now)
                if eff is not None:
                    assert reserved.pop(eff.driver_id) == eff.offer_id
        except (NotFound, Conflict):
            pass  # refused operations must change nothing; the invariants below check it
        offers = book.open_offers()
        assert {o.driver_id: o.offer_id for o in offers} == reserved
        assert len({o.ride_id for o in offers}) == len(offers)
        for o in offers:
            assert book.offer_of_ride(o.ride_id) == o
        for d in book.due(now):
            assert book.offer_of_ride(d.request.ride_id) is None
            assert now < d.request.requested_at + 30


def test_a_ride_that_left_the_book_is_not_taken_back_by_a_late_handoff_or_a_stale_restore():
    book = RideBook(CFG)
    for ride_id in ("taken", "lapsed", "called-off"):
        book.add(request(ride_id), T0)
    offer = book.offer("taken", 7, T0 + 1)
    book.accept(offer.offer_id, 7, T0 + 2)
    book.cancel("called-off", T0 + 3)
    book.tick(T0 + CFG.max_wait_s + 1)
    assert len(book) == 0
    assert [book.gone(r) for r in ("taken", "lapsed", "called-off")] == ["accepted", "expired", "cancelled"]
    # An edge's handoff retry, or a state read before the accept: no-ops.
    now = T0 + CFG.max_wait_s + 2
    for ride_id in ("taken", "lapsed", "called-off"):
        book.add(request(ride_id, at=now), now)
        assert book.add_restored(RideRecord(request(ride_id, at=now))) is False
    assert len(book) == 0 and book.due(now) == []
    # An accept that could not be stored reopens its ride, once, with a fresh offer id.
    book.reopen(request("taken", at=now), now)
    assert book.gone("taken") is None and "taken" in book
    again = book.offer("taken", 8, now)
    assert again.offer_id != offer.offer_id
