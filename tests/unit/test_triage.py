import pytest

from cxr_triage.triage import abnormality_score, score_findings, triage_class

LABELS = ["Effusion", "Nodule", "Hernia"]
THRESHOLDS = {"Effusion": 0.4, "Nodule": 0.8, "Hernia": 0.5}


def test_findings_keep_label_order_and_threshold() -> None:
    findings = score_findings(LABELS, [0.41, 0.5, 0.1], THRESHOLDS)
    assert [f.label for f in findings] == LABELS
    assert [f.positive for f in findings] == [True, False, False]


@pytest.mark.parametrize(
    ("probs", "expected"),
    [([0.1, 0.1, 0.1], "normal"), ([0.1, 0.9, 0.1], "abnormal"), ([0.4, 0.9, 0.1], "critical")],
)
def test_triage_class(probs: list[float], expected: str) -> None:
    assert triage_class(score_findings(LABELS, probs, THRESHOLDS), critical=["Effusion"]) == expected


def test_score_crosses_one_half_exactly_at_an_operating_point() -> None:
    assert abnormality_score(score_findings(LABELS, [0.4, 0.0, 0.0], THRESHOLDS)) == pytest.approx(0.5)
    assert abnormality_score(score_findings(LABELS, [0.39, 0.79, 0.49], THRESHOLDS)) < 0.5


def test_score_compares_findings_on_their_own_operating_points() -> None:
    # Nodule at 0.85 is barely past its 0.8 threshold; Effusion at 0.7 is far past 0.4.
    a = abnormality_score(score_findings(LABELS, [0.7, 0.0, 0.0], THRESHOLDS))
    b = abnormality_score(score_findings(LABELS, [0.0, 0.85, 0.0], THRESHOLDS))
    assert a > b > 0.5


def test_length_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError):
        score_findings(LABELS, [0.1], THRESHOLDS)
