"""The triage result as a DICOM Comprehensive SR (highdicom), for storing back to the PACS.

Content (coding scheme 99CXRTRIAGE, private to this service, for what DICOM has no code for)::

    CONTAINER  CXR triage result
      TEXT     Algorithm Name (DCM 111001) / Algorithm Version (DCM 111003) / Weights provenance
      CODE     Triage class: critical | abnormal | normal
      NUM      Abnormality score (0-1)
      CONTAINER <finding label>     one per label, in the model's label order
        NUM    Probability, NUM Operating point, CODE Call: positive | negative
      IMAGE    Source of Measurement (DCM 121112), one per scored instance

The SR belongs to the source study: patient and study attributes are copied from the source
headers by highdicom; the SR never carries pixel data.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from cxr_triage import __version__

SCHEME = "99CXRTRIAGE"
RELATION = hd.sr.RelationshipTypeValues.CONTAINS
UNITLESS = Code("1", "UCUM", "no units")


def _code(value: str, meaning: str | None = None) -> Code:
    return Code(value[:16], SCHEME, meaning or value)


def build_sr(headers: Sequence[Dataset], result: Mapping[str, Any], series_number: int = 9001) -> Dataset:
    """A Comprehensive SR for one study result (as GET /v1/studies/{uid} returns ``result``).

    ``headers`` are the source instances without pixel data, all of one study.
    """
    root = hd.sr.ContainerContentItem(name=_code("cxr-triage", "CXR triage result"))
    root.ContentSequence = DicomSequence([*_model_items(result["model"]), *_score_items(result)])
    root.ContentSequence.extend(_finding(f) for f in result["findings"])
    root.ContentSequence.extend(
        hd.sr.ImageContentItem(
            name=Code("121112", "DCM", "Source of Measurement"),
            referenced_sop_class_uid=h.SOPClassUID,
            referenced_sop_instance_uid=h.SOPInstanceUID,
            relationship_type=RELATION,
        )
        for h in headers
    )
    sr = hd.sr.ComprehensiveSR(
        evidence=list(headers),
        content=root,
        series_instance_uid=generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="cxr-triage",
        is_complete=True,
    )
    sr.SoftwareVersions = __version__
    trained = result["model"]["weights"] == "trained"
    sr.SeriesDescription = "CXR triage (AI)" if trained else "CXR triage (AI, untrained, not clinical)"
    return sr


def _model_items(model: Mapping[str, str]) -> list[Dataset]:
    return [
        hd.sr.TextContentItem(Code("111001", "DCM", "Algorithm Name"), model["name"], RELATION),
        hd.sr.TextContentItem(Code("111003", "DCM", "Algorithm Version"), str(model["version"]), RELATION),
        hd.sr.TextContentItem(_code("weights", "Weights provenance"), model["weights"], RELATION),
    ]


def _score_items(result: Mapping[str, Any]) -> list[Dataset]:
    return [
        hd.sr.CodeContentItem(_code("triage-class", "Triage class"), _code(result["triage"]), RELATION),
        _num("abnormality", "Abnormality score", result["abnormality_score"]),
    ]


def _finding(finding: Mapping[str, Any]) -> Dataset:
    item = hd.sr.ContainerContentItem(name=_code(finding["label"]), relationship_type=RELATION)
    # A zero-shot finding without an operating point is reported with its score, and no call.
    call = {True: "positive", False: "negative", None: "not-called"}[finding["positive"]]
    content = [_num("probability", "Probability", finding["probability"])]
    if finding["threshold"] is not None:
        content.append(_num("operating-point", "Operating point", finding["threshold"]))
    content.append(hd.sr.CodeContentItem(_code("call", "Call"), _code(call), RELATION))
    if finding.get("unseen"):
        content.append(
            hd.sr.TextContentItem(_code("zero-shot", "Zero-shot"), "not trained on this finding", RELATION)
        )
    item.ContentSequence = DicomSequence(content)
    return item


def _num(value: str, meaning: str, number: float) -> Dataset:
    return hd.sr.NumContentItem(_code(value, meaning), float(number), UNITLESS, relationship_type=RELATION)
