"""The job queue: submit, lease in priority order, complete, re-deliver expired leases.

Ordering is earliest deadline first: a job's deadline is its arrival time plus its class's
maximum wait (``Settings.max_wait_s``: stat 0 s … backfill the longest). That is a priority
that rises with waiting time: a backfill job that has waited its maximum ranks ahead of every
stat job that arrives after that, so no class starves under a stream of another.

Delivery is at least once, results exactly once: a leased job carries a token (its attempt
number); a result is stored only while that token still holds the lease, so a worker that
comes back after its lease expired and the job was re-delivered cannot store a second result.
"""

import contextlib
import io
import json
import struct
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis
from redis.client import PubSub

from cxr_triage.errors import Overloaded
from cxr_triage.imaging import ModelInput
from cxr_triage.queue import payload, scripts
from cxr_triage.schemas import PRIORITIES, Priority

QUEUE, LEASES, STATS = b"cxr:queue", b"cxr:leases", b"cxr:stats"
IDLE_WINDOW_S = 1.0  # a worker that polled an empty queue this recently counts as idle


@dataclass(frozen=True)
class NewJob:
    model: str
    priority: Priority
    input: ModelInput
    request_id: str
    study_uid: str = ""
    instance_uid: str = ""
    track: bool = False  # an asynchronous study: it goes on the worklist
    header: bytes = b""  # DICOM source header without pixel data (for the SR); may hold PHI


def overloaded(max_ready: int | None) -> Overloaded:
    return Overloaded(f"{max_ready} jobs are queued; retry shortly (Retry-After)")


@dataclass(frozen=True)
class SubmitResult:
    job_id: str
    duplicate: bool


@dataclass(frozen=True)
class LeasedJob:
    job_id: str
    token: int
    input: ModelInput | None  # None when the payload is gone (should not happen; fails the job)
    fields: dict[str, str]

    @property
    def model(self) -> str:
        return self.fields["model"]


@dataclass(frozen=True)
class Completion:
    """A leased job's outcome, for ``JobQueue.complete_all``."""

    job: LeasedJob
    outcome: Mapping[str, Any]
    failed: bool
    place: float  # the study's worklist place this outcome raises it to
    reason: str


