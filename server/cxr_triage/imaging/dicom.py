"""DICOM decoding for projection radiographs (PS3.3 C.7.6.3 Image Pixel, C.11 LUTs).

Order of operations is the standard's grayscale pipeline (PS3.4 N.2.1): stored values
-> BitsStored -> Modality LUT (rescale slope/intercept) -> VOI LUT or window -> 0-1 ->
MONOCHROME1 inverted, so the result always reads "0 = black" like a MONOCHROME2 image.
"""

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from io import BytesIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi, apply_windowing, get_decoder
from pydicom.uid import JPEG2000, ExplicitVRLittleEndian, JPEG2000Lossless

from cxr_triage import cores
from cxr_triage.errors import (
    CorruptImage,
    CxrError,
    ImageTooLarge,
    MultiFrame,
    NotAnImage,
    PixelDataMissing,
    UnsupportedPhotometric,
    UnsupportedTransferSyntax,
)
from cxr_triage.imaging.preprocess import to_unit
from cxr_triage.imaging.types import DecodedImage, ImageLimits

log = logging.getLogger(__name__)

_GRAY = {"MONOCHROME1", "MONOCHROME2"}
_COLOUR = {"RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT"}
_PROJECTION_MODALITIES = {"CR", "DX"}
_LATERAL_VIEWS = {"LL", "RL", "LLD", "RLD", "LATERAL", "LAT", "LEFT LATERAL", "RIGHT LATERAL"}
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_KEPT_KEYWORDS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    "Modality",
    "ViewPosition",
    "RequestedProcedurePriority",
)


