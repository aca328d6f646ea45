"""A prepared model input as bytes for Redis: a JSON header, then the pixels.

An image whose every pixel is exactly k/255 (an 8-bit PNG or JPEG already at the model's size:
nothing was resized) travels as uint8, and comes back as the very same float32 values. Any
other input travels as float16, which keeps ~11 bits of a 0-1 image (finer than the 8-bit data
CXR models are trained on) at half the memory of float32. Either is read back by its header's
``dtype`` (a payload without one, queued by an older version, is float16).
"""

import json
import struct

import numpy as np

from cxr_triage.imaging import ModelInput

_LEN = struct.Struct("<I")
_SCALE = np.float32(255.0)
_PROBE = 1024  # pixels looked at first: a resized image fails here, before the whole check


def eight_bit(pixels: np.ndarray) -> np.ndarray | None:
    """``pixels`` as uint8 levels when every value is exactly level / 255 in float32 (so that
    ``levels / 255`` gives back the same floats bit for bit); None otherwise."""
    flat = pixels.reshape(-1)
    for part in (flat[:_PROBE], flat):
        levels = np.rint(part * _SCALE)
        if not (np.array_equal(levels / _SCALE, part) and levels.min() >= 0 and levels.max() <= 255):
            return None
    return levels.astype(np.uint8).reshape(pixels.shape)


def dumps(item: ModelInput) -> bytes:
    levels = eight_bit(item.pixels) if item.pixels.size else None
    dtype = "uint8" if levels is not None else "float16"
    header = json.dumps(
        {
            "shape": list(item.pixels.shape),
            "dtype": dtype,
            "source": item.source,
            "warnings": item.warnings,
            "decode_ms": item.decode_ms,
            "dicom": item.dicom,
        }
    ).encode()
    body = levels if levels is not None else item.pixels.astype(np.float16)
    return _LEN.pack(len(header)) + header + body.tobytes()


def loads(data: bytes) -> ModelInput:
    (n,) = _LEN.unpack_from(data)
    header = json.loads(data[_LEN.size : _LEN.size + n])
    dtype = header.get("dtype", "float16")
    if dtype not in ("uint8", "float16"):
        raise ValueError(f"unknown payload dtype {dtype!r}")
    raw = np.frombuffer(data[_LEN.size + n :], dtype=dtype).reshape(header["shape"])
    pixels = raw.astype(np.float32) / _SCALE if dtype == "uint8" else raw.astype(np.float32)
    return ModelInput(
        pixels=pixels,
        source=header["source"],
        warnings=header["warnings"],
        decode_ms=header["decode_ms"],
        dicom=header["dicom"],
    )
