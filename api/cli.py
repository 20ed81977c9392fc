"""The ``dispatch`` command line: run the engine, inspect its shards, operate it.

Subcommands import what they need when they run, so ``dispatch --help`` is instant and
the pure core stays free of Ray, asyncpg and Redis.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:  # imported where used: the CLI starts fast and pulls in only what a command needs
    from actors.directory import RayAuth
    from storage.postgres_server import PostgresServer

Command = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, tuple[Command, Callable[[argparse.ArgumentParser], None], str]] = {}


def command(name: str, help: str):
    """Register a subcommand: the decorated function takes the parsed args, returns an exit code."""

    def wrap(fn: Command):
        def add_args(p: argparse.ArgumentParser) -> None:
            for args, kwargs in getattr(fn, "_args", []):
                p.add_argument(*args, **kwargs)

        _COMMANDS[name] = (fn, add_args, help)
        return fn

    return wrap


def arg(*args, **kwargs):
    def wrap(fn):
        fn._args = [(args, kwargs), *getattr(fn, "_args", [])]
        return fn

    return wrap


def _region_arg(fn):
    return arg("--region", default=None, help="region file (default: DISPATCH_REGION_FILE or San Francisco)")(
        fn
    )


def _data_dir_arg(fn):
    return arg(
        "--data-dir", default=None, help="the local stack's data (default: DISPATCH_DATA_DIR or .dispatch)"
    )(fn)


def _stack_settings(args: argparse.Namespace, *, join: bool = True, **flags):
    """The command's settings: its flags > the environment > what the stack running in
    the data dir recorded (unless ``join`` is off) > defaults."""
    from api.settings import StackSettings

    given = {"region_file": getattr(args, "region", None), **flags}
    return StackSettings.load(getattr(args, "data_dir", None), join=join, **given)


def _join_ray_env(args: argparse.Namespace, auth: RayAuth | None) -> None:
    """Make sure this process can join a cluster whose head enforces tokens.

    Ray 2.60 reads a joining process's auth from the process environment only
    (``RAY_AUTH_MODE``, ``RAY_AUTH_TOKEN_PATH``), when it starts. Rather than write this
    process's environment, the command starts again in place (``execve``: same pid, same
    arguments) with the two variables set to what the stack recorded. Returns when they
    are already set, or when the cluster needs no token.
    """
    if auth is None or auth.mode != "token":
        return
    want = {"RAY_AUTH_MODE": "token"}
    if auth.token_path:
        want["RAY_AUTH_TOKEN_PATH"] = auth.token_path
    if all(os.environ.get(k) == v for k, v in want.items()):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "api.cli", *args.argv], {**os.environ, **want})


def _status_table(stats: list) -> list[dict]:
    """Shard stats for :func:`_print_status`; a shard that failed is reported and left out."""
    out = []
    for k, s in enumerate(stats):
        if isinstance(s, BaseException):
            print(f"shard {k}: unavailable ({getattr(s, 'message', repr(s))})", file=sys.stderr)
        else:
            out.append(s)
    return out


def _bus_cell(s: dict) -> str:
    """The shard's event bus as it last saw it: ok, or down and for how long."""
    bus = s.get("events", {}).get("bus")
    if not bus:
        return "?"
    if bus.get("ok"):
        return "ok"
    since = bus.get("since_ok_s")
    return "DOWN" if since is None else f"DOWN {since:.0f}s"


def _print_status(stats: list[dict], as_json: bool, out=None) -> None:
    if as_json:
        print(json.dumps(stats, indent=2), file=out or sys.stdout)
        return
    print(
        f"{'shard':>5} {'drivers':>9} {'available':>9} {'offered':>7} {'on_trip':>7} {'pending':>7} "
        f"{'halo':>7} {'updates/s':>10} {'handoff in/out':>15} {'dropped':>8} {'rides':>6} {'offers':>6} "
        f"{'ev_lost':>7} {'uptime':>8} {'bus':>10} {'node':>15}"
    )
    for s in stats:
        c = s["counters"]
        print(
            f"{s['shard_id']:>5} {s['drivers']:>9} {s['available']:>9} {s['offered']:>7} {s['on_trip']:>7} "
            f"{s['pending']:>7} {s['halo_drivers']:>7} {s['updates_per_s']:>10.0f} "
            f"{str(c.get('handoff_in', 0)) + '/' + str(c.get('handoff_out', 0)):>15} "
            f"{sum(s['dropped'].values()):>8} {s.get('rides', {}).get('open', 0):>6} "
            f"{s.get('rides', {}).get('offers_open', 0):>6} {s.get('events', {}).get('dropped', 0):>7} "
            f"{s['uptime_s']:>7.0f}s {_bus_cell(s):>10} {s.get('node_ip') or '?':>15}"
        )
    total = sum(s["updates_per_s"] for s in stats)
    print(f"total: {sum(s['drivers'] for s in stats)} drivers, {total:,.0f} updates/s")
    lost = sum(s.get("events", {}).get("dropped", 0) for s in stats)
    if lost:
        print(f"warning: the shards' event outboxes dropped {lost} records/events (ev_lost; is Redis up?)")


