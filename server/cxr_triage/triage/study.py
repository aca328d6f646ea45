"""Combine the images of one study into one study result.

A study is as urgent as its most urgent image: per finding, the highest probability over its
images (frontal and lateral alike; lateral images carry a warning because the models are
trained on frontal views); the abnormality score and triage class are recomputed from those
combined findings, so one positive view makes the study positive.
"""

from collections.abc import Sequence
from typing import Any

from cxr_triage.triage.scoring import abnormality_score, findings_out, score_findings, triage_class


def combine(results: Sequence[dict[str, Any]], critical: Sequence[str]) -> dict[str, Any]:
    """Study-level findings, score and triage class from per-image results of one model."""
    labels = [f["label"] for f in results[0]["findings"]]
    thresholds = {f["label"]: f["threshold"] for f in results[0]["findings"]}
    best = [max(r["findings"][i]["probability"] for r in results) for i in range(len(labels))]
    findings = score_findings(labels, best, thresholds)
    return {
        "findings": findings_out(findings, critical),
        "abnormality_score": abnormality_score(findings),
        "triage": triage_class(findings, critical),
        "images": len(results),
        "combination": "max over images, per finding",
    }
