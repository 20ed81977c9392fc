"""The drills' cross-checks of the shards' live ids against Postgres (loadtests/invariants.py)."""

from loadtests.invariants import Held, live_offenders, shard_offenders


def _held(requests=(), trips=(), available=(), offered=()):
    return Held(frozenset(requests), frozenset(trips), frozenset(available), frozenset(offered))


def test_every_open_ride_live_in_one_shard_and_every_driver_free_in_one_is_clean():
    held = [_held(requests=["a"], available=[1, 2], offered=[3]), _held(trips=["b"], available=[4]), None]
    statuses = {"a": "offered", "b": "in_progress", "c": "completed"}
    found = live_offenders(held, ["a", "b", "c"], statuses, trip_drivers=[5])
    assert not any(found.values()), found


def test_each_breach_is_named_by_its_ids():
    held = [
        _held(requests=["open", "twice"], available=[1, 2, 9], offered=[3, 7]),
        _held(trips=["twice", "ended"], available=[2, 5], offered=[3]),
        _held(requests=["stranger"], available=[7]),
    ]
    statuses = {
        "open": "requested",
        "twice": "accepted",
        "ended": "cancelled",
        "lost": "arrived",
        "done": "expired",
    }
    # "lost" is open in Postgres and in no shard; "gone" is not in Postgres (rides_lost's
    # business); driver 9 has a trip in Postgres and is available; 2 is free in two shards;
    # 3 holds two shards' offers; 7 holds one while free in another shard.
    found = live_offenders(held, ["open", "twice", "lost", "done", "gone"], statuses, trip_drivers=[9])
    assert found == {
        "rides_live_twice": {"twice"},
        "drivers_in_two_shards": {2},
        "drivers_offered_twice": {3, 7},
        "rides_not_live": {"lost"},
        "rides_held_after_end": {"ended", "stranger"},
        "trip_drivers_available": {9},
    }
    assert shard_offenders(held) == {k: found[k] for k in shard_offenders(held)}


def test_a_shard_that_does_not_answer_holds_nothing_and_its_rides_are_not_live():
    found = live_offenders([None, _held()], ["a"], {"a": "requested"}, trip_drivers=[])
    assert found["rides_not_live"] == {"a"}


def test_held_reads_the_edge_json_and_the_shard_value_alike():
    from dispatch.dispatcher import LiveIds

    value = LiveIds(shard_id=2, requests=("r1",), trips=("r2",), available=(42,), offered=(43,))
    as_json = {
        "shard_id": 2,
        "requests": ["r1"],
        "trips": ["r2"],
        "available": ["drv-42"],
        "offered": ["drv-43"],
    }
    assert Held.of(value) == Held.of(as_json) == _held(["r1"], ["r2"], [42], [43])
