"""The one door to the shards: a typed client for one region's shard actors.

Code outside ``actors/`` reaches a shard only through :class:`ShardClient` (location
ingest goes through :class:`actors.router.LocationRouter`, which batches it). Every
method is a coroutine that awaits its reply through the reply poller
(:func:`actors.directory.shard_call`), never on Ray's thread, and raises what the call
means to the caller: the shard's own :class:`~dispatch.errors.DispatchError`, or
:class:`~dispatch.errors.Unavailable` when the shard is dead, restarting, not deployed or
slower than the call's timeout (:func:`actors.directory.remote_error`).

Ride handoffs, accepts and declines, and a trip's reads of its driver and its end, are
batched per shard, together (:class:`actors.batching.Batcher`, ``ShardActor.inbox``): what
arrives while a shard's call is out goes in its next one.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from actors import directory as ray_wiring
from actors.batching import Batcher
from actors.directory import ShardDirectory, remote_error, shard_call
from dispatch.dispatcher import LiveIds
from dispatch.errors import DispatchError, Unavailable
from dispatch.handoff import newest_holders

# The kinds of item of a shard's inbox, by the names its counters have.
_KIND_NAMES = {
    "add": "add_rides",
    "accept": "accept_offers",
    "decline": "decline_offers",
    "driver": "driver_reads",
    "trip_ended": "trips_ended",
}

# At most one inbox call (ride handoffs, accepts, declines) per shard this often. A Ray
# call costs ~0.7 ms of CPU on each side here whatever it carries; at 10k rides a minute
# the calls were ~17 a second into each shard, then ~10.5 at 0.1 s. A lone item on an
# idle edge still goes at once; under load an item waits at most this long.
INBOX_INTERVAL_S = 0.2

# How long a call may take before it counts as the shard being unavailable.
CALL_TIMEOUT_S = 5.0
PING_TIMEOUT_S = 2.0
RESTORE_TIMEOUT_S = 10.0


class ShardClient:
    """The shards of one region in one namespace (see the module docstring)."""

    def __init__(
        self,
        region_name: str,
        shard_count: int,
        namespace: str = ray_wiring.DEFAULT_NAMESPACE,
        *,
        timeout_s: float = CALL_TIMEOUT_S,
        max_batch: int = 256,
        min_call_interval_s: float = INBOX_INTERVAL_S,
    ) -> None:
        self.directory = ShardDirectory(region_name, shard_count, namespace)
        self.region_name = region_name
        self.shard_count = shard_count
        self.namespace = namespace
        self.timeout_s = timeout_s
        self._inbox: Batcher[tuple[str, Any], Any] = Batcher(
            "inbox", self._send_inbox, max_items=max_batch, min_interval_s=min_call_interval_s
        )
        # Per kind of item: the calls that carried one, and the items.
        self._kind_calls: Counter[str] = Counter()
        self._kind_items: Counter[str] = Counter()

    # -- plumbing ----------------------------------------------------------------------------

    async def _call(self, shard_id: int, send: Callable[[Any], Any], timeout_s: float | None = None) -> Any:
        """``send(handle)`` makes the call; its reply, awaited through the poller."""
        try:
            ref = send(self.directory.handle(int(shard_id)))
        except Exception as exc:  # no such actor (not deployed yet), or Ray is gone
            self.directory.forget(int(shard_id))
            raise remote_error(exc) from None
        try:
            return await shard_call(ref, self.timeout_s if timeout_s is None else timeout_s)
        except Unavailable:
            self.directory.forget(int(shard_id))  # a restarted shard may have a new handle
            raise

    def forget(self, shard_id: int) -> None:
        """Drop the cached handle of a shard (looked up again on the next call)."""
        self.directory.forget(shard_id)

    @property
    def batch_counts(self) -> dict[str, tuple[int, int]]:
        """``{name: (calls, items)}`` of the batched calls so far: ``inbox`` for the calls
        themselves, and per kind of item (``add_rides``, ``accept_offers``,
        ``decline_offers``) the calls that carried one and the items."""
        out = {"inbox": (self._inbox.calls, self._inbox.items)}
        for kind, name in _KIND_NAMES.items():
            out[name] = (self._kind_calls[kind], self._kind_items[kind])
        return out

    # -- drivers -----------------------------------------------------------------------------

    async def nearby(
        self, shard_id: int, lat: float, lng: float, radius_m: float, k: int, vclass: int | None = None
    ) -> list[dict]:
        """The ``k`` nearest available drivers the shard sees (its own and its halo)."""
        return await self._call(shard_id, lambda h: h.nearby.remote(lat, lng, radius_m, k, vclass))

    async def driver(self, shard_id: int, driver_id: int) -> dict | None:
        """One shard's row of a driver, or None if it does not hold it (batched: a trip
        reads its driver's odometer when it starts and ends)."""
        return await self._inbox.add(int(shard_id), ("driver", int(driver_id)))

    async def find_driver(self, driver_id: int, hint: int | None = None) -> tuple[int, dict] | None:
        """``(shard id, row)`` of the shard that holds the driver, or None if none does.

        With ``hint`` (the shard the driver most likely is in, say its ride's), that shard
        is asked first and, if it holds the driver as its own, alone: one call instead of
        one per shard. Otherwise as :meth:`find_drivers`."""
        if hint is not None and 0 <= hint < self.shard_count:
            try:
                row = await self.driver(hint, driver_id)
            except DispatchError:
                row = None
            if row and not row.get("pending"):
                return int(hint), row
        found = await self.find_drivers([driver_id])
        if int(driver_id) not in found:
            raise Unavailable("a shard that may hold the driver did not answer", dependency="shard")
        return found[int(driver_id)]

    async def find_drivers(self, driver_ids: Sequence[int]) -> dict[int, tuple[int, dict] | None]:
        """``{driver_id: (shard id, row) or None}``: every shard asked once, for all the
        drivers at once; of two holders mid-handoff, the newer position; None when no shard
        holds the driver. A shard that does not answer may hold any of them, so while one
        does not, a driver none of the others holds is left out of the answer (unknown)
        rather than answered None: a sweep that ends trips of lost drivers must not end a
        live one because of a Ray hiccup."""
        ids = sorted({int(d) for d in driver_ids})
        if not ids:
            return {}
        answers = await asyncio.gather(
            *(self._call(k, lambda h: h.drivers.remote(ids)) for k in range(self.shard_count)),
            return_exceptions=True,
        )
        found: dict[int, tuple[int, dict] | None] = dict(newest_holders(enumerate(answers)))
        if not any(isinstance(a, BaseException) for a in answers):
            for d in ids:
                found.setdefault(d, None)
        return found

    async def driver_offline(self, shard_id: int, driver_id: int) -> None:
        await self._call(shard_id, lambda h: h.driver_offline.remote(int(driver_id)))

    async def trip_ended(self, shard_id: int, driver_id: int) -> None:
        """The ride of ``driver_id`` completed, or was cancelled after acceptance (batched)."""
        await self._inbox.add(int(shard_id), ("trip_ended", int(driver_id)))

    # -- rides -------------------------------------------------------------------------------

    async def hand_over(self, shard_id: int, request: dict, *, reopen: bool = False) -> None:
        """Queue a stored ride request (:class:`dispatch.rides.RideRequest` fields) in its
        shard (batched); a no-op for a ride the shard holds or already let go of (a late
        handoff must not reopen a ride a driver took), unless ``reopen``: the ride's accept
        could not be stored, so it waits for a driver again. Raises the shard's error for
        this request."""
        await self._inbox.add(int(shard_id), ("add", {**request, "reopen": True} if reopen else request))

    async def accept(self, shard_id: int, offer_id: str, driver_id: int) -> dict:
        """Accept an open offer (batched; atomic in the shard: one accept wins, the others
        get OfferUnavailable). Returns ``{ride_id, rider_id, driver_id, offer_id,
        accepted_at, pickup_eta_s}``.

        Only the live incarnation of the shard can grant it. The call goes through the
        handle of the named actor (``ray.get_actor``), and Ray sends every call on an
        actor's handle to its current process: after a restart the GCS holds the new
        one's address, so a previous process still running on a host cut off from the
        cluster never sees an accept. Offer ids carry their incarnation; the live one
        holds an earlier incarnation's offer only if it was restored from Postgres (an
        offer recorded before the takeover), so an offer made by a cut-off process alone
        is answered OfferUnavailable."""
        return await self._inbox.add(int(shard_id), ("accept", (offer_id, int(driver_id))))

    async def decline(self, shard_id: int, offer_id: str, driver_id: int) -> None:
        """Decline an open offer (batched)."""
        await self._inbox.add(int(shard_id), ("decline", (offer_id, int(driver_id))))

    async def cancel_ride(self, shard_id: int, ride_id: str) -> None:
        await self._call(shard_id, lambda h: h.cancel_ride.remote(ride_id))

    async def relink(self, shard_id: int, trips: Sequence[dict], read_at: float) -> int:
        """Give the shard the region's active trips (``RideStore.active_trips``, read at
        ``read_at``, epoch s): it puts back on its trip each driver it holds as free that
        Postgres has on one (``Dispatcher.relink``). Returns how many it put back."""
        return int(
            await self._call(shard_id, lambda h: h.relink.remote(list(trips), read_at), RESTORE_TIMEOUT_S)
        )

    async def trip_rides(self, shard_id: int) -> list[str]:
        """The rides of the trips the shard holds a link for (``ShardActor.trip_rides``)."""
        return [str(r) for r in await self._call(shard_id, lambda h: h.trip_rides.remote())]

    async def end_trips(self, shard_id: int, ride_ids: Sequence[str]) -> int:
        """Free the shard's drivers on trips of these ended rides; how many it freed."""
        return int(await self._call(shard_id, lambda h: h.end_trips.remote(list(ride_ids))))

    async def restore_needed(self, shard_id: int) -> bool:
        """True until the shard's open rides have been reloaded since it (re)started."""
        return bool(await self._call(shard_id, lambda h: h.restore_needed.remote()))

    async def restore_rides(self, shard_id: int, requests: Sequence[dict]) -> int:
        """Reload open ride requests into a (re)started shard; returns how many it added."""
        return int(
            await self._call(shard_id, lambda h: h.restore_rides.remote(list(requests)), RESTORE_TIMEOUT_S)
        )

    async def restore_target(self, shard_id: int) -> str | None:
        """The incarnation of the shard while it waits for its stored state, else None."""
        target = await self._call(shard_id, lambda h: h.restore_target.remote())
        return None if target is None else str(target)

    async def restore(self, shard_id: int, state: dict, incarnation: str | None = None) -> int:
        """Give a (re)started shard its stored state: open rides with their declined drivers
        and open offers, and the region's active trips (``RideStore.restore_state``). The
        shard offers nothing until it has them. Returns how many rides it added.

        With ``incarnation`` (from :meth:`restore_target`, registered before ``state`` was
        read), a shard that has restarted since refuses it with Conflict; so does one that
        has its state already (another edge restored it first)."""
        return int(
            await self._call(shard_id, lambda h: h.restore.remote(state, incarnation), RESTORE_TIMEOUT_S)
        )

    async def _send_inbox(self, shard_id: int, items: list[tuple[str, Any]]) -> list:
        kinds = Counter(kind for kind, _ in items)
        self._kind_calls.update(kinds.keys())
        self._kind_items.update(kinds)
        return await self._call(shard_id, lambda h: h.inbox.remote(items))

    # -- operations --------------------------------------------------------------------------

    async def ping(self, shard_id: int, timeout_s: float = PING_TIMEOUT_S) -> bool:
        """Whether the shard answers (with its own id) within ``timeout_s``. Never raises."""
        try:
            return await self._call(shard_id, lambda h: h.ping.remote(), timeout_s) == shard_id
        except Exception:
            return False

    async def stats(self, shard_id: int) -> dict:
        return await self._call(shard_id, lambda h: h.stats.remote())

    async def live_ids(self, shard_id: int) -> LiveIds:
        """The ids of what the shard holds live (:class:`dispatch.dispatcher.LiveIds`):
        its open requests, the trips of its drivers, its available and offered drivers."""
        return await self._call(shard_id, lambda h: h.live_ids.remote())

    async def all_stats(self) -> list[dict | BaseException]:
        """Every shard's stats, in shard order; a shard that fails gives its error instead."""
        return list(
            await asyncio.gather(*(self.stats(k) for k in range(self.shard_count)), return_exceptions=True)
        )
