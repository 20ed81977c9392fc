"""A multi-host cluster on this one machine: Linux network namespaces as hosts on a bridge.

For tests, failure drills and benchmarks that need real hosts: every host is a network
namespace with its own address, its own loopback and port space, and a veth pair into a
bridge in the root namespace. Traffic flows only between these namespaces and the root
namespace (the bridge's address); nothing is routed further. Needs root and iproute2.

Layout (default prefix ``dsp-``, subnet ``10.213.0.0/24``)::

    root namespace   dsp-br0   10.213.0.1   the bridge; tests and tools reach every host
    dsp-head         head      10.213.0.2   Ray head (GCS on :6379, Ray Client :10001), 0 CPUs
    dsp-data         data      10.213.0.3   Postgres :5432, Redis (event bus) :6379,
                                            Redis (Ray GCS storage) :6380
    dsp-shard<i>     shard<i>  10.213.0.1<i>  Ray worker, --num-cpus N, resource shard_host=100
    dsp-edge<i>      edge<i>   10.213.0.2<i>  Ray worker, 0 CPUs, resource edge_host=1;
                                            `dispatch edge --host <ip>` when started

Every Ray process (nodes, drivers, edges) runs with token authentication on and the
cluster's token file: ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH``; :meth:`Cluster.env`
is the whole environment a joining process needs. The head keeps its GCS tables in the
data host's second Redis (GCS fault tolerance), so a killed head can be started again
with :meth:`Cluster.start_host` and the workers rejoin it.

Use as a context manager (everything is torn down on exit, on an exception, on SIGINT or
SIGTERM and at interpreter exit), or from the shell::

    python -m loadtests.cluster up [--shard-hosts 3] [--edge-hosts 2]
    python -m loadtests.cluster env      # export lines for a shell that joins it
    python -m loadtests.cluster down     # also removes what a crashed run left behind

Faults: :meth:`Cluster.kill_host` (SIGKILL every process in the namespace),
:meth:`Cluster.cut` / :meth:`Cluster.heal` (the host's link down / up),
:meth:`Cluster.kill_pid`, :meth:`Cluster.pause` / :meth:`Cluster.resume` (SIGSTOP / SIGCONT).

Never run ``ray stop`` on this machine while a cluster is up: it kills every Ray process
it can see, in every namespace.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_PREFIX = "dsp-"
DEFAULT_SUBNET = "10.213.0.0/24"
DEFAULT_STATE_DIR = Path("/tmp/dsp-cluster")

RAY_PORT = 6379
RAY_CLIENT_PORT = 10001
POSTGRES_PORT = 5432
REDIS_PORT = 6379
GCS_REDIS_PORT = 6380
EDGE_PORT = 8000
# Shard hosts carry this custom resource, SHARD_HOST_SLOTS of it; each shard asks for one
# slot (ShardSettings.host_resource), so shards land only there, up to that many a host.
SHARD_HOST_RESOURCE = "shard_host"
SHARD_HOST_SLOTS = 100

# The GCS marks a node dead after `failure_threshold` failed health checks, one every
# `period_ms`, each given `timeout_ms`: Ray's defaults (3 s x 5) take ~15 s to notice a
# killed host. A killed host refuses at once, so 0.5 s x 3 notices it in ~1.5 s (1 s x 3
# took ~2.5 s; a shard-host drill then recovered in 4.1-5.2 s, now 3.6-4.0 s); a host
# that hangs must still miss three 1 s timeouts in a row.
HEAD_HEALTH_ENV = {
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


class ClusterError(RuntimeError):
    """The cluster could not be built or a host did not come up; the message says which."""


@dataclass(frozen=True, slots=True)
class Host:
    """One namespace: ``name`` is the short host name (``shard1``), ``role`` one of
    head, shard, data, edge; ``index`` numbers its veth and fixes its address."""

    name: str
    role: str
    index: int
    ip: str
    num_cpus: float = 0.0

    def netns(self, prefix: str) -> str:
        return f"{prefix}{self.name}"

    def veth(self, prefix: str) -> str:
        # The root end of the host's veth pair (interface names are at most 15 characters).
        return f"{prefix}v{self.index}"


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise ClusterError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def netns_names(prefix: str) -> list[str]:
    out = _sh("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.split() and line.startswith(prefix)]


def link_names(prefix: str) -> list[str]:
    out = _sh("ip", "-o", "link", "show", check=False).stdout
    names = []
    for line in out.splitlines():
        parts = line.split(":", 2)
        if len(parts) > 1:
            name = parts[1].strip().split("@")[0]
            if name.startswith(prefix):
                names.append(name)
    return names


def netns_pids(netns: str) -> list[int]:
    out = _sh("ip", "netns", "pids", netns, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _kill_namespace_processes(netns: str, timeout_s: float = 10.0, reap=None) -> None:
    """SIGKILL every process in ``netns`` until none is left (a dying Ray node may fork).
    ``reap`` waits for our own children among them, so they do not linger as zombies."""
    deadline = time.monotonic() + timeout_s
    while True:
        if reap is not None:
            reap()
        pids = netns_pids(netns)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise ClusterError(f"processes in {netns} survive SIGKILL: {pids}")
        time.sleep(0.05)


def remove_leftovers(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Kill every process in namespaces named ``prefix*``, delete them and every link named
    ``prefix*`` (a crashed run's veths and bridge). Returns what it removed."""
    removed = []
    for ns in netns_names(prefix):
        _kill_namespace_processes(ns)
        _sh("ip", "netns", "delete", ns, check=False)
        removed.append(ns)
    # A deleted namespace's veth ends go away asynchronously; delete what is still there
    # and wait until the kernel shows none.
    deadline = time.monotonic() + 10.0
    while links := link_names(prefix):
        for link in links:
            if _sh("ip", "link", "delete", link, check=False).returncode == 0:
                removed.append(link)
        if time.monotonic() > deadline:
            raise ClusterError(f"links {links} survive deletion")
        time.sleep(0.05)
    return removed


