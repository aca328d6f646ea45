"""Worklist order: critical findings, then abnormality score, raised by waiting time.

A study's *place* is a number stored in Redis and only ever raised (a later image or a later
score never moves a study down):

    critical: 2 + score     abnormal: 1 + score (score >= 0.5)     normal: score (< 0.5)
    unscored (scoring failed): 1.5, i.e. read like an abnormal study, since nobody knows

At read time waiting raises it: ``rank = place + 3 * waited / max_wait``. At ``max_wait`` the
boost (3) exceeds any place, so an overdue study ranks above every study that is not overdue,
and overdue studies come oldest first: nothing waits much past the maximum.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cxr_triage.triage.scoring import strength

_TIER = {"critical": 2.0, "abnormal": 1.0, "normal": 0.0}
UNSCORED_PLACE = 1.5
AGING_SPAN = 3.0


def place_of(result: Mapping[str, Any]) -> float:
    """The worklist place a scored image gives its study."""
    return _TIER[result["triage"]] + float(result["abnormality_score"])


def place_reason(result: Mapping[str, Any]) -> str:
    positives = [f for f in result["findings"] if f["positive"]]
    if result["triage"] == "critical":
        positives = [f for f in positives if f.get("critical")]
    top = max(positives or result["findings"], key=strength)
    point = "no operating point" if top["threshold"] is None else f"operating point {top['threshold']:.2f}"
    finding = f"{top['label']} {top['probability']:.2f} ({point})"
    if result["triage"] == "critical":
        return f"critical finding: {finding}"
    if result["triage"] == "abnormal":
        return f"abnormal: {finding}"
    return f"no finding past its operating point; highest {finding}"


@dataclass(frozen=True)
class Ranked:
    study_uid: str
    place: float
    rank: float
    waited_s: float
    reason: str


def rank(
    study_uid: str, place: float, first_seen: float, stored_reason: str, now: float, max_wait_s: float
) -> Ranked:
    waited = max(0.0, now - first_seen)
    boost = AGING_SPAN * waited / max_wait_s
    reason = stored_reason
    if waited >= max_wait_s:
        reason += (
            f"; waiting {_duration(waited)}, past the maximum of {_duration(max_wait_s)}: moved to the top"
        )
    elif boost >= 0.05:
        reason += f"; waiting {_duration(waited)}: raised by {boost:.2f}"
    return Ranked(study_uid, place, place + boost, waited, reason)


def _duration(seconds: float) -> str:
    minutes = int(seconds // 60)
    return f"{minutes // 60}h{minutes % 60:02d}m" if minutes >= 60 else f"{minutes}m{int(seconds % 60):02d}s"
