"""The shard's ride side with a fake clock: offers, reservations, answers, trips, handoff."""

import numpy as np
import pytest

from dispatch.dispatcher import Dispatcher, DriverStatusChange, Notify, Record, Reserve
from dispatch.drivers import DriverStatus, location_rows
from dispatch.errors import OfferUnavailable
from dispatch.rides import MatchingConfig, RideRequest
from dispatch.shard import TripLink
from tests.helpers import point_inside
from tests.unit.core_helpers import NOW, make_shards, push_halo, region_and_map, route, settle


def _point_in(shard_id, frac=0.5):
    return point_inside(region_and_map()[1], shard_id, frac)


def _request(ride_id, lat, lng, now=NOW, vclass=0):
    return RideRequest(ride_id, f"rider-{ride_id}", lat, lng, lat + 0.01, lng + 0.01, vclass, now)


def _place(shards, driver_ids, lats, lngs, now=NOW):
    route(shards, location_rows(np.asarray(driver_ids), np.asarray(lats), np.asarray(lngs), now - 0.5), now)
    settle(shards)
    push_halo(shards, now)


def test_a_request_is_offered_to_the_nearest_own_driver():
    shards = make_shards()
    lat, lng = _point_in(0)
    _place(shards, [1, 2], [lat + 0.002, lat + 0.0005], [lng, lng])
    d = Dispatcher(shards[0])
    d.add_ride(_request("r1", lat, lng), NOW)
    effects = d.tick(NOW)
    offers = [e for e in effects if isinstance(e, Notify) and e.message["type"] == "offer"]
    assert [o.id for o in offers] == [2]
    assert offers[0].message["vehicle_class"] == "standard"  # the name, as docs/protocol.md shows
    assert any(isinstance(e, Record) and e.event == "offered" for e in effects)
    assert shards[0].own.status[shards[0].own.id_to_slot[2]] == DriverStatus.OFFERED
    # The offered driver is not offered a second ride.
    d.add_ride(_request("r2", lat, lng), NOW)
    offers2 = [e for e in d.tick(NOW + 0.3) if isinstance(e, Notify) and e.message["type"] == "offer"]
    assert [o.id for o in offers2] == [1]


def test_batch_matching_beats_greedy_on_the_classic_crossing():
    """Two requests, two drivers: greedy gives the first request the driver the second needs."""
    shards = make_shards()
    lat, lng = _point_in(0)
    # Request A at x=0, request B at x=+1000 m; driver 1 at +400 m, driver 2 at -500 m.
    dlng = 1 / (111_320 * np.cos(np.radians(lat)))
    _place(shards, [1, 2], [lat, lat], [lng + 400 * dlng, lng - 500 * dlng])
    results = {}
    for policy in ("greedy", "batch"):
        s = make_shards()
        _place(s, [1, 2], [lat, lat], [lng + 400 * dlng, lng - 500 * dlng])
        d = Dispatcher(s[0], MatchingConfig(policy=policy))
        d.add_ride(_request("A", lat, lng, NOW - 1), NOW)
        d.add_ride(_request("B", lat, lng + 1000 * dlng, NOW - 0.5), NOW)
        offers = {
            e.message["ride_id"]: e.id
            for e in d.tick(NOW)
            if isinstance(e, Notify) and e.audience == "driver"
        }
        results[policy] = offers
    assert results["greedy"] == {"A": 1, "B": 2}  # A grabs the nearer driver; B waits 1500 m
    assert results["batch"] == {"A": 2, "B": 1}  # 500 + 600 m instead of 400 + 1500 m


