"""Every Ray API call of the engine: connecting, deploying shards, finding them.

Shards are named, detached actors in one namespace, so edges on any machine find them by
name (``<region>-shard-<i>``) and they outlive the process that created them. Restart,
placement and concurrency options live side by side in :func:`shard_actor_options`.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass
from typing import Any

import ray

from actors.shard_actor import ShardActor

log = logging.getLogger("dispatch.actors")

DEFAULT_NAMESPACE = "dispatch"


def shard_actor_name(region_name: str, shard_id: int) -> str:
    return f"{region_name}-shard-{shard_id}"


@dataclass(frozen=True, slots=True)
class ShardOptions:
    # CPU reserved per shard for scheduling. Four shards must fit on a 2-core machine next
    # to the edge; on a cluster, give each shard a whole core (SHARD_NUM_CPUS=1).
    num_cpus: float = 0.25
    # Restart forever: a shard is soft state plus open rides reloaded from Postgres.
    max_restarts: int = -1
    # A call in flight when a shard dies is retried on the restarted one. Ingest is
    # idempotent (rows older than the table's are dropped), claims and halo pushes too.
    max_task_retries: int = 3
    # Async actor: calls interleave only at awaits; the core itself is never awaited.
    max_concurrency: int = 1000

    @classmethod
    def from_env(cls) -> ShardOptions:
        return cls(num_cpus=float(os.environ.get("SHARD_NUM_CPUS", "0.25")))


def shard_actor_options(name: str, namespace: str, opts: ShardOptions) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": namespace,
        "lifetime": "detached",
        "get_if_exists": True,
        "num_cpus": opts.num_cpus,
        "max_restarts": opts.max_restarts,
        "max_task_retries": opts.max_task_retries,
        "max_concurrency": opts.max_concurrency,
    }


def connect(address: str | None = None, namespace: str = DEFAULT_NAMESPACE, num_cpus: int | None = None):
    """Join the Ray cluster at ``address`` (or RAY_ADDRESS); with neither, start a local one.

    Idempotent within a process. Returns the ray module's runtime context.
    """
    if ray.is_initialized():
        return ray.get_runtime_context()
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {
        "namespace": namespace,
        "ignore_reinit_error": True,
        "logging_level": logging.WARNING,
        "log_to_driver": os.environ.get("DISPATCH_RAY_LOG_TO_DRIVER", "1") == "1",
    }
    if address:
        kwargs["address"] = address
    else:
        kwargs["num_cpus"] = num_cpus or os.cpu_count() or 2
        kwargs["include_dashboard"] = os.environ.get("DISPATCH_RAY_DASHBOARD", "0") == "1"
    # ray.init installs native handlers for SIGTERM (a stack dump, then death); keep the
    # process's own, so an edge under uvicorn still shuts down gracefully on SIGTERM.
    saved = {}
    if threading.current_thread() is threading.main_thread():
        saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    ray.init(**kwargs)
    for sig, handler in saved.items():
        if callable(handler) or handler in (signal.SIG_DFL, signal.SIG_IGN):
            signal.signal(sig, handler)
    return ray.get_runtime_context()


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()


_remote_cls = None


def _shard_actor_cls():
    global _remote_cls
    if _remote_cls is None:
        _remote_cls = ray.remote(ShardActor)
    return _remote_cls


def deploy_shards(
    region_name: str,
    shard_count: int,
    region_toml: str,
    namespace: str = DEFAULT_NAMESPACE,
    opts: ShardOptions | None = None,
    redis_url: str | None = None,
) -> list[Any]:
    """Create (or find, if already running) the region's shard actors and wait until ready.

    ``redis_url`` is where shards publish client events and ride records; shards found
    already running are pointed at it too.
    """
    opts = opts or ShardOptions.from_env()
    cls = _shard_actor_cls()
    handles = [
        cls.options(**shard_actor_options(shard_actor_name(region_name, i), namespace, opts)).remote(
            region_toml, i, namespace, redis_url
        )
        for i in range(shard_count)
    ]
    ray.get([h.ping.remote() for h in handles])
    if redis_url:
        ray.get([h.set_redis_url.remote(redis_url) for h in handles])
    return handles


def teardown_shards(region_name: str, shard_count: int, namespace: str = DEFAULT_NAMESPACE) -> int:
    """Kill the region's shard actors (no restart). Returns how many were found."""
    killed = 0
    for i in range(shard_count):
        try:
            h = ray.get_actor(shard_actor_name(region_name, i), namespace=namespace)
        except ValueError:
            continue
        ray.kill(h, no_restart=True)
        killed += 1
    return killed


def lookup_shard(region_name: str, shard_id: int, namespace: str = DEFAULT_NAMESPACE):
    return ray.get_actor(shard_actor_name(region_name, shard_id), namespace=namespace)


def ready(refs: list) -> list:
    """Those of ``refs`` whose call has finished (answered or failed). Never waits.

    About 85 µs of CPU when some have not (measured on 2 cores), a few µs when all have.
    """
    done, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
    return done


def result(ref):
    """The value of a finished call (see :func:`ready`); raises the call's error."""
    return ray.get(ref)


class ShardDirectory:
    """Shard id → actor handle for one region, looked up by name and cached."""

    def __init__(self, region_name: str, shard_count: int, namespace: str = DEFAULT_NAMESPACE) -> None:
        self.region_name = region_name
        self.shard_count = shard_count
        self.namespace = namespace
        self._handles: dict[int, Any] = {}

    def handle(self, shard_id: int):
        h = self._handles.get(shard_id)
        if h is None:
            h = lookup_shard(self.region_name, shard_id, self.namespace)
            self._handles[shard_id] = h
        return h

    def forget(self, shard_id: int) -> None:
        self._handles.pop(shard_id, None)

    def all(self) -> list[Any]:
        return [self.handle(i) for i in range(self.shard_count)]

    async def stats(self) -> list[dict]:
        import asyncio

        refs = [h.stats.remote() for h in self.all()]
        return list(await asyncio.gather(*refs))


