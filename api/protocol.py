"""The WebSocket protocol, version 1: decoding and validating frames, encoding replies.

Documented with examples in docs/protocol.md. Every frame is one message, a map with a
``type``; binary frames are msgpack, text frames JSON, and the server answers in the
kind the client last used. Nothing here does I/O: the socket handlers in
``api/sockets.py`` pump bytes through these functions.

A bad frame raises :class:`FrameError`, whose ``code`` and message go back to the client
as ``{"type": "error", ...}``; the socket stays open for the frames that follow.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass
from typing import Any, TypeGuard

import msgpack
import numpy as np

from dispatch.drivers import LOCATION_DTYPE, Intent, take_rows
from dispatch.errors import InvalidInput
from dispatch.region import Region
from dispatch.shard import DROP_REASONS, drop_codes
from dispatch.shardmap import OUTSIDE, ShardMap

PROTOCOL_VERSION = 1


class FrameError(InvalidInput):
    """A frame the edge refuses. ``code`` is one of the codes in docs/protocol.md."""

    def __init__(self, code: str, message: str, ref: Any = None, **detail: object) -> None:
        super().__init__(message, **detail)
        self.code = code
        self.ref = ref


# -- decoding ---------------------------------------------------------------------------------


class InvalidText(bytes):
    """The payload of a text frame that is not UTF-8, handed over undecoded by the
    transport (api/ws_server.py) so that :func:`decode` answers it like any bad frame."""

    __slots__ = ()


def decode(data: bytes | str, max_bytes: int) -> dict:
    """A frame's message. FrameError for an oversized frame, bad msgpack/JSON/UTF-8, a
    non-map, a map with keys that are not strings, or another protocol version.

    ``max_bytes`` counts the frame's payload in bytes, text frames as their UTF-8.
    """
    n = len(data) if type(data) is not str or data.isascii() else len(data.encode())
    if n > max_bytes:
        raise FrameError("frame_too_large", f"frame of {n} bytes; the limit is {max_bytes}")
    if type(data) is InvalidText:
        raise FrameError("bad_frame", "text frames must be UTF-8 (JSON); this one is not")
    try:
        msg = msgpack.unpackb(data, strict_map_key=True) if isinstance(data, bytes) else json.loads(data)
    except Exception:
        kind = "msgpack" if isinstance(data, bytes) else "JSON"
        raise FrameError(
            "bad_frame", f"binary frames must be msgpack and text frames JSON: not valid {kind}"
        ) from None
    if not isinstance(msg, dict):
        raise FrameError("bad_frame", "a frame must be a map with a 'type'")
    if isinstance(data, bytes) and not all(type(k) is str for k in msg):
        # msgpack maps may have binary keys (b"type"); JSON's keys are always strings.
        raise FrameError("bad_frame", "a frame's keys must be strings (msgpack str, not bin)")
    v = msg.get("v", PROTOCOL_VERSION)
    if v != PROTOCOL_VERSION:
        raise FrameError(
            "unsupported_version",
            f"protocol version {v!r}; this edge speaks {PROTOCOL_VERSION}",
            msg.get("id"),
        )
    return msg


def encode(message: dict, binary: bool) -> bytes | str:
    if message.get("ref", 0) is None:
        message = {k: v for k, v in message.items() if k != "ref"}
    return msgpack.packb(message) if binary else json.dumps(message, separators=(",", ":"))


def error_message(code: str, message: str, ref: Any = None, **detail: Any) -> dict:
    out: dict[str, Any] = {"type": "error", "v": PROTOCOL_VERSION, "code": code, "message": message}
    if ref is not None:
        out["ref"] = ref
    if detail:
        out["detail"] = detail
    return out


def _real(v: Any) -> TypeGuard[float]:
    """A number a float can hold: an integer written out in full past 1.8e308 (JSON has
    no limit) is not one."""
    t = type(v)
    # The exact types first: every decoded frame has them, and the ABC check costs ~0.4 µs.
    if t is float:
        return True
    if t is int:
        return -_FLOAT_MAX <= v <= _FLOAT_MAX  # compared exactly: no overflow
    if not isinstance(v, numbers.Real) or t is bool:
        return False
    try:
        float(v)
    except (OverflowError, ValueError):
        return False
    return True


_FLOAT_MAX = 1.7976931348623157e308


def field_str(msg: dict, name: str, max_len: int = 200) -> str:
    v = msg.get(name)
    if not (isinstance(v, str) and 0 < len(v) <= max_len):
        raise FrameError(
            "invalid_field", f"'{name}' must be a string of 1..{max_len} characters", msg.get("id")
        )
    return v


# -- driver location frames -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Position:
    lat: float
    lng: float
    ts: float
    heading: float
    speed: float


class LocationRules:
    """Per-frame checks of a driver's position, scalar and cheap (a few µs a frame).

    The same limits as the shards' batch validation (:func:`dispatch.shard.drop_codes`):
    the region's ``[drivers]`` settings and its service area.
    """

    def __init__(self, region: Region, shard_map: ShardMap) -> None:
        self.cfg = region.drivers
        self.map = shard_map
        self.region = region

    def position(self, msg: dict, now: float) -> Position:
        """A location message → Position. FrameError naming what is wrong otherwise."""
        return Position(*self.fields(msg, now))

    def fields(self, msg: dict, now: float) -> tuple[float, float, float, float, float]:
        """:meth:`position` as a plain ``(lat, lng, ts, heading, speed)`` tuple, for the
        per-frame path; the same checks and errors."""
        lat, lng = msg.get("lat"), msg.get("lng")
        if not (_real(lat) and _real(lng)):
            raise FrameError("invalid_field", "'lat' and 'lng' must be numbers", msg.get("id"))
        if not (math.isfinite(lat) and math.isfinite(lng)):
            raise FrameError("invalid_location", "'lat' and 'lng' must be finite", msg.get("id"))
        if not (-90 <= lat <= 90 and -180 <= lng <= 180):
            raise FrameError("invalid_location", f"({lat}, {lng}) is not a position on Earth", msg.get("id"))
        if self.map.shard_for_point(lat, lng) == OUTSIDE:
            raise FrameError(
                "outside_service_area",
                f"({lat}, {lng}) is outside {self.region.display_name}'s service area",
                msg.get("id"),
            )
        ts = msg.get("ts", now)
        if not (_real(ts) and math.isfinite(ts)):
            raise FrameError(
                "invalid_field", "'ts' must be a finite number of seconds since the epoch", msg.get("id")
            )
        cfg = self.cfg
        if ts > now + cfg.max_future_skew_s:
            raise FrameError(
                "invalid_timestamp", f"'ts' is {ts - now:.1f} s in the future; check the clock", msg.get("id")
            )
        if ts < now - cfg.max_age_s:
            raise FrameError(
                "invalid_timestamp",
                f"'ts' is {now - ts:.0f} s old (limit {cfg.max_age_s:g} s)",
                msg.get("id"),
            )
        heading = msg.get("heading")
        if heading is None:
            heading = math.nan
        elif not (_real(heading) and 0 <= heading <= 360):
            raise FrameError("invalid_field", "'heading' must be degrees in 0..360", msg.get("id"))
        speed = msg.get("speed")
        if speed is None:
            speed = math.nan
        elif not (_real(speed) and 0 <= speed <= cfg.max_speed_mps):
            raise FrameError(
                "invalid_field", f"'speed' must be m/s in 0..{cfg.max_speed_mps:g}", msg.get("id")
            )
        return float(lat), float(lng), float(ts), float(heading), float(speed)

    def vehicle_class(self, msg: dict) -> int:
        name = msg.get("vehicle_class", self.region.drivers.vehicle_classes[0])
        classes = self.region.drivers.vehicle_classes
        if name not in classes:
            raise FrameError(
                "invalid_field", f"'vehicle_class' must be one of {list(classes)}", msg.get("id")
            )
        return classes.index(name)


class DriverState:
    """What one driver's socket has told the shards, and the rows that tell them. Pure.

    Every row carries the status the driver last asked for (``Intent.ONLINE`` or
    ``Intent.OFFLINE``), its vehicle class, and an order key from the edge's clock that
    grows strictly from row to row (LOCATION_DTYPE): the shard applies a driver's newest
    row by that key, so neither a position that follows a status change nor a phone
    clock running ahead can undo it. Rows are tuples of LOCATION_DTYPE's fields in order
    (without the padding), as :meth:`actors.router.LocationRouter.submit_one` takes them.
    """

    __slots__ = ("driver_id", "online", "vclass", "last", "_key")

    def __init__(self, driver_id: int) -> None:
        self.driver_id = driver_id
        self.online = False
        self.vclass = -1
        self.last: tuple[float, float] | None = None  # last accepted position
        self._key = 0.0

    def key(self, now: float) -> float:
        """The next order key: ``now``, or just above the previous key if the clock has not
        moved on (or stepped back)."""
        key = now if now > self._key else math.nextafter(self._key, math.inf)
        self._key = key
        return key

    def position(self, lat: float, lng: float, ts: float, heading: float, speed: float, now: float) -> tuple:
        """A checked position (client time ``ts``) → its row."""
        self.last = (lat, lng)
        key = self.key(now)
        intent = _ONLINE if self.online else _OFFLINE
        return (self.driver_id, lat, lng, key, heading, speed, self.vclass, intent, ts - key)

    def go_online(self, vclass: int, pos: Position | None, now: float) -> tuple:
        """Going online (at ``pos``, or the last position: the caller checks there is one)."""
        self.online, self.vclass = True, vclass
        if pos is not None:
            return self.position(pos.lat, pos.lng, pos.ts, pos.heading, pos.speed, now)
        assert self.last is not None
        key = self.key(now)
        return (self.driver_id, *self.last, key, math.nan, math.nan, vclass, _ONLINE, 0.0)

    def go_offline(self, now: float) -> tuple | None:
        """Going offline; None when no position was ever sent (the shards do not know it)."""
        self.online = False
        if self.last is None:
            return None
        key = self.key(now)
        return (self.driver_id, *self.last, key, math.nan, math.nan, self.vclass, _OFFLINE, 0.0)


_ONLINE, _OFFLINE = int(Intent.ONLINE), int(Intent.OFFLINE)


# -- gateway batch frames ---------------------------------------------------------------------

#: column -> (dtype of a raw little-endian buffer, required)
BATCH_COLUMNS: dict[str, tuple[str, bool]] = {
    "driver_id": ("<i8", True),
    "lat": ("<f8", True),
    "lng": ("<f8", True),
    "ts": ("<f8", True),
    "heading": ("<f4", False),
    "speed": ("<f4", False),
    "vclass": ("<i2", False),
    "intent": ("<i1", False),
}
MAX_BATCH_ROWS = 50_000


@dataclass(frozen=True, slots=True)
class Batch:
    rows: np.ndarray  # LOCATION_DTYPE, the good rows
    received: int
    rejected: dict[str, int]  # reason -> rows refused


def _column(msg: dict, name: str, dtype: str, n: int | None) -> np.ndarray:
    v = msg[name]
    try:
        if isinstance(v, bytes):
            arr = np.frombuffer(v, dtype=dtype)
        elif isinstance(v, list):
            arr = np.asarray(v, dtype=np.float64 if dtype[1] == "f" else np.int64)
        else:
            raise TypeError
    except (TypeError, ValueError, OverflowError):
        raise FrameError(
            "invalid_field", f"column '{name}' must be a list of numbers or raw {dtype} bytes", msg.get("id")
        ) from None
    if arr.ndim != 1 or (n is not None and len(arr) != n):
        raise FrameError(
            "invalid_field", f"column '{name}' has {len(arr)} values; 'driver_id' has {n}", msg.get("id")
        )
    return arr


def parse_batch(
    msg: dict, region: Region, shard_map: ShardMap, now: float, key: float | None = None
) -> Batch:
    """A gateway ``batch`` message → the rows to route and the count refused per reason.

    The rows' order key is ``key`` (default ``now``; the socket passes one that grows
    from frame to frame), the ``ts`` column their client time (LOCATION_DTYPE).

    Frame-level faults (a missing column, columns of different lengths, wrong types)
    raise FrameError and nothing of the frame is taken; row-level faults (NaN, out of
    range, from the future, outside the area...) drop those rows only, counted by the
    shards' own reasons.
    """
    missing = [c for c, (_, req) in BATCH_COLUMNS.items() if req and c not in msg]
    if missing:
        raise FrameError("invalid_field", f"a batch needs the columns {missing}", msg.get("id"))
    ids = _column(msg, "driver_id", "<i8", None)
    n = len(ids)
    if n > MAX_BATCH_ROWS:
        raise FrameError(
            "frame_too_large", f"{n} rows in one batch; the limit is {MAX_BATCH_ROWS}", msg.get("id")
        )
    rows = np.zeros(n, dtype=LOCATION_DTYPE)
    rows["driver_id"] = ids
    rows["heading"] = np.nan
    rows["speed"] = np.nan
    rows["vclass"] = -1
    rows["intent"] = int(Intent.POSITION)
    for name, (dtype, _req) in BATCH_COLUMNS.items():
        if name != "driver_id" and name in msg:
            col = _column(msg, name, dtype, n)
            target = LOCATION_DTYPE[name]
            if target.kind == "i":
                # A value the row's field cannot hold would wrap (intent 257 → 1): pin it
                # to the field's extremes instead, which validation refuses.
                info = np.iinfo(target)
                col = np.clip(col, info.min, info.max)
            with np.errstate(invalid="ignore", over="ignore"):
                rows[name] = col
    drop, _shard = drop_codes(rows, now, region.drivers, len(region.drivers.vehicle_classes), shard_map)
    rejected: dict[str, int] = {}
    if drop.any():
        counts = np.bincount(drop, minlength=len(DROP_REASONS) + 1)[1:]
        rejected = {DROP_REASONS[i]: int(c) for i, c in enumerate(counts) if c}
        rows = take_rows(rows, drop == 0)
    key = now if key is None else key
    rows["fix_dt"] = rows["ts"] - key
    rows["ts"] = key
    return Batch(rows, n, rejected)