def decode_dicom(data: bytes, limits: ImageLimits) -> DecodedImage:
    """Decode one single-frame DICOM image into a 0-1 float image.

    Raises:
        NotAnImage, PixelDataMissing, MultiFrame, UnsupportedPhotometric,
        UnsupportedTransferSyntax, ImageTooLarge, CorruptImage.
    """
    try:
        return _decode(data, limits)
    except (CxrError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # a Rust decoder's panic (pyo3 PanicException) is a BaseException
        # pydicom converts elements lazily, on first access, so a malformed element raises
        # wherever it is first read, with whatever type its parser uses (struct.error,
        # NotImplementedError, BytesLengthException…). All of it means one thing here.
        raise CorruptImage(f"the DICOM file is malformed ({type(exc).__name__}); check the file") from exc


def _decode(data: bytes, limits: ImageLimits) -> DecodedImage:
    ds = read_dataset(data)
    _check_image_module(ds, limits)
    stored = _stored_values(ds, limits.decode_threads)
    try:
        pixels = _to_display(stored, ds)
        return DecodedImage(
            pixels=pixels, source="dicom", bits=int(ds.BitsStored), warnings=_warnings(ds), dicom=_kept(ds)
        )
    except (ValueError, TypeError, AttributeError, KeyError, IndexError, ZeroDivisionError) as exc:
        # Malformed LUT/window/rescale attributes (e.g. WindowWidth 0, a text RescaleSlope).
        message = f"the grayscale attributes are malformed ({type(exc).__name__}: {exc})"
        raise CorruptImage(message[:300]) from exc


def read_dataset(data: bytes) -> Dataset:
    """Parse a Part 10 file (with or without the 128-byte preamble)."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(BytesIO(data))
    except InvalidDicomError as exc:
        raise NotAnImage("the body is not a DICOM Part 10 file (no DICM prefix); check the file") from exc
    except (EOFError, OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CorruptImage(
            f"the DICOM file is truncated or corrupt ({type(exc).__name__}); resend it"
        ) from exc
    if any("End of file reached" in str(w.message) for w in caught):
        raise CorruptImage("the DICOM file ends before its pixel data does (truncated); resend it")
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        raise PixelDataMissing("the DICOM object has no Pixel Data (7FE0,0010); send an image, not a report")
    return ds


def _check_image_module(ds: Dataset, limits: ImageLimits) -> None:
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames") or 1)
        photometric = str(ds.PhotometricInterpretation).strip()
        int(ds.BitsAllocated), int(ds.BitsStored)
    except (AttributeError, TypeError, ValueError) as exc:
        raise CorruptImage(
            f"the Image Pixel module is incomplete ({exc}); the file cannot be decoded"
        ) from exc
    if frames > 1:
        raise MultiFrame(f"the DICOM holds {frames} frames; send single-frame radiographs")
    if photometric not in _GRAY | _COLOUR:
        raise UnsupportedPhotometric(
            f"Photometric Interpretation {photometric} is not supported; send MONOCHROME1/2 (or RGB)"
        )
    if rows * cols > limits.max_pixels:
        raise ImageTooLarge(f"image is {cols}x{rows} pixels, above the limit of {limits.max_pixels}")
    tsyntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if tsyntax is not None and not tsyntax.is_transfer_syntax:
        raise UnsupportedTransferSyntax(f"transfer syntax {tsyntax} is unknown; send a standard one")
    if tsyntax is not None and tsyntax.is_compressed:
        try:
            available = get_decoder(tsyntax).is_available
        except NotImplementedError:
            available = False
        if not available:
            raise UnsupportedTransferSyntax(
                f"transfer syntax {tsyntax.name} cannot be decoded here; send it uncompressed, "
                "JPEG 2000, JPEG Lossless, JPEG-LS or RLE"
            )


# The decoder plugin tried first per transfer syntax, where one is clearly cheaper than
# pydicom's default order (which tries GDCM first). JPEG 2000 lossless RG1_J2KR (1841 x 1955,
# 15 bits), CPU per decode here: pylibjpeg-openjpeg 546 ms, Pillow 605 ms, GDCM 718 ms (GDCM
# runs two threads: 410 ms wall, but under load, CPU is what runs out). All three give the
# same array. An empty mapping means pydicom's defaults (the benchmarks' naive peers).
PREFERRED_DECODERS: dict[str, str] = {
    JPEG2000Lossless: "pylibjpeg",
    JPEG2000: "pylibjpeg",
}
# The plugin for a JPEG 2000 grayscale image decoded on several threads (cores are idle: see
# ``cxr_triage.cores``). Pillow's OpenJPEG splits one image's code-blocks over OPJ_NUM_THREADS
# threads (pylibjpeg-openjpeg is built without threads): RG1_J2KR on 2 threads took 365 ms wall
# against 690 on one, for ~5% more CPU, and gives the same array as the single-threaded plugin.
THREADED_DECODERS: dict[str, str] = {
    JPEG2000Lossless: "pillow",
    JPEG2000: "pillow",
}
_DECODE_ERRORS = (ValueError, RuntimeError, NotImplementedError, AttributeError, KeyError, OSError)


def _stored_values(ds: Dataset, max_threads: int) -> np.ndarray:
    """Decoded stored values with bits above BitsStored cleared (they may carry overlays)."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    for plugin, threads in _plugins(ds, str(syntax or ""), max_threads):
        if plugin not in get_decoder(syntax).available_plugins:
            continue
        try:
            with openjpeg_threads(threads):
                ds.pixel_array_options(decoding_plugin=plugin)
                return _clear_spare_bits(ds.pixel_array, ds)
        except _DECODE_ERRORS:  # another plugin may still read it: at last pydicom's own order
            ds.pixel_array_options(decoding_plugin="")
    try:
        arr = ds.pixel_array
    except _DECODE_ERRORS as exc:
        raise CorruptImage(f"the pixel data cannot be decoded ({exc}); the file may be truncated") from exc
    return _clear_spare_bits(arr, ds)


def _plugins(ds: Dataset, syntax: str, max_threads: int) -> list[tuple[str, int]]:
    """(plugin, threads) to try in turn before pydicom's own order: the threaded one when it
    applies and cores are idle now (grayscale only: Pillow fails on some colour J2K that the
    others read), then the preferred one."""
    plugins = []
    threaded = THREADED_DECODERS.get(syntax)
    if threaded and max_threads > 1 and int(ds.get("SamplesPerPixel") or 1) == 1:
        threads = cores.decode_threads(max_threads)
        if threads > 1:
            plugins.append((threaded, threads))
    if preferred := PREFERRED_DECODERS.get(syntax):
        plugins.append((preferred, 1))
    return plugins


def warm_decoders() -> list[str]:
    """Load the JPEG 2000 decoders with a tiny image, in a decoding process before its first
    study: each plugin's first decode loads its modules and shared library (in a decoding
    process here, the first RG1_J2KR took ~110 ms longer without this). Best effort: a plugin
    that cannot warm up here fails the same way on a study, and says so there. Returns the
    plugins that gave the tiny image back exactly."""
    warmed = []
    try:
        image = (np.arange(32 * 32, dtype=np.uint16) * 4).reshape(32, 32)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.Rows, ds.Columns = image.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = image.tobytes()
        ds.compress(JPEG2000Lossless)
        decoder = get_decoder(JPEG2000Lossless)
        for plugin, threads in (
            (PREFERRED_DECODERS[JPEG2000Lossless], 1),
            (THREADED_DECODERS[JPEG2000Lossless], 2),
        ):
            if plugin in decoder.available_plugins:
                with openjpeg_threads(threads):
                    decoded, _ = decoder.as_array(ds, decoding_plugin=plugin)
                if np.array_equal(decoded, image):
                    warmed.append(plugin)
                else:
                    log.warning("the %s JPEG 2000 decoder gave a test image back changed", plugin)
    except Exception as exc:  # a warm-up never stops a decoding process
        log.warning("the JPEG 2000 decoders did not warm up (%s); the first J2K study pays for it", exc)
    return warmed


@contextmanager
def openjpeg_threads(threads: int) -> Iterator[None]:
    """OpenJPEG's thread count for decoders created inside (it reads OPJ_NUM_THREADS when a
    codec is created). Only the decoding processes ask for more than 1: changing the
    environment is safe there, with no other thread reading it."""
    if threads <= 1:
        yield
        return
    before = os.environ.get("OPJ_NUM_THREADS")
    os.environ["OPJ_NUM_THREADS"] = str(threads)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("OPJ_NUM_THREADS", None)
        else:
            os.environ["OPJ_NUM_THREADS"] = before


def _clear_spare_bits(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    if arr.ndim == 3:  # colour: pydicom returns RGB for YBR inputs
        return arr @ np.array([0.299, 0.587, 0.114])
    spare = arr.dtype.itemsize * 8 - int(ds.BitsStored)
    if spare > 0 and np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.signedinteger):
            arr = (arr << spare) >> spare  # sign-extend from BitsStored
        else:
            arr = arr & ((1 << int(ds.BitsStored)) - 1)
    return arr


def _to_display(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    if stored.dtype.kind == "f":  # colour already reduced to luminance, 8 bits per sample
        return (stored / (2 ** int(ds.BitsStored) - 1)).astype(np.float32)
    windowed = bool(ds.get("VOILUTSequence")) or ("WindowCenter" in ds and "WindowWidth" in ds)
    if windowed and stored.dtype.itemsize <= 2:
        # Each step maps every stored value on its own: run them once on each value that the
        # stored type can hold (at most 65536) and look the pixels up. The same operations on
        # the same values, so the same floats, for a fraction of a 2-3k pixel image's CPU.
        stored = stored.astype(stored.dtype.newbyteorder("="), copy=False)
        bits = np.dtype(f"u{stored.dtype.itemsize}")
        every = np.arange(np.iinfo(bits).max + 1, dtype=bits)
        return np.take(_displayed(every.view(stored.dtype), ds), stored.view(bits))
    return _displayed(stored, ds)


def _displayed(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """Stored integer values -> 0-1 float32, 0 = black (the module docstring's pipeline)."""
    values = apply_modality_lut(stored, ds)
    if ds.get("VOILUTSequence"):
        depth = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        shown = apply_voi(values, ds).astype(np.float32) / (2**depth - 1)
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        # Ask pydicom for its own output range (it depends on rescale and signedness) by
        # windowing two extreme values, then map that range onto 0-1.
        with np.errstate(over="ignore"):
            lo, hi = apply_windowing(np.array([-1e30, 1e30]), ds)
            shown = ((apply_windowing(values, ds) - lo) / (hi - lo)).astype(np.float32)
    else:  # the image's own range: not a per-value map (see _to_display)
        floats = values.astype(np.float32)
        shown = to_unit(floats, float(floats.min()), float(floats.max()))
    shown = np.clip(shown, 0.0, 1.0)
    if str(ds.PhotometricInterpretation).strip() == "MONOCHROME1":
        shown = 1.0 - shown  # MONOCHROME1: minimum value is white (PS3.3 C.7.6.3.1.2)
    return shown.astype(np.float32)


def _kept(ds: Dataset) -> dict[str, str]:
    """The few attributes later stages need (UIDs, view, priority). Never log them."""
    out = {k: str(ds.get(k)) for k in _KEPT_KEYWORDS if ds.get(k) not in (None, "")}
    requests = ds.get("RequestAttributesSequence") or []
    if "RequestedProcedurePriority" not in out and requests and requests[0].get("RequestedProcedurePriority"):
        out["RequestedProcedurePriority"] = str(requests[0].RequestedProcedurePriority)
    return out


def _warnings(ds: Dataset) -> list[str]:
    out = []
    modality = str(ds.get("Modality", "")).upper()
    if modality not in _PROJECTION_MODALITIES:
        out.append(f"modality {modality or 'unknown'} is not CR or DX: scores are unreliable")
    view = str(ds.get("ViewPosition", "")).upper()
    if view in _LATERAL_VIEWS:
        out.append(f"view position {view} is lateral: the model was trained on frontal (PA/AP) views")
    return out
