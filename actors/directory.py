"""Every Ray API call of the engine: connecting, the shard actor's options, deploying,
finding and removing shards, and awaiting their replies.

Shards are named, detached actors in one namespace, so edges on any machine find them by
name (``<region>-shard-<i>``) and they outlive the process that created them. Restart,
placement, concurrency and resource options live side by side in
:func:`shard_actor_options`. Code outside ``actors/`` reaches a shard through
:class:`actors.client.ShardClient`, never through this module's handles.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from actors.settings import DEFAULT_NAMESPACE, ShardSettings
from actors.shard_actor import ShardActor
from dispatch.errors import DispatchError, Unavailable

log = logging.getLogger("dispatch.actors")

__all__ = ["DEFAULT_NAMESPACE"]  # re-exported: older callers import it from here

# Restart forever: a shard is soft state plus open rides reloaded from Postgres.
MAX_RESTARTS = -1
# A call in flight when a shard dies is retried on the restarted one. Ingest is
# idempotent (rows older than the table's are dropped), claims and halo pushes too.
MAX_TASK_RETRIES = 3
# Async actor: calls interleave only at awaits; the core itself is never awaited.
MAX_CONCURRENCY = 1000


def shard_actor_name(region_name: str, shard_id: int) -> str:
    return f"{region_name}-shard-{shard_id}"


# -- joining the cluster --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RayAuth:
    """What a process needs to join a cluster whose head enforces token authentication
    (Ray 2.60 turns it on for every new head it starts): the mode and a file holding the
    token. ``dispatch up`` records both in its data dir (:func:`record_auth`)."""

    mode: str = "disabled"  # "token" or "disabled"
    token_path: str | None = None


def cluster_auth() -> tuple[str, str | None]:
    """The auth mode of the cluster this process is connected to, and its token if any."""
    # ray._raylet is compiled; its .pyi names few of its members.
    from ray._raylet import (  # type: ignore[attr-defined]
        AuthenticationMode,
        AuthenticationTokenLoader,
        get_authentication_mode,
    )

    if get_authentication_mode() != AuthenticationMode.TOKEN:
        return "disabled", None
    return "token", AuthenticationTokenLoader.instance().get_raw_token(ignore_auth_mode=True)


def record_auth(data_dir: Path) -> RayAuth:
    """Write what a joining process needs into ``data_dir`` (the token in a 0600 file)
    and return it. Call while connected (after :func:`connect`)."""
    mode, token = cluster_auth()
    if mode != "token" or not token:
        return RayAuth("disabled")
    path = Path(data_dir) / "ray_auth_token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)  # an older file may have had wider bits
    return RayAuth("token", str(path))


def connect(
    address: str | None = None,
    namespace: str = DEFAULT_NAMESPACE,
    num_cpus: int | None = None,
    *,
    log_to_driver: bool = True,
    dashboard: bool = False,
):
    """Join the Ray cluster at ``address``; with no address, start a local one with
    ``num_cpus``. A cluster whose head enforces tokens needs them in this process's
    environment before it starts (Ray 2.60 reads ``RAY_AUTH_MODE`` and
    ``RAY_AUTH_TOKEN_PATH`` from there only): the command line restarts itself with them
    (``api/cli.py: _join_ray_env``).

    Idempotent within a process. Returns the ray module's runtime context.
    """
    if ray.is_initialized():
        return ray.get_runtime_context()
    kwargs: dict[str, Any] = {
        "namespace": namespace,
        "ignore_reinit_error": True,
        "logging_level": logging.WARNING,
        "log_to_driver": log_to_driver,
    }
    if address:
        kwargs["address"] = address
    else:
        kwargs["num_cpus"] = num_cpus or os.cpu_count() or 2
        kwargs["include_dashboard"] = dashboard
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


def gcs_address() -> str:
    """The address other processes join this cluster at."""
    return ray.get_runtime_context().gcs_address


def shutdown() -> None:
    if ray.is_initialized():
        ray.shutdown()


# -- the shard actor ------------------------------------------------------------------------


def shard_resources(settings: ShardSettings) -> dict[str, float]:
    """What each shard asks the scheduler for."""
    wants = {"CPU": settings.num_cpus}
    if settings.host_resource:
        wants[settings.host_resource] = settings.host_resource_amount
    return wants


def shard_actor_options(name: str, settings: ShardSettings) -> dict[str, Any]:
    opts: dict[str, Any] = {
        "name": name,
        "namespace": settings.namespace,
        "lifetime": "detached",
        "get_if_exists": True,
        "num_cpus": settings.num_cpus,
        "max_restarts": MAX_RESTARTS,
        "max_task_retries": MAX_TASK_RETRIES,
        "max_concurrency": MAX_CONCURRENCY,
    }
    if settings.host_resource:
        opts["resources"] = {settings.host_resource: settings.host_resource_amount}
        # Spread over the shard hosts, so one host's loss costs a few shards, not all.
        opts["scheduling_strategy"] = "SPREAD"
    return opts


_remote_cls = None


def _shard_actor_cls():
    global _remote_cls
    if _remote_cls is None:
        _remote_cls = ray.remote(ShardActor)
    return _remote_cls


@dataclass(frozen=True, slots=True)
class PeerLookup:
    """How a shard finds the other shards of its region (given to its constructor, so the
    actor module needs nothing from this one). Picklable: Ray keeps it with the
    constructor's arguments for restarts."""

    region_name: str
    namespace: str

    def __call__(self, shard_id: int):
        return lookup_shard(self.region_name, shard_id, self.namespace)


