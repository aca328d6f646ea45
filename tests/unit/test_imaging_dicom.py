"""DICOM decoding on real radiographs (pydicom-data's chest CR) and every error path."""

import os
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, RLELossless

from cxr_triage import cores, errors
from cxr_triage.imaging import ImageLimits, decode, dicom, prepare
from cxr_triage.repository.models import InputSpec
from tests.helpers import dataset_bytes, dicom_bytes, dicom_path

SPEC = InputSpec(size=224)
LIMITS = ImageLimits()


def model_input(data: bytes) -> np.ndarray:
    return prepare(data, "application/dicom", SPEC, LIMITS).pixels


def test_rg1_j2k_lossless_gives_exactly_the_uncompressed_model_input() -> None:
    assert np.array_equal(model_input(dicom_bytes("RG1_J2KR.dcm")), model_input(dicom_bytes("RG1_UNCR.dcm")))


def test_rg1_j2k_lossy_is_close_but_not_identical() -> None:
    lossy, exact = model_input(dicom_bytes("RG1_J2KI.dcm")), model_input(dicom_bytes("RG1_UNCR.dcm"))
    assert np.abs(lossy - exact).mean() < 0.01
    assert not np.array_equal(lossy, exact)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "j2k-lossless"])
def test_rg1_transcoded_losslessly_gives_the_same_model_input(syntax: str) -> None:
    ds = pydicom.dcmread(dicom_path("RG1_UNCR.dcm"))
    ds.compress(syntax)
    assert np.array_equal(model_input(dataset_bytes(ds)), model_input(dicom_bytes("RG1_UNCR.dcm")))


@pytest.mark.parametrize(
    ("compressed", "reference"),
    [
        ("MR_small_RLE.dcm", "MR_small.dcm"),
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),
        ("emri_small_jpeg_ls_lossless.dcm", "emri_small.dcm"),
        ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm"),
    ],
)
def test_lossless_transfer_syntaxes_decode_to_the_same_pixels(compressed: str, reference: str) -> None:
    a = pydicom.dcmread(dicom_path(compressed)).pixel_array
    b = pydicom.dcmread(dicom_path(reference)).pixel_array
    assert np.array_equal(a, b)


@pytest.mark.parametrize(
    "name",
    ["JPGLosslessP14SV1_1s_1f_8b.dcm", "JPEG-LL.dcm", "JPEGLSNearLossless_16.dcm", "SC_rgb_jpeg_dcmtk.dcm"],
)
def test_compressed_single_frame_files_decode(name: str) -> None:
    image = decode(dicom_bytes(name), "application/dicom", LIMITS)
    assert image.pixels.dtype == np.float32
    assert 0.0 <= image.pixels.min() < image.pixels.max() <= 1.0


def test_monochrome1_chest_is_not_inverted() -> None:
    """In a chest film the lungs (air) are dark and the spine/mediastinum bright."""
    pixels = decode(dicom_bytes("RG1_UNCR.dcm"), "application/dicom", LIMITS).pixels
    rows, cols = pixels.shape
    band = slice(int(rows * 0.30), int(rows * 0.50))
    right_lung = pixels[band, int(cols * 0.22) : int(cols * 0.32)].mean()
    left_lung = pixels[band, int(cols * 0.68) : int(cols * 0.78)].mean()
    spine = pixels[band, int(cols * 0.47) : int(cols * 0.53)].mean()
    assert spine > right_lung + 0.1 and spine > left_lung + 0.1


def test_monochrome1_equals_its_monochrome2_twin() -> None:
    ds = pydicom.dcmread(dicom_path("RG1_UNCR.dcm"))
    twin = pydicom.dcmread(dicom_path("RG1_UNCR.dcm"))
    top = 2**ds.BitsStored - 1
    twin.PixelData = (top - ds.pixel_array).astype(np.uint16).tobytes()
    twin.PhotometricInterpretation = "MONOCHROME2"
    twin.WindowCenter = top - float(ds.WindowCenter)
    a, b = model_input(dataset_bytes(ds)), model_input(dataset_bytes(twin))
    assert np.abs(a - b).max() < 1e-3


