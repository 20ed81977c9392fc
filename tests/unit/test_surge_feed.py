"""The shard's surge feed with a fake clock: zones from the raster, demand and supply, the model."""

from __future__ import annotations

import functools
import math

import h3
import numpy as np
import pytest

from dispatch.drivers import Intent, location_rows
from dispatch.errors import ConfigError
from dispatch.geo import haversine_m
from dispatch.pricing import SurgeConfig
from dispatch.rides import RideBook, RideRequest
from dispatch.shardmap import OUTSIDE
from dispatch.surge_feed import NO_ZONE, SurgeFeed, ZoneGrid
from tests.unit.core_helpers import NOW, make_shards, push_halo, region_and_map, route, settle

CFG = SurgeConfig(resolution=7, interval_s=5.0, window_s=300.0, smoothing=0.07, max_surge=3.0)


@functools.cache
def grid() -> ZoneGrid:
    _, smap = region_and_map()
    return ZoneGrid(smap, 7)


def _zone_point(zone: str) -> tuple[float, float]:
    return h3.cell_to_latlng(zone)


def _busy_zone() -> tuple[str, int]:
    """A zone inside the polygon (Financial District) and the shard that owns it."""
    zone = h3.latlng_to_cell(37.7897, -122.4000, 7)
    return zone, int(grid().owner[grid().zone_id[zone]])


def _place(shards, ids, lat, lng, now, intent=Intent.POSITION):
    route(
        shards,
        location_rows(np.asarray(ids), np.asarray(lat), np.asarray(lng), now - 0.5, intent=intent),
        now,
    )
    settle(shards)
    push_halo(shards, now)


def _near(lat, lng, n, seed, spread_deg=0.002):
    rng = np.random.default_rng(seed)
    return lat + rng.uniform(-spread_deg, spread_deg, n), lng + rng.uniform(-spread_deg, spread_deg, n)


def _ride(ride_id, lat, lng, now, vclass=0):
    return RideRequest(
        ride_id, f"rider-{ride_id}", float(lat), float(lng), float(lat) + 0.01, float(lng), vclass, now
    )


# --- the zone raster -------------------------------------------------------------------


def test_raster_zone_equals_h3_inside_a_zone_and_is_a_corner_zone_within_the_bound_elsewhere():
    region, smap = region_and_map()
    g = grid()
    rng = np.random.default_rng(7)
    s, w, n, e = region.bounds
    lat = rng.uniform(s, n, 3000)
    lng = rng.uniform(w, e, 3000)
    ids = g.zone_ids(lat, lng)
    assert (ids != NO_ZONE).all()
    got = [g.zones[i] for i in ids.tolist()]
    exact = [h3.latlng_to_cell(a, b, 7) for a, b in zip(lat.tolist(), lng.tolist(), strict=True)]
    corners = g.corners(lat, lng)
    inner = 0
    half_diagonal_m = region.index.raster_m / math.sqrt(2)
    for k in range(len(lat)):
        assert got[k] in corners[k]
        if len(corners[k]) == 1:  # the raster cell lies in one zone: exact
            inner += 1
            assert got[k] == exact[k]
        elif got[k] != exact[k]:
            # The zone given is the zone of the raster cell's centre, within the bound.
            i, j = divmod(int(smap._grid_index(lat[k], lng[k])[0]), smap.nx)
            clat, clng = smap.south + (i + 0.5) * smap.dlat, smap.west + (j + 0.5) * smap.dlng
            assert h3.latlng_to_cell(clat, clng, 7) == got[k]
            assert haversine_m(lat[k], lng[k], clat, clng) <= half_diagonal_m + 1e-6
    mismatches = sum(a != b for a, b in zip(got, exact, strict=True))
    assert inner > 0.7 * len(lat)
    assert mismatches < 0.05 * len(lat)  # only in the thin band along zone edges


def test_zone_ids_outside_the_raster_and_for_nan_are_no_zone():
    g = grid()
    ids = g.zone_ids(np.array([np.nan, 0.0, 37.7897]), np.array([-122.4, 0.0, np.inf]))
    assert ids.tolist() == [NO_ZONE] * 3
    assert g.zone_of(37.7897, -122.4000) == h3.latlng_to_cell(37.7897, -122.4000, 7)
    assert g.zone_of(0.0, 0.0) is None


def test_every_zone_in_service_has_one_owner_and_polygon_zones_lie_in_one_shard():
    region, smap = region_and_map()
    g = grid()
    owned = [set(g.owned_by(k).tolist()) for k in range(region.shard_count)]
    assert sum(len(o) for o in owned) == len(set().union(*owned))  # disjoint
    served = set(np.unique(g.raster[smap.raster != OUTSIDE]).tolist())
    assert set().union(*owned) == served
    # Same resolution as the shard map: a zone of the polygon is one shard cell.
    for cell, shard in smap.cell_shard.items():
        zid = g.zone_id[cell]
        assert g.owner[zid] == shard
        assert set(np.unique(smap.raster[g.raster == zid]).tolist()) == {shard}


def test_the_grid_must_match_the_feed():
    shards = make_shards()
    with pytest.raises(ConfigError):
        SurgeFeed(shards[0], RideBook(), SurgeConfig(resolution=8), grid())
    with pytest.raises(ConfigError):
        ZoneGrid(region_and_map()[1], 16)


# --- the feed --------------------------------------------------------------------------


