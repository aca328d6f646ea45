"""Hot reload through the real server: serving.json changes while requests flow, no restart.

One server (two inference workers and the urgent lane's) serves a tiny repository with three
versions of one model: 1 (exported), 2 (classifier weights scaled: other probabilities) and 3
(version 1's engine with its own thresholds). The tests rewrite serving.json as the promotion
tool does and check what
every response says: the version that made it, with that version's probabilities.
"""

import concurrent.futures as cf
import re
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from cxr_triage.engines import OnnxEngine
from cxr_triage.imaging import ImageLimits, prepare, to_batch
from cxr_triage.repository import (
    SERVING_FILE,
    Canary,
    InputSpec,
    ServingState,
    goes_to_canary,
    write_serving_state,
)
from tests.helpers import add_version, chest_u8, copy_repo, metrics_text, png_bytes, running_server

MODEL = "densenet121-nih14"
POLL_S = 0.2
WORKERS = 2
PROCESSES = WORKERS + 1  # and the urgent lane's worker, which reloads too
IMAGE = png_bytes(chest_u8(64))


@dataclass(frozen=True)
class HotRepo:
    root: Path
    model_dir: Path
    labels: list[str]
    config_thresholds: dict[str, float]
    probs: dict[str, list[float]]  # version -> probabilities of IMAGE, computed here
    own_thresholds: dict[str, float]  # version 3's


@dataclass(frozen=True)
class Server:
    url: str
    log: Path


def engine_probs(version_dir: Path, spec: InputSpec) -> list[float]:
    """What the server's pipeline (decode, batch, ONNX Runtime) gives for IMAGE."""
    pixels = prepare(IMAGE, "image/png", spec, ImageLimits()).pixels
    probs = OnnxEngine(version_dir / "model.onnx", "cpu", 1).run(to_batch([pixels], spec))[0]
    return [float(p) for p in probs]


