"""Fuzzing the decoders and the multipart parser: malformed input gives a typed error, never a
crash or a hang (hypothesis; each example has a deadline)."""

import contextlib
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cxr_triage.dicomweb.multipart import split
from cxr_triage.errors import CxrError
from cxr_triage.imaging import ImageLimits, decode
from tests.helpers import chest_u8, dicom_bytes, jpeg_bytes, png_bytes

LIMITS = ImageLimits(max_pixels=4_000_000)
FUZZ = settings(max_examples=150, deadline=timedelta(seconds=3), suppress_health_check=[HealthCheck.too_slow])
SEEDS = {
    "dicom": dicom_bytes("MR_small.dcm"),
    "dicom-rle": dicom_bytes("MR_small_RLE.dcm"),
    "dicom-j2k": dicom_bytes("emri_small_jpeg_2k_lossless.dcm"),
    "png": png_bytes(chest_u8(48)),
    "jpeg": jpeg_bytes(chest_u8(48)),
}
MEDIA = {"dicom": "application/dicom", "png": "image/png", "jpeg": "image/jpeg"}


def decode_or_typed_error(data: bytes, media_type: str) -> None:
    with contextlib.suppress(CxrError):  # a typed error is the contract; anything else fails
        decode(data, media_type, LIMITS)


@pytest.mark.parametrize("seed", sorted(SEEDS))
@FUZZ
@given(data=st.data())
def test_mutated_files_decode_or_fail_typed(seed: str, data: st.DataObject) -> None:
    blob = bytearray(SEEDS[seed])
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(blob) - 1))
        blob[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(min(len(blob), 64), len(blob)))
    decode_or_typed_error(bytes(blob[:cut]), MEDIA[seed.split("-")[0]])


@FUZZ
@given(blob=st.binary(max_size=4096), media=st.sampled_from(sorted(MEDIA.values())))
def test_random_bytes_fail_typed(blob: bytes, media: str) -> None:
    decode_or_typed_error(blob, media)


@FUZZ
@given(body=st.binary(max_size=2048), boundary=st.sampled_from([b"b", b"xyz", b"--"]))
def test_multipart_bodies_split_or_fail_typed(body: bytes, boundary: bytes) -> None:
    with contextlib.suppress(CxrError):
        split(b"--" + boundary + b"\r\n" + body, boundary)
