"""The shard actor: a thin asyncio shell around one :class:`dispatch.shard.Shard`.

A plain class; ``actors/directory.py`` applies ``ray.remote`` with the restart, placement
and concurrency options. The actor is single-threaded (an asyncio actor: calls interleave
only at ``await`` points, and the core is never awaited mid-update), so the core needs
no locks.

Besides serving calls it runs a housekeeping loop that moves the core's effects:
claims of newly seen drivers to every other shard (handoff), halo pushes to neighbours,
the staleness sweep, and every ``[surge] interval_s`` the surge readings of the zones
this shard owns (``actors/surge.py``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np

from actors.events import EventPublisher
from actors.ingest_link import IngestServer
from actors.settings import ShardSettings
from actors.surge import surge_hash_ttl_s, zone_record
from dispatch.dispatcher import Dispatcher, DriverStatusChange, LiveIds, Notify, Record, Reserve
from dispatch.drivers import LOCATION_DTYPE, DriverStatus, take_rows
from dispatch.errors import Conflict, DispatchError, InvalidInput
from dispatch.handoff import claim_round_async, newest_holders
from dispatch.region import Region
from dispatch.rides import RideRequest
from dispatch.shard import HALO_DTYPE, HaloDelta, Shard, TripLink
from dispatch.shardmap import ShardMap
from dispatch.surge_feed import SurgeFeed

log = logging.getLogger("dispatch.shard")

# The housekeeping loop's period: offers of reserved halo drivers and other queued
# notices go out within it.
LOOP_INTERVAL_S = 0.05
# How often pending drivers are claimed from the other shards. A driver that crosses a
# border is invisible for at most this long plus one round trip. Each round is a Ray call
# to a peer or three whenever drivers cross borders (always, at city load): at 200k
# updates/s, claiming every 50 ms cost the shards 2.84 us of CPU an update, every 100 ms
# 2.47 us (the rounds themselves 0.38 -> 0.25 us, the rest Ray's side of the calls).
# At 10k rides/min on top, the claim calls were 13/s into each shard of ~85 (a Ray call
# costs ~0.5 ms of the callee's CPU and ~0.4 ms of the caller's here): every 200 ms
# halves them, and a crossing driver is missing from matching for at most a tick.
CLAIM_INTERVAL_S = 0.2
# Drivers crossing borders one by one (at 200k updates/s, 87 a second over the four shards:
# about ten a round) wait for the next round up to this long; a crowd of pending drivers
# (a shard that just restarted, or took a neighbour's territory) is claimed every
# CLAIM_INTERVAL_S. In bench_mission's 40 s window this cut the claim calls from 40.0 to
# 25.5 a second and the shards' CPU from 27.3 to 25.6 s.
CLAIM_MAX_WAIT_S = 0.4
CLAIM_CROWD = 500
# How often halo positions are pushed to neighbours. Halo drivers are candidates, not
# precise positions (an offer is reserved with the owner, which has the live one), and
# with a 3 km halo in a compact city most drivers are in some neighbour's halo: pushing
# once a second keeps that traffic near the ingest rate instead of a multiple of it.
HALO_INTERVAL_S = 1.0
SWEEP_INTERVAL_S = 5.0
# Upper bounds (seconds) of the buckets the gaps between matching ticks are counted in.
TICK_GAP_BUCKETS = (0.3, 0.4, 0.5, 0.75, 1.0, 2.0)
# The rider sees its driver move at most this often.
TRIP_POSITION_INTERVAL_S = 0.5
# A trip position that reached no rider's socket mutes that trip's positions this long
# (Shard.mute_trip_positions): a rider opening the app waits at most this for the next.
TRIP_POSITION_MUTE_S = 3.0
RATE_WINDOW_S = 10.0


def _restarted() -> bool:
    """Whether Ray restarted this actor (False outside an actor, for a plain instance)."""
    import warnings

    try:
        import ray

        # Ray 2.60's property reads the deprecated ``actor_id`` inside and warns on every
        # start of every shard; the answer itself is what we need.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:
        return False


def _node_ip() -> str | None:
    """The address of the Ray node this actor runs on (None outside an actor)."""
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:
        return None


def incarnation_token() -> str:
    """A short token naming one start of a shard: milliseconds since the epoch in base 36
    and two random characters (two restarts in one millisecond stay apart)."""
    import secrets
    import string

    digits = string.digits + string.ascii_lowercase
    n, out = int(time.time() * 1000), ""
    while n:
        n, r = divmod(n, 36)
        out = digits[r] + out
    return out + "".join(secrets.choice(digits) for _ in range(2))


def _each(items: list, apply: Callable[[Any], Any], what: str) -> list:
    """``apply(item)`` for each item of a batched call, in order: its result, or the error
    it raised (a malformed item becomes InvalidInput), so one bad item never keeps the
    others out."""
    out: list = []
    for item in items:
        try:
            out.append(apply(item))
        except DispatchError as exc:
            out.append(exc)
        except (TypeError, ValueError) as exc:
            out.append(InvalidInput(f"malformed {what} {item!r:.100}: {exc}"))
    return out


class ShardActor:
    """One shard of one region. Created by :func:`actors.directory.deploy_shards`."""

    def __init__(self, settings: ShardSettings, shard_id: int, peers: Callable[[int], Any]) -> None:
        """``settings`` and ``peers`` (shard id -> a peer's actor handle) come from the
        deploying process; Ray gives the same ones back when it restarts the actor."""
        self.settings = settings
        self.region: Region = settings.region()
        self.map = ShardMap(self.region)
        self.shard_id = shard_id
        self.namespace = settings.namespace
        self._lookup_peer = peers
        self.core = Shard(self.region, self.map, shard_id)
        # This start of the shard, in its offer ids and record ids: never reused by a restart.
        self.incarnation = incarnation_token()
        # A restarted shard offers nothing until an edge has given it the stored state (its
        # drivers' trips above all): before that, a driver on a trip would look available.
        self.dispatcher = Dispatcher(self.core, incarnation=self.incarnation, await_restore=_restarted())
        self.events = EventPublisher(
            settings.redis_url, max_outbox=settings.outbox_max, source=f"{shard_id}:{self.incarnation}"
        )
        self.surge = SurgeFeed(self.core, self.dispatcher.book, self.region.surge_config())
        self._surge_write: asyncio.Task | None = None
        self._notices: list[tuple[str, str | int, dict]] = []
        self._records: list[dict] = []
        self._status_out: list[tuple[int, int, tuple | None]] = []
        # A restarted shard has lost its open rides: an edge reloads them from Postgres.
        self.needs_restore = True
        self.started_at = time.time()
        self.node_ip = _node_ip()
        self._peers: dict[int, Any] = {}
        self._loop_task: asyncio.Task | None = None
        # The claim round and the halo push in flight, beside the loop (see _aside).
        self._claiming: asyncio.Task | None = None
        self._pushing: asyncio.Task | None = None
        # The location stream's own data plane (actors/ingest_link.py): started on the first
        # ``ingest_endpoint`` call, new at every start of the shard.
        self._link = IngestServer(self._ingest_blob, LOCATION_DTYPE.itemsize)
        self._securing: asyncio.Task | None = None
        self.restored_offers_withdrawn = 0
        self.peer_offers_marked = 0
        self._rate: deque[tuple[float, int]] = deque()
        self.loop_errors = 0
        self.tick_cpu_s = 0.0  # CPU of this thread in Dispatcher.tick (stats: rides.tick_cpu_s)
        # Time between matching ticks, counted by bucket upper bound in seconds (stats:
        # rides.tick_gaps): a tick is due every tick_s; a longer gap is a round of the
        # loop held up (a peer call or a flush awaited, the process waiting for a core).
        self.tick_gaps: Counter[str] = Counter()
        # Calls made to other shards, by method (stats: peer_calls): each costs both ends
        # about as much as an edge's call.
        self.peer_calls: Counter[str] = Counter()

    # -- plumbing --------------------------------------------------------------------------

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._housekeeping())

    def _peer(self, shard_id: int):
        handle = self._peers.get(shard_id)
        if handle is None:
            handle = self._lookup_peer(shard_id)
            self._peers[shard_id] = handle
        return handle

    async def _housekeeping(self) -> None:
        last_halo = last_sweep = last_tick = last_pos = last_claim = time.time()
        tick_s = self.dispatcher.config.tick_s
        while True:
            await asyncio.sleep(LOOP_INTERVAL_S)
            try:
                since_claim = time.time() - last_claim + LOOP_INTERVAL_S / 2
                claim_due = since_claim >= CLAIM_MAX_WAIT_S or (
                    since_claim >= CLAIM_INTERVAL_S and self.core.claims_waiting >= CLAIM_CROWD
                )
                if claim_due and (self._claiming is None or self._claiming.done()):
                    last_claim = time.time()
                    self._claiming = self._aside(self._claim_and_adopt(), "claim round")
                now = time.time()
                self.dispatcher.adopt_returning(now)
                if now - last_tick >= tick_s:
                    gap = now - last_tick
                    self.tick_gaps[next((f"{b:g}" for b in TICK_GAP_BUCKETS if gap <= b), "inf")] += 1
                    last_tick = now
                    cpu0 = time.thread_time()
                    effects = self.dispatcher.tick(now)
                    self.tick_cpu_s += time.thread_time() - cpu0
                    self._apply(effects, now)
                if now - last_pos >= TRIP_POSITION_INTERVAL_S:
                    last_pos = now
                    for p in self.core.trip_positions(now):
                        self._notices.append(("rider", p.pop("rider_id"), {"type": "driver_position", **p}))
                await self._flush_out()
                if now - last_halo >= HALO_INTERVAL_S and (self._pushing is None or self._pushing.done()):
                    last_halo = now
                    self._pushing = self._aside(self._push_halo(now), "halo push")
                if now - last_sweep >= SWEEP_INTERVAL_S:
                    last_sweep = now
                    self.core.sweep(now)
                if self.surge.due(now):
                    self._observe_surge(now)
                self._sample_rate(now)
            except Exception:  # never let one bad round stop the loop
                self.loop_errors += 1
                log.exception("shard %s housekeeping round failed", self.shard_id)

    def _aside(self, work: Coroutine[Any, Any, None], what: str) -> asyncio.Task:
        """Run ``work`` beside the housekeeping loop: its calls to other shards (a claim
        round, a halo push) are answered while the loop goes on matching and flushing, so a
        slow peer does not hold this shard's ticks up. The loop starts the next only when
        this one is done. Held to 1.5 cores, the loop had waited 6% of its time on claim
        rounds (up to 0.15 s) and 3% on halo pushes (up to 0.36 s)."""

        async def guarded() -> None:
            try:
                await work
            except Exception:
                self.loop_errors += 1
                log.exception("shard %s %s failed", self.shard_id, what)

        return asyncio.get_running_loop().create_task(guarded())

    async def _claim_and_adopt(self) -> None:
        await self._claim_round()
        # Drivers that just came back get their stored trip or offer before anything else
        # can reserve them (no await between the claim round and this).
        self.dispatcher.adopt_returning(time.time())

    async def _claim_round(self) -> None:
        async def ask(k: int, ids: np.ndarray, ts: np.ndarray):
            self.peer_calls["release"] += 1
            try:
                return await self._peer(k).release.remote(ids, ts, self.shard_id)
            except Exception as exc:
                log.warning("shard %s: claim to shard %s failed: %r", self.shard_id, k, exc)
                self._peers.pop(k, None)
                return exc

        await claim_round_async(self.core, ask, time.time())

    def _apply(self, effects: list, now: float) -> None:
        """Queue the dispatcher's effects; :meth:`_flush_out` sends them."""
        for e in effects:
            if isinstance(e, Notify):
                self._notices.append((e.audience, e.id, e.message))
            elif isinstance(e, Record):
                self._records.append(
                    {
                        "ride_id": e.ride_id,
                        "event": e.event,
                        "data": e.data,
                        "shard_id": self.shard_id,
                        "at": now,
                    }
                )
            elif isinstance(e, Reserve):
                asyncio.get_running_loop().create_task(self._reserve(e))
            elif isinstance(e, DriverStatusChange):
                trip = (e.trip.ride_id, e.trip.rider_id, e.trip.ride_shard) if e.trip else None
                self._status_out.append((e.driver_id, int(e.status), trip))

    async def _reserve(self, e: Reserve) -> None:
        self.peer_calls["reserve_driver"] += 1
        try:
            ok = await self._peer(e.owner).reserve_driver.remote(e.driver_id)
        except Exception as exc:
            log.warning(
                "shard %s: reserve of driver %s at shard %s failed: %r",
                self.shard_id,
                e.driver_id,
                e.owner,
                exc,
            )
            ok = False
        self._apply(self.dispatcher.reserved(e.ride_id, e.driver_id, ok, time.time()), time.time())

    async def _flush_out(self) -> None:
        if self._status_out:
            batch, self._status_out = self._status_out, []
            others = [k for k in range(self.region.shard_count) if k != self.shard_id]
            refs = [self._peer(k).set_driver_status.remote(batch) for k in others]
            self.peer_calls["set_driver_status"] += len(refs)
            await asyncio.gather(*refs, return_exceptions=True)
        if self._notices or self._records or self.events.outbox:
            notices, self._notices = self._notices, []
            records, self._records = self._records, []
            undelivered = await self.events.flush(notices, records)
            now = time.time()
            unheard = self.events.take_unheard()
            if unheard:
                self.core.mute_trip_positions(unheard, now + TRIP_POSITION_MUTE_S)
            for offer_id in undelivered:
                self._apply(self.dispatcher.offer_undelivered(offer_id, now), now)
        elif self.dispatcher.offers_paused:
            await self.events.probe()
        if self.dispatcher.offers_paused and self.events.bus_ok:
            self._apply(self.dispatcher.bus_restored(time.time()), time.time())

    def _observe_surge(self, now: float) -> None:
        """Observe the zones and write their readings, in the background: a slow Redis
        must not hold up claims and matching. A write still out skips this one."""
        self.surge.observe(now)
        if self._surge_write is not None and not self._surge_write.done():
            return
        zones = {z: zone_record(r, now, self.shard_id) for z, r in self.surge.readings(now).items()}
        self._surge_write = asyncio.get_running_loop().create_task(
            self.events.publish_surge(self.region.name, zones, surge_hash_ttl_s(self.surge.config))
        )

    async def _push_halo(self, now: float) -> None:
        deltas = self.core.halo_delta()
        refs = [
            self._peer(k).apply_halo.remote(self.shard_id, d.upserts.tobytes(), d.removals)
            for k, d in deltas.items()
        ]
        self.peer_calls["apply_halo"] += len(refs)
        for k, res in zip(deltas, await asyncio.gather(*refs, return_exceptions=True), strict=True):
            if isinstance(res, BaseException):
                log.warning("shard %s: halo push to %s failed: %r", self.shard_id, k, res)
                self._peers.pop(k, None)

    def _sample_rate(self, now: float) -> None:
        self._rate.append((now, self.core.counters["applied"]))
        while self._rate and self._rate[0][0] < now - RATE_WINDOW_S:
            self._rate.popleft()

    def _updates_per_s(self) -> float:
        if len(self._rate) < 2:
            return 0.0
        (t0, a0), (t1, a1) = self._rate[0], self._rate[-1]
        return (a1 - a0) / (t1 - t0) if t1 > t0 else 0.0

    # -- calls -----------------------------------------------------------------------------

    async def ingest(self, blob: bytes) -> dict:
        """Apply a packed batch of LOCATION_DTYPE rows. Returns counts, never raises for rows.

        Rows that belong to another shard are forwarded there (a router with an older
        map), so an accepted row is never lost here. Routers send the same batches over
        the ingest link (:meth:`ingest_endpoint`) while it is up, and by this call while
        it is not.
        """
        return self._ingest_blob(blob)

    async def ingest_endpoint(self) -> dict:
        """Where this incarnation takes location batches over TCP: ``{host, port, token,
        incarnation}`` (actors/ingest_link.py). The token changes with every start."""
        self._ensure_loop()
        endpoint = await self._link.start(self.node_ip or "127.0.0.1")
        return {**endpoint.as_dict(), "incarnation": self.incarnation}

    def _ingest_blob(self, blob: bytes) -> dict:
        self._ensure_loop()
        rows = np.frombuffer(blob, dtype=LOCATION_DTYPE)
        res = self.core.ingest(rows, time.time())
        forwarded = 0
        if len(res.misrouted):
            shards = self.map.shard_of(res.misrouted["lat"], res.misrouted["lng"])
            for k in np.unique(shards).tolist():
                part = take_rows(res.misrouted, shards == k)
                self._peer(k).ingest.remote(part.tobytes())
                forwarded += len(part)
        return {
            "received": res.received,
            "applied": res.applied,
            "pending": res.new_pending,
            "forwarded": forwarded,
            "dropped": res.dropped,
        }

    async def release(self, ids: np.ndarray, ts: np.ndarray, claimer: int):
        self._ensure_loop()
        return self.core.release(ids, ts, claimer)

    async def apply_halo(self, owner: int, upserts: bytes, removals: np.ndarray) -> None:
        self._ensure_loop()
        delta = HaloDelta(upserts=np.frombuffer(upserts, dtype=HALO_DTYPE), removals=removals)
        self.core.apply_halo(owner, delta, time.time())

    async def nearby(
        self, lat: float, lng: float, radius_m: float, k: int, vclass: int | None = None
    ) -> list[dict]:
        """The k nearest available drivers (own and halo). Raises InvalidInput errors."""
        self._ensure_loop()
        found = self.core.nearby(lat, lng, radius_m, k, time.time(), vclass)
        return [
            {
                "driver_id": f.driver_id,
                "distance_m": f.distance_m,
                "lat": f.lat,
                "lng": f.lng,
                "heading": f.heading,
                "vclass": f.vclass,
                "shard_id": f.owner,
            }
            for f in found
        ]

    async def driver(self, driver_id: int) -> dict | None:
        """One held driver's state, or None."""
        return self._driver_row(int(driver_id))

    async def drivers(self, driver_ids: list[int]) -> dict[int, dict]:
        """The held drivers among ``driver_ids``: ``{driver_id: state}`` (one call for a
        sweep over many drivers instead of one per driver)."""
        rows = {int(d): self._driver_row(int(d)) for d in driver_ids}
        return {d: r for d, r in rows.items() if r is not None}

    def _driver_row(self, driver_id: int) -> dict | None:
        slot = self.core.own.id_to_slot.get(driver_id)
        if slot is None:
            return None
        row = self.core.own.row(slot)
        link = self.core.trips.get(driver_id)
        if link is not None:
            odometer_m = round(self.core.trip_m.get(driver_id, 0.0), 1)
            row["trip"] = {"ride_id": link.ride_id, "odometer_m": odometer_m}
        return row

    # -- rides ---------------------------------------------------------------------------------

    async def add_ride(self, request: dict) -> None:
        """Queue a stored ride request (see :class:`dispatch.rides.RideRequest`). A no-op
        for a ride already queued here or that already left the queue (accepted, expired,
        cancelled: a handoff that comes late), unless the request has ``"reopen": True``
        (its accept could not be stored; see :meth:`dispatch.dispatcher.Dispatcher.add_ride`)."""
        self._ensure_loop()
        now = time.time()
        self._add(request, now)

    def _add(self, request: dict, now: float) -> None:
        fields = dict(request)
        reopen = bool(fields.pop("reopen", False))
        self._apply(self.dispatcher.add_ride(RideRequest(**fields), now, reopen=reopen), now)

    async def inbox(self, items: list[tuple[str, Any]]) -> list:
        """Ride handoffs, accepts, declines and a trip's reads and end in one call (an edge
        batches what arrives for this shard while its previous call is out): each item is
        ``("add", request)`` (as :meth:`add_ride` takes), ``("accept", (offer_id,
        driver_id))``, ``("decline", (offer_id, driver_id))``, ``("driver", driver_id)``
        or ``("trip_ended", driver_id)``. One outcome per item, in order: what
        :meth:`add_ride`, :meth:`accept_offer`, :meth:`decline_offer`, :meth:`driver` or
        :meth:`trip_ended` returns, or the error it would raise; one bad item never keeps
        the others out. One call instead of one per kind: a Ray call costs about half a
        millisecond of this actor's CPU."""
        self._ensure_loop()
        now = time.time()

        def one(item: tuple[str, Any]) -> Any:
            kind, payload = item
            if kind == "add":
                return self._add(payload, now)
            if kind == "driver":
                return self._driver_row(int(payload))
            if kind == "trip_ended":
                return self._apply(self.dispatcher.trip_ended(int(payload)), now)
            offer_id, driver_id = payload
            if kind == "accept":
                return self._accept(offer_id, int(driver_id), now)
            if kind == "decline":
                return self._decline(offer_id, int(driver_id), now)
            raise InvalidInput(f"unknown kind {kind!r}: add, accept, decline, driver or trip_ended")

        out = _each(items, one, "item")
        await self._flush_out()
        return out

    async def restore_rides(self, requests: list[dict]) -> int:
        """Reload open requests after a restart; returns how many were added. Once per
        incarnation, as :meth:`restore` (Conflict after that)."""
        self._ensure_loop()
        if not self.needs_restore:
            raise Conflict(
                f"shard {self.shard_id} incarnation {self.incarnation} has its stored state already",
                incarnation=self.incarnation,
            )
        added = self.dispatcher.restore([RideRequest(**r) for r in requests], time.time())
        self.needs_restore = False
        return added

    async def restore(self, state: dict, incarnation: str | None = None) -> int:
        """Take the stored state after a (re)start: open rides with their declined drivers
        and open offers, and the region's active trips (``RideStore.restore_state``).
        Nothing is offered before this ran. Returns how many rides were added.

        ``incarnation``: the one the edge registered before it read ``state``
        (:meth:`restore_target`); if this is another one (Ray restarted the shard in
        between), raises Conflict and takes nothing: the edge registers this one and
        reads the state again.

        Taken once per incarnation: a second restore raises Conflict and takes nothing.
        Every edge restores restarted shards, so two may read the state and both hand it
        over; the later one's is older than what the shard did since (an accept of a
        restored offer, say), and taking it would put that ride back in the queue and,
        when its stale offer expired, free a driver who is on the trip."""
        self._ensure_loop()
        if incarnation is not None and incarnation != self.incarnation:
            raise Conflict(
                f"state read for incarnation {incarnation} of shard {self.shard_id},"
                f" this is {self.incarnation}",
                incarnation=self.incarnation,
            )
        if not self.needs_restore:
            raise Conflict(
                f"shard {self.shard_id} incarnation {self.incarnation} has its stored state already",
                incarnation=self.incarnation,
            )
        now = time.time()
        added, effects = self.dispatcher.restore_state(state, now)
        self._apply(effects, now)
        self.needs_restore = False
        self._securing = asyncio.get_running_loop().create_task(self._secure_restored_offers())
        return added

    async def offered_drivers(self) -> list[int]:
        """The drivers holding an open offer of this shard's rides (its own drivers, or a
        neighbour's it reserved): asked by a restarted neighbour."""
        self._ensure_loop()
        return [int(d) for d in self.dispatcher.book.offered_driver_ids()]

    async def hold_offered(self, driver_ids: list[int]) -> int:
        """A restarted neighbour holds open offers (restored from Postgres) to these
        drivers, which no shard held when it asked: each is marked offered here if held,
        or when it appears, until that neighbour says the offer ended. Returns how many."""
        self._ensure_loop()
        return self._mark_peer_offers(driver_ids)

    def _mark_peer_offers(self, driver_ids: list[int]) -> int:
        n = self.dispatcher.offered_by_peers([int(d) for d in driver_ids], time.time())
        self.peer_offers_marked += n
        return n

    async def _secure_restored_offers(self) -> None:
        """A restored open offer's driver may be held by another shard (it moved, or was
        claimed there while this shard was down), which knows nothing of the offer and
        would offer it again. Each such driver is reserved at its holder, as an offer to a
        neighbour's driver is; if the holder has it busy or refuses, this offer is
        withdrawn and the ride offered afresh. A driver held nowhere keeps its offer, and
        every neighbour marks it offered when it appears there (:meth:`hold_offered`); if
        it comes back here, it is busy here.

        The other way round too: a neighbour's open offer to a driver of this shard was
        reserved at the previous incarnation, and that reservation died with it. Each
        neighbour is asked which drivers its offers hold, and those are marked offered
        here (:meth:`Dispatcher.offered_by_peers`)."""
        peers = [k for k in range(self.region.shard_count) if k != self.shard_id]
        theirs = await asyncio.gather(
            *(self._peer(k).offered_drivers.remote() for k in peers), return_exceptions=True
        )
        peer_offered = [int(d) for ids in theirs if isinstance(ids, list) for d in ids]
        if peer_offered:
            self._mark_peer_offers(peer_offered)
        own = self.core.own.id_to_slot
        offers = [o for o in self.dispatcher.book.open_offers() if o.driver_id not in own]
        if not offers:
            return
        ids = sorted({int(o.driver_id) for o in offers})
        answers = await asyncio.gather(
            *(self._peer(k).drivers.remote(ids) for k in peers), return_exceptions=True
        )
        holders = newest_holders(zip(peers, answers, strict=True))
        # A driver no shard holds yet (its shard restarted too, and has not heard it
        # since) would come back available wherever its positions land: every neighbour
        # marks it offered when it appears, until this offer ends.
        nowhere = [d for d in ids if d not in holders]
        if nowhere:
            await asyncio.gather(
                *(self._peer(k).hold_offered.remote(nowhere) for k in peers), return_exceptions=True
            )
        for o in offers:
            if o.driver_id not in holders:
                continue
            k, row = holders[o.driver_id]
            ok = False
            if row.get("status") == DriverStatus.AVAILABLE.name.lower():
                try:
                    ok = bool(await self._peer(k).reserve_driver.remote(o.driver_id))
                except Exception:
                    ok = False
            if not ok:
                now = time.time()
                self.restored_offers_withdrawn += 1
                self._apply(self.dispatcher.offer_held_elsewhere(o.offer_id, now), now)
        await self._flush_out()

    async def cancel_ride(self, ride_id: str) -> None:
        now = time.time()
        self._apply(self.dispatcher.cancel_ride(ride_id, now), now)
        await self._flush_out()

    async def accept_offer(self, offer_id: str, driver_id: int) -> dict:
        """Atomic: one accept of an open offer wins; the others get OfferUnavailable."""
        now = time.time()
        taken = self._accept(offer_id, driver_id, now)
        await self._flush_out()
        return taken

    def _accept(self, offer_id: str, driver_id: int, now: float) -> dict:
        acc, effects, eta = self.dispatcher.accept(offer_id, driver_id, now)
        self._apply(effects, now)
        return {
            "ride_id": acc.ride_id,
            "rider_id": acc.rider_id,
            "driver_id": acc.driver_id,
            "offer_id": acc.offer_id,
            "accepted_at": acc.accepted_at,
            "pickup_eta_s": eta,
        }

    async def decline_offer(self, offer_id: str, driver_id: int) -> None:
        self._decline(offer_id, driver_id, time.time())
        await self._flush_out()

    def _decline(self, offer_id: str, driver_id: int, now: float) -> None:
        self._apply(self.dispatcher.decline(offer_id, driver_id, now), now)

    async def driver_offline(self, driver_id: int) -> None:
        now = time.time()
        self._apply(self.dispatcher.driver_gone(driver_id, now), now)

    async def trip_ended(self, driver_id: int) -> None:
        """The ride of ``driver_id`` completed or was cancelled after acceptance."""
        self._apply(self.dispatcher.trip_ended(driver_id), time.time())
        await self._flush_out()

    async def reserve_driver(self, driver_id: int) -> bool:
        """Another shard wants to offer a ride to a driver this shard holds."""
        self._ensure_loop()
        return self.dispatcher.reserve_for_peer(int(driver_id), time.time())

    async def set_driver_status(self, batch: list[tuple[int, int, tuple | None]]) -> int:
        """Status changes decided by other shards, for drivers that may be held here."""
        done = 0
        now = time.time()
        for driver_id, status, trip in batch:
            link = TripLink(*trip) if trip else None
            self.dispatcher.forget_awaited(driver_id)
            if status in (DriverStatus.AVAILABLE, DriverStatus.OFFLINE):
                self.dispatcher.note_freed(driver_id, now)
            done += self.core.set_status(driver_id, DriverStatus(status), link)
        return done

    async def relink(self, trips: list[dict], read_at: float) -> int:
        """Put back on its trip each held driver that the system of record has on one
        (``trips`` as ``RideStore.active_trips`` gives them, read at ``read_at``) but this
        shard holds as free: see :meth:`dispatch.dispatcher.Dispatcher.relink`. Returns how
        many it put back."""
        self._ensure_loop()
        return self.dispatcher.relink(trips, float(read_at), time.time())

    async def trip_rides(self) -> list[str]:
        """The rides of the trips this shard holds a link for (its drivers' and links left
        by drivers it no longer holds): what an edge checks against Postgres to free the
        drivers of rides that ended (:meth:`end_trips`)."""
        self._ensure_loop()
        return sorted({link.ride_id for link in self.core.trips.values()})

    async def end_trips(self, ride_ids: list[str]) -> int:
        """Free the drivers on trips of these ended rides
        (:meth:`dispatch.dispatcher.Dispatcher.end_trips`); returns how many trips it ended."""
        self._ensure_loop()
        d = self.dispatcher
        before = d.unlinked
        now = time.time()
        self._apply(d.end_trips([str(r) for r in ride_ids], now), now)
        await self._flush_out()
        return d.unlinked - before

    async def stats(self) -> dict:
        self._ensure_loop()
        now = time.time()
        out = self.core.stats(now)
        out["updates_per_s"] = round(self._updates_per_s(), 1)
        out["uptime_s"] = round(now - self.started_at, 1)
        out["loop_errors"] = self.loop_errors
        out["region"] = self.region.name
        # Where this incarnation runs: an SRE sees which host holds which shard, and a
        # drill sees a restart (new incarnation, pid) and a move (new node).
        out["node_ip"] = self.node_ip
        out["pid"] = os.getpid()
        out["incarnation"] = self.incarnation
        d = self.dispatcher
        out["rides"] = {
            "open": len(d.book),
            "offers_open": len(d.book.open_offers()),
            "offers_made": d.stats.offers,
            # Matching's cost: requests searched for candidates, and the CPU of the ticks.
            "searches": d.stats.searches,
            "tick_cpu_s": round(self.tick_cpu_s, 3),
            "tick_gaps": dict(self.tick_gaps),
            "reservations": d.stats.reservations,
            "reservations_refused": d.stats.reservations_refused,
            "relinked": d.relinked,
            "unlinked": d.unlinked,
            "offers_reheld": d.offers_reheld,
            # Drivers not held here whose state this shard knows (offered or on a trip from
            # here, or told by a neighbour): given to them if they appear here.
            "awaited": d.awaited_count,
            "trips_held": len(self.core.trips),
            "needs_restore": self.needs_restore,
            "restored_offers_withdrawn": self.restored_offers_withdrawn,
            "peer_offers_marked": self.peer_offers_marked,
        }
        out["events"] = self.events.stats()
        out["ingest_link"] = {"frames": self._link.frames, "refused": self._link.refused}
        out["peer_calls"] = dict(self.peer_calls)
        out["surge"] = {z: m for z, m in self.surge.multipliers(now).items() if m > 1.0}
        return out

    async def live_ids(self) -> LiveIds:
        """The ids of the rides this shard holds live (queued or offered requests, trips of
        its drivers) and of its available and offered drivers (:class:`LiveIds`). Read-only:
        for operators and the drills' invariant checks across shards."""
        self._ensure_loop()
        return self.dispatcher.live_ids(time.time())

    async def restore_needed(self) -> bool:
        """True until an edge has reloaded this shard's open rides (after every start)."""
        self._ensure_loop()
        return self.needs_restore

    async def restore_target(self) -> str | None:
        """This incarnation's token while it waits for its stored state, else None."""
        self._ensure_loop()
        return self.incarnation if self.needs_restore else None

    async def ping(self) -> int:
        self._ensure_loop()
        return self.shard_id
