"""The real server process on 127.0.0.1: scoring, the API.md contract, bad input, batching."""

import concurrent.futures as cf
import io

import httpx
import numpy as np
import pydicom
import pytest

from tests.helpers import (
    chest_u8,
    dataset_bytes,
    dicom_bytes,
    dicom_path,
    jpeg_bytes,
    metrics_text,
    png_bytes,
)

NIH14_FIRST = "Atelectasis"


def post(server: str, data: bytes, content_type: str, **params: str) -> httpx.Response:
    return httpx.post(
        f"{server}/v1/predict",
        content=data,
        headers={"Content-Type": content_type},
        params=params,
        timeout=60,
    )


def assert_prediction(body: dict) -> None:
    """Every field API.md promises, with sane values."""
    assert body["request_id"]
    assert body["model"] == {
        "name": "densenet121-nih14",
        "version": "1",
        "backend": "onnxruntime-cpu",
        "weights": "untrained",
    }
    findings = body["findings"]
    assert len(findings) == 14 and findings[0]["label"] == NIH14_FIRST
    for f in findings:
        assert 0.0 <= f["probability"] <= 1.0 and f["threshold"] == 0.5
        assert f["positive"] == (f["probability"] >= f["threshold"])
    assert 0.0 <= body["abnormality_score"] <= 1.0
    assert body["triage"] in ("critical", "abnormal", "normal")
    assert (body["abnormality_score"] >= 0.5) == any(f["positive"] for f in findings)
    assert any("untrained" in w for w in body["warnings"])
    assert set(body["timing_ms"]) == {"queue", "preprocess", "inference"}
    assert body["batch_size"] >= 1


@pytest.mark.parametrize(
    ("make", "content_type"),
    [
        (lambda: png_bytes(chest_u8(300)), "image/png"),
        (lambda: png_bytes(chest_u8(300).astype(np.uint16) * 257), "image/png"),
        (lambda: jpeg_bytes(chest_u8(600)), "image/jpeg"),
        (lambda: dicom_bytes("RG1_UNCR.dcm"), "application/dicom"),
        (lambda: dicom_bytes("RG1_J2KR.dcm"), "application/dicom"),
    ],
    ids=["png8", "png16", "jpeg", "dicom", "dicom-j2k"],
)
def test_scores_each_format(server: str, make, content_type: str) -> None:  # type: ignore[no-untyped-def]
    response = post(server, make(), content_type)
    assert response.status_code == 200, response.text
    assert_prediction(response.json())
    # httpx accepts gzip; a ~2 KB prediction is cheaper to send as is (routes.compress_except)
    assert "content-encoding" not in response.headers


def test_j2k_and_uncompressed_twins_score_identically(server: str) -> None:
    a = post(server, dicom_bytes("RG1_UNCR.dcm"), "application/dicom").json()
    b = post(server, dicom_bytes("RG1_J2KR.dcm"), "application/dicom").json()
    assert [f["probability"] for f in a["findings"]] == pytest.approx(
        [f["probability"] for f in b["findings"]], abs=1e-6
    )


