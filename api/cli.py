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


def _bus_cell(s: dict) -> str:
    """The shard's event bus as it last saw it: ok, or down and for how long."""
    bus = s.get("events", {}).get("bus")
    if not bus:
        return "?"
    if bus.get("ok"):
        return "ok"
    since = bus.get("since_ok_s")
    return "DOWN" if since is None else f"DOWN {since:.0f}s"


def _print_status(stats: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps(stats, indent=2))
        return
    print(
        f"{'shard':>5} {'drivers':>9} {'available':>9} {'offered':>7} {'on_trip':>7} {'pending':>7} "
        f"{'halo':>7} {'updates/s':>10} {'handoff in/out':>15} {'dropped':>8} {'rides':>6} {'offers':>6} "
        f"{'uptime':>8} {'bus':>10}"
    )
    for s in stats:
        c = s["counters"]
        print(
            f"{s['shard_id']:>5} {s['drivers']:>9} {s['available']:>9} {s['offered']:>7} {s['on_trip']:>7} "
            f"{s['pending']:>7} {s['halo_drivers']:>7} {s['updates_per_s']:>10.0f} "
            f"{str(c.get('handoff_in', 0)) + '/' + str(c.get('handoff_out', 0)):>15} "
            f"{sum(s['dropped'].values()):>8} {s.get('rides', {}).get('open', 0):>6} "
            f"{s.get('rides', {}).get('offers_open', 0):>6} {s['uptime_s']:>7.0f}s {_bus_cell(s):>10}"
        )
    total = sum(s["updates_per_s"] for s in stats)
    print(f"total: {sum(s['drivers'] for s in stats)} drivers, {total:,.0f} updates/s")


