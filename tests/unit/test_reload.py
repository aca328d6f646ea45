"""Hot reload in process: noticing serving.json changes, swapping engines, the HTTP view."""

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest
import redis
from prometheus_client import REGISTRY

from cxr_triage.config import Settings
from cxr_triage.errors import RepositoryError
from cxr_triage.imaging import ModelInput
from cxr_triage.queue import JobQueue, NewJob
from cxr_triage.repository import (
    SERVING_FILE,
    BatchingSpec,
    Canary,
    ModelRepository,
    ServingState,
    goes_to_canary,
    write_serving_state,
)
from cxr_triage.serving.api import TriageAPI
from cxr_triage.serving.intake import Intake
from cxr_triage.serving.reload import ServingWatch, serving_stamp, traffic_split
from cxr_triage.serving.routes import list_models
from cxr_triage.serving.versions import warm_up
from tests.helpers import add_version, copy_repo

MODEL = "densenet121-nih14"
POLL_S = 0.01


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def repo(exported_repo: Path, tmp_path: Path) -> Path:
    """Versions 1 and 2 (other probabilities) of the tiny model; nothing promoted yet."""
    root = copy_repo(exported_repo, tmp_path / "model_repo")
    add_version(root / MODEL, "1", scale=3.0)
    return root


@pytest.fixture
def settings(repo: Path, embedded_redis: str) -> Settings:
    redis.Redis.from_url(embedded_redis).flushall()
    return Settings(
        model_repo=repo, redis_url=embedded_redis, reload_poll_s=POLL_S, intra_op_threads=1, routine_nice=0
    )


def promote(repo: Path, state: ServingState) -> None:
    write_serving_state(repo / MODEL, state)
    time.sleep(2 * POLL_S)  # the next poll is due


def reloads(outcome: str) -> float:
    return (
        REGISTRY.get_sample_value("cxr_triage_model_reloads_total", {"model": MODEL, "outcome": outcome})
        or 0.0
    )


def worker(settings: Settings, pinned: str = "1", fallback: ModelRepository | None = None) -> TriageAPI:
    api = TriageAPI(settings, {MODEL: pinned}, BatchingSpec(max_batch_size=8), fallback=fallback)
    api.setup("cpu")
    return api


def test_watch_reports_a_change_once_and_only_when_a_poll_is_due(repo: Path) -> None:
    clock = Clock()
    watch = ServingWatch(repo, [MODEL], 2.0, clock=clock)
    write_serving_state(repo / MODEL, ServingState(default_version="1"))
    assert watch.changed() == [], "no poll before poll_s has passed"
    clock.now += 2.0
    assert watch.changed() == [MODEL]
    clock.now += 2.0
    assert watch.changed() == [], "a change is reported once"
    write_serving_state(repo / MODEL, ServingState(default_version="1"))  # same content, new file
    (repo / MODEL / SERVING_FILE).unlink()  # and gone again: back to "latest"
    clock.now += 2.0
    assert watch.changed() == [MODEL] and serving_stamp(repo / MODEL) is None


def test_watch_is_off_at_zero_and_an_unseen_watch_reports_every_model_first(repo: Path) -> None:
    clock = Clock()
    off = ServingWatch(repo, [MODEL], 0.0, clock=clock)
    write_serving_state(repo / MODEL, ServingState(default_version="2"))
    clock.now += 1e6
    assert off.changed() == []
    unseen = ServingWatch(repo, [MODEL], 1.0, seen=False, clock=clock)
    clock.now += 1.0
    assert unseen.changed() == [MODEL]


def test_traffic_split_names_the_default_and_the_canary_with_their_shares(repo: Path) -> None:
    entry = ModelRepository.load(repo).get(MODEL)
    assert traffic_split(entry, None) == {"2": ("default", 1.0)}, "the latest, before any promotion"
    assert traffic_split(entry, "1") == {"1": ("default", 1.0)}, "the version the service started with"
    canary = Canary(version="2", fraction=0.1)
    write_serving_state(repo / MODEL, ServingState(default_version="1", canary=canary))
    entry = ModelRepository.load(repo).get(MODEL)
    assert traffic_split(entry, "2") == {"1": ("default", 0.9), "2": ("canary", 0.1)}


def test_a_worker_starts_on_the_promoted_version_else_its_pinned_one(settings: Settings, repo: Path) -> None:
    assert worker(settings, pinned="1").models[MODEL].version.version == "1", "2 is exported, not promoted"
    write_serving_state(repo / MODEL, ServingState(default_version="2"))
    assert worker(settings, pinned="1").models[MODEL].version.version == "2", "restarted after a promotion"


def test_a_worker_falls_back_to_its_pinned_version_when_serving_json_is_broken(
    settings: Settings, repo: Path
) -> None:
    validated = ModelRepository.load(repo)
    (repo / MODEL / SERVING_FILE).write_text('{"default_version": "7"}')
    failed = reloads("failed")
    assert worker(settings, pinned="1", fallback=validated).models[MODEL].version.version == "1"
    assert reloads("failed") == failed + 1
    with pytest.raises(RepositoryError, match="pinned version 1"):
        worker(settings, pinned="1")  # nothing to fall back to: the worker's setup fails


