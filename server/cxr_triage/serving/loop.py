"""The inference worker's loop: batches formed from the Redis priority queue.

LitServe runs the worker processes (and restarts one that dies) but no request passes through
them: every route, ``/v1/predict`` included, queues its job in Redis, and the HTTP process waits
there for the outcome (``serving.replies``). The loop leases the most urgent jobs
(``TriageAPI.run_batch``), whichever route queued them, scores them and stores the outcomes;
storing announces them to whoever waits.

Two threads per worker: the main one leases, scores and stores batches. The ``events`` thread
follows the queue's announcements of new jobs (``JobQueue.events``) and wakes the main thread
for a job it takes. Nothing polls at a fast rate: an idle worker looks at Redis every
``IDLE_WAIT_S``, in case an announcement was lost. LitServe's request queue carries only its
stop message, which the main thread looks for between batches.
"""

import functools
import logging
import threading
import time
from collections.abc import Callable
from queue import Empty
from typing import Any

from litserve.loops.base import _SENTINEL_VALUE, LitLoop
from redis import RedisError

from cxr_triage.queue.jobs import JobEvents

log = logging.getLogger(__name__)
IDLE_WAIT_S = 0.1  # how often an idle worker looks at Redis (new jobs wake it at once)
EVENT_WAIT_S = 0.1  # the longest wait for an announcement
STOP_LOOK_S = 0.5  # how often the main thread looks for LitServe's stop message
MAX_EVENTS = 256  # announcements handled in one turn of the events thread


class Signals:
    """What the worker's two threads share: the main thread's wake-up, and stop."""

    def __init__(self) -> None:
        self.new = threading.Event()  # a job this worker takes was queued: look at Redis now
        self.stopped = threading.Event()  # LitServe's stop message arrived, or a thread gave up

    def wait_for_work(self, timeout: float) -> None:
        """Sleep until a new job (or stop) or ``timeout``; then forget the wake-up."""
        self.new.wait(timeout)
        self.new.clear()


class TriageLoop(LitLoop):
    _next_stop_look = 0.0  # time.monotonic() of the next look for LitServe's stop message

    def __call__(
        self,
        lit_api: Any,
        device: str,
        worker_id: int,
        request_queue: Any,
        transport: Any,
        workers_setup_status: dict[int, str],
        callback_runner: Any,
        lit_spec: Any = None,
        stream: bool = False,
    ) -> None:
        signals = Signals()
        events = lit_api.queue.events(urgent_only=lit_api.horizon_s is not None)  # the lane: its own
        turn = functools.partial(self._events_turn, lit_api, signals, events)
        thread = threading.Thread(target=self._repeat, args=(turn, signals, "events"), name="events")
        thread.daemon = True
        thread.start()
        self._repeat(functools.partial(self._step, lit_api, request_queue, signals), signals, "main")
        thread.join(5)
        events.close()

    def _step(self, lit_api: Any, request_queue: Any, signals: Signals) -> bool:
        """One turn of the main thread: wait for work, re-deliver expired leases, run a batch.
        False once LitServe's stop message came."""
        if self._stop_requested(request_queue):
            return False
        wait = lit_api.batch_wait()
        if wait is None or wait > 0:
            signals.wait_for_work(IDLE_WAIT_S if wait is None else wait)
        lit_api.reap_if_due()
        if wait is not None and wait <= 0:
            lit_api.run_batch()
        return True

    def _stop_requested(self, request_queue: Any) -> bool:
        """Whether LitServe's stop message is in the request queue (looked at every STOP_LOOK_S:
        each look is a round trip to LitServe's queue manager). Nothing else is sent there:
        the app replaces LitServe's predict route (``app.own_predict_route``)."""
        now = time.monotonic()
        if now < self._next_stop_look:
            return False
        self._next_stop_look = now + STOP_LOOK_S
        while True:
            try:
                item = request_queue.get_nowait()
            except Empty:
                return False
            if item == _SENTINEL_VALUE:
                return True
            log.warning("ignoring a request in LitServe's queue: its route is not served")

    @staticmethod
    def _repeat(turn: Callable[[], bool], signals: Signals, name: str) -> None:
        """Run one thread's turns (main, events) until it or the worker stops, with one error
        policy."""
        while not signals.stopped.is_set():
            try:
                if not turn():
                    break
            except (EOFError, OSError):  # LitServe's queue manager is gone: the server stops
                log.warning("LitServe's queues are closed; this worker stops")
                break
            except RedisError:
                log.exception("the Redis queue failed (%s thread); retrying in 1 s", name)
                signals.stopped.wait(1.0)
            except Exception:  # the worker's boundary: it must outlive any one bad turn
                log.exception("the %s thread failed; going on", name)
                signals.stopped.wait(1.0)
        signals.stopped.set()
        signals.new.set()  # the main thread stops waiting for work

    def _events_turn(self, lit_api: Any, signals: Signals, events: JobEvents) -> bool:
        """Wake the main thread when a job it takes is queued."""
        event = events.next(EVENT_WAIT_S)
        for _ in range(MAX_EVENTS):
            if event is None:
                break
            if event.kind == "new" and lit_api.wakes_for(event.arg, event.lone):
                signals.new.set()
            event = events.next(0)
        return True
