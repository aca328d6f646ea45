"""One study is one trace: ingest (decode, enqueue) in the HTTP process, then queue wait,
inference and postprocess in the worker, joined through the traceparent stored in Redis."""

import asyncio
from pathlib import Path

import pytest
import redis
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from cxr_triage.config import Settings
from cxr_triage.queue import JobQueue
from cxr_triage.repository import BatchingSpec, ModelRepository
from cxr_triage.serving.api import TriageAPI
from cxr_triage.serving.intake import Intake
from tests.helpers import chest_u8, png_bytes

EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def in_memory_tracing() -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    trace.set_tracer_provider(provider)


def test_a_study_is_one_trace_across_http_and_worker(exported_repo: Path, embedded_redis: str) -> None:
    redis.Redis.from_url(embedded_redis).flushall()
    settings = Settings(model_repo=exported_repo, redis_url=embedded_redis, decode_workers=1, routine_nice=0)
    repo = ModelRepository.load(exported_repo)
    queue = JobQueue(redis.Redis.from_url(embedded_redis), settings.max_wait_s)
    intake = Intake(settings, repo, ["densenet121-nih14"], queue)
    EXPORTER.clear()
    uids = ("1.2.826.0.1.31", "1.2.826.0.1.31.1")
    accept = intake.accept_bytes(
        png_bytes(chest_u8(64)), "image/png", "densenet121-nih14", None, True, uids, "r"
    )
    asyncio.run(accept)
    api = TriageAPI(settings, {"densenet121-nih14": "1"}, BatchingSpec())
    api.setup("cpu")
    assert len(api.run_batch()) == 1

    spans = {s.name: s for s in EXPORTER.get_finished_spans()}
    assert {"ingest", "decode", "enqueue", "queue wait", "inference", "postprocess"} <= set(spans)
    root = spans["ingest"]
    assert {s.context.trace_id for s in spans.values()} == {root.context.trace_id}
    for child in ("decode", "enqueue", "queue wait", "inference", "postprocess"):
        assert spans[child].parent is not None
    assert spans["decode"].parent.span_id == root.context.span_id
    worker_parent = spans["enqueue"].context.span_id  # the context stored with the job
    assert all(spans[n].parent.span_id == worker_parent for n in ("queue wait", "inference", "postprocess"))
    assert spans["inference"].attributes["batch"] == 1
    assert spans["queue wait"].end_time >= spans["queue wait"].start_time