def test_bits_above_bits_stored_are_ignored() -> None:
    ds = pydicom.dcmread(dicom_path("RG1_UNCR.dcm"))  # 15 of 16 bits stored
    dirty = ds.pixel_array | np.uint16(0x8000)  # an overlay-like bit above BitsStored
    ds2 = pydicom.dcmread(dicom_path("RG1_UNCR.dcm"))
    ds2.PixelData = dirty.astype(np.uint16).tobytes()
    assert np.array_equal(model_input(dataset_bytes(ds2)), model_input(dataset_bytes(ds)))


def test_rescale_slope_and_intercept_are_applied_before_the_window() -> None:
    ds = pydicom.dcmread(dicom_path("RG1_UNCR.dcm"))
    ds2 = pydicom.dcmread(dicom_path("RG1_UNCR.dcm"))
    ds2.RescaleSlope, ds2.RescaleIntercept = 2, -1000
    ds2.WindowCenter = float(ds.WindowCenter) * 2 - 1000
    ds2.WindowWidth = float(ds.WindowWidth) * 2
    assert np.abs(model_input(dataset_bytes(ds)) - model_input(dataset_bytes(ds2))).max() < 1e-3


def test_window_changes_the_image_and_no_window_stretches() -> None:
    ds = pydicom.dcmread(dicom_path("RG1_UNCR.dcm"))
    narrow = pydicom.dcmread(dicom_path("RG1_UNCR.dcm"))
    narrow.WindowWidth = 4000
    bare = pydicom.dcmread(dicom_path("RG1_UNCR.dcm"))
    del bare.WindowCenter, bare.WindowWidth
    full, tight, stretched = (
        decode(dataset_bytes(d), "application/dicom", LIMITS).pixels for d in (ds, narrow, bare)
    )
    assert (tight == 0).mean() + (tight == 1).mean() > (full == 0).mean() + (full == 1).mean() + 0.2
    assert stretched.min() == 0.0 and stretched.max() == 1.0


def test_voi_lut_sequence_is_used_when_present() -> None:
    ds = pydicom.dcmread(dicom_path("RG1_UNCR.dcm"))
    del ds.WindowCenter, ds.WindowWidth
    item = pydicom.Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = [min(65535, v * 2) for v in range(0, 65536, 16)]  # a ramp saturating at half range
    item["LUTData"].VR = "US"
    ds.VOILUTSequence = [item]
    pixels = decode(dataset_bytes(ds), "application/dicom", LIMITS).pixels
    assert pixels.max() <= 1.0 and (pixels < 1.0).any()


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("RG1_UNCR.dcm", "u2, window, MONOCHROME1"),
        ("MR_small.dcm", "i2, window"),
        ("693_UNCR.dcm", "i2, window, rescale"),
        ("MR2_UNCR.dcm", "u2, window, rescale slope 3.77"),
        ("vlut_04.dcm", "u1, VOI LUT sequence"),
        ("JPGLosslessP14SV1_1s_1f_8b.dcm", "u1, window"),
    ],
)
def test_the_per_value_lookup_gives_exactly_the_per_pixel_pipeline(name: str, kind: str) -> None:
    """_to_display runs the grayscale pipeline once per storable value and looks pixels up: the
    floats must be those of running it on every pixel (_displayed), bit for bit."""
    ds = pydicom.dcmread(dicom_path(name))
    stored = dicom._clear_spare_bits(ds.pixel_array, ds)
    assert stored.dtype.str[1:] == kind[:2], "the case this file stands for"
    looked_up, computed = dicom._to_display(stored, ds), dicom._displayed(stored, ds)
    assert looked_up.dtype == computed.dtype == np.float32
    assert np.array_equal(looked_up, computed) and len(np.unique(looked_up)) > 16
    swapped = stored.astype(stored.dtype.newbyteorder(">" if stored.dtype.byteorder != ">" else "<"))
    assert np.array_equal(dicom._to_display(swapped, ds), computed), "byte order does not matter"


