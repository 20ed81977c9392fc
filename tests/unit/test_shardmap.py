import numpy as np
import pytest
from scipy import ndimage

from dispatch.errors import ConfigError
from dispatch.geo import haversine_m
from dispatch.region import load_region, region_file_text, region_from_toml
from dispatch.shardmap import OUTSIDE, ShardMap


@pytest.fixture(scope="module")
def smap():
    return ShardMap(load_region())


def test_every_shard_is_one_contiguous_piece(smap):
    for k in range(smap.shard_count):
        _, pieces = ndimage.label(smap.raster == k)
        assert pieces == 1, f"shard {k} is split into {pieces} pieces"


def test_shards_are_balanced(smap):
    sizes = [int((smap.raster == k).sum()) for k in range(smap.shard_count)]
    assert min(sizes) > 0.5 * max(sizes), sizes


def test_polygon_points_map_to_a_shard_and_far_points_do_not(smap):
    poly = np.array(smap.region.polygon)
    assert (smap.shard_of(poly[:, 0], poly[:, 1]) != OUTSIDE).all()
    # Sacramento, the open Pacific, NaN, out of range
    lat = np.array([38.58, 37.75, np.nan, 95.0, 37.77])
    lng = np.array([-121.49, -123.5, -122.4, -122.4, np.inf])
    assert (smap.shard_of(lat, lng) == OUTSIDE).all()


def test_the_map_is_deterministic(smap):
    again = ShardMap(region_from_toml(region_file_text()))
    assert np.array_equal(again.raster, smap.raster)
    assert np.array_equal(again.halo_raster, smap.halo_raster)


def test_halo_mask_names_exactly_the_shards_within_the_halo(smap):
    """Checked against a brute force over raster cell centres of every other shard."""
    rng = np.random.default_rng(7)
    s, w, n, e = smap.region.bounds
    lat = rng.uniform(s, n, 150)
    lng = rng.uniform(w, e, 150)
    own = smap.shard_of(lat, lng)
    masks = smap.halo_mask_of(lat, lng)
    iy, ix = np.nonzero(smap.raster != OUTSIDE)
    clat = smap.south + (iy + 0.5) * smap.dlat
    clng = smap.west + (ix + 0.5) * smap.dlng
    cshard = smap.raster[iy, ix]
    halo = smap.region.index.halo_m
    slack = 2 * smap.region.index.raster_m  # raster quantisation on both ends
    for la, lo, o, m in zip(lat, lng, own, masks, strict=True):
        if o == OUTSIDE:
            continue
        d = haversine_m(la, lo, clat, clng)
        for k in range(smap.shard_count):
            if k == o:
                assert not (int(m) >> k) & 1
                continue
            nearest = d[cshard == k].min()
            if nearest < halo - slack:
                assert (int(m) >> k) & 1, (la, lo, k, nearest)
            elif nearest > halo + slack:
                assert not (int(m) >> k) & 1, (la, lo, k, nearest)


def test_bad_region_files_are_refused():
    with pytest.raises(ConfigError, match="polygon"):
        region_from_toml('[region]\nname="x"\npolygon=[[1,2]]\n')
    with pytest.raises(ConfigError, match="shard_count"):
        region_from_toml('[region]\nname="x"\nshard_count=0\npolygon=[[1,2],[1,3],[2,3]]\n')
    with pytest.raises(ConfigError):
        region_from_toml("not toml [")


def test_the_scalar_lookup_agrees_with_the_vectorized_one(smap):
    s, w, n, e = smap.region.bounds if hasattr(smap, "region") else load_region().bounds
    rng = np.random.default_rng(7)
    lat = np.r_[rng.uniform(s - 0.05, n + 0.05, 5000), np.nan, np.inf, -np.inf, 1e308, 37.77]
    lng = np.r_[rng.uniform(w - 0.05, e + 0.05, 5000), -122.4, -122.4, -122.4, 1e308, np.nan]
    want = smap.shard_of(lat, lng)
    got = [smap.shard_for_point(float(a), float(b)) for a, b in zip(lat, lng, strict=True)]
    assert got == want.tolist()
    assert OUTSIDE in got and any(g >= 0 for g in got)
