"""The client library's Sans-I/O parts: frames, message builders, call ids, errors, tokens."""

from __future__ import annotations

import json

import msgpack
import numpy as np
import pytest

from api import client
from dispatch.drivers import LOCATION_DTYPE


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
def test_a_message_survives_encoding_and_decoding(encoding):
    msg = {"type": "location", "lat": 37.7, "lng": -122.4, "ts": 1.5, "id": 3}
    frame = client.encode(msg, encoding)
    assert isinstance(frame, bytes if encoding == "msgpack" else str)
    assert client.decode(frame) == msg


def test_binary_frames_are_msgpack_and_text_frames_json():
    assert client.decode(msgpack.packb({"type": "welcome"})) == {"type": "welcome"}
    assert client.decode(json.dumps({"type": "welcome"})) == {"type": "welcome"}


@pytest.mark.parametrize("raw", [b"\xc1\xc1", "{not json", json.dumps([1, 2]), msgpack.packb(5)])
def test_a_frame_that_is_not_a_map_is_refused_clearly(raw):
    with pytest.raises(ValueError):
        client.decode(raw)


def test_an_unknown_encoding_is_refused():
    with pytest.raises(ValueError, match="encoding"):
        client.encode({"type": "heartbeat"}, "xml")


def test_builders_leave_out_what_is_not_given():
    assert client.location(1.0, 2.0) == {"type": "location", "lat": 1.0, "lng": 2.0}
    assert client.location(1.0, 2.0, ts=3.0, heading=90.0, speed=0.0) == {
        "type": "location",
        "lat": 1.0,
        "lng": 2.0,
        "ts": 3.0,
        "heading": 90.0,
        "speed": 0.0,
    }
    assert client.online() == {"type": "online"}
    assert client.online(1.0, 2.0, "xl") == {"type": "online", "lat": 1.0, "lng": 2.0, "vehicle_class": "xl"}
    assert client.accept("r", "r:1") == {"type": "accept", "ride_id": "r", "offer_id": "r:1"}
    assert client.trip_step("start_trip", "r") == {"type": "start_trip", "ride_id": "r"}
    assert client.cancel_ride("r") == {"type": "cancel_ride", "ride_id": "r"}
    with pytest.raises(ValueError):
        client.trip_step("teleport", "r")


def test_a_batch_carries_each_column_as_little_endian_bytes():
    rows = np.zeros(3, dtype=LOCATION_DTYPE)
    rows["driver_id"] = [7, 8, 9]
    rows["lat"] = [37.1, 37.2, 37.3]
    rows["intent"] = [1, 0, 2]
    msg = client.batch(rows, ack=True, id=5)
    assert msg["type"] == "batch" and msg["ack"] is True and msg["id"] == 5
    assert np.frombuffer(msg["driver_id"], "<i8").tolist() == [7, 8, 9]
    assert np.frombuffer(msg["lat"], "<f8").tolist() == [37.1, 37.2, 37.3]
    assert np.frombuffer(msg["intent"], "<i1").tolist() == [1, 0, 2]
    # The frame decodes to the same columns (msgpack bin stays bytes).
    assert client.decode(client.encode(msg))["driver_id"] == msg["driver_id"]


def test_call_ids_number_calls_and_recognise_their_replies():
    ids = client.CallIds()
    n1, m1 = ids.stamp({"type": "accept"})
    n2, _ = ids.stamp({"type": "decline"})
    assert n2 == n1 + 1 and m1["id"] == n1
    assert ids.is_reply({"type": "ride_status", "ref": n1}, n1)
    assert not ids.is_reply({"type": "offer"}, n1)


def test_an_error_reply_is_raised_with_its_code():
    with pytest.raises(client.ClientError) as e:
        client.reply_or_raise({"type": "error", "code": "offer_unavailable", "message": "gone", "ref": 4})
    assert e.value.code == "offer_unavailable" and e.value.ref == 4 and e.value.status is None
    ok = {"type": "ride_status", "status": "accepted"}
    assert client.reply_or_raise(ok) is ok


def test_a_rest_error_carries_status_code_and_retry_after():
    body = {"error": {"code": "unavailable", "message": "no Postgres", "detail": {"x": 1}}}
    err = client.error_of(503, body, {"Retry-After": "2"})
    assert isinstance(err, client.ApiError)
    assert (err.status, err.code, err.retry_after_s, err.detail) == (503, "unavailable", 2.0, {"x": 1})
    plain = client.error_of(502, "Bad Gateway", {})
    assert plain.code == "502" and plain.retry_after_s is None


def test_edge_lists_take_commas_and_repeats():
    assert client.edge_list("http://a:1/, http://b:2") == ["http://a:1", "http://b:2"]
    assert client.edge_list(["http://a:1", "http://b:2,http://c:3"]) == [
        "http://a:1",
        "http://b:2",
        "http://c:3",
    ]
    with pytest.raises(ValueError):
        client.edge_list(" , ")


def test_socket_urls():
    assert client.ws_url("http://h:8/", "/v1/ws/driver", "json") == "ws://h:8/v1/ws/driver?encoding=json"
    assert client.ws_url("https://h", "/v1/ws/rider") == "wss://h/v1/ws/rider?encoding=msgpack"


def test_a_minted_token_is_one_the_edge_accepts():
    from api.auth import TokenAuthority
    from api.settings import load_settings

    authority = TokenAuthority(load_settings(jwt_secret="s" * 32))
    principal = authority.verify(client.mint_token("s" * 32, "drv-42", "driver"))
    assert principal.sub == "drv-42" and principal.role.value == "driver"


def test_trip_bodies_take_pairs_or_points():
    body = client.trip_body((1.0, 2.0), {"lat": 3.0, "lng": 4.0}, "xl", quote_id=None, payment_method="cash")
    assert body == {
        "pickup": {"lat": 1.0, "lng": 2.0},
        "dropoff": {"lat": 3.0, "lng": 4.0},
        "vehicle_class": "xl",
        "payment_method": "cash",
    }


async def test_requests_failing_together_on_a_dead_edge_move_on_once():
    """Many requests in flight when their edge dies each see it fail; the client moves to
    the next edge once, not once per request (which could cycle back to the dead one)."""
    import asyncio

    from storage.redis_server import free_port

    async def answer(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        body = b'{"ok": true}'
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    live = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    rest = client.Rest([dead, live], "token")
    try:
        for n in (2, 3, 8):
            rest._edge = 0
            answers = await asyncio.gather(*(rest.call("GET", "/v1/whatever") for _ in range(n)))
            assert answers == [{"ok": True}] * n
            assert rest.url == live
    finally:
        await rest.close()
        server.close()
        await server.wait_closed()
