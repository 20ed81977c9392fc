"""A driver's online/offline state survives whatever follows it: positions in the same
ingest batch or a later one, a phone clock running ahead, a border crossing."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from api.protocol import DriverState, Position
from dispatch.drivers import LOCATION_DTYPE, DriverStatus, Intent, location_rows
from tests.unit.core_helpers import NOW, make_shards, random_fleet, region_and_map, route, settle


def _rows(*tuples) -> np.ndarray:
    return np.array([(*t, b"") for t in tuples], dtype=LOCATION_DTYPE)


def _status(shards, driver_id: int) -> DriverStatus:
    """The driver's status where it is held (OFFLINE if no shard holds it)."""
    held = [s for s in shards if s.holds(driver_id)]
    assert len(held) <= 1, f"driver {driver_id} held by shards {[s.shard_id for s in held]}"
    if not held:
        return DriverStatus.OFFLINE
    t = held[0].own
    return DriverStatus(int(t.status[t.id_to_slot[driver_id]]))


def _point_in(shard_id: int) -> tuple[float, float]:
    _, smap = region_and_map()
    ids, lat, lng = random_fleet(400, seed=11)
    j = int(np.flatnonzero(smap.shard_of(lat, lng) == shard_id)[0])
    return float(lat[j]), float(lng[j])


def _offline_driver(shards, driver_id: int, at: tuple[float, float]) -> None:
    route(shards, location_rows(driver_id, *at, NOW - 10, intent=Intent.OFFLINE), NOW - 10)
    settle(shards)
    assert _status(shards, driver_id) == DriverStatus.OFFLINE


def test_a_position_right_after_online_in_the_same_batch_keeps_the_driver_online():
    shards, at = make_shards(), _point_in(0)
    _offline_driver(shards, 7, at)
    online = location_rows(7, *at, NOW - 0.05, intent=Intent.ONLINE, vclass=0)
    position = location_rows(7, at[0] + 1e-4, at[1], NOW - 0.01)  # a gateway's plain position
    route(shards, np.concatenate([online, position]), NOW)
    assert _status(shards, 7) == DriverStatus.AVAILABLE
    t = shards[0].own
    assert t.lat[t.id_to_slot[7]] == at[0] + 1e-4  # the position still wins as the position


def test_an_online_that_reaches_the_shard_after_a_newer_position_still_counts():
    shards, at = make_shards(), _point_in(0)
    _offline_driver(shards, 7, at)
    route(shards, location_rows(7, at[0] + 1e-4, at[1], NOW - 0.01), NOW)
    res = route(shards, location_rows(7, *at, NOW - 0.05, intent=Intent.ONLINE, vclass=0), NOW)
    assert _status(shards, 7) == DriverStatus.AVAILABLE
    assert res[0].dropped == {}


def test_a_driver_socket_going_online_then_sending_a_position_is_online():
    shards, at = make_shards(), _point_in(0)
    state = DriverState(7)
    rows = [state.position(*at, NOW - 10, np.nan, np.nan, NOW - 10), state.go_offline(NOW - 9)]
    route(shards, _rows(*rows), NOW - 9)
    settle(shards)
    rows = [state.go_online(0, None, NOW), state.position(*at, NOW + 0.01, np.nan, np.nan, NOW + 0.01)]
    route(shards, _rows(*rows), NOW + 0.05)
    assert _status(shards, 7) == DriverStatus.AVAILABLE


def test_offline_after_a_position_from_a_phone_clock_running_ahead_is_honoured():
    shards, at = make_shards(), _point_in(0)
    state = DriverState(7)
    route(shards, _rows(state.go_online(0, Position(*at, NOW, np.nan, np.nan), NOW)), NOW)
    settle(shards)
    assert _status(shards, 7) == DriverStatus.AVAILABLE
    ahead = state.position(at[0] + 1e-4, at[1], NOW + 1 + 3.0, np.nan, np.nan, NOW + 1)
    route(shards, _rows(ahead), NOW + 1)
    # The client's time still dates the position.
    t = shards[0].own
    assert abs(t.fix_ts[t.id_to_slot[7]] - (NOW + 4.0)) < 1e-3
    route(shards, _rows(state.go_offline(NOW + 1.05)), NOW + 1.05)
    assert _status(shards, 7) == DriverStatus.OFFLINE


