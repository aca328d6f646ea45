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
    """Study-level findings, score and triage class from per-image results of one model.

    Labels are matched by name: a zero-shot finding added between two images of a study is
    combined over the images that have it. The latest result's operating points apply.
    """
    labels: dict[str, None] = {}
    thresholds: dict[str, float | None] = {}
    unseen: set[str] = set()
    best: dict[str, float] = {}
    for result in results:
        for f in result["findings"]:
            label = f["label"]
            labels.setdefault(label)
            thresholds[label] = f["threshold"]
            if f.get("unseen"):
                unseen.add(label)
            best[label] = max(best.get(label, 0.0), float(f["probability"]))
    order = list(labels)
    findings = score_findings(order, [best[x] for x in order], thresholds, unseen)
    return {
        "findings": findings_out(findings, critical),
        "abnormality_score": abnormality_score(findings),
        "triage": triage_class(findings, critical),
        "images": len(results),
        "combination": "max over images, per finding",
    }
