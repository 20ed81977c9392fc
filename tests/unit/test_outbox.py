"""The shard's event outbox: bounded, and every record or event it drops is counted."""

from __future__ import annotations

import logging

from actors.events import EventPublisher


def _records(n: int, start: int = 0) -> list[dict]:
    return [
        {"ride_id": f"r{i}", "event": "offered", "data": {}, "shard_id": 0, "at": 0.0}
        for i in range(start, start + n)
    ]


async def test_a_full_outbox_drops_the_oldest_records_counts_and_logs_them(caplog):
    events = EventPublisher(None, max_outbox=3)
    with caplog.at_level(logging.ERROR, logger="dispatch.events"):
        await events.flush([], _records(2))
        assert events.dropped == 0
        await events.flush([], _records(3, start=2))
    assert events.dropped == 2
    assert [r["ride_id"] for r in events.outbox] == ["r2", "r3", "r4"]
    assert events.stats()["dropped"] == 2 and events.stats()["records_waiting"] == 3
    assert "dropped 2 ride records" in caplog.text


async def test_client_events_with_nowhere_to_go_count_as_dropped():
    events = EventPublisher(None)
    await events.flush([("driver", 7, {"type": "offer"})], [])
    assert events.stats()["dropped"] == 1
