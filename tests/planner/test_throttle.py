"""The duty-cycle throttle of emulated slow ranks (yuanlfa/train/throttle.py): a throttled
process gets at most its share of wall time, and is never left stopped."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from yuanlfa.train.throttle import Throttle

BUSY = "import time\nwhile True:\n    pass\n"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@pytest.mark.parametrize("speed", [0.5, 0.25])
def test_throttled_process_gets_at_most_its_share(speed: float) -> None:
    child = subprocess.Popen([sys.executable, "-c", BUSY])
    try:
        time.sleep(0.2)
        with Throttle(child.pid, speed, period_s=0.02):
            start_cpu, start = cpu_s(child.pid), time.monotonic()
            time.sleep(2.0)
            share = (cpu_s(child.pid) - start_cpu) / (time.monotonic() - start)
        # An upper bound: a stopped process gets no CPU, whatever else runs on the machine
        # (a lower one would depend on the machine's load). Tick granularity: +0.1.
        assert share <= speed + 0.1
        time.sleep(0.1)
        assert state(child.pid) != "T"  # left running
    finally:
        child.kill()
        child.wait()


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="speed"):
        Throttle(os.getpid(), 0.0)
    with pytest.raises(ValueError, match="period"):
        Throttle(os.getpid(), 0.5, period_s=0.0001)