@pytest.fixture(scope="module")
def hot_repo(exported_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> HotRepo:
    root = copy_repo(exported_repo, tmp_path_factory.mktemp("hot") / "model_repo")
    model_dir = root / MODEL
    config = yaml.safe_load((model_dir / "config.yaml").read_text())
    spec = InputSpec.model_validate(config["input"])
    assert add_version(model_dir, "1", scale=3.0) == "2"
    probs = {v: engine_probs(model_dir / v, spec) for v in ("1", "2")}
    assert max(abs(a - b) for a, b in zip(probs["1"], probs["2"], strict=True)) > 0.02
    assert all(0.02 < p < 0.98 for p in probs["1"])
    # Version 3: version 1's engine with operating points that flip every call the config's make.
    own = {
        label: 0.01 if p < config["thresholds"][label] else 0.99
        for label, p in zip(config["labels"], probs["1"], strict=True)
    }
    assert add_version(model_dir, "1", thresholds=own) == "3"
    probs["3"] = probs["1"]
    write_serving_state(model_dir, ServingState(default_version="1"))  # not the latest (3)
    return HotRepo(root, model_dir, config["labels"], config["thresholds"], probs, own)


@pytest.fixture(scope="module")
def server(hot_repo: HotRepo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("hot-server")
    env = {
        "CXR_RELOAD_POLL_S": str(POLL_S),
        "CXR_INFERENCE_WORKERS": str(WORKERS),
        "CXR_INTRA_OP_THREADS": "1",
        "CXR_DECODE_WORKERS": "1",
        "CXR_DATA_DIR": str(tmp / "data"),
    }
    with running_server(hot_repo.root, env, timeout=120, log_path=tmp / "server.log") as url:
        yield Server(url, tmp / "server.log")


def predict(client: httpx.Client | None, url: str) -> httpx.Response:
    post = client.post if client is not None else httpx.post
    return post(f"{url}/v1/predict", content=IMAGE, headers={"Content-Type": "image/png"}, timeout=60)


def reloads(url: str, outcome: str) -> float:
    text = metrics_text(url)
    pattern = rf'cxr_triage_model_reloads_total\{{model="{MODEL}",outcome="{outcome}"\}} ([0-9.e+]+)'
    return sum(float(v) for v in re.findall(pattern, text))


def wait_reloads(url: str, outcome: str, target: float, timeout: float = 15.0) -> float:
    """Wait until every worker counted its reload; returns when that was seen (monotonic)."""
    deadline = time.monotonic() + timeout
    while (seen := reloads(url, outcome)) < target:
        assert time.monotonic() < deadline, f"{outcome} reloads: {seen}, expected {target}"
        time.sleep(POLL_S / 4)
    assert seen == target, f"{outcome} reloads: {seen}, expected {target}"
    return time.monotonic()


def set_serving(server: Server, hot: HotRepo, state: ServingState, outcome: str = "ok") -> None:
    """Write serving.json as the promotion tool does; return once every worker took it."""
    before = reloads(server.url, outcome)
    write_serving_state(hot.model_dir, state)
    wait_reloads(server.url, outcome, before + PROCESSES)


def versions_out(url: str) -> dict[str, dict]:
    models = httpx.get(f"{url}/v1/models", timeout=10).json()["models"]
    return {v["version"]: v for m in models if m["name"] == MODEL for v in m["versions"]}


def wait_models(url: str, serving: dict[str, tuple[str, float]], timeout: float = 10.0) -> dict[str, dict]:
    """/v1/models once it shows ``serving`` (version -> (role, traffic)) and nothing else serving."""
    deadline = time.monotonic() + timeout
    while True:
        out = versions_out(url)
        shown = {v: (o["role"], o["traffic"]) for v, o in out.items() if o["serving"]}
        if shown == serving or time.monotonic() > deadline:
            assert shown == serving
            return out
        time.sleep(POLL_S / 2)


def assert_made_by(body: dict, hot: HotRepo, version: str) -> None:
    assert body["model"]["name"] == MODEL and body["model"]["version"] == version, body["model"]
    probs = [f["probability"] for f in body["findings"]]
    assert probs == pytest.approx(hot.probs[version], abs=1e-4), f"not version {version}'s probabilities"


def test_promotion_under_load_fails_no_request_and_switches_every_worker(
    server: Server, hot_repo: HotRepo
) -> None:
    set_serving(server, hot_repo, ServingState(default_version="1"))
    records: list[tuple[float, float, httpx.Response]] = []  # sent, received, response
    stop = threading.Event()

    def client() -> None:
        with httpx.Client() as c:
            while not stop.is_set():
                sent = time.monotonic()
                response = predict(c, server.url)
                records.append((sent, time.monotonic(), response))

    with cf.ThreadPoolExecutor(4) as pool:
        clients = [pool.submit(client) for _ in range(4)]
        time.sleep(1.0)
        before = reloads(server.url, "ok")
        written = time.monotonic()
        write_serving_state(hot_repo.model_dir, ServingState(default_version="2"))
        swapped = wait_reloads(server.url, "ok", before + PROCESSES)
        time.sleep(1.0)
        stop.set()
        for c in clients:
            c.result()

    assert [r.status_code for _, _, r in records] == [200] * len(records), "a request failed"
    before = [r.json() for _, received, r in records if received < written]
    after = [r.json() for sent, _, r in records if sent > swapped]
    assert len(before) >= 5 and len(after) >= 5, (len(before), len(after))
    for body in before:
        assert_made_by(body, hot_repo, "1")
    for body in after:
        assert_made_by(body, hot_repo, "2")
    for _, _, r in records:  # in between, either version, each with its own probabilities
        assert_made_by(r.json(), hot_repo, r.json()["model"]["version"])
    assert swapped - written < 10 * POLL_S + 3.0, "workers took too long to switch"

    out = wait_models(server.url, {"2": ("default", 1.0)})
    assert out["2"]["backend"] == "onnxruntime-cpu" and out["1"]["backend"] is None
    assert httpx.get(f"{server.url}/ready", timeout=10).json()["versions"] == {MODEL: "2"}


def test_canary_scores_exactly_the_jobs_its_hash_picks(server: Server, hot_repo: HotRepo) -> None:
    canary = Canary(version="2", fraction=0.5)
    set_serving(server, hot_repo, ServingState(default_version="1", canary=canary))
    with cf.ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: predict(None, server.url), range(60)))
    assert [r.status_code for r in responses] == [200] * 60
    bodies = [r.json() for r in responses]
    for body in bodies:
        assert_made_by(body, hot_repo, "2" if goes_to_canary(body["job_id"], canary) else "1")
    assert {b["model"]["version"] for b in bodies} == {"1", "2"}
    out = wait_models(server.url, {"1": ("default", 0.5), "2": ("canary", 0.5)})
    assert out["3"]["serving"] is False and out["3"]["role"] is None