def test_multipart_upload_and_priority_and_request_id(server: str) -> None:
    response = httpx.post(
        f"{server}/v1/predict",
        files={"file": ("chest.png", png_bytes(chest_u8(128)), "image/png")},
        params={"priority": "stat", "model": "densenet121-nih14"},
        headers={"X-Request-ID": "ris-order-42"},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["priority"] == "stat" and body["request_id"] == "ris-order-42"
    assert response.headers["X-Request-ID"] == "ris-order-42"


def test_lateral_dicom_scores_with_a_warning(server: str) -> None:
    ds = pydicom.dcmread(dicom_path("RG1_UNCR.dcm"))
    ds.ViewPosition = "LL"
    body = post(server, dataset_bytes(ds), "application/dicom").json()
    assert any("lateral" in w for w in body["warnings"])


def truncated_png() -> bytes:
    data = png_bytes(chest_u8(256))
    return data[: len(data) // 2]


def no_pixels() -> bytes:
    ds = pydicom.dcmread(dicom_path("RG1_UNCR.dcm"))
    del ds.PixelData
    return dataset_bytes(ds)


BAD_INPUTS = [
    ("text", lambda: b"just some text", "image/png", {}, 422, "not_an_image"),
    ("empty", lambda: b"", "image/png", {}, 400, "bad_request"),
    ("gif-type", lambda: b"GIF89a", "image/gif", {}, 415, "unsupported_media_type"),
    ("truncated", truncated_png, "image/png", {}, 422, "corrupt_image"),
    (
        "truncated-dicom",
        lambda: dicom_bytes("RG1_UNCR.dcm")[:300000],
        "application/dicom",
        {},
        422,
        "corrupt_image",
    ),
    ("multi-frame", lambda: dicom_bytes("emri_small.dcm"), "application/dicom", {}, 422, "multi_frame"),
    (
        "palette",
        lambda: dicom_bytes("OBXXXX1A_rle.dcm"),
        "application/dicom",
        {},
        422,
        "unsupported_photometric",
    ),
    ("no-pixels", no_pixels, "application/dicom", {}, 422, "pixel_data_missing"),
    (
        "unknown-model",
        lambda: png_bytes(chest_u8(64)),
        "image/png",
        {"model": "nope"},
        404,
        "model_not_found",
    ),
    ("bad-priority", lambda: png_bytes(chest_u8(64)), "image/png", {"priority": "asap"}, 400, "bad_request"),
]


@pytest.mark.parametrize(
    ("make", "content_type", "params", "status", "code"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_bad_input_gets_its_error_and_the_server_keeps_serving(  # type: ignore[no-untyped-def]
    server: str, make, content_type: str, params: dict, status: int, code: str
) -> None:
    response = post(server, make(), content_type, **params)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and len(error["message"]) > 10
    assert post(server, png_bytes(chest_u8(64)), "image/png").status_code == 200


def test_multipart_without_file_part_is_400(server: str) -> None:
    response = httpx.post(f"{server}/v1/predict", files={"image": ("a.png", b"x", "image/png")}, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["code"] == "bad_request"


def test_decompression_bomb_is_413(server: str) -> None:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (40000, 40000)).save(buf, format="PNG")
    response = post(server, buf.getvalue(), "image/png")
    assert response.status_code == 413 and response.json()["error"]["code"] == "image_too_large"


def test_concurrent_requests_share_engine_calls_and_a_bad_one_fails_alone(server: str) -> None:
    # More requests than engines (the urgent lane takes a lone job at once, and each worker the
    # jobs queued when it looks): a burst of 15 keeps every engine busy, so jobs queue and batch.
    good = png_bytes(chest_u8(64))
    bodies = [(good, "image/png")] * 15 + [(truncated_png(), "image/png")]
    with cf.ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda b: post(server, *b), bodies))
    statuses = [r.status_code for r in responses]
    assert statuses == [200] * 15 + [422]
    assert max(r.json()["batch_size"] for r in responses[:15]) > 1, "requests were not batched"


def test_models_route_lists_labels_versions_and_provenance(server: str) -> None:
    body = httpx.get(f"{server}/v1/models", timeout=10).json()
    by_name = {m["name"]: m for m in body["models"]}
    dense = by_name["densenet121-nih14"]
    assert dense["default"] is True and dense["labels"][0] == NIH14_FIRST and len(dense["labels"]) == 14
    assert dense["versions"][0]["weights"] == "untrained" and dense["versions"][0]["serving"] is True
    assert by_name["vit-b16-nih14"]["versions"] == []


def test_probes_and_openapi(server: str) -> None:
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200
    ready = httpx.get(f"{server}/ready", timeout=10)
    assert ready.status_code == 200 and ready.json()["models"] == ["densenet121-nih14"]
    openapi = httpx.get(f"{server}/openapi.json", timeout=10)
    assert openapi.headers["content-encoding"] == "gzip"  # longer replies are still compressed
    paths = openapi.json()["paths"]
    assert {"/v1/predict", "/v1/models", "/health", "/ready", "/metrics"} <= set(paths)


def test_metrics_count_requests_batches_and_errors(server: str) -> None:
    post(server, b"junk", "image/png")
    post(server, png_bytes(chest_u8(64)), "image/png")
    text = metrics_text(server)
    for name in (
        'cxr_triage_requests_total{method="POST",route="/v1/predict",status="200"}',
        'cxr_triage_errors_total{code="not_an_image"}',
        "cxr_triage_batch_size_bucket",
        "cxr_triage_inference_seconds_bucket",
        'cxr_triage_preprocess_seconds_bucket{format="png"',
        'cxr_triage_model_info{backend="onnxruntime-cpu",model="densenet121-nih14"',
    ):
        assert name in text, name
    assert "RG1" not in text and "1.3.6.1" not in text  # no UIDs or file names in metrics


def test_unknown_route_is_json_404(server: str) -> None:
    response = httpx.get(f"{server}/v1/nothing-here", timeout=10)
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def test_metrics_add_up_across_two_inference_workers(exported_repo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Also: each process of the replica names itself after its role, CXR_HTTP_SERVERS sets how
    many HTTP servers there are, and the engine's CPU time is counted (a share of what the
    inference workers used)."""
    import re

    import psutil

    from tests.helpers import start_server, stop

    env = {"CXR_INFERENCE_WORKERS": "2", "CXR_DATA_DIR": str(tmp_path / "data"), "CXR_DECODE_WORKERS": "1"}
    server = start_server(exported_repo, env | {"CXR_HTTP_SERVERS": "2"})
    try:
        url = server.wait_ready(120).url
        body = png_bytes(chest_u8(64))
        with cf.ThreadPoolExecutor(6) as pool:
            statuses = list(pool.map(lambda _: post(url, body, "image/png").status_code, range(24)))
        assert statuses == [200] * 24
        text = metrics_text(url)
        roles: dict[str, list[float]] = {}
        main = psutil.Process(server.proc.pid)
        for p in [main, *main.children(recursive=True)]:
            if p.name() != "redis-server" and "resource_tracker" not in " ".join(p.cmdline()):
                cpu = p.cpu_times()
                roles.setdefault(p.name(), []).append(cpu.user + cpu.system)
    finally:
        stop(server.proc)
        server.log_path.unlink(missing_ok=True)

    def value(pattern: str) -> float:
        return sum(float(m) for m in re.findall(pattern + r" ([0-9.e+]+)", text))

    assert value(r'cxr_triage_requests_total\{method="POST",route="/v1/predict",status="200"\}') == 24
    assert value(r'cxr_triage_batch_size_sum\{model="densenet121-nih14"\}') == 24  # images scored
    assert text.count("cxr_triage_model_info{") == 3  # one live series per worker process (and the lane)
    # main and LitServe's manager (forked from it); two HTTP servers (LitServe's default would be
    # three, one per inference process), each with its decoder (started with the HTTP process,
    # although these PNGs are small, decoded in the HTTP process: a large upload does not wait
    # for its pool to start)
    assert {name: len(cpu) for name, cpu in roles.items()} == {
        "cxr-main": 2,
        "cxr-http": 2,
        "cxr-decoder": 2,
        "cxr-worker": 2,
        "cxr-lane": 1,
    }, roles
    engine = value(r'cxr_triage_engine_cpu_seconds_total\{[^}]*model="densenet121-nih14"[^}]*\}')
    assert 0 < engine < sum(roles["cxr-worker"]) + sum(roles["cxr-lane"])
