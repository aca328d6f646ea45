"""OpenTelemetry traces: one study (one job) is one trace across processes.

The HTTP process opens the trace (ingest → decode, enqueue) and stores its W3C
``traceparent`` in the Redis job; the inference worker continues it (queue wait, inference,
postprocess), and the PACS worker adds the SR store. Exported over OTLP/HTTP only when
``OTEL_EXPORTER_OTLP_ENDPOINT`` is set (standard OTEL_* variables); otherwise the API's no-op
tracer costs next to nothing.
"""

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from opentelemetry import propagate, trace
from opentelemetry.context import Context

from cxr_triage.config import Settings

TRACER_NAME = "cxr_triage"


def setup_tracing(settings: Settings, role: str) -> None:
    """Install an OTLP-exporting provider in this process when an endpoint is configured."""
    if not settings.otel_exporter_otlp_endpoint:
        return
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": settings.otel_service_name, "cxr_triage.role": role})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))  # reads OTEL_EXPORTER_OTLP_*
    trace.set_tracer_provider(provider)


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def carrier() -> dict[str, str]:
    """The current trace context as W3C headers, to store with a job."""
    out: dict[str, str] = {}
    propagate.inject(out)
    return out


def context_of(fields: Mapping[str, str]) -> Context:
    """The trace context a job was stored with (an empty context if none)."""
    return propagate.extract({k: v for k, v in fields.items() if k in ("traceparent", "tracestate")})


@contextmanager
def span(name: str, parent: Context | None = None, **attributes: str | int | float) -> Iterator[trace.Span]:
    with tracer().start_as_current_span(name, context=parent, attributes=attributes) as current:
        yield current


def record_span(
    name: str, parent: Context, start_s: float, end_s: float, **attributes: str | int | float
) -> None:
    """A span for an interval measured elsewhere (e.g. queue wait), times in epoch seconds."""
    s = tracer().start_span(name, context=parent, start_time=int(start_s * 1e9), attributes=attributes)
    s.end(end_time=int(end_s * 1e9))
