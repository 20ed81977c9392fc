"""A weighted latency histogram with log-spaced buckets (about 2% wide), mergeable.

Percentiles read from it are accurate to a bucket's width; that is what the benchmarks
report, and they say so.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

_MIN_S = 1e-5
_MAX_S = 100.0
_GROWTH = 1.02
_EDGES = _MIN_S * _GROWTH ** np.arange(int(np.ceil(np.log(_MAX_S / _MIN_S) / np.log(_GROWTH))) + 1)


class LatencyHistogram:
    def __init__(self) -> None:
        self.counts = np.zeros(len(_EDGES) + 1, dtype=np.float64)
        self.total = 0.0
        self.sum_s = 0.0

    def add(self, latency_s: ArrayLike, weight: ArrayLike = 1.0) -> None:
        lat = np.atleast_1d(np.asarray(latency_s, dtype=np.float64))
        w = np.broadcast_to(np.asarray(weight, dtype=np.float64), lat.shape)
        idx = np.searchsorted(_EDGES, lat, side="right")
        np.add.at(self.counts, idx, w)
        self.total += float(w.sum())
        self.sum_s += float((lat * w).sum())

    def merge(self, other: LatencyHistogram) -> None:
        self.counts += other.counts
        self.total += other.total
        self.sum_s += other.sum_s

    def percentile(self, q: float) -> float:
        """The q-th percentile in seconds (upper edge of the bucket holding it); NaN if empty."""
        if self.total <= 0:
            return float("nan")
        cum = np.cumsum(self.counts)
        i = int(np.searchsorted(cum, self.total * q / 100.0, side="left"))
        return float(_EDGES[min(i, len(_EDGES) - 1)])

    def mean(self) -> float:
        return self.sum_s / self.total if self.total else float("nan")

    def summary_ms(self) -> dict[str, float]:
        return {
            "count": int(self.total),
            "p50_ms": round(self.percentile(50) * 1e3, 3),
            "p95_ms": round(self.percentile(95) * 1e3, 3),
            "p99_ms": round(self.percentile(99) * 1e3, 3),
            "mean_ms": round(self.mean() * 1e3, 3),
        }
