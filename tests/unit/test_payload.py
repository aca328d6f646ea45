"""The model input as it travels through Redis (queue.payload)."""

import io
import json
import struct

import numpy as np
import pytest
from PIL import Image

from cxr_triage.imaging import ImageLimits, ModelInput, prepare
from cxr_triage.queue import payload
from cxr_triage.repository.models import InputSpec

SPEC = InputSpec(size=64)


def png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def radiograph(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (rows, cols), dtype=np.uint8)


def header(blob: bytes) -> dict:
    (n,) = struct.unpack_from("<I", blob)
    return json.loads(blob[4 : 4 + n])


def test_an_8_bit_image_at_the_model_size_comes_back_bit_for_bit_in_a_quarter_of_the_bytes() -> None:
    """Nothing resized: every pixel is level / 255, so the worker scores exactly what the HTTP
    process prepared (float16 would round it), sent as one byte per pixel."""
    for shape in ((64, 64), (64, 40)):  # square, and letterboxed (zero bands) without resizing
        item = prepare(png(radiograph(*shape)), "image/png", SPEC, ImageLimits())
        blob = payload.dumps(item)
        assert header(blob)["dtype"] == "uint8" and len(blob) < 64 * 64 + 400
        back = payload.loads(blob)
        assert back.pixels.dtype == np.float32
        assert np.array_equal(back.pixels.view(np.uint32), item.pixels.view(np.uint32))
        assert (back.source, back.warnings, back.dicom) == (item.source, item.warnings, item.dicom)


def test_a_resized_image_travels_as_float16() -> None:
    item = prepare(png(radiograph(300, 260, seed=1)), "image/png", SPEC, ImageLimits())
    blob = payload.dumps(item)
    assert header(blob)["dtype"] == "float16"
    back = payload.loads(blob)
    np.testing.assert_allclose(back.pixels, item.pixels, rtol=2**-11, atol=2**-24)
    assert not np.array_equal(back.pixels, item.pixels)  # rounded: why uint8 is taken when exact


def test_one_value_off_the_8_bit_grid_past_the_first_look_keeps_float16() -> None:
    pixels = radiograph(64, 64, seed=2).astype(np.float32) / 255.0
    assert payload.eight_bit(pixels) is not None
    pixels[60, 60] = 0.5  # not k/255, far past the first 1024 pixels looked at
    assert payload.eight_bit(pixels) is None
    for bad in (np.float32(np.nan), np.float32(256 / 255), np.float32(-1 / 255)):
        odd = pixels.copy()
        odd[0, 0] = bad
        assert payload.eight_bit(odd) is None
    item = ModelInput(pixels=pixels, source="png", warnings=[], decode_ms=1.0)
    assert header(payload.dumps(item))["dtype"] == "float16"


def test_a_payload_queued_by_an_older_version_still_loads_and_an_unknown_one_is_refused() -> None:
    """Jobs survive an upgrade in Redis: a payload without ``dtype`` is float16."""
    pixels = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    old_header = json.dumps(
        {"shape": [64, 64], "source": "dicom", "warnings": ["lateral"], "decode_ms": 3.0, "dicom": {}}
    ).encode()
    old = struct.pack("<I", len(old_header)) + old_header + pixels.astype(np.float16).tobytes()
    back = payload.loads(old)
    np.testing.assert_allclose(back.pixels, pixels, rtol=2**-11)
    assert back.warnings == ["lateral"]
    odd = json.dumps({**json.loads(old_header), "dtype": "int64"}).encode()
    with pytest.raises(ValueError, match="dtype"):
        payload.loads(struct.pack("<I", len(odd)) + odd + pixels.astype(np.float16).tobytes())
