"""Nearby queries equal a brute force over the whole table, inside and across shards."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatch.drivers import DriverStatus, DriverTable
from dispatch.errors import InvalidLocation, RadiusTooLarge
from dispatch.geo import LocalProjection, haversine_m
from dispatch.spatial import GridIndex, brute_force_nearest
from tests.unit.core_helpers import NOW, load_fleet, make_shards, random_fleet, region_and_map


def _table(n, seed, spread_deg):
    rng = np.random.default_rng(seed)
    proj = LocalProjection(37.76, -122.44)
    t = DriverTable(capacity=16)
    ids = rng.choice(np.arange(1, 10 * n + 10), size=n, replace=False).astype(np.int64)
    slots = t.allocate(ids)
    t.lat[slots] = 37.76 + rng.uniform(-spread_deg, spread_deg, n)
    t.lng[slots] = -122.44 + rng.uniform(-spread_deg, spread_deg, n)
    t.x[slots], t.y[slots] = proj.to_xy(t.lat[slots], t.lng[slots])
    t.status[slots] = rng.choice([0, 1, 1, 1, 2, 3], size=n)
    t.seen_at[slots] = NOW - rng.uniform(0, 60, n)
    t.vclass[slots] = rng.integers(0, 2, n)
    return t, proj, slots


def _eligible(t, vclass=None):
    return lambda slots: t.eligible(slots, NOW, 30.0, vclass)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 3000),
    seed=st.integers(0, 2**31),
    spread=st.sampled_from([0.002, 0.02, 0.08]),
    k=st.integers(1, 40),
    radius=st.floats(10, 6000),
    cell=st.sampled_from([100.0, 250.0, 700.0]),
    qlat=st.floats(-0.05, 0.05),
    qlng=st.floats(-0.05, 0.05),
    vclass=st.sampled_from([None, 0, 1]),
    churn=st.integers(0, 3),
)
def test_grid_index_equals_brute_force(n, seed, spread, k, radius, cell, qlat, qlng, vclass, churn):
    t, proj, slots = _table(n, seed, spread)
    index = GridIndex(t, cell)
    index.update(slots)
    rng = np.random.default_rng(seed + 1)
    # Churn after the first query: moves (some across cells), removals, slot reuse, so
    # the sorted buckets and the moved list are both exercised.
    lat0, lng0 = 37.76 + qlat, -122.44 + qlng
    x0, y0 = proj.to_xy(lat0, lng0)

    def same_as_brute_force(eligible) -> tuple[np.ndarray, np.ndarray]:
        got_slots, got_d = index.nearest(lat0, lng0, float(x0), float(y0), radius, k, eligible)
        ref_slots, ref_d = brute_force_nearest(t, lat0, lng0, radius, k, eligible)
        assert list(t.driver_id[got_slots]) == list(t.driver_id[ref_slots])
        assert np.allclose(got_d, ref_d)
        return got_slots, got_d

    same_as_brute_force(_eligible(t))
    for _ in range(churn):
        mv = rng.choice(slots, size=max(1, n // 5))
        before = t.lat[mv].copy()
        t.lat[mv] += rng.normal(0, spread / 4, len(mv))
        t.x[mv], t.y[mv] = proj.to_xy(t.lat[mv], t.lng[mv])
        index.update(mv)
        same_as_brute_force(_eligible(t))
        # Half of them back where they were (out of the moved list), then off again.
        back = mv[: len(mv) // 2]
        t.lat[back] = before[: len(back)]
        t.x[back], t.y[back] = proj.to_xy(t.lat[back], t.lng[back])
        index.update(back)
        same_as_brute_force(_eligible(t))
        t.lat[back] += rng.normal(0, spread / 4, len(back))
        t.x[back], t.y[back] = proj.to_xy(t.lat[back], t.lng[back])
        index.update(back)
        gone = rng.choice(t.used_slots(), size=max(1, len(t) // 10), replace=False)
        t.remove(gone)
        new = t.allocate(np.arange(10**9 + t.high_water, 10**9 + t.high_water + len(gone), dtype=np.int64))
        t.lat[new] = 37.76 + rng.uniform(-spread, spread, len(new))
        t.lng[new] = -122.44 + rng.uniform(-spread, spread, len(new))
        t.x[new], t.y[new] = proj.to_xy(t.lat[new], t.lng[new])
        t.status[new] = 1
        t.seen_at[new] = NOW
        index.update(new)
        slots = t.used_slots()
    got_slots, _ = same_as_brute_force(_eligible(t, vclass))
    assert (t.status[got_slots] == DriverStatus.AVAILABLE).all()


def test_rebuilds_fold_many_rounds_of_churn_into_the_sorted_order():
    """Rebuilds after the first insert the moved slots into the last order instead of
    sorting the table again: after many rounds of small moves, removals and slot reuse,
    queries still equal a brute force, and the order holds each placed slot once."""
    t, proj, slots = _table(6000, 7, 0.02)
    index = GridIndex(t, 250.0)
    index.update(slots)
    rng = np.random.default_rng(8)
    queries = [(37.76 + a, -122.44 + b) for a, b in rng.uniform(-0.02, 0.02, (4, 2))]
    next_id = 10**9
    for _ in range(30):
        mv = rng.choice(t.used_slots(), size=150, replace=False)
        t.lat[mv] += rng.normal(0, 0.003, len(mv))
        t.x[mv], t.y[mv] = proj.to_xy(t.lat[mv], t.lng[mv])
        index.update(mv)
        gone = rng.choice(t.used_slots(), size=40, replace=False)
        t.remove(gone)
        new = t.allocate(np.arange(next_id, next_id + 30, dtype=np.int64))
        next_id += 30
        t.lat[new] = 37.76 + rng.uniform(-0.02, 0.02, len(new))
        t.lng[new] = -122.44 + rng.uniform(-0.02, 0.02, len(new))
        t.x[new], t.y[new] = proj.to_xy(t.lat[new], t.lng[new])
        t.status[new] = DriverStatus.AVAILABLE
        t.seen_at[new] = NOW
        index.update(new)
        for qlat, qlng in queries:
            x, y = proj.to_xy(qlat, qlng)
            got, got_d = index.nearest(qlat, qlng, float(x), float(y), 1500, 12, _eligible(t))
            ref, ref_d = brute_force_nearest(t, qlat, qlng, 1500, 12, _eligible(t))
            assert list(t.driver_id[got]) == list(t.driver_id[ref])
            assert np.allclose(got_d, ref_d)
    assert index.rebuilds >= 10
    index._rebuild()
    placed = np.sort(index._order)
    assert list(placed) == list(t.used_slots())
    assert (t.built_cell[index._order] == t.cell[index._order]).all()
    assert (np.diff(index._cells_sorted) >= 0).all()


def test_index_follows_moves_and_removals():
    t, proj, slots = _table(500, 3, 0.01)
    index = GridIndex(t, 250.0)
    index.update(slots)
    s = int(slots[t.eligible(slots, NOW, 30.0)][0])
    x, y = proj.to_xy(37.7, -122.5)
    assert s not in index.nearest(37.7, -122.5, float(x), float(y), 500, 3, _eligible(t))[0]
    # Move one available driver right onto the query point: it must come first.
    t.lat[s], t.lng[s] = 37.7, -122.5
    t.x[s], t.y[s] = proj.to_xy(37.7, -122.5)
    index.update(np.array([s]))
    found, d = index.nearest(37.7, -122.5, float(x), float(y), 500, 3, _eligible(t))
    assert found[0] == s and d[0] < 1e-6
    t.remove(np.array([s]))
    assert s not in index.nearest(37.7, -122.5, float(x), float(y), 500, 3, _eligible(t))[0]


def test_shard_nearby_next_to_a_border_sees_both_sides():
    """A query at a border of shard A returns the union of A's and B's nearest drivers."""
    region, smap = region_and_map()
    shards = make_shards()
    ids, lat, lng = random_fleet(20_000, seed=11)
    load_fleet(shards, ids, lat, lng)
    # A point in shard 0 right next to shard 1 (raster neighbours).
    iy, ix = np.nonzero((smap.raster[:, :-1] == 0) & (smap.raster[:, 1:] != 0) & (smap.raster[:, 1:] >= 0))
    qlat = smap.south + (iy[len(iy) // 2] + 0.5) * smap.dlat
    qlng = smap.west + (ix[len(ix) // 2] + 1.0) * smap.dlng
    owner = smap.shard_for_point(qlat, qlng)
    got = shards[owner].nearby(qlat, qlng, 1500, 25, NOW)
    d = haversine_m(qlat, qlng, lat, lng)
    order = np.lexsort((ids, d))
    expect = [int(i) for i in ids[order][d[order] <= 1500][:25]]
    assert [g.driver_id for g in got] == expect
    owners = {g.owner for g in got}
    assert len(owners) >= 2, f"expected drivers from both sides of the border, got owners {owners}"


@pytest.mark.parametrize("k", [1, 3, 8, 40])
def test_shard_nearby_equals_brute_force_near_borders_and_inside(k):
    """The halo is searched only as far as the k-th own driver: the answer must still be
    the k nearest of the whole fleet, at a border (halo drivers nearer than own ones),
    a little inside, and deep inside a shard."""
    region, smap = region_and_map()
    shards = make_shards()
    ids, lat, lng = random_fleet(20_000, seed=12)
    load_fleet(shards, ids, lat, lng)
    iy, ix = np.nonzero((smap.raster[:, :-1] == 0) & (smap.raster[:, 1:] != 0) & (smap.raster[:, 1:] >= 0))
    rng = np.random.default_rng(4)
    checked = halo_seen = 0
    for j in rng.choice(len(iy), 30, replace=False):
        for cells_in in (0.0, 0.5, 3.0, 12.0):  # from the border into shard 0
            qlat = smap.south + (iy[j] + 0.5) * smap.dlat
            qlng = smap.west + (ix[j] + 1.0 - cells_in) * smap.dlng
            owner = smap.shard_for_point(qlat, qlng)
            if owner < 0:
                continue
            got = shards[owner].nearby(qlat, qlng, 1500, k, NOW)
            d = haversine_m(qlat, qlng, lat, lng)
            order = np.lexsort((ids, d))
            expect = [int(i) for i in ids[order][d[order] <= 1500][:k]]
            assert [g.driver_id for g in got] == expect
            checked += 1
            halo_seen += any(g.owner != owner for g in got)
    assert checked >= 100 and halo_seen >= 10


def test_nearby_refuses_bad_queries():
    shards = make_shards()
    with pytest.raises(InvalidLocation):
        shards[0].nearby(float("nan"), -122.4, 100, 5, NOW)
    with pytest.raises(InvalidLocation):
        shards[0].nearby(37.7, -122.4, -1, 5, NOW)
    with pytest.raises(RadiusTooLarge):
        shards[0].nearby(37.7, -122.4, 10_000, 5, NOW)
