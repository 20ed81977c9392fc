"""The edge's restore round (api/upkeep.Upkeep.restore_shards) with stand-ins for the
shards and the store: one shard on a dead host must not hold up the others' restores,
and a shard that does not answer makes the next round come soon. Real shards and
Postgres are in tests/integration/test_shard_recovery.py."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from api.upkeep import Upkeep
from dispatch.errors import Unavailable


class Shards:
    def __init__(self, targets: dict[int, object]) -> None:
        self.targets = targets  # shard -> incarnation, None, "hang" or an exception
        self.restored: list[tuple[int, str]] = []

    async def restore_target(self, k: int):
        target = self.targets[k]
        if target == "hang":  # a shard on a host that died: the call waits for Ray
            await asyncio.sleep(3600)
        if isinstance(target, BaseException):
            raise target
        return target

    async def restore(self, k: int, state: dict, incarnation: str) -> int:
        self.restored.append((k, incarnation))
        return len(state["rides"])


class Store:
    async def register_incarnation(self, region: str, k: int, incarnation: str) -> float:
        return 0.0

    async def restore_state(self, region: str, k: int) -> dict:
        return {"rides": [{"ride_id": f"r-{k}"}], "trips": []}


def _upkeep(targets: dict[int, object]) -> tuple[Upkeep, Shards]:
    shards = Shards(targets)
    edge = SimpleNamespace(
        region=SimpleNamespace(name="sf", shard_count=len(targets)),
        shards=shards,
        rides=SimpleNamespace(rides=Store()),
    )
    return Upkeep(edge), shards


def test_a_restarted_shard_is_restored_while_another_hangs_on_a_dead_host():
    upkeep, shards = _upkeep({0: None, 1: "hang", 2: "inc-2", 3: None})

    async def run():
        task = asyncio.ensure_future(upkeep.restore_shards())
        for _ in range(100):
            if shards.restored:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        return list(shards.restored)

    assert asyncio.run(run()) == [(2, "inc-2")]


def test_a_shard_that_does_not_answer_brings_the_next_round_sooner():
    upkeep, shards = _upkeep({0: "inc-0", 1: Unavailable("restarting")})
    assert asyncio.run(upkeep.restore_shards()) == 1 and shards.restored == [(0, "inc-0")]
    assert upkeep.shards_down
    shards.targets[1] = "inc-1"
    shards.targets[0] = None
    assert asyncio.run(upkeep.restore_shards()) == 1 and shards.restored[-1] == (1, "inc-1")
    assert not upkeep.shards_down and upkeep.restored == 2
    assert Upkeep.RESTORE_RETRY_S < Upkeep.RESTORE_EVERY_S