def _text(fields: Mapping[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode(errors="replace") for k, v in fields.items() if k != b"payload"}


def _payload(blob: bytes | None) -> ModelInput | None:
    """The job's model input; None when missing or unreadable (that job then fails alone)."""
    try:
        return payload.loads(blob) if blob else None
    except (ValueError, KeyError, TypeError, struct.error):
        return None


def job_key(job_id: str) -> str:
    """The Redis hash of one job (status, outcome json, …)."""
    return f"cxr:job:{job_id}"


@dataclass(frozen=True)
class Event:
    """One announcement on the events channel: ``new`` (arg: the priority, '' for re-queued
    jobs; ``lone``: it was the only job queued while none was leased)."""

    kind: str
    arg: str
    lone: bool = False


class JobEvents:
    """A subscription to the queue's announcements (see ``scripts``), for one thread.

    Subscribes on first use and again after a Redis error (announcements made meanwhile are
    lost: callers keep a slow look at Redis for that).
    """

    def __init__(self, client: redis.Redis, channels: Sequence[bytes]) -> None:
        self._client = client
        self._channels = list(channels)
        self._pubsub: PubSub | None = None

    def next(self, timeout: float) -> Event | None:
        """The next announcement, waiting up to ``timeout`` seconds; None when none came."""
        if self._pubsub is None:
            pubsub = self._client.pubsub()
            pubsub.subscribe(*self._channels)
            self._pubsub = pubsub
        deadline = time.monotonic() + timeout
        try:
            while True:  # past the subscriptions' confirmations (one per channel)
                message = self._pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
                if message is None:
                    return None
                if message.get("type") == "message":
                    break
        except redis.RedisError:
            self.close()
            raise
        kind, arg, *flags = [*bytes(message["data"]).decode().split(" "), ""]
        return Event(kind, arg, lone="lone" in flags)

    def close(self) -> None:
        if self._pubsub is not None:
            pubsub, self._pubsub = self._pubsub, None
            with contextlib.suppress(redis.RedisError, OSError):
                pubsub.close()


class JobQueue:
    def __init__(self, client: redis.Redis, max_wait_s: Mapping[str, float], backfill_batch: int = 2) -> None:
        """``backfill_batch``: most backfill jobs in one leased batch (live jobs wait less)."""
        self.r = client
        self.max_wait_s = dict(max_wait_s)
        self.backfill_batch = backfill_batch
        self._submit = client.register_script(scripts.SUBMIT)
        self._lease = client.register_script(scripts.LEASE)
        self._complete = client.register_script(scripts.COMPLETE)
        self._reap = client.register_script(scripts.REAP)
        self._release = client.register_script(scripts.RELEASE)
        self._poll = client.register_script(scripts.POLL)

    def submit(
        self,
        job: NewJob,
        now: float | None = None,
        trace: Mapping[str, str] | None = None,
        max_ready: int | None = None,
        reply_to: str = "",
    ) -> SubmitResult:
        """Queue a job (atomically with its study and worklist entry). A repeated instance UID
        for the same model returns the first job instead. ``reply_to``: the channel on which the
        job's outcome is announced, for the HTTP process whose request waits for it
        (``serving.replies``; '' = the shared ``cxr:done``).

        Raises:
            Overloaded: ``max_ready`` jobs or more are ready already (None: no bound).
        """
        now = time.time() if now is None else now
        job_id = uuid.uuid4().hex
        deadline = now + self.max_wait_s[job.priority]
        instance_key = f"cxr:instance:{job.model}:{job.instance_uid}" if job.instance_uid else ""
        fields = {
            "job_id": job_id,
            "model": job.model,
            "priority": job.priority,
            "request_id": job.request_id,
            "instance_uid": job.instance_uid,
            **(trace or {}),  # W3C traceparent: the worker continues the request's trace
        }
        argv: list[Any] = [job_id, deadline, now, payload.dumps(job.input), instance_key, job.study_uid]
        argv += ["1" if job.track else "0", PRIORITIES.index(job.priority), job.header]
        argv += ["" if max_ready is None else max_ready, reply_to] + [x for kv in fields.items() for x in kv]
        created, existing = self._submit(args=argv)
        if created < 0:
            raise overloaded(max_ready)
        return SubmitResult(job_id=existing.decode(), duplicate=not created)

    def check_room(self, max_ready: int | None) -> None:
        """Raise Overloaded when ``max_ready`` jobs or more are ready (None: no bound): what a
        caller asks before costly work on a job that ``submit`` would then refuse."""
        if max_ready is not None and self.ready() >= max_ready:
            raise overloaded(max_ready)

    def lease(
        self, n: int, worker: str, lease_s: float, now: float | None = None, horizon_s: float | None = None
    ) -> list[LeasedJob]:
        """Take up to ``n`` jobs, earliest deadline first, leased for ``lease_s`` seconds.
        ``horizon_s``: only jobs due within that many seconds (the urgent lane; see ``lane_work``)."""
        now = time.time() if now is None else now
        horizon = "" if horizon_s is None else repr(now + horizon_s)
        rows = self._lease(args=[n, now, lease_s, worker, IDLE_WINDOW_S, self.backfill_batch, horizon])
        out = []
        for job_id, token, blob, flat in rows:
            fields = dict(zip(flat[::2], flat[1::2], strict=True))
            out.append(LeasedJob(job_id.decode(), int(token), _payload(blob), _text(fields)))
        return out

    def complete(
        self, job: LeasedJob, outcome: Mapping[str, Any], failed: bool, place: float, reason: str
    ) -> bool:
        """Store a job's outcome and raise its study's worklist place. False: the lease was stale."""
        return self.complete_all([Completion(job, outcome, failed, place, reason)])[0]

    def complete_all(self, done: Sequence["Completion"]) -> list[bool]:
        """``complete`` for a batch's jobs in one step (one round trip); per job, False: stale."""
        if not done:
            return []
        now = time.time()
        args: list[Any] = []
        for c in done:
            status = "failed" if c.failed else "done"
            args += [c.job.job_id, c.job.token, status, json.dumps(c.outcome), now, c.place, c.reason]
        return [bool(x) for x in self._complete(args=args)]

    def reap(self, max_attempts: int, place: float, reason: str, now: float | None = None) -> tuple[int, int]:
        """Re-queue expired leases; fail jobs that used up ``max_attempts``. Returns (requeued, failed)."""
        now = time.time() if now is None else now
        outcome = json.dumps(
            {"error": {"code": "worker_lost", "message": f"scoring was interrupted {max_attempts} times"}}
        )
        requeued, failed = self._reap(args=[now, max_attempts, outcome, place, reason])
        return int(requeued), int(failed)

    def held_by(self, worker_prefix: str) -> int:
        """Jobs leased now by workers whose name starts with ``worker_prefix`` (one replica)."""
        ids = self.r.zrange(LEASES, 0, -1)
        if not ids:
            return 0
        pipe = self.r.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(job_key(job_id.decode()), "worker")
        prefix = worker_prefix.encode()
        return sum(1 for w in pipe.execute() if w is not None and w.startswith(prefix))

    def release(self, worker_prefix: str) -> int:
        """Put the leases of workers named ``worker_prefix``… back on the queue (a drain)."""
        return int(self._release(args=[worker_prefix, time.time()]))

    def headers(self, job_ids: Sequence[str]) -> list[bytes | None]:
        """Stored DICOM source headers (None for non-DICOM jobs)."""
        return list(self.r.mget([f"cxr:header:{j}" for j in job_ids])) if job_ids else []

    def store_heatmap(self, job_id: str, image: np.ndarray, cam: np.ndarray | None) -> None:
        """Keep a scored image's model input (8-bit) and its CAMs (labels, h, w) when the engine
        has them: the page's preview, heatmap overlays and the feedback export's images."""
        buf = io.BytesIO()
        eight_bit = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        arrays = {"image": eight_bit} | ({} if cam is None else {"cam": cam.astype(np.float16)})
        np.savez_compressed(buf, **arrays)
        self.r.set(f"cxr:heatmap:{job_id}", buf.getvalue())

    def heatmap(self, job_id: str) -> tuple[np.ndarray, np.ndarray | None] | None:
        """(8-bit model input, CAMs as float32 or None without a heatmap output), or None."""
        blob = self.r.get(f"cxr:heatmap:{job_id}")
        if blob is None:
            return None
        with np.load(io.BytesIO(blob)) as data:
            return data["image"], data["cam"].astype(np.float32) if "cam" in data.files else None

    def events(self, urgent_only: bool = False) -> JobEvents:
        """A new subscription to the queue's announcements (one per thread that reads them);
        ``urgent_only``: those of stat, urgent and lone jobs and re-queued ones (the urgent lane)."""
        channels = [scripts.URGENT_EVENTS] if urgent_only else [scripts.EVENTS, scripts.URGENT_EVENTS]
        return JobEvents(self.r, channels)

    def ready(self) -> int:
        return int(self.r.zcard(QUEUE))

    def poll(self, worker: str, now: float | None = None) -> int:
        """Jobs ready; when none, ``worker`` is marked idle (it then gets a share of the next ones)."""
        return int(self._poll(args=[worker, time.time() if now is None else now]))

    def lane_work(
        self, horizon_s: float, lone_horizon_s: float | None = None, now: float | None = None
    ) -> tuple[int, float] | None:
        """What the urgent lane leases now, as (most jobs, horizon for ``lease``): the jobs due
        within ``horizon_s`` (with the urgent class's max wait: stat and urgent jobs, and any
        job that has nearly used up its own); else, with ``lone_horizon_s``, a lone job due
        within that: the only job queued while none is leased (by any worker on this Redis), a
        study arriving at a quiet moment. None: nothing is the lane's."""
        now = time.time() if now is None else now
        pipe = self.r.pipeline(transaction=False)
        pipe.zcount(QUEUE, "-inf", now + horizon_s)
        if lone_horizon_s is not None:
            pipe.zcard(QUEUE)
            pipe.zcard(LEASES)
            pipe.zcount(QUEUE, "-inf", now + lone_horizon_s)
        counts = [int(c) for c in pipe.execute()]
        if counts[0]:
            return counts[0], horizon_s
        if lone_horizon_s is not None and counts[1:] == [1, 0, 1]:
            return 1, lone_horizon_s
        return None

    def depth_by_priority(self) -> dict[str, int]:
        ids = self.r.zrange(QUEUE, 0, -1)
        pipe = self.r.pipeline(transaction=False)
        for job_id in ids:
            pipe.hget(job_key(job_id.decode()), "priority")
        counts: dict[str, int] = dict.fromkeys(PRIORITIES, 0)
        for p in pipe.execute():
            if p is not None:
                counts[p.decode()] = counts.get(p.decode(), 0) + 1
        return counts

    def jobs(self, job_ids: Sequence[str]) -> list[dict[str, str]]:
        """Each job's hash (status, outcome json, …); {} for an unknown id."""
        pipe = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(job_key(job_id))
        return [_text(h) for h in pipe.execute()]

    def statuses(self, job_ids: Sequence[str]) -> list[str | None]:
        pipe = self.r.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hget(job_key(job_id), "status")
        return [s.decode() if s else None for s in pipe.execute()]

    def redelivered(self) -> int:
        return int(self.r.hget(STATS, "redelivered") or 0)
