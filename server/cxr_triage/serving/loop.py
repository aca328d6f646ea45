"""The inference worker's loop: batches formed from the Redis priority queue.

LitServe stays the HTTP server: a synchronous ``/v1/predict`` request arrives here as a
Ticket (its job is already in Redis). The loop does not batch tickets in arrival order; it
leases the most urgent jobs from Redis (``TriageAPI.run_batch``), whichever route queued
them, scores them, and answers each ticket when its job has an outcome — whichever worker
scored it. Tickets double as wake-ups: a new one means a new job.

Two threads per worker: the main one leases, scores and stores batches; the ``tickets``
thread takes tickets from LitServe and answers those whose jobs another worker scored while
this one is busy in the engine (ONNX Runtime releases the GIL), so that a stat study scored
by one worker is not kept waiting for the batch that the worker holding its ticket runs.
"""

import logging
import threading
import time
from queue import Empty
from typing import Any

from fastapi import HTTPException
from litserve.loops.base import _SENTINEL_VALUE, LitLoop
from litserve.utils import LitAPIStatus, LoopResponseType, PickleableHTTPException
from redis import RedisError

from cxr_triage.errors import CxrError
from cxr_triage.serving.http_errors import to_http_exception

log = logging.getLogger(__name__)
IDLE_WAIT_S = 0.02  # how long an idle worker waits for a ticket before looking at Redis again
LANE_IDLE_WAIT_S = 0.01  # the urgent lane looks more often: a stat ticket may go to another worker
POLL_OTHERS_S = 0.01  # how often tickets whose jobs another worker holds are checked
IDLE_TICKET_WAIT_S = 0.1  # how long the tickets thread waits for a ticket when none is waiting


class Waiting:
    """Tickets of this worker's HTTP requests, by job id; shared by the worker's two threads."""

    def __init__(self) -> None:
        self.by_job: dict[str, list[tuple[int, str, float]]] = {}
        self.lock = threading.Lock()
        self.new = threading.Event()  # set by a new ticket: the main thread looks at Redis now
        self.stopped = threading.Event()  # LitServe's stop message arrived

    def add(self, queue_id: int, uid: str, job_id: str, since: float) -> None:
        """``since``: LitServe's time.monotonic() at submission (CLOCK_MONOTONIC is system-wide)."""
        with self.lock:
            self.by_job.setdefault(job_id, []).append((queue_id, uid, since))
        self.new.set()

    def pop(self, job_id: str) -> list[tuple[int, str, float]]:
        """The tickets of ``job_id``, once: the thread that pops them answers them."""
        with self.lock:
            return self.by_job.pop(job_id, [])

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
        args = (lit_api, request_queue, transport, waiting)
        tickets = threading.Thread(target=self._tickets, args=args, name="tickets", daemon=True)
        tickets.start()
        while not waiting.stopped.is_set():
            try:
                self._step(lit_api, transport, waiting)
            except RedisError:
                log.exception("the Redis queue failed; retrying in 1 s")
                waiting.stopped.wait(1.0)
            except Exception:  # the worker must outlive any one bad turn
                log.exception("the worker loop failed; going on")
                waiting.stopped.wait(1.0)
        tickets.join(5)

    def _step(self, lit_api: Any, transport: Any, waiting: Waiting) -> None:
        """One turn of the main thread: wait for work, re-deliver expired leases, run a batch."""
        wait = lit_api.batch_wait()
        if wait is None or wait > 0:
            idle = LANE_IDLE_WAIT_S if lit_api.horizon_s is not None else IDLE_WAIT_S
            waiting.wait_for_ticket(idle if wait is None else wait)
        lit_api.reap_if_due()
        if wait is not None and wait <= 0:
            for job_id, outcome in lit_api.run_batch():
                self._answer(transport, waiting.pop(job_id), outcome)

    def _tickets(self, lit_api: Any, request_queue: Any, transport: Any, waiting: Waiting) -> None:
        """The tickets thread: take tickets, answer the ones other workers scored, expire the rest.

        It keeps answering while Redis is away: requests then time out (504) instead of hanging.
        """
        last_poll = 0.0
        while not waiting.stopped.is_set():
            try:
                # Each wait is a round trip to LitServe's queue manager: long ones when no ticket
                # waits for another worker's result (a ticket still arrives at once).
                block = POLL_OTHERS_S if waiting.by_job else IDLE_TICKET_WAIT_S
                if not self._take_tickets(request_queue, transport, waiting, block):
                    break
                if waiting.by_job and time.monotonic() - last_poll >= POLL_OTHERS_S:
                    last_poll = time.monotonic()
                    for job_id, outcome in lit_api.finished(waiting.job_ids()):
                        self._answer(transport, waiting.pop(job_id), outcome)
                self._expire(transport, waiting, lit_api.request_timeout)
            except (EOFError, OSError):  # LitServe's queue manager is gone: the server stops
                log.warning("LitServe's queues are closed; this worker stops")
                break
            except RedisError:
                log.exception("the Redis queue failed (answering); retrying in 1 s")
                waiting.stopped.wait(1.0)
            except Exception:  # the worker's boundary: it must outlive any one bad turn
                log.exception("the ticket thread failed; going on")
                waiting.stopped.wait(1.0)
        waiting.stopped.set()
        waiting.new.set()  # the main thread stops waiting for a ticket

    def _expire(self, transport: Any, waiting: Waiting, timeout: float) -> None:
        for queue_id, uid in waiting.expired(timeout):
            self._reply(transport, queue_id, uid, HTTPException(504, "timed out waiting for the result"))

    def _take_tickets(self, request_queue: Any, transport: Any, waiting: Waiting, block_s: float) -> bool:
        """Drain new tickets, blocking up to ``block_s`` for the first. False on shutdown."""
        timeout: float | None = max(block_s, 0.0)
        while True:
            try:
                item = request_queue.get(timeout=timeout) if timeout else request_queue.get_nowait()
            except Empty:
                return True
            if item == _SENTINEL_VALUE:
                return False
            queue_id, uid, since, ticket = item
            waiting.add(queue_id, uid, ticket.job_id, since)
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
