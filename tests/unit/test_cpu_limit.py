"""loadtests.machine.CpuLimit: the benchmarks' slower machine is really slower."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from loadtests.machine import CGROUP_V1_CPU, CGROUP_V2

can_limit = os.geteuid() == 0 and (
    (CGROUP_V2 / "cgroup.controllers").exists() or (CGROUP_V1_CPU / "cpu.cfs_quota_us").exists()
)


@pytest.mark.skipif(not can_limit, reason="needs root and a cgroup cpu controller")
def test_a_process_and_its_children_get_only_the_cpu_time_of_the_limit():
    # A child of the limited process spins for 1.5 s of wall time: limited to a quarter
    # of a core it gets about 0.375 s of CPU; unlimited it would get about 1.5.
    script = textwrap.dedent(
        """
        import json, subprocess, sys, time
        from loadtests.machine import CpuLimit
        limit = CpuLimit(0.25, name="dispatch-test")
        spin = "import time\\nt = time.time()\\nwhile time.time() - t < 1.5: pass"
        child = subprocess.run([sys.executable, "-c", spin + "\\nprint(time.process_time())"],
                               capture_output=True, text=True, check=True)
        stats = limit.stats()
        limit.close()
        print(json.dumps({"child_cpu_s": float(child.stdout), "stats": stats,
                          "gone": not limit.path.exists()}))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert 0.2 <= got["child_cpu_s"] <= 0.6, got
    assert got["stats"]["cpus"] == 0.25 and got["stats"]["throttled_periods"] > 10
    assert got["gone"]


def test_a_limit_beyond_the_machine_is_refused():
    from loadtests.machine import CpuLimit

    with pytest.raises(ValueError):
        CpuLimit((os.cpu_count() or 1) + 1)
    with pytest.raises(ValueError):
        CpuLimit(0.0)
