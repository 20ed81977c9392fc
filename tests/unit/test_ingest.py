"""Batch ingest: validation by reason, table untouched by bad rows, ordering, staleness."""

import numpy as np
import pytest

from dispatch.drivers import DriverStatus, DriverTable, Intent, location_rows
from dispatch.shard import DROP_REASONS
from tests.unit.core_helpers import NOW, load_fleet, make_shards, random_fleet, route, settle


def _snapshot(table: DriverTable):
    return {name: getattr(table, name).copy() for name in DriverTable.COLUMNS} | {
        "ids": dict(table.id_to_slot)
    }


def _same(a, b):
    assert a["ids"] == b["ids"]
    for name in DriverTable.COLUMNS:
        assert np.array_equal(a[name], b[name], equal_nan=True), name


@pytest.fixture()
def loaded():
    shards = make_shards()
    ids, lat, lng = random_fleet(2000, seed=5)
    load_fleet(shards, ids, lat, lng)
    return shards, ids, lat, lng


BAD = {
    "invalid_driver_id": dict(driver_id=-5),
    "non_finite": dict(lat=float("nan")),
    "out_of_range": dict(lat=137.0),
    "invalid_heading": dict(heading=400.0),
    "invalid_speed": dict(speed=-3.0),
    "invalid_vehicle_class": dict(vclass=42),
    "invalid_intent": dict(intent=9),
    "from_future": dict(ts=NOW + 3600),
    "too_old": dict(ts=NOW - 3600),
    "out_of_region": dict(lat=38.58, lng=-121.49),
}


@pytest.mark.parametrize("reason", list(BAD))
def test_each_bad_row_is_refused_with_its_reason_and_changes_nothing(loaded, reason):
    shards, ids, lat, lng = loaded
    shard = shards[0]
    j = int(np.flatnonzero(shard.map.shard_of(lat, lng) == 0)[0])
    fields = dict(driver_id=ids[j], lat=lat[j] + 1e-4, lng=lng[j], ts=NOW, heading=10.0, speed=3.0)
    fields.update(BAD[reason])
    row = location_rows(**fields)
    before = _snapshot(shard.own)
    res = shard.ingest(row, NOW)
    assert res.dropped == {reason: 1}
    assert res.applied == 0
    assert shard.dropped[reason] == 1
    _same(before, _snapshot(shard.own))


def test_every_reason_is_tested():
    assert set(BAD) | {"out_of_order"} == set(DROP_REASONS)


def test_good_rows_in_a_bad_batch_still_apply(loaded):
    shards, ids, lat, lng = loaded
    shard = shards[0]
    mine = np.flatnonzero(shard.map.shard_of(lat, lng) == 0)[:3]
    rows = location_rows(ids[mine], lat[mine] + 1e-5, lng[mine], NOW, 0.0, 1.0)
    bad = location_rows(ids[mine[0]], float("inf"), lng[mine[0]], NOW)
    res = shard.ingest(np.concatenate([rows[:1], bad, rows[1:]]), NOW)
    assert res.applied == 3 and res.dropped == {"non_finite": 1}
    for i in ids[mine]:
        assert shard.own.lat[shard.own.id_to_slot[int(i)]] == pytest.approx(lat[ids == i][0] + 1e-5)


def test_out_of_order_rows_are_dropped_and_counted(loaded):
    shards, ids, lat, lng = loaded
    shard = shards[0]
    j = int(np.flatnonzero(shard.map.shard_of(lat, lng) == 0)[0])
    newer = location_rows(ids[j], lat[j] + 2e-4, lng[j], NOW - 0.2)
    older = location_rows(ids[j], lat[j] + 9e-4, lng[j], NOW - 0.5)
    assert shard.ingest(newer, NOW).applied == 1
    res = shard.ingest(older, NOW)
    assert res.dropped == {"out_of_order": 1}
    slot = shard.own.id_to_slot[int(ids[j])]
    assert shard.own.lat[slot] == pytest.approx(lat[j] + 2e-4)