@command("up", "start local Ray, Redis, the region's shards and the edge; Ctrl-C stops")
@_region_arg
@arg("--address", default=None, help="join this Ray cluster instead of starting a local one")
@arg("--status-every", type=float, default=10.0, help="print shard status every N seconds (0: never)")
@arg("--data-dir", default=os.environ.get("DISPATCH_DATA_DIR", ".dispatch"), help="local stack data")
@arg("--port", type=int, default=int(os.environ.get("DISPATCH_PORT", "8000")), help="the edge's port")
@arg("--no-edge", action="store_true", help="shards only (run edges yourself with `dispatch edge`)")
@arg(
    "--simulate", action="store_true", help="also run a simulated city against the stack (dispatch simulate)"
)
@arg("--sim-drivers", type=int, default=2000, help="with --simulate: simulated drivers")
@arg("--sim-requests-per-min", type=int, default=300, help="with --simulate: ride requests a minute")
def cmd_up(args: argparse.Namespace) -> int:
    from actors import directory
    from dispatch.region import load_region, region_file_text

    region = load_region(args.region)
    print(f"region {region.display_name} ({region.name}): {region.shard_count} shards")
    redis_url = os.environ.get("REDIS_URL")
    redis_server = None
    if not redis_url:
        from storage.redis_server import start_redis_server

        redis_server = start_redis_server(Path(args.data_dir).resolve() / "redis")
        redis_url = redis_server.url
        print(f"embedded redis at {redis_url}")
        redis_server.supervise()  # restarted on its port if it dies
    database_url, pg_server = _database(Path(args.data_dir).resolve())
    if pg_server is not None and hasattr(pg_server, "supervise"):
        pg_server.supervise()  # reaped and restarted (stale lock cleared) if it dies
    t0 = time.time()
    ctx = directory.connect(args.address)
    print(f"ray ready in {time.time() - t0:.1f}s")
    # Other commands (edge, token, simulate) find the running stack here.
    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    stack = {
        "redis_url": redis_url,
        "database_url": database_url,
        "region": region.name,
        "ray_address": ctx.gcs_address,
    }
    (data_dir / "stack.json").write_text(json.dumps(stack))
    directory.deploy_shards(
        region.name, region.shard_count, region_file_text(args.region), redis_url=redis_url
    )
    print(f"{region.shard_count} shard actors up in namespace '{directory.DEFAULT_NAMESPACE}'")
    edge = None if args.no_edge else _start_edge(args, data_dir)
    sim = None
    if args.simulate:
        if edge is None:
            print("--simulate needs the edge (drop --no-edge)", file=sys.stderr)
        else:
            from loadtests.edge_client import run_simulation_against

            sim = run_simulation_against(
                f"http://127.0.0.1:{args.port}",
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
    import ray

    last = 0.0
    handles = [directory.lookup_shard(region.name, i) for i in range(region.shard_count)]
    print("running; Ctrl-C to stop")
    while not stop["now"]:
        time.sleep(0.2)
        if args.status_every and time.time() - last >= args.status_every:
            last = time.time()
            try:
                _print_status(ray.get([h.stats.remote() for h in handles], timeout=10), False)
            except Exception as exc:  # a restarting shard must not stop `up`
                print(f"status unavailable: {exc!r}", file=sys.stderr)
    if sim is not None:
        from loadtests.edge_client import stop_simulation

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
    directory.teardown_shards(region.name, region.shard_count)
    directory.shutdown()
    if redis_server is not None:
        redis_server.stop()
    if pg_server is not None and getattr(pg_server, "process", None) is not None:
        print("stopping the embedded Postgres (its data stays in the data dir)")
        pg_server.stop()
    return 0


def _database(data_dir: Path) -> tuple[str, object | None]:
    """DATABASE_URL, or the embedded Postgres in ``data_dir`` (kept across runs); migrated."""
    import asyncio

    from storage.db import database_url, migrate

    url, server = database_url(data_dir)
    applied = asyncio.run(migrate(url))
    where = "embedded postgres" if server is not None else "postgres"
    print(f"{where} ready" + (f"; applied migrations {', '.join(applied)}" if applied else ""))
    return url, server


@command("migrate", "apply pending Postgres migrations (DATABASE_URL, or the local stack's embedded server)")
@arg("--data-dir", default=os.environ.get("DISPATCH_DATA_DIR", ".dispatch"), help="local stack data")
def cmd_migrate(args: argparse.Namespace) -> int:
    import asyncio

    from dispatch.errors import Unavailable
    from storage.db import database_url, migrate

    os.environ.update({k: v for k, v in _stack_env(args.data_dir).items() if k == "DATABASE_URL"})
    try:
        url, _server = database_url(Path(args.data_dir).resolve())
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


def _start_edge(args: argparse.Namespace, data_dir: Path):
    """Run ``dispatch edge`` beside the stack, with the stack's secrets in its environment."""
    import subprocess

    from api.settings import local_secrets

    env = dict(os.environ)
    for k, v in local_secrets(data_dir).items():
        env.setdefault(k, v)
    cmd = [sys.executable, "-m", "api.cli", "edge", "--port", str(args.port), "--data-dir", str(data_dir)]
    # Its own session: on Ctrl-C, `up` stops the simulation first (it needs the edge to end
    # its rides), then the edge with SIGTERM.
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{args.port}"
    if _wait_ready(url, proc, timeout_s=60):
        print(f"edge ready at {url} (API docs {url}/docs)")
        print(f"  a token for trying it: dispatch token --role rider --sub r-1 --data-dir {args.data_dir}")
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
@arg("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or the local one)")
@arg("--json", action="store_true", help="print JSON")
def cmd_shards(args: argparse.Namespace) -> int:
    import ray

    from actors import directory
    from dispatch.region import load_region, region_file_text

    region = load_region(args.region)
    directory.connect(args.address or os.environ.get("RAY_ADDRESS") or "auto")
    if args.action == "deploy":
        # Detached actors: they stay up after this command exits, until `teardown`.
        directory.deploy_shards(region.name, region.shard_count, region_file_text(args.region))
        print(f"{region.shard_count} shards of {region.name} deployed (detached)")
        return 0
    if args.action == "teardown":
        print(f"removed {directory.teardown_shards(region.name, region.shard_count)} shards of {region.name}")
        return 0
    try:
        handles = [directory.lookup_shard(region.name, i) for i in range(region.shard_count)]
    except ValueError as exc:
        print(f"shards of region {region.name} not found: {exc}. Is `dispatch up` running?", file=sys.stderr)
        return 1
    _print_status(ray.get([h.stats.remote() for h in handles], timeout=30), args.json)
    return 0


@command("region", "show the region's shard map, or copy the region file to edit it")
@_region_arg
@arg("action", choices=["show", "copy"])
@arg("dest", nargs="?", help="for copy: where to write the file")
def cmd_region(args: argparse.Namespace) -> int:
    from dispatch.region import load_region, region_file_text
    from dispatch.shardmap import ShardMap

    if args.action == "copy":
        if not args.dest:
            print("usage: dispatch region copy DEST.toml", file=sys.stderr)
            return 2
        Path(args.dest).write_text(region_file_text(args.region))
        print(f"wrote {args.dest}; use it with --region {args.dest} or DISPATCH_REGION_FILE={args.dest}")
        return 0
    region = load_region(args.region)
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
@arg("--url", default=None, help="the edge (default: http://127.0.0.1:$DISPATCH_PORT, port 8000)")
@arg(
    "--positions",
    choices=["gateway", "driver"],
    default="gateway",
    help="positions as gateway batch frames (default) or one frame per update on each driver's socket",
)
@arg("--direct", action="store_true", help="bypass the edge: straight into the shard actors and Redis")
@arg("--address", default=None, help="--direct: Ray cluster address (default: RAY_ADDRESS or the local one)")
@arg("--data-dir", default=os.environ.get("DISPATCH_DATA_DIR", ".dispatch"))
@arg("--json", action="store_true", help="end with one JSON line of totals")
def cmd_simulate(args: argparse.Namespace) -> int:
    """A simulated city against the running stack: over the edge's sockets and REST
    (``loadtests/edge_client.py``), or with ``--direct`` straight into the shards. The
    first Ctrl-C (or SIGTERM) ends the run cleanly: open rides ended, drivers offline."""
    import asyncio

    from dispatch.region import load_region
    from dispatch.shardmap import ShardMap
    from loadtests.city import City, Summary, run_city

    seconds = args.seconds if args.seconds > 0 else None
    if args.direct:
        from actors import directory
        from loadtests.city import DirectTransport

        region = load_region(args.region)
        stack = Path(args.data_dir) / "stack.json"
        redis_url = os.environ.get("REDIS_URL") or (
            json.loads(stack.read_text())["redis_url"] if stack.exists() else None
        )
        if not redis_url:
            print("no REDIS_URL and no running `dispatch up` found in --data-dir", file=sys.stderr)
            return 1
        directory.connect(args.address or os.environ.get("RAY_ADDRESS") or "auto")
        smap = ShardMap(region)
        city = City(
            region,
            smap,
            args.drivers,
            args.requests_per_min,
            report_interval_s=args.report_interval_s,
            seed=int(time.time()) % 1000,
            first_driver_id=9_000_000,
        )

        async def run(stop: asyncio.Event) -> Summary:
            transport = DirectTransport(
                smap, directory.ShardDirectory(region.name, region.shard_count), redis_url
            )
            await transport.start()
            try:
                return await run_city(
                    city,
                    transport,
                    seconds,
                    every_s=args.every_s,
                    stop=stop,
                    on_summary=lambda s: print(s.line(), flush=True),
                )
            finally:
                await transport.close()
    else:
        from api.settings import local_secrets
        from loadtests.edge_client import simulate

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
        url = args.url or f"http://127.0.0.1:{os.environ.get('DISPATCH_PORT', '8000')}"

        async def run(stop: asyncio.Event) -> Summary:
            return await simulate(
                url,
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
        summary = asyncio.run(go())
    except (ConnectionError, OSError) as exc:
        print(f"cannot reach the edge: {exc!r}. Is `dispatch up` running? (--url)", file=sys.stderr)
        return 1
    except asyncio.CancelledError:
        return 130
    print("final:", summary.line(), flush=True)
    if args.json:
        print(json.dumps(summary.as_dict()))
    return 0


def _stack_env(data_dir: str) -> dict[str, str]:
    """What a local stack (``dispatch up``) recorded for the tools that join it: its
    secrets and URLs, for whatever the environment does not already set."""
    from api.settings import local_secrets

    out = dict(local_secrets(data_dir, create=False))
    stack = Path(data_dir) / "stack.json"
    if stack.exists():
        info = json.loads(stack.read_text())
        for key, name in (
            ("redis_url", "REDIS_URL"),
            ("database_url", "DATABASE_URL"),
            ("ray_address", "RAY_ADDRESS"),
        ):
            if info.get(key):
                out[name] = info[key]
    return {k: v for k, v in out.items() if not os.environ.get(k)}


@command("edge", "serve the edge (REST and WebSockets) with uvicorn; joins the running cluster")
@arg(
    "--host", default=os.environ.get("DISPATCH_HOST", "127.0.0.1"), help="bind address (0.0.0.0 on a cluster)"
)
@arg("--port", type=int, default=int(os.environ.get("DISPATCH_PORT", "8000")))
@arg("--data-dir", default=os.environ.get("DISPATCH_DATA_DIR", ".dispatch"), help="a local stack to join")
@arg("--log-level", default="warning")
def cmd_edge(args: argparse.Namespace) -> int:
    import logging

    from api.app import serve
    from api.settings import load_settings
    from dispatch.errors import ConfigError

    os.environ.update(_stack_env(args.data_dir))
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        settings = load_settings(data_dir=args.data_dir)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(f"edge {settings.edge_id} on http://{args.host}:{args.port} (docs at /docs)", flush=True)
    serve(settings, args.host, args.port, args.log_level)
    return 0


@command("token", "mint a development token for the local stack (HS256 secret from the env or --data-dir)")
@arg("--role", required=True, choices=["rider", "driver", "gateway", "admin"])
@arg("--sub", required=True, help="rider id, driver id (drv-42), gateway or admin name")
@arg("--ttl-s", type=int, default=24 * 3600)
@arg("--data-dir", default=os.environ.get("DISPATCH_DATA_DIR", ".dispatch"))
def cmd_token(args: argparse.Namespace) -> int:
    from api.auth import TokenAuthority
    from api.settings import load_settings
    from dispatch.errors import DispatchError

    os.environ.update(_stack_env(args.data_dir))
    try:
        token = TokenAuthority(load_settings()).issue(args.sub, args.role, args.ttl_s)
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
    fn = _COMMANDS[args.command][0]
    try:
        return fn(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
