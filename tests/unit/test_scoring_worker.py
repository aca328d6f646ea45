"""The inference worker's batch scoring, in process: one engine call per batch, failures isolated."""

import time
from pathlib import Path

import numpy as np

from cxr_triage.config import Settings
from cxr_triage.errors import CxrError
from cxr_triage.imaging import ModelInput
from cxr_triage.repository import BatchingSpec
from cxr_triage.serving.api import TriageAPI
from cxr_triage.serving.intake import ScoringRequest


def request(pixels: np.ndarray, rid: str) -> ScoringRequest:
    return ScoringRequest(
        request_id=rid,
        model="densenet121-nih14",
        priority="routine",
        input=ModelInput(pixels=pixels, source="png", warnings=[], decode_ms=1.0),
        accepted_at=time.monotonic(),
        preprocess_ms=1.0,
    )


def test_batch_is_one_engine_call_and_a_malformed_input_fails_alone(exported_repo: Path) -> None:
    api = TriageAPI(Settings(model_repo=exported_repo), ["densenet121-nih14"], BatchingSpec())
    api.setup("cpu")
    calls: list[int] = []
    engine = api.models["densenet121-nih14"].engine
    original = engine.run

    def counting_run(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        return original(batch)

    engine.run = counting_run  # type: ignore[method-assign]
    good = np.random.default_rng(0).random((64, 64), dtype=np.float32)
    outcomes = api.score_batch([request(good, "a"), request(good, "b"), request(good, "c")])
    assert calls == [3] and [o["request_id"] for o in outcomes] == ["a", "b", "c"]  # type: ignore[index]
    assert all(o["batch_size"] == 3 for o in outcomes)  # type: ignore[index]

    calls.clear()
    wrong_size = np.zeros((32, 48), dtype=np.float32)
    outcomes = api.score_batch([request(good, "a"), request(wrong_size, "bad"), request(good, "c")])
    assert isinstance(outcomes[1], CxrError) and outcomes[1].status == 500
    assert outcomes[0]["request_id"] == "a" and outcomes[2]["request_id"] == "c"  # type: ignore[index]
    identical = outcomes[0]["findings"] == outcomes[2]["findings"]  # type: ignore[index]
    assert identical, "same input, same scores"
