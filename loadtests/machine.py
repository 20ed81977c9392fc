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
