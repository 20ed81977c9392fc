"""The location router: per-shard columnar buffers flushed as one call per shard.

An edge process owns one router. Frames hand it location rows (:meth:`submit` for a
columnar batch, :meth:`submit_one` for a single update); it partitions them by shard
with the raster shard map and appends them to that shard's buffer. A flush loop sends a
shard's buffer as one packed ``ingest`` call when it holds ``max_rows_per_call`` rows or
its oldest row has waited ``flush_interval_s``, with at most ``max_inflight`` calls
outstanding per shard.

A Ray actor call costs about a millisecond of CPU on a small machine, so one call per
update could never reach 200k updates/s; one call per shard per flush can. Batches stay
under Ray's 100 KiB inline-argument limit (2,000 rows of 48 bytes) so they travel inside
the call instead of through the object store.

Replies are polled (``ray.wait`` with no timeout, every ``poll_interval_s`` while calls
are out), not awaited. Awaiting an ObjectRef completes an asyncio future from one of
Ray's threads, and that thread needs the GIL: in an edge whose event loop is busy with
sockets it gets it late, and a 1.5 ms call took 30 ms at the median and 150 ms at p90 (a
loop kept busy in a test; 0.5 s in the edge at 24k frames/s, where two calls in flight
per shard then capped what reached the shards at 18k rows/s). Polled from the loop's
own thread the same call takes 2 ms however busy the loop is.

Ingest links. While a shard's ingest link (``actors/ingest_link.py``: plain TCP to the
shard, set up through one Ray call) is up, its batches go over it instead of as Ray
calls: about a millisecond of CPU saved per batch across the two processes, and replies
arrive on the loop with no polling. A shard without a link (not asked yet, restarting,
an older shard) gets Ray calls as before while the router sets one up in the background
(again after ``link_retry_s``); a link that breaks or leaves a batch unanswered for
``link_timeout_s`` is closed, and the next one comes from asking Ray for the shard's
endpoint afresh, so it reaches the shard's live incarnation. The endpoint is asked again
every ``link_check_s`` too: a link to an incarnation Ray has replaced is dropped.

A batch whose call fails or whose link breaks before the answer goes back to the front
of its shard's buffer and is sent once more (counted as ``resent``), as a Ray call while
there is no link: Ray holds calls to a restarting actor until it is back, so the rows in
flight when a shard dies reach its next incarnation. Sending a row twice is harmless (the
shard keeps a driver's newest fix and counts the older copy ``out_of_order``). A batch
that fails a second time is counted under ``shard_error``.

Bounded: a shard's buffer never holds more than ``max_buffered_rows``. Past that,
:meth:`submit` refuses the rows and counts them as ``backpressure`` (the caller tells the
client), so memory stays flat while a shard is slow or restarting, and a row the router
accepted is either delivered or counted under ``shard_error`` (resent rows may take a
buffer past its bound by the batches that were in flight).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass

import numpy as np

from actors.ingest_link import MAX_FRAME_BYTES, Endpoint, IngestLink
from dispatch.drivers import LOCATION_DTYPE, concat_rows, take_rows
from dispatch.latency import LatencyHistogram
from dispatch.shardmap import OUTSIDE, ShardMap

log = logging.getLogger("dispatch.router")


@dataclass(frozen=True, slots=True)
class RouterConfig:
    flush_interval_s: float = 0.05
    max_rows_per_call: int = 2000
    max_buffered_rows: int = 200_000
    max_inflight: int = 2
    # How often replies are polled while calls are out. A shard answers in 1-2 ms; a poll
    # that finds nothing ready costs ~85 µs of the edge's CPU. With a call out most of
    # the time, 2 ms polls were 4-5% of a busy edge; 5 ms is small against the flush.
    poll_interval_s: float = 0.005
    # Ingest links (see the module docstring); False sends every batch as a Ray call.
    links: bool = True
    # Rows a link frame may take when more are waiting (a buffer is flushed once it holds
    # max_rows_per_call, so frames are that size unless calls are all out and rows pile
    # up). A frame has no Ray argument limit; bigger ones share each frame's cost over
    # more rows and keep a shard that answers late (its process waiting for a core) from
    # falling behind: with 2,000 rows and 2 frames out a shard got at most 4,000 rows a
    # round trip, and in bench_mission 9% of the rows were refused as backpressure.
    max_rows_per_frame: int = 8000
    link_timeout_s: float = 5.0
    link_retry_s: float = 1.0
    link_check_s: float = 5.0
    # How many more times a batch goes out after its call failed or its link broke.
    resend_failed: int = 1


@dataclass(slots=True)
class _Batch:
    """Rows sent in one call or link frame, until answered."""

    shard: int
    buf: _ShardBuffer
    rows: np.ndarray
    times: list[tuple[float, int]]  # (submitted_at, rows) of the chunks it was made of
    tries: int  # sends before this one
    sent_at: float


class _ShardBuffer:
    __slots__ = ("chunks", "rows", "inflight", "retry")

    def __init__(self) -> None:
        self.chunks: deque[tuple[float, np.ndarray]] = deque()  # (submitted_at, rows)
        self.rows = 0
        self.inflight = 0
        # Failed batches to send again, before the chunks.
        self.retry: deque[_Batch] = deque()

    def oldest(self) -> float:
        """When the oldest row waiting here was submitted (inf when none is)."""
        if self.retry:
            return self.retry[0].times[0][0]
        return self.chunks[0][0] if self.chunks else float("inf")

    def take(self, limit: int) -> tuple[np.ndarray, list[tuple[float, int]], int]:
        """The next batch's rows, their chunks' times and its sends so far: a failed batch
        to send again, else up to ``limit`` rows."""
        if self.retry:
            again = self.retry.popleft()
            self.rows -= len(again.rows)
            return again.rows, again.times, again.tries + 1
        parts: list[np.ndarray] = []
        times: list[tuple[float, int]] = []
        n = 0
        while self.chunks and n < limit:
            t, rows = self.chunks.popleft()
            room = limit - n
            if len(rows) > room:
                self.chunks.appendleft((t, rows[room:]))
                rows = rows[:room]
            parts.append(rows)
            times.append((t, len(rows)))
            n += len(rows)
        self.rows -= n
        return (concat_rows(parts) if len(parts) > 1 else parts[0]), times, 0


class LocationRouter:
    """Buffers location rows per shard and flushes them to the shard actors."""

    def __init__(self, shard_map: ShardMap, directory, config: RouterConfig | None = None) -> None:
        self.map = shard_map
        self.directory = directory
        self.cfg = config or RouterConfig()
        if self.cfg.max_rows_per_frame * LOCATION_DTYPE.itemsize > MAX_FRAME_BYTES:
            raise ValueError(f"max_rows_per_frame: a link frame holds at most {MAX_FRAME_BYTES} bytes")
        self.buffers = [_ShardBuffer() for _ in range(shard_map.shard_count)]
        self.counters: Counter[str] = Counter()
        self.shard_dropped: Counter[str] = Counter()  # reasons reported back by shards
        self.latency = LatencyHistogram()  # submit -> applied in the shard
        self.flush_rows = LatencyHistogram()  # rows per call, recorded as "seconds" / 1e3
        self._staged: list[tuple] = []
        self._staged_at = 0.0
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        # ObjectRef -> the batch: calls not yet answered
        self._inflight: dict[object, _Batch] = {}
        self._stopping = False
        # Per shard: its ingest link, when to try or check it next, the task setting it
        # up; per (shard, seq): a batch sent on a link, not yet answered.
        self._links: list[IngestLink | None] = [None] * shard_map.shard_count
        self._link_next: list[float] = [0.0] * shard_map.shard_count
        self._link_tasks: dict[int, asyncio.Task] = {}
        self._on_link: dict[tuple[int, int], _Batch] = {}
        self._seq = 0

    # -- intake ----------------------------------------------------------------------------

    def submit(self, rows: np.ndarray, now: float | None = None) -> int:
        """Queue LOCATION_DTYPE rows. Returns how many were accepted (the rest are counted)."""
        if rows.dtype != LOCATION_DTYPE:
            raise TypeError(f"expected LOCATION_DTYPE rows, got {rows.dtype}")
        n = len(rows)
        if not n:
            return 0
        now = time.monotonic() if now is None else now
        self.counters["submitted"] += n
        shard = self.map.shard_of(rows["lat"], rows["lng"])
        if n == 1:
            groups = [(int(shard[0]), rows)]
        else:
            order = np.argsort(shard, kind="stable")
            sorted_shard = shard[order]
            sorted_rows = take_rows(rows, order)
            cuts = np.flatnonzero(sorted_shard[1:] != sorted_shard[:-1]) + 1
            groups = [
                (int(sorted_shard[a]), sorted_rows[a:b])
                for a, b in zip(np.r_[0, cuts].tolist(), np.r_[cuts, n].tolist(), strict=True)
            ]
        accepted = 0
        for k, part in groups:
            if k == OUTSIDE:
                self.counters["unroutable"] += len(part)
                continue
            buf = self.buffers[k]
            room = self.cfg.max_buffered_rows - buf.rows
            if room < len(part):
                self.counters["backpressure"] += len(part) - max(room, 0)
                part = part[: max(room, 0)]
                if not len(part):
                    continue
            buf.chunks.append((now, part))
            buf.rows += len(part)
            accepted += len(part)
            if buf.rows >= self.cfg.max_rows_per_call:
                self._wake.set()
        self.counters["accepted"] += accepted
        return accepted

    def submit_one(
        self,
        driver_id: int,
        lat: float,
        lng: float,
        ts: float,
        heading: float = float("nan"),
        speed: float = float("nan"),
        vclass: int = -1,
        intent: int = 0,
        fix_dt: float = 0.0,
    ) -> None:
        """Queue one update (LOCATION_DTYPE's fields in order). Cheap: staged as a tuple,
        converted in bulk by the flush loop."""
        if not self._staged:
            self._staged_at = time.monotonic()
        self._staged.append((driver_id, lat, lng, ts, heading, speed, vclass, intent, fix_dt, b""))
        if len(self._staged) >= 512:
            self._drain_staged()

    def _drain_staged(self) -> None:
        if self._staged:
            staged, self._staged = self._staged, []
            self.submit(np.array(staged, dtype=LOCATION_DTYPE), now=self._staged_at)

    def buffered_rows(self) -> int:
        return sum(b.rows for b in self.buffers) + len(self._staged)

    # -- flushing --------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        tick = self.cfg.flush_interval_s / 2
        while not self._stopping:
            if self._inflight:
                await asyncio.sleep(self.cfg.poll_interval_s)
            else:
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=tick)
                except TimeoutError:
                    pass
            self._wake.clear()
            try:
                self.collect()
                self._tend_links()
                self.flush_due()
            except Exception:
                log.exception("router flush failed")
        for link in self._links:
            if link is not None:
                link.close()
        for task in self._link_tasks.values():
            task.cancel()

    def flush_due(self, force: bool = False) -> int:
        """Send every buffer that is full or old enough (all of them if force). Returns calls."""
        self._drain_staged()
        now = time.monotonic()
        calls = 0
        for k, buf in enumerate(self.buffers):
            while (
                buf.rows
                and buf.inflight < self.cfg.max_inflight
                and (
                    force
                    or buf.rows >= self.cfg.max_rows_per_call
                    or now - buf.oldest() >= self.cfg.flush_interval_s
                )
            ):
                self._send(k, buf)
                calls += 1
        return calls

    def _send(self, k: int, buf: _ShardBuffer) -> None:
        link = self._links[k]
        linked = link is not None and link.up
        rows, times, tries = buf.take(self.cfg.max_rows_per_frame if linked else self.cfg.max_rows_per_call)
        batch = _Batch(k, buf, rows, times, tries, time.monotonic())
        buf.inflight += 1
        self.counters["calls"] += 1
        self.flush_rows.add(len(rows) / 1e3)
        if linked:
            assert link is not None
            self._seq = (self._seq + 1) & 0xFFFFFFFF
            self._on_link[(k, self._seq)] = batch
            self.counters["link_frames"] += 1
            link.send(self._seq, rows.tobytes())
            return
        try:
            ref = self.directory.handle(k).ingest.remote(rows.tobytes())
        except Exception as exc:
            self._failed(batch, exc)
            return
        self._inflight[ref] = batch

    def collect(self) -> int:
        """Account for the calls the shards have answered since the last look. Never waits.

        Returns how many calls it settled.
        """
        if not self._inflight:
            return 0
        from actors.directory import ready, result

        done = ready(list(self._inflight))
        if not done:
            return 0
        now = time.monotonic()
        for ref in done:
            batch = self._inflight.pop(ref)
            try:
                reply = result(ref)
            except Exception as exc:
                self._failed(batch, exc)
                continue
            self._applied(batch, reply, now)
        return len(done)

    def _applied(self, batch: _Batch, reply: dict, now: float) -> None:
        batch.buf.inflight -= 1
        t = np.array([a for a, _ in batch.times])
        w = np.array([c for _, c in batch.times], dtype=np.float64)
        self.latency.add(now - t, w)
        self.counters["delivered"] += len(batch.rows)
        self.counters["applied"] += reply["applied"]
        self.shard_dropped.update(reply["dropped"])

    def _failed(self, batch: _Batch, exc: BaseException) -> None:
        """A call failed or a link broke before the answer: send the batch again (to the
        shard's live incarnation) or, past ``resend_failed``, count its rows lost."""
        buf, n = batch.buf, len(batch.rows)
        buf.inflight -= 1
        self.directory.forget(batch.shard)
        if batch.tries < self.cfg.resend_failed and not self._stopping:
            buf.retry.append(batch)
            buf.rows += n
            self.counters["resent"] += n
            log.info("router: %d rows for shard %d go again (%r)", n, batch.shard, exc)
            return
        self.counters["shard_error"] += n
        log.warning("router: %d rows for shard %d failed: %r", n, batch.shard, exc)

    # -- ingest links ----------------------------------------------------------------------

    def _tend_links(self) -> None:
        """Close links with a batch unanswered too long; set up missing ones and re-check
        live ones' endpoints when due (in the background)."""
        if not self.cfg.links:
            return
        now = time.monotonic()
        for k, link in enumerate(self._links):
            if link is not None and link.pending:
                oldest = self._on_link.get((k, link.pending[0]))
                if oldest is not None and now - oldest.sent_at > self.cfg.link_timeout_s:
                    link.close(TimeoutError(f"no answer in {self.cfg.link_timeout_s:g}s"))
            if now >= self._link_next[k] and k not in self._link_tasks:
                wait = self.cfg.link_check_s if self._links[k] else self.cfg.link_retry_s
                self._link_next[k] = now + wait
                task = asyncio.get_running_loop().create_task(self._link_up(k))
                self._link_tasks[k] = task
                task.add_done_callback(functools.partial(self._link_task_done, k))

    def _link_task_done(self, k: int, _task: asyncio.Task) -> None:
        self._link_tasks.pop(k, None)

    async def _link_up(self, k: int) -> None:
        """Ask the shard (through Ray) where its link is; open one if it has none yet or
        the endpoint changed (a new incarnation), closing the old one."""
        from actors.directory import shard_call

        try:
            ref = self.directory.handle(k).ingest_endpoint.remote()
            ep = Endpoint.from_dict(await shard_call(ref, self.cfg.link_timeout_s))
            current = self._links[k]
            if current is not None and current.up and ep == current.endpoint:
                return
            if current is not None:
                current.close(ConnectionError("the shard's endpoint changed"))
            link = IngestLink(functools.partial(self._link_reply, k), functools.partial(self._link_closed, k))
            await link.open(ep, self.cfg.link_timeout_s)
            self._links[k] = link
            self.counters["links_opened"] += 1
        except Exception as exc:
            self.counters["link_failures"] += 1
            self._link_next[k] = time.monotonic() + self.cfg.link_retry_s
            log.info("router: no ingest link to shard %d yet (%r); batches go as Ray calls", k, exc)

    def _link_reply(self, k: int, seq: int, reply: dict) -> None:
        self._applied(self._on_link.pop((k, seq)), reply, time.monotonic())
        self._wake.set()

    def _link_closed(self, k: int, seqs: list[int], exc: BaseException | None) -> None:
        link = self._links[k]
        if link is not None and not link.up:
            self._links[k] = None
            self._link_next[k] = time.monotonic()  # ask for the endpoint again at once
        self.counters["links_closed"] += 1
        for seq in seqs:
            self._failed(self._on_link.pop((k, seq)), exc or ConnectionError("link closed"))
        self._wake.set()

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Flush everything buffered and wait for the shards to answer."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.collect()
            self.flush_due(force=True)
            if not self.buffered_rows() and not self._inflight and not self._on_link:
                return
            await asyncio.sleep(self.cfg.poll_interval_s)

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Flush what is buffered (graceful shutdown), then stop the loop."""
        await self.drain(timeout_s)
        self._stopping = True
        self._wake.set()
        if self._task:
            await self._task
            self._task = None

    def stats(self) -> dict:
        return {
            "counters": dict(self.counters),
            "shard_dropped": dict(self.shard_dropped),
            "buffered_rows": self.buffered_rows(),
            "inflight_calls": len(self._inflight) + len(self._on_link),
            "links_up": sum(1 for link in self._links if link is not None and link.up),
            "latency": self.latency.summary_ms(),
        }
