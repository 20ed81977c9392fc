"""What every edge process does in the background to keep Postgres and the shards in step.

- :class:`RecordConsumer` writes the shards' ride records (offers made, declined or timed
  out, requests expired; the Redis stream ``dispatch:ride-records``) into Postgres. One
  edge at a time holds the consumer lease (a Redis key it renews); the others stand by and
  take over within ``LEASE_S`` if it dies, first finishing what it had read but not
  acknowledged. Records of one ride are applied in stream order; all the rides of a read
  in one transaction (``RideStore.apply_many``). A record is acknowledged only once
  Postgres has it, so a Postgres or edge
  outage delays records and never loses them (``RideStore.apply_records`` is idempotent
  by source, the record's own ``record_id`` (its stream id for records without one), so a
  record read twice, or sent twice by its shard, is stored once; a ride Postgres refuses
  fails alone and is read again, the others are stored).
- :class:`Upkeep` runs the slower loops: reload the open rides of a shard that (re)started
  (``ShardActor.restore_needed``), retry rides stored while their shard was unreachable,
  and charge completed rides whose charge did not run (an edge that died between the
  ``complete`` write and the charge), and expire rides left open in Postgres past their
  maximum wait that no shard holds. Before it reloads a shard it registers the shard's
  new incarnation (``RideStore.register_incarnation``): from then on the records of the
  shard's earlier incarnations are refused, so a previous actor still running on a host
  cut off from the cluster cannot change a ride the new one owns. And every few seconds
  (the edge that consumes the ride records), for two minutes after a shard restarted,
  it gives every shard the region's active trips, so that a driver whose trip's link was
  lost in the restart, while it changed shards, is put back on its trip instead of
  looking free (``ShardActor.relink``). The other way round, every 15 s it asks the
  shards which trips they hold and frees the drivers of those Postgres has ended
  (``ShardActor.end_trips``): the word of a ride's end can be lost on its way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
import redis.asyncio as aioredis

from dispatch.errors import Conflict, DispatchError, Unavailable
from dispatch.events import PREFIX, RIDE_RECORDS_GROUP, RIDE_RECORDS_STREAM
from storage.rides import RideStore

log = logging.getLogger("dispatch.upkeep")

LEASE_KEY = f"{PREFIX}ride-records:consumer"
# Trips per relink call. Ray passes an argument over 100 KB through the object store of the
# caller's node; a thousand trips are about that. On the namespace cluster the edges'
# Ray drivers use the head node's object store, and one that puts an object while the head
# is down exits ("connection to the plasma store is failed"): the cluster drill's head
# drill lost both edges that way once the relink round sent every trip in one call.
RELINK_CHUNK = 250
LEASE_S = 10.0
READ_COUNT = 1000
# A round that found records is followed by the next one no sooner than this: the records
# of the meantime are then stored in one transaction instead of one each (at 10k rides a
# minute, 28 rounds a second became 10, each ~8 round trips to Redis and Postgres). A
# record reaches Postgres up to this much later; the rider and driver heard of it on the
# bus already, and an accept that overtakes its offer's record is stored all the same
# (RideStore.transition, ``offer_pending``).
ROUND_MIN_INTERVAL_S = 0.1


def upkeep_lease_s() -> float:
    """The lease's life (read at use, so a test can shorten it)."""
    return LEASE_S