def test_a_halo_driver_is_reserved_with_its_owner_before_the_offer():
    shards = make_shards()
    _, smap = region_and_map()
    # A request in shard 0 right at a border; the only driver just across it.
    r = smap.raster
    iy, ix = np.nonzero((r[:, :-1] == 0) & (r[:, 1:] > 0))
    i = len(iy) // 2
    lat = smap.south + (iy[i] + 0.5) * smap.dlat
    lng = smap.west + (ix[i] + 0.5) * smap.dlng
    dlat, dlng = lat, smap.west + (ix[i] + 1.5) * smap.dlng
    owner = int(smap.shard_for_point(dlat, dlng))
    assert owner != 0
    _place(shards, [7], [dlat], [dlng])
    d = Dispatcher(shards[0])
    d.add_ride(_request("r1", lat, lng), NOW)
    effects = d.tick(NOW)
    reserve = [e for e in effects if isinstance(e, Reserve)]
    assert reserve == [Reserve(owner, 7, "r1", reserve[0].pickup_eta_s)]
    assert not any(isinstance(e, Notify) and e.audience == "driver" for e in effects)
    # The owner reserves it; then the ride shard offers.
    assert shards[owner].reserve(7, NOW) is True
    assert shards[owner].reserve(7, NOW) is False  # never twice
    effects = d.reserved("r1", 7, True, NOW)
    assert [e.id for e in effects if isinstance(e, Notify) and e.audience == "driver"] == [7]
    # Accepting puts the driver on a trip in the shard that holds it.
    offer_id = d.book.offer_of_ride("r1").offer_id
    acc, effects, eta = d.accept(offer_id, 7, NOW + 1)
    assert acc.ride_id == "r1"
    assert eta == reserve[0].pickup_eta_s  # the ETA the offer was made with, for the rider
    change = [e for e in effects if isinstance(e, DriverStatusChange)]
    assert change and change[0].status == DriverStatus.ON_TRIP and change[0].trip.ride_id == "r1"


def test_decline_requeues_without_that_driver_and_expiry_frees_it():
    shards = make_shards()
    lat, lng = _point_in(0)
    _place(shards, [1, 2], [lat + 0.001, lat + 0.003], [lng, lng])
    d = Dispatcher(shards[0])
    d.add_ride(_request("r1", lat, lng), NOW)
    d.tick(NOW)
    offer = d.book.offer_of_ride("r1")
    assert offer.driver_id == 1
    effects = d.decline(offer.offer_id, 1, NOW + 1)
    assert shards[0].own.status[shards[0].own.id_to_slot[1]] == DriverStatus.AVAILABLE
    # The rider, told "offered" before, hears that the search goes on.
    told = [e.message for e in effects if isinstance(e, Notify) and e.audience == "rider"]
    assert told == [
        {"type": "ride_status", "ride_id": "r1", "status": "requested", "reason": "offer_declined"}
    ]
    d.tick(NOW + 1.5)
    offer2 = d.book.offer_of_ride("r1")
    assert offer2.driver_id == 2
    # Driver 2 says nothing: after the timeout it is free and the ride goes back.
    timeout = d.config.offer_timeout_s
    effects = d.tick(NOW + 1.5 + timeout + 0.1)
    assert any(isinstance(e, Record) and e.event == "offer_expired" for e in effects)
    assert any(
        isinstance(e, Notify) and e.audience == "rider" and e.message["reason"] == "offer_expired"
        for e in effects
    )
    with pytest.raises(OfferUnavailable):
        d.accept(offer2.offer_id, 2, NOW + 2 + timeout)


def _trip_in_shard_0(ride_id: str, driver_id: int):
    """Shards, shard 0's dispatcher and the pickup: ``driver_id`` accepted ``ride_id`` at
    NOW + 1 and moved at NOW + 2."""
    shards = make_shards()
    lat, lng = _point_in(0, 0.9)
    _place(shards, [driver_id], [lat + 0.001], [lng])
    d = Dispatcher(shards[0])
    d.add_ride(_request(ride_id, lat, lng), NOW)
    d.tick(NOW)
    d.accept(d.book.offer_of_ride(ride_id).offer_id, driver_id, NOW + 1)
    _place(shards, [driver_id], [lat + 0.0015], [lng], now=NOW + 2)
    return shards, d, lat, lng


def test_the_rider_follows_the_driver_and_the_trip_survives_a_handoff():
    shards, d, _, _ = _trip_in_shard_0("r9", 5)
    pos = shards[0].trip_positions(NOW + 2)
    assert [(p["rider_id"], p["driver_id"]) for p in pos] == [("rider-r9", 5)]
    assert shards[0].trip_positions(NOW + 2) == []  # nothing new since
    # The driver drives into shard 3: its trip link goes with it.
    tlat, tlng = _point_in(3)
    _place(shards, [5], [tlat], [tlng], now=NOW + 3)
    assert 5 in shards[3].trips and shards[3].trips[5].ride_id == "r9"
    assert shards[3].own.status[shards[3].own.id_to_slot[5]] == DriverStatus.ON_TRIP
    assert [p["rider_id"] for p in shards[3].trip_positions(NOW + 3)] == ["rider-r9"]
    # Completion at the ride's shard frees it wherever it is.
    effects = d.trip_ended(5)
    assert effects == [DriverStatusChange(5, DriverStatus.AVAILABLE, None)]
    assert shards[3].set_status(5, DriverStatus.AVAILABLE) and 5 not in shards[3].trips


