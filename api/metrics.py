"""Prometheus metrics of one edge process, served at ``/metrics``.

Hot-path counts (frames, updates, drops) are plain integers in :class:`EdgeCounters`,
bumped without locks by the event loop and turned into metric families only when
Prometheus scrapes: at 25k frames/s a client-library ``Counter.inc()`` per frame would
be measurable. Slower signals (relay lag, REST latency) use the client library directly.
Each app has its own registry, so several edges in one test process do not collide.
"""

from __future__ import annotations

from collections import Counter

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class EdgeCounters:
    """Counters of the sockets, keyed by label tuples."""

    def __init__(self) -> None:
        self.frames: Counter[tuple[str, str]] = Counter()  # (socket, type)
        self.rejected: Counter[tuple[str, str]] = Counter()  # (socket, code)
        self.updates: Counter[str] = Counter()  # source: driver | gateway
        self.rows_rejected: Counter[str] = Counter()  # reason (gateway rows)
        self.rate_limited: Counter[str] = Counter()  # socket
        self.connections: Counter[str] = Counter()  # role -> open now
        self.connections_total: Counter[str] = Counter()  # role -> ever accepted
        self.auth_failures: Counter[str] = Counter()  # where: rest | socket
        self.relayed: Counter[str] = Counter()  # audience -> messages forwarded to sockets


class EdgeCollector:
    """Turns the counters and the router's state into metric families at scrape time."""

    def __init__(
        self, counters: EdgeCounters, router_fn, relay_fn, gc_fn=lambda: None, shards_fn=lambda: None
    ) -> None:
        self.c = counters
        self.router_fn = router_fn  # () -> LocationRouter | None
        self.relay_fn = relay_fn  # () -> EventRelay | None
        self.gc_fn = gc_fn  # () -> GcPolicy | None
        self.shards_fn = shards_fn  # () -> ShardClient | None

    def collect(self):
        c = self.c
        f = CounterMetricFamily(
            "dispatch_edge_frames", "WebSocket frames received", labels=["socket", "type"]
        )
        for (sock, typ), v in c.frames.items():
            f.add_metric([sock, typ], v)
        yield f
        f = CounterMetricFamily(
            "dispatch_edge_frames_rejected", "frames answered with an error", labels=["socket", "code"]
        )
        for (sock, code), v in c.rejected.items():
            f.add_metric([sock, code], v)
        yield f
        f = CounterMetricFamily(
            "dispatch_edge_location_updates", "location updates accepted", labels=["source"]
        )
        for src, v in c.updates.items():
            f.add_metric([src], v)
        yield f
        f = CounterMetricFamily(
            "dispatch_edge_rows_rejected", "rows of gateway batches refused", labels=["reason"]
        )
        for reason, v in c.rows_rejected.items():
            f.add_metric([reason], v)
        yield f
        f = CounterMetricFamily(
            "dispatch_edge_rate_limited", "location frames over the rate limit", labels=["socket"]
        )
        for sock, v in c.rate_limited.items():
            f.add_metric([sock], v)
        yield f
        g = GaugeMetricFamily("dispatch_edge_connections", "open WebSocket connections", labels=["role"])
        for role, v in c.connections.items():
            g.add_metric([role], v)
        yield g
        f = CounterMetricFamily(
            "dispatch_edge_connections_accepted", "WebSocket connections accepted", labels=["role"]
        )
        for role, v in c.connections_total.items():
            f.add_metric([role], v)
        yield f
        f = CounterMetricFamily(
            "dispatch_edge_auth_failures", "requests refused for their token", labels=["where"]
        )
        for where, v in c.auth_failures.items():
            f.add_metric([where], v)
        yield f
        f = CounterMetricFamily(
            "dispatch_edge_events_relayed", "bus events forwarded to sockets", labels=["audience"]
        )
        for aud, v in c.relayed.items():
            f.add_metric([aud], v)
        yield f
        router = self.router_fn()
        if router is not None:
            f = CounterMetricFamily(
                "dispatch_router_rows", "rows through the router to the shards", labels=["outcome"]
            )
            for outcome, v in router.counters.items():
                f.add_metric([outcome], v)
            yield f
            f = CounterMetricFamily(
                "dispatch_shard_rows_dropped", "rows the shards refused", labels=["reason"]
            )
            for reason, v in router.shard_dropped.items():
                f.add_metric([reason], v)
            yield f
            g = GaugeMetricFamily("dispatch_router_buffered_rows", "rows waiting for the next flush")
            g.add_metric([], router.buffered_rows())
            yield g
            g = GaugeMetricFamily(
                "dispatch_router_flush_latency_seconds", "submit -> applied in the shard", labels=["quantile"]
            )
            for q in (0.5, 0.9, 0.99):
                g.add_metric([str(q)], router.latency.percentile(q * 100))
            yield g
            g = GaugeMetricFamily("dispatch_router_flush_rows", "rows per shard call", labels=["quantile"])
            for q in (0.5, 0.9, 0.99):
                g.add_metric([str(q)], router.flush_rows.percentile(q * 100) * 1e3)
            yield g
        gc_policy = self.gc_fn()
        if gc_policy is not None:
            f = CounterMetricFamily(
                "dispatch_edge_gc_seconds", "time spent in garbage collections (api/gc_policy.py)"
            )
            f.add_metric([], gc_policy.seconds)
            yield f
            g = GaugeMetricFamily("dispatch_edge_gc_longest_seconds", "the longest collection so far")
            g.add_metric([], gc_policy.longest_s)
            yield g
        shards = self.shards_fn()
        if shards is not None:
            # Ride handoffs, accepts and declines go to a shard in batches (actors/batching.py):
            # items per call says how much of an actor call's cost each one shares.
            yield from batch_families(
                ("dispatch_shard_batched_calls", "batched calls to the shards"),
                ("dispatch_shard_batched_items", "items carried by batched calls"),
                "call",
                shards.batch_counts,
            )
        relay = self.relay_fn()
        if relay is not None:
            g = GaugeMetricFamily("dispatch_relay_up", "1 while the relay's Redis subscription is live")
            g.add_metric([], 1.0 if relay.connected else 0.0)
            yield g
            g = GaugeMetricFamily("dispatch_relay_channels", "bus channels this edge listens on")
            g.add_metric([], len(relay.channels))
            yield g


