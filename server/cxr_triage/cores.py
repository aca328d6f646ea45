"""How many threads one decode may take right now.

A decode that arrives at a quiet moment can use the cores nobody else wants (a study at night is
scored sooner); under load each decode keeps one thread, which costs the least CPU per image.
The signal is the kernel's count of runnable threads (/proc/loadavg), read as the decode starts:
it sees this service's engines and decodes, and anything else on the machine, at no cost.
"""

import functools
import math
import os
import time
from pathlib import Path

LOADAVG = Path("/proc/loadavg")
CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"
CPU_V1 = Path("/sys/fs/cgroup/cpu")  # cgroup v1: cpu.cfs_quota_us (-1: none) and cpu.cfs_period_us
LOOKS = 5  # readings of the runnable count, LOOK_INTERVAL_S apart, before a decode starts
LOOK_INTERVAL_S = 0.001


@functools.cache
def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by its cgroup's CPU quota (a
    container limited to 2 CPUs on a 64-core host has 2)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = quota_cores()
    return max(1, cores if quota is None else min(cores, quota))


def quota_cores() -> int | None:
    """CPUs the cgroup's CPU quota allows, rounded up (half a CPU still gets a thread); None when
    there is no quota. cgroup v2's cpu.max, else cgroup v1's CFS files: what loky's
    ``cpu_count`` reads, without importing joblib into every process (14 MB each)."""
    try:
        quota, period = CPU_MAX.read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (CPU_V1 / "cpu.cfs_quota_us").read_text().strip()
            period = (CPU_V1 / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:  # "max": no quota
        return None
    if quota_us <= 0 or period_us <= 0:  # v1's -1: no quota
        return None
    return max(1, math.ceil(quota_us / period_us))


def runnable_threads() -> int | None:
    """Threads running or waiting for a core now, machine-wide, the caller included (the 4th
    field of /proc/loadavg); None where there is no such file."""
    try:
        return int(LOADAVG.read_text().split()[3].partition("/")[0])
    except (OSError, ValueError, IndexError):
        return None


def idle_cores(looks: int = LOOKS, interval_s: float = LOOK_INTERVAL_S) -> int:
    """Usable cores that no other runnable thread wants: usable cores less the fewest runnable
    threads seen in ``looks`` readings ``interval_s`` apart (a few ms at most; it stops as soon as
    the caller is the only one). The fewest, so that a process only passing through (the HTTP
    process handing this upload over) does not count, while a busy engine or another decode,
    runnable at every reading, does. 0 where the count cannot be read."""
    fewest: int | None = None
    for look in range(looks):
        if look:
            time.sleep(interval_s)
        running = runnable_threads()
        if running is None:
            return 0
        fewest = running if fewest is None else min(fewest, running)
        if fewest <= 1:
            break
    return max(0, usable_cores() - (fewest or 1))


def decode_threads(limit: int) -> int:
    """Threads for a decode starting now: 1 plus the idle cores, at most ``limit`` (1 = always 1)."""
    if limit <= 1:
        return 1
    return min(limit, 1 + idle_cores())
