"""A replica's life among others on one Redis: its identity, its processes, its drain.

A replica is one ``cxr-triage serve``: a main process, LitServe's HTTP processes (forked) and
inference workers (spawned), and the decoding pools of the HTTP processes. Each names itself
(``name_process``) so that ``ps``, ``top`` and the benchmarks tell them apart. Every process of a
replica dies with its parent (PR_SET_PDEATHSIG), so a replica killed with SIGKILL leaves no
orphan serving its port or scoring jobs; the jobs it held are re-delivered from Redis once
their lease expires.

SIGTERM drains instead (``Service.run`` starts ``drain_then_stop``):

1. the drain event is set in every process: ``/ready`` answers 503, the inference workers
   lease no new job (they finish the batch in hand and keep answering their HTTP requests,
   whichever replica scores those jobs);
2. the replica keeps accepting requests (a load balancer needs a few seconds to see the 503):
   what it accepts is in Redis, and other replicas score it;
3. once no job is leased by this replica and no HTTP request is in flight, or when the grace
   period (``CXR_DRAIN_GRACE_S``) is spent, the jobs it still holds are put back on the queue
   and LitServe shuts down.
"""

import contextlib
import ctypes
import logging
import signal
import time
from collections.abc import Callable
from multiprocessing import get_context
from multiprocessing.synchronize import Event

from cxr_triage.queue import JobQueue

log = logging.getLogger(__name__)
DRAIN_POLL_S = 0.2
SHUTDOWN_MARGIN_S = 5.0  # left of the grace period for LitServe's own shutdown


try:  # loaded once, at import: a process just forked only calls it (safe in a preexec_fn)
    _LIBC: ctypes.CDLL | None = ctypes.CDLL("libc.so.6", use_errno=True)
except OSError:  # not Linux/glibc: processes keep their names and need another supervisor
    _LIBC = None
_PR_SET_PDEATHSIG, _PR_SET_NAME = 1, 15
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt(3)
HEAP_KEEP_BYTES = 32 * 1024 * 1024  # glibc's largest mmap threshold on 64-bit


def _prctl(option: int, arg: int | bytes) -> None:
    """Linux prctl(2) for this process (its calling thread); nothing where there is none."""
    if _LIBC is not None:
        with contextlib.suppress(AttributeError):
            _LIBC.prctl(option, arg, 0, 0, 0)


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """This process gets ``sig`` when its parent ends, however it ends (Linux PR_SET_PDEATHSIG)."""
    _prctl(_PR_SET_PDEATHSIG, sig)


def keep_freed_memory(limit: int = HEAP_KEEP_BYTES) -> None:
    """Let glibc's malloc reuse this process's freed buffers instead of giving them back to the
    kernel after each use (mallopt(3)): blocks up to ``limit`` bytes come from the heap, and up
    to twice that of free memory stays at its top. For a decoding process, whose every image
    allocates and frees a few buffers of megabytes, this saves faulting in fresh pages each
    time: about 1,400 page faults and 3 ms of CPU per full-resolution JPEG here (~15% of its
    decoding). The price is memory: the process keeps about its largest image's buffers.
    Nothing where malloc is not glibc's."""
    if _LIBC is not None:
        with contextlib.suppress(AttributeError):
            # Setting either turns glibc's sliding mmap threshold off: set both, or big blocks
            # are mmapped (and faulted in) on every use.
            _LIBC.mallopt(_M_MMAP_THRESHOLD, limit)
            _LIBC.mallopt(_M_TRIM_THRESHOLD, 2 * limit)


def start_decoder() -> None:
    """The decoding pool's initializer: named ``cxr-decoder``, ended by SIGTERM with its HTTP
    process, and reusing its freed image buffers (``keep_freed_memory``)."""
    name_process("decoder")
    die_with_parent(signal.SIGTERM)
    keep_freed_memory()


# The replica's processes, as ``name_process`` names them (the kernel keeps 15 bytes).
PROCESS_NAMES = {
    "main": "cxr-main",  # the one ``cxr-triage serve`` (and LitServe's manager, forked from it)
    "http": "cxr-http",  # a LitServe HTTP server
    "worker": "cxr-worker",  # a routine inference worker
    "lane": "cxr-lane",  # the urgent lane's inference worker
    "decoder": "cxr-decoder",  # a decoding process of an HTTP server
    "pacs": "cxr-pacs",  # the PACS process (SRs out, polling in)
}


def name_process(role: str) -> None:
    """Name this process after its role in the replica (``PROCESS_NAMES``): what ``ps -o comm``,
    ``top`` and /proc/PID/comm show (Linux PR_SET_NAME, from the process's main thread)."""
    _prctl(_PR_SET_NAME, PROCESS_NAMES[role].encode()[:15])


def replica_event() -> Event:
    """A flag shared by every process of the replica (the drain, the lane's): spawn context,
    so spawned workers can open it."""
    return get_context("spawn").Event()


def worker_name(replica: str, pid: int) -> str:
    """What a job's ``worker`` field holds: the replica, then the process."""
    return f"{replica}/{pid}"


def drain_then_stop(
    queue: JobQueue,
    replica: str,
    active_requests: Callable[[], int | None],
    grace_s: float,
    stop: Callable[[], None],
) -> None:
    """Wait until the replica holds nothing (or the grace period is spent), release, then ``stop``."""
    started = time.monotonic()
    deadline = started + max(0.0, grace_s - SHUTDOWN_MARGIN_S)
    prefix = worker_name(replica, 0)[:-1]  # "replica/"
    held = in_flight = 0
    while time.monotonic() < deadline:
        try:
            held = queue.held_by(prefix)
        except Exception:  # Redis away: nothing to wait for that could finish; stop at the deadline
            log.warning("drain: Redis unreachable; waiting for it until the grace period ends")
            held = -1
        in_flight = active_requests() or 0
        if held == 0 and in_flight == 0:
            break
        time.sleep(DRAIN_POLL_S)
    released = 0
    with contextlib.suppress(Exception):
        released = queue.release(prefix)
    log.warning(
        "drained in %.1f s (jobs still leased: %d, put back on the queue: %d; requests in flight: %d)",
        time.monotonic() - started,
        max(held, 0),
        released,
        in_flight,
    )
    stop()


class ManagerGone(logging.Filter):
    """LitServe's worker monitor (a thread of the main process) polls a flag held by its
    multiprocessing manager. At shutdown the manager may stop first; the monitor's next look
    then fails on the closed pipe (or on the manager's socket, gone), and LitServe logs
    "Monitoring worker crashed" with a traceback at ERROR: the end of a clean stop, not a
    crash. This filter says so in one INFO line; any other failure of the monitor is logged
    as LitServe logs it."""

    CRASHED = "Monitoring worker crashed"
    STOPPED = "LitServe's worker monitor stopped: its process manager has shut down"

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if record.msg == self.CRASHED and isinstance(error, (ConnectionError, EOFError, FileNotFoundError)):
            record.msg, record.args = self.STOPPED, ()
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info, record.exc_text = None, None
        return True
