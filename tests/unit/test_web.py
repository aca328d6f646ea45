"""The worklist page's pure parts: PNG renderings, shown DICOM attributes, the page shell."""

import io
import re

import numpy as np
import pydicom
from PIL import Image
from starlette.responses import PlainTextResponse
from starlette.testclient import TestClient

from cxr_triage.web.images import describe, heatmap_png, label_index, preview_png
from cxr_triage.web.page import CSP, STATIC, PageMiddleware, load_assets
from tests.helpers import dicom_bytes


def test_preview_is_8_bit_grayscale_of_the_model_input() -> None:
    image = np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(48, 64)
    shown = Image.open(io.BytesIO(preview_png(image)))
    assert shown.mode == "L" and shown.size == (64, 48)
    assert np.abs(np.asarray(shown) / 255 - image).max() <= 0.5 / 255 + 1e-6


def test_heatmap_is_transparent_where_the_map_is_weak_and_opaque_at_its_peak() -> None:
    cam = np.zeros((7, 7), dtype=np.float32)
    cam[0, 6] = 5.0  # top right
    rgba = np.asarray(Image.open(io.BytesIO(heatmap_png(cam, (70, 70)))))
    assert rgba.shape == (70, 70, 4)
    assert rgba[2, 67, 3] > 200 and rgba[67, 2, 3] == 0
    assert tuple(rgba[2, 67, :2]) == (255, 255)  # the peak is yellow
    flat = np.asarray(Image.open(io.BytesIO(heatmap_png(np.ones((7, 7)), (10, 10)))))
    assert flat[..., 3].max() == 0  # no activation anywhere: nothing drawn


def test_shown_attributes_never_include_patient_identifiers() -> None:
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes("RG1_UNCR.dcm")))
    ds.PatientName, ds.PatientID, ds.StudyDescription = "Doe^Jane", "PID-1", "CHEST <b>PA</b>"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    shown = describe(buf.getvalue())
    assert shown["StudyDescription"] == "CHEST <b>PA</b>"
    assert shown["PhotometricInterpretation"] == "MONOCHROME1"
    assert "Doe" not in str(shown) and "PID-1" not in str(shown)
    assert describe(None) == {} and describe(b"") == {}
    assert label_index([{"label": "A"}, {"label": "B"}], "B") == 1
    assert label_index([{"label": "A"}], "C") is None


def test_page_assets_exist_and_the_script_never_writes_html() -> None:
    assets = load_assets()
    index = assets["/"].body.decode()
    for referenced in re.findall(r'(?:src|href)="(/ui/[^"]+)"', index):
        assert referenced in assets, referenced
    script = re.sub(r"//.*", "", (STATIC / "app.js").read_text())  # code, not comments
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script, f"app.js uses {sink}: put study values in with textContent"
    assert "unsafe" not in CSP and "localStorage" not in script


def test_page_middleware_serves_the_shell_and_passes_everything_else_on() -> None:
    inner = PlainTextResponse("inner")
    client = TestClient(PageMiddleware(inner, load_assets()))
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-security-policy"] == CSP
    assert client.get("/", headers={"If-None-Match": page.headers["etag"]}).status_code == 304
    head = client.head("/ui/app.js")
    assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) > 0
    assert client.post("/").status_code == 405
    assert client.get("/ui/missing.js").status_code == 404
    passed = client.get("/v1/worklist")
    assert passed.text == "inner" and "content-security-policy" not in passed.headers