def submit(api: TriageAPI, n: int) -> None:
    pixels = np.random.default_rng(0).random((64, 64), dtype=np.float32)
    for i in range(n):
        item = ModelInput(pixels=pixels, source="png", warnings=[], decode_ms=1.0)
        api.queue.submit(NewJob(MODEL, "routine", item, f"r{i}"))


def test_reload_swaps_between_batches_reuses_engines_and_splits_the_canary_by_job(
    settings: Settings, repo: Path
) -> None:
    write_serving_state(repo / MODEL, ServingState(default_version="1"))
    api = worker(settings)
    engine_v1 = api.models[MODEL].engine
    ok = reloads("ok")
    canary = Canary(version="2", fraction=0.5)
    promote(repo, ServingState(default_version="1", canary=canary))
    api.reap_if_due()
    assert reloads("ok") == ok + 1
    route = api.routes[MODEL]
    assert route.default.engine is engine_v1, "a loaded version keeps its engine"
    assert route.canary is not None and route.canary.version.version == "2"

    calls: list[str] = []
    for model in route.loaded():
        run = model.engine.run_with_heatmaps

        def counting(batch: np.ndarray, run=run, version=model.version.version):  # type: ignore[no-untyped-def]
            calls.append(version)
            return run(batch)

        model.engine.run_with_heatmaps = counting  # type: ignore[method-assign]
    submit(api, 16)
    jobs = api.queue.lease(16, "test", 30)
    outcomes = api.score_batch(jobs)
    assert sorted(calls) == ["1", "2"], "one engine call per version"
    for job, outcome in zip(jobs, outcomes, strict=True):
        assert isinstance(outcome, dict)
        assert outcome["model"]["version"] == ("2" if goes_to_canary(job.job_id, canary) else "1")
    probs = {
        o["model"]["version"]: [f["probability"] for f in o["findings"]]
        for o in outcomes
        if isinstance(o, dict)
    }
    assert set(probs) == {"1", "2"} and probs["1"] != probs["2"]


def test_a_reload_that_fails_keeps_the_old_version_and_is_counted_once(
    settings: Settings, repo: Path
) -> None:
    api = worker(settings)
    assert api.models[MODEL].version.version == "1"
    before, failed = api.routes[MODEL], reloads("failed")
    corrupt = add_version(repo / MODEL, "1", engine=b"not onnx")
    for state in (ServingState(default_version="9"), ServingState(default_version=corrupt)):
        promote(repo, state)
        api.reap_if_due()
        time.sleep(2 * POLL_S)
        api.reap_if_due()  # the same change is not retried (nor logged) at every poll
    assert api.routes[MODEL] is before and reloads("failed") == failed + 2
    labels = {"model": MODEL, "weights": "untrained", "backend": "onnxruntime-cpu"}
    assert REGISTRY.get_sample_value("cxr_triage_model_info", {**labels, "version": "1"}) == 1.0
    promote(repo, ServingState(default_version="2"))
    api.reap_if_due()
    assert api.models[MODEL].version.version == "2", "the next change loads again"
    assert REGISTRY.get_sample_value("cxr_triage_model_info", {**labels, "version": "2"}) == 1.0
    assert REGISTRY.get_sample_value("cxr_triage_model_info", {**labels, "version": "1"}) is None


def test_the_http_view_follows_serving_json_and_keeps_the_last_good_one(
    settings: Settings, repo: Path
) -> None:
    queue = JobQueue(redis.Redis.from_url(str(settings.redis_url)), settings.max_wait_s)
    intake = Intake(settings, ModelRepository.load(repo), [MODEL], queue)

    def shown() -> dict[str, tuple[bool, str | None, float | None]]:
        asyncio.run(intake.refresh())
        model = next(m for m in list_models(intake).models if m.name == MODEL)
        return {v.version: (v.serving, v.role, v.traffic) for v in model.versions}

    assert shown() == {"1": (False, None, None), "2": (True, "default", 1.0)}
    promote(repo, ServingState(default_version="1", canary=Canary(version="2", fraction=0.25)))
    assert shown() == {"1": (True, "default", 0.75), "2": (True, "canary", 0.25)}
    assert intake.default_versions() == {MODEL: "1"}
    (repo / MODEL / SERVING_FILE).write_text("{ broken")
    time.sleep(2 * POLL_S)
    assert shown() == {"1": (True, "default", 0.75), "2": (True, "canary", 0.25)}


def test_an_engine_with_the_wrong_number_of_outputs_is_refused_before_it_serves(repo: Path) -> None:
    class ThreeOutputs:
        backend = "fake"

        def run(self, batch: np.ndarray) -> np.ndarray:
            return np.full((len(batch), 3), 0.5, np.float32)

        def run_with_heatmaps(self, batch: np.ndarray) -> tuple[np.ndarray, None]:
            return self.run(batch), None

    config = ModelRepository.load(repo).get(MODEL).config
    with pytest.raises(RepositoryError, match="lists 14 labels"):
        warm_up(ThreeOutputs(), config)
