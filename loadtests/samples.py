"""The images the load tests send: one real PA chest radiograph in each input format.

The source is pydicom-data's ``RG1_UNCR.dcm`` (a genuine PA chest CR, 1841x1955, MONOCHROME1,
15 bits stored, uncompressed) and its JPEG 2000 lossless twin ``RG1_J2KR.dcm`` (the dev extra
installs pydicom-data; ``pydicom.data.get_testdata_file`` finds them offline). The PNG and the
JPEG are made from the same pixels at run time, through the server's own DICOM display pipeline
(``cxr_triage.imaging.decode``: rescale, VOI LUT, MONOCHROME1 inverted), so every format shows
the same radiograph:

- ``png``: 8-bit grayscale, 1024x1024 (the layout of ChestX-ray14's PNGs);
- ``jpeg``: 8-bit grayscale at full resolution (1841x1955), quality 95;
- ``dicom``: RG1_UNCR.dcm as it is (7.2 MB);
- ``dicom-j2k``: RG1_J2KR.dcm as it is (4.3 MB; decoding it is the server's costliest input).

No locust import here: the SLO checker uses these for its warm-up requests.
"""

import io
import uuid
from functools import cache
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.uid import generate_uid

CHEST_CR = "RG1_UNCR.dcm"
CHEST_CR_J2K = "RG1_J2KR.dcm"
PNG_SIZE = 1024
JPEG_QUALITY = 95
KINDS = ("png", "jpeg", "dicom", "dicom-j2k")
CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "dicom": "application/dicom"}


def testdata_path(name: str) -> Path:
    """A pydicom-data file. Raises FileNotFoundError naming the package to install."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if not path:
        raise FileNotFoundError(f"pydicom-data lacks {name}: pip install pydicom-data (the dev extra)")
    return Path(str(path))


@cache
def chest_u8() -> np.ndarray:
    """RG1 as the server displays it, 8-bit (rows, columns)."""
    from cxr_triage.imaging import ImageLimits, decode

    pixels = decode(testdata_path(CHEST_CR).read_bytes(), "application/dicom", ImageLimits()).pixels
    return np.asarray((pixels * 255.0).round().astype(np.uint8))


def _encode(array: np.ndarray, fmt: str, **options: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **options)
    return buf.getvalue()


@cache
def sample(kind: str) -> tuple[bytes, str]:
    """(body, Content-Type) of one kind in KINDS; built once per process."""
    if kind == "png":
        small = Image.fromarray(chest_u8()).resize((PNG_SIZE, PNG_SIZE), Image.Resampling.LANCZOS)
        return _encode(np.asarray(small), "PNG"), CONTENT_TYPES["png"]
    if kind == "jpeg":
        return _encode(chest_u8(), "JPEG", quality=JPEG_QUALITY), CONTENT_TYPES["jpeg"]
    if kind == "dicom":
        return testdata_path(CHEST_CR).read_bytes(), CONTENT_TYPES["dicom"]
    if kind == "dicom-j2k":
        return testdata_path(CHEST_CR_J2K).read_bytes(), CONTENT_TYPES["dicom"]
    raise ValueError(f"unknown sample {kind!r}; choose one of {KINDS}")


@cache
def _dataset(name: str) -> pydicom.Dataset:
    return pydicom.dcmread(testdata_path(name))


def new_instance(name: str = CHEST_CR) -> tuple[bytes, str]:
    """A pydicom-data file (default RG1, uncompressed) re-stamped as a new study (new Study,
    Series and SOP Instance UIDs): the service scores each instance UID once, so a load test
    must not resend the same one. Returns (DICOM Part 10 bytes, the new StudyInstanceUID)."""
    ds = _dataset(name)  # shared template; no I/O between stamping and writing, so no greenlet switch
    study = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue(), study


def stow_body(instances: list[bytes]) -> tuple[bytes, str]:
    """A STOW-RS request body (PS3.18 §10.5: multipart/related; type="application/dicom")
    holding ``instances``; returns (body, Content-Type)."""
    boundary = uuid.uuid4().hex
    chunks = []
    for data in instances:
        chunks += [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), data, b"\r\n"]
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f'multipart/related; type="application/dicom"; boundary={boundary}'
