"""Turn per-label probabilities into findings, one abnormality score and a triage class.

Thresholds differ per label, so raw probabilities are not comparable across labels. Each
probability is first mapped onto a common scale where its own operating point sits at 0.5
(piecewise linear: 0 -> 0, threshold -> 0.5, 1 -> 1). The abnormality score is the largest
of those, so ``score >= 0.5`` exactly when at least one finding is positive, and the score
orders studies by how far past an operating point their strongest finding is.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

TriageClass = Literal["critical", "abnormal", "normal"]


@dataclass(frozen=True)
class Finding:
    label: str
    probability: float
    threshold: float

    @property
    def positive(self) -> bool:
        return self.probability >= self.threshold

    @property
    def margin_score(self) -> float:
        """The probability on the common scale where the threshold is 0.5."""
        p, t = self.probability, self.threshold
        return 0.5 * p / t if p < t else 0.5 + 0.5 * (p - t) / (1.0 - t)


def score_findings(
    labels: Sequence[str], probabilities: Sequence[float], thresholds: Mapping[str, float]
) -> list[Finding]:
    """One Finding per label, in the model's label order."""
    if len(labels) != len(probabilities):
        raise ValueError(f"{len(probabilities)} scores for {len(labels)} labels")
    return [Finding(lbl, float(p), thresholds[lbl]) for lbl, p in zip(labels, probabilities, strict=True)]


def findings_out(findings: Sequence[Finding], critical: Sequence[str]) -> list[dict[str, object]]:
    """The API.md ``findings`` list; ``critical`` marks the labels that make a study critical."""
    return [
        {
            "label": f.label,
            "probability": f.probability,
            "threshold": f.threshold,
            "positive": f.positive,
            "critical": f.label in critical,
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
