"""The edge's garbage-collection policy: freeze survivors, collect everything now and then."""

from __future__ import annotations

import gc
import weakref

from api.gc_policy import GcPolicy


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector frees it


def test_survivors_are_frozen_and_a_full_round_frees_cycles_that_died_frozen():
    before = gc.get_threshold()
    policy = GcPolicy(freeze_every_s=60, full_every_s=600)
    try:
        policy.install()
        assert gc.get_threshold() == (policy.young_threshold, *before[1:])
        t0 = policy._last_freeze
        node = _Node()
        dead = weakref.ref(node)
        assert policy.tick(t0 + 30) is None
        # Past each interval by a second: t0 + 60 - t0 can round to just under 60.
        assert policy.tick(t0 + 61) == "freeze"
        assert gc.get_freeze_count() > 0
        del node  # now garbage, but frozen: a collection does not see it
        gc.collect()
        assert dead() is not None
        assert policy.tick(t0 + 100) is None
        assert policy.tick(t0 + 601) == "full"  # unfreeze, collect, freeze again
        assert dead() is None
        assert policy.full_rounds == 1 and gc.get_freeze_count() > 0
        assert policy.collections[2] >= 2 and policy.seconds > 0 and policy.longest_s > 0
    finally:
        policy.uninstall()
    assert gc.get_freeze_count() == 0 and policy._callback not in gc.callbacks
    assert gc.get_threshold() == before
