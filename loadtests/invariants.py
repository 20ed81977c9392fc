"""What a drill checks after each fault: straight from Postgres, the shards and the stream.

Every figure counts what is broken, so 0 is good for each one.

From Postgres (:func:`check_invariants`): one accepted driver per ride and one active
ride per driver (``double_assignments``); every ride's status and version those of its
last applied event (``events_mismatch``); the ledger balanced (``ledger_imbalance_cents``);
each completed ride charged once (``charged_twice``, ``completed_uncharged``); no offer
opened or closed twice during the drill (``records_applied_twice``); every ride the edges
acknowledged stored (``rides_lost``) and none left open past its maximum wait
(``rides_stuck``).

From the shards, by id (:func:`check_live`, each shard's ``live_ids``, read with Postgres):

- ``rides_not_live``: an acknowledged ride that Postgres has open (requested, offered,
  accepted, arrived, in progress) that no shard holds: not in any ride book, and no shard
  holds its driver with the trip;
- ``rides_live_twice``: a ride held in two places (two books, or a book and a trip);
- ``rides_held_after_end``: a ride a shard holds that Postgres has ended (or never stored);
- ``drivers_in_two_shards``: a driver available in two shards at once;
- ``drivers_offered_twice``: a driver holding open offers of two shards, or holding one
  while available somewhere;
- ``trip_drivers_available``: a driver that Postgres has on a trip, available in a shard.

The shards and Postgres are read moments apart while the load runs on, so a ride that
completes or expires between the two reads, or a driver handed over between two shards'
answers, looks like a breach once. Each mismatch is read again after a pause (Postgres
and the shards both) and counted only if it persists in every read.
:class:`LiveSampler` reads the shards' part the same way every second while a fault is
in place and the system recovers.

From the ride-records stream (:func:`check_records`): every record a shard had made by
the check has left its outbox, been read by the edges' consumer group and acknowledged,
which the consumer does only once Postgres has it (``records_unapplied``); no shard's
outbox overflowed during the drill (``records_dropped``).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from dispatch.events import RIDE_RECORDS_GROUP, RIDE_RECORDS_STREAM

TERMINAL = ("completed", "cancelled", "expired")
ON_TRIP = ("accepted", "arrived", "in_progress")

INVARIANTS = {
    "double_assignments": """
        SELECT (SELECT count(*) FROM (SELECT driver_id FROM rides
                 WHERE status IN ('accepted', 'arrived', 'in_progress') AND driver_id IS NOT NULL
                 GROUP BY driver_id HAVING count(*) > 1) d)
             + (SELECT count(*) FROM (SELECT ride_id FROM trip_events WHERE event = 'accept' AND applied
                 GROUP BY ride_id HAVING count(*) > 1) a)""",
    "events_mismatch": """
        SELECT count(*) FROM rides r, LATERAL (SELECT status, version FROM trip_events e
            WHERE e.ride_id = r.ride_id AND e.applied ORDER BY version DESC LIMIT 1) last
        WHERE last.status <> r.status OR last.version <> r.version""",
    "ledger_imbalance_cents": """
        SELECT coalesce(sum(abs(s)), 0)::bigint FROM (SELECT sum(amount_cents) s FROM ledger_entries
            GROUP BY txn_id) t""",
    "charged_twice": """
        SELECT count(*) FROM (SELECT ride_id FROM payments WHERE kind = 'charge' AND status = 'succeeded'
            GROUP BY ride_id HAVING count(*) > 1) t""",
    "completed_uncharged": """
        SELECT count(*) FROM rides r WHERE status = 'completed' AND completed_at < now() - interval '60 s'
            AND NOT EXISTS (SELECT 1 FROM payments p WHERE p.ride_id = r.ride_id AND p.kind = 'charge')""",
}
# Invariants of one drill: $1 is the last trip_events id before it started, so a figure
# counts only what this drill broke (not what an earlier drill or run left in the table).
DRILL_INVARIANTS = {
    # An offer opened or closed twice (two live copies of one shard both recording it),
    # counted when its second or later copy was stored during the drill.
    "records_applied_twice": """
        SELECT count(*) FROM (SELECT ride_id, event, data->>'offer_id' FROM trip_events
            WHERE applied AND event IN ('offer', 'offer_declined', 'offer_expired') AND data ? 'offer_id'
            GROUP BY 1, 2, 3 HAVING count(*) > 1 AND max(id) > $1) t""",
}


async def last_event_id(database_url: str) -> int:
    """The newest trip_events id (0 for none): where a drill's own events begin."""
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        return int(await conn.fetchval("SELECT coalesce(max(id), 0) FROM trip_events"))
    finally:
        await conn.close()


