"""The inference worker's batch scoring, in process: one engine call per batch, failures isolated."""

import asyncio
import functools
import json
import logging
import multiprocessing
import queue
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import redis
from litserve.loops.base import _SENTINEL_VALUE
from prometheus_client import REGISTRY

from cxr_triage.config import Settings
from cxr_triage.engines.onnx import Preempted, resume_runs
from cxr_triage.errors import CxrError, TimedOut
from cxr_triage.imaging import ModelInput
from cxr_triage.queue import JobQueue, NewJob, scripts
from cxr_triage.repository import BatchingSpec
from cxr_triage.schemas import Priority
from cxr_triage.serving import yielding
from cxr_triage.serving.api import TriageAPI
from cxr_triage.serving.lifecycle import ManagerGone
from cxr_triage.serving.loop import TriageLoop
from cxr_triage.serving.replies import Replies
from cxr_triage.serving.versions import warm_up
from cxr_triage.serving.yielding import MAX_PAUSE_S, uninterrupted


def submit(q: JobQueue, pixels: np.ndarray, rid: str, priority: Priority = "routine") -> str:
    item = ModelInput(pixels=pixels, source="png", warnings=[], decode_ms=1.0)
    return q.submit(NewJob("densenet121-nih14", priority, item, rid)).job_id


def worker_api(repo: Path, redis_url: str) -> tuple[redis.Redis, TriageAPI]:
    """An emptied Redis and a set-up inference worker's API at batch ≤ 2."""
    r = redis.Redis.from_url(redis_url)
    r.flushall()
    settings = Settings(model_repo=repo, redis_url=redis_url, routine_nice=0)
    api = TriageAPI(settings, {"densenet121-nih14": "1"}, BatchingSpec(max_batch_size=2))
    api.setup("cpu")
    return r, api


def test_batch_is_one_engine_call_and_a_malformed_input_fails_alone(
    exported_repo: Path, embedded_redis: str
) -> None:
    redis.Redis.from_url(embedded_redis).flushall()
    settings = Settings(
        model_repo=exported_repo, redis_url=embedded_redis, cpu_max_batch_size=8, routine_nice=0
    )
    api = TriageAPI(settings, {"densenet121-nih14": "1"}, BatchingSpec(max_batch_size=8))
    api.setup("cpu")
    calls: list[int] = []
    engine = api.models["densenet121-nih14"].engine
    original = engine.run_with_heatmaps

    def counting_run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        calls.append(len(batch))
        return original(batch)

    engine.run_with_heatmaps = counting_run  # type: ignore[method-assign]
    good = np.random.default_rng(0).random((64, 64), dtype=np.float32)
    for rid in "abc":
        submit(api.queue, good, rid)
    stored = api.run_batch()
    assert calls == [3] and [o["request_id"] for _, o in stored] == ["a", "b", "c"]
    assert all(o["batch_size"] == 3 for _, o in stored)

    calls.clear()
    for rid, pixels in (("a", good), ("bad", np.zeros((32, 48), dtype=np.float32)), ("c", good)):
        submit(api.queue, pixels, rid)
    outcomes = api.score_batch(api.queue.lease(8, "test", 30))
    assert isinstance(outcomes[1], CxrError) and outcomes[1].status == 500
    first, third = outcomes[0], outcomes[2]
    assert isinstance(first, dict) and isinstance(third, dict)
    assert first["request_id"] == "a" and third["request_id"] == "c"
    assert first["findings"] == third["findings"], "same input, same scores"


