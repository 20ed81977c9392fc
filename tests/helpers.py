"""Shared test helpers: timeouts that scale with the machine, polling with a deadline."""

from __future__ import annotations

import asyncio
import os
import time

TIMEOUT_FACTOR = float(os.environ.get("DISPATCH_TEST_TIMEOUT_FACTOR", "1"))


def scaled(seconds: float) -> float:
    return seconds * TIMEOUT_FACTOR


async def eventually(check, timeout_s: float = 10.0, interval_s: float = 0.05):
    """Await ``check()`` (sync or async) until it returns a truthy value; return it."""
    deadline = time.monotonic() + scaled(timeout_s)
    last = None
    while time.monotonic() < deadline:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval_s)
    raise AssertionError(f"condition not met within {scaled(timeout_s):.1f}s (last: {last!r})")
