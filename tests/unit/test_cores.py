"""How many threads a decode may take: the runnable count, the usable cores, and real load."""

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cxr_triage import cores
from cxr_triage.config import Settings


@pytest.fixture
def usable(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A machine with 4 usable cores, whatever this one has."""
    monkeypatch.setattr(cores, "usable_cores", lambda: 4)
    yield


def readings(monkeypatch: pytest.MonkeyPatch, values: list[int | None]) -> list[int | None]:
    """Make runnable_threads return ``values`` in turn; returns the list of those read."""
    read: list[int | None] = []
    it = iter(values)

    def fake() -> int | None:
        read.append(next(it))
        return read[-1]

    monkeypatch.setattr(cores, "runnable_threads", fake)
    return read


def test_the_runnable_count_is_the_fourth_field_of_loadavg(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    loadavg = tmp_path / "loadavg"
    loadavg.write_text("0.52 0.58 0.59 3/467 12345\n")
    monkeypatch.setattr(cores, "LOADAVG", loadavg)
    assert cores.runnable_threads() == 3
    loadavg.write_text("garbage\n")
    assert cores.runnable_threads() is None
    monkeypatch.setattr(cores, "LOADAVG", tmp_path / "missing")
    assert cores.runnable_threads() is None


@pytest.mark.usefixtures("usable")
def test_idle_cores_takes_the_fewest_runnable_and_stops_at_the_caller_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    read = readings(monkeypatch, [3, 2, 1, 5, 5])
    assert cores.idle_cores(interval_s=0) == 3  # 4 cores less the caller alone
    assert read == [3, 2, 1]  # no look after the caller was found alone


@pytest.mark.usefixtures("usable")
def test_a_thread_runnable_at_every_look_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    readings(monkeypatch, [4, 3, 3, 4, 3])
    assert cores.idle_cores(interval_s=0) == 1
    readings(monkeypatch, [9, 7, 8, 6, 9])  # more runnable than cores: nothing idle
    assert cores.idle_cores(interval_s=0) == 0


@pytest.mark.usefixtures("usable")
def test_nothing_is_idle_where_the_count_cannot_be_read(monkeypatch: pytest.MonkeyPatch) -> None:
    readings(monkeypatch, [None, None])
    assert cores.idle_cores() == 0
    assert cores.decode_threads(8) == 1


@pytest.mark.usefixtures("usable")
def test_decode_threads_is_one_plus_idle_cores_within_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cores, "idle_cores", lambda: 3)
    assert cores.decode_threads(8) == 4
    assert cores.decode_threads(2) == 2
    assert cores.decode_threads(1) == 1
    assert cores.decode_threads(0) == 1


def test_usable_cores_follows_a_cgroup_cpu_quota(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(cores, "CPU_MAX", cpu_max)
    monkeypatch.setattr(cores, "CPU_V1", tmp_path / "no-cgroup-v1")
    try:
        for text, expected in [
            ("max 100000", affinity),
            ("50000 100000", 1),  # half a CPU still gets one thread
            (f"{150000 * affinity} 100000", affinity),  # a quota above the affinity: the affinity
            ("150000 100000", min(2, affinity)),
        ]:
            cpu_max.write_text(text + "\n")
            cores.usable_cores.cache_clear()
            assert cores.usable_cores() == expected, text
        cpu_max.unlink()
        cores.usable_cores.cache_clear()
        assert cores.usable_cores() == affinity
    finally:
        cores.usable_cores.cache_clear()


def test_usable_cores_follows_a_cgroup_v1_cfs_quota(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A host on cgroup v1 (no cpu.max): the quota is in cpu.cfs_quota_us / cpu.cfs_period_us,
    and -1 means none."""
    v1 = tmp_path / "cpu"
    v1.mkdir()
    monkeypatch.setattr(cores, "CPU_MAX", tmp_path / "cpu.max")  # absent, as on a v1 host
    monkeypatch.setattr(cores, "CPU_V1", v1)
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(64)))
    try:
        cases = [("-1", "100000", 64), ("200000", "100000", 2), ("50000", "100000", 1)]
        for quota, period, expected in cases:
            (v1 / "cpu.cfs_quota_us").write_text(quota + "\n")
            (v1 / "cpu.cfs_period_us").write_text(period + "\n")
            cores.usable_cores.cache_clear()
            assert cores.usable_cores() == expected, quota
        (v1 / "cpu.cfs_quota_us").write_text("garbage\n")
        cores.usable_cores.cache_clear()
        assert cores.usable_cores() == 64
    finally:
        cores.usable_cores.cache_clear()


def test_on_busy_cores_a_decode_keeps_one_thread() -> None:
    """Real load: one spinning process per usable core, each runnable at every look."""
    spin = "while True: pass"
    spinners = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(cores.usable_cores())]
    try:
        time.sleep(0.5)  # past the interpreters' start-up
        assert cores.idle_cores() == 0
        assert cores.decode_threads(64) == 1
    finally:
        for proc in spinners:
            proc.kill()
            proc.wait()


def test_the_server_lets_a_decode_take_every_usable_core_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().resolved_decode_threads() == cores.usable_cores()
    monkeypatch.setenv("CXR_DECODE_THREADS", "1")
    assert Settings().resolved_decode_threads() == 1