@command("up", "start local Ray, Redis, the region's shards and the edge; Ctrl-C stops")
@_region_arg
@arg("--address", default=None, help="join this Ray cluster instead of starting a local one")
@arg("--status-every", type=float, default=10.0, help="print shard status every N seconds (0: never)")
@_data_dir_arg
@arg("--port", type=int, default=None, help="the edge's port (default: DISPATCH_PORT or 8000)")
@arg("--no-edge", action="store_true", help="shards only (run edges yourself with `dispatch edge`)")
@arg(
    "--simulate", action="store_true", help="also run a simulated city against the stack (dispatch simulate)"
)
@arg("--sim-drivers", type=int, default=2000, help="with --simulate: simulated drivers")
@arg("--sim-requests-per-min", type=int, default=300, help="with --simulate: ride requests a minute")
def cmd_up(args: argparse.Namespace) -> int:
    import asyncio

    from actors import directory
    from actors.client import ShardClient
    from actors.settings import ShardSettings
    from api.settings import local_secrets, write_stack_record
    from dispatch.region import load_region, region_file_text

    # A stack starts afresh: what an earlier one recorded in the data dir is not joined.
    settings = _stack_settings(args, join=False, ray_address=args.address, port=args.port)
    _join_ray_env(args, settings.ray_auth())
    data_dir = Path(settings.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    region = load_region(settings.region_file)
    print(f"region {region.display_name} ({region.name}): {region.shard_count} shards")
    redis_url = settings.redis_url
    redis_server = None
    if not redis_url:
        from storage.redis_server import start_redis_server

        redis_server = start_redis_server(data_dir / "redis")
        redis_url = redis_server.url
        print(f"embedded redis at {redis_url}")
        redis_server.supervise()  # restarted on its port if it dies
    database_url, pg_server = _database(data_dir, settings.database_url)
    if pg_server is not None and hasattr(pg_server, "supervise"):
        pg_server.supervise()  # reaped and restarted (stale lock cleared) if it dies
    t0 = time.time()
    ctx = directory.connect(settings.ray_address, settings.namespace, dashboard=settings.ray_dashboard)
    print(f"ray ready in {time.time() - t0:.1f}s at {ctx.gcs_address}")
    # Other commands (edge, token, shards, simulate) given this data dir join this stack.
    auth = directory.record_auth(data_dir)
    local_secrets(data_dir)
    write_stack_record(
        data_dir,
        redis_url=redis_url,
        database_url=database_url,
        region=region.name,
        namespace=settings.namespace,
        ray_address=ctx.gcs_address,
        ray_auth_mode=auth.mode,
        ray_auth_token_path=auth.token_path,
    )
    shard_settings = ShardSettings.build(
        region_toml=region_file_text(settings.region_file), namespace=settings.namespace, redis_url=redis_url
    )
    directory.deploy_shards(shard_settings)
    print(f"{region.shard_count} shard actors up in namespace '{settings.namespace}'")
    edge = None if args.no_edge else _start_edge(settings, data_dir)
    sim = None
    if args.simulate:
        if edge is None:
            print("--simulate needs the edge (drop --no-edge)", file=sys.stderr)
        else:
            from api.simulate import run_simulation_against

            sim = run_simulation_against(
                f"http://127.0.0.1:{settings.port}",
                str(data_dir),
                args.sim_drivers,
                args.sim_requests_per_min,
                None,
            )
            print(f"simulating {args.sim_drivers} drivers and {args.sim_requests_per_min} requests/min")
    stop = {"now": False}

    def on_signal(signum, frame):
        stop["now"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    last = 0.0
    shards = ShardClient(region.name, region.shard_count, settings.namespace, timeout_s=10.0)
    print("running; Ctrl-C to stop")
    while not stop["now"]:
        time.sleep(0.2)
        if args.status_every and time.time() - last >= args.status_every:
            last = time.time()
            try:
                _print_status(_status_table(asyncio.run(shards.all_stats())), False)
            except Exception as exc:  # a restarting shard must not stop `up`
                print(f"status unavailable: {exc!r}", file=sys.stderr)
    if sim is not None:
        from api.simulate import stop_simulation

        print("stopping the simulation (it ends its rides first)")
        stop_simulation(sim)
    if edge is not None:
        print("stopping the edge (flushing buffered updates)")
        edge.send_signal(signal.SIGTERM)
        try:
            edge.wait(timeout=20)
        except Exception:
            edge.kill()
    print("stopping shards")
    directory.teardown_shards(region.name, region.shard_count, settings.namespace)
    directory.shutdown()
    if redis_server is not None:
        redis_server.stop()
    if pg_server is not None and getattr(pg_server, "process", None) is not None:
        print("stopping the embedded Postgres (its data stays in the data dir)")
        pg_server.stop()
    return 0


def _database(data_dir: Path, url: str | None) -> tuple[str, PostgresServer | None]:
    """``url`` (DATABASE_URL), or the embedded Postgres in ``data_dir`` (kept across runs); migrated."""
    import asyncio

    from storage.db import database_url, migrate

    url, server = database_url(data_dir, url)
    applied = asyncio.run(migrate(url))
    where = "embedded postgres" if server is not None else "postgres"
    print(f"{where} ready" + (f"; applied migrations {', '.join(applied)}" if applied else ""))
    return url, server


@command("migrate", "apply pending Postgres migrations (DATABASE_URL, or the local stack's embedded server)")
@_data_dir_arg
def cmd_migrate(args: argparse.Namespace) -> int:
    import asyncio

    from dispatch.errors import Unavailable
    from storage.db import database_url, migrate

    settings = _stack_settings(args)
    try:
        url, _server = database_url(Path(settings.data_dir).resolve(), settings.database_url)
        try:
            applied = asyncio.run(migrate(url))
        finally:
            if _server is not None and getattr(_server, "process", None) is not None:
                _server.stop()  # started for this command only
    except Unavailable as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    print("applied " + ", ".join(applied) if applied else "no pending migrations")
    return 0


def _start_edge(settings, data_dir: Path):
    """Run ``dispatch edge`` beside the stack; it joins the stack recorded in ``data_dir``."""
    import subprocess

    port = settings.port
    cmd = [sys.executable, "-m", "api.cli", "edge", "--port", str(port), "--data-dir", str(data_dir)]
    cmd += ["--host", settings.host]
    # Its own session: on Ctrl-C, `up` stops the simulation first (it needs the edge to end
    # its rides), then the edge with SIGTERM.
    proc = subprocess.Popen(cmd, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    if _wait_ready(url, proc, timeout_s=60):
        print(f"edge ready at {url} (API docs {url}/docs)")
        print(f"  a token for trying it: dispatch token --role rider --sub r-1 --data-dir {data_dir}")
    else:
        print(f"edge not ready at {url} yet; see its log above", file=sys.stderr)
    return proc


def _wait_ready(url: str, proc, timeout_s: float) -> bool:
    import urllib.request

    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
                if r.status == 200:
                    return True
        except Exception:
            pass
        time.sleep(0.5)
    return False


@command("shards", "operate the shards: `dispatch shards status|deploy|teardown`")
@_region_arg
@arg("action", choices=["status", "deploy", "teardown"], help="what to do")
@arg(
    "--address",
    default=None,
    help="Ray cluster address (default: RAY_ADDRESS, or the one `dispatch up` recorded in --data-dir)",
)
@arg("--namespace", default=None, help="the shards' Ray namespace (default: DISPATCH_NAMESPACE or dispatch)")
@_data_dir_arg
@arg("--json", action="store_true", help="print JSON")
def cmd_shards(args: argparse.Namespace) -> int:
    out = sys.stdout
    if args.json:
        # stdout carries the JSON alone: whatever Ray prints meanwhile (such as "(raylet) The
        # node ... has been marked dead" after a host died) goes to stderr.
        sys.stdout = sys.stderr
    try:
        return _shards(args, out)
    finally:
        sys.stdout = out


def _shards(args: argparse.Namespace, out: TextIO) -> int:
    import asyncio

    from actors import directory
    from actors.client import ShardClient
    from actors.settings import ShardSettings
    from dispatch.errors import DispatchError
    from dispatch.region import load_region, region_file_text

    settings = _stack_settings(args, ray_address=args.address, namespace=args.namespace)
    _join_ray_env(args, settings.ray_auth())
    if not settings.ray_address:
        print(
            "no Ray cluster given: pass --address (`auto` for the one on this host), set RAY_ADDRESS, "
            f"or --data-dir of a running `dispatch up` (none recorded in {settings.data_dir})",
            file=sys.stderr,
        )
        return 2
    region = load_region(settings.region_file)
    where = f"Ray cluster {settings.ray_address}, namespace '{settings.namespace}', region {region.name}"
    print(f"acting on {where}", file=sys.stderr if args.json else sys.stdout)
    shard_settings = None
    if args.action == "deploy":
        if not settings.redis_url:
            print(
                "no Redis URL: shards would publish no offers and keep no ride records. Set REDIS_URL "
                "(the Redis the edges use), or pass --data-dir of a running `dispatch up`",
                file=sys.stderr,
            )
            return 2
        try:
            shard_settings = ShardSettings.build(
                region_toml=region_file_text(settings.region_file),
                namespace=settings.namespace,
                redis_url=settings.redis_url,
            )
        except DispatchError as exc:
            print(exc.message, file=sys.stderr)
            return 2
    try:
        # No workers' logs on stdout: Ray forwards lines such as "(raylet) The node ... has
        # been marked dead" to a driver, which broke `status --json` after a host died.
        directory.connect(settings.ray_address, settings.namespace, log_to_driver=False)
    except Exception as exc:
        print(f"cannot join the Ray cluster at {settings.ray_address}: {exc}", file=sys.stderr)
        return 1
    if shard_settings is not None:
        # Detached actors: they stay up after this command exits, until `teardown`.
        try:
            directory.deploy_shards(shard_settings)
        except DispatchError as exc:
            print(f"deploy failed: {exc.message}", file=sys.stderr)
            return 1
        print(f"{region.shard_count} shards of {region.name} deployed (detached), publishing to Redis")
        return 0
    if args.action == "teardown":
        removed = directory.teardown_shards(region.name, region.shard_count, settings.namespace)
        print(f"removed {removed} shards of {region.name}")
        return 0
    client = ShardClient(region.name, region.shard_count, settings.namespace, timeout_s=30.0)
    stats = asyncio.run(client.all_stats())
    up = _status_table(stats)
    if not up:
        print(f"no shards of region {region.name} answer. Is `dispatch up` running?", file=sys.stderr)
        return 1
    _print_status(up, args.json, out)
    return 0 if len(up) == len(stats) else 1


@command("region", "show the region's shard map, or copy the region file to edit it")
@_region_arg
@arg("action", choices=["show", "copy"])
@arg("dest", nargs="?", help="for copy: where to write the file")
def cmd_region(args: argparse.Namespace) -> int:
    from dispatch.region import load_region, region_file_text
    from dispatch.shardmap import ShardMap

    region_file = _stack_settings(args, join=False).region_file
    if args.action == "copy":
        if not args.dest:
            print("usage: dispatch region copy DEST.toml", file=sys.stderr)
            return 2
        Path(args.dest).write_text(region_file_text(region_file))
        print(f"wrote {args.dest}; use it with --region {args.dest} or DISPATCH_REGION_FILE={args.dest}")
        return 0
    region = load_region(region_file)
    m = ShardMap(region)
    print(f"{region.display_name} ({region.name}) from {region.source}")
    print(
        f"{region.shard_count} shards over {len(m.cells)} H3 res-{region.shard_h3_resolution} cells; "
        f"halo {region.index.halo_m:.0f} m; raster {m.ny}x{m.nx} of {region.index.raster_m:.0f} m"
    )
    for k in range(region.shard_count):
        info = m.info(k)
        print(
            f"  shard {k}: {len(info.cells)} cells, {info.area_km2:.1f} km2, centre "
            f"({info.center[0]:.4f}, {info.center[1]:.4f}), neighbours {list(info.neighbours)}"
        )
    return 0


@command("simulate", "drive the running engine with a simulated city (drivers and riders)")
@_region_arg
@arg("--drivers", type=int, default=2000)
@arg("--requests-per-min", type=float, default=120.0)
@arg("--seconds", type=float, default=120.0, help="how long to run (0: until Ctrl-C)")
@arg("--report-interval-s", type=float, default=1.0, help="how often each driver reports")
@arg("--every-s", type=float, default=5.0, help="print the summary every N seconds")
@arg(
    "--url",
    action="append",
    default=None,
    help="an edge (repeat, or a comma list, for several: sockets move to another when one dies; "
    "default: http://127.0.0.1:$DISPATCH_PORT, port 8000)",
)
@arg(
    "--positions",
    choices=["gateway", "driver"],
    default="gateway",
    help="positions as gateway batch frames (default) or one frame per update on each driver's socket",
)
@arg("--data-dir", default=os.environ.get("DISPATCH_DATA_DIR", ".dispatch"))
@arg("--json", action="store_true", help="end with one JSON line of totals")
def cmd_simulate(args: argparse.Namespace) -> int:
    """A simulated city against the running stack, over the edges' sockets and REST
    through the client library (``api/simulate.py``). The first Ctrl-C (or SIGTERM) ends
    the run cleanly: open rides ended, drivers offline."""
    import asyncio

    from api.settings import local_secrets
    from api.simulate import simulate
    from dispatch.city import Summary

    seconds = args.seconds if args.seconds > 0 else None
    stored = local_secrets(args.data_dir, create=False)
    secret = os.environ.get("DISPATCH_JWT_SECRET") or stored.get("DISPATCH_JWT_SECRET")
    if not secret:
        where = Path(args.data_dir) / "secrets.json"
        print(
            f"no DISPATCH_JWT_SECRET and no {where}: start the stack with `dispatch up` "
            "(or pass its --data-dir, or set DISPATCH_JWT_SECRET)",
            file=sys.stderr,
        )
        return 1
    urls = args.url or [f"http://127.0.0.1:{os.environ.get('DISPATCH_PORT', '8000')}"]

    async def run(stop: asyncio.Event) -> Summary:
        return await simulate(
            urls,
            secret,
            args.drivers,
            args.requests_per_min,
            seconds,
            region_file=args.region,
            report_interval_s=args.report_interval_s,
            positions=args.positions,
            every_s=args.every_s,
            stop=stop,
            out=lambda line: print(line, flush=True),
        )

    async def go() -> Summary:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        main = asyncio.current_task()

        def on_signal() -> None:
            if stop.is_set() and main is not None:
                main.cancel()  # a second Ctrl-C: do not wait for the clean-up
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        return await run(stop)

    try:
        from api.client import run as run_loop

        summary = run_loop(go())
    except (ConnectionError, OSError) as exc:
        print(f"cannot reach the edge: {exc!r}. Is `dispatch up` running? (--url)", file=sys.stderr)
        return 1
    except asyncio.CancelledError:
        return 130
    print("final:", summary.line(), flush=True)
    if args.json:
        print(json.dumps(summary.as_dict()))
    return 0


@command("edge", "serve the edge (REST and WebSockets) with uvicorn; joins the running cluster")
@arg("--host", default=None, help="bind address (default: DISPATCH_HOST or 127.0.0.1; 0.0.0.0 on a cluster)")
@arg("--port", type=int, default=None, help="default: DISPATCH_PORT or 8000")
@_data_dir_arg
@arg("--log-level", default="warning")
def cmd_edge(args: argparse.Namespace) -> int:
    import logging

    from api.app import serve
    from api.settings import load_settings
    from dispatch.errors import ConfigError

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        stack = _stack_settings(args, host=args.host, port=args.port)
        settings = load_settings(stack=stack.stack(), data_dir=stack.data_dir)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    _join_ray_env(args, settings.ray_auth())
    where = f"Ray cluster {settings.ray_address or 'auto'}, namespace '{settings.namespace}'"
    print(f"edge {settings.edge_id} on http://{stack.host}:{stack.port} (docs at /docs), {where}", flush=True)
    serve(settings, stack.host, stack.port, args.log_level)
    return 0


@command("token", "mint a development token for the local stack (HS256 secret from the env or --data-dir)")
@arg("--role", required=True, choices=["rider", "driver", "gateway", "admin"])
@arg("--sub", required=True, help="rider id, driver id (drv-42), gateway or admin name")
@arg("--ttl-s", type=int, default=24 * 3600)
@_data_dir_arg
def cmd_token(args: argparse.Namespace) -> int:
    from api.auth import TokenAuthority
    from api.settings import load_settings
    from dispatch.errors import DispatchError

    try:
        stack = _stack_settings(args)
        token = TokenAuthority(load_settings(stack=stack.stack())).issue(args.sub, args.role, args.ttl_s)
    except DispatchError as exc:
        print(exc.message, file=sys.stderr)
        return 2
    print(token)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dispatch", description="Actor-based real-time dispatch engine")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_fn, add_args, help_text) in _COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text))
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    fn = _COMMANDS[args.command][0]
    try:
        return fn(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
