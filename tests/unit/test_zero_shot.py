"""Zero-shot findings without a server: the gzsl model config, findings without an operating
point through triage, study combination and DICOM SR, and the Redis store of added findings."""

import pydicom
import pytest
import redis
from pydantic import ValidationError

from cxr_triage.dicomweb.sr import build_sr
from cxr_triage.queue.findings import AddedFinding, FindingStore, latents_of
from cxr_triage.repository.models import ModelConfig
from cxr_triage.triage import abnormality_score, findings_out, score_findings, triage_class
from cxr_triage.triage.study import combine
from cxr_triage.triage.worklist import place_reason
from tests.helpers import dicom_path

BASE = {
    "name": "gzsl-x",
    "type": "gzsl",
    "architecture": "densenet121",
    "labels": ["Effusion", "Edema"],
    "input": {"size": 64},
}


def test_a_gzsl_config_may_leave_labels_without_an_operating_point() -> None:
    config = ModelConfig.model_validate({**BASE, "thresholds": {"Effusion": 0.6}})
    assert config.type == "gzsl" and config.thresholds == {"Effusion": 0.6}
    with pytest.raises(ValidationError, match="thresholds must have exactly one entry per label"):
        ModelConfig.model_validate({**BASE, "type": "classifier", "thresholds": {"Effusion": 0.6}})
    with pytest.raises(ValidationError, match="unknown"):
        ModelConfig.model_validate({**BASE, "thresholds": {"Hernia": 0.6}})
    with pytest.raises(ValidationError, match="heatmap"):
        ModelConfig.model_validate({**BASE, "heatmap": "cam"})


def test_a_finding_without_an_operating_point_is_scored_but_never_called() -> None:
    findings = score_findings(
        ["Effusion", "Pneumoperitoneum"], [0.2, 0.99], {"Effusion": 0.5}, {"Pneumoperitoneum"}
    )
    out = findings_out(findings, critical=["Pneumoperitoneum"])
    assert out[1] == {
        "label": "Pneumoperitoneum",
        "probability": 0.99,
        "threshold": None,
        "positive": None,
        "critical": True,
        "unseen": True,
    }
    assert out[0]["positive"] is False and out[0]["unseen"] is False
    assert abnormality_score(findings) < 0.5 and triage_class(findings, ["Pneumoperitoneum"]) == "normal"
    result = {"findings": out, "triage": "normal", "abnormality_score": abnormality_score(findings)}
    assert "Effusion 0.20 (operating point 0.50)" in place_reason(result)
    alone = findings_out(score_findings(["Pneumoperitoneum"], [0.9], {}, {"Pneumoperitoneum"}), [])
    assert "(no operating point)" in place_reason(
        {"findings": alone, "triage": "normal", "abnormality_score": 0.0}
    )


def test_images_of_a_study_combine_by_label_when_a_finding_was_added_between_them() -> None:
    first = {"findings": findings_out(score_findings(["Effusion"], [0.7], {"Effusion": 0.5}), [])}
    second = {
        "findings": findings_out(
            score_findings(
                ["Effusion", "Pneumoperitoneum"], [0.3, 0.8], {"Effusion": 0.5}, {"Pneumoperitoneum"}
            ),
            [],
        )
    }
    study = combine([first, second], critical=["Effusion"])
    by = {f["label"]: f for f in study["findings"]}
    assert by["Effusion"]["probability"] == 0.7 and by["Effusion"]["positive"] is True
    assert by["Pneumoperitoneum"]["probability"] == 0.8 and by["Pneumoperitoneum"]["positive"] is None
    assert by["Pneumoperitoneum"]["unseen"] is True and study["triage"] == "critical"


def test_the_structured_report_says_not_called_for_a_finding_without_an_operating_point() -> None:
    header = pydicom.dcmread(dicom_path("RG1_UNCR.dcm"), stop_before_pixels=True)
    findings = score_findings(
        ["Effusion", "Pneumoperitoneum"], [0.7, 0.4], {"Effusion": 0.5}, {"Pneumoperitoneum"}
    )
    result = {
        "model": {"name": "gzsl-x", "version": "1", "weights": "untrained"},
        "findings": findings_out(findings, []),
        "triage": "abnormal",
        "abnormality_score": abnormality_score(findings),
    }
    text = str(build_sr([header], result))
    assert "not-called" in text and "Zero-shot" in text and text.count("Operating point") == 1


def test_the_store_adds_once_lists_in_order_and_bumps_its_revision(redis_url: str) -> None:
    store = FindingStore(redis.Redis.from_url(redis_url))
    before = store.revision()

    def finding(label: str) -> AddedFinding:
        return AddedFinding(label, None, label.lower(), (1.0, 0.0, 0.0))

    assert store.add("m", {"1": finding("B"), "2": finding("B")})
    assert store.add("m", {"1": finding("A")})
    assert not store.add("m", {"1": finding("A"), "2": finding("A")})  # version 1 has it: neither gets it
    assert store.get("m", "2", "A") is None
    assert [f.label for f in store.list("m", "1")] == ["B", "A"] and store.revision() == before + 2
    assert latents_of(store.list("m", "1"), 3).shape == (2, 3)
    with pytest.raises(ValueError, match="4-d"):
        latents_of(store.list("m", "1"), 4)

    updated = store.set_operating_point("m", "1", "A", 0.4, {"chosen_on": "x"})
    assert updated is not None and updated.threshold == 0.4 and store.get("m", "2", "B").threshold is None
    assert store.set_operating_point("m", "1", "Z", 0.4, {}) is None
    assert store.remove("m", ["1", "2"], "B") and not store.remove("m", ["1", "2"], "B")
    assert [f.label for f in store.list("m", "1")] == ["A"] and store.list("m", "2") == []