def test_non_projection_modality_and_lateral_view_warn_but_score() -> None:
    ct = decode(dicom_bytes("CT_small.dcm"), "application/dicom", LIMITS)
    assert any("modality CT" in w for w in ct.warnings)
    ds = pydicom.dcmread(dicom_path("RG1_UNCR.dcm"))
    ds.ViewPosition = "LL"
    lateral = decode(dataset_bytes(ds), "application/dicom", LIMITS)
    assert any("lateral" in w for w in lateral.warnings)
    assert decode(dicom_bytes("RG1_UNCR.dcm"), "application/dicom", LIMITS).warnings == []


def test_uids_are_kept_for_later_stages() -> None:
    image = decode(dicom_bytes("RG1_UNCR.dcm"), "application/dicom", LIMITS)
    assert image.dicom["Modality"] == "CR" and image.dicom["SOPInstanceUID"]


# --- errors ----------------------------------------------------------------------------------


def test_truncated_file_is_corrupt() -> None:
    data = dicom_bytes("RG1_UNCR.dcm")
    with pytest.raises(errors.CorruptImage):
        decode(data[: len(data) // 2], "application/dicom", LIMITS)


def test_truncated_j2k_is_corrupt() -> None:
    data = dicom_bytes("RG1_J2KR.dcm")
    with pytest.raises(errors.CorruptImage):
        decode(data[: len(data) - len(data) // 3], "application/dicom", LIMITS)


def test_multi_frame_is_refused() -> None:
    with pytest.raises(errors.MultiFrame):
        decode(dicom_bytes("emri_small.dcm"), "application/dicom", LIMITS)


def test_palette_colour_is_unsupported() -> None:
    with pytest.raises(errors.UnsupportedPhotometric):
        decode(dicom_bytes("OBXXXX1A_rle.dcm"), "application/dicom", LIMITS)


def test_object_without_pixel_data_is_refused() -> None:
    ds = pydicom.dcmread(dicom_path("RG1_UNCR.dcm"))
    del ds.PixelData
    with pytest.raises(errors.PixelDataMissing):
        decode(dataset_bytes(ds), "application/dicom", LIMITS)


def test_too_many_pixels_is_refused_before_decoding() -> None:
    with pytest.raises(errors.ImageTooLarge):
        decode(dicom_bytes("RG1_J2KR.dcm"), "application/dicom", ImageLimits(max_pixels=1000 * 1000))


def test_bytes_without_dicm_prefix_are_not_an_image() -> None:
    with pytest.raises(errors.NotAnImage):
        decode(b"\x00" * 200 + b"not dicom", "application/dicom", LIMITS)


def test_error_codes_and_statuses_follow_the_api() -> None:
    assert (errors.MultiFrame("x").code, errors.MultiFrame("x").status) == ("multi_frame", 422)
    assert errors.ImageTooLarge("x").status == 413
    assert errors.UnsupportedMediaType("x").status == 415


@pytest.mark.parametrize(
    "breakage",
    ["window_width_zero", "text_rescale_slope", "voi_lut_without_descriptor", "unknown_transfer_syntax"],
)
def test_malformed_grayscale_attributes_are_4xx_not_a_crash(breakage: str) -> None:
    ds = pydicom.dcmread(dicom_path("RG1_UNCR.dcm"))
    if breakage == "window_width_zero":
        ds.WindowWidth = 0
    elif breakage == "text_rescale_slope":
        ds.RescaleSlope, ds.RescaleIntercept = "1", "0"
        ds["RescaleSlope"].VR = "LO"
        ds.RescaleSlope = "abc"
    elif breakage == "voi_lut_without_descriptor":
        del ds.WindowCenter, ds.WindowWidth
        item = pydicom.Dataset()
        item.add_new(0x00283006, "US", [0, 1])  # LUT Data without its LUT Descriptor
        ds.VOILUTSequence = [item]
    else:
        ds.file_meta.TransferSyntaxUID = "1.2.3.4.5.6.7"
    with pytest.raises((errors.CorruptImage, errors.UnsupportedTransferSyntax, errors.NotAnImage)):
        decode(dataset_bytes(ds), "application/dicom", LIMITS)


# --- JPEG 2000 on idle cores -----------------------------------------------------------------

J2K_SINGLE_FRAME = [
    "RG1_J2KR.dcm",
    "RG1_J2KI.dcm",
    "RG3_J2KR.dcm",
    "MR2_J2KI.dcm",
    "693_J2KR.dcm",
    "693_J2KI.dcm",
    "J2K_pixelrep_mismatch.dcm",
    "JPEG2000.dcm",
    "MR_small_jp2klossless.dcm",
    "US1_J2KR.dcm",
    "GDCMJ2K_TextGBR.dcm",
]


@pytest.fixture
def threads_used(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every core idle: a decode may take its limit. Returns the thread counts decodes ran with."""
    used: list[int] = []
    real = dicom.openjpeg_threads

    def spy(threads: int) -> Any:
        used.append(threads)
        return real(threads)

    monkeypatch.setattr(cores, "idle_cores", lambda: 64)
    monkeypatch.setattr(dicom, "openjpeg_threads", spy)
    return used


@pytest.mark.parametrize("name", J2K_SINGLE_FRAME)
def test_j2k_on_several_threads_gives_the_single_threaded_image(name: str, threads_used: list[int]) -> None:
    data = dicom_bytes(name)
    threaded = decode(data, "application/dicom", ImageLimits(decode_threads=3))
    grayscale = pydicom.dcmread(dicom_path(name), stop_before_pixels=True).SamplesPerPixel == 1
    assert threads_used[0] == (3 if grayscale else 1)  # colour keeps the single-threaded plugin
    threads_used.clear()
    single = decode(data, "application/dicom", ImageLimits(decode_threads=1))
    assert threads_used == [1]
    assert np.array_equal(threaded.pixels, single.pixels)


def test_j2k_on_several_threads_keeps_the_exactness_rule(threads_used: list[int]) -> None:
    limits = ImageLimits(decode_threads=2)
    j2k = prepare(dicom_bytes("RG1_J2KR.dcm"), "application/dicom", SPEC, limits).pixels
    assert threads_used == [2]
    assert np.array_equal(j2k, model_input(dicom_bytes("RG1_UNCR.dcm")))


def test_truncated_j2k_on_several_threads_is_corrupt(threads_used: list[int]) -> None:
    data = dicom_bytes("RG1_J2KR.dcm")
    with pytest.raises(errors.CorruptImage):
        decode(data[: len(data) - len(data) // 3], "application/dicom", ImageLimits(decode_threads=2))


def test_openjpeg_threads_restores_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPJ_NUM_THREADS", raising=False)
    with dicom.openjpeg_threads(4):
        assert os.environ["OPJ_NUM_THREADS"] == "4"
    assert "OPJ_NUM_THREADS" not in os.environ
    monkeypatch.setenv("OPJ_NUM_THREADS", "2")
    with pytest.raises(RuntimeError), dicom.openjpeg_threads(4):
        raise RuntimeError("decoder failed")
    assert os.environ["OPJ_NUM_THREADS"] == "2"
    with dicom.openjpeg_threads(1):  # one thread: the environment is left alone
        assert os.environ["OPJ_NUM_THREADS"] == "2"


def test_warm_decoders_loads_each_j2k_plugin_on_its_thread_count(threads_used: list[int]) -> None:
    before = os.environ.get("OPJ_NUM_THREADS")
    assert dicom.warm_decoders() == ["pylibjpeg", "pillow"]  # each gave the tiny image back exactly
    assert threads_used == [1, 2]
    assert os.environ.get("OPJ_NUM_THREADS") == before


def test_warm_decoders_failing_is_logged_not_raised(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(syntax: str) -> Any:
        raise RuntimeError("no plugin for this syntax")

    monkeypatch.setattr(dicom, "get_decoder", broken)
    assert dicom.warm_decoders() == []
    assert "did not warm up" in caplog.text
