"""Turn per-label probabilities into findings, one abnormality score and a triage class.

Thresholds differ per label, so raw probabilities are not comparable across labels. Each
probability is first mapped onto a common scale where its own operating point sits at 0.5
(piecewise linear: 0 -> 0, threshold -> 0.5, 1 -> 1). The abnormality score is the largest
of those, so ``score >= 0.5`` exactly when at least one finding is positive, and the score
orders studies by how far past an operating point their strongest finding is.

A finding without an operating point (a zero-shot finding added at run time, until one is set
from labelled data) is scored and reported but never called: ``positive`` is None and it
takes no part in the abnormality score or the triage class.
"""

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

TriageClass = Literal["critical", "abnormal", "normal"]


@dataclass(frozen=True)
class Finding:
    label: str
    probability: float
    threshold: float | None
    unseen: bool = False

    @property
    def positive(self) -> bool | None:
        """None: no operating point, so no call."""
        return None if self.threshold is None else self.probability >= self.threshold

    @property
    def margin_score(self) -> float:
        """The probability on the common scale where the threshold is 0.5 (0 without one)."""
        return margin(self.probability, self.threshold)


def margin(probability: float, threshold: float | None) -> float:
    """``probability`` on the common scale where ``threshold`` is 0.5; 0 where there is none."""
    p, t = probability, threshold
    if t is None:
        return 0.0
    return 0.5 * p / t if p < t else 0.5 + 0.5 * (p - t) / (1.0 - t)


def strength(finding: Mapping[str, Any]) -> float:
    """How far an API.md finding is toward (or past) its operating point: its sort key."""
    return margin(float(finding["probability"]), finding.get("threshold"))


def score_findings(
    labels: Sequence[str],
    probabilities: Sequence[float],
    thresholds: Mapping[str, float | None],
    unseen: Collection[str] = (),
) -> list[Finding]:
    """One Finding per label, in the model's label order; labels missing from ``thresholds``
    have no operating point."""
    if len(labels) != len(probabilities):
        raise ValueError(f"{len(probabilities)} scores for {len(labels)} labels")
    return [
        Finding(lbl, float(p), thresholds.get(lbl), lbl in unseen)
        for lbl, p in zip(labels, probabilities, strict=True)
    ]


def findings_out(findings: Sequence[Finding], critical: Sequence[str]) -> list[dict[str, object]]:
    """The API.md ``findings`` list; ``critical`` marks the labels that make a study critical."""
    return [
        {
            "label": f.label,
            "probability": f.probability,
            "threshold": f.threshold,
            "positive": f.positive,
            "critical": f.label in critical,
            "unseen": f.unseen,
        }
        for f in findings
    ]


def abnormality_score(findings: Sequence[Finding]) -> float:
    """Study-level score in 0-1; >= 0.5 iff some finding is positive."""
    return max((f.margin_score for f in findings), default=0.0)


def triage_class(findings: Sequence[Finding], critical: Sequence[str]) -> TriageClass:
    """critical: a critical finding is positive; abnormal: another is; normal: none is."""
    positives = {f.label for f in findings if f.positive}
    if positives & set(critical):
        return "critical"
    return "abnormal" if positives else "normal"