class DeployTimeout(Unavailable):
    """The shards were not all up within the deploy timeout (usually: they do not fit)."""


def deploy_shards(settings: ShardSettings, timeout_s: float | None = None) -> list[Any]:
    """Create (or find, if already running) the region's shard actors, each with
    ``settings``, and wait until every one answers.

    Raises :class:`DeployTimeout` naming the resources asked for and the cluster's when
    they are not all up within ``timeout_s`` (default ``settings.deploy_timeout_s``). A
    shard found already running keeps the settings it was created with.
    """
    region = settings.region()
    timeout_s = settings.deploy_timeout_s if timeout_s is None else timeout_s
    cls = _shard_actor_cls()
    peers = PeerLookup(region.name, settings.namespace)
    handles = [
        cls.options(**shard_actor_options(shard_actor_name(region.name, i), settings)).remote(
            settings, i, peers
        )
        for i in range(region.shard_count)
    ]
    refs = [h.ping.remote() for h in handles]
    done, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    if pending:
        wants = shard_resources(settings)
        asked = ", ".join(f"{k}={v:g}" for k, v in wants.items())
        total = {k: v for k, v in ray.cluster_resources().items() if k in wants or k == "CPU"}
        free = {k: v for k, v in ray.available_resources().items() if k in wants or k == "CPU"}
        raise DeployTimeout(
            f"{len(pending)} of {len(refs)} shards of {region.name} not up after {timeout_s:g} s. "
            f"Each shard asks for {asked} ({region.shard_count} shards); the cluster has {total} "
            f"in all, {free} free. Add nodes (with the {settings.host_resource or 'CPU'} resource) "
            "or lower DISPATCH_SHARD_NUM_CPUS",
            dependency="ray",
        )
    ray.get(done)  # a shard whose constructor failed raises here
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


def call_blocking(refs: list, timeout_s: float) -> list:
    """The values of ``refs``, waiting on this thread (commands, never an event loop)."""
    return ray.get(refs, timeout=timeout_s)


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
        return list(await asyncio.gather(*(shard_call(h.stats.remote()) for h in self.all())))


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
        loop = asyncio.get_running_loop()
        if loop is not self.loop:  # a new event loop (tests run several): start afresh
            self.loop, self.waiting, self.task = loop, {}, None
        fut = loop.create_future()
        self.waiting.setdefault(ref, []).append(fut)
        if self.task is None or self.task.done():
            self.task = loop.create_task(self._run())
        return fut

    async def _run(self) -> None:
        while self.waiting:
            await asyncio.sleep(self.POLL_S)
            try:
                done = ready(list(self.waiting))
            except Exception:
                # One ref Ray can no longer place (its owner is gone, or Ray shut down)
                # fails the whole wait: ask ref by ref, so only the bad ones fail and the
                # poller keeps serving the rest.
                done = []
                for ref in list(self.waiting):
                    try:
                        done.extend(ready([ref]))
                    except Exception as exc:
                        for fut in self.waiting.pop(ref):
                            if not fut.done():
                                fut.set_exception(exc)
            for ref in done:
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
    try:
        return await asyncio.wait_for(_replies.wait(ref), timeout_s)
    except TimeoutError:
        raise Unavailable("the shard did not answer in time", dependency="shard") from None
    except Exception as exc:
        raise remote_error(exc) from None


def remote_error(exc: BaseException) -> BaseException:
    """What a failed shard call means to a caller: the shard's own DispatchError (the
    cause of a RayTaskError), :class:`~dispatch.errors.Unavailable` when the shard is
    dead, restarting or not deployed, else ``exc`` unchanged."""
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
