"""Values passed between the imaging stages."""

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

SourceFormat = Literal["png", "jpeg", "dicom"]


@dataclass(frozen=True)
class ImageLimits:
    """Guards against decompression bombs: both the bytes received and the decoded pixels; and
    the most threads one decode may take while cores are idle (JPEG 2000; ``cxr_triage.cores``)."""

    max_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 40_000_000
    decode_threads: int = 1


@dataclass
class DecodedImage:
    """A radiograph as displayed: float32 (rows, columns) in 0-1, 0 = black (MONOCHROME2 sense).

    ``warnings`` are reasons to doubt the result that do not stop scoring (a lateral view,
    a non-CR/DX modality). ``dicom`` holds the few identifiers later stages need (UIDs,
    modality); never log it, it can identify a patient.
    """

    pixels: np.ndarray
    source: SourceFormat
    bits: int
    warnings: list[str] = field(default_factory=list)
    dicom: dict[str, str] = field(default_factory=dict)


@dataclass
class ModelInput:
    """One image ready for batching: float32 (size, size) in 0-1; normalisation happens per batch."""

    pixels: np.ndarray
    source: SourceFormat
    warnings: list[str]
    decode_ms: float
    dicom: dict[str, str] = field(default_factory=dict)
