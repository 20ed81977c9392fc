"""The client library against real edges: a driver whose edge is killed carries on on
another one (reconnect, re-authenticate, online again with its latest position, offers
still reach it), and a rider hears of its ride again after its edge died."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from api.client import ClientError, DriverClient, Rest, RiderClient
from tests.e2e.test_edge import new_driver
from tests.fixtures_edge import start_edge, wait_ready
from tests.helpers import eventually, scaled

pytestmark = pytest.mark.e2e

# Pacific Heights: a spot these tests keep to themselves.
SPOT = (37.7925, -122.4350)


async def test_a_driver_whose_edge_is_killed_carries_on_on_another_edge(edges, edge_env, tokens, tmp_path):
    doomed = start_edge(edge_env, tmp_path, "edge-doomed")
    wait_ready([doomed])
    b = edges[1]
    _n, sub = new_driver()
    driver = DriverClient([doomed.url, b.url], tokens("driver", sub), give_up_s=scaled(30))
    await driver.start()
    rider_sub = f"r-client-{sub}"
    rider = RiderClient([doomed.url, b.url], tokens("rider", rider_sub))
    await rider.start()
    rest = Rest([b.url], tokens("driver", sub))
    rider_rest = Rest([b.url], tokens("rider", rider_sub))
    try:
        assert driver.url == doomed.url and rider.url == doomed.url
        await driver.go_online(*SPOT, "xl")

        async def available() -> dict | None:
            me = await rest.me()
            return me if me.get("status") == "available" else None

        await eventually(available)

        doomed.proc.send_signal(signal.SIGKILL)
        doomed.proc.wait()
        t0 = time.monotonic()
        await eventually(lambda: driver.connected and driver.url == b.url, timeout_s=5, interval_s=0.02)
        back_s = time.monotonic() - t0
        assert driver.reconnects == 1 and back_s < scaled(3), back_s
        await eventually(lambda: rider.connected and rider.url == b.url, timeout_s=5)

        # Its next position is applied, through edge B, and it is still online there.
        moved = (SPOT[0] + 0.0005, SPOT[1])
        await driver.send_location(*moved, ts=time.time(), speed=5.0)

        async def at_new_position() -> dict | None:
            me = await rest.me()
            ok = me.get("status") == "available" and abs((me.get("lat") or 0) - moved[0]) < 1e-9
            return me if ok else None

        me = await eventually(at_new_position)
        assert me["vehicle_class"] == "xl"

        # It still gets offers, and its accept goes through edge B.
        ride = await rider_rest.request_ride(moved, (moved[0] + 0.005, moved[1]), "xl", payment_method="cash")
        offer = await driver.next("offer", timeout_s=scaled(15))
        assert offer["ride_id"] == ride["ride_id"]
        accepted = await driver.accept(offer)
        assert accepted["status"] == "accepted"
        assert driver.rides == {ride["ride_id"]: "accepted"}
        heard = await rider.next("ride_status", timeout_s=scaled(10))
        while heard["status"] != "accepted":
            heard = await rider.next("ride_status", timeout_s=scaled(10))
        cancelled = await driver.cancel_ride(ride["ride_id"], "test over")
        assert cancelled["status"] == "cancelled" and driver.rides == {}
    finally:
        try:
            await driver.go_offline()
        finally:
            await driver.close()
            await rider.close()
            await rest.close()
            await rider_rest.close()
            doomed.stop()


async def test_a_driver_whose_socket_drops_learns_of_a_cancel_made_meanwhile(edges, tokens):
    """A ride cancelled around a drop reaches the driver: relayed on the new socket, or
    read over REST on resume (``resync``)."""
    a, b = edges
    _n, sub = new_driver()
    driver = DriverClient([a.url, b.url], tokens("driver", sub))
    await driver.start()
    rider_rest = Rest([a.url], tokens("rider", f"r-client2-{sub}"))
    try:
        spot = (SPOT[0] + 0.004, SPOT[1] + 0.004)
        await driver.go_online(*spot, "xl")
        rest = driver.rest

        async def available() -> bool:
            return (await rest.me()).get("status") == "available"

        await eventually(available)
        ride = await rider_rest.request_ride(spot, (spot[0] + 0.005, spot[1]), "xl", payment_method="cash")
        offer = await driver.next("offer", timeout_s=scaled(15))
        await driver.accept(offer)
        # The socket drops (as when an edge closes it), and meanwhile the rider cancels.
        await driver.conn.ws.close()  # type: ignore[union-attr]
        await rider_rest.cancel(ride["ride_id"], "changed plans")
        msg = await driver.next("ride_status", timeout_s=scaled(10))
        assert msg["ride_id"] == ride["ride_id"] and msg["status"] == "cancelled"
        await eventually(lambda: driver.reconnects >= 1 and driver.connected)
        assert driver.rides == {}
    finally:
        try:
            await driver.go_offline()
        finally:
            await driver.close()
            await rider_rest.close()


async def test_sync_tells_a_client_the_status_of_its_own_rides_only(edges, tokens):
    """``sync`` on a socket: the caller's rides with status and version, in one answer;
    someone else's ride and an id that names nothing are both just ``unknown``; a
    malformed request gets its error and the socket goes on."""
    from api import client as proto

    a, _ = edges
    _n, sub = new_driver()
    driver = DriverClient([a.url], tokens("driver", sub))
    await driver.start()
    rider_sub, other_sub = f"r-sync-{sub}", f"r-sync-other-{sub}"
    rider = RiderClient([a.url], tokens("rider", rider_sub))
    await rider.start()
    rider_rest = Rest([a.url], tokens("rider", rider_sub))
    other_rest = Rest([a.url], tokens("rider", other_sub))
    theirs = None
    try:
        spot = (SPOT[0] - 0.004, SPOT[1] + 0.004)
        await driver.go_online(*spot, "xl")

        async def available() -> bool:
            return (await driver.rest.me()).get("status") == "available"

        await eventually(available)
        mine = await rider_rest.request_ride(spot, (spot[0] + 0.005, spot[1]), "xl", payment_method="cash")
        # A driver sees the ride it drives once it accepted it; not before.
        assert (await driver.call(proto.sync([mine["ride_id"]])))["unknown"] == [mine["ride_id"]]
        offer = await driver.next("offer", timeout_s=scaled(15))
        assert offer["ride_id"] == mine["ride_id"]
        await driver.accept(offer)
        # Another rider's ride, requested once our driver is busy (it cannot be offered it).
        theirs = await other_rest.request_ride(spot, (spot[0] + 0.005, spot[1]), "xl", payment_method="cash")
        nothing = "00000000-0000-4000-8000-000000000000"
        ids = [mine["ride_id"], theirs["ride_id"], nothing, "not-a-ride-id"]
        got = await rider.call(proto.sync(ids))
        assert got["type"] == "rides"
        assert [(r["ride_id"], r["status"]) for r in got["rides"]] == [(mine["ride_id"], "accepted")]
        assert got["rides"][0]["version"] > mine["version"]
        assert got["unknown"] == ids[1:]
        got = await driver.call(proto.sync([mine["ride_id"], theirs["ride_id"]]))
        assert [(r["ride_id"], r["status"]) for r in got["rides"]] == [(mine["ride_id"], "accepted")]
        assert got["unknown"] == [theirs["ride_id"]]
        # Malformed: not a list, empty, too many, not strings. The socket answers each.
        for bad in ("x", [], [str(i) for i in range(101)], [1, 2]):
            with pytest.raises(ClientError) as err:
                await rider.call({"type": "sync", "ride_ids": bad})
            assert err.value.code == "invalid_field"
        assert (await rider.call(proto.sync([mine["ride_id"]])))["rides"][0]["status"] == "accepted"
        await driver.cancel_ride(mine["ride_id"], "test over")
    finally:
        if theirs is not None:
            await other_rest.cancel(theirs["ride_id"], "test over")
        try:
            await driver.go_offline()
        finally:
            for c in (driver, rider):
                await c.close()
            for r in (rider_rest, other_rest):
                await r.close()


async def test_a_rider_whose_new_edge_cannot_subscribe_it_reads_again_what_it_missed(
    edge_env, tokens, tmp_path
):
    """The event bus and a rider's edge die together. On its new edge the rider's channel
    cannot be subscribed, so the welcome says ``subscribed: false``; a cancel made after
    the socket resumed, whose event goes nowhere, still reaches the rider: the client
    library reads its open rides again a second later (``RESYNC_AGAIN_S``)."""
    import os

    from storage.redis_server import start_redis_server

    bus = start_redis_server(tmp_path / "bus")
    a = start_edge(edge_env, tmp_path, "edge-nobus-a", REDIS_URL=bus.url)
    b = start_edge(edge_env, tmp_path, "edge-nobus-b", REDIS_URL=bus.url)
    wait_ready([a, b])
    _n, sub = new_driver()
    rider_sub = f"r-nobus-{sub}"
    rider = RiderClient([a.url, b.url], tokens("rider", rider_sub))
    rest = Rest([b.url], tokens("rider", rider_sub))
    try:
        await rider.start()
        assert rider.url == a.url and rider.conn is not None and rider.conn.welcome["subscribed"] is True
        spot = (SPOT[0] - 0.008, SPOT[1] - 0.006)
        ride = await rest.request_ride(spot, (spot[0] + 0.005, spot[1]), "xl", payment_method="cash")
        rider.track(ride)
        os.kill(bus.process.pid, signal.SIGKILL)
        bus.process.wait()
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait()
        await eventually(lambda: rider.connected and rider.url == b.url, timeout_s=10, interval_s=0.02)
        assert rider.conn.welcome["subscribed"] is False  # the bus is gone: not subscribed
        await asyncio.sleep(0.2)  # past the resume's own re-read
        cancelled = await rest.cancel(ride["ride_id"], "changed plans")
        assert cancelled["status"] == "cancelled"
        msg = await rider.next("ride_status", timeout_s=scaled(10))
        while msg["ride_id"] != ride["ride_id"] or msg["status"] != "cancelled":
            msg = await rider.next("ride_status", timeout_s=scaled(10))
        assert msg.get("resync") is True and rider.rides[ride["ride_id"]] == "cancelled"
    finally:
        await rider.close()
        await rest.close()
        a.stop()
        b.stop()
        bus.stop()
