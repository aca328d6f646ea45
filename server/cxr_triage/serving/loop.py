"""The inference worker's loop: batches formed from the Redis priority queue.

LitServe stays the HTTP server: a synchronous ``/v1/predict`` request arrives here as a
Ticket (its job is already in Redis). The loop does not batch tickets in arrival order; it
leases the most urgent jobs from Redis (``TriageAPI.run_batch``), whichever route queued
them, scores them, and answers each ticket when its job has an outcome — whichever worker
scored it. Tickets double as wake-ups: a new one means a new job.

Three threads per worker: the main one leases, scores and stores batches and answers their
tickets. The ``tickets`` thread takes tickets from LitServe. The ``events`` thread follows the
queue's announcements (``JobQueue.events``): it answers tickets whose jobs another worker
scored, while this one is busy in the engine (ONNX Runtime releases the GIL), and wakes the
main thread when a job is queued. Nothing polls at a fast rate: an idle worker, and the
tickets of jobs whose announcement was lost, are looked at in Redis every so often.
"""

import functools
import logging
import threading
import time
from collections.abc import Callable
from queue import Empty
from typing import Any

from fastapi import HTTPException
from litserve.loops.base import _SENTINEL_VALUE, LitLoop
from litserve.utils import LitAPIStatus, LoopResponseType, PickleableHTTPException
from redis import RedisError

from cxr_triage.errors import CxrError
from cxr_triage.queue.jobs import JobEvents
from cxr_triage.serving.http_errors import to_http_exception

log = logging.getLogger(__name__)
IDLE_WAIT_S = 0.1  # how often an idle worker looks at Redis (new jobs wake it at once)
TICKET_WAIT_S = 0.1  # the longest wait for a ticket: how often tickets are checked for expiry
EVENT_WAIT_S = 0.1  # the longest wait for an announcement
SWEEP_S = 1.0  # how often waiting tickets are looked up in Redis, in case an announcement was lost
MAX_EVENTS = 256  # announcements handled in one turn of the events thread


class Waiting:
    """Tickets of this worker's HTTP requests, by job id; shared by the worker's two threads."""

    def __init__(self) -> None:
        self.by_job: dict[str, list[tuple[int, str, float]]] = {}
        self.lock = threading.Lock()
        self.new = threading.Event()  # set by a new ticket: the main thread looks at Redis now
        self.stopped = threading.Event()  # LitServe's stop message arrived
        self._last_sweep = time.monotonic()

    def add(self, queue_id: int, uid: str, job_id: str, since: float) -> None:
        """``since``: LitServe's time.monotonic() at submission (CLOCK_MONOTONIC is system-wide)."""
        with self.lock:
            self.by_job.setdefault(job_id, []).append((queue_id, uid, since))
        self.new.set()

    def pop(self, job_id: str) -> list[tuple[int, str, float]]:
        """The tickets of ``job_id``, once: the thread that pops them answers them."""
        with self.lock:
            return self.by_job.pop(job_id, [])

    def holds(self, job_id: str) -> bool:
        with self.lock:
            return job_id in self.by_job

    def sweep_due(self, interval: float) -> bool:
        """True at most once per ``interval`` while tickets wait (the events thread's look at Redis)."""
        now = time.monotonic()
        if not self.by_job or now - self._last_sweep < interval:
            return False
        self._last_sweep = now
        return True

    def job_ids(self) -> list[str]:
        with self.lock:
            return list(self.by_job)

    def expired(self, timeout: float) -> list[tuple[int, str]]:
        cutoff, out = time.monotonic() - timeout, []
        with self.lock:
            for job_id in list(self.by_job):
                keep = [t for t in self.by_job[job_id] if t[2] >= cutoff]
                out += [(q, u) for q, u, since in self.by_job[job_id] if since < cutoff]
                if keep:
                    self.by_job[job_id] = keep
                else:
                    del self.by_job[job_id]
        return out

    def wait_for_ticket(self, timeout: float) -> None:
        """Sleep until a new ticket (or stop) or ``timeout``; then forget the wake-up."""
        self.new.wait(timeout)
        self.new.clear()


