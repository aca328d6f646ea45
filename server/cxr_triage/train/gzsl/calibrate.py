"""An operating point for a finding added at run time, measured on labelled data.

The labelled images go through the running service (``POST /v1/predict?model=…``), so the
scores are exactly the served ones: the version, the stored latent of the finding and the
server's decoding. The point is the highest threshold that reaches the target sensitivity on
those images (``train.evaluate.choose_operating_points``), and it is set on the service with
what it was measured on (``PUT /v1/models/{model}/findings/{finding}/operating-point``).
"""

import mimetypes
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from sklearn.metrics import roc_auc_score

from cxr_triage.errors import CxrError
from cxr_triage.train.datasets import label_matrix, load_dataset
from cxr_triage.train.evaluate import choose_operating_points

_TYPES = {".dcm": "application/dicom", ".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


class CalibrationError(CxrError):
    code, status = "calibration_failed", 400


@dataclass(frozen=True)
class Measured:
    version: str
    threshold: float
    auroc: float
    body: dict[str, Any]


def measure(
    server: str,
    model: str,
    finding: str,
    data: Path,
    split: str | None = None,
    target_sensitivity: float = 0.95,
    api_key: str | None = None,
    apply: bool = True,
) -> Measured:
    """Score the images of ``data`` that are labelled for ``finding`` through the service,
    choose the operating point, and (``apply``) set it there.

    Raises:
        CalibrationError: the finding is not an added one of the model, the data do not label
        it with both classes, or the served version changed while the images were scored.
    """
    labelled = load_dataset(data, split)
    targets, mask = label_matrix(labelled, [finding])
    rows = np.flatnonzero(mask[:, 0])
    y = targets[rows, 0]
    positives, negatives = int(y.sum()), int(len(y) - y.sum())
    if not positives or not negatives:
        raise CalibrationError(
            f"{data.name}: {finding!r} is labelled on {len(y)} images, {positives} positive and "
            f"{negatives} negative; an operating point needs both"
        )
    headers = {"X-API-Key": api_key} if api_key else {}
    with httpx.Client(base_url=server.rstrip("/"), headers=headers, timeout=120) as client:
        listed = _ok(client.get(f"/v1/models/{model}/findings"))
        if finding not in {f["label"] for f in listed["findings"]}:
            raise CalibrationError(
                f"{model} has no added finding {finding!r}; add it first (POST /v1/models/{model}/findings)"
            )
        scores, versions = [], set()
        for i in rows:
            path = labelled.records[i].image
            kind = (
                _TYPES.get(path.suffix.lower()) or mimetypes.guess_type(path.name)[0] or "application/dicom"
            )
            result = _ok(
                client.post(
                    "/v1/predict",
                    params={"model": model},
                    content=path.read_bytes(),
                    headers={"content-type": kind},
                )
            )
            versions.add(result["model"]["version"])
            scores.append(next(f["probability"] for f in result["findings"] if f["label"] == finding))
        if len(versions) != 1:
            raise CalibrationError(
                f"the served version changed while scoring ({sorted(versions)}); run it again"
            )
        (version,) = versions
        s = np.asarray(scores, dtype=np.float64)
        points = choose_operating_points(
            y[:, None], np.ones((len(y), 1), bool), s[:, None], [finding], target_sensitivity, "labelled data"
        )
        point = points[finding]
        body = {
            "version": version,
            "threshold": point.threshold,
            "chosen_on": f"{labelled.source} data, {len(y)} labelled images"
            + (" (SYNTHETIC)" if labelled.synthetic else ""),
            "target_sensitivity": target_sensitivity,
            "sensitivity": point.sensitivity,
            "specificity": point.specificity,
            "positives": positives,
            "negatives": negatives,
        }
        if apply:
            _ok(client.put(f"/v1/models/{model}/findings/{finding}/operating-point", json=body))
    return Measured(version, point.threshold, float(roc_auc_score(y, s)), body)


def _ok(response: httpx.Response) -> dict[str, Any]:
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:300]
        raise CalibrationError(
            f"{response.request.method} {response.request.url.path}: {response.status_code} {message}"
        )
    data: dict[str, Any] = response.json()
    return data
