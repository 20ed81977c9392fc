"""The operator's path on the namespace cluster, as docs/operations.md tells it.

`ray start` head and two shard hosts and two edge hosts (loadtests/cluster.py), then, each
command a subprocess inside its host with only the cluster's environment (Ray address
and token file, Postgres and Redis URLs, the shard host resource, the JWT secret):
`dispatch migrate`, `dispatch shards deploy`, `dispatch shards status` (each shard's
node), `dispatch edge` on both edge hosts. Then one trip through the edges with the
client library (rider on one edge, driver on the other), and a second ride, accepted,
whose shard host is killed: the shard comes back on the other shard host, the open ride
is restored from Postgres (live in exactly one shard, by the shards' own ids), and the
ride completes.

Needs root and iproute2; run with ``pytest -m cluster``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from api.client import DriverClient, Rest, RiderClient, mint_token
from dispatch.region import load_region
from dispatch.shardmap import ShardMap
from tests.helpers import eventually, scaled

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ip") is None,
        reason="the namespace cluster needs root and iproute2 (`ip netns`)",
    ),
]

# Two spots in the region, one per ride; which shard holds each is looked up, not assumed.
FIRST = (37.7749, -122.4194)
SECOND = (37.7880, -122.4075)
DISPATCH = str(Path(sys.executable).parent / "dispatch")


@pytest.fixture(scope="module")
def cluster():
    from loadtests.cluster import Cluster

    prefix = f"dsp-o{uuid.uuid4().hex[:4]}-"
    state_dir = Path(f"/tmp/{prefix}state")
    c = Cluster(shard_hosts=2, edge_hosts=2, shard_cpus=2, prefix=prefix, state_dir=state_dir)
    with c:
        yield c
    shutil.rmtree(state_dir, ignore_errors=True)


def _dispatch(cluster, host: str, *args: str, timeout_s: float = 120.0):
    proc = cluster.run(host, [DISPATCH, *args], timeout_s=scaled(timeout_s))
    assert proc.returncode == 0, (
        f"dispatch {' '.join(args)} on {host}: {proc.stdout[-2000:]}{proc.stderr[-3000:]}"
    )
    return proc


def _status(cluster) -> list[dict]:
    proc = cluster.run("head", [DISPATCH, "shards", "status", "--json"], timeout_s=scaled(60))
    if proc.returncode != 0:
        return []
    return json.loads(proc.stdout)


def _host_of(cluster, ip: str) -> str:
    return next(name for name, h in cluster.hosts.items() if h.ip == ip)


async def _ready(url: str) -> bool:
    try:
        async with httpx.AsyncClient(timeout=2.0) as http:
            return (await http.get(f"{url}/readyz")).status_code == 200
    except httpx.HTTPError:
        return False


async def _trip_steps(driver: DriverClient, ride_id: str, at: tuple[float, float]) -> None:
    """arrived, started, completed; a step refused while a shard restarts is sent again."""

    for step in ("arrived", "start_trip", "complete_trip"):

        async def done(step=step) -> dict | None:
            await driver.send_location(*at, speed=0.0)
            try:
                return await driver.step(step, ride_id)
            except Exception as exc:
                if getattr(exc, "code", None) in ("unavailable", "shard_unavailable", "timeout"):
                    return None
                raise

        await eventually(done, timeout_s=scaled(30), interval_s=0.5)


async def _accepted_ride(rider_rest: Rest, driver: DriverClient, at: tuple[float, float]) -> str:
    ride = await rider_rest.request_ride(at, (at[0] + 0.01, at[1]), payment_method="cash")
    offer = await driver.next("offer", timeout_s=scaled(20))
    assert offer["ride_id"] == ride["ride_id"]
    accepted = await driver.accept(offer)
    assert accepted["status"] == "accepted"
    return ride["ride_id"]


async def test_the_operator_path_carries_trips_and_survives_a_shard_host(cluster):
    region = load_region()
    shard_map = ShardMap(region)
    shard_ips = {cluster.ip("shard1"), cluster.ip("shard2")}

    _dispatch(cluster, "head", "migrate")
    deployed = _dispatch(cluster, "head", "shards", "deploy")
    assert "deployed" in deployed.stdout
    status = _status(cluster)
    assert len(status) == region.shard_count
    # Every shard on a shard host, and both hosts used (SPREAD over the shard_host resource).
    assert {s["node_ip"] for s in status} == shard_ips
    table = _dispatch(cluster, "head", "shards", "status").stdout
    assert cluster.ip("shard1") in table and cluster.ip("shard2") in table

    for edge in ("edge1", "edge2"):
        cluster.start_edge(edge)
    urls = [cluster.edge_url("edge1"), cluster.edge_url("edge2")]
    for url in urls:
        await eventually(lambda url=url: _ready(url), timeout_s=scaled(90), interval_s=0.5)

    secret = cluster.jwt_secret
    run = uuid.uuid4().int % 1_000_000
    rider_sub, driver_sub = f"r-op-{run}", f"drv-{8_000_000 + run}"
    rider = RiderClient(urls, mint_token(secret, rider_sub, "rider"))
    driver = DriverClient(list(reversed(urls)), mint_token(secret, driver_sub, "driver"))
    rider_rest = Rest(urls, mint_token(secret, rider_sub, "rider"))
    driver_rest = Rest(list(reversed(urls)), mint_token(secret, driver_sub, "driver"))
    await rider.start()
    await driver.start()
    try:
        assert rider.url == urls[0] and driver.url == urls[1]

        # One trip: rider through edge1, driver through edge2.
        await driver.go_online(*FIRST)
        await eventually(lambda: _status_is(driver_rest, "available"), timeout_s=scaled(20), interval_s=0.2)
        first = await _accepted_ride(rider_rest, driver, FIRST)
        await _trip_steps(driver, first, FIRST)
        receipt = await rider_rest.receipt(first)
        assert receipt["ride_id"] == first and receipt["status"] == "completed" and receipt["payments"]

        # A second ride, accepted; then its shard's host dies.
        await driver.send_location(*SECOND, speed=0.0)
        await eventually(lambda: _status_is(driver_rest, "available"), timeout_s=scaled(20), interval_s=0.2)
        second = await _accepted_ride(rider_rest, driver, SECOND)
        shard_id = int(shard_map.shard_for_point(*SECOND))
        before = {s["shard_id"]: s for s in _status(cluster)}[shard_id]
        victim = _host_of(cluster, before["node_ip"])
        survivor = ({"shard1", "shard2"} - {victim}).pop()
        cluster.kill_host(victim)

        def moved() -> dict | None:
            now = {s["shard_id"]: s for s in _status(cluster)}
            s = now.get(shard_id)
            ok = (
                len(now) == region.shard_count
                and s is not None
                and s["node_ip"] == cluster.ip(survivor)
                and s["incarnation"] != before["incarnation"]
                and not s["rides"]["needs_restore"]
            )
            return s if ok else None

        after = await eventually(moved, timeout_s=scaled(60), interval_s=1.0)
        # A new incarnation on the survivor, and an edge has restored it from Postgres.
        assert after["rides"]["needs_restore"] is False
        assert {s["node_ip"] for s in _status(cluster)} == {cluster.ip(survivor)}

        # Straight from the shards: once the driver reports, its trip is live in exactly one
        # shard (the restored one adopts it from Postgres), and the driver is free in none.
        admin = mint_token(secret, "ops-operator-test", "admin")

        async def trip_live_once() -> bool:
            await driver.send_location(*SECOND, speed=0.0)
            shards = await _live(urls, admin)
            return (
                all(s["up"] for s in shards)
                and sum(second in s["trips"] + s["requests"] for s in shards) == 1
                and not any(driver_sub in s["available"] for s in shards)
            )

        await eventually(trip_live_once, timeout_s=scaled(30), interval_s=0.5)
        await _trip_steps(driver, second, SECOND)
        ride = await rider_rest.ride(second)
        assert ride["status"] == "completed"
        assert (await rider_rest.receipt(second))["payments"]
    finally:
        for c in (driver, rider):
            await c.close()
        for r in (rider_rest, driver_rest):
            await r.close()


async def _live(urls: list[str], token: str) -> list[dict]:
    """Every shard's live ids (``GET /v1/admin/shards/live``) from the first edge that answers."""
    async with httpx.AsyncClient(timeout=10.0) as http:
        for url in urls:
            try:
                r = await http.get(
                    f"{url}/v1/admin/shards/live", headers={"Authorization": f"Bearer {token}"}
                )
            except httpx.HTTPError:
                continue
            if r.status_code == 200:
                return r.json()["shards"]
    return []


async def _status_is(rest: Rest, status: str) -> bool:
    return (await rest.me()).get("status") == status
