"""Synchronous requests wait here, in the HTTP process, for their jobs' outcomes.

``POST /v1/predict`` queues its job like every other route and then waits on Redis for the
outcome, whichever worker in whichever replica scores it: the queue's scripts announce each
finished job, a synchronous job with its outcome on the channel of the HTTP process that
queued it (``channel``, named in the job as its ``reply_to``; other processes do not hear it),
others on the shared ``cxr:done`` (``scripts.DONE``), and one subscription per HTTP process to
both answers the requests that wait for it (an announcement without the outcome, from a tracked
study's job, is looked up). The reply never passes through
an inference worker's memory, so a worker that dies mid-batch costs the request time, not its
answer: the job is re-delivered and the request gets that outcome.

Announcements are fire and forget, so the waiting jobs are also looked up every ``SWEEP_S``
(and at once after a re-subscription): a lost announcement costs time, never an answer.
"""

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterable
from typing import Any

import redis.asyncio as aioredis
from redis import RedisError

from cxr_triage.errors import CxrError, TimedOut
from cxr_triage.queue import scripts
from cxr_triage.queue.jobs import job_key

log = logging.getLogger(__name__)
SWEEP_S = 1.0  # how often jobs still awaited are looked up in Redis, in case an announcement was lost
RETRY_S = 1.0  # wait before subscribing again after a Redis error
VANISHED = {"error": {"code": "internal_error", "message": "job vanished", "status": 500}}


class Replies:
    """The outcomes awaited by one HTTP process's requests, by job id."""

    def __init__(self, redis_url: str, sweep_s: float = SWEEP_S) -> None:
        self.redis_url = redis_url
        self.sweep_s = sweep_s
        self._waiting: dict[str, list[asyncio.Future[dict[str, Any]]]] = {}
        self._client: aioredis.Redis | None = None
        self._listener: asyncio.Task[None] | None = None
        self._pid: int | None = None
        self._channel = ""

    def channel(self) -> str:
        """This HTTP process's channel for the outcomes its requests wait for (the jobs'
        ``reply_to``); subscribed to before the first wait (an outcome announced earlier is
        found by the look-up that follows the subscription)."""
        self._start()
        return self._channel

    async def wait(self, job_id: str, timeout: float, look_first: bool = True) -> dict[str, Any]:
        """The response body of ``job_id`` once it is done. ``look_first``: read the job's
        outcome before waiting for its announcement, for a job that may be done already (a
        repeated upload). A job queued by this process's running task since its last await
        needs no look: its announcement cannot have been read yet (the listener runs only when
        the task awaits), and a late wait is still found by the sweep.

        Raises:
            CxrError: the job failed (its stored error: code, message, status).
            TimedOut: no outcome within ``timeout`` seconds (the job stays queued).
        """
        self._start()
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(job_id, []).append(future)
        try:
            if look_first:  # finished already (a repeated upload): no announcement comes
                await self._resolve([job_id])
            outcome = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise TimedOut(f"no result within {timeout:g} s; the job is still scored later") from None
        finally:
            self._forget(job_id, future)
        if "error" in outcome:
            err = outcome["error"]
            raise CxrError(err["message"], code=err["code"], status=err.get("status", 500))
        return outcome

    def waiting(self) -> int:
        return sum(len(f) for f in self._waiting.values())

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # --- the listener ----------------------------------------------------------------------------

    def _start(self) -> None:
        """One client and one listener per HTTP process (LitServe forks them after start-up)."""
        if self._pid != os.getpid():
            self._client, self._listener, self._waiting = None, None, {}
            self._pid = os.getpid()
            self._channel = f"cxr:done:{uuid.uuid4().hex}"
        if self._client is None:
            self._client = aioredis.Redis.from_url(self.redis_url, health_check_interval=30)
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen(), name="replies")

    async def _listen(self) -> None:
        assert self._client is not None
        while True:
            try:
                async with self._client.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(scripts.DONE, self._channel)
                    await self._resolve(list(self._waiting))  # announced before the subscription
                    await self._follow(pubsub)
            except (RedisError, OSError) as exc:
                name = type(exc).__name__
                log.warning("replies: Redis failed (%s); subscribing again in %g s", name, RETRY_S)
                await asyncio.sleep(RETRY_S)
            except asyncio.CancelledError:
                raise
            except Exception:  # the listener must outlive any one bad message
                log.exception("replies: the listener failed; going on")
                await asyncio.sleep(RETRY_S)

    async def _follow(self, pubsub: Any) -> None:
        next_sweep = time.monotonic() + self.sweep_s
        while True:
            message = await pubsub.get_message(timeout=self.sweep_s)
            done: list[str] = []
            while message is not None:
                if message.get("type") == "message":
                    head, _, rest = bytes(message["data"]).partition(b"\n")
                    job_id = head.decode()
                    if job_id in self._waiting:
                        status, _, outcome = rest.partition(b"\n")
                        if status in (b"done", b"failed"):  # announced with its outcome
                            self._answer(job_id, json.loads(outcome))
                        else:
                            done.append(job_id)
                message = await pubsub.get_message(timeout=0.0)
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + self.sweep_s
                done = list(self._waiting)
            if done:
                await self._resolve(done)

    async def _resolve(self, job_ids: Iterable[str]) -> None:
        """Hand the outcome of each finished job among ``job_ids`` to the requests awaiting it."""
        ids = [j for j in dict.fromkeys(job_ids) if j in self._waiting]
        if not ids or self._client is None:
            return
        async with self._client.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hmget(job_key(job_id), "status", "outcome")
            rows = await pipe.execute()
        for job_id, (status, outcome) in zip(ids, rows, strict=True):
            if status is None:
                body = VANISHED
            elif status in (b"done", b"failed") and outcome is not None:
                body = json.loads(outcome)
            else:
                continue
            self._answer(job_id, body)

    def _answer(self, job_id: str, body: dict[str, Any]) -> None:
        for future in self._waiting.pop(job_id, []):
            if not future.done():
                future.set_result(body)

    def _forget(self, job_id: str, future: asyncio.Future[dict[str, Any]]) -> None:
        futures = self._waiting.get(job_id)
        if futures and future in futures:
            futures.remove(future)
            if not futures:
                del self._waiting[job_id]
