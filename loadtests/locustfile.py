"""Locust suites for cxr-triage. Pick a suite by naming its user classes after the locustfile:

    locust -f loadtests/locustfile.py PredictPngUser --headless -u 4 -r 4 -t 30s \\
        --host http://127.0.0.1:8000

Suites (names as in loadtests/slo.yaml) and their user classes:

- predict-png: PredictPngUser, POST /v1/predict with an 8-bit 1024x1024 PNG, back to back;
- predict-jpeg: PredictJpegUser, the same with a full-resolution JPEG (1841x1955, q95);
- predict-dicom: PredictDicomUser, the same with the uncompressed DICOM CR (7.2 MB);
- predict-dicom-j2k: PredictJ2kUser, the same with its JPEG 2000 lossless twin (4.3 MB);
- stow: StowUser, STOW-RS (POST /dicom-web/studies), one new instance per request, back to back;
- priority-mix: RoutineUser (weight 3, routine PNGs back to back) and StatUser (weight 1, a stat
  PNG every 0.5-1.5 s);
- worklist: StudyFeederUser (POST /v1/studies every 0.2-0.5 s) and WorklistReaderUser (every 1-3 s:
  GET /v1/worklist, GET one of the top 3 studies, POST its report).

The predict users have no think time: concurrency = users (a closed loop). Images are one real
chest radiograph (pydicom-data RG1) in each format: see loadtests/samples.py. Naming no class
runs them all at once, by weight. `python -m loadtests.slo` runs a suite against targets.
"""

import os
import random
import sys
from pathlib import Path
from typing import Any

from locust import HttpUser, between, constant, task
from pydicom.uid import generate_uid

# Locust puts only loadtests/ on sys.path; the repository root makes `loadtests.samples` importable.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loadtests.samples import new_instance, sample, stow_body

READER = "locust-reader"


class _User(HttpUser):
    """Sends CXR_LOADTEST_API_KEY as X-API-Key when it is set (a server with CXR_API_KEYS)."""

    abstract = True

    def on_start(self) -> None:
        if os.environ.get("CXR_LOADTEST_API_KEY"):
            self.client.headers["X-API-Key"] = os.environ["CXR_LOADTEST_API_KEY"]


class _Predict(_User):
    """POST /v1/predict with one sample kind, no think time."""

    abstract = True
    kind = "png"
    priority: str | None = None
    wait_time = constant(0)

    def on_start(self) -> None:
        super().on_start()
        self.body, self.content_type = sample(self.kind)
        self.path, self.label = "/v1/predict", f"/v1/predict {self.kind}"
        if self.priority:
            self.path, self.label = f"{self.path}?priority={self.priority}", f"{self.label} {self.priority}"

    @task
    def predict(self) -> None:
        self.client.post(
            self.path, data=self.body, headers={"Content-Type": self.content_type}, name=self.label
        )


class PredictPngUser(_Predict):
    kind = "png"


class PredictJpegUser(_Predict):
    kind = "jpeg"


class PredictDicomUser(_Predict):
    kind = "dicom"


class PredictJ2kUser(_Predict):
    kind = "dicom-j2k"


class RoutineUser(_Predict):
    """Priority mix: routine work keeping the engine busy."""

    weight = 3
    priority = "routine"


class StatUser(_Predict):
    """Priority mix: a stat study now and then; its latency is what the mix is for."""

    weight = 1
    priority = "stat"
    wait_time = between(0.5, 1.5)


class StowUser(_User):
    """A PACS pushing one new instance per STOW-RS request, back to back."""

    wait_time = constant(0)

    @task
    def stow(self) -> None:
        body, content_type = stow_body([new_instance()[0]])
        headers = {"Content-Type": content_type, "Accept": "application/dicom+json"}
        with self.client.post(
            "/dicom-web/studies",
            data=body,
            headers=headers,
            name="STOW-RS /dicom-web/studies",
            catch_response=True,
        ) as response:
            if response.status_code == 200 and "00081199" not in response.text:
                response.failure("STOW reply without ReferencedSOPSequence (00081199)")


class StudyFeederUser(_User):
    """Worklist suite: studies arriving (PNG, asynchronous scoring) for the readers."""

    wait_time = between(0.2, 0.5)

    def on_start(self) -> None:
        super().on_start()
        self.body, self.content_type = sample("png")

    @task
    def submit(self) -> None:
        params = {"study_uid": generate_uid(), "instance_uid": generate_uid()}
        self.client.post(
            "/v1/studies",
            params=params,
            data=self.body,
            headers={"Content-Type": self.content_type},
            name="/v1/studies png",
        )


class WorklistReaderUser(_User):
    """A radiologist: takes one of the top 3 worklist entries, opens it, reports its positive
    findings as the final labels (which removes it from the worklist)."""

    wait_time = between(1.0, 3.0)

    @task
    def read_one(self) -> None:
        response = self.client.get("/v1/worklist", params={"limit": 10}, name="/v1/worklist")
        if not response.ok:
            return
        studies = response.json().get("studies", [])
        if not studies:
            return
        uid = random.choice(studies[:3])["study_uid"]
        study = self.client.get(f"/v1/studies/{uid}", name="/v1/studies/{uid}")
        if not study.ok:
            return
        labels = _final_labels(study.json())
        self.client.post(
            f"/v1/studies/{uid}/report",
            json={"labels": labels, "reader": READER},
            name="/v1/studies/{uid}/report",
        )


def _final_labels(study: dict[str, Any]) -> dict[str, bool]:
    """The model's calls taken as the reader's labels (empty while the study is unscored)."""
    findings = (study.get("result") or {}).get("findings", [])
    return {f["label"]: bool(f["positive"]) for f in findings}
