"""The cluster path: ``dispatch shards deploy`` run as an operator runs it, in its own
process, against this run's Ray cluster (token auth on, as Ray 2.60 starts every head).

Its shards must publish offers on the channel the edges relay to a driver's socket, and
their ride records must reach Postgres through the record consumer. Real Ray, Redis and
Postgres.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid

import msgpack
import pytest
import redis.asyncio as aioredis

from actors.client import ShardClient
from actors.router import LocationRouter, RouterConfig
from api.settings import write_stack_record
from api.upkeep import RecordConsumer
from dispatch.drivers import location_rows
from dispatch.events import driver_channel
from storage.rides import RideStore
from tests.helpers import eventually, point_inside, scaled

pytestmark = pytest.mark.integration

# What an operator's shell would not have: the command must find everything in its flags,
# its data dir and the variables it is documented to read.
_JOINING = (
    "RAY_ADDRESS",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "REDIS_URL",
    "DATABASE_URL",
)


def _operator_env(home, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _JOINING and not k.startswith("DISPATCH_")}
    # Another home: Ray's own fallback for the token (~/.ray/auth_token) is not there, so
    # joining works only from what the data dir holds.
    env["HOME"] = str(home)
    env["DISPATCH_TEST_TIMEOUT_FACTOR"] = os.environ.get("DISPATCH_TEST_TIMEOUT_FACTOR", "1")
    return {**env, **extra}


def _dispatch(env: dict, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "api.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=scaled(timeout_s),
    )


@pytest.fixture
def operator(ray_cluster, tmp_path):
    """A data dir where ``dispatch up`` would have recorded how to join this cluster (Ray
    address and auth only), an operator's environment, and a namespace of its own."""
    from actors import directory

    data_dir = tmp_path / "stack"
    data_dir.mkdir()
    auth = directory.record_auth(data_dir)
    write_stack_record(
        data_dir,
        ray_address=directory.gcs_address(),
        ray_auth_mode=auth.mode,
        ray_auth_token_path=auth.token_path,
    )
    home = tmp_path / "home"
    home.mkdir()
    return data_dir, _operator_env(home), f"deploy-{uuid.uuid4().hex[:6]}", auth


async def test_shards_deployed_by_the_command_publish_offers_and_ride_records(
    operator, region, shard_map, bus_redis_url, pg_pool
):
    from actors import directory

    data_dir, env, namespace, auth = operator
    if auth.mode == "token":
        assert (data_dir / "ray_auth_token").stat().st_mode & 0o777 == 0o600
    address = directory.gcs_address()
    deploy = _dispatch(
        {**env, "REDIS_URL": bus_redis_url, "DISPATCH_SHARD_NUM_CPUS": "0.1"},
        "shards",
        "deploy",
        "--address",
        address,
        "--namespace",
        namespace,
        "--data-dir",
        str(data_dir),
    )
    assert deploy.returncode == 0, deploy.stderr
    assert f"acting on Ray cluster {address}, namespace '{namespace}'" in deploy.stdout
    try:
        shards = ShardClient(region.name, region.shard_count, namespace)
        assert all([await shards.ping(k) for k in range(region.shard_count)])

        # A driver online in shard 1, through the edge's location router.
        lat, lng = point_inside(shard_map, 1, 0.5)
        driver_id = 7_000_001
        router = LocationRouter(shard_map, shards.directory, RouterConfig(flush_interval_s=0.005))
        await router.start()
        router.submit(location_rows(driver_id, lat + 0.0005, lng, time.time()))
        await router.drain()

        async def available():
            held = await shards.find_driver(driver_id)
            return held is not None and held[1]["status"] == "available"

        await eventually(available)

        # A stored ride handed to its shard, as the edge does after the rider's request.
        store = RideStore(pg_pool)
        ride, _ = await store.create_ride(
            rider_id=f"r-deploy-{time.time_ns()}",
            region=region.name,
            shard_id=1,
            vehicle_class=0,
            pickup=(lat, lng),
            dropoff=(lat + 0.01, lng + 0.01),
            surge_multiplier=1.0,
            fare_estimate_cents=1200,
            currency="USD",
        )
        r = aioredis.Redis.from_url(bus_redis_url)
        pubsub = r.pubsub()
        await pubsub.subscribe(driver_channel(driver_id))
        consumer = RecordConsumer(bus_redis_url, f"edge-deploy-{namespace}", store)
        await consumer.start()
        try:
            await shards.hand_over(1, ride.to_request())

            # The offer, on the channel an edge forwards to the driver's socket.
            offer = None
            deadline = time.monotonic() + scaled(15)
            while offer is None and time.monotonic() < deadline:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
                if msg:
                    offer = msgpack.unpackb(msg["data"])
            assert offer is not None, "no offer published"
            assert offer["type"] == "offer" and offer["ride_id"] == ride.ride_id

            # The shard's record of it, in Postgres.
            async def recorded():
                return "offer" in [e["event"] for e in await store.events(ride.ride_id)]

            await eventually(recorded, timeout_s=30)
        finally:
            await consumer.stop()
            await pubsub.aclose()
            await r.aclose()
            await router.stop()

        # Status acts on the recorded cluster (no --address) and shows the outbox column.
        status = _dispatch(
            env, "shards", "status", "--namespace", namespace, "--data-dir", str(data_dir), "--json"
        )
        assert status.returncode == 0, status.stderr
        assert f"acting on Ray cluster {address}" in status.stderr
        stats = json.loads(status.stdout)
        assert [s["shard_id"] for s in stats] == list(range(region.shard_count))
        assert all(s["events"]["dropped"] == 0 and s["events"]["bus_up"] for s in stats)
        assert sum(s["events"]["records_sent"] for s in stats) >= 1
    finally:
        down = _dispatch(env, "shards", "teardown", "--namespace", namespace, "--data-dir", str(data_dir))
        assert down.returncode == 0, down.stderr
        assert f"removed {region.shard_count} shards" in down.stdout


def test_deploy_without_a_redis_url_is_refused_and_creates_nothing(operator, region):
    import ray

    data_dir, env, namespace, _ = operator
    out = _dispatch(env, "shards", "deploy", "--namespace", namespace, "--data-dir", str(data_dir))
    assert out.returncode == 2
    assert "no Redis URL" in out.stderr
    for k in range(region.shard_count):
        with pytest.raises(ValueError):
            ray.get_actor(f"{region.name}-shard-{k}", namespace=namespace)


def test_a_deploy_that_does_not_fit_says_what_it_asked_for(operator, region, bus_redis_url):
    from actors import directory

    data_dir, env, namespace, _ = operator
    env = {
        **env,
        "REDIS_URL": bus_redis_url,
        # No node of this cluster has it: the shards can never be placed.
        "DISPATCH_SHARD_HOST_RESOURCE": "shard_host",
        "DISPATCH_SHARD_DEPLOY_TIMEOUT_S": "2",
    }
    try:
        out = _dispatch(env, "shards", "deploy", "--namespace", namespace, "--data-dir", str(data_dir))
        assert out.returncode == 1
        assert "not up after 2 s" in out.stderr
        assert "shard_host=1" in out.stderr and "the cluster has" in out.stderr
    finally:
        directory.teardown_shards(region.name, region.shard_count, namespace)
