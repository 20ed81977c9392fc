"""The trip odometer: metres a linked driver moved, glitches left out, carried across borders."""

import numpy as np
import pytest

from dispatch.drivers import DriverStatus, location_rows
from dispatch.geo import haversine_m
from dispatch.pricing import DEFAULT_DETOUR_FACTOR
from dispatch.shard import TripLink
from tests.unit.core_helpers import NOW, make_shards, region_and_map, route, settle

DRIVER = 501


def _border_crossing():
    """Two points 200 m apart on one street, in two different shards."""
    _, smap = region_and_map()
    lat = 37.77
    lngs = np.arange(-122.50, -122.38, 0.0005)
    owners = smap.shard_of(np.full(len(lngs), lat), lngs)
    k = int(np.flatnonzero(owners[1:] != owners[:-1])[0])
    return (lat, float(lngs[k] - 0.002)), (lat, float(lngs[k + 1] + 0.002))


def _send(shards, lat, lng, ts):
    route(shards, location_rows([DRIVER], [lat], [lng], ts, 0.0, 10.0), ts)


def _holder(shards):
    return next(
        s for s in shards if DRIVER in s.own.id_to_slot and not s.own.pending[s.own.id_to_slot[DRIVER]]
    )


def test_a_linked_driver_is_metered_point_to_point():
    shards = make_shards()
    _send(shards, 37.7793, -122.4193, NOW)
    settle(shards)
    shard = _holder(shards)
    # Before any ride, nothing is metered.
    _send(shards, 37.7795, -122.4193, NOW + 1)
    assert DRIVER not in shard.trip_m
    shard.set_status(DRIVER, DriverStatus.ON_TRIP, TripLink("ride-1", "r-1", shard.shard_id))
    path = [(37.7795 + 0.0003 * i, -122.4193) for i in range(1, 6)]
    for i, (lat, lng) in enumerate(path, start=2):
        _send(shards, lat, lng, NOW + i)
    expected = sum(
        float(haversine_m(a[0], a[1], b[0], b[1]))
        for a, b in zip([(37.7795, -122.4193), *path], path, strict=False)
    )
    assert shard.trip_m[DRIVER] == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(5 * 33.4, rel=0.01)
    # The trip ends: the odometer goes with the link.
    shard.set_status(DRIVER, DriverStatus.AVAILABLE)
    assert DRIVER not in shard.trip_m


def _linked():
    shards = make_shards()
    _send(shards, 37.7793, -122.4193, NOW)
    settle(shards)
    shard = _holder(shards)
    shard.set_status(DRIVER, DriverStatus.ON_TRIP, TripLink("ride-1", "r-1", shard.shard_id))
    return shards, shard


def test_a_glitch_faster_than_a_car_is_taken_back_when_the_driver_is_where_it_was():
    shards, shard = _linked()
    _send(shards, 37.7893, -122.4193, NOW + 1)  # 1.1 km in 1 s: a GPS glitch...
    assert shard.trip_m[DRIVER] == pytest.approx(1112 * DEFAULT_DETOUR_FACTOR, rel=0.01)
    _send(shards, 37.7796, -122.4193, NOW + 3)  # ... and back: 33 m from the last good fix
    assert shard.trip_m[DRIVER] == pytest.approx(33.4, rel=0.01)


def test_a_gap_faster_than_a_car_is_metered_at_the_route_estimate_never_at_nothing():
    shards, shard = _linked()
    _send(shards, 37.7893, -122.4193, NOW + 1)  # 1.1 km in 1 s: a gap (or a stuck clock)
    _send(shards, 37.7896, -122.4193, NOW + 3)  # 33 m in 2 s on from there: it was real
    assert shard.trip_m[DRIVER] == pytest.approx(1112 * DEFAULT_DETOUR_FACTOR + 33.4, rel=0.01)
    # A phone clock that stands still: the fixes, received 0.5 s apart, all say NOW + 3.
    for k in range(1, 4):
        got = NOW + 3 + 0.5 * k
        rows = location_rows([DRIVER], [37.7896 + 0.01 * k], [-122.4193], got, 0.0, 10.0, fix_dt=-0.5 * k)
        route(shards, rows, got)
    assert shard.trip_m[DRIVER] == pytest.approx((1112 * 4) * DEFAULT_DETOUR_FACTOR + 33.4, rel=0.01)


