"""Heatmap overlays: a finding's class activation map over the model's view of the image.

The overlay is drawn on the model input (the letterboxed, resized radiograph the model saw),
so it shows exactly what the score was computed from. Stored to the PACS as a Secondary
Capture that references its source image.
"""

from collections.abc import Mapping
from typing import Any

import highdicom as hd
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid

from cxr_triage.triage.scoring import strength


def top_finding(prediction: Mapping[str, Any]) -> tuple[int, str]:
    """Index and label of the finding that placed the image: a positive critical one first,
    then the largest probability relative to its operating point."""
    findings = prediction["findings"]

    def key(i: int) -> tuple[bool, bool, float]:
        f = findings[i]
        return (bool(f["positive"]) and f.get("critical", False), bool(f["positive"]), strength(f))

    best = max(range(len(findings)), key=key)
    return best, findings[best]["label"]


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """RGB uint8: the 8-bit image with the map (upsampled, scaled to its own range) in red-yellow."""
    rows, cols = image.shape
    small = Image.fromarray(cam.astype(np.float32), mode="F")
    up = np.asarray(small.resize((cols, rows), Image.Resampling.BILINEAR))
    span = float(up.max() - up.min())
    heat = (up - up.min()) / span if span > 0 else np.zeros_like(up)
    colour = np.stack([np.clip(2 * heat, 0, 1), np.clip(2 * heat - 1, 0, 1), np.zeros_like(heat)], axis=-1)
    gray = np.repeat(image[..., None].astype(np.float32) / 255.0, 3, axis=-1)
    weight = alpha * heat[..., None]
    blended = ((1 - weight) * gray + weight * colour).clip(0, 1)
    return (blended * 255).round().astype(np.uint8)


def heatmap_sc(header: Dataset, rgb: np.ndarray, label: str, series_uid: str, number: int) -> Dataset:
    """A Secondary Capture of the overlay, in the source's study, referencing the source image."""
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=header,
        pixel_array=rgb,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        # The source's orientation, else a PA chest's as displayed: rows toward the patient's
        # left, columns toward the feet (PS3.3 C.7.6.1.1.1).
        patient_orientation=tuple(header.get("PatientOrientation") or ("L", "F")),
        series_instance_uid=series_uid,
        series_number=9002,
        sop_instance_uid=generate_uid(),
        instance_number=number,
        manufacturer="cxr-triage",
    )
    source = Dataset()
    source.ReferencedSOPClassUID = header.SOPClassUID
    source.ReferencedSOPInstanceUID = header.SOPInstanceUID
    sc.SourceImageSequence = DicomSequence([source])
    sc.SeriesDescription = "CXR triage heatmaps (AI, class activation map)"
    sc.ImageComments = f"class activation map for {label}, drawn on the model input"
    return sc
