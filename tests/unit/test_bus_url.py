"""storage.bus.RedisPublisher reads a Redis URL as redis-py does (no server needed)."""

import pytest

from storage.bus import RedisPublisher, command


def test_urls_of_each_kind():
    p = RedisPublisher("redis://:s3cret@bus.internal:6380/2")
    assert (p.scheme, p.host, p.port) == ("redis", "bus.internal", 6380)
    assert (p.username, p.password) == (None, "s3cret")
    p = RedisPublisher("redis://edge:p%40ss@127.0.0.1")
    assert (p.port, p.username, p.password) == (6379, "edge", "p@ss")
    p = RedisPublisher("unix:///run/redis/redis.sock?db=0")
    assert (p.scheme, p.path, p.password) == ("unix", "/run/redis/redis.sock", None)
    assert RedisPublisher("rediss://bus:6380/0").verify
    assert not RedisPublisher("rediss://bus:6380/0?ssl_cert_reqs=none").verify


def test_a_url_that_is_not_redis_is_refused():
    with pytest.raises(ValueError, match="not a Redis URL"):
        RedisPublisher("http://bus:6379")


def test_commands_are_resp_arrays_of_bulk_strings():
    assert command(b"PUBLISH", b"ch", b"a\r\nb") == b"*3\r\n$7\r\nPUBLISH\r\n$2\r\nch\r\n$4\r\na\r\nb\r\n"
