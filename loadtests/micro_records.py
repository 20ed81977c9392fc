"""CPU per ride of storing the shards' ride records: Postgres' and the caller's.

    python -m loadtests.micro_records [--rides 2000] [--dsn postgresql://...]

Creates ``--rides`` rides, then feeds :meth:`storage.rides.RideStore.apply_records` the
records a shard writes for them the way the edge's record consumer does (rounds of
``--round`` records, at most ``READ_COUNT``: the consumer reads what has arrived):
every ride is ``offered``; 15% of them also see the offer expire
and a second ``offered``. Measured: CPU seconds of the Postgres server's processes and of
this process over the applying only, per ride. Without ``--dsn`` an embedded server is
started in a temporary directory. Small and quiet enough to run beside other work: it
measures CPU, not time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from pathlib import Path

import psutil

from api.upkeep import READ_COUNT, apply_round
from storage.db import create_pool, migrate
from storage.rides import RideStore


def _tree_cpu(pid: int) -> float:
    total = 0.0
    root = psutil.Process(pid)
    for p in [root, *root.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return total


def _self_cpu() -> float:
    t = psutil.Process().cpu_times()
    return t.user + t.system


async def run(dsn: str, pg_pid: int, rides: int, per_round: int = READ_COUNT) -> dict[str, float]:
    name = f"micro_{uuid.uuid4().hex[:8]}"
    import asyncpg

    admin = await asyncpg.connect(dsn)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    db = dsn.rsplit("/", 1)[0] + f"/{name}"
    await migrate(db)
    pool = await create_pool(db, max_size=10)
    store = RideStore(pool)
    ids = []
    for i in range(rides):
        ride, _ = await store.create_ride(
            rider_id=f"r-{i}",
            region="sf",
            shard_id=0,
            vehicle_class=0,
            pickup=(37.77, -122.42),
            dropoff=(37.78, -122.41),
            surge_multiplier=1.0,
            fare_estimate_cents=1000,
            currency="USD",
            idempotency_key=f"k-{i}",
        )
        ids.append(ride.ride_id)
    records: list[tuple[str, dict]] = []
    n = 0
    now = time.time()
    for i, rid in enumerate(ids):
        kinds = ["offered", "offer_expired", "offered"] if i % 20 < 3 else ["offered"]
        for k in kinds:
            n += 1
            data = {"driver_id": 1000 + i, "offer_id": f"{rid}:{n}"}
            records.append((f"rec-{n}", {"ride_id": rid, "event": k, "data": data, "shard_id": 0, "at": now}))
    pg0, me0 = _tree_cpu(pg_pid), _self_cpu()
    for start in range(0, len(records), per_round):
        await apply_round(store, records[start : start + per_round])
    pg1, me1 = _tree_cpu(pg_pid), _self_cpu()
    async with pool.acquire() as conn:
        applied = await conn.fetchval("SELECT count(*) FROM trip_events WHERE source IS NOT NULL AND applied")
    await pool.close()
    admin = await asyncpg.connect(dsn)
    await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    await admin.close()
    return {
        "rides": rides,
        "per_round": per_round,
        "records": len(records),
        "applied": applied,
        "pg_cpu_ms_per_ride": round((pg1 - pg0) * 1000 / rides, 4),
        "caller_cpu_ms_per_ride": round((me1 - me0) * 1000 / rides, 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rides", type=int, default=2000)
    ap.add_argument("--round", type=int, default=READ_COUNT, help="records per consumer round")
    ap.add_argument("--dsn", default=None, help="maintenance DSN of a running server, and --pg-pid")
    ap.add_argument("--pg-pid", type=int, default=None)
    a = ap.parse_args()
    if a.dsn:
        print(json.dumps(asyncio.run(run(a.dsn, a.pg_pid, a.rides, a.round))))
        return
    from storage.postgres_server import start_postgres_server

    with tempfile.TemporaryDirectory() as tmp:
        server = start_postgres_server(Path(tmp))
        try:
            dsn = server.url.rsplit("/", 1)[0] + "/postgres"
            assert server.process is not None
            print(json.dumps(asyncio.run(run(dsn, server.process.pid, a.rides, a.round))))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