def _routes() -> list[ipaddress.IPv4Network]:
    nets = []
    for line in _sh("ip", "-4", "route", "show", check=False).stdout.splitlines():
        dest = line.split()[0] if line.split() else ""
        if dest and dest != "default":
            with contextlib.suppress(ValueError):
                nets.append(ipaddress.ip_network(dest, strict=False))
    return nets


def free_subnet(preferred: str = DEFAULT_SUBNET) -> str:
    """``preferred`` if no route overlaps it, else the next 10.213.x.0/24 that is free."""
    taken = _routes()
    candidates = [ipaddress.ip_network(preferred)] + [
        ipaddress.ip_network(f"10.213.{i}.0/24") for i in range(1, 255)
    ]
    for net in candidates:
        if not any(net.overlaps(t) for t in taken):
            return str(net)
    raise ClusterError("no free /24 under 10.213.0.0/16 for the cluster's bridge")


def layout(subnet: str, shard_hosts: int, edge_hosts: int, shard_cpus: float) -> list[Host]:
    if not 1 <= shard_hosts <= 9 or not 0 <= edge_hosts <= 9:
        raise ClusterError("1-9 shard hosts and 0-9 edge hosts")
    net = ipaddress.ip_network(subnet)
    base = net.network_address

    def ip(n: int) -> str:
        return str(base + n)

    # In start order: the head keeps its GCS tables in the data host's Redis.
    hosts = [Host("data", "data", 3, ip(3)), Host("head", "head", 2, ip(2))]
    hosts += [Host(f"shard{i}", "shard", 10 + i, ip(10 + i), shard_cpus) for i in range(1, shard_hosts + 1)]
    hosts += [Host(f"edge{i}", "edge", 20 + i, ip(20 + i)) for i in range(1, edge_hosts + 1)]
    return hosts


