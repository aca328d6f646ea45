"""PNG and JPEG decoding with Pillow: 8- and 16-bit grayscale, colour reduced to luminance."""

import warnings
from dataclasses import dataclass
from io import BytesIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from cxr_triage.errors import CorruptImage, ImageTooLarge, MultiFrame, NotAnImage, UnsupportedPhotometric
from cxr_triage.imaging.preprocess import to_unit
from cxr_triage.imaging.types import DecodedImage, ImageLimits, SourceFormat

_GRAY16 = {"I;16", "I;16B", "I;16L", "I"}
_TO_LUMA = {"RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "P", "PA", "LA", "1", "L"}


@dataclass
class Levels:
    """A decoded PNG/JPEG before it becomes 0-1 floats: a Pillow image of its stored levels
    (L for 8 bits, I;16 or I for 16), and the levels that map to 0 and 1."""

    image: Image.Image
    lo: float
    hi: float
    bits: int


def decode_raster(data: bytes, source: SourceFormat, limits: ImageLimits) -> DecodedImage:
    """Decode PNG/JPEG bytes into a 0-1 float image.

    8-bit images are divided by 255 (the scale public CXR datasets are stored in). 16-bit
    images carry no window, so their stored range is stretched to 0-1, as for a DICOM
    without VOI.

    Raises:
        NotAnImage, CorruptImage, ImageTooLarge, MultiFrame, UnsupportedPhotometric.
    """
    levels = read_levels(data, source, limits)
    arr = np.asarray(levels.image, dtype=np.float32)
    return DecodedImage(pixels=to_unit(arr, levels.lo, levels.hi), source=source, bits=levels.bits)


def read_levels(data: bytes, source: SourceFormat, limits: ImageLimits) -> Levels:
    """Decode PNG/JPEG bytes to their stored levels (see :class:`Levels`); the same errors as
    :func:`decode_raster`."""
    img = _open(data, source, limits)
    try:
        img.load()
    except Exception as exc:  # boundary for hostile bytes: Pillow's decoders raise many types
        raise CorruptImage(
            f"the {source.upper()} file is truncated or corrupt ({exc}); resend the whole file"
        ) from exc
    if img.mode in _GRAY16:
        lo, hi = np.asarray(img.getextrema(), dtype=np.float64)  # one band: (min, max)
        return Levels(image=img, lo=float(lo), hi=float(hi), bits=16)
    if img.mode not in _TO_LUMA:
        raise UnsupportedPhotometric(
            f"{source.upper()} mode {img.mode} is not supported; send grayscale or RGB"
        )
    return Levels(image=img.convert("L"), lo=0.0, hi=255.0, bits=8)


def _open(data: bytes, source: SourceFormat, limits: ImageLimits) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(BytesIO(data), formats=["PNG"] if source == "png" else ["JPEG", "MPO"])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(f"image is too large to decode safely ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise NotAnImage(
            f"the body is not a readable {source.upper()} image; check the file and Content-Type"
        ) from exc
    except Exception as exc:  # boundary for hostile bytes: Pillow's plugins raise many types
        raise CorruptImage(f"the {source.upper()} header is corrupt ({type(exc).__name__})") from exc
    width, height = img.size
    if width * height > limits.max_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height} pixels, above the limit of {limits.max_pixels}; downsample it first"
        )
    frames = int(getattr(img, "n_frames", 1))
    if frames > 1:
        raise MultiFrame(f"the {source.upper()} holds {frames} frames; send one radiograph per request")
    return img
