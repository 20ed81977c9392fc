"""The Redis GEO baseline the benchmarks compare the shards with, on the same data.

Uses REDIS_URL when set; otherwise the embedded Redis the local stack runs (a real
redis-server from a pip-installed package), in a throwaway data directory.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def redis_url() -> Iterator[str]:
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    from storage.redis_server import start_redis_server

    server = start_redis_server(Path(tempfile.mkdtemp(prefix="bench-redis-")))
    try:
        yield server.url
    finally:
        server.stop()


def geoadd_args(ids: np.ndarray, lat: np.ndarray, lng: np.ndarray) -> list:
    """GEOADD's member triples (lng, lat, member), flattened, built without a Python loop."""
    triples = np.empty((len(ids), 3), dtype=object)
    triples[:, 0] = lng.tolist()
    triples[:, 1] = lat.tolist()
    triples[:, 2] = ids.tolist()
    return triples.ravel().tolist()
