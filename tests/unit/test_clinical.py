import pytest

from cxr_triage.feedback.clinical import clinical_window


def result(**calls: bool) -> dict:
    return {"findings": [{"label": k, "positive": v} for k, v in calls.items()]}


def test_sensitivity_and_ppv_per_finding_over_the_window() -> None:
    pairs = [
        ({"Effusion": True, "Mass": False}, result(Effusion=True, Mass=True, Edema=False)),
        ({"Effusion": True}, result(Effusion=False, Mass=False)),
        ({"Effusion": False, "Unknown": True}, result(Effusion=True)),
    ]
    window = clinical_window(pairs)
    effusion, mass = window.by_label["Effusion"], window.by_label["Mass"]
    assert window.studies == 3 and "Unknown" not in window.by_label and "Edema" not in window.by_label
    assert (effusion.tp, effusion.fp, effusion.fn) == (1, 1, 1)
    assert effusion.sensitivity == pytest.approx(0.5) and effusion.ppv == pytest.approx(0.5)
    assert mass.sensitivity is None and mass.ppv == 0.0
