"""Routine workers give the cores to the urgent lane while it scores (CPU engines).

OS niceness gives the lane the larger share of the cores, not all of them: a stat image
scored beside routine batches already in the engine takes far longer than alone. So, with
CXR_LANE_PREEMPTS, the lane raises a flag shared by the replica's workers while it runs a
batch (``LaneFlag``); each routine worker's ``yield`` thread (``yield_to_lane``) then stops
its engine run at the next node (ONNX Runtime's terminate flag, ``engines.onnx``), and the
worker runs that batch again once the flag is down (``wait_for_lane``). What is lost is the
part of one routine batch done before the stat study came. A pause lasts at most MAX_PAUSE_S:
a flag left up (a lane killed mid-batch) is ignored until it comes down.
"""

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.synchronize import Event
from typing import TypeVar

from cxr_triage.engines.onnx import Preempted, interrupt_runs, resume_runs, runs_interrupted
from cxr_triage.observability import metrics

T = TypeVar("T")
MAX_PAUSE_S = 0.5  # the longest a routine worker waits for the lane's batch
POLL_S = 0.002  # how often a paused worker looks at the flag


def uninterrupted(run: Callable[[], T]) -> T:
    """``run()`` (engine calls), run again after each pause for the lane, until it completes."""
    while True:
        try:
            return run()
        except Preempted:
            wait_for_lane()


@contextmanager
def lane_scoring(busy: Event | None) -> Iterator[None]:
    """The lane's side: the flag is up while the block runs (no flag: nothing to do)."""
    if busy is None:
        yield
        return
    busy.set()
    try:
        yield
    finally:
        busy.clear()


def start_yielding(busy: Event) -> threading.Thread:
    """A routine worker's ``yield`` thread, for the life of the process."""
    thread = threading.Thread(target=yield_to_lane, args=(busy,), name="yield", daemon=True)
    thread.start()
    return thread


def yield_to_lane(busy: Event, stop: threading.Event | None = None) -> None:
    """Interrupt this process's engine runs while the lane's flag is up (at most MAX_PAUSE_S)."""
    while stop is None or not stop.is_set():
        if not busy.wait(0.5):
            continue
        interrupt_runs()
        metrics.LANE_PAUSES.inc()
        until = time.monotonic() + MAX_PAUSE_S
        while busy.is_set() and time.monotonic() < until:
            time.sleep(POLL_S)
        resume_runs()
        while busy.is_set() and (stop is None or not stop.is_set()):  # up too long: not ours to wait on
            time.sleep(0.05)


def wait_for_lane() -> None:
    """The main thread, after a run was interrupted: until the yield thread resumes runs."""
    until = time.monotonic() + 2 * MAX_PAUSE_S  # the yield thread resumes within MAX_PAUSE_S
    while runs_interrupted() and time.monotonic() < until:
        time.sleep(POLL_S)
    resume_runs()
