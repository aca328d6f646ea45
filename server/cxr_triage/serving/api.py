"""The LitServe API: engines live here, one per served model version, built in ``setup``.

Per LitServe's contract the API object is pickled into each inference worker, so ``__init__``
holds configuration only and ``setup`` loads the repository and engines in the worker. Which
versions serve, and their swap when serving.json changes, is ``serving.versions``.
"""

import functools
import logging
import math
import os
import signal
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from multiprocessing.synchronize import Event
from typing import Any

# No `from __future__ import annotations` here: LitServe reads decode_request's annotation at
# run time to build its route (which the app then replaces), and a string annotation breaks it.
import litserve as ls
import numpy as np
from fastapi import Request

from cxr_triage.config import Settings, litserve_worker_id
from cxr_triage.engines import accelerated
from cxr_triage.errors import CxrError, NotReady
from cxr_triage.imaging import to_batch
from cxr_triage.observability import metrics, tracing
from cxr_triage.observability.logging import configure as configure_logging
from cxr_triage.queue import Completion, JobQueue, LeasedJob, RedisHandle
from cxr_triage.queue.findings import FindingStore
from cxr_triage.repository import BatchingSpec, ModelRepository
from cxr_triage.serving.lifecycle import die_with_parent, name_process, worker_name
from cxr_triage.serving.loop import TriageLoop
from cxr_triage.serving.versions import LoadedModel, Route, ServedVersions
from cxr_triage.serving.yielding import scoring, start_yielding, uninterrupted
from cxr_triage.triage import abnormality_score, findings_out, score_findings, triage_class
from cxr_triage.triage.worklist import UNSCORED_PLACE, place_of, place_reason

log = logging.getLogger(__name__)
Outcome = dict[str, Any] | CxrError
URGENT_CLASSES = ("stat", "urgent")  # the urgent lane's work, which routine work yields to


