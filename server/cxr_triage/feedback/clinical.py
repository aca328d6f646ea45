"""Clinical metrics from radiologists' reports: per-finding sensitivity and PPV of the model's
calls (at the operating points) over a window of the most recent reported studies.

A report's labels are the truth for the labels it names; labels it does not name are not
counted. The model's call for a study is the study-level ``positive`` of that finding.
"""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Counts:
    tp: int = 0
    fp: int = 0
    fn: int = 0

    @property
    def sensitivity(self) -> float | None:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else None

    @property
    def ppv(self) -> float | None:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else None


@dataclass
class ClinicalWindow:
    studies: int = 0
    by_label: dict[str, Counts] = field(default_factory=dict)


def clinical_window(pairs: Iterable[tuple[Mapping[str, bool], Mapping[str, Any]]]) -> ClinicalWindow:
    """``pairs``: (reported labels, study result) of each reported, scored study."""
    window = ClinicalWindow()
    for labels, result in pairs:
        # a finding without an operating point makes no call: nothing to count
        called = {f["label"]: bool(f["positive"]) for f in result["findings"] if f["positive"] is not None}
        window.studies += 1
        for label, truth in labels.items():
            if label not in called:
                continue
            counts = window.by_label.setdefault(label, Counts())
            counts.tp += int(truth and called[label])
            counts.fp += int(not truth and called[label])
            counts.fn += int(truth and not called[label])
    return window