def test_a_trip_nobody_watches_is_muted_until_its_mute_ends():
    shards, d, lat, lng = _trip_in_shard_0("r7", 6)
    assert [p["driver_id"] for p in shards[0].trip_positions(NOW + 2)] == [6]
    shards[0].mute_trip_positions([6, 999], until=NOW + 5)  # 999 drives no trip: ignored
    _place(shards, [6], [lat + 0.002], [lng], now=NOW + 3)
    assert shards[0].trip_positions(NOW + 3) == []  # moved, but muted
    assert [p["driver_id"] for p in shards[0].trip_positions(NOW + 5)] == [6]  # the mute ended
    assert 999 not in shards[0]._trip_muted
    d.trip_ended(6)
    assert 6 not in shards[0]._trip_muted


def test_a_ride_nobody_takes_expires_and_the_rider_is_told():
    shards = make_shards()
    lat, lng = _point_in(1)
    d = Dispatcher(shards[1])
    d.add_ride(_request("lonely", lat, lng), NOW)
    assert d.tick(NOW) == []
    effects = d.tick(NOW + d.config.max_wait_s + 1)
    assert any(isinstance(e, Record) and e.event == "expired" for e in effects)
    assert any(isinstance(e, Notify) and e.message.get("status") == "expired" for e in effects)
    assert "lonely" not in d.book


def test_a_rider_cancelling_during_an_offer_frees_and_tells_the_driver():
    shards = make_shards()
    lat, lng = _point_in(2)
    _place(shards, [3], [lat + 0.001], [lng])
    d = Dispatcher(shards[2])
    d.add_ride(_request("rc", lat, lng), NOW)
    d.tick(NOW)
    offer = d.book.offer_of_ride("rc")
    assert offer.driver_id == 3
    effects = d.cancel_ride("rc", NOW + 1)
    assert shards[2].own.status[shards[2].own.id_to_slot[3]] == DriverStatus.AVAILABLE
    told = [e for e in effects if isinstance(e, Notify) and e.audience == "driver"]
    assert told and told[0].message == {
        "type": "offer_withdrawn",
        "offer_id": offer.offer_id,
        "ride_id": "rc",
        "reason": "rider_cancelled",
    }
    assert any(isinstance(e, Record) and e.event == "cancelled" for e in effects)
    with pytest.raises(OfferUnavailable):
        d.accept(offer.offer_id, 3, NOW + 2)


def test_a_stale_reservation_answer_gives_the_driver_back():
    shards = make_shards()
    d = Dispatcher(shards[0])
    # No ride is waiting on driver 9 here: a late "yes" must be undone at its owner.
    assert d.reserved("gone", 9, True, NOW) == [DriverStatusChange(9, DriverStatus.AVAILABLE)]
    assert d.reserved("gone", 9, False, NOW) == []


def test_a_driver_who_went_offline_on_a_trip_is_offline_when_it_ends():
    from dispatch.drivers import Intent

    shards = make_shards()
    lat, lng = _point_in(0)
    _place(shards, [11, 12], [lat + 0.001, lat + 0.002], [lng, lng])
    d = Dispatcher(shards[0])
    d.add_ride(_request("r-off", lat, lng), NOW)
    d.tick(NOW)
    d.accept(d.book.offer_of_ride("r-off").offer_id, 11, NOW + 1)
    # The app goes offline mid-trip: the trip goes on ...
    route(shards, location_rows([11], [lat + 0.001], [lng], NOW + 2, intent=Intent.OFFLINE), NOW + 2)
    own = shards[0].own
    assert own.status[own.id_to_slot[11]] == DriverStatus.ON_TRIP
    # ... and when it ends, the driver is offline, not offered the next ride.
    d.trip_ended(11)
    assert own.status[own.id_to_slot[11]] == DriverStatus.OFFLINE
    d.add_ride(_request("r-next", lat, lng), NOW + 3)
    d.tick(NOW + 3)
    assert d.book.offer_of_ride("r-next").driver_id == 12
    # Back online: available again.
    route(shards, location_rows([11], [lat + 0.001], [lng], NOW + 4, intent=Intent.ONLINE), NOW + 4)
    assert own.status[own.id_to_slot[11]] == DriverStatus.AVAILABLE


