"""The pure part of fencing superseded shard incarnations (storage/rides.py)."""

from __future__ import annotations

import time

from actors.events import EventPublisher
from actors.shard_actor import incarnation_token
from storage.rides import incarnation_started, record_incarnation, superseded_at


def test_a_record_id_names_its_shard_and_incarnation():
    token = incarnation_token()
    pub = EventPublisher(None, source=f"3:{token}")
    records: list[dict] = [{"ride_id": "r"}]
    pub._stamp(records)
    assert record_incarnation(records[0]["record_id"]) == (3, token)
    # A stream message id (records without an id of their own), or anything else: none.
    for other in ("1700000000000-0", "abc:def", "x:tok:1", ":tok:1", "3::1", None, 42):
        assert record_incarnation(other) is None


def test_an_incarnation_token_tells_when_it_started():
    before = time.time()
    token = incarnation_token()
    started = incarnation_started(token)
    assert started is not None and before - 0.01 <= started <= time.time() + 0.01
    assert incarnation_started("x") is None
    assert incarnation_started("AB!cd") is None


def test_an_incarnation_is_superseded_by_the_first_registered_after_it():
    regs = [("a1", 100.0), ("b1", 200.0), ("c1", 300.0)]
    assert superseded_at(regs, "a1") == (200.0, "b1")
    assert superseded_at(regs, "b1") == (300.0, "c1")
    assert superseded_at(regs, "c1") is None
    assert superseded_at([], "a1") is None


def test_an_unregistered_incarnation_is_placed_by_its_start():
    old = incarnation_token()
    started = incarnation_started(old)
    assert started is not None
    # Registered ones before it started do not supersede it (a fresh start not yet
    # restored); one registered after its start does (a cut-off actor never restored).
    assert superseded_at([("z0", started - 50.0)], old) is None
    assert superseded_at([("z0", started - 50.0), ("z1", started + 5.0)], old) == (started + 5.0, "z1")
    # A source whose incarnation carries no time is not fenced.
    assert superseded_at([("z1", 1e12)], "!!") is None
