"""PNG renderings for the worklist page: the image the model saw, and a finding's heatmap.

Both are drawn at the model input's size (the letterboxed, resized radiograph), so that the
heatmap lies exactly over the preview and the reader sees what the score was computed from.
The model input already went through the DICOM grayscale pipeline (VOI LUT or window,
MONOCHROME1 inverted: PS3.4 N.2), so it is displayed as is: 0 black, 1 white.
"""

import io
from collections.abc import Mapping

import numpy as np
import pydicom
from PIL import Image

# Descriptive attributes shown to the reader: none of them identifies the patient (no name, ID,
# birth date, accession number, dates or institution: README "PHI").
SHOWN_KEYWORDS = (
    "Modality",
    "ViewPosition",
    "BodyPartExamined",
    "StudyDescription",
    "SeriesDescription",
    "PhotometricInterpretation",
)
HEAT_FLOOR = 0.2  # activation below this share of the map's range is left transparent


def preview_png(image: np.ndarray) -> bytes:
    """8-bit grayscale PNG of a model input: ``image`` is (rows, cols), uint8 or 0-1 float."""
    if image.dtype != np.uint8:
        image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    return _png(Image.fromarray(image, mode="L"))


def heatmap_png(cam: np.ndarray, shape: tuple[int, int]) -> bytes:
    """RGBA PNG of one class activation map (h, w), upsampled to ``shape`` (rows, cols).

    The map is scaled to its own range (it says where the model looked, not how likely the
    finding is), coloured red to yellow, and transparent where it is weak, so that the page can
    lay it over the preview at any opacity.
    """
    heat = _upsampled(cam, shape)
    rgba = np.empty((*shape, 4), dtype=np.uint8)
    rgba[..., 0] = np.clip(2 * heat, 0, 1) * 255
    rgba[..., 1] = np.clip(2 * heat - 1, 0, 1) * 255
    rgba[..., 2] = 0
    rgba[..., 3] = np.clip((heat - HEAT_FLOOR) / (1 - HEAT_FLOOR), 0, 1) * 255
    return _png(Image.fromarray(rgba, mode="RGBA"))


def describe(header: bytes | None) -> dict[str, str]:
    """The shown attributes of a stored DICOM header (no pixels); {} for non-DICOM input."""
    if not header:
        return {}
    ds = pydicom.dcmread(io.BytesIO(header), stop_before_pixels=True)
    return {k: str(ds.get(k)) for k in SHOWN_KEYWORDS if ds.get(k) not in (None, "")}


def label_index(findings: list[Mapping[str, object]], label: str) -> int | None:
    """Index of ``label`` in a prediction's findings (the model's output order), or None."""
    return next((i for i, f in enumerate(findings) if f.get("label") == label), None)


def _upsampled(cam: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The map resized (bilinear) to ``shape`` and scaled to 0-1 over its own range."""
    rows, cols = shape
    small = Image.fromarray(np.nan_to_num(cam.astype(np.float32)), mode="F")
    up = np.asarray(small.resize((cols, rows), Image.Resampling.BILINEAR))
    span = float(up.max() - up.min())
    return (up - up.min()) / span if span > 0 else np.zeros_like(up)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
