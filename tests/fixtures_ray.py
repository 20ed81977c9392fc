"""Session fixtures for real Ray: one local cluster and one set of shard actors per run.

Registered from tests/conftest.py. Shards live in a namespace unique to the run so a
stray cluster from another run can never answer.
"""

from __future__ import annotations

import uuid

import pytest

from dispatch.region import load_region, region_file_text
from dispatch.shardmap import ShardMap


@pytest.fixture(scope="session")
def region():
    return load_region()


@pytest.fixture(scope="session")
def shard_map(region):
    return ShardMap(region)


@pytest.fixture(scope="session")
def ray_cluster():
    from actors import directory

    namespace = f"test-{uuid.uuid4().hex[:8]}"
    directory.connect(namespace=namespace, num_cpus=2)
    yield namespace
    directory.shutdown()


@pytest.fixture(scope="session")
def bus_redis_url(tmp_path_factory):
    """The Redis the shards publish to: REDIS_URL, or an embedded server for this run."""
    import os

    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    from storage.redis_server import start_redis_server

    server = start_redis_server(tmp_path_factory.mktemp("bus-redis"))
    yield server.url
    server.stop()


@pytest.fixture(scope="session")
def shard_settings(ray_cluster, bus_redis_url):
    """The settings every shard of this run is created with."""
    from actors.settings import ShardSettings

    return ShardSettings.build(region_toml=region_file_text(), namespace=ray_cluster, redis_url=bus_redis_url)


@pytest.fixture(scope="session")
def shards(ray_cluster, region, shard_settings):
    """A ShardDirectory over the default region's shard actors, deployed for this run."""
    from actors import directory

    directory.deploy_shards(shard_settings)
    yield directory.ShardDirectory(region.name, region.shard_count, namespace=ray_cluster)
    directory.teardown_shards(region.name, region.shard_count, namespace=ray_cluster)


@pytest.fixture
def shard_client(shards):
    """The typed client over this run's shards (what the edge uses)."""
    from actors.client import ShardClient

    return ShardClient(shards.region_name, shards.shard_count, shards.namespace)
