"""Studies, worklist, reports and back-pressure through the real server process."""

import csv
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest

from tests.helpers import chest_u8, dataset_bytes, dicom_bytes, dicom_path, png_bytes, running_server


def submit(server: str, data: bytes, content_type: str, **params: str) -> httpx.Response:
    return httpx.post(f"{server}/v1/studies", content=data, headers={"Content-Type": content_type},
                      params=params, timeout=60)  # fmt: skip


def wait_done(server: str, study_uid: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = httpx.get(f"{server}/v1/studies/{study_uid}", timeout=10).json()
        if body["status"] in ("done", "failed"):
            return body
        time.sleep(0.1)
    raise TimeoutError(study_uid)


def worklist(server: str) -> list[dict]:
    return httpx.get(f"{server}/v1/worklist", params={"limit": 100}, timeout=10).json()["studies"]


def test_dicom_study_is_scored_listed_deduplicated_and_reported(server: str) -> None:
    accepted = submit(server, dicom_bytes("RG1_UNCR.dcm"), "application/dicom")
    assert accepted.status_code == 202, accepted.text
    body = accepted.json()
    uid = pydicom.dcmread(dicom_path("RG1_UNCR.dcm")).StudyInstanceUID
    assert body["study_uid"] == uid and body["status_url"] == f"/v1/studies/{uid}" and not body["duplicate"]

    study = wait_done(server, uid)
    assert study["status"] == "done" and len(study["instances"]) == 1
    assert study["result"]["model"]["weights"] == "untrained" and len(study["result"]["findings"]) == 14
    (row,) = [r for r in worklist(server) if r["study_uid"] == uid]
    assert row["status"] == "scored" and row["reason"] and row["priority"] == "routine"

    again = submit(server, dicom_bytes("RG1_UNCR.dcm"), "application/dicom").json()
    assert again["duplicate"] and again["job_id"] == body["job_id"]
    assert len(wait_done(server, uid)["instances"]) == 1

    bad = httpx.post(f"{server}/v1/studies/{uid}/report", json={"labels": {"Tumour": True}, "reader": "r"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_request"
    missing = httpx.post(f"{server}/v1/studies/9.9.9/report", json={"labels": {}, "reader": "r"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "study_not_found"
    ok = httpx.post(
        f"{server}/v1/studies/{uid}/report", json={"labels": {"Effusion": True}, "reader": "dr-x"}
    )
    assert ok.status_code == 200, ok.text
    assert uid not in [r["study_uid"] for r in worklist(server)]
    assert wait_done(server, uid)["report"]["labels"] == {"Effusion": True}


def test_png_study_takes_caller_uids_and_dicom_priority_is_mapped(server: str) -> None:
    png = png_bytes(chest_u8(64))
    body = submit(
        server, png, "image/png", study_uid="1.2.826.0.1.99", instance_uid="1.2.826.0.1.99.1"
    ).json()
    assert body["study_uid"] == "1.2.826.0.1.99" and body["instance_uid"] == "1.2.826.0.1.99.1"
    invalid = submit(server, png, "image/png", study_uid="not-a-uid")
    assert invalid.status_code == 400
    ds = pydicom.dcmread(dicom_path("RG1_UNCR.dcm"))
    ds.StudyInstanceUID, ds.SOPInstanceUID = "1.2.826.0.1.77", "1.2.826.0.1.77.1"
    ds.RequestedProcedurePriority = "STAT"
    assert submit(server, dataset_bytes(ds), "application/dicom").json()["priority"] == "stat"
    assert submit(server, png, "image/png", priority="backfill").json()["priority"] == "backfill"
    assert wait_done(server, "1.2.826.0.1.77")["priority"] == "stat"


def test_unknown_study_is_404(server: str) -> None:
    response = httpx.get(f"{server}/v1/studies/1.2.3.4.5.6", timeout=10)
    assert response.status_code == 404 and response.json()["error"]["code"] == "study_not_found"


@pytest.fixture(scope="module")
def saturated_server(exported_repo: Path, debian_redis: str) -> Iterator[tuple[str, str]]:
    """A server whose synchronous bound is 0: every predict is over it; studies still accepted."""
    import redis

    redis.Redis.from_url(debian_redis).flushall()
    env = {"CXR_REDIS_URL": debian_redis, "CXR_MAX_QUEUE": "0", "CXR_DECODE_WORKERS": "1"}
    with running_server(exported_repo, env) as url:
        yield url, debian_redis


def test_over_the_bound_predict_gets_429_and_studies_are_still_accepted(
    saturated_server: tuple[str, str],
) -> None:
    url, _ = saturated_server
    response = httpx.post(f"{url}/v1/predict", content=png_bytes(chest_u8(64)),
                          headers={"Content-Type": "image/png"}, timeout=30)  # fmt: skip
    assert response.status_code == 429 and response.json()["error"]["code"] == "overloaded"
    assert int(response.headers["Retry-After"]) >= 1
    accepted = submit(url, png_bytes(chest_u8(64)), "image/png", study_uid="1.2.826.0.1.55")
    assert accepted.status_code == 202
    assert wait_done(url, "1.2.826.0.1.55")["status"] == "done"


def test_feedback_export_writes_chestxray14_layout(saturated_server: tuple[str, str], tmp_path: Path) -> None:
    url, redis_url = saturated_server
    submit(
        url, png_bytes(chest_u8(64)), "image/png", study_uid="1.2.826.0.1.66", instance_uid="1.2.826.0.1.66.1"
    )
    wait_done(url, "1.2.826.0.1.66")
    report = {"labels": {"Effusion": True, "Mass": True, "Edema": False}, "reader": "dr-y"}
    assert httpx.post(f"{url}/v1/studies/1.2.826.0.1.66/report", json=report, timeout=10).status_code == 200
    env = {**os.environ, "CXR_REDIS_URL": redis_url}
    command = [sys.executable, "-m", "cxr_triage", "feedback", "export", "--out", str(tmp_path)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    entries = list(csv.DictReader((tmp_path / "Data_Entry_2017.csv").open()))
    (row,) = [e for e in entries if e["Patient ID"] == "1.2.826.0.1.66"]
    assert row["Image Index"] == "1.2.826.0.1.66.1.png" and row["Finding Labels"] == "Effusion|Mass"
    wide = list(csv.DictReader((tmp_path / "feedback_labels.csv").open()))
    (w,) = [r for r in wide if r["study_uid"] == "1.2.826.0.1.66"]
    assert (w["Effusion"], w["Edema"], w["Hernia"]) == ("1", "0", "")


def test_inference_worker_killed_mid_batch_loses_nothing(exported_repo: Path, tmp_path: Path) -> None:
    import redis

    from tests.helpers import redis_server

    with redis_server(tmp_path / "redis") as redis_url:
        env = {"CXR_REDIS_URL": redis_url, "CXR_INFERENCE_WORKERS": "2", "CXR_LEASE_S": "2",
               "CXR_DECODE_WORKERS": "1", "CXR_INTRA_OP_THREADS": "1"}  # fmt: skip
        with running_server(exported_repo, env) as url:
            r = redis.Redis.from_url(redis_url)
            uids = [f"1.2.826.0.1.88.{i}" for i in range(40)]
            body = png_bytes(chest_u8(64))
            # Sent 8 at a time, so that batches form (a study arriving alone goes to the urgent
            # lane at once) while the first worker caught holding a lease, lane or not, is killed.
            with ThreadPoolExecutor(8) as senders:
                sent = [senders.submit(submit, url, body, "image/png", study_uid=uid) for uid in uids]
                victim = kill_mid_batch(r)
                assert all(f.result().status_code == 202 for f in sent)
            assert victim is not None, "no worker was ever caught holding a lease"
            done = [wait_done(url, uid, timeout=90) for uid in uids]
            assert all(s["status"] == "done" and len(s["instances"]) == 1 for s in done)
            # The kill landed while the batch was in flight: its jobs came back through the lease.
            assert int(r.hget("cxr:stats", "redelivered") or 0) >= 1
            assert httpx.get(f"{url}/ready", timeout=30).status_code in (200, 503)
            assert post_ok(url)


def kill_mid_batch(r: Any) -> int | None:
    """SIGKILL an inference worker while it holds a lease: each holder seen is stopped first
    (SIGSTOP), and killed only if its job is still running then (else it goes on). Returns its
    pid; None if no worker was caught in 5 s."""
    until = time.monotonic() + 5.0
    while time.monotonic() < until:
        for job in r.zrange("cxr:leases", 0, -1):
            worker = r.hget(b"cxr:job:" + job, "worker")
            if worker is None:
                continue
            pid = int(worker.removesuffix(b"/urgent").rsplit(b"/", 1)[-1])
            os.kill(pid, signal.SIGSTOP)
            time.sleep(0.02)  # a COMPLETE already on its way to Redis lands first
            if r.hmget(b"cxr:job:" + job, "status", "worker") == [b"running", worker]:
                os.kill(pid, signal.SIGKILL)
                return pid
            os.kill(pid, signal.SIGCONT)
        time.sleep(0.001)
    return None


def post_ok(url: str) -> bool:
    for _ in range(60):
        response = httpx.post(f"{url}/v1/predict", content=png_bytes(chest_u8(64)),
                              headers={"Content-Type": "image/png"}, timeout=60)  # fmt: skip
        if response.status_code == 200:
            return True
        time.sleep(0.5)
    return False
