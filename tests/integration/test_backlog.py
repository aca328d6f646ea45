"""``cxr-triage backlog`` against the real server process: a folder (DICOM, a non-DICOM file, a
corrupt DICOM), an interrupted run resumed without scoring anything twice, and a QIDO-RS source
on a real Orthanc."""

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.uid import generate_uid
from typer.testing import CliRunner

from cxr_triage.backlog import Checkpoint, folder_identity
from cxr_triage.cli import app
from tests.helpers import dataset_bytes, dicom_path, orthanc, running_server

PHI_NAME = "Backlogpatient^Jane"  # put into every file: must never show in output or checkpoint


@pytest.fixture(scope="module")
def backlog_server(exported_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Its own server and Redis: an archive lands on the worklist, which other modules check."""
    env = {
        "CXR_DECODE_WORKERS": "1",
        "CXR_INTRA_OP_THREADS": "1",
        "CXR_DATA_DIR": str(tmp_path_factory.mktemp("backlog-data")),
    }
    with running_server(exported_repo, env) as url:
        yield url


@cache
def _template() -> pydicom.Dataset:
    return pydicom.dcmread(dicom_path("RG1_UNCR.dcm"))


def restamped(modality: str = "CR", study: str | None = None) -> tuple[bytes, str, str]:
    """RG1 (a real PA chest CR) as a new instance: (bytes, study UID, SOP instance UID)."""
    ds = _template()
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName, ds.Modality = PHI_NAME, modality
    return dataset_bytes(ds), ds.StudyInstanceUID, ds.SOPInstanceUID


def make_archive(root: Path, count: int, bad: bool = True) -> dict[str, str]:
    """``count`` chest CRs in nested folders (+ a text file and a truncated DICOM when ``bad``);
    returns relative path -> study UID of the good ones."""
    studies = {}
    for i in range(count):
        data, study, _ = restamped()
        rel = f"patient{i % 2}/study{i}/img{i}.dcm"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        studies[rel] = study
    if bad:
        (root / "README.txt").write_text("exported from the PACS\n")
        data, _, _ = restamped()
        (root / "broken.dcm").write_bytes(data[: len(data) // 2])  # header intact, pixels cut
    return studies


def backlog_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "cxr_triage", "backlog", *args]


def run_backlog(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(backlog_cmd(*args), capture_output=True, text=True, timeout=timeout, env=env)


def entries(checkpoint: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in checkpoint.read_text().splitlines() if line.strip()]


def final_states(checkpoint: Path) -> dict[str, dict[str, object]]:
    return {str(e["key"]): e for e in entries(checkpoint) if "key" in e}


def study(server: str, uid: str) -> dict[str, object]:
    response = httpx.get(f"{server}/v1/studies/{uid}", timeout=30)
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


def test_folder_is_scored_at_backfill_bad_file_failed_other_file_skipped(
    backlog_server: str, tmp_path: Path
) -> None:
    archive = tmp_path / "archive"
    studies = make_archive(archive, 4)
    checkpoint = tmp_path / "ck.jsonl"
    run = run_backlog(str(archive), "--server", backlog_server, "--checkpoint", str(checkpoint))
    out = run.stdout + run.stderr
    assert run.returncode == 1, out  # the truncated file failed
    states = final_states(checkpoint)
    assert states["README.txt"]["event"] == "skipped"
    assert states["broken.dcm"]["event"] == "failed"
    assert states["broken.dcm"]["code"] == "corrupt_image"
    assert "broken.dcm: corrupt_image" in out
    assert "4 scored, 1 failed, 1 skipped" in out
    for rel, uid in studies.items():
        assert states[rel]["event"] == "done", states[rel]
        assert states[rel]["study_uid"] == uid
        found = study(backlog_server, uid)
        assert found["status"] == "done"
        assert found["priority"] == "backfill"
        instances = found["instances"]
        assert isinstance(instances, list) and len(instances) == 1
        assert instances[0]["job_id"] == states[rel]["job_id"]
    for text in (out, checkpoint.read_text()):  # no PHI: UIDs and relative paths only
        assert "Backlogpatient" not in text
        assert str(tmp_path) not in checkpoint.read_text()

    again = run_backlog(str(archive), "--server", backlog_server, "--checkpoint", str(checkpoint))
    assert again.returncode == 1  # the failure stays listed until it is fixed
    assert "0 scored, 0 failed, 0 skipped, 6 finished earlier" in again.stdout + again.stderr


def test_interrupted_run_resumes_without_scoring_anything_twice(backlog_server: str, tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    studies = make_archive(archive, 6, bad=False)
    checkpoint = tmp_path / "ck.jsonl"
    common = (str(archive), "--server", backlog_server, "--checkpoint", str(checkpoint))

    first = run_backlog(*common, "--limit", "2", "--max-in-flight", "1")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "stopped after --limit 2" in first.stdout + first.stderr
    assert sum(e["event"] == "done" for e in final_states(checkpoint).values()) == 2

    # Interrupt a run as Ctrl-C would, once it has sent something beyond the first two.
    proc = subprocess.Popen(
        backlog_cmd(*common, "--max-in-flight", "1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 60
    while sum(e["event"] == "submitted" for e in entries(checkpoint)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    if proc.returncode == 130:  # it may have finished first on a fast machine
        assert "interrupted" in out and "resume: run the same command again" in out

    last = run_backlog(*common)
    out = last.stdout + last.stderr
    assert last.returncode == 0, out
    assert "finished earlier" in out
    states = final_states(checkpoint)
    assert {k for k, e in states.items() if e["event"] == "done"} == set(studies)
    jobs_per_key: dict[str, set[object]] = {}
    for e in entries(checkpoint):
        if e.get("job_id"):
            jobs_per_key.setdefault(str(e["key"]), set()).add(e["job_id"])
    assert all(len(jobs) == 1 for jobs in jobs_per_key.values()), jobs_per_key
    done_lines = [e["key"] for e in entries(checkpoint) if e["event"] == "done"]
    assert sorted(done_lines) == sorted(studies)  # each item finished exactly once
    for uid in studies.values():  # and the service scored each instance once
        instances = study(backlog_server, uid)["instances"]
        assert isinstance(instances, list) and len(instances) == 1


def test_qido_source_scores_the_cr_studies_of_a_real_orthanc(backlog_server: str, tmp_path: Path) -> None:
    cr_studies, sops = [], []
    with orthanc(tmp_path / "orthanc") as pacs:
        for _ in range(2):
            data, uid, sop = restamped("CR")
            assert httpx.post(f"{pacs}/instances", content=data, timeout=60).status_code == 200
            cr_studies.append(uid)
            sops.append(sop)
        # a second series of another modality in the first study, and a study of MR only
        other, _, _ = restamped("OT", study=cr_studies[0])
        mr, mr_study, _ = restamped("MR")
        for data in (other, mr):
            assert httpx.post(f"{pacs}/instances", content=data, timeout=60).status_code == 200
        checkpoint = tmp_path / "qido.jsonl"
        args = ("--qido", f"{pacs}/dicom-web", "--server", backlog_server, "--checkpoint", str(checkpoint))
        run = run_backlog(*args, "--modality", "CR,DX", "--study-date", "19000101-")
        out = run.stdout + run.stderr
        assert run.returncode == 0, out
        assert "2 scored, 0 failed, 1 skipped" in out  # the OT series
        again = run_backlog(*args, "--modality", "CR,DX", "--study-date", "19000101-")
        assert again.returncode == 0 and "0 scored" in again.stdout + again.stderr
    states = final_states(checkpoint)
    assert len(states) == 2
    for uid, sop in zip(cr_studies, sops, strict=True):
        keys = [k for k in states if k.startswith(f"{uid}/") and k.endswith(f"/{sop}")]
        assert len(keys) == 1 and states[keys[0]]["event"] == "done"
        found = study(backlog_server, uid)
        assert found["status"] == "done" and found["priority"] == "backfill"
    assert httpx.get(f"{backlog_server}/v1/studies/{mr_study}", timeout=30).status_code == 404
    assert "Backlogpatient" not in out + checkpoint.read_text()


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(app, ["backlog"]).exit_code == 2  # no source
    both = runner.invoke(app, ["backlog", str(tmp_path), "--qido", "http://127.0.0.1:9/dicom-web"])
    assert both.exit_code == 2
    nobody = runner.invoke(app, ["backlog", str(tmp_path), "--server", "http://127.0.0.1:9"])
    assert nobody.exit_code == 2
    assert runner.invoke(app, ["backlog", str(tmp_path), "--max-in-flight", "0"]).exit_code == 2


def test_checkpoint_ignores_a_torn_line_and_refuses_another_source(tmp_path: Path) -> None:
    path = tmp_path / "ck.jsonl"
    identity = folder_identity(tmp_path)
    first = Checkpoint(path, identity)
    first.record("a.dcm", "done", job_id="j1")
    first.close()
    with path.open("a") as f:
        f.write('{"key": "b.dcm", "event": "do')  # killed mid-write
    again = Checkpoint(path, identity)
    assert again.state["a.dcm"]["event"] == "done" and "b.dcm" not in again.state
    again.close()
    with pytest.raises(Exception, match="another source"):
        Checkpoint(path, folder_identity(tmp_path / "elsewhere"))