def _stream_messages(resp: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The messages of a one-stream XREADGROUP reply: ``[[stream, [(id, fields), ...]]]``
    in RESP2, which the connection speaks (redis-py's annotations describe RESP3's dict)."""
    return resp[0][1] if resp else []


async def apply_round(
    store: RideStore, records: list[tuple[str, dict]]
) -> tuple[list[bool | None], list[DispatchError]]:
    """Store one round of ``(source, record)`` pairs (stream order): every ride's records
    in one transaction (:meth:`RideStore.apply_many`). Each record's outcome, None for
    the records of a ride Postgres refused (``errors`` says why)."""
    return await store.apply_many(records)


class RecordConsumer:
    """The stream → Postgres pump (see the module docstring)."""

    def __init__(self, redis_url: str, consumer: str, store: RideStore) -> None:
        self.redis_url = redis_url
        self.consumer = consumer
        self.store = store
        self.applied = 0
        self.not_applied = 0
        self.failed_rounds = 0
        self.leader = False
        self._task: asyncio.Task | None = None
        self._r: aioredis.Redis | None = None

    async def start(self) -> None:
        self._r = aioredis.Redis.from_url(self.redis_url)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="ride-records")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._r is not None:
            if self.leader:
                try:  # hand over at once instead of after the lease runs out
                    if await self._r.get(LEASE_KEY) == self.consumer.encode():
                        await self._r.delete(LEASE_KEY)
                except Exception:
                    pass
            await self._r.aclose()

    async def _lease(self) -> bool:
        """Take or renew the consumer lease; True while this edge holds it."""
        assert self._r is not None
        me = self.consumer.encode()
        ms = int(upkeep_lease_s() * 1000)
        if await self._r.set(LEASE_KEY, me, nx=True, px=ms):
            return True
        if await self._r.get(LEASE_KEY) == me:
            await self._r.pexpire(LEASE_KEY, ms)
            return True
        return False

    async def _ensure_group(self) -> None:
        assert self._r is not None
        try:
            await self._r.xgroup_create(RIDE_RECORDS_STREAM, RIDE_RECORDS_GROUP, id="0", mkstream=True)
        except aioredis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _keep_lease(self) -> None:
        """Renew (or try to take) the lease every third of its life, whatever the pump is
        doing: a slow Postgres round must not let the lease lapse under a live consumer."""
        while True:
            try:
                self.leader = await self._lease()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.leader = False
                log.warning("ride records lease: %r", exc)
            await asyncio.sleep(upkeep_lease_s() / 3)

    async def _run(self) -> None:
        keeper = asyncio.get_running_loop().create_task(self._keep_lease(), name="ride-records-lease")
        backoff = 0.5
        adopted = False
        try:
            while True:
                try:
                    await self._ensure_group()
                    while True:
                        if not self.leader:
                            adopted = False
                            await asyncio.sleep(upkeep_lease_s() / 3)
                            continue
                        if not adopted:
                            log.info("edge %s consumes the ride records", self.consumer)
                            await self._adopt_pending()
                            adopted = True
                        started = time.monotonic()
                        if await self.round(block_ms=int(upkeep_lease_s() * 250)) < READ_COUNT:
                            await asyncio.sleep(ROUND_MIN_INTERVAL_S - (time.monotonic() - started))
                        backoff = 0.5
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self.failed_rounds += 1
                    log.warning("ride records: %r; retrying in %.1f s", exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(10.0, backoff * 2)
        finally:
            keeper.cancel()

    async def _adopt_pending(self) -> None:
        """Take over what consumers before us read and never acknowledged."""
        assert self._r is not None
        start: bytes | str = "0-0"
        while True:
            # [next start, [(id, fields)], (deleted ids, Redis 7+)]; the claimed records are
            # ours now and come back from our own pending list in the next round.
            res = await self._r.xautoclaim(
                RIDE_RECORDS_STREAM,
                RIDE_RECORDS_GROUP,
                self.consumer,
                min_idle_time=0,
                start_id=start,
                count=READ_COUNT,
            )
            start, claimed = res[0], res[1]
            if start in (b"0-0", "0-0") or not claimed:
                break

    async def round(self, block_ms: int = 1000) -> int:
        """Apply our unacknowledged records, then new ones; returns how many were stored.

        Raises Unavailable (Postgres down): nothing past the failure is acknowledged.
        """
        assert self._r is not None
        # Our own pending first ("0"), so a record that failed is retried before newer ones.
        resp = await self._r.xreadgroup(
            RIDE_RECORDS_GROUP, self.consumer, {RIDE_RECORDS_STREAM: "0"}, count=READ_COUNT
        )
        messages = _stream_messages(resp)
        if not messages:
            resp = await self._r.xreadgroup(
                RIDE_RECORDS_GROUP,
                self.consumer,
                {RIDE_RECORDS_STREAM: ">"},
                count=READ_COUNT,
                block=block_ms,
            )
            messages = _stream_messages(resp)
        if not messages:
            return 0
        items: list[tuple[str, str, dict]] = []  # (stream id, source, record)
        bad: list[bytes] = []
        for msg_id, fields in messages:
            mid = msg_id.decode() if isinstance(msg_id, bytes) else msg_id
            try:
                rec = msgpack.unpackb(fields[b"r"])
                # The record's own id when it has one: a batch the shard sent again after a
                # timeout sits in the stream twice under two stream ids, and is stored once.
                if not isinstance(rec, dict):
                    raise TypeError(f"a record is a mapping, not {type(rec).__name__}")
                source = rec.get("record_id")
                items.append((mid, str(source) if source else mid, rec))
            except Exception:
                bad.append(msg_id)  # not ours to keep: acknowledged and logged
                log.warning("ride records: unreadable message %s", mid)
        done: list[str] = []
        try:
            outcomes, errors = await apply_round(self.store, [(source, rec) for _, source, rec in items])
        finally:
            if bad:
                await self._r.xack(RIDE_RECORDS_STREAM, RIDE_RECORDS_GROUP, *bad)
        for (mid, _, _), applied in zip(items, outcomes, strict=True):
            if applied is None:
                continue  # its ride was refused: not acknowledged, read again next round
            if applied:
                self.applied += 1
            else:
                self.not_applied += 1
            done.append(mid)
        if done:
            await self._r.xack(RIDE_RECORDS_STREAM, RIDE_RECORDS_GROUP, *done)
        if errors:
            raise Unavailable(f"ride records: {errors[0]!r} ({len(errors)} rides refused)")
        return len(done)


class Upkeep:
    """The edge's slower background loops (see the module docstring)."""

    RESTORE_EVERY_S = 2.0
    # While a shard does not answer (its process or host died and Ray is restarting it
    # elsewhere), the next restore round comes this soon: the restarted shard matches
    # nothing until an edge restores it, so the round's interval was up to 2 s of every
    # shard-host recovery.
    RESTORE_RETRY_S = 0.25
    HANDOFF_EVERY_S = 1.0
    SETTLE_EVERY_S = 15.0
    EXPIRE_EVERY_S = 30.0
    ORPHANS_EVERY_S = 30.0
    RELINK_EVERY_S = 5.0
    # The unlink round: trips the shards hold whose ride Postgres ended (the word of the
    # end was lost). Cheap (one small call per shard, one indexed query), so always on.
    UNLINK_EVERY_S = 15.0
    # Relink rounds run while a shard of the region restarted this recently: a trip link
    # is lost only in a restart. A round sends every active trip to every shard, so run
    # all the time it would grow with the city's trips (80k at 10k rides/min).
    RELINK_AFTER_RESTART_S = 120.0

    def __init__(self, edge: Any) -> None:
        self.edge = edge
        self.restored = 0
        self.relinked = 0
        self.unlinked = 0
        self.shards_down = False  # a shard did not answer the last restore round
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="upkeep")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        jobs = ("restore", "handoff", "settle", "expire", "orphans", "relink", "unlink")
        last = dict.fromkeys(jobs, 0.0)
        while True:
            await asyncio.sleep(self.RESTORE_RETRY_S)
            now = time.monotonic()
            restore_every = self.RESTORE_RETRY_S if self.shards_down else self.RESTORE_EVERY_S
            for name, every, job in (
                ("restore", restore_every, self.restore_shards),
                ("handoff", self.HANDOFF_EVERY_S, self.edge.rides.retry_handoffs),
                ("settle", self.SETTLE_EVERY_S, self.edge.rides.settle_unpaid),
                ("expire", self.EXPIRE_EVERY_S, self.edge.rides.expire_lost),
                ("orphans", self.ORPHANS_EVERY_S, self.edge.rides.end_orphans),
                ("relink", self.RELINK_EVERY_S, self.relink_after_restarts),
                ("unlink", self.UNLINK_EVERY_S, self.unlink_ended_trips),
            ):
                if now - last[name] < every:
                    continue
                last[name] = now
                try:
                    await job()
                except Exception as exc:  # a dependency is down: the next round tries again
                    log.warning("upkeep %s: %r", name, exc)

    async def restore_shards(self) -> int:
        """Reload the open rides of every shard that asks for them; returns how many.

        The shards are asked, and restored, side by side: a shard on a dead host holds its
        call until Ray declares the host dead, which must not hold up the others."""
        edge = self.edge
        down = False

        async def one(k: int) -> int:
            nonlocal down
            try:
                incarnation = await edge.shards.restore_target(k)
            except Unavailable:
                down = True  # down or restarting: asked again soon (RESTORE_RETRY_S)
                return 0
            if incarnation is None:
                return 0
            try:
                return await self._restore(k, incarnation)
            except Unavailable:
                down = True  # the shard, or Postgres, went away meanwhile
                return 0

        total = sum(await asyncio.gather(*(one(k) for k in range(edge.region.shard_count))))
        self.shards_down = down
        self.restored += total
        return total

    async def _restore(self, k: int, incarnation: str) -> int:
        """Give shard ``k``'s ``incarnation`` its stored state; how many rides it took."""
        edge = self.edge
        store = edge.rides.rides
        # This incarnation owns the shard from now: records of an earlier one (still
        # running on a host cut off from the cluster) made after this are refused
        # (RideStore.apply_records). Registered before the state is read, so what the
        # earlier one did later is neither in the state nor applied.
        await store.register_incarnation(edge.region.name, k, incarnation)
        # Open rides with their declined drivers and open offers, and the active trips:
        # the shard offers nothing until it has them (a driver on a trip must not
        # come back as available).
        state = await store.restore_state(edge.region.name, k)
        try:
            added = await edge.shards.restore(k, state, incarnation)
        except Conflict:
            return 0  # restarted since: the new incarnation is registered next round
        rides = state["rides"]
        if rides or state["trips"]:
            log.warning(
                "shard %s (re)started: reloaded %d of %d open rides, %d active trips in the region",
                k,
                added,
                len(rides),
                len(state["trips"]),
            )
        return int(added)

    async def relink_after_restarts(self) -> int:
        """:meth:`relink_trips` while a shard of the region registered a new incarnation
        within ``RELINK_AFTER_RESTART_S``; else nothing (one small query)."""
        edge = self.edge
        since = await edge.rides.rides.latest_incarnation_at(edge.region.name)
        if since is None or time.time() - since > self.RELINK_AFTER_RESTART_S:
            return 0
        return await self.relink_trips()

    async def relink_trips(self) -> int:
        """Give every shard the region's active trips (see the module docstring); returns
        how many drivers the shards put back on their trips (:meth:`_repairs_here`)."""
        edge = self.edge
        if not self._repairs_here():
            return 0
        read_at = time.time()
        trips = await edge.rides.rides.active_trips(edge.region.name)
        if not trips:
            return 0

        async def relink(k: int) -> int:
            fixed = 0
            for i in range(0, len(trips), RELINK_CHUNK):
                fixed += await edge.shards.relink(k, trips[i : i + RELINK_CHUNK], read_at)
            return fixed

        total = await self._each_shard(
            "relink", relink, "held %d drivers on trips as free: put back on their trips"
        )
        self.relinked += total
        return total

    async def unlink_ended_trips(self) -> int:
        """Ask every shard which trips it holds, and free the drivers of those whose ride
        Postgres has ended (``ShardActor.end_trips``): the edge that ended a ride tells the
        shards, and that word can be lost (an answer lost as Postgres died, a shard that
        missed the status change), leaving a driver on a trip that is over, never offered
        again. Returns how many trips the shards ended (:meth:`_repairs_here`)."""
        edge = self.edge
        if not self._repairs_here():
            return 0

        async def unlink(k: int) -> int:
            held = await edge.shards.trip_rides(k)
            ended = await edge.rides.rides.ended(held) if held else set()
            return await edge.shards.end_trips(k, sorted(ended)) if ended else 0

        total = await self._each_shard(
            "unlink", unlink, "held %d drivers on trips that had ended: freed them"
        )
        self.unlinked += total
        return total

    def _repairs_here(self) -> bool:
        """Whether this edge runs the rounds that repair the shards from Postgres: the one
        holding the ride-records lease (any edge, without Redis), so not once per edge."""
        records = getattr(self.edge, "records", None)
        return records is None or records.leader

    async def _each_shard(self, what: str, job: Callable[[int], Awaitable[int]], fixed_msg: str) -> int:
        """``job(k)`` for every shard, summed; a shard that fails is logged and skipped
        (the next round tries again), one that repaired something is logged."""
        total = 0
        for k in range(self.edge.region.shard_count):
            try:
                n = await job(k)
            except DispatchError as exc:
                log.warning("%s of shard %s: %s", what, k, exc.message)
                continue
            if n:
                log.warning("shard %s " + fixed_msg, k, n)
            total += n
        return total


