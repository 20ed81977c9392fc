"""A restarted shard's dispatcher: stored trips and offers, declined drivers, undelivered offers."""

import pytest

from dispatch.dispatcher import Dispatcher, Notify, Record
from dispatch.drivers import DriverStatus
from dispatch.errors import InvalidInput
from dispatch.rides import offer_prefix, offer_shard
from tests.unit.core_helpers import NOW, make_shards
from tests.unit.test_dispatcher import _place, _point_in, _request


def _offers(effects):
    return [e for e in effects if isinstance(e, Notify) and e.message["type"] == "offer"]


def _status(shard, driver_id):
    return DriverStatus(shard.own.status[shard.own.id_to_slot[driver_id]])


def _ride(ride_id, lat, lng, **extra):
    r = _request(ride_id, lat, lng)
    return {
        "ride_id": r.ride_id,
        "rider_id": r.rider_id,
        "pickup_lat": r.pickup_lat,
        "pickup_lng": r.pickup_lng,
        "dropoff_lat": r.dropoff_lat,
        "dropoff_lng": r.dropoff_lng,
        "vehicle_class": 0,
        "requested_at": r.requested_at,
        **extra,
    }


def test_a_restarted_dispatcher_offers_nothing_until_restored():
    shards = make_shards()
    lat, lng = _point_in(0)
    _place(shards, [1], [lat + 0.001], [lng])
    d = Dispatcher(shards[0], incarnation="i2", await_restore=True)
    d.add_ride(_request("r1", lat, lng), NOW)
    assert _offers(d.tick(NOW)) == []
    d.restore_state({"rides": [], "trips": []}, NOW)
    offers = _offers(d.tick(NOW + 0.3))
    assert [o.id for o in offers] == [1]
    # The ride, then the shard that made the offer, its incarnation and the attempt.
    assert offers[0].message["offer_id"] == "r1:0.i2-1"


def test_a_driver_on_a_stored_trip_reappears_on_the_trip_and_is_not_offered():
    shards = make_shards()
    lat, lng = _point_in(0)
    d = Dispatcher(shards[0], incarnation="i2", await_restore=True)
    trip = {"driver_id": 7, "ride_id": "r-old", "rider_id": "rider-old", "ride_shard": 0}
    d.restore_state({"rides": [_ride("r1", lat, lng)], "trips": [trip]}, NOW)
    # The driver comes back with its next position, after the restore.
    _place(shards, [7, 8], [lat + 0.0005, lat + 0.004], [lng, lng], now=NOW + 1)
    offers = _offers(d.tick(NOW + 1))
    assert [o.id for o in offers] == [8]
    assert _status(shards[0], 7) == DriverStatus.ON_TRIP
    assert shards[0].trips[7].ride_id == "r-old"


def test_a_driver_back_before_the_restore_is_marked_on_its_trip_by_the_restore():
    shards = make_shards()
    lat, lng = _point_in(0)
    _place(shards, [7], [lat + 0.0005], [lng])
    d = Dispatcher(shards[0], await_restore=True)
    trip = {"driver_id": 7, "ride_id": "r-old", "rider_id": "rider-old", "ride_shard": 0}
    d.restore_state({"rides": [_ride("r1", lat, lng)], "trips": [trip]}, NOW)
    assert _offers(d.tick(NOW + 0.3)) == []
    assert _status(shards[0], 7) == DriverStatus.ON_TRIP


def test_declined_drivers_and_open_offers_survive_a_restart():
    shards = make_shards()
    lat, lng = _point_in(0)
    d = Dispatcher(shards[0], incarnation="i3", await_restore=True)
    offer = {"offer_id": "r2:i1-1", "driver_id": 9, "offered_at": NOW - 2, "expires_at": NOW + 13}
    d.restore_state(
        {"rides": [_ride("r1", lat, lng, excluded_driver_ids=[5]), _ride("r2", lat, lng, offer=offer)]},
        NOW,
    )
    _place(shards, [5, 9], [lat + 0.0003, lat + 0.0004], [lng, lng], now=NOW + 0.5)
    # Driver 5 declined r1 before the crash; driver 9 still holds r2's offer: r1 waits.
    assert _offers(d.tick(NOW + 0.5)) == []
    assert _status(shards[0], 9) == DriverStatus.OFFERED
    acc, _, _ = d.accept("r2:i1-1", 9, NOW + 1)
    assert acc.ride_id == "r2" and _status(shards[0], 9) == DriverStatus.ON_TRIP


def test_an_undelivered_offer_is_made_again_to_the_same_driver_once_the_bus_is_back():
    shards = make_shards()
    lat, lng = _point_in(0)
    _place(shards, [1], [lat + 0.001], [lng])
    d = Dispatcher(shards[0], incarnation="a")
    d.add_ride(_request("r1", lat, lng), NOW)
    first = _offers(d.tick(NOW))[0].message["offer_id"]
    effects = d.offer_undelivered(first, NOW + 1)
    assert any(isinstance(e, Record) and e.event == "offer_withdrawn" for e in effects)
    assert _status(shards[0], 1) == DriverStatus.AVAILABLE
    assert d.book.excluded("r1") == frozenset()
    # While the bus is down nothing is offered; after, the same driver gets a new offer.
    assert _offers(d.tick(NOW + 2)) == []
    d.bus_restored(NOW + 10)
    again = _offers(d.tick(NOW + 10))
    assert [o.id for o in again] == [1] and again[0].message["offer_id"] != first
    # An undelivered report of a closed offer changes nothing.
    assert d.offer_undelivered(first, NOW + 11) == []


def test_offer_ids_differ_across_incarnations():
    lat, lng = _point_in(0)
    ids = []
    for inc in ("x1", "x2"):
        shards = make_shards()
        _place(shards, [1], [lat + 0.001], [lng])
        d = Dispatcher(shards[0], incarnation=inc)
        d.add_ride(_request("r1", lat, lng), NOW)
        ids.append(_offers(d.tick(NOW))[0].message["offer_id"])
    assert ids[0] != ids[1] and all(i.rpartition(":")[0] == "r1" for i in ids)


def test_an_offer_id_names_its_ride_and_shard_and_nothing_else_passes_for_one():
    assert offer_prefix(3, "mk2x9ab") == "3.mk2x9ab-" and offer_prefix(3, "") == ""
    assert offer_shard("r1:3.mk2x9ab-12", "r1") == 3
    # Not this ride's, no shard in it, or not a shard number: no shard named.
    for offer_id in (
        "r2:3.mk2x9ab-1",
        "r1:12",
        "r1:mk2x9ab-1",
        "r1:x.y-1",
        "r1:-3.a-1",
        "3.a-1",
        "r1:9999999.a-1",
    ):
        assert offer_shard(offer_id, "r1") is None, offer_id
    for bad in ("a:b", "a.b"):
        with pytest.raises(InvalidInput):
            offer_prefix(0, bad)
