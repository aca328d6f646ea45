"""Operating points, study-level abnormality score and triage class."""

from cxr_triage.triage.scoring import (
    Finding,
    TriageClass,
    abnormality_score,
    findings_out,
    score_findings,
    triage_class,
)

__all__ = ["Finding", "TriageClass", "abnormality_score", "findings_out", "score_findings", "triage_class"]
