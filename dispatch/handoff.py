"""The claim round of a handoff, written once for the actor and for the tests.

:func:`claim_round` takes the shard's pending claims and a function that asks one peer
shard to release drivers (``ask(peer, ids, ts) -> (released, kept)``, a Ray call in the
actor, a direct call in tests), and settles the claims:

1. each driver is claimed from the shard that pushed it into our halo (its owner until
   now: a border crossing costs one call to one neighbour, not one to every shard);
2. drivers with no hint, or whose hinted shard neither released nor kept them (it had
   already let them go, or never held them), are claimed from every other shard;
3. :meth:`Shard.settle_claims` applies every answer.

``ask`` may be async (the actor's); :func:`claim_round_async` awaits it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import numpy as np
from numpy.typing import NDArray

from dispatch.shard import Release, Shard

Answer = Release
Ids = NDArray[np.int64]
Times = NDArray[np.float64]
Mask = NDArray[np.bool_]


def _plan(shard: Shard, ids: Ids, hints: Ids) -> dict[int, Mask]:
    """Stage 1: peer -> mask of ids to claim from it."""
    peers = [k for k in range(shard.region.shard_count) if k != shard.shard_id]
    broadcast = (hints < 0) | (hints == shard.shard_id)
    return {k: broadcast | (hints == k) for k in peers if (broadcast | (hints == k)).any()}


def _second_stage(shard: Shard, ids: Ids, hints: Ids, answers: dict[int, Answer]) -> dict[int, Mask]:
    resolved = np.zeros(len(ids), dtype=bool)
    for released, kept, _trips in answers.values():
        resolved |= np.isin(ids, released["driver_id"]) | np.isin(ids, kept)
    retry = ~resolved & (hints >= 0) & (hints != shard.shard_id)
    if not retry.any():
        return {}
    peers = [k for k in range(shard.region.shard_count) if k != shard.shard_id]
    return {k: retry & (hints != k) for k in peers if (retry & (hints != k)).any()}


def newest_holders(answers: Iterable[tuple[int, object]]) -> dict[int, tuple[int, dict[str, Any]]]:
    """``{driver_id: (shard id, row)}`` from shards' answers to "which of these drivers do
    you hold" (``(shard id, {driver_id: row})``; an answer that is not a dict, a failed
    call, is skipped): pending rows are not holdings, and of two holders mid-handoff the
    one with the newer position (``ts``) wins."""
    found: dict[int, tuple[int, dict[str, Any]]] = {}
    for k, rows in answers:
        if not isinstance(rows, dict):
            continue
        for d, row in rows.items():
            if not row or row.get("pending"):
                continue
            held = found.get(int(d))
            if held is None or row.get("ts", 0) > held[1].get("ts", 0):
                found[int(d)] = (k, row)
    return found


def claim_round(shard: Shard, ask: Callable[[int, Ids, Times], Answer]) -> int:
    """Synchronous claim round. Returns how many drivers were claimed."""
    ids, ts, hints = shard.take_claims()
    if not len(ids):
        return 0
    answers: list[Answer] = []
    stage: dict[int, Answer] = {}
    for k, mask in _plan(shard, ids, hints).items():
        stage[k] = ask(k, ids[mask], ts[mask])
    answers += stage.values()
    for k, mask in _second_stage(shard, ids, hints, stage).items():
        answers.append(ask(k, ids[mask], ts[mask]))
    shard.settle_claims(
        ids, [a.released for a in answers], [a.kept for a in answers], [a.trips for a in answers]
    )
    return len(ids)


async def claim_round_async(
    shard: Shard,
    ask: Callable[[int, Ids, Times], Awaitable[Answer | BaseException]],
    now: float,
) -> int:
    """The same round with an async ``ask``.

    A peer that fails to answer may hold the driver (alive but slow, or cut off with its
    state): a driver asked of it and not released or kept by another stays pending (not
    offered) and is claimed again next round (:meth:`Shard.retry_claims`), for up to
    :data:`dispatch.shard.CLAIM_GIVE_UP_S`; only then is it taken as held by nobody (a
    shard that cannot answer that long restarted empty, or is cut off and replaced).
    Taking it at once could leave it available here while the silent peer has it on an
    offer: the cluster drill's partition caught exactly that.
    """
    import asyncio  # the core stays free of asyncio unless this function is used

    ids, ts, hints = shard.take_claims()
    if not len(ids):
        return 0
    unanswered = np.zeros(len(ids), dtype=bool)

    async def run(plan: dict[int, Mask]) -> dict[int, Answer]:
        nonlocal unanswered
        keys = list(plan)
        results = await asyncio.gather(*(ask(k, ids[plan[k]], ts[plan[k]]) for k in keys))
        out: dict[int, Answer] = {}
        for k, r in zip(keys, results, strict=True):
            if isinstance(r, BaseException):
                unanswered |= plan[k]
            else:
                out[k] = r
        return out

    stage = await run(_plan(shard, ids, hints))
    answers = list(stage.values())
    answers += (await run(_second_stage(shard, ids, hints, stage))).values()
    if unanswered.any():
        resolved = [a.released["driver_id"] for a in answers] + [a.kept for a in answers]
        if resolved:
            unanswered &= ~np.isin(ids, np.concatenate(resolved))
        given_up = shard.retry_claims(ids[unanswered], ts[unanswered], hints[unanswered], now)
        unanswered[unanswered] = ~np.isin(ids[unanswered], given_up)
    settle = ~unanswered
    shard.settle_claims(
        ids[settle], [a.released for a in answers], [a.kept for a in answers], [a.trips for a in answers]
    )
    return int(settle.sum())
