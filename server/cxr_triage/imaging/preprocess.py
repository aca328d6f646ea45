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
    rows, cols = pixels.shape
    new_w, new_h = _fitted(rows, cols, spec)
    if (new_h, new_w) == (rows, cols):  # already that size: Pillow would return a copy
        small = np.asarray(pixels, dtype=np.float32)
    else:
        floats = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32), mode="F")
        small = _shrink(floats, new_w, new_h)
    return _letterbox(small, spec)


def resize_levels(levels: Image.Image, lo: float, hi: float, spec: InputSpec) -> np.ndarray:
    """Resize a Pillow image of stored levels (L, I;16, I) for a model, mapping ``lo``..``hi`` to 0-1.

    What :func:`resize_for_model` does to ``(levels - lo) / (hi - lo)``, in the other order: the
    resize is a weighted mean, so mapping its output gives the same values (to float32 rounding),
    and the full-size image is converted to float once, inside Pillow, instead of three times
    (to float, mapped, copied into Pillow). An image already at the model's size is mapped
    exactly as the full-size path maps it, so its values are the same bits. A flat image
    (``hi <= lo``) is all zeros.
    """
    cols, rows = levels.size
    new_w, new_h = _fitted(rows, cols, spec)
    if (new_h, new_w) == (rows, cols):
        small = np.asarray(levels, dtype=np.float32)
    else:
        small = _shrink(levels.convert("F"), new_w, new_h)
    return _letterbox(np.clip(to_unit(small, lo, hi), 0.0, 1.0), spec)


def to_unit(levels: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """float32 levels -> 0-1: ``(levels - lo) / (hi - lo)``; all zeros when ``hi <= lo``."""
    if hi <= lo:
        return np.zeros_like(levels, dtype=np.float32)
    return ((levels - lo) / (hi - lo)).astype(np.float32, copy=False)


def _fitted(rows: int, cols: int, spec: InputSpec) -> tuple[int, int]:
    """(width, height) of the image inside the model's square."""
    if spec.resize == "squash":
        return spec.size, spec.size
    scale = spec.size / max(rows, cols)
    return max(1, round(cols * scale)), max(1, round(rows * scale))


def _shrink(img: Image.Image, width: int, height: int) -> np.ndarray:
    return np.asarray(img.resize((width, height), Image.Resampling.BILINEAR, reducing_gap=3.0))


def _letterbox(small: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Centre a fitted image on a black (0) square of ``spec.size``."""
    size = spec.size
    new_h, new_w = small.shape
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