def test_the_odometer_travels_with_the_driver_across_a_border():
    shards = make_shards()
    a, b = _border_crossing()
    _send(shards, *a, NOW)
    settle(shards)
    first = _holder(shards)
    first.set_status(DRIVER, DriverStatus.ON_TRIP, TripLink("ride-1", "r-1", first.shard_id))
    _send(shards, *b, NOW + 10)
    settle(shards)
    second = _holder(shards)
    assert second is not first
    assert DRIVER not in first.trip_m and DRIVER not in first.trips
    # The move across the border was made while the old shard held the last position; the
    # new shard carries on from what the old one had metered.
    assert second.trips[DRIVER].ride_id == "ride-1"
    before = second.trip_m[DRIVER]
    _send(shards, b[0] + 0.0003, b[1], NOW + 11)
    assert second.trip_m[DRIVER] == pytest.approx(before + 33.4, rel=0.01)


@pytest.mark.parametrize("trips", [1, 5])
def test_only_the_linked_drivers_in_a_batch_are_metered(trips):
    """Both ways of finding the linked rows (fewer rows than trips, or not) agree."""
    shards = make_shards()
    ids = [DRIVER + k for k in range(6)]
    lats = [37.7793 + 0.001 * k for k in range(6)]
    route(shards, location_rows(ids, lats, [-122.4193] * 6, NOW, 0.0, 10.0), NOW)
    settle(shards)
    shard = next(s for s in shards if DRIVER in s.own.id_to_slot)
    held = [i for i in ids if i in shard.own.id_to_slot]
    assert len(held) > trips
    linked = held[:trips]
    for i in linked:
        shard.set_status(i, DriverStatus.ON_TRIP, TripLink(f"ride-{i}", f"r-{i}", shard.shard_id))
    moved = held[:2]  # one linked driver (and, with 5 trips, another) plus maybe a free one
    rows = location_rows(
        moved, [lats[ids.index(i)] + 0.0003 for i in moved], [-122.4193] * len(moved), NOW + 1, 0.0, 10.0
    )
    route(shards, rows, NOW + 1)
    for i in held:
        if i in linked and i in moved:
            assert shard.trip_m[i] == pytest.approx(33.4, rel=0.01)
        elif i in linked:
            assert shard.trip_m[i] == 0.0
        else:
            assert i not in shard.trip_m


def _column_matches_trips(shards) -> None:
    for s in shards:
        t = s.own
        used = np.flatnonzero(t.used[: t.high_water])
        expected = np.array([int(i) in s.trips for i in t.driver_id[used]], dtype=bool)
        assert (t.on_trip[used] == expected).all(), s.shard_id


def test_the_on_trip_column_follows_the_trips_through_links_borders_and_evictions():
    """The odometer reads who is on a trip from the own table's column (Shard.trips keeps
    it); it must say exactly what the trips say after any sequence of events."""
    shards = make_shards()
    a, b = _border_crossing()
    rng = np.random.default_rng(7)
    ids = list(range(900, 940))
    now = NOW
    for step in range(60):
        now += 1.0
        movers = rng.choice(ids, size=12, replace=False)
        side = [a if rng.random() < 0.5 else b for _ in movers]
        jitter = rng.uniform(-0.001, 0.001, len(movers))
        rows = location_rows(
            movers.tolist(),
            [p[0] + j for p, j in zip(side, jitter, strict=True)],
            [p[1] for p in side],
            now,
            0.0,
            10.0,
        )
        route(shards, rows, now)
        settle(shards)
        for s in shards:  # link some held drivers, free others
            for i in rng.choice(ids, size=4, replace=False).tolist():
                if i in s.own.id_to_slot and not s.own.pending[s.own.id_to_slot[i]]:
                    if rng.random() < 0.5:
                        s.set_status(i, DriverStatus.ON_TRIP, TripLink(f"ride-{i}-{step}", "r", s.shard_id))
                    else:
                        s.set_status(i, DriverStatus.AVAILABLE)
        if step % 20 == 19:  # a long silence: drivers evicted, their slots reused later
            now += 1000.0
            for s in shards:
                s.sweep(now)
        _column_matches_trips(shards)
    assert any(s.trips for s in shards)
