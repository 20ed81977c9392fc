"""Names on the event bus, shared by the shards (publishers) and the edges (relays).

Client-bound events go to one pub/sub channel per rider and per driver; ride records the
edges must persist go to one Redis stream read by a consumer group of edges; each
region's surge multipliers live in one hash the shards write and the edges read.
"""

from __future__ import annotations

PREFIX = "dispatch:"
RIDE_RECORDS_STREAM = f"{PREFIX}ride-records"
RIDE_RECORDS_GROUP = "edges"
RIDER_PATTERN = f"{PREFIX}rider:*"
DRIVER_PATTERN = f"{PREFIX}driver:*"


def rider_channel(rider_id: str) -> str:
    return f"{PREFIX}rider:{rider_id}"


def driver_channel(driver_id: int | str) -> str:
    return f"{PREFIX}driver:{driver_id}"


def client_channel(audience: str, ident: str | int) -> str:
    """The channel of a client: ``audience`` "rider" (``ident`` a rider id) or "driver"."""
    return rider_channel(str(ident)) if audience == "rider" else driver_channel(ident)


def surge_key(region: str) -> str:
    """The hash of a region's surge zones: field = H3 cell, value = msgpack reading."""
    return f"{PREFIX}surge:{region}"


def parse_channel(channel: str) -> tuple[str, str]:
    """``dispatch:rider:r-1`` → ("rider", "r-1"). Raises ValueError for other names."""
    if not channel.startswith(PREFIX):
        raise ValueError(f"not a dispatch channel: {channel!r}")
    kind, _, ident = channel[len(PREFIX) :].partition(":")
    if kind not in ("rider", "driver") or not ident:
        raise ValueError(f"not a client channel: {channel!r}")
    return kind, ident
