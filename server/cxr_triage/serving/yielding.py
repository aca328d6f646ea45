"""Routine workers give the cores to the urgent lane while it scores (CPU engines).

OS niceness gives the lane the larger share of the cores, not all of them: a stat image
scored beside routine batches already in the engine takes far longer than alone. So, with
CXR_LANE_PREEMPTS, the lane raises a flag shared by the replica's workers while it scores
stat or urgent jobs (``scoring``); each routine worker's ``yield`` thread (``yield_to_lane``)
then stops its engine run at the next node (ONNX Runtime's terminate flag, ``engines.onnx``),
and the worker runs that batch again once the flag is down (``uninterrupted``). What is lost
is the part of one routine batch done before the stat study came.

Only routine work yields: an overdue routine job that the lane takes raises no flag, and a
worker scoring stat or urgent jobs itself (the lane was busy) is not stopped, so that a flood
of stat studies is scored by every worker. A pause lasts at most MAX_PAUSE_S: a flag left up
(a lane killed mid-batch) is ignored until it comes down.
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
_URGENT_BATCH = threading.Event()  # this worker's batch holds stat or urgent jobs: it does not yield


def uninterrupted(run: Callable[[], T]) -> T:
    """``run()`` (engine calls), run again after each pause for the lane, until it completes."""
    while True:
        try:
            return run()
        except Preempted:
            wait_for_lane()


@contextmanager
def scoring(busy: Event | None, lane: bool, urgent: bool) -> Iterator[None]:
    """Around a batch's engine runs. ``busy``: the lane's flag (None: nobody yields);
    ``lane``: this is the urgent lane; ``urgent``: the batch holds stat or urgent jobs."""
    if busy is None or not urgent:
        yield
        return
    raised = busy if lane else _URGENT_BATCH
    raised.set()
    if not lane:
        resume_runs()  # a pause that began before this batch does not stop it
    try:
        yield
    finally:
        raised.clear()


def start_yielding(busy: Event) -> threading.Thread:
    """A routine worker's ``yield`` thread, for the life of the process."""
    thread = threading.Thread(target=yield_to_lane, args=(busy,), name="yield", daemon=True)
    thread.start()
    return thread


def yield_to_lane(busy: Event, stop: threading.Event | None = None) -> None:
    """Interrupt this process's engine runs while the lane's flag is up (at most MAX_PAUSE_S),
    unless this worker's own batch is urgent work."""
    while stop is None or not stop.is_set():
        if not busy.wait(0.5):
            continue
        until = time.monotonic() + MAX_PAUSE_S
        if not _URGENT_BATCH.is_set():
            interrupt_runs()
            metrics.LANE_PAUSES.inc()
            while busy.is_set() and not _URGENT_BATCH.is_set() and time.monotonic() < until:
                time.sleep(POLL_S)
            resume_runs()
        # No second pause for the same flag: it stays up past MAX_PAUSE_S (a lane killed
        # mid-batch), or this worker took urgent work itself.
        while busy.is_set() and (stop is None or not stop.is_set()):
            time.sleep(POLL_S if time.monotonic() < until else 0.05)


def wait_for_lane() -> None:
    """The main thread, after a run was interrupted: until the yield thread resumes runs."""
    until = time.monotonic() + 2 * MAX_PAUSE_S  # the yield thread resumes within MAX_PAUSE_S
    while runs_interrupted() and time.monotonic() < until:
        time.sleep(POLL_S)
    resume_runs()