class TriageAPI(ls.LitAPI):
    """Leases batches from the Redis queue, scores them, stores outcomes; see TriageLoop."""

    def __init__(
        self,
        settings: Settings,
        served: Mapping[str, str],
        batching: BatchingSpec,
        fallback: ModelRepository | None = None,
        drain: Event | None = None,
        lane_busy: Event | None = None,
    ) -> None:
        """``served``: model name -> the version the HTTP process validated at start-up; with
        ``fallback`` (the repository it validated) what a worker falls back to when serving.json
        names a version that does not load (see ServedVersions). ``drain``: set when the
        replica drains; the worker then leases no new job (see serving.lifecycle). ``lane_busy``:
        up while the urgent lane scores; routine workers then stop their engine runs (see
        serving.yielding)."""
        max_batch = batching.max_batch_size
        if not accelerated(settings.backend):
            # A CPU engine's time per image is flat (or worse) past a batch of 2, and a stat
            # job waits for the batch in progress: small batches, side by side in workers.
            max_batch = min(max_batch, settings.cpu_max_batch_size)
        super().__init__(
            max_batch_size=max_batch,
            batch_timeout=batching.batch_timeout_ms / 1000.0,
            api_path="/v1/predict",
            loop=TriageLoop(),
        )
        self.settings = settings
        self.served = dict(served)
        self.fallback = fallback
        self.drain = drain
        self.lane_busy = lane_busy
        self.versions: ServedVersions | None = None
        self._first_ready: float | None = None
        self._heatmaps: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}  # job id -> (model input, CAMs)
        self._next_reap = 0.0
        self.horizon_s: float | None = None  # set in the urgent lane's worker (_take_role)
        self.lone_horizon_s: float | None = None  # the lane's, with CXR_LANE_SCORES_LONE
        self._lane_take: tuple[int, float] | None = None  # what the lane leases next (batch_wait)
        self._engine_clock: Callable[[], float] = time.process_time  # setup picks the thread's clock

    @property
    def routes(self) -> dict[str, Route]:
        """The versions scoring each served model's jobs (empty before ``setup``)."""
        return self.versions.routes if self.versions is not None else {}

    @property
    def models(self) -> dict[str, LoadedModel]:
        """The default (promoted) version of each served model."""
        return {name: route.default for name, route in self.routes.items()}

    def _take_role(self) -> None:
        """The last LitServe worker is the urgent lane (when CXR_URGENT_LANE): it leases only
        jobs due within the urgent class's max wait, at once, keeps the default OS priority
        and runs its engines on every core (with CXR_LANE_SCORES_LONE it also scores a lone
        routine job, see ``JobQueue.lane_work``); the others score everything at
        ``routine_nice``, so that while they keep the cores busy the lane's stat study, and the
        HTTP and decoding processes, get the cores as soon as they need them. LitServe names
        the worker in LITSERVE_WORKER_ID before ``setup``."""
        s = self.settings
        if s.urgent_lane and litserve_worker_id() == str(s.inference_workers):
            self.horizon_s = s.max_wait_s["urgent"]
            self.lone_horizon_s = s.max_wait_s["routine"] if s.lane_scores_lone else None
            # Nearly alone on the engines' cores when it runs (the others are niced): all of them.
            cores = s.inference_workers * s.intra_op_threads
            self.settings = s.model_copy(update={"intra_op_threads": cores})
        elif s.routine_nice:
            os.nice(s.routine_nice)

    def setup(self, device: str) -> None:
        configure_logging(self.settings.log_level)  # a spawned worker starts with no logging set up
        # The replica's main process decides when this worker stops (a drain ends with LitServe's
        # stop message), and if the main process is killed, so is this worker: no orphan scores.
        die_with_parent(signal.SIGKILL)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        tracing.setup_tracing(self.settings, "inference-worker")
        self._take_role()
        name_process("worker" if self.horizon_s is None else "lane")
        if self.lane_busy is not None and self.horizon_s is None:
            start_yielding(self.lane_busy)
        self.versions = ServedVersions(self.settings, self.served, self.fallback)
        self.versions.start()
        if not self.settings.redis_url:
            raise NotReady("no Redis URL: build_service sets it before workers start")
        client = RedisHandle(self.settings.redis_url).client()
        self.queue = JobQueue(client, self.settings.max_wait_s, self.settings.backfill_batch)
        self.added = FindingStore(client)
        self.worker = worker_name(self.settings.replica, os.getpid())
        # CPU time of engine runs: a single-threaded engine runs in this thread; with more, the
        # engine's own threads count too (so does this process's other threads' brief work).
        self._engine_clock = time.thread_time if self.settings.intra_op_threads == 1 else time.process_time
        if self.horizon_s is not None:
            self.worker += "/urgent"
            log.info("worker %s is the urgent lane (jobs due within %.0f s)", self.worker, self.horizon_s)

    # LitAPI requires these three; none is called: the app serves /v1/predict itself
    # (routes.build_predict_router) and TriageLoop scores through run_batch.
    def decode_request(self, request: Request) -> Any:
        raise NotImplementedError("requests are queued in Redis by the HTTP process")

    def encode_response(self, output: Any) -> Any:
        raise NotImplementedError("outcomes are built in score_batch")

    def predict(self, x: Any) -> Any:
        raise NotImplementedError("TriageLoop scores through run_batch")

    # --- the loop's hooks ---------------------------------------------------------------------

    def batch_wait(self) -> float | None:
        """None: nothing queued. 0: lease a batch now. >0: seconds left in the batch window."""
        if self.drain is not None and self.drain.is_set():
            ready = 0
        elif self.horizon_s is not None:  # the lane: a stat study does not wait for a batch
            self._lane_take = self.queue.lane_work(self.horizon_s, self.lone_horizon_s)
            return None if self._lane_take is None else 0.0
        else:
            ready = self.queue.poll(self.worker)
        if ready == 0:
            self._first_ready = None
            return None
        now = time.monotonic()
        if self._first_ready is None:
            self._first_ready = now
        if ready >= self.max_batch_size:
            return 0.0
        return max(0.0, self._first_ready + self.batch_timeout - now)

    def wakes_for(self, priority: str, lone: bool = False) -> bool:
        """Whether a job queued at ``priority`` ('' = re-queued, unknown) is this worker's to
        look at now: the lane looks at stat and urgent jobs, and at a routine one announced
        ``lone`` when it scores lone jobs (others when due, on its own idle looks at Redis).
        Under load no job arrives lone, so the lane sleeps through the routine stream."""
        lone_job = lone and self.lone_horizon_s is not None and priority == "routine"
        return self.horizon_s is None or lone_job or priority in (*URGENT_CLASSES, "")

    def run_batch(self) -> list[tuple[str, dict[str, Any]]]:
        """Lease, score and store one batch; returns the outcomes this worker stored."""
        self._first_ready = None
        most, horizon = self.max_batch_size, self.horizon_s
        if self._lane_take is not None:  # the lane: due jobs, or a lone one
            (due, horizon), self._lane_take = self._lane_take, None
            most = min(most, due)
        jobs = self.queue.lease(most, self.worker, self.settings.lease_s, horizon_s=horizon)
        scored_from = time.time()
        urgent = any(job.fields.get("priority") in URGENT_CLASSES for job in jobs)
        with scoring(self.lane_busy, lane=self.horizon_s is not None, urgent=urgent):
            outcomes = self.score_batch(jobs)
        scored_to = time.time()
        done = [self._completion(job, outcome) for job, outcome in zip(jobs, outcomes, strict=True)]
        stored = self.queue.complete_all(done)  # the whole batch in one step
        stored_at = time.time()
        for c, ok in zip(done, stored, strict=True):
            parent = tracing.context_of(c.job.fields)
            leased = float(c.job.fields.get("leased_at", scored_from))
            enqueued = float(c.job.fields.get("enqueued_at", leased))
            priority = c.job.fields.get("priority", "")
            tracing.record_span("queue wait", parent, enqueued, leased, priority=priority)
            model, batch = c.job.model, len(jobs)
            tracing.record_span("inference", parent, scored_from, scored_to, model=model, batch=batch)
            tracing.record_span("postprocess", parent, scored_to, stored_at, stored=ok)
            if ok:
                metrics.JOBS_SCORED.labels(c.job.model, "failed" if c.failed else "done").inc()
        return [(c.job.job_id, dict(c.outcome)) for c, ok in zip(done, stored, strict=True) if ok]

    def _completion(self, job: LeasedJob, outcome: Outcome) -> Completion:
        """One job's outcome as stored, with its study's worklist place; its heatmap is stored
        now (before COMPLETE hands the study on)."""
        failed = not isinstance(outcome, dict)
        if isinstance(outcome, dict):
            body = outcome
        else:
            body = {"error": {**outcome.to_dict(), "status": outcome.status}}
        place = UNSCORED_PLACE if failed else place_of(body)
        reason = f"unscored: {body['error']['message']}" if failed else place_reason(body)
        if not math.isfinite(place):  # never let a NaN reach Redis
            place, reason = UNSCORED_PLACE, "unscored: the model gave no finite score"
        heatmap = self._heatmaps.pop(job.job_id, None)
        if heatmap is not None and not failed:
            self.queue.store_heatmap(job.job_id, *heatmap)
        return Completion(job, body, failed, place, reason)

    def reap_if_due(self) -> None:
        """Upkeep between batches: pick up a changed serving.json, re-deliver expired leases."""
        if self.versions is not None:
            self.versions.reload_if_changed()
        now = time.monotonic()
        if now < self._next_reap:
            return
        self._next_reap = now + min(1.0, self.settings.lease_s / 4)
        requeued, failed = self.queue.reap(
            self.settings.max_attempts, UNSCORED_PLACE, "unscored: worker lost"
        )
        if requeued or failed:
            metrics.JOBS_REDELIVERED.inc(requeued)
            log.warning("re-delivered %d jobs whose lease expired; failed %d", requeued, failed)

    # --- scoring ------------------------------------------------------------------------------

    def score_batch(self, jobs: Sequence[LeasedJob]) -> list[Outcome]:
        """Score leased jobs: one engine call per model version; a failing input fails alone.

        Each job goes to its model's default version or, during a canary, to the canary when
        ``goes_to_canary`` says so. Returns one outcome per job, in order: the API.md
        response dict (naming the version that made it), or its CxrError.
        """
        groups: dict[tuple[str, str], list[int]] = defaultdict(list)
        chosen: dict[tuple[str, str], LoadedModel | None] = {}
        for i, job in enumerate(jobs):
            route = self.routes.get(job.model)
            model = route.pick(job.job_id) if route is not None else None
            key = model.key if model is not None else (job.model, "")
            chosen[key] = model
            groups[key].append(i)
        outcomes: dict[int, Outcome] = {}
        for key, idx in groups.items():
            group = [jobs[i] for i in idx]
            outcomes.update(zip(idx, self._score_group(key[0], chosen[key], group), strict=True))
        return [outcomes[i] for i in range(len(jobs))]

    def _score_group(self, name: str, model: LoadedModel | None, jobs: list[LeasedJob]) -> list[Outcome]:
        if model is None:
            return [NotReady(f"model {name} is not loaded by this worker") for _ in jobs]
        if model.zero_shot:  # outside the bisection: a Redis error is the loop's, not the images'
            self._refresh_added(model)
        try:
            probs, infer_s = self._run(model, jobs)
        except Exception:  # bisect: find the input that breaks the engine, score the others
            if len(jobs) == 1:
                log.exception("engine failed on job %s", jobs[0].job_id)
                return [CxrError("the engine failed on this image; it is logged with the job id")]
            return [o for job in jobs for o in self._score_group(name, model, [job])]
        n = len(jobs)
        return [self._safe_result(model, job, p, infer_s, n) for job, p in zip(jobs, probs, strict=True)]

    def _safe_result(self, model: LoadedModel, job: LeasedJob, probs: Any, infer_s: float, n: int) -> Outcome:
        try:
            return self._result(model, job, probs, infer_s, n)
        except (ValueError, KeyError, TypeError) as exc:
            log.exception("could not build the result of job %s", job.job_id)
            return CxrError(f"the result could not be built ({type(exc).__name__}); it is logged")

    def _refresh_added(self, model: LoadedModel) -> None:
        """A zero-shot version scores the findings added to it up to now (one Redis GET per
        batch; the findings themselves are read again only when they changed)."""
        revision = self.added.revision()
        if revision != model.added_revision:
            name, version = model.key
            model.set_added(self.added.list(name, version), revision)

    def _run(self, model: LoadedModel, jobs: list[LeasedJob]) -> tuple[Any, float]:
        if any(job.input is None for job in jobs):
            raise ValueError("a job's payload is missing")
        tensor = to_batch(
            [job.input.pixels for job in jobs if job.input is not None], model.entry.config.input
        )
        # The urgent lane may pause the run (serving.yielding): it runs again, and is timed, whole.
        cpu = self._engine_clock()
        probs, cams, elapsed = uninterrupted(functools.partial(_timed_run, model, tensor))
        ref = model.ref
        metrics.ENGINE_CPU_SECONDS.labels(ref["name"], ref["version"], ref["backend"]).inc(
            self._engine_clock() - cpu
        )
        expected = (len(jobs), len(model.labels))
        if probs.shape != expected or not np.all(np.isfinite(probs)) or probs.min() < 0 or probs.max() > 1:
            raise ValueError(f"engine output {probs.shape} is not {expected} probabilities in 0-1")
        metrics.BATCH_SIZE.labels(ref["name"]).observe(len(jobs))
        metrics.INFERENCE_SECONDS.labels(ref["name"], ref["version"], ref["backend"]).observe(elapsed)
        for i, job in enumerate(jobs):  # studies keep what the model saw (and its CAMs, if any)
            if job.fields.get("track") == "1" and job.input is not None:
                self._heatmaps[job.job_id] = (job.input.pixels, None if cams is None else cams[i])
        return probs, elapsed

    def _result(
        self, model: LoadedModel, job: LeasedJob, probs: Any, infer_s: float, batch: int
    ) -> dict[str, Any]:
        config = model.entry.config
        findings = score_findings(model.labels, probs, model.thresholds, model.unseen)
        queue_s = max(0.0, float(job.fields["leased_at"]) - float(job.fields["enqueued_at"]))
        metrics.QUEUE_WAIT_SECONDS.labels(job.fields["priority"]).observe(queue_s)
        warnings = [*model.warnings, *(job.input.warnings if job.input else [])]
        return {
            "request_id": job.fields["request_id"],
            "job_id": job.job_id,
            "model": dict(model.ref),
            "findings": findings_out(findings, config.critical_findings),
            "abnormality_score": abnormality_score(findings),
            "triage": triage_class(findings, config.critical_findings),
            "priority": job.fields["priority"],
            "warnings": warnings,
            "timing_ms": {
                "queue": round(queue_s * 1000.0, 3),
                "preprocess": round(job.input.decode_ms if job.input else 0.0, 3),
                "inference": round(infer_s * 1000.0, 3),
            },
            "batch_size": batch,
            "replica": self.settings.replica,
        }


def _timed_run(model: LoadedModel, tensor: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, float]:
    t0 = time.perf_counter()
    probs, cams = model.run(tensor)
    return probs, cams, time.perf_counter() - t0
