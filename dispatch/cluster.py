"""All of a region's shards in one process: what the actors do, without Ray.

Routes rows to the shard of their position, runs claim rounds and halo pushes between the
shards by direct calls. For unit tests, benchmarks of the core and the simulator's
offline mode; the running engine uses one actor per shard instead.
"""

from __future__ import annotations

import numpy as np

from dispatch.handoff import claim_round
from dispatch.region import Region
from dispatch.shard import IngestResult, Shard
from dispatch.shardmap import ShardMap


class LocalShards:
    def __init__(self, region: Region, shard_map: ShardMap | None = None) -> None:
        self.region = region
        self.map = shard_map or ShardMap(region)
        self.shards = [Shard(region, self.map, k) for k in range(region.shard_count)]

    def __getitem__(self, k: int) -> Shard:
        return self.shards[k]

    def __iter__(self):
        return iter(self.shards)

    def __len__(self) -> int:
        return len(self.shards)

    def route(self, rows: np.ndarray, now: float) -> list[IngestResult]:
        """Send each row to the shard of its position, as routers do."""
        owner = self.map.shard_of(rows["lat"], rows["lng"])
        return [s.ingest(rows[owner == s.shard_id], now) for s in self.shards if (owner == s.shard_id).any()]

    def settle(self) -> int:
        """One claim round on every shard."""
        done = 0
        for shard in self.shards:

            def ask(k, ids, ts, claimer=shard.shard_id):
                return self.shards[k].release(ids, ts, claimer)

            done += claim_round(shard, ask)
        return done

    def push_halo(self, now: float) -> None:
        for shard in self.shards:
            for k, delta in shard.halo_delta().items():
                self.shards[k].apply_halo(shard.shard_id, delta, now)

    def load(self, rows: np.ndarray, now: float) -> None:
        """Ingest, settle and push halos: the fleet is fully visible afterwards."""
        self.route(rows, now)
        self.settle()
        self.push_halo(now)
