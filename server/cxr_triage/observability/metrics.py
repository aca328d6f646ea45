"""Every Prometheus metric of the service, defined once.

Names follow Prometheus conventions (``cxr_triage_`` prefix, units in the name); label values
are bounded (route templates, model names, error codes) and never carry UIDs or PHI.

LitServe runs the HTTP server and inference workers as separate processes, so metrics use
prometheus-client's multiprocess mode when ``PROMETHEUS_MULTIPROC_DIR`` is set (the CLI sets
it via ``Settings.prepare_process_environment`` before this module is imported).
"""

from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.values import ValueClass

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

REQUESTS = Counter(
    "cxr_triage_requests_total", "HTTP requests by route and status", ["route", "method", "status"]
)
REQUEST_SECONDS = Histogram(
    "cxr_triage_request_duration_seconds", "End-to-end HTTP latency", ["route"], buckets=_LATENCY_BUCKETS
)
ERRORS = Counter("cxr_triage_errors_total", "Errors answered, by error code", ["code"])
PREPROCESS_SECONDS = Histogram(
    "cxr_triage_preprocess_seconds",
    "Decode and resize time by input format",
    ["format"],
    buckets=_LATENCY_BUCKETS,
)
QUEUE_WAIT_SECONDS = Histogram(
    "cxr_triage_queue_wait_seconds",
    "Time from accepted to batch start",
    ["priority"],
    buckets=_LATENCY_BUCKETS,
)
BATCH_SIZE = Histogram("cxr_triage_batch_size", "Requests per engine call", ["model"], buckets=_BATCH_BUCKETS)
INFERENCE_SECONDS = Histogram(
    "cxr_triage_inference_seconds",
    "Engine time per batch",
    ["model", "version", "backend"],
    buckets=_LATENCY_BUCKETS,
)
ENGINE_CPU_SECONDS = Counter(
    "cxr_triage_engine_cpu_seconds_total",
    "CPU time the inference workers spent in engine runs (compare with the service's whole CPU use)",
    ["model", "version", "backend"],
)
QUEUE_DEPTH = Gauge(
    "cxr_triage_queue_depth",
    "Jobs waiting in the queue by priority class",
    ["priority"],
    multiprocess_mode="mostrecent",
)
WORKLIST_SIZE = Gauge(
    "cxr_triage_worklist_studies", "Unread studies on the worklist", multiprocess_mode="mostrecent"
)
OLDEST_ABNORMAL = Gauge(
    "cxr_triage_oldest_unread_abnormal_age_seconds",
    "Waiting time of the oldest unread study scored abnormal or critical (0 when none)",
    multiprocess_mode="mostrecent",
)
CLINICAL_SENSITIVITY = Gauge(
    "cxr_triage_clinical_sensitivity_ratio",
    "Share of reported-positive findings the model called positive, recent reports",
    ["label"],
    multiprocess_mode="mostrecent",
)
CLINICAL_PPV = Gauge(
    "cxr_triage_clinical_ppv_ratio",
    "Share of the model's positive calls that the report confirmed, recent reports",
    ["label"],
    multiprocess_mode="mostrecent",
)
CLINICAL_STUDIES = Gauge(
    "cxr_triage_clinical_window_studies",
    "Reported, scored studies in the clinical window",
    multiprocess_mode="mostrecent",
)
JOBS_REDELIVERED = Counter("cxr_triage_jobs_redelivered_total", "Jobs re-delivered after a lease expired")
LANE_PAUSES = Counter(
    "cxr_triage_lane_pauses_total",
    "Times a routine inference worker stopped its engine run for the urgent lane (CXR_LANE_PREEMPTS)",
)
MODEL_INFO = Gauge(
    "cxr_triage_model_info",
    "1 for each model version being served",
    ["model", "version", "weights", "backend"],
    multiprocess_mode="liveall",
)
MODEL_RELOADS = Counter(
    "cxr_triage_model_reloads_total",
    "Hot reloads after a changed serving.json, per inference worker; failed: the old version kept serving",
    ["model", "outcome"],
)


DRAINING = Gauge(
    "cxr_triage_draining",
    "1 while this replica drains after SIGTERM (/ready answers 503, no new jobs leased)",
    multiprocess_mode="max",
)
JOBS_SCORED = Counter(
    "cxr_triage_jobs_scored_total",
    "Jobs whose outcome this replica stored, by model and outcome (done | failed)",
    ["model", "outcome"],
)


class _WithReplica:
    """Every sample of ``source`` with a ``replica`` label: which replica answered the scrape.

    Bounded: one value per replica. Prometheus also adds its target labels (pod, instance);
    this one is what the service calls itself in results and job records as well.
    """

    def __init__(self, source: CollectorRegistry, replica: str) -> None:
        self.source, self.replica = source, replica

    def collect(self) -> Iterator[Metric]:
        for family in self.source.collect():
            out = Metric(family.name, family.documentation, family.type, family.unit)
            out.samples = [s._replace(labels={**s.labels, "replica": self.replica}) for s in family.samples]
            yield out


def is_multiprocess() -> bool:
    return bool(getattr(ValueClass, "__name__", "") == "MmapedValue")


def render(replica: str | None = None) -> tuple[bytes, str]:
    """The exposition text for ``/metrics`` gathered from every process of the service,
    each sample labelled with ``replica`` when given."""
    registry = REGISTRY
    if is_multiprocess():
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    source: Any = registry if replica is None else _WithReplica(registry, replica)
    return generate_latest(source), CONTENT_TYPE_LATEST