def _wait_tcp(
    ip: str,
    port: int,
    timeout_s: float,
    probe: bytes | None = None,
    expect: bytes = b"",
    proc: subprocess.Popen | None = None,
) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and (proc is None or proc.poll() is None):
        try:
            with socket.create_connection((ip, port), timeout=1.0) as s:
                if probe is None:
                    return True
                s.sendall(probe)
                if s.recv(64).startswith(expect):
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


@dataclass
class ClusterState:
    """What ``up`` records in ``<state_dir>/cluster.json`` for ``env``, ``down`` and drills."""

    prefix: str
    subnet: str
    bridge_ip: str
    state_dir: str
    hosts: list[dict]
    env: dict[str, str]
    pids: dict[str, list[int]] = field(default_factory=dict)


class Cluster:
    """The namespaces, their links and their processes. Build with :meth:`up` (or ``with``).

    ``shard_cpus`` is each shard host's ``--num-cpus`` (logical: Ray schedules by it, the
    kernel does not enforce it). ``data_host=False`` leaves out Postgres and Redis (and
    needs ``gcs_ft=False``). ``gcs_ft`` keeps the head's GCS tables in the data host's
    Redis on :data:`GCS_REDIS_PORT`. ``dashboard`` starts Ray's dashboard on the head
    (off by default: it costs a core-second per node start on a small machine).
    """

    def __init__(
        self,
        *,
        shard_hosts: int = 3,
        edge_hosts: int = 2,
        shard_cpus: float = 2,
        prefix: str = DEFAULT_PREFIX,
        subnet: str | None = None,
        state_dir: Path | str | None = None,
        data_host: bool = True,
        gcs_ft: bool = True,
        dashboard: bool = False,
        object_store_bytes: int = 200 * 1024 * 1024,
        keep_on_exit: bool = False,
    ) -> None:
        self.prefix = prefix
        self.subnet = subnet or free_subnet()
        self.bridge = f"{prefix}br0"
        net = ipaddress.ip_network(self.subnet)
        self.bridge_ip = str(net.network_address + 1)
        self.prefixlen = net.prefixlen
        hosts = layout(self.subnet, shard_hosts, edge_hosts, shard_cpus)
        self.hosts = {h.name: h for h in hosts if data_host or h.role != "data"}
        if gcs_ft and not data_host:
            raise ClusterError("GCS fault tolerance keeps the GCS tables in the data host's Redis")
        self.state_dir = Path(state_dir or DEFAULT_STATE_DIR).resolve()
        self.gcs_ft = gcs_ft
        self.dashboard = dashboard
        self.object_store_bytes = object_store_bytes
        self.keep_on_exit = keep_on_exit
        self.token_path = self.state_dir / "ray_auth_token"
        import secrets

        self.jwt_secret = secrets.token_hex(32)
        self.logs = self.state_dir / "logs"
        # Processes we started ourselves (Postgres, Redis, edges), per host; Ray's own
        # daemons are found through the namespace.
        self.procs: dict[str, list[subprocess.Popen]] = {}
        self._up = False
        self._saved_handlers: dict[int, object] = {}

    # ---- addresses and environment -------------------------------------------------

    def ip(self, host: str) -> str:
        return self.hosts[host].ip

    def netns(self, host: str) -> str:
        return self.hosts[host].netns(self.prefix)

    @property
    def head_address(self) -> str:
        return f"{self.ip('head')}:{RAY_PORT}"

    @property
    def database_url(self) -> str:
        return f"postgresql://postgres@{self.ip('data')}:{POSTGRES_PORT}/dispatch"

    @property
    def redis_url(self) -> str:
        return f"redis://{self.ip('data')}:{REDIS_PORT}/0"

    @property
    def gcs_redis_address(self) -> str:
        return f"{self.ip('data')}:{GCS_REDIS_PORT}"

    def ray_auth_env(self) -> dict[str, str]:
        """What every Ray process of this cluster needs: token mode on, and the token file.

        Ray 2.60 turns token authentication on for a head started by ``ray.init()``, and for
        ``ray start --head`` whenever a token is found (``~/.ray/auth_token`` included); a
        joining node or driver with ``RAY_AUTH_MODE`` unset does *not* turn it on from an
        explicit address and fails with InvalidAuthToken. So every process gets both
        variables, and the token lives with the cluster, not in ``~/.ray``.
        """
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_path)}

    def env(self) -> dict[str, str]:
        """The environment of a process joining the cluster from one of its hosts."""
        env = {**self.ray_auth_env(), "RAY_ADDRESS": self.head_address, "RAY_USAGE_STATS_ENABLED": "0"}
        if "data" in self.hosts:
            env.update(DATABASE_URL=self.database_url, REDIS_URL=self.redis_url)
        # What `dispatch shards deploy` needs to place shards on the shard hosts only, and
        # the edges' token secret (the operator's, written with the cluster's state).
        env["DISPATCH_SHARD_HOST_RESOURCE"] = SHARD_HOST_RESOURCE
        env["DISPATCH_JWT_SECRET"] = self.jwt_secret
        return env

    # ---- running things in a host ----------------------------------------------------

    def _argv(self, host: str, argv: list[str], user: str | None = None) -> list[str]:
        wrap = ["ip", "netns", "exec", self.netns(host)]
        if user is not None:
            # Drop privileges inside the namespace (entering it needs root).
            import pwd

            pw = pwd.getpwnam(user)
            wrap += ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups", "--"]
        return wrap + argv

    def _env(self, extra: dict[str, str] | None) -> dict[str, str]:
        env = dict(os.environ)
        # A variable from the caller's own Ray must not leak into the cluster's processes.
        for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_REDIS_ADDRESS"):
            env.pop(k, None)
        env.update(self.env())
        env.update(extra or {})
        return env

    def spawn(
        self,
        host: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        log_name: str | None = None,
        user: str | None = None,
    ) -> subprocess.Popen:
        """Start ``argv`` in ``host`` with the cluster's environment (plus ``env``); its
        output goes to ``logs/<host>-<log_name>.log``. The process is kept for teardown."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{host}-{log_name or Path(argv[0]).name}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                self._argv(host, argv, user),
                env=self._env(env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.setdefault(host, []).append(proc)
        return proc

    def run(
        self, host: str, argv: list[str], *, env: dict[str, str] | None = None, timeout_s: float = 120.0
    ) -> subprocess.CompletedProcess:
        """Run ``argv`` in ``host`` to completion; returns it (stdout, stderr as text)."""
        return subprocess.run(
            self._argv(host, argv),
            env=self._env(env),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            stdin=subprocess.DEVNULL,
        )

    def python(self, host: str, code: str, *, timeout_s: float = 120.0) -> subprocess.CompletedProcess:
        """Run a Python snippet in ``host`` with this interpreter (a Ray driver, a client)."""
        return self.run(host, [sys.executable, "-c", code], timeout_s=timeout_s)

    # ---- building ---------------------------------------------------------------------

    def up(self, timeout_s: float = 180.0) -> Cluster:
        """Build the network, then data, head, shard and edge hosts. On any failure the
        partial cluster is torn down and ClusterError raised (with the failing log)."""
        if os.geteuid() != 0:
            raise ClusterError("network namespaces need root")
        if shutil.which("ip") is None:
            raise ClusterError("iproute2 (`ip`) is not installed")
        leftovers = netns_names(self.prefix) + link_names(self.prefix)
        if leftovers:
            raise ClusterError(
                f"{', '.join(leftovers)} already exist: another cluster with prefix {self.prefix!r} "
                f"is up (or a crashed one left them: python -m loadtests.cluster down --prefix {self.prefix})"
            )
        _ACTIVE.add(self)
        self._up = True
        try:
            if self.state_dir.exists():
                shutil.rmtree(self.state_dir)
            self.logs.mkdir(parents=True)
            self._write_token()
            self._network()
            for host in self.hosts.values():
                self.start_host(host.name, timeout_s=timeout_s)
            self.save_state()
        except BaseException:
            self.down()
            raise
        return self

    def _write_token(self) -> None:
        import secrets

        self.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))

    def _network(self) -> None:
        _sh("ip", "link", "add", self.bridge, "type", "bridge")
        _sh("ip", "addr", "add", f"{self.bridge_ip}/{self.prefixlen}", "dev", self.bridge)
        _sh("ip", "link", "set", self.bridge, "up")
        for host in self.hosts.values():
            ns, veth = host.netns(self.prefix), host.veth(self.prefix)
            _sh("ip", "netns", "add", ns)
            _sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _sh("ip", "link", "set", veth, "master", self.bridge)
            _sh("ip", "link", "set", veth, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
            _sh("ip", "-n", ns, "addr", "add", f"{host.ip}/{self.prefixlen}", "dev", "eth0")
            _sh("ip", "-n", ns, "link", "set", "eth0", "up")
            _sh("ip", "-n", ns, "route", "add", "default", "via", self.bridge_ip)

    def start_host(self, name: str, timeout_s: float = 180.0) -> None:
        """Start the host's services (again, after :meth:`kill_host`)."""
        role = self.hosts[name].role
        if role == "data":
            self._start_data(timeout_s)
        elif role == "head":
            self._start_ray(name, head=True, timeout_s=timeout_s)
        elif role == "shard":
            self._start_ray(name, resources={SHARD_HOST_RESOURCE: SHARD_HOST_SLOTS}, timeout_s=timeout_s)
        elif role == "edge":
            self._start_ray(name, resources={"edge_host": 1}, timeout_s=timeout_s)

    def _ray_start_argv(self, name: str, head: bool, resources: dict[str, float]) -> list[str]:
        host = self.hosts[name]
        ray = str(Path(sys.executable).parent / "ray")
        argv = [
            ray,
            "start",
            f"--node-ip-address={host.ip}",
            f"--num-cpus={host.num_cpus:g}",
            # Short per-node temp dirs: Ray's Unix sockets live there (paths < 108 bytes),
            # and nodes must not share /tmp/ray's session_latest.
            f"--temp-dir={self.state_dir / ('ray-' + name)}",
            f"--object-store-memory={self.object_store_bytes}",
            "--disable-usage-stats",
        ]
        if head:
            argv += [
                "--head",
                f"--port={RAY_PORT}",
                f"--ray-client-server-port={RAY_CLIENT_PORT}",
                f"--include-dashboard={'true' if self.dashboard else 'false'}",
                "--dashboard-host=0.0.0.0",
                "--resources",
                json.dumps({"head": 1, **resources}),
            ]
        else:
            argv += [f"--address={self.head_address}", "--resources", json.dumps(resources)]
        return argv

    def _start_ray(
        self, name: str, *, head: bool = False, resources: dict[str, float] | None = None, timeout_s: float
    ) -> None:
        env = {}
        if head:
            env.update(HEAD_HEALTH_ENV)
            if self.gcs_ft:
                env["RAY_REDIS_ADDRESS"] = self.gcs_redis_address
                env["RAY_external_storage_namespace"] = f"{self.prefix}cluster"
            # `ray start --head` refuses to start when the address its temp dir last
            # recorded is in use by a local process's --gcs-address; on one machine the
            # workers waiting for a killed head are such processes. Forget the address.
            (self.state_dir / f"ray-{name}" / "ray_current_cluster").unlink(missing_ok=True)
        argv = self._ray_start_argv(name, head, resources or {})
        proc = self.run(name, argv, env=env, timeout_s=timeout_s)
        (self.logs / f"{name}-ray-start.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise ClusterError(f"ray start on {name} failed: {(proc.stdout + proc.stderr)[-3000:]}")
        if head and not _wait_tcp(self.ip(name), RAY_PORT, timeout_s):
            raise ClusterError(f"Ray head on {self.ip(name)}:{RAY_PORT} does not accept connections")

    def _start_data(self, timeout_s: float) -> None:
        ip = self.ip("data")
        redis = _redis_binary()
        for port, log_name in ((REDIS_PORT, "redis"), (GCS_REDIS_PORT, "redis-gcs")):
            if log_name == "redis-gcs" and not self.gcs_ft:
                continue
            d = self.state_dir / log_name
            d.mkdir(parents=True, exist_ok=True)
            proc = self.spawn(
                "data",
                [
                    str(redis),
                    "--bind",
                    ip,
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--protected-mode",
                    "no",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--daemonize",
                    "no",
                    "--dir",
                    str(d),
                ],
                log_name=log_name,
            )
            if not _wait_tcp(ip, port, timeout_s, b"PING\r\n", b"+PONG", proc):
                raise ClusterError(f"redis-server on {ip}:{port} did not answer: see {self.logs}")
        self._start_postgres(timeout_s)

    def _start_postgres(self, timeout_s: float) -> None:
        from storage.postgres_server import SYSTEM_USER, _give_to, _run_as, bin_dir

        ip = self.ip("data")
        data_dir = self.state_dir / "postgres"
        pgdata = data_dir / "pgdata"
        user = _run_as()
        if not (pgdata / "PG_VERSION").exists():
            pgdata.mkdir(parents=True, exist_ok=True)
            _give_to(data_dir, user)
            initdb = [
                str(bin_dir() / "initdb"),
                "-D",
                str(pgdata),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            ]
            proc = self.run("data", initdb if user is None else ["setpriv", *_setpriv(user), "--", *initdb])
            if proc.returncode != 0:
                raise ClusterError(f"initdb failed: {proc.stderr[-2000:]}")
            # The cluster's hosts reach it over the bridge; nothing else can route here.
            with open(pgdata / "pg_hba.conf", "a") as hba:
                hba.write(f"host all all {self.subnet} trust\n")
        else:
            _give_to(data_dir, user)
        self.spawn(
            "data",
            [
                str(bin_dir() / "postgres"),
                "-D",
                str(pgdata),
                "-p",
                str(POSTGRES_PORT),
                "-h",
                f"{ip},127.0.0.1",
                "-k",
                str(pgdata),
                "-c",
                "max_connections=300",
            ],
            log_name="postgres",
            user=SYSTEM_USER if user is not None else None,
        )
        deadline = time.monotonic() + timeout_s
        isready = [str(bin_dir() / "pg_isready"), "-h", ip, "-p", str(POSTGRES_PORT)]
        while subprocess.run(isready, capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise ClusterError(f"postgres on {ip} did not start: see {self.logs / 'data-postgres.log'}")
            time.sleep(0.1)
        psql = [str(bin_dir() / "psql"), "-h", ip, "-p", str(POSTGRES_PORT), "-U", "postgres", "-tAc"]
        exists = _sh(*psql, "SELECT 1 FROM pg_database WHERE datname = 'dispatch'").stdout.strip()
        if exists != "1":
            _sh(*psql, "CREATE DATABASE dispatch")

    # ---- the operator's path --------------------------------------------------------

    def start_edge(self, name: str, *, env: dict[str, str] | None = None) -> subprocess.Popen:
        """``dispatch edge --host <ip> --port 8000`` on edge host ``name``, joined to the
        cluster (Ray through the host's own node, Postgres and Redis on the data host)."""
        dispatch = str(Path(sys.executable).parent / "dispatch")
        data_dir = self.state_dir / f"edge-{name}"
        argv = [dispatch, "edge", "--host", self.ip(name), "--port", str(EDGE_PORT)]
        return self.spawn(
            name,
            [*argv, "--data-dir", str(data_dir)],
            env=env,
            log_name="edge",
        )

    def edge_url(self, name: str) -> str:
        return f"http://{self.ip(name)}:{EDGE_PORT}"

    @property
    def edge_hosts(self) -> list[str]:
        return [h.name for h in self.hosts.values() if h.role == "edge"]

    @property
    def shard_hosts(self) -> list[str]:
        return [h.name for h in self.hosts.values() if h.role == "shard"]

    def dispatch(self, host: str, *args: str, timeout_s: float = 180.0) -> subprocess.CompletedProcess:
        """``dispatch <args>`` in ``host`` with the cluster's environment; ClusterError if it fails."""
        proc = self.run(host, [str(Path(sys.executable).parent / "dispatch"), *args], timeout_s=timeout_s)
        if proc.returncode != 0:
            raise ClusterError(
                f"dispatch {' '.join(args)} on {host} failed: {(proc.stdout + proc.stderr)[-3000:]}"
            )
        return proc

    def wait_edge_ready(self, name: str, timeout_s: float = 120.0) -> None:
        import urllib.request

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.edge_url(name)}/readyz", timeout=2) as r:
                    if r.status == 200:
                        return
            except Exception:
                pass
            time.sleep(0.5)
        raise ClusterError(f"edge on {name} not ready after {timeout_s:g} s: see {self.logs}/{name}-edge.log")

    def deploy(self, timeout_s: float = 180.0) -> None:
        """The operator's path (docs/operations.md): ``dispatch migrate`` and ``dispatch
        shards deploy`` on the head, ``dispatch edge`` on every edge host, until ready."""
        self.dispatch("head", "migrate", timeout_s=timeout_s)
        self.dispatch("head", "shards", "deploy", timeout_s=timeout_s)
        for name in self.edge_hosts:
            self.start_edge(name)
        for name in self.edge_hosts:
            self.wait_edge_ready(name, timeout_s)

    # ---- faults ------------------------------------------------------------------------

    def kill_host(self, name: str) -> list[int]:
        """SIGKILL every process in the host's namespace (its network stays). Returns the pids."""
        pids = netns_pids(self.netns(name))
        _kill_namespace_processes(self.netns(name), reap=lambda: self._reap(name))
        self._reap(name)
        self.procs.pop(name, None)
        return pids

    def _reap(self, name: str) -> None:
        # Our own children stay zombies until waited for.
        for proc in self.procs.get(name, []):
            proc.poll()

    def cut(self, name: str) -> None:
        """Take the host's link down: its packets go nowhere, its connections hang."""
        _sh("ip", "link", "set", self.hosts[name].veth(self.prefix), "down")

    def heal(self, name: str) -> None:
        _sh("ip", "link", "set", self.hosts[name].veth(self.prefix), "up")

    def pids(self, name: str) -> list[int]:
        return netns_pids(self.netns(name))

    @staticmethod
    def kill_pid(pid: int, sig: int = signal.SIGKILL) -> None:
        os.kill(pid, sig)

    @staticmethod
    def pause(pid: int) -> None:
        os.kill(pid, signal.SIGSTOP)

    @staticmethod
    def resume(pid: int) -> None:
        os.kill(pid, signal.SIGCONT)

    # ---- teardown ----------------------------------------------------------------------

    def down(self) -> None:
        """Kill every process in every host, delete the namespaces (their veths go with
        them) and the bridge. Safe to call twice, and after a partial :meth:`up`."""
        if not self._up:
            return
        self._up = False
        _ACTIVE.discard(self)
        for host in self.hosts.values():
            with contextlib.suppress(Exception):
                self.heal(host.name)  # a stopped link must not keep a dying process waiting
        existing = netns_names(self.prefix)
        for host in self.hosts.values():
            ns = host.netns(self.prefix)
            if ns in existing:
                _kill_namespace_processes(ns, reap=lambda name=host.name: self._reap(name))
        for procs in self.procs.values():
            for proc in procs:
                with contextlib.suppress(Exception):
                    proc.kill()
                    proc.wait(5)
        self.procs.clear()
        remove_leftovers(self.prefix)

    def save_state(self) -> None:
        state = ClusterState(
            prefix=self.prefix,
            subnet=self.subnet,
            bridge_ip=self.bridge_ip,
            state_dir=str(self.state_dir),
            hosts=[asdict(h) | {"netns": h.netns(self.prefix)} for h in self.hosts.values()],
            env=self.env(),
            pids={name: [p.pid for p in procs] for name, procs in self.procs.items()},
        )
        (self.state_dir / "cluster.json").write_text(json.dumps(asdict(state), indent=2))

    def __enter__(self) -> Cluster:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._saved_handlers[sig] = signal.signal(sig, _raise_on_signal)
        try:
            return self.up()
        except BaseException:
            self._restore_handlers()
            raise

    def __exit__(self, *exc) -> None:
        try:
            if not self.keep_on_exit:
                self.down()
        finally:
            self._restore_handlers()

    def _restore_handlers(self) -> None:
        for sig, handler in self._saved_handlers.items():
            signal.signal(sig, handler)
        self._saved_handlers.clear()


def _setpriv(user) -> list[str]:
    return [f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]


def _redis_binary() -> Path:
    from storage.redis_server import redis_server_binary

    return redis_server_binary()


def _raise_on_signal(signum, frame) -> None:
    # SIGTERM as an exception, like SIGINT's KeyboardInterrupt, so `with` blocks unwind
    # and tear the cluster down.
    raise SystemExit(128 + signum)


_ACTIVE: set[Cluster] = set()


@atexit.register
def _down_all() -> None:
    for cluster in list(_ACTIVE):
        if not cluster.keep_on_exit:
            with contextlib.suppress(Exception):
                cluster.down()


def _load_state(state_dir: Path) -> dict:
    path = state_dir / "cluster.json"
    if not path.exists():
        raise ClusterError(f"no cluster recorded in {path}")
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtests.cluster", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["up", "down", "env", "status"])
    p.add_argument("--shard-hosts", type=int, default=3)
    p.add_argument("--edge-hosts", type=int, default=2)
    p.add_argument("--shard-cpus", type=float, default=2)
    p.add_argument("--prefix", default=DEFAULT_PREFIX)
    p.add_argument("--subnet", default=None, help=f"a free /24 (default {DEFAULT_SUBNET} or the next free)")
    p.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    p.add_argument("--dashboard", action="store_true", help="start Ray's dashboard on the head (:8265)")
    p.add_argument("--no-gcs-ft", action="store_true", help="keep the GCS tables in the head's memory")
    args = p.parse_args(argv)

    if args.action == "down":
        removed = remove_leftovers(args.prefix)
        print("removed " + (", ".join(removed) if removed else "nothing"))
        return 0
    if args.action in ("env", "status"):
        state = _load_state(args.state_dir)
        if args.action == "env":
            for k, v in state["env"].items():
                print(f"export {k}={v}")
            return 0
        for h in state["hosts"]:
            pids = netns_pids(h["netns"]) if h["netns"] in netns_names(state["prefix"]) else []
            print(f"{h['netns']:<14} {h['ip']:<15} {h['role']:<6} {len(pids):>3} processes")
        return 0

    cluster = Cluster(
        shard_hosts=args.shard_hosts,
        edge_hosts=args.edge_hosts,
        shard_cpus=args.shard_cpus,
        prefix=args.prefix,
        subnet=args.subnet,
        state_dir=args.state_dir,
        gcs_ft=not args.no_gcs_ft,
        dashboard=args.dashboard,
        # `up` leaves the cluster running for `down`; a failure half-way still tears down.
        keep_on_exit=True,
    )
    t0 = time.monotonic()
    try:
        cluster.up()
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"cluster up in {time.monotonic() - t0:.1f}s (state in {cluster.state_dir}/cluster.json)")
    for h in cluster.hosts.values():
        print(f"  {h.netns(cluster.prefix):<14} {h.ip:<15} {h.role}")
    print("join it:  eval $(python -m loadtests.cluster env); ip netns exec <host> <command>")
    print("stop it:  python -m loadtests.cluster down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
