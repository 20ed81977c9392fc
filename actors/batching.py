"""Batching calls that take a list: what arrives while a key's last call is out goes in
its next one. Pure asyncio; the call itself is a typed function the caller gives.

Two users in the edge: its calls to the shards (``actors/client.py``, a key per shard: a
call costs about a millisecond of CPU on each side) and its ride writes to Postgres
(``api/rides.py`` hands ``storage/rides.py`` a grouping made of it: a statement alone
costs ~0.4 ms of client and server CPU on a small machine, a row of a four-row statement
~0.1)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Item = TypeVar("Item")
Outcome = TypeVar("Outcome")

# ``send(key, items)``: one call with the items (to the shard ``key``, say), answering one
# outcome per item in order (a value, or the exception that item failed with).
Send = Callable[[int, list[Item]], Awaitable[Sequence[Outcome | BaseException]]]


class Batcher(Generic[Item, Outcome]):
    """One call that takes a list, made with what arrived while the last call was out:
    at most one call per key at a time.

    ``await batcher.add(key, item)`` returns the item's own outcome from the call's list
    of outcomes (one per item, in order), or raises it when it is an exception. A lone
    item goes out at once, so an idle edge adds no delay; under load an item costs a
    share of one call instead of a whole one. A failed call fails every item in it
    alike, with the error ``send`` raised.

    With ``min_interval_s`` a key gets at most one call that often (unless ``max_items``
    are waiting): an item that comes sooner after the last call waits for the rest of
    the interval, so under load the calls are fewer and carry more items.
    """

    def __init__(
        self, name: str, send: Send[Item, Outcome], *, max_items: int = 256, min_interval_s: float = 0.0
    ) -> None:
        self.name = name
        self.send = send
        self.max_items = max_items
        # At most one call per key this often: what arrives sooner waits for the next.
        self.min_interval_s = min_interval_s
        self._last_sent: dict[int, float] = {}
        self._queued: dict[int, list[tuple[Item, asyncio.Future[Outcome | BaseException]]]] = {}
        # The task sending a key's queue, while it runs (held here: the event loop
        # keeps only weak references to tasks).
        self._senders: dict[int, asyncio.Task[None]] = {}
        self.calls = 0
        self.items = 0

    async def add(self, key: int, item: Item) -> Outcome:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Outcome | BaseException] = loop.create_future()
        self._queued.setdefault(key, []).append((item, fut))
        sender = self._senders.get(key)
        if sender is None or sender.done():
            self._senders[key] = loop.create_task(self._drain(key))
        outcome = await fut
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def _drain(self, key: int) -> None:
        queued = self._queued[key]
        loop = asyncio.get_running_loop()
        while queued:
            wait = self._last_sent.get(key, -math.inf) + self.min_interval_s - loop.time()
            if wait > 0 and len(queued) < self.max_items:
                await asyncio.sleep(wait)
            self._last_sent[key] = loop.time()
            batch = queued[: self.max_items]
            del queued[: self.max_items]
            self.calls += 1
            self.items += len(batch)
            outcomes: Sequence[Outcome | BaseException]
            try:
                outcomes = await self.send(key, [item for item, _ in batch])
                if not isinstance(outcomes, list) or len(outcomes) != len(batch):
                    raise RuntimeError(f"{self.name}: {len(batch)} items, answer {outcomes!r:.200}")
            except Exception as exc:  # the whole call failed: each item fails alike
                outcomes = [exc] * len(batch)
            for (_, fut), outcome in zip(batch, outcomes, strict=True):
                if not fut.done():
                    fut.set_result(outcome)