def test_live_ids_follow_a_ride_from_the_queue_to_the_trip_and_the_trip_across_a_border():
    shards = make_shards()
    lat, lng = _point_in(0, 0.9)
    _place(shards, [21, 22], [lat + 0.001, lat + 0.004], [lng, lng])
    ds = [Dispatcher(s) for s in shards]

    def live(now):
        return [d.live_ids(now) for d in ds]

    ds[0].add_ride(_request("r-live", lat, lng), NOW)
    assert live(NOW)[0].requests == ("r-live",) and live(NOW)[0].trips == ()
    assert set(live(NOW)[0].available) == {21, 22}
    ds[0].tick(NOW)
    now0 = live(NOW)[0]
    assert now0.requests == ("r-live",) and now0.offered == (21,) and now0.available == (22,)
    ds[0].accept(ds[0].book.offer_of_ride("r-live").offer_id, 21, NOW + 1)
    now0 = live(NOW + 1)[0]
    assert (now0.requests, now0.trips, now0.offered, now0.available) == ((), ("r-live",), (), (22,))
    # The driver drives into shard 3: the trip is live there now, and only there.
    tlat, tlng = _point_in(3)
    _place(shards, [21], [tlat], [tlng], now=NOW + 3)
    every = live(NOW + 3)
    assert [lv.trips for lv in every] == [(), (), (), ("r-live",)]
    # A driver is available in the one shard that holds it, never through a halo copy.
    assert 22 in shards[1].halo.id_to_slot
    assert [k for k, lv in enumerate(every) if 22 in lv.available] == [0]
    # Silent past stale_after_s: no longer available anywhere.
    assert 22 not in live(NOW + shards[0].cfg.stale_after_s + 5)[0].available


def test_relink_puts_a_driver_that_lost_its_trip_back_on_it_and_leaves_newer_news_alone():
    shards = make_shards()
    lat, lng = _point_in(0)
    _place(shards, [31, 32, 33, 34], [lat + 0.001 * i for i in range(1, 5)], [lng] * 4)
    d = Dispatcher(shards[0])
    own = shards[0].own

    def status(i):
        return DriverStatus(int(own.status[own.id_to_slot[i]]))

    def trip(driver_id, ride_id):
        return {"driver_id": driver_id, "ride_id": ride_id, "rider_id": f"rider-{ride_id}", "ride_shard": 2}

    # 31 lost its link (it looks free); 32 was freed here after the trips were read (its
    # trip ended meanwhile); 33 holds an offer; 34 is on another ride here, newer.
    d.note_freed(32, NOW + 1)
    d.add_ride(_request("r-offer", lat + 0.003, lng), NOW)
    d.tick(NOW)
    assert d.book.offer_of_ride("r-offer").driver_id == 33
    d.add_ride(_request("r-new", lat + 0.004, lng), NOW)
    d.tick(NOW + 0.3)
    d.accept(d.book.offer_of_ride("r-new").offer_id, 34, NOW + 0.5)
    trips = [trip(i, f"ride-{i}") for i in (31, 32, 33, 34)]
    assert d.relink(trips, read_at=NOW, now=NOW + 2) == 1
    assert status(31) == DriverStatus.ON_TRIP and shards[0].trips[31].ride_id == "ride-31"
    assert status(32) == DriverStatus.AVAILABLE and 32 not in shards[0].trips
    assert status(33) == DriverStatus.OFFERED
    assert shards[0].trips[34].ride_id == "r-new"
    assert d.relink(trips, read_at=NOW, now=NOW + 3) == 0  # nothing left to repair
    # A link kept with the driver marked free (a half-applied handoff) gets its status back.
    own.status[own.id_to_slot[31]] = DriverStatus.AVAILABLE
    assert d.relink(trips, read_at=NOW + 3, now=NOW + 4) == 1 and status(31) == DriverStatus.ON_TRIP
    # A shard waiting for its stored state repairs nothing (the restore brings the trips).
    waiting = Dispatcher(shards[1], await_restore=True)
    assert waiting.relink(trips, read_at=NOW, now=NOW + 2) == 0