class TriageLoop(LitLoop):
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
        waiting = Waiting()
        events = lit_api.queue.events()
        turns = {
            "tickets": functools.partial(self._tickets_turn, lit_api, request_queue, transport, waiting),
            "events": functools.partial(self._events_turn, lit_api, transport, waiting, events),
        }
        threads = [
            threading.Thread(target=self._repeat, args=(turn, waiting, name), name=name, daemon=True)
            for name, turn in turns.items()
        ]
        for thread in threads:
            thread.start()
        self._repeat(functools.partial(self._step, lit_api, transport, waiting), waiting, "main")
        for thread in threads:
            thread.join(5)
        events.close()

    def _step(self, lit_api: Any, transport: Any, waiting: Waiting) -> bool:
        """One turn of the main thread: wait for work, re-deliver expired leases, run a batch."""
        wait = lit_api.batch_wait()
        if wait is None or wait > 0:
            waiting.wait_for_ticket(IDLE_WAIT_S if wait is None else wait)
        lit_api.reap_if_due()
        if wait is not None and wait <= 0:
            for job_id, outcome in lit_api.run_batch():
                self._answer(transport, waiting.pop(job_id), outcome)
        return True

    @staticmethod
    def _repeat(turn: Callable[[], bool], waiting: Waiting, name: str) -> None:
        """Run one thread's turns (main, tickets, events) until it or the worker stops, with
        one error policy. The helpers keep answering while Redis is away: requests then time
        out (504) instead of hanging."""
        while not waiting.stopped.is_set():
            try:
                if not turn():
                    break
            except (EOFError, OSError):  # LitServe's queue manager is gone: the server stops
                log.warning("LitServe's queues are closed; this worker stops")
                break
            except RedisError:
                log.exception("the Redis queue failed (%s thread); retrying in 1 s", name)
                waiting.stopped.wait(1.0)
            except Exception:  # the worker's boundary: it must outlive any one bad turn
                log.exception("the %s thread failed; going on", name)
                waiting.stopped.wait(1.0)
        waiting.stopped.set()
        waiting.new.set()  # the main thread stops waiting for a ticket

    def _tickets_turn(self, lit_api: Any, request_queue: Any, transport: Any, waiting: Waiting) -> bool:
        """Take new tickets (one round trip to LitServe's queue manager while none comes),
        answer those whose jobs are already scored, expire old ones. False on shutdown."""
        new = self._take_tickets(request_queue, transport, waiting, TICKET_WAIT_S)
        if new is None:
            return False
        if new:  # scored before its ticket came: a repeated upload, or a quick worker elsewhere
            self._answer_finished(lit_api, transport, waiting, new)
        for queue_id, uid in waiting.expired(lit_api.request_timeout):
            self._reply(transport, queue_id, uid, HTTPException(504, "timed out waiting for the result"))
        return True

    def _events_turn(self, lit_api: Any, transport: Any, waiting: Waiting, events: JobEvents) -> bool:
        """Act on the queue's announcements: answer the tickets of jobs scored elsewhere, wake
        the main thread for a new job it takes; now and then, look up every waiting ticket."""
        done, event = [], events.next(EVENT_WAIT_S)
        for _ in range(MAX_EVENTS):
            if event is None:
                break
            if event.kind == "done" and waiting.holds(event.arg):
                done.append(event.arg)
            elif event.kind == "new" and lit_api.wakes_for(event.arg):
                waiting.new.set()
            event = events.next(0)
        if waiting.sweep_due(SWEEP_S):
            done = waiting.job_ids()
        if done:
            self._answer_finished(lit_api, transport, waiting, done)
        return True

    def _answer_finished(self, lit_api: Any, transport: Any, waiting: Waiting, job_ids: list[str]) -> None:
        for job_id, outcome in lit_api.finished(job_ids):
            self._answer(transport, waiting.pop(job_id), outcome)

    def _take_tickets(
        self, request_queue: Any, transport: Any, waiting: Waiting, block_s: float
    ) -> list[str] | None:
        """Drain new tickets, blocking up to ``block_s`` for the first; their job ids, or None
        on shutdown."""
        timeout: float | None = max(block_s, 0.0)
        new: list[str] = []
        while True:
            try:
                item = request_queue.get(timeout=timeout) if timeout else request_queue.get_nowait()
            except Empty:
                return new
            if item == _SENTINEL_VALUE:
                return None
            queue_id, uid, since, ticket = item
            waiting.add(queue_id, uid, ticket.job_id, since)
            new.append(ticket.job_id)
            # Tells LitServe which worker holds this request, so that if this worker dies the
            # request is answered (with an error) instead of waiting forever; the job itself
            # stays in Redis and is re-delivered.
            self.put_response(transport, queue_id, uid, (), LitAPIStatus.START, LoopResponseType.REGULAR)
            timeout = None

    def _answer(self, transport: Any, tickets: list[tuple[int, str, float]], outcome: dict[str, Any]) -> None:
        for queue_id, uid, _ in tickets:
            if "error" in outcome:
                err = outcome["error"]
                exc = to_http_exception(
                    CxrError(err["message"], code=err["code"], status=err.get("status", 500))
                )
                self._reply(transport, queue_id, uid, exc)
            else:
                self.put_response(
                    transport, queue_id, uid, outcome, LitAPIStatus.OK, LoopResponseType.REGULAR
                )

    def _reply(self, transport: Any, queue_id: int, uid: str, exc: HTTPException) -> None:
        error = PickleableHTTPException.from_exception(exc)
        self.put_response(transport, queue_id, uid, error, LitAPIStatus.ERROR, LoopResponseType.REGULAR)
