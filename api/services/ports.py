"""What the ride services need from outside the process, as ``typing.Protocol``s.

The real implementations: :class:`actors.client.ShardClient` (the shards),
:class:`api.rides.BusPublisher` (Redis pub/sub), :class:`actors.surge.SurgeReader` (surge).
Unit tests use in-memory ones (``tests/unit/ride_fakes.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol


class RideShards(Protocol):
    """The shard operations of the ride layer. Every method raises the shard's own
    DispatchError (OfferUnavailable, NotFound, ...) as it is, and Unavailable when the
    shard is down or does not answer in time."""

    async def hand_over(self, shard_id: int, request: dict[str, Any], *, reopen: bool = False) -> None:
        """Queue a stored ride (:meth:`storage.rides.Ride.to_request`) in its shard; a
        no-op if the shard holds it already or let it go (accepted, expired, cancelled
        there), unless ``reopen`` (its accept could not be stored)."""

    async def accept(self, shard_id: int, offer_id: str, driver_id: int) -> dict[str, Any]:
        """Take an offer for ``driver_id`` (atomic in the shard: one accept wins); the
        acceptance, with ``pickup_eta_s``."""
        ...

    async def decline(self, shard_id: int, offer_id: str, driver_id: int) -> None:
        """Decline an offer: the ride goes back to matching without this driver."""

    async def trip_ended(self, shard_id: int, driver_id: int) -> None:
        """The driver's trip is over (completed or cancelled): it is available again."""

    async def cancel_ride(self, shard_id: int, ride_id: str) -> None:
        """Take an open ride out of its shard's queue (its open offer is withdrawn).
        NotFound when the shard does not hold it."""

    async def find_driver(self, driver_id: int, hint: int | None = None) -> tuple[int, dict[str, Any]] | None:
        """``(shard id, row)`` of the shard that holds the driver, or None. The row has
        ``ts`` (epoch s of its latest position) and ``trip`` (``ride_id``,
        ``odometer_m``) while it drives a ride. ``hint``: the shard to ask first."""
        ...

    async def find_drivers(self, driver_ids: Sequence[int]) -> dict[int, tuple[int, dict[str, Any]] | None]:
        """:meth:`find_driver` for many drivers in one round (one call per shard); a
        driver whose answer is unknown (a shard did not answer) is left out."""
        ...


class Publisher(Protocol):
    """Tells a rider or a driver, on whichever edge holds its sockets."""

    async def publish(self, audience: str, ident: str | int, message: dict[str, Any]) -> None:
        """Send ``message`` to ``audience`` ("rider" or "driver") ``ident``. Never raises:
        a lost event is re-read over REST (docs/protocol.md)."""


class SurgeZone(Protocol):
    multiplier: float


class SurgeSource(Protocol):
    """The surge readings the shards publish (``actors.surge.SurgeReader``)."""

    async def zones(self) -> dict[Any, SurgeZone]: ...

    def zone_of(self, lat: float, lng: float) -> Any: ...
