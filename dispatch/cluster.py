"""All of a region's shards in one process: what the actors do, without Ray.

Routes rows to the shard of their position, runs claim rounds and halo pushes between the
shards by direct calls. For unit tests, benchmarks of the core and simulated-clock runs;
the running engine uses one actor per shard instead. The free functions take any list of
shards (in any order, which tests use to vary who claims first).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from numpy.typing import NDArray

from dispatch.handoff import claim_round
from dispatch.region import Region
from dispatch.shard import IngestResult, Release, Shard
from dispatch.shardmap import ShardMap


def route(shards: Sequence[Shard], rows: NDArray[np.void], now: float) -> list[IngestResult]:
    """Send each row to the shard of its position, as routers do."""
    owner = shards[0].map.shard_of(rows["lat"], rows["lng"])
    return [s.ingest(rows[owner == s.shard_id], now) for s in shards if (owner == s.shard_id).any()]


def settle(shards: Sequence[Shard]) -> int:
    """One claim round on every shard, in the order given."""
    by_id = {s.shard_id: s for s in shards}
    done = 0
    for shard in shards:

        def ask(
            k: int, ids: NDArray[np.int64], ts: NDArray[np.float64], claimer: int = shard.shard_id
        ) -> Release:
            return by_id[k].release(ids, ts, claimer)

        done += claim_round(shard, ask)
    return done


def push_halo(shards: Sequence[Shard], now: float) -> None:
    by_id = {s.shard_id: s for s in shards}
    for shard in shards:
        for k, delta in shard.halo_delta().items():
            by_id[k].apply_halo(shard.shard_id, delta, now)


class LocalShards:
    def __init__(self, region: Region, shard_map: ShardMap | None = None) -> None:
        self.region = region
        self.map = shard_map or ShardMap(region)
        self.shards = [Shard(region, self.map, k) for k in range(region.shard_count)]

    def __getitem__(self, k: int) -> Shard:
        return self.shards[k]

    def __iter__(self) -> Iterator[Shard]:
        return iter(self.shards)

    def __len__(self) -> int:
        return len(self.shards)

    def route(self, rows: NDArray[np.void], now: float) -> list[IngestResult]:
        return route(self.shards, rows, now)

    def settle(self) -> int:
        return settle(self.shards)

    def push_halo(self, now: float) -> None:
        push_halo(self.shards, now)

    def load(self, rows: NDArray[np.void], now: float) -> None:
        """Ingest, settle and push halos: the fleet is fully visible afterwards."""
        self.route(rows, now)
        self.settle()
        self.push_halo(now)
