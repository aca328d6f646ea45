"""The inference worker's loop: batches formed from the Redis priority queue.

LitServe stays the HTTP server: a synchronous ``/v1/predict`` request arrives here as a
Ticket (its job is already in Redis). The loop does not batch tickets in arrival order; it
leases the most urgent jobs from Redis (``TriageAPI.run_batch``), whichever route queued
them, scores them, and answers each ticket when its job has an outcome — whichever worker
scored it. Tickets double as wake-ups: a new one means a new job.
"""

import logging
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
IDLE_WAIT_S = 0.02  # how long an idle worker sleeps before looking at Redis again
POLL_OTHERS_S = 0.01  # how often tickets whose jobs another worker holds are checked


class Waiting:
    """Tickets of this worker's HTTP requests, by job id."""

    def __init__(self) -> None:
        self.by_job: dict[str, list[tuple[int, str, float]]] = {}
        self.last_poll = 0.0

    def add(self, queue_id: int, uid: str, job_id: str, since: float) -> None:
        """``since``: LitServe's time.monotonic() at submission (CLOCK_MONOTONIC is system-wide)."""
        self.by_job.setdefault(job_id, []).append((queue_id, uid, since))

    def pop(self, job_id: str) -> list[tuple[int, str, float]]:
        return self.by_job.pop(job_id, [])

    def expired(self, timeout: float) -> list[tuple[int, str]]:
        cutoff, out = time.monotonic() - timeout, []
        for job_id in list(self.by_job):
            keep = [t for t in self.by_job[job_id] if t[2] >= cutoff]
            out += [(q, u) for q, u, since in self.by_job[job_id] if since < cutoff]
            if keep:
                self.by_job[job_id] = keep
            else:
                del self.by_job[job_id]
        return out


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
        while True:
            try:
                if not self._step(lit_api, request_queue, transport, waiting):
                    return
                continue
            except RedisError:
                log.exception("the Redis queue failed; retrying in 1 s")
            except Exception:  # the worker must outlive any one bad turn
                log.exception("the worker loop failed; going on")
            # Keep answering: requests still time out (504) while Redis is away.
            if not self._take_tickets(request_queue, transport, waiting, 1.0):
                return
            self._expire(transport, waiting, lit_api.request_timeout)

    def _step(self, lit_api: Any, request_queue: Any, transport: Any, waiting: "Waiting") -> bool:
        """One turn: take tickets, re-deliver expired leases, run a batch, answer. False: stop."""
        wait = lit_api.batch_wait()
        block = wait if wait is not None else IDLE_WAIT_S
        if not self._take_tickets(request_queue, transport, waiting, block):
            return False
        lit_api.reap_if_due()
        if wait is not None and wait <= 0:
            for job_id, outcome in lit_api.run_batch():
                self._answer(transport, waiting.pop(job_id), outcome)
        if waiting.by_job and time.monotonic() - waiting.last_poll >= POLL_OTHERS_S:
            waiting.last_poll = time.monotonic()
            for job_id, outcome in lit_api.finished(list(waiting.by_job)):
                self._answer(transport, waiting.pop(job_id), outcome)
        self._expire(transport, waiting, lit_api.request_timeout)
        return True

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
