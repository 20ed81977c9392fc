"""Frame decoding and checks (api/protocol.py), without a socket."""

from __future__ import annotations

import json
import time

import msgpack
import pytest

from api.protocol import FrameError, InvalidText, LocationRules, decode, parse_batch
from tests.unit.core_helpers import region_and_map

HUGE = 10**400  # 1e400 written out in full: valid JSON, no float holds it
HUGE_JSON = "1" + "0" * 400


@pytest.fixture()
def rules():
    region, smap = region_and_map()
    return LocationRules(region, smap)


@pytest.mark.parametrize("name", ["lat", "lng", "ts", "heading", "speed"])
def test_an_integer_too_big_for_a_float_is_an_invalid_field(rules, name):
    now = time.time()
    text = json.dumps({"type": "location", "id": 3, "lat": 37.77, "lng": -122.42, "ts": now})
    text = text[:-1] + f', "{name}": {HUGE_JSON}}}'  # a repeated key: the last one counts
    msg = decode(text, 10_000)
    assert msg[name] == HUGE
    with pytest.raises(FrameError) as err:
        rules.fields(msg, now)
    assert (err.value.code, err.value.ref) == ("invalid_field", 3)


@pytest.mark.parametrize("name", ["driver_id", "lat", "lng", "ts", "heading", "speed", "vclass", "intent"])
def test_a_batch_column_with_an_integer_too_big_for_its_type_is_an_invalid_field(name):
    region, smap = region_and_map()
    now = time.time()
    msg = {"type": "batch", "id": 4, "driver_id": [1], "lat": [37.77], "lng": [-122.42], "ts": [now]}
    msg[name] = [HUGE]
    with pytest.raises(FrameError) as err:
        parse_batch(msg, region, smap, now)
    assert (err.value.code, err.value.ref) == ("invalid_field", 4)


@pytest.mark.parametrize(
    ("name", "value", "reason"), [("intent", 257, "invalid_intent"), ("vclass", 256, "invalid_vehicle_class")]
)
def test_a_small_column_value_never_wraps_into_a_valid_one(name, value, reason):
    region, smap = region_and_map()
    now = time.time()
    msg = {"type": "batch", "driver_id": [1, 2], "lat": [37.77] * 2, "lng": [-122.42] * 2, "ts": [now] * 2}
    msg[name] = [value, 0]
    batch = parse_batch(msg, region, smap, now)
    assert batch.rejected == {reason: 1}
    assert batch.rows["driver_id"].tolist() == [2]


def test_gateway_rows_are_ordered_by_the_edge_and_dated_by_the_client():
    region, smap = region_and_map()
    now = time.time()
    msg = {"type": "batch", "driver_id": [1], "lat": [37.77], "lng": [-122.42], "ts": [now + 3]}
    rows = parse_batch(msg, region, smap, now, key=now + 0.001).rows
    assert rows["ts"][0] == now + 0.001
    assert abs(rows["ts"][0] + rows["fix_dt"][0] - (now + 3)) < 1e-4


def test_msgpack_cannot_carry_a_huge_integer_at_all():
    with pytest.raises((OverflowError, TypeError)):
        msgpack.packb({"lat": HUGE})


def _code(data, max_bytes=1000):
    with pytest.raises(FrameError) as err:
        decode(data, max_bytes)
    return err.value.code, err.value.ref


def test_a_msgpack_map_with_binary_keys_is_a_bad_frame():
    assert _code(msgpack.packb({b"type": b"location", b"id": 1})) == ("bad_frame", None)
    assert _code(msgpack.packb({"type": "heartbeat", b"lat": 1.0})) == ("bad_frame", None)


def test_another_protocol_version_is_answered_with_the_frames_id():
    assert _code(json.dumps({"type": "heartbeat", "v": 2, "id": "h1"})) == ("unsupported_version", "h1")
    assert _code(msgpack.packb({"type": "heartbeat", "v": 2, "id": 9})) == ("unsupported_version", 9)


def test_the_frame_limit_counts_the_bytes_of_a_text_frame():
    text = json.dumps({"type": "heartbeat", "note": "é" * 60}, ensure_ascii=False)
    assert len(text) <= 100 < len(text.encode())
    code, _ = _code(text, 100)
    assert code == "frame_too_large"
    assert decode(text, len(text.encode()))["type"] == "heartbeat"


def test_a_text_frame_that_is_not_utf8_is_a_bad_frame():
    assert _code(InvalidText(b'{"type": "heartbeat", "x": "\xff"}')) == ("bad_frame", None)
