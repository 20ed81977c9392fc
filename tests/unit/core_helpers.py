"""Builders for core tests: a region, its map, shards and fleets, with a fake clock."""

from __future__ import annotations

import functools

import numpy as np

from dispatch.drivers import location_rows
from dispatch.handoff import claim_round
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


def route(shards, rows, now):
    """What routers do: send each row to the shard of its position."""
    _, smap = region_and_map()
    owner = smap.shard_of(rows["lat"], rows["lng"])
    return [s.ingest(rows[owner == s.shard_id], now) for s in shards if (owner == s.shard_id).any()]


def settle(shards):
    """Run one claim round on every shard (in the order given), as the actors do."""
    by_id = {s.shard_id: s for s in shards}
    for shard in shards:

        def ask(k, ids, ts, claimer=shard.shard_id):
            return by_id[k].release(ids, ts, claimer)

        claim_round(shard, ask)


def push_halo(shards, now):
    by_id = {s.shard_id: s for s in shards}
    for shard in shards:
        for k, delta in shard.halo_delta().items():
            by_id[k].apply_halo(shard.shard_id, delta, now)


def load_fleet(shards, ids, lat, lng, now=NOW):
    route(shards, location_rows(ids, lat, lng, now - 1.0, 0.0, 5.0), now)
    settle(shards)
    push_halo(shards, now)
