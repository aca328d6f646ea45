"""bytes -> float32 radiograph -> model input.

Public entry points: :func:`prepare` (what the server calls: in a process pool, or inline for a
small PNG or JPEG, see :func:`small_raster`) and :func:`decode` (format sniffing + decoding, for
tools and tests).
"""

import time
from io import BytesIO

from PIL import Image

from cxr_triage.errors import NotAnImage, UnsupportedMediaType
from cxr_triage.imaging.dicom import decode_dicom, warm_decoders
from cxr_triage.imaging.preprocess import resize_for_model, resize_levels, to_batch
from cxr_triage.imaging.raster import decode_raster, read_levels
from cxr_triage.imaging.types import DecodedImage, ImageLimits, ModelInput, SourceFormat
from cxr_triage.repository.models import InputSpec

__all__ = [
    "ACCEPTED_MEDIA_TYPES",
    "DecodedImage",
    "ImageLimits",
    "ModelInput",
    "decode",
    "prepare",
    "resize_for_model",
    "sniff",
    "to_batch",
    "warm_decoders",
]

ACCEPTED_MEDIA_TYPES: dict[str, SourceFormat] = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "application/dicom": "dicom",
}


def sniff(data: bytes) -> SourceFormat | None:
    """The format the bytes really are, by magic number (the Content-Type may lie)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[128:132] == b"DICM":
        return "dicom"
    return None


def decode(data: bytes, media_type: str, limits: ImageLimits) -> DecodedImage:
    """Decode an uploaded image whatever its format.

    ``media_type`` is the request's Content-Type (parameters stripped). The bytes decide the
    decoder; a Content-Type outside ACCEPTED_MEDIA_TYPES is refused (415) before that.

    Raises:
        UnsupportedMediaType, and the ImageError family (422) / ImageTooLarge (413).
    """
    source = _source(data, media_type)
    if source == "dicom":
        return decode_dicom(data, limits)
    return decode_raster(data, source, limits)


def _source(data: bytes, media_type: str) -> SourceFormat:
    declared = ACCEPTED_MEDIA_TYPES.get(media_type)
    if declared is None and media_type not in ("application/octet-stream", ""):
        raise UnsupportedMediaType(
            f"Content-Type {media_type!r} is not accepted; use one of {sorted(ACCEPTED_MEDIA_TYPES)}"
        )
    source = sniff(data)
    if source is None:
        what = f"a {declared.upper()} image" if declared else "a PNG, JPEG or DICOM image"
        raise NotAnImage(f"the body is not {what} (unknown file signature); check what was sent")
    return source


def small_raster(data: bytes, max_pixels: int) -> bool:
    """Whether ``data`` is a PNG or JPEG whose header declares at most ``max_pixels`` pixels: an
    image cheap enough to decode where it arrived. Reads the header only; anything else (DICOM,
    a larger image, bytes Pillow cannot open) is False."""
    if max_pixels <= 0 or sniff(data) not in ("png", "jpeg"):
        return False
    try:
        with Image.open(BytesIO(data)) as img:
            width, height = img.size
    except Exception:  # hostile bytes: the decoding pool gives the error
        return False
    return width * height <= max_pixels


def prepare(data: bytes, media_type: str, spec: InputSpec, limits: ImageLimits) -> ModelInput:
    """Decode and resize one upload for a model: pure, so it runs in a decoding process, or in
    the HTTP process for a small raster (``small_raster``)."""
    start = time.perf_counter()
    source = _source(data, media_type)
    if source == "dicom":
        image = decode_dicom(data, limits)
        pixels, warnings, dicom = resize_for_model(image.pixels, spec), image.warnings, image.dicom
    else:  # resized before the float conversion: see resize_levels
        levels = read_levels(data, source, limits)
        pixels, warnings, dicom = resize_levels(levels.image, levels.lo, levels.hi, spec), [], {}
    return ModelInput(
        pixels=pixels,
        source=source,
        warnings=warnings,
        decode_ms=(time.perf_counter() - start) * 1000.0,
        dicom=dicom,
    )