class _ReplyPoller:
    """Completes futures for ObjectRefs by polling :func:`ready` from the event loop.

    Awaiting an ObjectRef completes its asyncio future from one of Ray's threads, which
    needs the GIL; in an edge whose loop is busy it gets it late (30 ms median, 150 ms p90
    for a 1.5 ms call, see ``actors/router.py``). Polled every ``POLL_S`` while replies
    are awaited, the same call is seen within a poll, at about 85 µs of CPU per poll.
    """

    POLL_S = 0.005

    def __init__(self) -> None:
        self.loop = None
        self.waiting: dict[Any, list] = {}
        self.task = None

    def wait(self, ref):
        import asyncio

        loop = asyncio.get_running_loop()
        if loop is not self.loop:  # a new event loop (tests run several): start afresh
            self.loop, self.waiting, self.task = loop, {}, None
        fut = loop.create_future()
        self.waiting.setdefault(ref, []).append(fut)
        if self.task is None or self.task.done():
            self.task = loop.create_task(self._run())
        return fut

    async def _run(self) -> None:
        import asyncio

        while self.waiting:
            await asyncio.sleep(self.POLL_S)
            for ref in ready(list(self.waiting)):
                futs = self.waiting.pop(ref)
                try:
                    value, error = result(ref), None
                except Exception as exc:
                    value, error = None, exc
                for fut in futs:
                    if fut.done():
                        continue
                    if error is None:
                        fut.set_result(value)
                    else:
                        fut.set_exception(error)
            # Forget refs whose every waiter gave up (timed out): a dead shard's call
            # would otherwise be polled forever.
            for ref in [r for r, futs in self.waiting.items() if all(f.done() for f in futs)]:
                del self.waiting[ref]


_replies = _ReplyPoller()


async def shard_call(ref, timeout_s: float = 5.0):
    """Await a shard call's result: the shard's own errors as they are, a shard that does
    not answer within ``timeout_s`` (or is dead) as :class:`~dispatch.errors.Unavailable`.
    The reply is polled for (:class:`_ReplyPoller`), not awaited on Ray's thread."""
    import asyncio

    from dispatch.errors import Unavailable

    try:
        return await asyncio.wait_for(_replies.wait(ref), timeout_s)
    except TimeoutError:
        raise Unavailable("the shard did not answer in time", dependency="shard") from None
    except Exception as exc:
        raise remote_error(exc) from None


class BatchedCall:
    """One shard method that takes a list, called with what arrived while the last call
    was out: at most one call per shard at a time.

    ``await batch.add(shard_id, item)`` returns the item's own outcome from the method's
    list of outcomes (one per item, in order), or raises it when it is an exception. A
    lone item goes out at once, so an idle edge adds no delay; under load a ride handoff
    costs a share of one actor call instead of a whole one (about a millisecond of CPU on
    each side on a small machine). A failed or timed-out call fails every item in it the
    way :func:`shard_call` fails one.
    """

    def __init__(
        self, directory: ShardDirectory, method: str, *, max_items: int = 256, timeout_s: float = 5.0
    ) -> None:
        self.directory = directory
        self.method = method
        self.max_items = max_items
        self.timeout_s = timeout_s
        self._queued: dict[int, list[tuple[Any, Any]]] = {}
        # The task sending a shard's queue, while it runs (held here: the event loop
        # keeps only weak references to tasks).
        self._senders: dict[int, Any] = {}
        self.calls = 0
        self.items = 0

    async def add(self, shard_id: int, item: Any) -> Any:
        import asyncio

        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queued.setdefault(shard_id, []).append((item, fut))
        sender = self._senders.get(shard_id)
        if sender is None or sender.done():
            self._senders[shard_id] = loop.create_task(self._drain(shard_id))
        outcome = await fut
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def _drain(self, shard_id: int) -> None:
        queued = self._queued[shard_id]
        while queued:
            batch = queued[: self.max_items]
            del queued[: self.max_items]
            self.calls += 1
            self.items += len(batch)
            try:
                handle = getattr(self.directory.handle(shard_id), self.method)
                outcomes = await shard_call(handle.remote([item for item, _ in batch]), self.timeout_s)
                if not isinstance(outcomes, list) or len(outcomes) != len(batch):
                    raise RuntimeError(f"{self.method}: {len(batch)} items, answer {outcomes!r:.200}")
            except Exception as exc:  # the whole call failed: each item fails alike
                outcomes = [remote_error(exc)] * len(batch)
            for (_, fut), outcome in zip(batch, outcomes, strict=True):
                if not fut.done():
                    fut.set_result(outcome)


def remote_error(exc: BaseException) -> BaseException:
    """What a failed shard call means to a caller: the shard's own DispatchError (the
    cause of a RayTaskError), :class:`~dispatch.errors.Unavailable` when the shard is
    dead, restarting or not deployed, else ``exc`` unchanged."""
    from dispatch.errors import DispatchError, Unavailable

    if isinstance(exc, DispatchError) and not isinstance(exc, ray.exceptions.RayError):
        return exc
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = getattr(exc, "cause", None)
        if isinstance(cause, DispatchError):
            return cause
        return exc
    if isinstance(exc, ray.exceptions.RayActorError | ray.exceptions.GetTimeoutError | ValueError):
        # ValueError: ray.get_actor found no actor by that name (not deployed yet).
        return Unavailable(f"shard unavailable: {type(exc).__name__}")
    return exc