def test_newest_row_of_a_batch_wins_whatever_its_position(loaded):
    shards, ids, lat, lng = loaded
    shard = shards[0]
    j = int(np.flatnonzero(shard.map.shard_of(lat, lng) == 0)[0])
    rows = location_rows(
        ids[j], lat[j] + np.array([3e-4, 1e-4, 2e-4]), lng[j], NOW - np.array([0.1, 0.3, 0.2])
    )
    res = shard.ingest(rows, NOW)
    assert res.applied == 3
    slot = shard.own.id_to_slot[int(ids[j])]
    assert shard.own.lat[slot] == pytest.approx(lat[j] + 3e-4)


def test_a_silent_driver_goes_stale_then_is_evicted(loaded):
    shards, ids, lat, lng = loaded
    shard = shards[0]
    stale = shard.region.drivers.stale_after_s
    evict = shard.region.drivers.evict_after_s
    held = len(shard.own)
    assert shard.stats(NOW)["available"] == held
    assert shard.stats(NOW + stale + 1)["available"] == 0
    # Nothing is offered from a stale table, own or halo.
    lat0, lng0 = shard.region.center
    assert shard.nearby(lat0, lng0, 3000, 5, NOW + stale + 1) == []
    assert shard.sweep(NOW + evict + 1) == held
    assert len(shard.own) == 0


def test_going_offline_and_online(loaded):
    shards, ids, lat, lng = loaded
    shard = shards[0]
    j = int(np.flatnonzero(shard.map.shard_of(lat, lng) == 0)[0])
    slot = shard.own.id_to_slot[int(ids[j])]
    shard.ingest(location_rows(ids[j], lat[j], lng[j], NOW - 0.4, intent=Intent.OFFLINE), NOW)
    assert shard.own.status[slot] == DriverStatus.OFFLINE
    assert int(ids[j]) not in [d.driver_id for d in shard.nearby(lat[j], lng[j], 50, 50, NOW)]
    shard.ingest(location_rows(ids[j], lat[j], lng[j], NOW - 0.3, vclass=2, intent=Intent.ONLINE), NOW)
    assert shard.own.status[slot] == DriverStatus.AVAILABLE
    assert shard.own.vclass[slot] == 2
    assert int(ids[j]) in [d.driver_id for d in shard.nearby(lat[j], lng[j], 50, 50, NOW, vclass=2)]


def test_a_new_driver_is_pending_until_its_claim_settles():
    shards = make_shards()
    ids, lat, lng = random_fleet(50, seed=9)
    route(shards, location_rows(ids, lat, lng, NOW - 1), NOW)
    assert sum(s.stats(NOW)["available"] for s in shards) == 0
    assert sum(s.stats(NOW)["pending"] for s in shards) == 50
    settle(shards)
    assert sum(s.stats(NOW)["available"] for s in shards) == 50


def test_rows_taken_and_joined_as_whole_records_equal_numpy_indexing():
    """take_rows and concat_rows copy LOCATION_DTYPE and HALO_DTYPE rows as opaque records:
    the same rows, byte for byte (NaN headings included), as numpy's own indexing, by
    positions, by mask, from a strided view too."""
    from dispatch.drivers import concat_rows, take_rows
    from dispatch.shard import HALO_DTYPE

    rng = np.random.default_rng(3)
    rows = location_rows(
        np.arange(1, 101), rng.uniform(37.7, 37.8, 100), rng.uniform(-122.5, -122.4, 100), NOW
    )
    rows["fix_dt"] = rng.normal(size=100)
    order = rng.permutation(100)
    mask = rng.random(100) < 0.5
    for which in (order, mask, order[:0], np.zeros(100, dtype=bool)):
        got = take_rows(rows, which)
        assert got.dtype == rows.dtype and got.tobytes() == rows[which].tobytes()
    strided = rows[::3]
    assert take_rows(strided, np.arange(5)).tobytes() == strided[:5].tobytes()
    parts = [rows[:10], rows[40:70], rows[90:]]
    assert concat_rows(parts).tobytes() == np.concatenate(parts).tobytes()
    halves = [rows[::2], rows[1::2]]
    assert concat_rows(halves).tobytes() == np.concatenate(halves).tobytes()
    halo = np.zeros(20, dtype=HALO_DTYPE)
    halo["driver_id"] = np.arange(20)
    thirds = halo["driver_id"] % 3 == 0
    assert take_rows(halo, thirds).tobytes() == halo[thirds].tobytes()
