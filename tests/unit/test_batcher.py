"""actors.batching.Batcher: one call per shard at a time, made with what arrived meanwhile,
and with ``min_interval_s`` no more than one call per shard that often."""

from __future__ import annotations

import asyncio
import time

from actors.batching import Batcher


class _Shard:
    """A send that answers each item with itself doubled, after ``delay_s``."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.calls: list[tuple[float, int, list[int]]] = []  # (sent at, shard, items)

    async def send(self, shard_id: int, items: list[int]) -> list[int | BaseException]:
        self.calls.append((time.monotonic(), shard_id, list(items)))
        await asyncio.sleep(self.delay_s)
        return [ValueError(f"bad {i}") if i < 0 else 2 * i for i in items]


async def test_what_arrives_while_a_call_is_out_goes_in_the_next_one():
    shard = _Shard(delay_s=0.05)
    b = Batcher("t", shard.send)
    first = asyncio.ensure_future(b.add(0, 1))
    await asyncio.sleep(0.01)  # its call is out
    rest = await asyncio.gather(*(b.add(0, i) for i in range(2, 6)), return_exceptions=True)
    assert await first == 2 and rest == [4, 6, 8, 10]
    assert [items for _, _, items in shard.calls] == [[1], [2, 3, 4, 5]]
    assert (b.calls, b.items) == (2, 5)


async def test_an_item_fails_alone_and_a_failed_call_fails_each_item():
    shard = _Shard()
    b = Batcher("t", shard.send)
    out = await asyncio.gather(b.add(0, 1), b.add(0, -1), b.add(0, 3), return_exceptions=True)
    assert out[0] == 2 and isinstance(out[1], ValueError) and out[2] == 6

    async def broken(shard_id: int, items: list[int]) -> list[int]:
        raise ConnectionError("shard gone")

    b = Batcher("t", broken)
    out = await asyncio.gather(b.add(0, 1), b.add(0, 2), return_exceptions=True)
    assert all(isinstance(x, ConnectionError) for x in out)


async def test_with_a_minimum_interval_a_shard_gets_at_most_one_call_that_often():
    shard = _Shard()
    b = Batcher("t", shard.send, min_interval_s=0.1)
    t0 = time.monotonic()
    assert await b.add(0, 1) == 2  # a lone item on an idle shard goes at once
    assert time.monotonic() - t0 < 0.05
    # Items that come within the interval wait for it, and go together.
    out = await asyncio.gather(*(b.add(0, i) for i in range(2, 8)))
    assert out == [4, 6, 8, 10, 12, 14]
    assert [items for _, _, items in shard.calls] == [[1], [2, 3, 4, 5, 6, 7]]
    assert shard.calls[1][0] - shard.calls[0][0] >= 0.1 - 0.005
    # Another shard is not held up by this one's interval.
    t1 = time.monotonic()
    assert await b.add(1, 9) == 18
    assert time.monotonic() - t1 < 0.05


async def test_a_full_batch_does_not_wait_for_the_interval():
    shard = _Shard()
    b = Batcher("t", shard.send, max_items=3, min_interval_s=10.0)
    await b.add(0, 1)
    t0 = time.monotonic()
    out = await asyncio.gather(*(b.add(0, i) for i in range(2, 5)))
    assert out == [4, 6, 8] and time.monotonic() - t0 < 1.0
    assert [items for _, _, items in shard.calls] == [[1], [2, 3, 4]]