async def offered_since(database_url: str, after_event_id: int, since_wall: float) -> bool:
    """Whether Postgres has an applied offer made after ``since_wall`` (epoch seconds, the
    shard's clock as recorded) and stored after trip event ``after_event_id``."""
    conn = await asyncpg.connect(database_url, timeout=3)
    try:
        return bool(
            await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM trip_events WHERE id > $1 AND event = 'offer' AND applied"
                " AND at > to_timestamp($2))",
                int(after_event_id),
                float(since_wall),
            )
        )
    finally:
        await conn.close()


async def check_invariants(
    database_url: str, acknowledged: set[str], max_wait_s: float, since_event_id: int = 0
) -> dict[str, int]:
    """The Postgres invariants of the module docstring. Those of :data:`DRILL_INVARIANTS`
    count only trip events after ``since_event_id``."""
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        out = {name: int(await conn.fetchval(sql)) for name, sql in INVARIANTS.items()}
        for name, sql in DRILL_INVARIANTS.items():
            out[name] = int(await conn.fetchval(sql, int(since_event_id)))
        stored = await conn.fetch(
            "SELECT ride_id::text FROM rides WHERE ride_id::text = ANY($1::text[])", list(acknowledged)
        )
        out["rides_lost"] = len(acknowledged) - len(stored)
        out["rides_stuck"] = int(
            await conn.fetchval(
                "SELECT count(*) FROM rides WHERE status IN ('requested', 'offered')"
                " AND requested_at < now() - make_interval(secs => $1)",
                max_wait_s + 30.0,
            )
        )
        return out
    finally:
        await conn.close()


# -- the shards, by id ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Held:
    """One shard's answer to ``live_ids`` (:class:`dispatch.dispatcher.LiveIds`), as sets."""

    requests: frozenset[str] = frozenset()
    trips: frozenset[str] = frozenset()
    available: frozenset[int] = frozenset()
    offered: frozenset[int] = frozenset()

    @classmethod
    def of(cls, live: Any) -> Held:
        """From a ``LiveIds`` or its JSON (``GET /v1/admin/shards/live``: drivers as ``drv-N``)."""

        def get(name: str) -> Iterable:
            return live[name] if isinstance(live, Mapping) else getattr(live, name)

        def driver(d: int | str) -> int:
            return int(d[4:]) if isinstance(d, str) and d.startswith("drv-") else int(d)

        return cls(
            frozenset(map(str, get("requests"))),
            frozenset(map(str, get("trips"))),
            frozenset(map(driver, get("available"))),
            frozenset(map(driver, get("offered"))),
        )


# A shard that did not answer is None: it holds nothing anyone can see.
LiveRead = Callable[[], Awaitable[Sequence[Held | None]]]

SHARD_FIGURES = ("rides_live_twice", "drivers_in_two_shards", "drivers_offered_twice")
LIVE_FIGURES = (*SHARD_FIGURES, "rides_not_live", "rides_held_after_end", "trip_drivers_available")


def shard_offenders(held: Sequence[Held | None]) -> dict[str, set]:
    """What the shards' answers alone show (:data:`SHARD_FIGURES`), by id."""
    rides: Counter[str] = Counter()
    available: Counter[int] = Counter()
    offered: Counter[int] = Counter()
    for h in held:
        if h is None:
            continue
        rides.update(h.requests)
        rides.update(h.trips)
        available.update(h.available)
        offered.update(h.offered)
    return {
        "rides_live_twice": {r for r, n in rides.items() if n > 1},
        "drivers_in_two_shards": {d for d, n in available.items() if n > 1},
        "drivers_offered_twice": {d for d, n in offered.items() if n > 1 or available[d]},
    }