def assert_still_serving(server: Server, hot: HotRepo, version: str) -> None:
    """Requests succeed, made by ``version``; every HTTP process keeps showing it as served."""
    responses = [predict(None, server.url) for _ in range(3)]
    assert [r.status_code for r in responses] == [200] * 3
    for r in responses:
        assert_made_by(r.json(), hot, version)
    time.sleep(2 * POLL_S)  # every HTTP process has looked at the broken serving.json
    for _ in range(6):  # LitServe runs one HTTP process per worker here: ask each, likely
        shown = {v: (o["role"], o["traffic"]) for v, o in versions_out(server.url).items() if o["serving"]}
        assert shown == {version: ("default", 1.0)}
        ready = httpx.get(f"{server.url}/ready", timeout=10)
        assert ready.status_code == 200 and ready.json()["versions"] == {MODEL: version}


def test_a_promotion_that_cannot_load_keeps_the_old_version(server: Server, hot_repo: HotRepo) -> None:
    # Version 3 has not served before, and no request comes between its promotion and the
    # broken ones: the HTTP processes can only show it if they follow serving.json by
    # themselves, as the workers do.
    set_serving(server, hot_repo, ServingState(default_version="3"))
    time.sleep(2 * POLL_S)
    corrupt = add_version(hot_repo.model_dir, "1", engine=b"not an onnx file")
    errors_before = server.log.read_text().count("changed but cannot be served; still serving")
    try:
        for state in (ServingState(default_version="9"), ServingState(default_version=corrupt)):
            set_serving(server, hot_repo, state, outcome="failed")
            assert_still_serving(server, hot_repo, "3")
        failed = reloads(server.url, "failed")
        (hot_repo.model_dir / SERVING_FILE).write_text("{ not json")
        wait_reloads(server.url, "failed", failed + PROCESSES)
        assert_still_serving(server, hot_repo, "3")
        time.sleep(2 * POLL_S)  # a failed change is reported once, not at every poll
        errors = server.log.read_text().count("changed but cannot be served; still serving")
        assert errors - errors_before == PROCESSES * 3
        assert reloads(server.url, "failed") == failed + PROCESSES
    finally:
        shutil.rmtree(hot_repo.model_dir / corrupt)
    set_serving(server, hot_repo, ServingState(default_version="1"))  # the next change loads again
    assert_made_by(predict(None, server.url).json(), hot_repo, "1")
    text = metrics_text(server.url)
    info = re.findall(r'cxr_triage_model_info\{[^}]*version="(\d+)"[^}]*\} ([0-9.]+)', text)
    values = {(version, float(v)) for version, v in info}
    assert ("1", 1.0) in values and ("3", 1.0) not in values, "the gauge names only the served version"


def test_a_version_is_scored_with_its_own_thresholds(server: Server, hot_repo: HotRepo) -> None:
    set_serving(server, hot_repo, ServingState(default_version="1"))
    by_config = predict(None, server.url).json()
    set_serving(server, hot_repo, ServingState(default_version="3"))
    own = predict(None, server.url).json()
    assert_made_by(own, hot_repo, "3")
    for f, g in zip(by_config["findings"], own["findings"], strict=True):
        assert f["threshold"] == hot_repo.config_thresholds[f["label"]]
        assert g["threshold"] == hot_repo.own_thresholds[g["label"]]
        assert g["positive"] == (g["probability"] >= g["threshold"])
        assert g["positive"] != f["positive"], "the version's thresholds flip every call here"
    assert (own["abnormality_score"] >= 0.5) == any(g["positive"] for g in own["findings"])
