"""Builders for core tests: a region, its map, shards and fleets, with a fake clock."""

from __future__ import annotations

import functools

import numpy as np

from dispatch.cluster import push_halo, route, settle  # noqa: F401  (re-exported for tests)
from dispatch.drivers import location_rows
from dispatch.region import load_region
from dispatch.shard import Shard
from dispatch.shardmap import ShardMap

NOW = 1_800_000_000.0


@functools.cache
def region_and_map():
    region = load_region()
    return region, ShardMap(region)


def make_shards():
    region, smap = region_and_map()
    return [Shard(region, smap, k) for k in range(region.shard_count)]


def random_fleet(n: int, seed: int = 0, ids_from: int = 1):
    region, _ = region_and_map()
    rng = np.random.default_rng(seed)
    s, w, nn, e = region.bounds
    lat = rng.uniform(s + 0.005, nn - 0.005, n)
    lng = rng.uniform(w + 0.005, e - 0.005, n)
    return np.arange(ids_from, ids_from + n, dtype=np.int64), lat, lng


def load_fleet(shards, ids, lat, lng, now=NOW):
    route(shards, location_rows(ids, lat, lng, now - 1.0, 0.0, 5.0), now)
    settle(shards)
    push_halo(shards, now)