def live_offenders(
    held: Sequence[Held | None],
    acknowledged: Iterable[str],
    statuses: Mapping[str, str],
    trip_drivers: Iterable[int],
) -> dict[str, set]:
    """Every figure of :data:`LIVE_FIGURES`, by id, from one read of the shards (``held``)
    and of Postgres: ``statuses`` of the acknowledged and held rides (a ride it lacks is
    ``rides_lost``'s business, not counted here), and ``trip_drivers``, the drivers of the
    rides it has on a trip."""
    out = shard_offenders(held)
    live: Counter[str] = Counter()
    available: set[int] = set()
    for h in held:
        if h is not None:
            live.update(h.requests)
            live.update(h.trips)
            available |= h.available
    out["rides_not_live"] = {
        r for r in acknowledged if r in statuses and statuses[r] not in TERMINAL and not live[r]
    }
    out["rides_held_after_end"] = {r for r in live if statuses.get(r, "unknown") in (*TERMINAL, "unknown")}
    out["trip_drivers_available"] = set(trip_drivers) & available
    return out


def where(held: Sequence[Held | None], ids: Iterable[str | int]) -> dict[str, dict[str, list[int]]]:
    """For a report: which shards name each of ``ids``, and in which list."""
    out: dict[str, dict[str, list[int]]] = {}
    for i in ids:
        seen: dict[str, list[int]] = {}
        for k, h in enumerate(held):
            if h is None:
                continue
            for name in ("requests", "trips", "available", "offered"):
                if i in getattr(h, name):
                    seen.setdefault(name, []).append(k)
        out[str(i)] = seen
    return out


async def trips_of(database_url: str, drivers: Iterable[int]) -> dict[int, str]:
    """For a report: the ride each of ``drivers`` is on, as Postgres has it."""
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT driver_id, ride_id::text FROM rides WHERE driver_id = ANY($1::bigint[])"
            " AND status = ANY($2::text[])",
            [int(d) for d in drivers],
            list(ON_TRIP),
        )
        return {int(r["driver_id"]): r["ride_id"] for r in rows}
    finally:
        await conn.close()


async def _read_postgres(database_url: str, ride_ids: Iterable[str]) -> tuple[dict[str, str], set[int]]:
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        rows = await conn.fetch(
            "SELECT ride_id::text, status FROM rides WHERE ride_id::text = ANY($1::text[])", list(ride_ids)
        )
        trips = await conn.fetch(
            "SELECT driver_id FROM rides WHERE status = ANY($1::text[]) AND driver_id IS NOT NULL",
            list(ON_TRIP),
        )
        return {r["ride_id"]: r["status"] for r in rows}, {int(t["driver_id"]) for t in trips}
    finally:
        await conn.close()


async def check_live(
    read: LiveRead,
    database_url: str,
    acknowledged: set[str],
    rounds: int = 10,
    wait_s: float = 2.0,
) -> dict[str, set]:
    """The shards' live ids against Postgres (:func:`live_offenders`), read up to ``rounds``
    times ``wait_s`` apart while mismatches remain; what persisted through every read.

    The default spans 18 s: longer than the edges' repair rounds (a trip whose end no
    shard heard is freed by the next unlink round, every 15 s), so what is counted is
    what the engine does not repair by itself, not what it has yet to."""
    found: dict[str, set] | None = None
    for i in range(rounds):
        if i:
            await asyncio.sleep(wait_s)
        held = await read()  # the shards first: a ride ends in Postgres before its shard lets go
        named = set(acknowledged)
        for h in held:
            if h is not None:
                named |= h.requests | h.trips
        statuses, trip_drivers = await _read_postgres(database_url, named)
        now = live_offenders(held, acknowledged, statuses, trip_drivers)
        found = now if found is None else {k: found[k] & now[k] for k in now}
        if not any(found.values()):
            break
    assert found is not None
    return found


