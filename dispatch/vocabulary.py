"""The words the shards, the edges and storage share: ride-record kinds and client messages.

Two vocabularies cross process boundaries as plain strings:

- **Ride records** (:class:`RecordKind`): what a shard appends to the ride-records
  stream for the edges to persist (``dispatch/dispatcher.py`` makes them,
  ``storage/rides.py`` maps each to a trip event). The string values are the wire
  format: records already in a stream must keep meaning the same after an upgrade.
- **Client messages** (:class:`MessageType`): the ``type`` of every message a rider's or
  a driver's socket receives, whether the shard publishes it (offers, positions) or the
  edge does (status changes it causes). ``docs/protocol.md`` documents each.

Both are :class:`~enum.StrEnum`: a member *is* its string, so a message built with
``MessageType.OFFER`` packs exactly like one built with ``"offer"``.

:data:`ENVELOPE_VERSION` is the ``v`` every client-bound message carries; reasons that
travel in ``ride_status`` messages are :class:`StatusReason`.
"""

from __future__ import annotations

from enum import StrEnum

#: The ``v`` of every message a client receives (docs/protocol.md, "Versions").
ENVELOPE_VERSION = 1


class RecordKind(StrEnum):
    """A shard's ride record, as stored on the ride-records stream."""

    OFFERED = "offered"
    OFFER_DECLINED = "offer_declined"
    OFFER_EXPIRED = "offer_expired"
    # The driver went offline with the offer open: for the ride, the same as a timeout.
    OFFER_WITHDRAWN = "offer_withdrawn"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


class MessageType(StrEnum):
    """The ``type`` of a message sent to a client's socket."""

    WELCOME = "welcome"
    STATUS = "status"
    ERROR = "error"
    HEARTBEAT_ACK = "heartbeat_ack"
    BATCH_ACK = "batch_ack"
    OFFER = "offer"
    OFFER_DECLINED = "offer_declined"
    OFFER_EXPIRED = "offer_expired"
    OFFER_WITHDRAWN = "offer_withdrawn"
    RIDE_STATUS = "ride_status"
    DRIVER_POSITION = "driver_position"


class StatusReason(StrEnum):
    """Why a ride changed status without the client asking (``reason`` of ``ride_status``)."""

    NO_DRIVER_FOUND = "no_driver_found"
    RIDER_CANCELLED = "rider_cancelled"
    # The driver of an accepted or started trip stopped reporting (its app or edge died):
    # the server ended the trip (see dispatch/fares.py: orphan_charge).
    DRIVER_LOST = "driver_lost"
    OFFER_DECLINED = RecordKind.OFFER_DECLINED.value
    OFFER_EXPIRED = RecordKind.OFFER_EXPIRED.value
    OFFER_WITHDRAWN = RecordKind.OFFER_WITHDRAWN.value