def test_the_urgent_lane_scores_only_jobs_due_within_the_urgent_wait(
    exported_repo: Path, embedded_redis: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    redis.Redis.from_url(embedded_redis).flushall()
    settings = Settings(model_repo=exported_repo, redis_url=embedded_redis, inference_workers=1)
    monkeypatch.setenv("LITSERVE_WORKER_ID", "1")  # workers 0..inference_workers-1, then the lane
    lane = TriageAPI(settings, {"densenet121-nih14": "1"}, BatchingSpec(max_batch_size=8))
    lane.setup("cpu")
    assert lane.horizon_s == settings.max_wait_s["urgent"] and lane.worker.endswith("/urgent")
    pixels = np.random.default_rng(1).random((64, 64), dtype=np.float32)
    routine = [submit(lane.queue, pixels, f"r{i}") for i in range(3)]
    assert lane.batch_wait() is None  # routine work is not the lane's
    item = ModelInput(pixels=pixels, source="png", warnings=[], decode_ms=1.0)
    stat = lane.queue.submit(NewJob("densenet121-nih14", "stat", item, "s")).job_id
    assert lane.batch_wait() == 0.0  # at once: no batch window
    assert [job_id for job_id, _ in lane.run_batch()] == [stat]
    assert lane.queue.statuses(routine) == ["queued"] * 3


def test_the_urgent_lane_scores_a_lone_routine_job_at_once_and_nothing_else_routine(
    exported_repo: Path, embedded_redis: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A quiet moment: the only job queued, none being scored, goes to the lane (every core, no
    batch window); two routine jobs, one queued beside a job in a worker, or a lone backfill job
    stay with the routine workers; CXR_LANE_SCORES_LONE=false keeps the lane to urgent work."""
    redis.Redis.from_url(embedded_redis).flushall()
    settings = Settings(model_repo=exported_repo, redis_url=embedded_redis, inference_workers=1)
    monkeypatch.setenv("LITSERVE_WORKER_ID", "1")
    lane = TriageAPI(settings, {"densenet121-nih14": "1"}, BatchingSpec(max_batch_size=8))
    lane.setup("cpu")
    assert lane.wakes_for("routine", lone=True) and not lane.wakes_for("backfill", lone=True)
    assert not lane.wakes_for("routine")  # a routine job announced beside others: not the lane's
    pixels = np.random.default_rng(3).random((64, 64), dtype=np.float32)
    assert lane.batch_wait() is None
    lone = submit(lane.queue, pixels, "lone")
    assert lane.batch_wait() == 0.0
    assert [job_id for job_id, _ in lane.run_batch()] == [lone]

    first, second = submit(lane.queue, pixels, "a"), submit(lane.queue, pixels, "b")
    assert lane.batch_wait() is None  # two waiting: the routine workers share them
    (leased,) = lane.queue.lease(1, "worker-0", 30)  # a routine worker scores one ...
    assert leased.job_id == first and lane.batch_wait() is None  # ... so the other is not lone
    lane.queue.complete(leased, {"ok": True}, False, 0.0, "")
    assert lane.batch_wait() == 0.0 and [j for j, _ in lane.run_batch()] == [second]

    backfill = submit(lane.queue, pixels, "archive", priority="backfill")
    assert lane.batch_wait() is None and lane.queue.statuses([backfill]) == ["queued"]

    redis.Redis.from_url(embedded_redis).flushall()
    off = TriageAPI(
        settings.model_copy(update={"lane_scores_lone": False}),
        {"densenet121-nih14": "1"},
        BatchingSpec(max_batch_size=8),
    )
    off.setup("cpu")
    assert off.lone_horizon_s is None and not off.wakes_for("routine", lone=True)
    submit(off.queue, pixels, "alone")
    assert off.batch_wait() is None


def test_a_request_gets_its_outcome_from_the_announcement_whichever_worker_scores_it(
    exported_repo: Path, embedded_redis: str
) -> None:
    """The HTTP side's wait (serving.replies) against a real worker loop: a job no worker takes
    times out (and stays queued); once the loop runs, the worker wakes for the queued job and
    the request is answered by the job's announcement, well before the slow look at Redis
    that covers lost ones; a repeated wait is answered at once; a failed job answers with its
    stored error; a job finished without an announcement is found by that slow look; and
    LitServe's stop message ends the loop."""
    r, api = worker_api(exported_repo, embedded_redis)
    pixels = np.random.default_rng(2).random((64, 64), dtype=np.float32)
    stop: queue.Queue[object] = queue.Queue()
    worker = threading.Thread(target=TriageLoop(), args=(api, "cpu", 0, stop, None, {}, None), daemon=True)

    async def scenario() -> None:
        slow = Replies(embedded_redis, sweep_s=30.0)  # only an announcement answers in time
        try:
            job_id = submit(api.queue, pixels, "first")
            with pytest.raises(TimedOut):
                await slow.wait(job_id, 0.3)
            assert api.queue.statuses([job_id]) == ["queued"] and slow.waiting() == 0
            worker.start()
            started = time.monotonic()
            outcome = await slow.wait(job_id, 20.0, look_first=False)  # as /v1/predict waits
            assert outcome["job_id"] == job_id and outcome["request_id"] == "first"
            assert time.monotonic() - started < 10.0
            again = await asyncio.wait_for(slow.wait(job_id, 20.0), 1.0)  # done already
            assert again == outcome

            broken = submit(api.queue, pixels, "broken")
            r.delete(f"cxr:payload:{broken}")  # its worker fails it alone
            with pytest.raises(CxrError) as failed:
                await slow.wait(broken, 20.0)
            assert failed.value.status == 500 and failed.value.code == "internal_error"
        finally:
            await slow.close()

        # Finished with no announcement (lost): the periodic look at Redis answers.
        quick = Replies(embedded_redis, sweep_s=0.2)
        lost = f"lost{time.time_ns()}"
        r.hset(f"cxr:job:{lost}", mapping={"status": "done", "outcome": json.dumps({"job_id": lost})})
        try:
            waiter = asyncio.create_task(quick.wait(lost, 5.0))
            await asyncio.sleep(0.05)
            assert (await asyncio.wait_for(waiter, 2.0)) == {"job_id": lost}
        finally:
            await quick.close()

    try:
        asyncio.run(scenario())
    finally:
        stop.put(_SENTINEL_VALUE)
        worker.join(10)
    assert not worker.is_alive(), "LitServe's stop message ends the worker"


def test_a_synchronous_job_is_announced_with_its_outcome_and_answered_from_the_announcement(
    exported_repo: Path, embedded_redis: str
) -> None:
    """COMPLETE publishes a synchronous job's id, status and outcome on cxr:done and a tracked
    study's job's id alone; the HTTP side answers a request from the announcement itself and
    looks up only an announcement without its outcome."""
    r, api = worker_api(exported_repo, embedded_redis)
    pixels = np.random.default_rng(4).random((64, 64), dtype=np.float32)
    pubsub = r.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(scripts.DONE)
    sync = submit(api.queue, pixels, "sync")
    item = ModelInput(pixels=pixels, source="png", warnings=[], decode_ms=1.0)
    tracked = api.queue.submit(
        NewJob("densenet121-nih14", "routine", item, "t", "1.2.3", "1.2.3.4", True)
    ).job_id
    stored = dict(api.run_batch())
    by_id: dict[str, bytes] = {}
    deadline = time.monotonic() + 10.0
    while len(by_id) < 2 and time.monotonic() < deadline:  # None for the subscription's reply
        if (m := pubsub.get_message(timeout=1.0)) is not None:
            by_id[m["data"].split(b"\n", 1)[0].decode()] = m["data"]
    head, status, outcome = by_id[sync].split(b"\n", 2)
    assert head == sync.encode()
    assert status == b"done" and json.loads(outcome) == stored[sync]
    assert by_id[tracked] == tracked.encode()
    pubsub.close()
    queued = submit(api.queue, pixels, "queued")

    async def scenario() -> None:
        replies = Replies(embedded_redis, sweep_s=30.0)  # no sweep in time: announcements only
        try:
            # still queued in Redis, announced with an outcome: the announcement answers
            waiter = asyncio.create_task(replies.wait(queued, 5.0, look_first=False))
            await asyncio.sleep(0.2)  # subscribed (and found it queued)
            announcement = f"{queued}\ndone\n" + json.dumps({"job_id": "as announced"})
            r.publish(scripts.DONE, announcement.encode())
            assert (await waiter) == {"job_id": "as announced"}
            # an id alone: the stored outcome is looked up
            waiter = asyncio.create_task(replies.wait(sync, 5.0, look_first=False))
            await asyncio.sleep(0.05)
            r.publish(scripts.DONE, sync)
            assert (await waiter) == stored[sync]
            failed = {"error": {"code": "worker_lost", "message": "gone", "status": 500}}
            waiter = asyncio.create_task(replies.wait("x" * 32, 5.0, look_first=False))
            await asyncio.sleep(0.05)
            r.publish(scripts.DONE, ("x" * 32 + "\nfailed\n" + json.dumps(failed)).encode())
            with pytest.raises(CxrError) as err:
                await waiter
            assert err.value.code == "worker_lost"
        finally:
            await replies.close()

    asyncio.run(scenario())


def test_a_routine_batch_stops_while_the_lane_scores_and_is_scored_whole_after(
    exported_repo: Path, embedded_redis: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The routine worker's engine run is interrupted while the lane's flag is up, runs again
    once it is down, and scores exactly what an uninterrupted run scores; stat jobs that the
    routine worker took go on beside the lane; a flag left up (a
    lane killed mid-batch) holds the worker back at most MAX_PAUSE_S."""
    redis.Redis.from_url(embedded_redis).flushall()
    settings = Settings(model_repo=exported_repo, redis_url=embedded_redis, routine_nice=0)
    busy = multiprocessing.get_context("spawn").Event()
    api = TriageAPI(settings, {"densenet121-nih14": "1"}, BatchingSpec(max_batch_size=2), lane_busy=busy)
    api.setup("cpu")  # a routine worker (no LITSERVE_WORKER_ID): it starts its yield thread
    pixels = np.random.default_rng(3).random((64, 64), dtype=np.float32)
    for rid in ("a", "b"):
        submit(api.queue, pixels, rid)
    reference = {o["request_id"]: o["findings"] for _, o in api.run_batch()}
    pauses = REGISTRY.get_sample_value("cxr_triage_lane_pauses_total") or 0.0

    def lane_runs_for(seconds: float) -> None:
        busy.set()
        time.sleep(seconds)
        busy.clear()

    try:
        for rid in ("a", "b"):
            submit(api.queue, pixels, rid)
        lane = threading.Thread(target=lane_runs_for, args=(0.4,))  # shorter than MAX_PAUSE_S
        lane.start()
        time.sleep(0.05)  # the flag is up when the routine run starts (and during it)
        started = time.monotonic()
        stored = api.run_batch()
        took = time.monotonic() - started
        lane.join()
        assert took >= 0.3, f"the routine batch finished in {took:.2f} s, beside the lane"
        assert {o["request_id"]: o["findings"] for _, o in stored} == reference
        assert (REGISTRY.get_sample_value("cxr_triage_lane_pauses_total") or 0.0) == pauses + 1

        # Stat jobs that a routine worker took (the lane was busy) go on beside the lane.
        monkeypatch.setattr(yielding, "MAX_PAUSE_S", 5.0)  # a pause would now be plain to see
        for rid in ("s1", "s2"):
            submit(api.queue, pixels, rid, priority="stat")
        lane = threading.Thread(target=lane_runs_for, args=(3.0,))
        lane.start()
        time.sleep(0.05)
        started = time.monotonic()
        stored = api.run_batch()
        took = time.monotonic() - started
        assert len(stored) == 2 and took < 1.5, f"a stat batch waited {took:.2f} s for the lane"
        lane.join()
        monkeypatch.undo()

        busy.set()  # never lowered: the worker goes on after MAX_PAUSE_S
        time.sleep(0.05)
        for rid in ("a", "b"):
            submit(api.queue, pixels, rid)
        started = time.monotonic()
        stored = api.run_batch()
        took = time.monotonic() - started
        assert len(stored) == 2 and took < MAX_PAUSE_S + 1.5, f"held back {took:.2f} s by a stuck flag"
        busy.clear()

        # A new version's warm-up (a hot reload) meeting the lane waits for it instead of failing.
        time.sleep(0.1)
        model = api.models["densenet121-nih14"]
        lane = threading.Thread(target=lane_runs_for, args=(0.3,))
        lane.start()
        time.sleep(0.05)
        with pytest.raises(Preempted):
            warm_up(model.engine, model.entry.config)
        uninterrupted(functools.partial(warm_up, model.engine, model.entry.config))
        lane.join()
    finally:
        busy.clear()
        resume_runs()


def test_litserve_monitor_losing_its_stopped_manager_is_one_info_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """LitServe's monitor polls an Event of its multiprocessing manager; once the manager has
    shut down, that poll fails as it does at the end of a replica's stop (a real manager here).
    Logged through LitServe's logger with ManagerGone on it: one INFO line, no traceback; any
    other failure of the monitor stays an ERROR with its traceback."""
    litserve_log = logging.getLogger("litserve.server")
    gone = ManagerGone()
    litserve_log.addFilter(gone)
    manager = multiprocessing.Manager()
    flag = manager.Event()
    assert not flag.is_set()  # connected, as the monitor is after its first look
    manager.shutdown()
    try:
        with caplog.at_level(logging.INFO, logger="litserve.server"):
            try:
                flag.is_set()
            except Exception:
                litserve_log.exception(ManagerGone.CRASHED)
            try:
                raise RuntimeError("a real bug")
            except RuntimeError:
                litserve_log.exception(ManagerGone.CRASHED)
    finally:
        litserve_log.removeFilter(gone)
    stopped, crashed = caplog.records
    assert (stopped.levelno, stopped.getMessage()) == (logging.INFO, ManagerGone.STOPPED)
    assert stopped.exc_info is None
    assert crashed.levelno == logging.ERROR and crashed.exc_info and crashed.exc_info[0] is RuntimeError
