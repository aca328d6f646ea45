"""The LitServe API: engines live here, one per served model, built in ``setup``.

Per LitServe's contract the API object is pickled into each inference worker, so ``__init__``
holds configuration only and ``setup`` loads the repository and engines in the worker.
"""

import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Annotated, Any

# No `from __future__ import annotations` here: LitServe reads decode_request's annotation at
# run time to build the route, and a string annotation breaks it (ENVIRONMENT.md).
import litserve as ls
from fastapi import Depends

from cxr_triage.config import Settings
from cxr_triage.engines import Engine, OnnxEngine
from cxr_triage.errors import CxrError
from cxr_triage.imaging import to_batch
from cxr_triage.observability import metrics
from cxr_triage.repository import BatchingSpec, ModelEntry, ModelRepository, VersionEntry
from cxr_triage.schemas import UNTRAINED_WARNING, PredictResponse
from cxr_triage.serving.intake import ScoringRequest, read_upload
from cxr_triage.serving.loop import TriageLoop
from cxr_triage.triage import abnormality_score, score_findings, triage_class

log = logging.getLogger(__name__)
Outcome = dict[str, Any] | CxrError


class LoadedModel:
    def __init__(self, entry: ModelEntry, version: VersionEntry, engine: Engine) -> None:
        self.entry, self.version, self.engine = entry, version, engine
        self.ref = {
            "name": entry.name,
            "version": version.version,
            "backend": engine.backend,
            "weights": version.metadata.weights,
        }


class TriageAPI(ls.LitAPI):
    """Scores batches of prepared radiographs; see ``score_batch``."""

    def __init__(self, settings: Settings, served: Sequence[str], batching: BatchingSpec) -> None:
        super().__init__(
            max_batch_size=batching.max_batch_size,
            batch_timeout=batching.batch_timeout_ms / 1000.0,
            api_path="/v1/predict",
            loop=TriageLoop(),
        )
        self.settings = settings
        self.served = list(served)
        self.models: dict[str, LoadedModel] = {}

    def setup(self, device: str) -> None:
        repo = ModelRepository.load(
            self.settings.model_repo, self.settings.default_model, check_engines=False
        )
        for name in self.served:
            entry = repo.get(name)
            version = entry.latest
            assert version is not None, f"{name} has no version"  # the server checked before start
            engine = OnnxEngine(version.engine_path, self.settings.backend, self.settings.intra_op_threads)
            self.models[name] = LoadedModel(entry, version, engine)
            metrics.MODEL_INFO.labels(name, version.version, version.metadata.weights, engine.backend).set(1)
            log.info(
                "loaded %s version %s on %s (weights: %s)",
                name,
                version.version,
                engine.backend,
                version.metadata.weights,
            )

    def decode_request(self, request: Annotated[ScoringRequest, Depends(read_upload)]) -> ScoringRequest:
        return request

    def encode_response(self, output: Any) -> PredictResponse:
        # Not called by TriageLoop (outcomes are built in score_batch); its return annotation
        # is what LitServe uses as the route's response model, so /openapi.json documents
        # and FastAPI validates the API.md response shape.
        return PredictResponse.model_validate(output)

    def predict(self, x: Any) -> Any:  # LitAPI requires it; TriageLoop calls score_batch instead
        return self.score_batch(x)

    def score_batch(self, items: Sequence[ScoringRequest]) -> list[Outcome]:
        """Score a batch: one engine call per model; a failing input fails alone.

        Returns one outcome per item, in order: the API.md response dict, or the CxrError
        that item gets.
        """
        started = time.monotonic()
        groups: dict[str, list[int]] = defaultdict(list)
        for i, item in enumerate(items):
            groups[item.model].append(i)
        outcomes: dict[int, Outcome] = {}
        for name, idx in groups.items():
            outcomes.update(zip(idx, self._score_group(name, [items[i] for i in idx], started), strict=True))
        return [outcomes[i] for i in range(len(items))]

    def _score_group(self, name: str, items: list[ScoringRequest], started: float) -> list[Outcome]:
        model = self.models[name]
        try:
            probs, infer_s = self._run(model, items)
        except Exception:
            if len(items) == 1:
                log.exception("engine failed on request %s", items[0].request_id)
                return [CxrError("the engine failed on this image; it is logged with the request id")]
            return [o for item in items for o in self._score_group(name, [item], started)]
        return [
            self._result(model, item, p, infer_s, len(items), started)
            for item, p in zip(items, probs, strict=True)
        ]

    def _run(self, model: LoadedModel, items: list[ScoringRequest]) -> tuple[Any, float]:
        tensor = to_batch([it.input.pixels for it in items], model.entry.config.input)
        t0 = time.perf_counter()
        probs = model.engine.run(tensor)
        elapsed = time.perf_counter() - t0
        ref = model.ref
        metrics.BATCH_SIZE.labels(ref["name"]).observe(len(items))
        metrics.INFERENCE_SECONDS.labels(ref["name"], ref["version"], ref["backend"]).observe(elapsed)
        return probs, elapsed

    def _result(
        self, model: LoadedModel, item: ScoringRequest, probs: Any, infer_s: float, batch: int, started: float
    ) -> dict[str, Any]:
        config = model.entry.config
        findings = score_findings(config.labels, probs, config.thresholds)
        queue_s = max(0.0, started - item.accepted_at)
        metrics.QUEUE_WAIT_SECONDS.labels(item.priority).observe(queue_s)
        warnings = list(item.input.warnings)
        if model.ref["weights"] == "untrained":
            warnings.insert(0, UNTRAINED_WARNING)
        return {
            "request_id": item.request_id,
            "model": dict(model.ref),
            "findings": [
                {
                    "label": f.label,
                    "probability": f.probability,
                    "threshold": f.threshold,
                    "positive": f.positive,
                }
                for f in findings
            ],
            "abnormality_score": abnormality_score(findings),
            "triage": triage_class(findings, config.critical_findings),
            "priority": item.priority,
            "warnings": warnings,
            "timing_ms": {
                "queue": round(queue_s * 1000.0, 3),
                "preprocess": round(item.preprocess_ms, 3),
                "inference": round(infer_s * 1000.0, 3),
            },
            "batch_size": batch,
        }
