"""The ride layer's door to the shards: :class:`api.services.ports.RideShards` over Ray.

Every shard call the ride services make goes through this one class; nothing else in the
ride layer touches a Ray handle. Handoffs, accepts and declines go out batched (one call
out per shard at a time, :class:`actors.directory.BatchedCall`); the rest are single
calls awaited through the reply poller (:func:`actors.directory.shard_call`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from actors.directory import BatchedCall, ShardDirectory, shard_call
from dispatch.errors import Unavailable


class RayRideShards:
    def __init__(self, directory: ShardDirectory) -> None:
        self.directory = directory
        self.handoffs = BatchedCall(directory, "add_rides")
        self.accepts = BatchedCall(directory, "accept_offers")
        self.declines = BatchedCall(directory, "decline_offers")

    async def hand_over(self, shard_id: int, request: dict[str, Any]) -> None:
        await self.handoffs.add(int(shard_id), request)

    async def accept(self, shard_id: int, offer_id: str, driver_id: int) -> dict[str, Any]:
        return await self.accepts.add(int(shard_id), (offer_id, int(driver_id)))

    async def decline(self, shard_id: int, offer_id: str, driver_id: int) -> None:
        await self.declines.add(int(shard_id), (offer_id, int(driver_id)))

    async def trip_ended(self, shard_id: int, driver_id: int) -> None:
        await shard_call(self.directory.handle(int(shard_id)).trip_ended.remote(int(driver_id)))

    async def cancel_ride(self, shard_id: int, ride_id: str) -> None:
        await shard_call(self.directory.handle(int(shard_id)).cancel_ride.remote(ride_id))

    async def find_driver(self, driver_id: int) -> tuple[int, dict[str, Any]] | None:
        """Asked of every shard at once; of two holders mid-handoff, the newer position.
        Unavailable when no shard holds the driver and some shard did not answer: the
        driver may be in that one."""
        rows = await asyncio.gather(
            *(shard_call(h.driver.remote(int(driver_id))) for h in self.directory.all()),
            return_exceptions=True,
        )
        held = [(k, r) for k, r in enumerate(rows) if isinstance(r, dict) and r and not r.get("pending")]
        if held:
            return max(held, key=lambda kr: kr[1].get("ts", 0))
        failed = [r for r in rows if isinstance(r, BaseException)]
        if failed:
            raise Unavailable(f"{len(failed)} of {len(rows)} shards did not answer", dependency="shard")
        return None
