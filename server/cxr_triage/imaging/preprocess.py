"""Decoded radiograph -> model input, and a batch of inputs -> the engine's tensor."""

from collections.abc import Sequence

import numpy as np
from PIL import Image

from cxr_triage.repository.models import InputSpec


def resize_for_model(pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Resize a 0-1 float image to ``spec.size`` square (letterboxed or squashed).

    Pillow's resize filters over the whole source footprint when shrinking (antialiased), which
    matters for 2-3k pixel radiographs going to 224. Returns float32 (size, size) in 0-1.
    """
    size = spec.size
    rows, cols = pixels.shape
    if spec.resize == "squash":
        new_w = new_h = size
    else:
        scale = size / max(rows, cols)
        new_w, new_h = max(1, round(cols * scale)), max(1, round(rows * scale))
    if (new_h, new_w) == (rows, cols):  # already that size: Pillow would return a copy
        small = np.asarray(pixels, dtype=np.float32)
    else:
        img = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32), mode="F")
        small = np.asarray(img.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=3.0))
    if (new_h, new_w) == (size, size):
        return small
    out = np.zeros((size, size), dtype=np.float32)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    out[top : top + new_h, left : left + new_w] = small
    return out


def to_batch(images: Sequence[np.ndarray], spec: InputSpec) -> np.ndarray:
    """Stack (size, size) 0-1 images into the engine's NCHW float32 tensor, normalised per channel."""
    gray = np.stack(images).astype(np.float32, copy=False)[:, None, :, :]
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(1, -1, 1, 1)
    return np.ascontiguousarray((np.repeat(gray, spec.channels, axis=1) - mean) / std, dtype=np.float32)
