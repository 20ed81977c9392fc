"""Halo pushes: only moves past HALO_MOVE_M, a refresh before neighbours forget, statuses at once."""

import numpy as np

from dispatch.drivers import DriverStatus, location_rows
from dispatch.shard import HALO_MOVE_M
from tests.unit.core_helpers import (
    NOW,
    load_fleet,
    make_shards,
    push_halo,
    random_fleet,
    region_and_map,
    route,
)

DEG_PER_M = 1 / 111_320  # latitude degrees per metre


def _halo_driver(shards, lat, lng, ids):
    """A driver in some neighbour's halo that stays in its own shard 300 m north:
    (index in the fleet, owner, the neighbour seeing it)."""
    _, smap = region_and_map()
    for nb in shards:
        h = nb.halo
        for s in np.flatnonzero(h.used[: h.high_water]).tolist():
            i = int(np.searchsorted(ids, h.driver_id[s]))
            owner = int(h.owner[s])
            north = smap.shard_of(np.array([lat[i] + 300 * DEG_PER_M]), np.array([lng[i]]))[0]
            if north == owner:
                return i, owner, nb
    raise AssertionError("no halo driver")


def _move(shards, ids, lat, lng, i, north_m, now):
    lat[i] += north_m * DEG_PER_M
    route(shards, location_rows(ids[i : i + 1], lat[i : i + 1], lng[i : i + 1], now, 0.0, 5.0), now)
    push_halo(shards, now)


def _halo_lat(nb, driver_id):
    return float(nb.halo.lat[nb.halo.id_to_slot[int(driver_id)]])


def test_a_small_move_is_not_pushed_and_a_move_past_the_threshold_is():
    shards = make_shards()
    ids, lat, lng = random_fleet(3000, seed=8)
    load_fleet(shards, ids, lat, lng)
    i, _owner, nb = _halo_driver(shards, lat, lng, ids)
    first = _halo_lat(nb, ids[i])
    _move(shards, ids, lat, lng, i, HALO_MOVE_M * 0.4, NOW + 1)
    assert _halo_lat(nb, ids[i]) == first  # the neighbour keeps the pushed position
    _move(shards, ids, lat, lng, i, HALO_MOVE_M * 0.8, NOW + 2)  # 1.2 x the threshold from the push
    assert _halo_lat(nb, ids[i]) == lat[i]


def test_a_driver_standing_still_is_refreshed_before_neighbours_forget_it():
    shards = make_shards()
    ids, lat, lng = random_fleet(3000, seed=8)
    load_fleet(shards, ids, lat, lng)
    i, owner, nb = _halo_driver(shards, lat, lng, ids)
    stale = nb.cfg.stale_after_s
    # Reports in place every 2 s for three times the staleness limit; sweeps run meanwhile.
    for t in np.arange(2.0, 3 * stale, 2.0):
        _move(shards, ids, lat, lng, i, 0.0, NOW + t)
        nb.sweep(NOW + t)
    now = NOW + 3 * stale
    found = nb.nearby(float(lat[i]), float(lng[i]), 100.0, 5, now)
    assert any(f.driver_id == ids[i] and f.owner == owner for f in found)


def test_a_status_change_is_pushed_without_a_move():
    shards = make_shards()
    ids, lat, lng = random_fleet(3000, seed=8)
    load_fleet(shards, ids, lat, lng)
    i, owner, nb = _halo_driver(shards, lat, lng, ids)
    assert shards[owner].reserve(int(ids[i]), NOW)
    push_halo(shards, NOW)
    assert nb.halo.status[nb.halo.id_to_slot[int(ids[i])]] == DriverStatus.OFFERED
    found = nb.nearby(float(lat[i]), float(lng[i]), 100.0, 5, NOW)
    assert all(f.driver_id != ids[i] for f in found)
