"""The city simulation straight into the shard actors and Redis, without the edge:
:class:`DirectTransport`, for exercising the engine's ride side at scale (see
``tests/integration/test_city_ray.py``). ``dispatch simulate`` goes through the edge
(``api/simulate.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from dispatch.shardmap import ShardMap

if TYPE_CHECKING:
    from actors.client import ShardClient


class DirectTransport:
    """Straight into the shard actors (router + :class:`~actors.client.ShardClient`) and
    Redis, without the edge.

    What the edge will do for real clients: route location batches, hand requests to the
    pickup's shard, relay offers and answers. Use it to exercise the engine's ride side
    at scale, or before an edge is up.
    """

    def __init__(self, shard_map: ShardMap, shards: ShardClient, redis_url: str) -> None:
        import redis.asyncio as aioredis

        from actors.router import LocationRouter

        self.map = shard_map
        self.shards = shards
        self.router = LocationRouter(shard_map, shards.directory)
        self.redis = aioredis.Redis.from_url(redis_url)
        self.pubsub = self.redis.pubsub()
        self.ride_shard: dict[str, int] = {}

    async def start(self) -> None:
        await self.router.start()
        await self.pubsub.psubscribe("dispatch:driver:*", "dispatch:rider:*")

    async def close(self) -> None:
        await self.router.stop()
        await self.pubsub.aclose()
        await self.redis.aclose()

    async def send_locations(self, rows: np.ndarray) -> None:
        self.router.submit(rows)

    async def request_ride(self, ride: dict) -> None:
        shard = self.map.shard_for_point(ride["pickup_lat"], ride["pickup_lng"])
        self.ride_shard[ride["ride_id"]] = shard
        await self.shards.hand_over(shard, ride)

    async def accept(self, offer: dict, driver_id: int) -> bool:
        try:
            await self.shards.accept(offer["shard_id"], offer["offer_id"], driver_id)
            return True
        except Exception:  # expired or taken: the driver carries on cruising
            return False

    async def decline(self, offer: dict, driver_id: int) -> None:
        try:
            await self.shards.decline(offer["shard_id"], offer["offer_id"], driver_id)
        except Exception:
            pass

    async def milestone(self, ride_id: str, driver_id: int, what: str) -> bool:
        """The shards keep no trip steps but the end: a completed trip frees the driver."""
        if what == "completed":
            shard = self.ride_shard.pop(ride_id, None)
            if shard is not None:
                await self.shards.trip_ended(shard, driver_id)
        return True

    async def events(self) -> list[tuple[str, str, dict]]:
        import msgpack

        out: list[tuple[str, str, dict]] = []
        while True:
            msg = await self.pubsub.get_message(ignore_subscribe_messages=True, timeout=0.0)
            if not msg:
                return out
            _, kind, ident = msg["channel"].decode().split(":", 2)
            out.append((kind, ident, msgpack.unpackb(msg["data"])))
