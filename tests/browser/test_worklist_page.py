"""The radiologists' worklist page in a real browser (Debian chromium) against the real server.

One server per module, behind an API key; every study a test makes has its own UIDs, so the
tests share the worklist without depending on each other's order.
"""

import io
import json
import re
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image

from cxr_triage.imaging import ImageLimits, ModelInput, prepare
from cxr_triage.queue import JobQueue, NewJob
from cxr_triage.repository import ModelRepository
from tests.browser import ARTIFACTS, VIEWPORT
from tests.browser.conftest import KEY, Api, Tab
from tests.helpers import chest_u8, dataset_bytes, dicom_path, png_bytes

MARKUP = {
    "StudyDescription": '<img src=x onerror="window.__xss=1">',
    "SeriesDescription": "<script>window.__xss=2</script>",
    "BodyPartExamined": "<b>CHEST</b>",
}


def new_uid() -> str:
    return f"2.25.{uuid.uuid4().int}"


def chest_dicom(study_uid: str, **attributes: str) -> bytes:
    """pydicom-data's PA chest CR (MONOCHROME1) as a new study, with attributes overridden."""
    ds = pydicom.dcmread(dicom_path("RG1_UNCR.dcm"))
    ds.StudyInstanceUID, ds.SOPInstanceUID = study_uid, new_uid()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return dataset_bytes(ds)


def chest_png(seed: int) -> bytes:
    """The chest CR as a 96 px 8-bit PNG, slightly varied so each upload is its own image."""
    image = chest_u8(96).astype(np.int16) + np.random.default_rng(seed).integers(-6, 7, (96, 96))
    return png_bytes(np.clip(image, 0, 255).astype(np.uint8))


# --- the page, its headers and its image routes ------------------------------------------------


