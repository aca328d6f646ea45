"""PNG (8/16-bit) and JPEG decoding, format sniffing and the errors for bad uploads."""

import io

import numpy as np
import pytest
from PIL import Image

from cxr_triage import errors
from cxr_triage.imaging import ImageLimits, decode, prepare, small_raster, sniff
from cxr_triage.repository.models import InputSpec
from tests.helpers import chest_u8, dicom_bytes, jpeg_bytes, png_bytes

LIMITS = ImageLimits()


def test_8bit_png_is_scaled_by_255() -> None:
    arr = np.array([[0, 128, 255]], dtype=np.uint8)
    out = decode(png_bytes(arr), "image/png", LIMITS)
    assert out.bits == 8
    np.testing.assert_allclose(out.pixels, arr / 255.0, atol=1e-6)


def test_16bit_png_keeps_its_precision() -> None:
    arr = np.array([[1000, 1001, 4000]], dtype=np.uint16)
    out = decode(png_bytes(arr), "image/png", LIMITS)
    assert out.bits == 16
    np.testing.assert_allclose(out.pixels, [[0.0, 1 / 3000, 1.0]], atol=1e-6)


def test_rgb_png_becomes_luminance() -> None:
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[..., 1] = 200
    out = decode(png_bytes(rgb), "image/png", LIMITS)
    assert out.pixels.shape == (2, 2)
    assert 0.4 < out.pixels.mean() < 0.5  # 0.587 * 200 / 255


def test_jpeg_of_a_chest_matches_its_png_closely() -> None:
    chest = chest_u8(512)
    spec = InputSpec(size=224)
    a = prepare(png_bytes(chest), "image/png", spec, LIMITS).pixels
    b = prepare(jpeg_bytes(chest), "image/jpeg", spec, LIMITS).pixels
    assert np.abs(a - b).mean() < 0.01


def test_content_type_may_lie_the_bytes_decide() -> None:
    assert decode(png_bytes(chest_u8(64)), "image/jpeg", LIMITS).source == "png"


def test_sniff_recognises_each_format() -> None:
    assert sniff(png_bytes(chest_u8(8))) == "png"
    assert sniff(jpeg_bytes(chest_u8(8))) == "jpeg"
    assert sniff(dicom_bytes("RG1_UNCR.dcm")) == "dicom"
    assert sniff(b"GIF89a....") is None


def test_unknown_bytes_are_not_an_image() -> None:
    with pytest.raises(errors.NotAnImage):
        decode(b"hello, this is text", "image/png", LIMITS)


def test_unaccepted_media_type_is_415() -> None:
    with pytest.raises(errors.UnsupportedMediaType):
        decode(png_bytes(chest_u8(8)), "text/plain", LIMITS)


@pytest.mark.parametrize("encode", [png_bytes, jpeg_bytes], ids=["png", "jpeg"])
def test_truncated_raster_is_corrupt(encode) -> None:  # type: ignore[no-untyped-def]
    data = encode(chest_u8(256))
    with pytest.raises(errors.CorruptImage):
        decode(data[: len(data) // 2], "image/png", LIMITS)


def test_pixel_limit_is_checked_from_the_header() -> None:
    with pytest.raises(errors.ImageTooLarge):
        decode(png_bytes(chest_u8(200)), "image/png", ImageLimits(max_pixels=100 * 100))


def test_decompression_bomb_png_is_refused_without_decoding() -> None:
    # A 1-bit 40000 x 40000 PNG: a few hundred kB on the wire, 1.6 Gpixel decoded.
    buf = io.BytesIO()
    Image.new("1", (40000, 40000)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 1_000_000
    with pytest.raises(errors.ImageTooLarge):
        decode(buf.getvalue(), "image/png", LIMITS)


def test_animated_png_is_multi_frame() -> None:
    frames = [Image.fromarray(chest_u8(32)), Image.fromarray(255 - chest_u8(32))]
    buf = io.BytesIO()
    frames[0].save(buf, format="PNG", save_all=True, append_images=frames[1:])
    with pytest.raises(errors.MultiFrame):
        decode(buf.getvalue(), "image/png", LIMITS)


def test_small_raster_is_told_from_the_header() -> None:
    limit = 512 * 512
    assert small_raster(png_bytes(chest_u8(224)), limit) and small_raster(jpeg_bytes(chest_u8(512)), limit)
    assert not small_raster(png_bytes(chest_u8(600)), limit)
    assert not small_raster(png_bytes(chest_u8(224)), 0)  # 0: never
    assert not small_raster(dicom_bytes("RG1_UNCR.dcm"), limit)  # DICOM: always the decoding pool
    assert not small_raster(b"\x89PNG\r\n\x1a\n" + b"\0" * 64, limit)  # a broken header
    bomb = io.BytesIO()
    Image.new("1", (40000, 40000)).save(bomb, format="PNG")  # small on the wire, huge declared
    assert not small_raster(bomb.getvalue(), limit)