def batch_families(
    calls: tuple[str, str], items: tuple[str, str], label: str, counts: dict[str, tuple[int, int]]
) -> tuple[CounterMetricFamily, CounterMetricFamily]:
    """The two counters of batched calls, ``(name, help)`` each, from ``{kind: (calls,
    items)}`` (:class:`actors.batching.Batcher`'s ``calls`` and ``items``): items per
    call says how much of a call's cost each item shares."""
    c = CounterMetricFamily(*calls, labels=[label])
    i = CounterMetricFamily(*items, labels=[label])
    for kind, (n_calls, n_items) in counts.items():
        c.add_metric([kind], n_calls)
        i.add_metric([kind], n_items)
    return c, i


def make_registry(
    counters: EdgeCounters, router_fn, relay_fn, gc_fn=lambda: None, shards_fn=lambda: None
) -> tuple[CollectorRegistry, Histogram, Histogram]:
    """The app's registry with the collector, plus the relay-lag and REST histograms."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EdgeCollector(counters, router_fn, relay_fn, gc_fn, shards_fn))
    relay_lag = Histogram(
        "dispatch_relay_lag_seconds",
        "from a shard publishing an event to this edge writing it to the socket",
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        registry=registry,
    )
    rest = Histogram(
        "dispatch_http_request_duration_seconds",
        "REST request latency",
        ["route", "method", "status"],
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        registry=registry,
    )
    return registry, relay_lag, rest