@dataclass
class LiveSampler:
    """Reads the shards' live ids every ``every_s`` while a fault is in place and after;
    a breach (:func:`shard_offenders`) is read again ``confirm`` times ``confirm_s`` apart
    and kept only if it persists. ``found`` holds what persisted, by figure."""

    read: LiveRead
    every_s: float = 1.0
    confirm: int = 2
    confirm_s: float = 0.5
    found: dict[str, set] = field(default_factory=lambda: {k: set() for k in SHARD_FIGURES})
    # Where each breach was held when it was last confirmed (:func:`where`), for the report.
    seen_at: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    samples: int = 0
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> dict[str, set]:
        self._stop.set()
        if self._task is not None:
            await self._task
        return self.found

    async def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                seen = shard_offenders(await self.read())
                self.samples += 1
                held: Sequence[Held | None] = []
                for _ in range(self.confirm):
                    if not any(seen.values()):
                        break
                    await asyncio.sleep(self.confirm_s)
                    held = await self.read()
                    again = shard_offenders(held)
                    seen = {k: seen[k] & again[k] for k in seen}
                for k, ids in seen.items():
                    self.found[k] |= ids
                    self.seen_at.update(where(held, ids))
            except Exception:
                pass  # a shard or edge down mid-fault: the next sample tries again
            try:
                await asyncio.wait_for(self._stop.wait(), max(0.0, self.every_s - (time.monotonic() - t0)))
            except TimeoutError:
                pass


# -- the ride-records stream ------------------------------------------------------------------


def records_baseline(stats: Sequence[Mapping]) -> dict[int, tuple[str, int]]:
    """Each answering shard's (incarnation, records dropped so far), at a drill's start."""
    return {
        k: (str(s.get("incarnation")), int(s["events"].get("dropped", 0)))
        for k, s in enumerate(stats)
        if s and "events" in s
    }


async def check_records(
    stats: Callable[[], Awaitable[Sequence[Mapping]]],
    redis_url: str,
    baseline: Mapping[int, tuple[str, int]],
    timeout_s: float = 30.0,
) -> dict[str, int]:
    """``records_unapplied`` and ``records_dropped`` (module docstring), waiting up to
    ``timeout_s`` for each stage. A shard that restarts during the check takes its outbox
    with it (a killed process loses what it had not sent: its rides come back from
    Postgres); only what the same incarnation had waiting is waited for."""
    import redis.asyncio as aioredis

    first = await stats()
    targets = {
        k: (s.get("incarnation"), int(s["events"]["records_sent"]) + int(s["events"]["records_waiting"]))
        for k, s in enumerate(first)
        if s and "events" in s
    }
    left = {"outbox": 0}

    async def sent() -> bool:
        now = await stats()
        waiting = 0
        for k, (inc, target) in targets.items():
            s = now[k] if k < len(now) else {}
            if not s or "events" not in s:
                waiting += 1  # not answering: cannot tell, keep waiting
            elif s.get("incarnation") == inc:
                waiting += max(0, target - int(s["events"]["records_sent"]))
        left["outbox"] = waiting
        return waiting == 0

    deadline = time.monotonic() + timeout_s
    while not await sent() and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    dropped = 0
    for k, s in enumerate(await stats()):
        if s and "events" in s:
            inc, before = baseline.get(k, (None, 0))
            now_dropped = int(s["events"].get("dropped", 0))
            dropped += now_dropped - before if s.get("incarnation") == inc else now_dropped

    r = aioredis.Redis.from_url(redis_url, socket_timeout=5.0)
    try:
        last = (await r.xinfo_stream(RIDE_RECORDS_STREAM))["last-generated-id"]
        last = last.decode() if isinstance(last, bytes) else str(last)

        async def behind() -> int:
            groups = await r.xinfo_groups(RIDE_RECORDS_STREAM)
            group = next(g for g in groups if _text(g["name"]) == RIDE_RECORDS_GROUP)
            delivered = _text(group["last-delivered-id"])
            undelivered = 0
            if _stream_id(delivered) < _stream_id(last):
                undelivered = len(await r.xrange(RIDE_RECORDS_STREAM, f"({delivered}", last) or [])
            pending = await r.xpending_range(RIDE_RECORDS_STREAM, RIDE_RECORDS_GROUP, "-", last, 10_000)
            return undelivered + len(pending)

        stream_left = await behind()
        while stream_left and time.monotonic() < deadline + timeout_s:
            await asyncio.sleep(0.5)
            stream_left = await behind()
    finally:
        await r.aclose()
    return {"records_unapplied": left["outbox"] + stream_left, "records_dropped": dropped}


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _stream_id(sid: str) -> tuple[int, int]:
    ms, _, seq = sid.partition("-")
    return int(ms), int(seq or 0)
