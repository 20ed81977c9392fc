"""What a benchmark ran on, recorded beside its figures."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
from pathlib import Path

import psutil

RESULTS_DIR = Path(__file__).parent / "results"


def machine_info() -> dict:
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    versions = {}
    for mod in ("numpy", "ray", "redis", "fastapi", "uvicorn", "websockets"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            pass
    return {
        "cpu_model": cpu_model,
        "logical_cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "git_commit": commit,
    }


def record(name: str, figures: dict) -> Path:
    """Write figures with the machine and time to loadtests/results/<name>-<stamp>.json."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS_DIR / f"{name}-{stamp}.json"
    doc = {"benchmark": name, "at": stamp, "machine": machine_info(), "figures": figures}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


class CpuMeter:
    """Machine-wide CPU seconds (every process: the benchmark, Ray, Redis) between marks."""

    def __init__(self) -> None:
        self._t = psutil.cpu_times()

    def reset(self) -> None:
        self._t = psutil.cpu_times()

    def seconds(self) -> float:
        now = psutil.cpu_times()
        busy = lambda c: c.user + c.system + getattr(c, "irq", 0) + getattr(c, "softirq", 0) + c.nice  # noqa: E731
        return busy(now) - busy(self._t)


class ProcessCpu:
    """CPU seconds per process group between marks: who spent the machine's CPU."""

    def __init__(self) -> None:
        self._start = self._sample()

    @staticmethod
    def _group(p: psutil.Process) -> str:
        try:
            if p.pid == os.getpid():
                return "benchmark"
            name = p.name()
            cmd = " ".join(p.cmdline()[:3])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return "other"
        if "ShardActor" in name or "ShardActor" in cmd:
            return "shard_actors"
        if name.startswith("ray::") or "default_worker" in cmd:
            return "ray_workers"
        if name in ("raylet", "gcs_server") or "ray" in cmd:
            return "ray_system"
        if "redis" in name:
            return "redis"
        if "uvicorn" in cmd or "dispatch" in cmd:
            return "edge"
        return "other"

    def _sample(self) -> dict[int, tuple[str, float]]:
        out = {}
        for p in psutil.process_iter():
            try:
                t = p.cpu_times()
                out[p.pid] = (self._group(p), t.user + t.system)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return out

    def seconds_by_group(self) -> dict[str, float]:
        end = self._sample()
        groups: dict[str, float] = {}
        for pid, (group, cpu) in end.items():
            before = self._start.get(pid, (group, 0.0))[1]
            groups[group] = groups.get(group, 0.0) + max(cpu - before, 0.0)
        return {k: round(v, 2) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])}


CGROUP_V1_CPU = Path("/sys/fs/cgroup/cpu")
CGROUP_V2 = Path("/sys/fs/cgroup")
# A short period spreads the quota over time: with 100 ms (the kernel's default) a busy
# stack would use its share early in each period and then stand still for the rest.
CPU_LIMIT_PERIOD_US = 10_000


class CpuLimit:
    """This process and everything it starts from now on (Ray, Postgres, Redis, the edge,
    load generators) limited to ``cpus`` cores of CPU time: a slower machine of the same
    size, to show that a figure holds with margin. A cgroup of its own (the cpu controller
    of cgroup v1, or ``cpu.max`` of cgroup v2; the machines this was run on had v1, so the
    v2 branch has not been run); needs root. :meth:`close` moves this process back and
    removes the cgroup (its children must have exited)."""

    def __init__(self, cpus: float, name: str = "dispatch-bench") -> None:
        if not 0.05 <= cpus <= (os.cpu_count() or 1):
            raise ValueError(f"cpus must be between 0.05 and {os.cpu_count()}, got {cpus}")
        self.cpus = float(cpus)
        quota = int(self.cpus * CPU_LIMIT_PERIOD_US)
        if (CGROUP_V2 / "cgroup.controllers").exists():
            self.parent = CGROUP_V2
            self.path = CGROUP_V2 / f"{name}-{os.getpid()}"
            if "cpu" not in (CGROUP_V2 / "cgroup.subtree_control").read_text().split():
                (CGROUP_V2 / "cgroup.subtree_control").write_text("+cpu")
            self.path.mkdir()
            (self.path / "cpu.max").write_text(f"{quota} {CPU_LIMIT_PERIOD_US}")
        elif (CGROUP_V1_CPU / "cpu.cfs_quota_us").exists():
            self.parent = CGROUP_V1_CPU
            self.path = CGROUP_V1_CPU / f"{name}-{os.getpid()}"
            self.path.mkdir()
            (self.path / "cpu.cfs_period_us").write_text(str(CPU_LIMIT_PERIOD_US))
            (self.path / "cpu.cfs_quota_us").write_text(str(quota))
        else:
            raise RuntimeError("no cgroup cpu controller at /sys/fs/cgroup: cannot limit CPU")
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def stats(self) -> dict:
        """The limit and how often the cgroup was held back (``cpu.stat``)."""
        raw = {}
        for line in (self.path / "cpu.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            raw[key] = int(value)
        if "throttled_time" in raw:  # cgroup v1: nanoseconds
            throttled_s = raw["throttled_time"] / 1e9
        else:
            throttled_s = raw.get("throttled_usec", 0) / 1e6
        return {
            "cpus": self.cpus,
            "period_us": CPU_LIMIT_PERIOD_US,
            "periods": raw.get("nr_periods", 0),
            "throttled_periods": raw.get("nr_throttled", 0),
            "throttled_s": round(throttled_s, 2),
        }

    def close(self) -> None:
        (self.parent / "cgroup.procs").write_text(str(os.getpid()))
        try:
            self.path.rmdir()
        except OSError:  # a child still runs in it; it goes when they are gone
            pass