def test_page_replaces_litserve_index_with_csp_and_is_open_while_studies_need_the_key(
    tab: Tab, keyed_server: str
) -> None:
    loaded = tab.page.goto(keyed_server + "/")
    assert loaded is not None and loaded.headers["content-security-policy"].startswith("default-src 'none'")
    tab.page.wait_for_selector("#key-dialog[open]")  # the shell loads without a key, then asks for one
    assert not tab.csp_violations() and not tab.errors  # the page keeps its own policy
    page = httpx.get(keyed_server + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "litserve running" not in page.text and '<script src="/ui/app.js"' in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "default-src 'none'" in csp
    assert "<script>" not in page.text and " style=" not in page.text  # nothing inline to allow
    assert "http://" not in page.text and "https://" not in page.text  # no CDN: works offline
    for asset, kind in (("/ui/app.js", "text/javascript"), ("/ui/app.css", "text/css")):
        response = httpx.get(keyed_server + asset)
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind)
        again = httpx.get(keyed_server + asset, headers={"If-None-Match": response.headers["etag"]})
        assert again.status_code == 304
    for missing in ("/ui/nothing.js", "/ui/..%2F..%2Fserving%2Fapp.py"):  # only the packaged files
        assert httpx.get(keyed_server + missing).status_code == 404, missing
    assert httpx.get(keyed_server + "/v1/worklist").status_code == 401  # study data needs the key
    api = httpx.get(keyed_server + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert api.status_code == 200 and "content-security-policy" not in api.headers
    docs = httpx.get(keyed_server + "/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert "/v1/studies/{study_uid}/images/{job_id}/preview.png" in docs["paths"]


def test_preview_is_the_model_input_windowed_and_the_right_way_up(api: Api, exported_repo: Path) -> None:
    uid = new_uid()
    data = chest_dicom(uid)
    api.submit(data, "application/dicom")
    assert api.wait_finished(uid)["status"] == "done"
    (image,) = api.request("GET", f"/v1/studies/{uid}/images").json()["images"]
    assert image["dicom"]["PhotometricInterpretation"] == "MONOCHROME1"
    response = api.request("GET", image["preview_url"])
    assert response.headers["content-type"] == "image/png" and response.headers["cache-control"] == "no-store"
    shown = np.asarray(Image.open(io.BytesIO(response.content)), dtype=np.float32) / 255
    spec = ModelRepository.load(exported_repo).get(None).config.input
    expected = prepare(data, "application/dicom", spec, ImageLimits()).pixels
    assert shown.shape == expected.shape and np.abs(shown - expected).max() <= 1.5 / 255
    # MONOCHROME1 shown as a radiograph: air in the lungs dark, the mediastinum bright.
    rows, cols = shown.shape
    band = shown[rows // 3 : rows // 2]
    assert band[:, cols * 2 // 5 : cols * 3 // 5].mean() > band[:, cols // 5 : cols * 2 // 5].mean() + 0.05
    heat = api.request("GET", image["heatmap_url"].replace("{label}", image["heatmap_labels"][0]))
    overlay = Image.open(io.BytesIO(heat.content))
    assert overlay.mode == "RGBA" and overlay.size == (cols, rows)
    ARTIFACTS.mkdir(exist_ok=True)  # what the page lays on top of each other, as artifacts
    name = "test_preview_is_the_model_input_windowed_and_the_right_way_up"
    (ARTIFACTS / f"{name}.png").write_bytes(response.content)
    Image.alpha_composite(Image.open(io.BytesIO(response.content)).convert("RGBA"), overlay).save(
        ARTIFACTS / f"{name}-heatmap.png"
    )
    unknown = api.request("GET", image["heatmap_url"].replace("{label}", "Tumour"))
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "image_not_available"
    elsewhere = api.request("GET", f"/v1/studies/{new_uid()}/images/{image['job_id']}/preview.png")
    assert elsewhere.status_code == 404
    assert httpx.get(api.base + image["preview_url"]).status_code == 401


# --- in the browser -----------------------------------------------------------------------------


def test_api_key_prompt_unlocks_the_page_for_this_tab_only(tab: Tab, browser: Any) -> None:
    page = tab.page
    tab.open()
    page.wait_for_selector("#key-dialog[open]")
    assert tab.rows() == []
    page.fill("#key-input", "wrong-key")
    page.click("#key-submit")
    page.wait_for_selector("#key-error:not([hidden])")
    assert "refused" in page.inner_text("#key-error")
    tab.shot("refused")
    page.fill("#key-input", KEY)
    page.click("#key-submit")
    tab.wait_live()
    assert not page.is_visible("#key-dialog")
    assert page.evaluate("sessionStorage.getItem('cxr.key')") == KEY
    assert page.evaluate("localStorage.length") == 0
    page.reload()  # same tab: the key is kept
    tab.wait_live()
    assert not page.is_visible("#key-dialog")
    other = browser.new_context().new_page()
    other.goto(tab.base + "/")
    other.wait_for_selector("#key-dialog[open]")  # another tab asks again
    other.context.close()
    page.click("#key-forget")
    page.wait_for_selector("#key-dialog[open]")
    assert page.evaluate("sessionStorage.getItem('cxr.key')") is None
    assert not tab.errors and not tab.csp_violations()


def test_upload_open_heatmap_confirm_submit_and_the_label_is_stored(
    tab: Tab, api: Api, tmp_path: Path
) -> None:
    page = tab.page
    dicom_uid = new_uid()
    (tmp_path / "chest.dcm").write_bytes(chest_dicom(dicom_uid))
    (tmp_path / "chest.png").write_bytes(chest_png(1))
    tab.unlock()
    page.fill("#reader", "dr-browser")
    page.click("#upload-open")
    page.select_option("#upload-priority", "urgent")
    page.set_input_files("#file-input", [str(tmp_path / "chest.dcm"), str(tmp_path / "chest.png")])
    page.click("#upload-submit")
    tab.wait_until("() => document.querySelectorAll('#upload-list .upload.queued').length === 2")
    tab.shot("uploaded")

    # A bad file, dropped on the page: API.md's message is shown and the page goes on working.
    garbage = b"this is not an image at all"
    refused = api.request(
        "POST", "/v1/studies", content=garbage, headers={"Content-Type": "image/png"}
    ).json()
    page.evaluate(
        """bytes => {
            const dt = new DataTransfer();
            dt.items.add(new File([new Uint8Array(bytes)], 'broken.png', {type: 'image/png'}));
            document.body.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true}));
        }""",
        list(garbage),
    )
    page.click("#upload-submit")
    page.wait_for_selector("#upload-list .upload.failed")
    assert refused["error"]["message"] in page.inner_text("#upload-list .upload.failed")
    tab.shot("refused-file")
    page.click("#upload-close")

    urgent = [
        row for row in api.request("GET", "/v1/worklist").json()["studies"] if row["priority"] == "urgent"
    ]
    png_uid = next(row["study_uid"] for row in urgent if row["study_uid"] != dicom_uid)
    for uid in (dicom_uid, png_uid):
        assert api.wait_finished(uid)["status"] == "done"
    tab.wait_for_order(api)

    tab.open_study(dicom_uid)
    tab.wait_until("() => document.getElementById('preview').naturalWidth > 0")
    first = page.get_attribute("#study .finding", "data-label")
    tab.wait_until("label => document.getElementById('heat').dataset.label === label", first)
    assert page.is_visible("#heat") and page.is_visible("#banner")
    assert "NOT FOR CLINICAL USE" in page.inner_text("#banner")
    page.uncheck("#heat-toggle")
    assert page.is_hidden("#heat")
    page.check("#heat-toggle")
    page.wait_for_selector("#heat", state="visible")
    page.fill("#heat-opacity", "0.8")
    assert page.evaluate("document.getElementById('heat').style.opacity") == "0.8"
    second = page.get_attribute("#study .finding:nth-child(2)", "data-label")
    page.click(f'#study .finding[data-label="{second}"] .f-name')
    tab.wait_until("label => document.getElementById('heat').dataset.label === label", second)
    page.click(f'#study button[aria-label="Confirm {first} present"]')
    assert page.get_attribute(f'#study .finding[data-label="{first}"] .present', "aria-pressed") == "true"
    tab.shot("study")

    page.click("#submit-report")
    tab.wait_until("uid => !document.querySelector(`#worklist > li[data-uid='${uid}']`)", dicom_uid)
    if tab.rows():  # the next study opens
        tab.wait_until(
            "uid => (document.querySelector('#study .study-uid') || {}).textContent !== uid",
            dicom_uid,
        )
    report = api.study(dicom_uid)["report"]
    assert report["reader"] == "dr-browser" and report["labels"][first] is True
    assert set(report["labels"].values()) == {True, False} and len(report["labels"]) == 14
    assert dicom_uid not in api.worklist()

    # No PHI in the address bar or the browser's storage: only the key and the reader's name.
    assert page.url == tab.base + "/"
    assert page.evaluate("localStorage.length") == 0
    stored = page.evaluate("JSON.stringify(Object.entries(sessionStorage))")
    assert {k for k, _ in json.loads(stored)} <= {"cxr.key", "cxr.reader"} and dicom_uid not in stored
    assert not tab.errors and not tab.csp_violations()


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # markup is no valid code string
def test_script_in_dicom_text_is_shown_as_text_and_inline_script_is_refused(tab: Tab, api: Api) -> None:
    page = tab.page
    uid = new_uid()
    api.submit(chest_dicom(uid, Modality="<i>CR</i>", **MARKUP), "application/dicom")
    api.wait_finished(uid)
    tab.unlock()
    tab.wait_for_order(api)
    tab.open_study(uid)
    page.wait_for_selector("#study .dicom-list")
    for value in MARKUP.values():
        assert page.get_by_text(value, exact=True).is_visible(), value
    assert "<I>CR</I>" in page.inner_text("#study .warnings")  # the modality warning, as text
    assert page.evaluate("typeof window.__xss") == "undefined"
    assert page.evaluate("document.scripts.length") == 1  # app.js only
    assert page.eval_on_selector_all("#study img", "els => els.map(e => e.id)") == ["preview", "heat"]
    # The Content-Security-Policy refuses inline script, even script the page itself would add.
    page.evaluate(
        "() => { const s = document.createElement('script'); s.textContent = 'window.__inline = 1';"
        " document.body.append(s); }"
    )
    assert page.evaluate("typeof window.__inline") == "undefined"
    page.wait_for_timeout(300)  # let the console message arrive
    assert any("inline script" in m for m in tab.csp_violations()), tab.console
    tab.shot()
    assert not tab.errors


def test_keyboard_path_moves_opens_marks_and_submits(tab: Tab, api: Api) -> None:
    page = tab.page
    mine = [new_uid(), new_uid()]
    for seed, uid in enumerate(mine):
        api.submit(chest_png(10 + seed), "image/png", study_uid=uid, priority="stat")
    for uid in mine:
        api.wait_finished(uid)
    tab.unlock()
    page.fill("#reader", "dr-keys")
    page.dispatch_event("#reader", "change")
    order = tab.wait_for_order(api)
    page.focus("#worklist")
    assert tab.selected() == order[0]
    page.keyboard.press("j")
    assert tab.selected() == order[1]
    page.keyboard.press("k")
    assert tab.selected() == order[0]
    for _ in range(order.index(mine[1])):
        page.keyboard.press("j")
    assert tab.selected() == mine[1]
    page.keyboard.press("Enter")
    tab.wait_until("uid => document.querySelector('#study .study-uid')?.textContent === uid", mine[1])
    page.wait_for_selector("#study .finding")
    labels = page.eval_on_selector_all("#study .finding", "els => els.map(e => e.dataset.label)")
    page.keyboard.press("1")  # present
    page.keyboard.press("2")
    page.keyboard.press("2")  # absent
    pressed = "label => document.querySelector(`#study .finding[data-label='${label}'] .%s`).ariaPressed"
    assert page.evaluate(pressed % "present", labels[0]) == "true"
    assert page.evaluate(pressed % "absent", labels[1]) == "true"
    page.keyboard.press("?")
    page.wait_for_selector("#help-dialog[open]")
    assert "Ctrl" in page.inner_text("#help-dialog")
    tab.shot("help")
    page.keyboard.press("Escape")
    page.wait_for_selector("#help-dialog:not([open])", state="attached")
    page.keyboard.press("Control+Enter")
    tab.wait_until("uid => !document.querySelector(`#worklist > li[data-uid='${uid}']`)", mine[1])
    report = api.study(mine[1])["report"]
    assert report["labels"][labels[0]] is True and report["labels"][labels[1]] is False
    assert report["reader"] == "dr-keys"
    assert not tab.errors and not tab.csp_violations()


def test_list_refreshes_in_place_keeping_the_selection_and_shows_unscored_studies(
    tab: Tab, api: Api, page_redis: str
) -> None:
    import redis

    page = tab.page
    first = new_uid()
    api.submit(chest_png(20), "image/png", study_uid=first, priority="routine")
    api.wait_finished(first)
    tab.unlock()
    tab.wait_for_order(api)
    page.click(f'#worklist > li[data-uid="{first}"]')
    assert tab.selected() == first

    # A study whose scoring fails (its model is not served by this server): it stays, unscored.
    failed_uid, arrived_uid = new_uid(), new_uid()
    queue = JobQueue(
        redis.Redis.from_url(page_redis), {"stat": 0, "urgent": 15, "routine": 60, "backfill": 600}
    )
    pixels = np.full((64, 64), 0.5, dtype=np.float32)
    job = NewJob(model="vit-b16-nih14", priority="routine", request_id="browser-test", study_uid=failed_uid,
                 instance_uid=new_uid(), track=True,
                 input=ModelInput(pixels=pixels, source="png", warnings=[], decode_ms=0.0))  # fmt: skip
    queue.submit(job)
    api.submit(chest_png(21), "image/png", study_uid=arrived_uid)
    assert api.wait_finished(failed_uid)["status"] == "failed"
    api.wait_finished(arrived_uid)
    tab.wait_for_order(api)
    assert tab.selected() == first  # the reader's place survives the refresh
    row = page.locator(f'#worklist > li[data-uid="{failed_uid}"]')
    assert "Unscored" in row.inner_text()
    assert re.search(r"not loaded|not scored", row.inner_text())
    waited = row.locator(".wait-value").inner_text()
    page.wait_for_timeout(1100)
    assert row.locator(".wait-value").inner_text() != waited  # the waiting time ticks
    tab.shot()
    assert not tab.errors and not tab.csp_violations()


def test_page_without_keys_opens_straight_on_the_worklist(
    browser: Any, server: str, request: pytest.FixtureRequest
) -> None:
    context = browser.new_context(viewport=VIEWPORT)
    tab = Tab(context.new_page(), server, request.node.name)
    try:
        tab.open()
        tab.wait_live()
        assert not tab.page.is_visible("#key-dialog") and tab.page.is_visible("#worklist")
        tab.shot()
    finally:
        context.close()
