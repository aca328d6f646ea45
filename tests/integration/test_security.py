"""Authentication, bind safety, request limits, and fuzzed bodies against the real server."""

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from cxr_triage.config import Settings
from tests.helpers import chest_u8, dicom_bytes, png_bytes, running_server

KEY = "test-key-7f3a"


def test_non_loopback_bind_needs_auth() -> None:
    with pytest.raises(ValidationError, match=r"refusing to bind 0\.0\.0\.0"):
        Settings(host="0.0.0.0")
    assert Settings(host="0.0.0.0", api_keys=[KEY]).host == "0.0.0.0"
    assert Settings(host="0.0.0.0", behind_auth_proxy=True).host == "0.0.0.0"


@pytest.fixture(scope="module")
def secured(exported_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    env = {
        "CXR_API_KEYS": f'["{KEY}", "second-key"]',
        "CXR_MAX_STOW_PARTS": "1",
        "CXR_DATA_DIR": str(tmp_path_factory.mktemp("secured") / "data"),
        "CXR_DECODE_WORKERS": "1",
    }
    with running_server(exported_repo, env, timeout=120) as url:
        yield url


def test_probes_are_open_everything_else_needs_a_key(secured: str) -> None:
    assert httpx.get(f"{secured}/health").status_code == 200
    assert httpx.get(f"{secured}/ready", timeout=30).status_code == 200
    for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", "/v1/predict"),
                         ("GET", "/v1/worklist"), ("POST", "/dicom-web/studies")):  # fmt: skip
        response = httpx.request(method, f"{secured}{path}", timeout=30)
        assert response.status_code == 401, path
        assert response.json()["error"]["code"] == "unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"
    wrong = httpx.get(f"{secured}/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401


def test_bearer_token_and_api_key_header_both_work(secured: str) -> None:
    assert httpx.get(f"{secured}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    assert httpx.get(f"{secured}/v1/models", headers={"X-API-Key": "second-key"}).status_code == 200
    response = httpx.post(f"{secured}/v1/predict", content=png_bytes(chest_u8(64)), timeout=60,
                          headers={"Content-Type": "image/png", "X-API-Key": KEY})  # fmt: skip
    assert response.status_code == 200, response.text


def test_too_many_stow_parts_is_413(secured: str) -> None:
    part = dicom_bytes("RG1_UNCR.dcm")
    body = (
        b"".join(b"--b\r\nContent-Type: application/dicom\r\n\r\n" + part + b"\r\n" for _ in range(2))
        + b"--b--"
    )
    headers = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=b', "X-API-Key": KEY}
    response = httpx.post(f"{secured}/dicom-web/studies", content=body, headers=headers, timeout=60)
    assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"


ROUTES = [
    ("/v1/predict", "image/png"),
    ("/v1/predict", "application/dicom"),
    ("/v1/predict", "multipart/form-data; boundary=x"),
    ("/v1/studies", "image/jpeg"),
    ("/dicom-web/studies", 'multipart/related; type="application/dicom"; boundary=x'),
]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from(ROUTES), body=st.binary(max_size=2048))
def test_fuzzed_bodies_never_get_a_5xx(server: str, route: tuple[str, str], body: bytes) -> None:
    path, content_type = route
    response = httpx.post(f"{server}{path}", content=body, headers={"Content-Type": content_type}, timeout=60)
    assert response.status_code < 500, response.text
    assert "error" in response.json() or response.status_code in (200, 202)
