"""Screenshots of the worklist page for the README (`make screenshots`).

Starts the real service on a free 127.0.0.1 port with model_repo/ (behind an API key, a fresh
Redis), queues a few studies made from pydicom-data's chest CR, and photographs the page in
Debian's chromium with the browser tests' settings, so the README always shows the page as it is.
Writes docs/screenshots/*.png.
"""

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from PIL import Image  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from tests.browser import CHROMIUM, CHROMIUM_ARGS, VIEWPORT, browser_missing  # noqa: E402
from tests.helpers import chest_u8, dataset_bytes, dicom_path, png_bytes, running_server  # noqa: E402

KEY = "screenshot-key"
OUT = ROOT / "docs" / "screenshots"


def studies() -> list[tuple[bytes, str, dict[str, str]]]:
    """(body, content type, query) of the studies shown: DICOM PA and lateral, PNG, JPEG."""
    out = []
    for view, description, priority in (("PA", "CHEST PA", "urgent"), ("LL", "CHEST LATERAL", "routine")):
        ds = pydicom.dcmread(dicom_path("RG1_UNCR.dcm"))
        ds.StudyInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
        ds.ViewPosition, ds.StudyDescription, ds.SeriesDescription = view, description, f"{view} view"
        out.append((dataset_bytes(ds), "application/dicom", {"priority": priority}))
    chest = chest_u8(512)
    out.append((png_bytes(chest), "image/png", {"priority": "stat"}))
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(chest[24:-24, 24:-24])).save(buf, format="JPEG", quality=90)
    out.append((buf.getvalue(), "image/jpeg", {"priority": "backfill"}))
    return out


def queue_studies(base: str) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    uids = []
    for body, content_type, params in studies():
        response = httpx.post(f"{base}/v1/studies", content=body, params=params, timeout=60,
                              headers={**headers, "Content-Type": content_type})  # fmt: skip
        response.raise_for_status()
        uids.append(response.json()["study_uid"])
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        states = [httpx.get(f"{base}/v1/studies/{u}", headers=headers).json()["status"] for u in uids]
        if all(s in ("done", "failed") for s in states):
            return
        time.sleep(0.3)
    raise TimeoutError("studies were not scored within 120 s")


def wait_until(page: Any, script: str, timeout: float = 30) -> None:
    """Poll a JS expression (the page's CSP forbids Playwright's eval-based waiting)."""
    deadline = time.monotonic() + timeout
    while not page.evaluate(script):
        if time.monotonic() > deadline:
            raise TimeoutError(script)
        page.wait_for_timeout(100)


def photograph(base: str, out: Path) -> list[Path]:
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    shots = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_context(viewport=VIEWPORT).new_page()
        page.goto(base + "/")
        page.wait_for_selector("#key-dialog[open]")
        shots.append(_shot(page, out / "api-key.png"))
        page.fill("#key-input", KEY)
        page.click("#key-submit")
        wait_until(page, "document.getElementById('conn').textContent.startsWith('Live')")
        page.fill("#reader", "dr-example")
        wait_until(page, "document.querySelectorAll('#worklist > li').length >= 4")
        page.focus("#worklist")
        page.keyboard.press("Enter")
        page.wait_for_selector("#study .finding")
        wait_until(page, "!document.getElementById('heat').hidden")
        page.keyboard.press("1")
        page.keyboard.press("3")
        page.keyboard.press("3")
        shots.append(_shot(page, out / "worklist.png"))
        page.keyboard.press("?")
        page.wait_for_selector("#help-dialog[open]")
        shots.append(_shot(page, out / "keyboard.png"))
        page.keyboard.press("Escape")
        _upload(page, out)
        shots.append(_shot(page, out / "upload.png"))
        browser.close()
    return shots


def _upload(page: Any, out: Path) -> None:
    """Upload two files through the page: a chest PNG, and a file that is not an image."""
    with tempfile.TemporaryDirectory() as tmp:
        good, bad = Path(tmp) / "chest-pa.png", Path(tmp) / "notes.png"
        good.write_bytes(png_bytes(chest_u8(384)))
        bad.write_bytes(b"not an image")
        page.click("#upload-open")
        page.select_option("#upload-priority", "urgent")
        page.set_input_files("#file-input", [str(good), str(bad)])
        page.click("#upload-submit")
        wait_until(page, "document.querySelectorAll('#upload-list .queued, #upload-list .failed').length > 1")


def _shot(page: Any, path: Path) -> Path:
    page.wait_for_timeout(300)  # let the last image decode and the clocks tick
    page.screenshot(path=str(path))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repo", type=Path, default=ROOT / "model_repo")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    problem = browser_missing()
    if problem:
        sys.stderr.write(f"cannot take screenshots: {problem}\n")
        return 1
    with tempfile.TemporaryDirectory(prefix="cxr-screenshots-") as data:
        env = {"CXR_API_KEYS": json.dumps([KEY]), "CXR_DATA_DIR": data, "CXR_DECODE_WORKERS": "1"}
        with running_server(args.model_repo, env, timeout=180) as base:
            queue_studies(base)
            for path in photograph(base, args.out):
                sys.stdout.write(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