def test_end_trips_frees_the_drivers_of_ended_rides_and_leaves_other_trips_alone():
    shards = make_shards()
    lat, lng = _point_in(0)
    _place(shards, [41, 42, 43], [lat + 0.001 * i for i in range(1, 4)], [lng] * 3)
    d = Dispatcher(shards[0])
    own = shards[0].own

    def status(i):
        return DriverStatus(int(own.status[own.id_to_slot[i]]))

    for i, ride in ((41, "r-ended"), (42, "r-going")):
        d.add_ride(_request(ride, lat + 0.001 * (i - 40), lng), NOW)
    d.tick(NOW)
    for ride in ("r-ended", "r-going"):
        o = d.book.offer_of_ride(ride)
        d.accept(o.offer_id, o.driver_id, NOW + 0.5)
    on_ended = next(i for i, link in shards[0].trips.items() if link.ride_id == "r-ended")
    on_going = next(i for i, link in shards[0].trips.items() if link.ride_id == "r-going")
    # A link left by a driver this shard no longer holds is dropped too.
    shards[0].trips[99] = TripLink("r-gone", "rider-gone", 0)
    d.end_trips(["r-ended", "r-gone", "r-unknown"], NOW + 1)
    assert d.unlinked == 2
    assert status(on_ended) == DriverStatus.AVAILABLE and on_ended not in shards[0].trips
    assert status(on_going) == DriverStatus.ON_TRIP and shards[0].trips[on_going].ride_id == "r-going"
    assert 99 not in shards[0].trips
    # Once more changes nothing: the trip is already over here.
    assert d.end_trips(["r-ended"], NOW + 2) == [] and d.unlinked == 2
    # The freed driver can be offered a ride again.
    d.add_ride(_request("r-next", lat, lng), NOW + 3)
    d.tick(NOW + 3)
    assert d.book.offer_of_ride("r-next") is not None


def test_a_held_driver_named_by_an_open_offer_is_offered_whatever_a_claim_settled():
    """A claim settles with the releasing shard's status, and that shard knows nothing of
    this book's offers (one restored after a restart): the driver came back available
    while this shard's open offer names it. The next look (every tick and claim round)
    holds it as offered again, so it is not offered a second ride."""
    shards = make_shards()
    lat, lng = _point_in(0)
    _place(shards, [51, 52], [lat + 0.001, lat + 0.002], [lng, lng])
    d = Dispatcher(shards[0])
    own = shards[0].own
    d.add_ride(_request("r-held", lat + 0.001, lng), NOW)
    d.tick(NOW)
    offer = d.book.offer_of_ride("r-held")
    assert offer is not None and offer.driver_id == 51
    slot = own.id_to_slot[51]
    assert own.status[slot] == DriverStatus.OFFERED
    own.status[slot] = DriverStatus.AVAILABLE  # what a settled claim wrote
    d.add_ride(_request("r-next", lat + 0.001, lng), NOW + 0.2)
    d.tick(NOW + 0.2)
    assert own.status[slot] == DriverStatus.OFFERED and d.offers_reheld == 1
    assert d.book.offer_of_ride("r-next").driver_id == 52  # not 51 a second time
    # A driver whose claim is still pending is left to the claim.
    own.status[slot] = DriverStatus.AVAILABLE
    own.pending[slot] = True
    d.adopt_returning(NOW + 0.4)
    assert own.status[slot] == DriverStatus.AVAILABLE and d.offers_reheld == 1


def test_an_awaited_state_reaches_its_driver_once_held_and_never_past_its_time():
    """What a neighbour said of drivers not held here (offered by its restored offers) is
    applied when a driver appears here, confirmed; an entry past its time is not, whether
    the once-a-second sweep dropped it already or not."""
    from dispatch.dispatcher import RESTORED_STATE_TTL_S

    shards = make_shards()
    lat, lng = _point_in(0)
    d = Dispatcher(shards[0])
    own = shards[0].own
    assert d.offered_by_peers([62, 63, 64], NOW) == 3
    _place(shards, [62], [lat + 0.001], [lng], now=NOW + 1)
    d.adopt_returning(NOW + 1)
    assert own.status[own.id_to_slot[62]] == DriverStatus.OFFERED
    # 63 appears after its entry's time, between two sweeps: it stays available.
    late = NOW + RESTORED_STATE_TTL_S
    d.adopt_returning(late - 0.2)  # a sweep: nothing is past its time yet
    _place(shards, [63], [lat + 0.002], [lng], now=late + 0.5)
    d.adopt_returning(late + 0.5)
    assert own.status[own.id_to_slot[63]] == DriverStatus.AVAILABLE
    # 64 appears long after: the sweep dropped it; nothing is left awaited.
    _place(shards, [64], [lat + 0.003], [lng], now=late + 5)
    d.adopt_returning(late + 5)
    assert own.status[own.id_to_slot[64]] == DriverStatus.AVAILABLE
    assert d.offered_by_peers([], late + 5) == 0 and not d._awaited
