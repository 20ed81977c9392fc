"""Garbage collection for an edge that holds thousands of sockets.

Every open socket keeps a dozen-odd long-lived objects (its session, the coroutines and
tasks serving it, its queues): measured at 5,000 driver sockets, 10k rides/min and 200k
updates/s, the edge held 1.2 million objects that the collector tracks. Python runs a
full collection whenever the survivors since the last one reach a quarter of that, about
every 8 s there, and each one walked all 1.2 million: 0.4-0.5 s of CPU with the event
loop stopped, so every socket and request waited half a second (a p99 of its own).

The policy: :meth:`GcPolicy.tick` freezes what has survived (``gc.freeze``: frozen
objects are left out of every collection) every ``freeze_every_s``, so full collections
walk only what is new since, and every ``full_every_s`` it unfreezes, collects everything
once and freezes again, so reference cycles among objects that died while frozen (a
closed socket's session) are freed within that long. One pause of a full collection per
``full_every_s`` instead of one every few seconds. Reference counting frees everything
else at once, frozen or not.

And young collections run every ``young_threshold`` net allocations instead of Python's
700: when thousands of sockets open at once (clients moving from an edge that died),
their objects were walked again and again by hundreds of young and middle collections,
0.66 s of a simulator's 1.9 s of CPU for 3,000 reconnects; 0.23 s at 20,000. Most
objects an edge makes die young by reference counting, never seen by a collection.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field


@dataclass
class GcPolicy:
    freeze_every_s: float = 60.0
    full_every_s: float = 600.0
    young_threshold: int = 20_000
    # Collections timed since :meth:`install`, for /metrics.
    seconds: float = 0.0
    longest_s: float = 0.0
    collections: list[int] = field(default_factory=lambda: [0, 0, 0])
    full_rounds: int = 0
    _started: float = 0.0
    _last_freeze: float = 0.0
    _last_full: float = 0.0
    _thresholds: tuple[int, int, int] | None = None

    def install(self) -> None:
        """Time every collection from now on and freeze what exists (the app as started)."""
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)
        if self._thresholds is None:
            self._thresholds = gc.get_threshold()
            gc.set_threshold(self.young_threshold, *self._thresholds[1:])
        gc.freeze()
        self._last_freeze = self._last_full = time.monotonic()

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)
        if self._thresholds is not None:
            gc.set_threshold(*self._thresholds)
            self._thresholds = None
        gc.unfreeze()

    def tick(self, now: float | None = None) -> str | None:
        """Freeze or do the full round when due; what it did ("full", "freeze" or None)."""
        now = time.monotonic() if now is None else now
        if now - self._last_full >= self.full_every_s:
            self._last_full = self._last_freeze = now
            gc.unfreeze()
            gc.collect()
            gc.freeze()
            self.full_rounds += 1
            return "full"
        if now - self._last_freeze >= self.freeze_every_s:
            self._last_freeze = now
            gc.freeze()
            return "freeze"
        return None

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        took = time.perf_counter() - self._started
        self.seconds += took
        self.longest_s = max(self.longest_s, took)
        self.collections[int(info.get("generation", 2))] += 1