def test_a_demand_spike_in_one_zone_raises_its_multiplier_smoothly_up_to_the_cap():
    zone, owner = _busy_zone()
    shards = make_shards()
    shard = shards[owner]
    book = RideBook()
    feed = SurgeFeed(shard, book, CFG, grid())
    assert zone in feed.owned_zones and feed.multipliers(NOW) == dict.fromkeys(feed.owned_zones, 1.0)
    lat0, lng0 = _zone_point(zone)
    dlat, dlng = _near(lat0, lng0, 3, seed=1)
    # A quiet zone of the same shard, with drivers but no requests.
    quiet = next(z for z in feed.owned_zones if z != zone and grid().zone_of(*_zone_point(z)) == z)
    qlat, qlng = _near(*_zone_point(quiet), 5, seed=2)
    seq = 0
    history = []
    for step in range(120):  # 10 minutes, one observation every 5 s
        now = NOW + 5.0 * step
        # Drivers keep reporting (else they go stale and stop counting as supply).
        _place(shards, [1, 2, 3, 11, 12, 13, 14, 15], np.r_[dlat, qlat], np.r_[dlng, qlng], now)
        if step < 60:  # a rush: 4 requests every 5 s for 5 minutes, three drivers
            rlat, rlng = _near(lat0, lng0, 4, seed=100 + step)
            for a, b in zip(rlat, rlng, strict=True):
                book.add(_ride(f"r{seq}", a, b, now), now)
                seq += 1
        obs = feed.observe(now)
        assert obs.supply[zone] == 3 and obs.supply[quiet] == 5
        assert obs.demand[zone] == (4 if step < 60 else 0)  # new requests only, each counted once
        assert obs.demand[quiet] == 0
        m = feed.multipliers(now)
        history.append(feed.model.raw(zone, now))
        assert m[quiet] == 1.0
        assert set(m) == set(feed.owned_zones)
        assert 1.0 <= m[zone] <= CFG.max_surge
        assert all(v == 1.0 for z, v in m.items() if z != zone)
    rising = history[:60]
    assert all(b >= a - 1e-12 for a, b in zip(rising, rising[1:], strict=False))  # never drops in the rush
    steps = np.diff([1.0, *rising])
    assert steps.max() <= CFG.smoothing * (CFG.max_surge - 1.0) + 1e-9  # no jumps: smoothed
    assert history[5] > 1.0 and history[2] < 1.5  # reacts within seconds, not all at once
    assert max(history) <= CFG.max_surge and history[59] == pytest.approx(CFG.max_surge, abs=0.05)
    # After the rush the requests leave the window and the multiplier comes down.
    assert history[-1] < history[59] and feed.multipliers(NOW + 5.0 * 119)[zone] < CFG.max_surge
    r = feed.readings(NOW + 5.0 * 59)
    assert r[quiet].multiplier == 1.0 and r[quiet].supply == pytest.approx(5.0)


def test_zones_without_requests_stay_at_1_even_without_drivers():
    shards = make_shards()
    feed = SurgeFeed(shards[1], RideBook(), CFG, grid())
    for step in range(30):
        obs = feed.observe(NOW + 5.0 * step)
        assert set(obs.demand) == set(feed.owned_zones) and not any(obs.demand.values())
    assert set(feed.multipliers(NOW + 150).values()) == {1.0}


def test_only_available_fresh_drivers_in_owned_zones_count_as_supply():
    zone, owner = _busy_zone()
    shards = make_shards()
    feed = SurgeFeed(shards[owner], RideBook(), CFG, grid())
    lat, lng = _zone_point(zone)
    _place(shards, [1, 2, 3, 4], [lat] * 4, [lng + 0.001 * k for k in range(4)], NOW)
    _place(shards, [3], [lat], [lng + 0.002], NOW + 0.1, intent=Intent.OFFLINE)
    assert shards[owner].reserve(4, NOW)  # offered: busy
    assert feed.observe(NOW).supply[zone] == 2
    # Heard from 31 s ago: stale, no longer supply.
    assert feed.observe(NOW + 31.0).supply[zone] == 0


def test_a_shared_zone_counts_the_neighbours_drivers_through_the_halo():
    region, smap = region_and_map()
    g = grid()
    shards = make_shards()
    sh = smap.raster.ravel()
    for zid, owner in enumerate(g.owner.tolist()):
        others = set(sh[(g._flat == zid) & (sh != OUTSIDE)].tolist()) - {owner}
        if owner >= 0 and others:
            break
    else:
        pytest.skip("no zone shared by two shards in this region")
    other = others.pop()
    iy, ix = np.argwhere((g.raster == zid) & (smap.raster == other))[0]
    lat, lng = smap.south + (iy + 0.5) * smap.dlat, smap.west + (ix + 0.5) * smap.dlng
    _place(shards, [42], [lat], [lng], NOW)
    assert shards[other].holds(42)
    feeds = [SurgeFeed(s, RideBook(), CFG, g) for s in shards]
    counts = {k: f.observe(NOW).supply.get(g.zones[zid]) for k, f in enumerate(feeds)}
    # Only the owner publishes the zone, and it sees the driver in its halo.
    assert counts[owner] == 1
    assert all(v is None for k, v in counts.items() if k != owner)


def test_time_going_back_does_not_raise_and_repeats_count_nothing():
    zone, owner = _busy_zone()
    shards = make_shards()
    book = RideBook()
    feed = SurgeFeed(shards[owner], book, CFG, grid())
    lat, lng = _zone_point(zone)
    book.add(_ride("a", lat, lng, NOW), NOW)
    assert feed.due(NOW)
    assert feed.observe(NOW).demand[zone] == 1
    assert not feed.due(NOW + 4.9) and feed.due(NOW + 5.0)
    back = feed.observe(NOW - 60.0)  # the wall clock stepped back a minute
    assert back.at == NOW and back.demand[zone] == 0
    book.cancel("a", NOW + 1)
    book.add(_ride("b", lat, lng, NOW + 1), NOW + 1)
    assert feed.observe(NOW + 5.0).demand[zone] == 1
