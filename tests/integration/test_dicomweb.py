"""cxr-triage as a DICOMweb peer: STOW-RS from dicomweb-client, hand-made bodies and a real Orthanc."""

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient

from tests.helpers import (
    dataset_bytes,
    dicom_bytes,
    dicom_path,
    free_port,
    metrics_text,
    orthanc,
    running_server,
)

REFERENCED, FAILED, REASON, COMMENT = "00081199", "00081198", "00081197", "00000902"
SERVER_LOG: list[Path] = [Path()]  # the PACS-loop server's log, scanned for PHI


def rg1_copy(study: str | None = None) -> pydicom.Dataset:
    """pydicom-data's chest CR with fresh UIDs, so each test has its own study."""
    ds = pydicom.dcmread(dicom_path("RG1_UNCR.dcm"))
    ds.StudyInstanceUID = study or pydicom.uid.generate_uid()
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def stow_body(parts: list[bytes]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = b"".join(
        b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
        for p in parts
    )
    body += b"--" + boundary.encode() + b"--\r\n"
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def wait_done(server: str, study_uid: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = httpx.get(f"{server}/v1/studies/{study_uid}", timeout=10)
        if response.status_code == 200 and response.json()["status"] in ("done", "failed"):
            return response.json()
        time.sleep(0.1)
    raise TimeoutError(study_uid)


def test_dicomweb_client_stores_and_the_study_is_scored(server: str) -> None:
    ds = rg1_copy()
    client = DICOMwebClient(url=f"{server}/dicom-web")
    reply = client.store_instances([ds])
    (item,) = reply.ReferencedSOPSequence
    assert item.ReferencedSOPInstanceUID == ds.SOPInstanceUID
    assert item.ReferencedSOPClassUID == ds.SOPClassUID
    study = wait_done(server, ds.StudyInstanceUID)
    assert study["status"] == "done" and study["result"]["model"]["weights"] == "untrained"


def test_mixed_stow_stores_the_good_instance_and_fails_the_corrupt_one_with_a_reason(server: str) -> None:
    good, bad = rg1_copy(), rg1_copy()
    body, content_type = stow_body([dataset_bytes(good), dataset_bytes(bad)[:400_000]])
    response = httpx.post(f"{server}/dicom-web/studies", content=body, headers={"Content-Type": content_type},
                          timeout=60)  # fmt: skip
    assert response.status_code == 202, response.text
    assert response.headers["content-type"].startswith("application/dicom+json")
    reply = response.json()
    (stored,) = reply[REFERENCED]["Value"]
    (failed,) = reply[FAILED]["Value"]
    assert stored["00081155"]["Value"] == [good.SOPInstanceUID]
    assert failed["00081155"]["Value"] == [bad.SOPInstanceUID]
    assert failed[REASON]["Value"] == [0xC000] and "corrupt_image" in failed[COMMENT]["Value"][0]


def test_non_projection_modality_is_a_failed_entry_not_a_crash(server: str) -> None:
    body, content_type = stow_body([dicom_bytes("CT_small.dcm")])
    response = httpx.post(f"{server}/dicom-web/studies", content=body, headers={"Content-Type": content_type},
                          timeout=60)  # fmt: skip
    assert response.status_code == 409
    (failed,) = response.json()[FAILED]["Value"]
    assert failed[REASON]["Value"] == [0x0122] and "wrong_modality" in failed[COMMENT]["Value"][0]
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200


def test_stow_refuses_other_media_types_and_malformed_bodies(server: str) -> None:
    wrong = httpx.post(
        f"{server}/dicom-web/studies", content=b"x", headers={"Content-Type": "application/json"}
    )
    assert wrong.status_code == 415 and wrong.json()["error"]["code"] == "unsupported_media_type"
    related = 'multipart/related; type="application/dicom"'
    no_boundary = httpx.post(f"{server}/dicom-web/studies", content=b"x", headers={"Content-Type": related})
    assert no_boundary.status_code == 400


@pytest.fixture(scope="module")
def orthanc_pushing_to(server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    servers = {"cxr": [f"{server}/dicom-web/"]}
    with orthanc(tmp_path_factory.mktemp("orthanc"), servers) as url:
        yield url


def test_orthanc_pushes_a_chest_cr_and_reports_success(server: str, orthanc_pushing_to: str) -> None:
    ds = rg1_copy()
    upload = httpx.post(f"{orthanc_pushing_to}/instances", content=dataset_bytes(ds), timeout=60)
    assert upload.status_code == 200, upload.text
    instance_id = upload.json()["ID"]
    push = httpx.post(f"{orthanc_pushing_to}/dicom-web/servers/cxr/stow",
                      json={"Resources": [instance_id], "Synchronous": True}, timeout=120)  # fmt: skip
    assert push.status_code == 200, push.text
    study = wait_done(server, ds.StudyInstanceUID)
    assert study["status"] == "done" and study["instances"][0]["instance_uid"] == ds.SOPInstanceUID


def test_orthanc_push_of_a_j2k_instance_is_scored_like_its_twin(server: str, orthanc_pushing_to: str) -> None:
    ds = pydicom.dcmread(dicom_path("RG1_J2KR.dcm"))
    ds.StudyInstanceUID, ds.SOPInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    instance_id = httpx.post(f"{orthanc_pushing_to}/instances", content=dataset_bytes(ds), timeout=60).json()[
        "ID"
    ]
    push = httpx.post(f"{orthanc_pushing_to}/dicom-web/servers/cxr/stow",
                      json={"Resources": [instance_id], "Synchronous": True}, timeout=120)  # fmt: skip
    assert push.status_code == 200, push.text
    assert wait_done(server, ds.StudyInstanceUID)["status"] == "done"


def test_study_route_checks_the_study_uid(server: str, tmp_path: Path) -> None:
    ds = rg1_copy()
    body, content_type = stow_body([dataset_bytes(ds)])
    response = httpx.post(f"{server}/dicom-web/studies/1.2.3.999", content=body,
                          headers={"Content-Type": content_type}, timeout=60)  # fmt: skip
    assert response.status_code == 409
    assert httpx.get(f"{server}/v1/studies/{ds.StudyInstanceUID}", timeout=10).status_code == 404


@pytest.fixture(scope="module")
def pacs_loop(exported_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """Orthanc pushing to a cxr-triage that stores its SRs back to that Orthanc."""
    port = free_port()
    workdir = tmp_path_factory.mktemp("pacs-loop")
    SERVER_LOG[0] = workdir / "server.log"
    with orthanc(workdir / "orthanc", {"cxr": [f"http://127.0.0.1:{port}/dicom-web/"]}) as pacs:
        env = {
            "CXR_PACS_URL": f"{pacs}/dicom-web",
            "CXR_PACS_POLL_S": "1",
            "CXR_DATA_DIR": str(workdir / "data"),
            "CXR_DECODE_WORKERS": "1",
            "CXR_LOG_LEVEL": "debug",
        }
        with running_server(exported_repo, env, port=port, log_path=SERVER_LOG[0]) as url:
            yield url, pacs


SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def find_instance(pacs: str, study_uid: str, sop_class: str, timeout: float = 60) -> pydicom.Dataset:
    client = DICOMwebClient(url=f"{pacs}/dicom-web")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for found in client.search_for_instances(study_uid):
            if found.get("00080016", {}).get("Value") == [sop_class]:
                series, sop = found["0020000E"]["Value"][0], found["00080018"]["Value"][0]
                return client.retrieve_instance(study_uid, series, sop)
        time.sleep(0.3)
    raise TimeoutError(f"no {sop_class} instance in the PACS")


def find_sr(pacs: str, study_uid: str, timeout: float = 60) -> pydicom.Dataset:
    client = DICOMwebClient(url=f"{pacs}/dicom-web")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        series = client.search_for_series(study_uid, search_filters={"Modality": "SR"})
        if series:
            series_uid = series[0]["0020000E"]["Value"][0]
            (sr,) = client.retrieve_series(study_uid, series_uid)
            return sr
        time.sleep(0.3)
    raise TimeoutError("no SR arrived in the PACS")


def test_sr_is_stored_back_to_the_pacs_with_references_and_provenance(pacs_loop: tuple[str, str]) -> None:
    url, pacs = pacs_loop
    ds = rg1_copy()
    instance_id = httpx.post(f"{pacs}/instances", content=dataset_bytes(ds), timeout=60).json()["ID"]
    body = {"Resources": [instance_id], "Synchronous": True}
    push = httpx.post(f"{pacs}/dicom-web/servers/cxr/stow", json=body, timeout=120)
    assert push.status_code == 200, push.text
    study = wait_done(url, ds.StudyInstanceUID)
    sr = find_sr(pacs, ds.StudyInstanceUID)
    assert sr.Modality == "SR" and sr.StudyInstanceUID == ds.StudyInstanceUID and sr.PatientID == ds.PatientID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.SeriesInstanceUID == ds.SeriesInstanceUID
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    items = {i.ConceptNameCodeSequence[0].CodeMeaning: i for i in sr.ContentSequence}
    assert items["Algorithm Name"].TextValue == "densenet121-nih14"
    assert items["Weights provenance"].TextValue == "untrained"
    assert items["Triage class"].ConceptCodeSequence[0].CodeValue == study["result"]["triage"]
    score = float(items["Abnormality score"].MeasuredValueSequence[0].NumericValue)
    assert score == pytest.approx(study["result"]["abnormality_score"], abs=1e-6)
    findings = [i for i in sr.ContentSequence if i.ValueType == "CONTAINER"]
    assert [f.ConceptNameCodeSequence[0].CodeMeaning for f in findings] == [
        f["label"] for f in study["result"]["findings"]
    ]
    source = items["Source of Measurement"].ReferencedSOPSequence[0]
    assert source.ReferencedSOPInstanceUID == ds.SOPInstanceUID
    heatmap = find_instance(pacs, ds.StudyInstanceUID, SECONDARY_CAPTURE)
    assert heatmap.SourceImageSequence[0].ReferencedSOPInstanceUID == ds.SOPInstanceUID
    assert heatmap.PhotometricInterpretation == "RGB" and heatmap.pixel_array.shape[2] == 3
    assert heatmap.StudyInstanceUID == ds.StudyInstanceUID and "class activation map" in heatmap.ImageComments


def store_in_pacs(pacs: str, ds: pydicom.Dataset) -> str:
    response = httpx.post(f"{pacs}/instances", content=dataset_bytes(ds), timeout=60)
    assert response.status_code == 200, response.text
    return str(response.json()["ID"])


def test_pull_retrieves_a_study_the_pacs_did_not_push(pacs_loop: tuple[str, str]) -> None:
    url, pacs = pacs_loop
    ds = rg1_copy()  # StudyDate 2004: older than the poller looks, so only the pull finds it
    store_in_pacs(pacs, ds)
    response = httpx.post(f"{url}/v1/pacs/pull", json={"study_uid": ds.StudyInstanceUID}, timeout=120)
    assert response.status_code == 202, response.text
    (instance,) = response.json()["instances"]
    assert instance["instance_uid"] == ds.SOPInstanceUID and not instance["duplicate"]
    assert wait_done(url, ds.StudyInstanceUID)["status"] == "done"
    bad = httpx.post(f"{url}/v1/pacs/pull", json={"study_uid": "not a uid"}, timeout=30)
    assert bad.status_code == 400


def test_poller_finds_new_cr_studies_by_itself(pacs_loop: tuple[str, str]) -> None:
    url, pacs = pacs_loop
    ds = rg1_copy()
    ds.StudyDate = time.strftime("%Y%m%d", time.gmtime())
    store_in_pacs(pacs, ds)
    assert wait_done(url, ds.StudyInstanceUID, timeout=90)["status"] == "done"


def test_pull_without_a_pacs_is_503(server: str) -> None:
    response = httpx.post(f"{server}/v1/pacs/pull", json={"study_uid": "1.2.3"}, timeout=30)
    assert response.status_code == 503 and response.json()["error"]["code"] == "not_ready"


def test_no_phi_in_logs_or_metrics(pacs_loop: tuple[str, str]) -> None:
    url, pacs = pacs_loop
    ds = rg1_copy()
    phi = {"PatientName": "SECRETNAME^PHI", "PatientID": "PHI-ID-98765", "PatientBirthDate": "19010203",
           "AccessionNumber": "ACC-PHI-4242"}  # fmt: skip
    for keyword, value in phi.items():
        setattr(ds, keyword, value)
    instance_id = store_in_pacs(pacs, ds)
    body = {"Resources": [instance_id], "Synchronous": True}
    assert httpx.post(f"{pacs}/dicom-web/servers/cxr/stow", json=body, timeout=120).status_code == 200
    wait_done(url, ds.StudyInstanceUID)
    sr = find_sr(pacs, ds.StudyInstanceUID)  # the SR carries the patient (it belongs to the study) …
    assert sr.PatientID == phi["PatientID"]
    metrics = metrics_text(url)
    log = SERVER_LOG[0].read_text(errors="replace")
    assert "stored to the PACS" in log  # … the debug log really covered that path
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert records and {"time", "level", "logger", "message", "request_id"} <= set(records[0])
    for value in (*phi.values(), "SECRETNAME"):
        assert value not in log, f"{value} leaked into the log"
        assert value not in metrics, f"{value} leaked into the metrics"


def test_cli_pull_asks_the_running_service(pacs_loop: tuple[str, str]) -> None:
    import subprocess
    import sys

    url, pacs = pacs_loop
    ds = rg1_copy()
    store_in_pacs(pacs, ds)
    command = [sys.executable, "-m", "cxr_triage", "pacs", "pull", ds.StudyInstanceUID, "--server", url]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"{ds.SOPInstanceUID}: queued" in result.stderr
    assert wait_done(url, ds.StudyInstanceUID)["status"] == "done"