class RideCollector:
    """Prometheus families of the ride side of one edge, read at scrape time."""

    def __init__(self, edge: Any) -> None:
        self.edge = edge

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from api.metrics import batch_families

        edge = self.edge
        if edge.rides is not None:
            f = CounterMetricFamily("dispatch_rides", "ride steps taken through this edge", labels=["step"])
            for step, v in edge.rides.counters.items():
                f.add_metric([step], v)
            yield f
            # New rides and accepts go to Postgres in batches (api/rides.py: BatchedWrites):
            # rides per statement says how much of a statement's cost each one shares.
            yield from batch_families(
                ("dispatch_ride_writes", "batched ride statements to Postgres"),
                ("dispatch_ride_write_rows", "rides written by batched statements"),
                "write",
                edge.rides.writes.counts(),
            )
            # Riders' and drivers' events this edge published (storage/bus.py): sent, dropped
            # (Redis down or not reading), refused by Redis.
            f = CounterMetricFamily(
                "dispatch_edge_bus_publishes", "client events this edge published", labels=["outcome"]
            )
            for outcome, v in edge.rides.publisher.counts().items():
                f.add_metric([outcome], v)
            yield f
            g = GaugeMetricFamily(
                "dispatch_ride_handoffs_pending", "stored rides their shard has not taken yet"
            )
            g.add_metric([], len(edge.rides.pending_handoffs))
            yield g
        if edge.records is not None:
            r = edge.records
            f = CounterMetricFamily("dispatch_ride_records", "shard ride records stored", labels=["outcome"])
            f.add_metric(["applied"], r.applied)
            f.add_metric(["not_applied"], r.not_applied)
            yield f
            f = CounterMetricFamily(
                "dispatch_ride_records_refused",
                "shard ride records stored without effect: from a superseded shard incarnation,"
                " or for an offer that is not the ride's open one",
                labels=["reason"],
            )
            f.add_metric(["superseded_incarnation"], r.store.refused_superseded)
            f.add_metric(["stale_offer"], r.store.refused_stale_offer)
            yield f
            g = GaugeMetricFamily("dispatch_ride_records_leader", "1 while this edge consumes the records")
            g.add_metric([], 1.0 if r.leader else 0.0)
            yield g
        if edge.upkeep is not None:
            f = CounterMetricFamily("dispatch_rides_restored", "open rides reloaded into restarted shards")
            f.add_metric([], edge.upkeep.restored)
            yield f
            f = CounterMetricFamily(
                "dispatch_trips_relinked", "drivers on trips that a shard held as free, put back on them"
            )
            f.add_metric([], edge.upkeep.relinked)
            yield f
            f = CounterMetricFamily(
                "dispatch_trips_unlinked", "drivers a shard held on trips that had ended, freed"
            )
            f.add_metric([], edge.upkeep.unlinked)
            yield f
