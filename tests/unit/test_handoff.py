"""Handoff: a driver is never available in two shards, and never lost, whatever the moves."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispatch.drivers import DriverStatus, location_rows
from tests.helpers import point_inside
from tests.unit.core_helpers import NOW, make_shards, random_fleet, region_and_map, route, settle


def _holders(shards, driver_id):
    return [
        s.shard_id
        for s in shards
        if driver_id in s.own.id_to_slot and not s.own.pending[s.own.id_to_slot[driver_id]]
    ]


def _available_in(shards, now):
    seen: dict[int, int] = {}
    for s in shards:
        mask = s.own.available_mask(now, s.cfg.stale_after_s)
        for i in s.own.driver_id[: s.own.high_water][mask].tolist():
            seen[i] = seen.get(i, 0) + 1
    return seen


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31), steps=st.integers(2, 12), n=st.integers(5, 80), settle_every=st.integers(1, 3)
)
def test_random_walks_across_borders(seed, steps, n, settle_every):
    _, smap = region_and_map()
    shards = make_shards()
    rng = np.random.default_rng(seed)
    ids, lat, lng = random_fleet(n, seed=seed)
    now = NOW
    ever_sent = np.zeros(n, dtype=bool)
    for step in range(steps):
        # Big jumps so that many drivers change shard between updates; some skip a beat.
        lat = np.clip(lat + rng.normal(0, 0.01, n), 37.71, 37.80)
        lng = np.clip(lng + rng.normal(0, 0.01, n), -122.50, -122.39)
        send = rng.random(n) < 0.8
        ever_sent |= send
        now += 1.0
        route(shards, location_rows(ids[send], lat[send], lng[send], now - 0.5), now)
        # Invariant at every moment, settled or not: available in at most one shard.
        assert max(_available_in(shards, now).values(), default=1) == 1
        if step % settle_every == 0:
            settle(shards)
            assert max(_available_in(shards, now).values(), default=1) == 1
    settle(shards)
    settle(shards)
    for i, sent in zip(ids.tolist(), ever_sent.tolist(), strict=True):
        holders = _holders(shards, i)
        assert len(holders) == (1 if sent else 0), f"driver {i} held by {holders}"
    # Each driver is held by the shard of its newest position.
    for s in shards:
        used = s.own.used_slots()
        assert (smap.shard_of(s.own.lat[used], s.own.lng[used]) == s.shard_id).all()


def test_status_travels_with_the_driver():
    _, smap = region_and_map()
    shards = make_shards()
    ids, lat, lng = random_fleet(200, seed=4)
    route(shards, location_rows(ids, lat, lng, NOW - 2), NOW)
    settle(shards)
    owner = smap.shard_of(lat, lng)
    j = int(np.flatnonzero(owner == 0)[0])
    s0 = shards[0]
    s0.own.status[s0.own.id_to_slot[int(ids[j])]] = DriverStatus.ON_TRIP
    # Move it into shard 3's territory.
    tlat, tlng = point_inside(smap, 3)
    route(shards, location_rows(ids[j], tlat, tlng, NOW - 1), NOW)
    settle(shards)
    assert _holders(shards, int(ids[j])) == [3]
    s3 = shards[3]
    assert s3.own.status[s3.own.id_to_slot[int(ids[j])]] == DriverStatus.ON_TRIP
    assert s0.counters["handoff_out"] == 1 and s3.counters["handoff_in"] == 1


@pytest.mark.parametrize("order", ["forward", "reverse"])
def test_an_older_position_never_steals_a_driver(order):
    """Two routers race: the shard with the newer position keeps the driver."""
    _, smap = region_and_map()
    shards = make_shards()
    ids, lat, lng = random_fleet(100, seed=8)
    owner = smap.shard_of(lat, lng)
    a = int(np.flatnonzero(owner == 0)[0])
    b = int(np.flatnonzero(owner == 2)[0])
    # Driver ids[a] reported at shard 2's place at t-1 (old) and at its own place at t (new).
    shards[0].ingest(location_rows(ids[a], lat[a], lng[a], NOW - 1), NOW)
    shards[2].ingest(location_rows(ids[a], lat[b], lng[b], NOW - 3), NOW)
    settle(shards if order == "forward" else shards[::-1])
    assert _holders(shards, int(ids[a])) == [0]
    # Shard 2 gave it up, by losing its own claim or by releasing it to shard 0's claim.
    assert shards[2].counters["claims_lost"] + shards[2].counters["handoff_out"] == 1
    assert len(shards[2].own) == 0


def test_a_driver_whose_holder_does_not_answer_stays_pending_until_it_does():
    """A claim a peer cannot answer (slow, or cut off with its state) leaves the driver
    pending, not available, and is asked again each round; it is taken as nobody's only
    after CLAIM_GIVE_UP_S. Taking it at once could make it available here while the
    silent peer has it on an offer."""
    import asyncio

    from dispatch.handoff import claim_round_async
    from dispatch.shard import CLAIM_GIVE_UP_S

    _, smap = region_and_map()
    shards = make_shards()
    ids, lat, lng = random_fleet(200, seed=7)
    route(shards, location_rows(ids, lat, lng, NOW - 2), NOW)
    settle(shards)
    owner = smap.shard_of(lat, lng)
    j = int(np.flatnonzero(owner == 0)[0])
    driver = int(ids[j])
    s0 = shards[0]
    s0.own.status[s0.own.id_to_slot[driver]] = DriverStatus.OFFERED  # shard 0 has it on an offer
    tlat, tlng = point_inside(smap, 3)
    route(shards, location_rows(driver, tlat, tlng, NOW - 1), NOW)
    s3 = shards[3]
    down = {0}

    async def ask(k, req_ids, req_ts):
        if k in down:
            return ConnectionError("shard 0 does not answer")
        return shards[k].release(req_ids, req_ts, 3)

    def held_by_3() -> str:
        slot = s3.own.id_to_slot[driver]
        return "pending" if s3.own.pending[slot] else DriverStatus(int(s3.own.status[slot])).name

    asyncio.run(claim_round_async(s3, ask, NOW))
    assert held_by_3() == "pending" and s3.counters["claims_retried"] == 1
    asyncio.run(claim_round_async(s3, ask, NOW + 1))  # asked again: still no answer
    assert held_by_3() == "pending"
    down.clear()  # shard 0 answers again: the driver comes over with its offer
    asyncio.run(claim_round_async(s3, ask, NOW + 2))
    assert held_by_3() == "OFFERED" and _holders(shards, driver) == [3]
    # A peer silent past the limit: the driver is taken as held by nobody.
    other = int(ids[int(np.flatnonzero(owner == 1)[0])])
    route(shards, location_rows(other, tlat, tlng + 0.0005, NOW + 3), NOW + 3)
    down.add(1)
    asyncio.run(claim_round_async(s3, ask, NOW + 3))
    asyncio.run(claim_round_async(s3, ask, NOW + 3 + CLAIM_GIVE_UP_S))
    slot = s3.own.id_to_slot[other]
    assert not s3.own.pending[slot]