def test_a_driver_that_went_offline_stays_offline_when_a_plain_position_crosses_a_border():
    shards, a, b = make_shards(), _point_in(0), _point_in(2)
    state = DriverState(7)
    route(shards, _rows(state.go_online(0, Position(*a, NOW, np.nan, np.nan), NOW)), NOW)
    route(shards, _rows(state.go_offline(NOW + 0.1)), NOW + 0.1)
    settle(shards)
    route(shards, location_rows(7, *b, NOW + 0.2), NOW + 0.2)  # a gateway's position, no status
    settle(shards)
    assert shards[2].holds(7) and not shards[0].holds(7)
    assert _status(shards, 7) == DriverStatus.OFFLINE


# -- any interleaving -------------------------------------------------------------------------

_PLACES = [_point_in(0), _point_in(2), _point_in(3)]

_message = st.one_of(
    st.tuples(st.just("location"), st.integers(0, 2), st.floats(-5.0, 5.0)),
    st.tuples(st.just("online"), st.one_of(st.none(), st.integers(0, 2)), st.floats(-5.0, 5.0)),
    st.tuples(st.just("offline"), st.none(), st.just(0.0)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    messages=st.lists(st.tuples(_message, st.floats(0.0, 0.5)), min_size=1, max_size=25),
    data=st.data(),
)
def test_no_interleaving_leaves_a_driver_other_than_its_last_status_asked(messages, data):
    """Online, offline and positions (phone clocks up to the allowed 5 s off, crossing
    borders), split into ingest batches at random, delivered in any order and claimed
    between shards at random: the driver ends as its last accepted status message said."""
    shards = make_shards()
    state = DriverState(7)
    now = NOW
    rows: list[tuple] = []
    expected = DriverStatus.OFFLINE
    for (kind, place, skew), gap in messages:
        now += gap
        if kind == "location":
            lat, lng = _PLACES[place]
            rows.append(state.position(lat, lng, now + skew, np.nan, np.nan, now))
        elif kind == "online":
            if place is None and state.last is None:
                continue  # the edge refuses it: no position yet
            pos = None if place is None else Position(*_PLACES[place], now + skew, np.nan, np.nan)
            rows.append(state.go_online(0, pos, now))
            expected = DriverStatus.AVAILABLE
        else:
            row = state.go_offline(now)
            if row is not None:
                rows.append(row)
            expected = DriverStatus.OFFLINE
    cuts = sorted(data.draw(st.sets(st.integers(1, max(len(rows) - 1, 1)), max_size=len(rows))))
    batches = [_rows(*rows[a:b]) for a, b in zip([0, *cuts], [*cuts, len(rows)], strict=True) if rows[a:b]]
    batches = data.draw(st.permutations(batches))
    delivered_at = now
    for batch in batches:
        delivered_at += data.draw(st.floats(0.0, 0.2))
        route(shards, batch, delivered_at)
        if data.draw(st.booleans()):
            settle(shards)
    settle(shards)
    settle(shards)
    assert _status(shards, 7) == expected


def test_slots_of_agrees_with_the_id_map_through_allocations_removals_and_any_ids():
    """The lookup array (ids below LUT_MAX_ID) and the dict (the rest) answer alike."""
    from dispatch.drivers import DriverTable

    rng = np.random.default_rng(5)
    t = DriverTable(capacity=8)
    big = DriverTable.LUT_MAX_ID
    pool = np.unique(
        np.concatenate(
            [rng.integers(0, 5000, 300), rng.integers(big - 50, big + 50, 40), rng.integers(2**40, 2**41, 40)]
        )
    ).astype(np.int64)
    held: set[int] = set()
    for _ in range(40):
        new = np.array(
            [i for i in rng.choice(pool, 60, replace=False).tolist() if i not in held], dtype=np.int64
        )
        t.allocate(new)
        held.update(new.tolist())
        drop = rng.choice(sorted(held), min(len(held), 25), replace=False)
        t.remove(np.array([t.id_to_slot[int(i)] for i in drop], dtype=np.int64))
        held.difference_update(int(i) for i in drop)
        probe = np.concatenate([rng.choice(pool, 200), np.array([-3, 10**12, big, big - 1], dtype=np.int64)])
        expected = np.array([t.id_to_slot.get(int(i), -1) for i in probe], dtype=np.int64)
        got = t.slots_of(probe)
        assert got.dtype == np.int64 and (got == expected).all()
        inside = probe[(probe >= 0) & (probe < 5000)]  # the all-in-the-array path
        assert (t.slots_of(inside) == [t.id_to_slot.get(int(i), -1) for i in inside]).all()
    assert len(t) == len(held)
