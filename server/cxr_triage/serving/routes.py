"""Routes: synchronous scoring, probes, models, metrics. Thin: logic lives below."""

import time
from collections.abc import Callable
from contextlib import suppress
from typing import Any

import redis
from fastapi import APIRouter, FastAPI, Request, Response
from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cxr_triage.engines.onnx import backend_name, choose_providers
from cxr_triage.errors import NotReady
from cxr_triage.feedback.clinical import clinical_window
from cxr_triage.observability import metrics
from cxr_triage.observability.logging import REQUEST_ID, request_id_for
from cxr_triage.queue.findings import FindingStore
from cxr_triage.queue.studies import StudyStore
from cxr_triage.repository import VersionEntry
from cxr_triage.schemas import ErrorResponse, ModelOut, ModelsResponse, PredictResponse, Priority, VersionOut
from cxr_triage.serving.intake import _MODEL_QUERY, _PRIORITY_QUERY, Intake
from cxr_triage.serving.reload import Role, traffic_split
from cxr_triage.serving.replies import Replies

ReadyCheck = Callable[[], str | None]


def build_router(
    intake: Intake, studies: StudyStore, workers_problem: ReadyCheck, draining: Callable[[], bool]
) -> APIRouter:
    """``draining``: True once SIGTERM started this replica's drain (see serving.lifecycle)."""
    router = APIRouter()

    @router.get("/health", summary="200 while the process lives")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @router.get(
        "/ready",
        summary="200 when every served model is loaded; 503 with the reason otherwise",
        responses={503: {"model": ErrorResponse}},
    )
    async def ready() -> dict[str, object]:
        if draining():
            raise NotReady("draining: this replica is shutting down; other replicas take its work")
        problem = workers_problem() or _queue_problem(intake)
        if problem:
            raise NotReady(problem)
        await intake.warm()  # a decoding process answers
        await intake.refresh()
        return {"status": "ready", "models": intake.served, "versions": intake.default_versions()}

    @router.get("/v1/models", response_model=ModelsResponse, summary="served models, versions and labels")
    async def models() -> ModelsResponse:
        await intake.refresh()
        return list_models(intake)

    @router.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def prometheus() -> Response:
        metrics.DRAINING.set(1 if draining() else 0)
        with suppress(redis.RedisError):
            for priority, n in intake.queue.depth_by_priority().items():
                metrics.QUEUE_DEPTH.labels(priority).set(n)
            size, oldest = studies.worklist_gauges()
            metrics.WORKLIST_SIZE.set(size)
            metrics.OLDEST_ABNORMAL.set(oldest)
            _clinical(studies, intake.settings.clinical_window)
        body, content_type = metrics.render(intake.settings.replica)
        return Response(body, media_type=content_type)

    return router


_BINARY = {"schema": {"type": "string", "format": "binary"}}
_ERROR = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
_PREDICT_ERRORS = {
    "400": "malformed request (empty body, no `file` part, bad query value)",
    "404": "unknown model",
    "413": "body or decoded image too large",
    "415": "unsupported Content-Type",
    "422": "image that cannot be scored (not an image, corrupt, multi-frame, photometric…)",
    "429": "too many jobs queued: retry after Retry-After seconds",
    "503": "not ready",
    "504": "timed out in the queue",
}


_PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "image/png": _BINARY,
            "image/jpeg": _BINARY,
            "application/dicom": _BINARY,
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
        },
    }
}


def build_predict_router(intake: Intake, replies: Replies) -> APIRouter:
    """``POST /v1/predict``: the upload is decoded and queued like any study's image, and the
    request waits on Redis for the outcome, whichever worker scores it (serving.replies)."""
    router = APIRouter()

    @router.post(
        "/v1/predict",
        response_model=PredictResponse,
        summary="Score one radiograph synchronously",
        openapi_extra=_PREDICT_BODY,
        responses={code: {"description": text, **_ERROR} for code, text in _PREDICT_ERRORS.items()},
    )
    async def predict(
        request: Request, model: str | None = _MODEL_QUERY, priority: Priority | None = _PRIORITY_QUERY
    ) -> dict[str, object]:
        accepted = await intake.accept(request, model, priority, track=False, reply_to=replies.channel())
        # Nothing awaited since the job was queued: only a duplicate may be done already.
        timeout = intake.settings.request_timeout_s
        return await replies.wait(accepted.job_id, timeout, look_first=accepted.duplicate)

    return router


def _clinical(studies: StudyStore, n: int) -> None:
    """Per-finding sensitivity and PPV over the last ``n`` reported studies (set at scrape)."""
    window = clinical_window(studies.recent_reported(n))
    metrics.CLINICAL_STUDIES.set(window.studies)
    for label, counts in window.by_label.items():
        if counts.sensitivity is not None:
            metrics.CLINICAL_SENSITIVITY.labels(label).set(counts.sensitivity)
        if counts.ppv is not None:
            metrics.CLINICAL_PPV.labels(label).set(counts.ppv)


def _queue_problem(intake: Intake) -> str | None:
    try:
        intake.queue.r.ping()
    except redis.RedisError as exc:
        return f"the Redis queue does not answer ({type(exc).__name__}); check CXR_REDIS_URL"
    return None


def list_models(intake: Intake) -> ModelsResponse:
    """Every model of the repository as it is now; the served ones say which versions score
    their jobs (the promoted default and any canary) and each one's share of the traffic."""
    backend = backend_name(choose_providers(intake.settings.backend)[0])
    out = []
    for entry in intake.repository.models.values():
        split = traffic_split(entry, intake.pinned.get(entry.name)) if entry.name in intake.served else {}
        versions = [
            _version_out(v, split.get(v.version), backend)
            for v in sorted(entry.versions.values(), key=lambda v: int(v.version))
        ]
        added: list[str] = []
        if entry.config.type == "gzsl" and entry.name in intake.served and split:
            added = [f.label for f in FindingStore(intake.queue.r).list(entry.name, next(iter(split)))]
        out.append(
            ModelOut(
                name=entry.name,
                type=entry.config.type,
                added_findings=added,
                description=entry.config.description,
                default=entry.name == intake.repository.default_model,
                labels=list(entry.config.labels),
                critical_findings=list(entry.config.critical_findings),
                input=entry.config.input.model_dump(),
                versions=versions,
            )
        )
    return ModelsResponse(models=out)


def _version_out(v: VersionEntry, share: tuple[Role, float] | None, backend: str) -> VersionOut:
    return VersionOut(
        version=v.version,
        backend=backend if share else None,
        weights=v.metadata.weights,
        data=v.metadata.data,
        created=v.metadata.created.isoformat(),
        metrics=v.metadata.metrics,
        serving=share is not None,
        role=share[0] if share else None,
        traffic=share[1] if share else None,
    )


def install_request_metrics(app: FastAPI) -> None:
    """Count every request by route template (bounded), method and status; name it (X-Request-ID)."""
    app.add_middleware(RequestMetrics)


class RequestMetrics:
    """Pure ASGI (no BaseHTTPMiddleware: it runs each request's app in a task of its own and
    re-streams the response, a cost on every request): sets REQUEST_ID for the logs, answers
    X-Request-ID, and counts and times the request until its last byte is sent."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = request_id_for(Headers(scope=scope).get("x-request-id", ""))
        status = 500  # an app that raises before answering: ServerErrorMiddleware answers 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        token = REQUEST_ID.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_ID.reset(token)
            route = getattr(scope.get("route"), "path", "other")
            metrics.REQUESTS.labels(route, scope["method"], str(status)).inc()
            metrics.REQUEST_SECONDS.labels(route).observe(time.perf_counter() - start)


def compress_except(app: FastAPI, paths: frozenset[str]) -> None:
    """Keep LitServe's GZip for every path but ``paths``, answered uncompressed: a predict reply
    is ~2 KB of JSON, and compressing it (and the client inflating it) costs both sides more
    CPU than the 1.4 KB it saves on a hospital network. The worklist's longer replies and the
    page's assets are still compressed."""
    for i, entry in enumerate(app.user_middleware):
        if entry.cls is GZipMiddleware:
            app.user_middleware[i] = Middleware(GZipExcept, plain=paths, gzip=dict(entry.kwargs))


class GZipExcept:
    """Starlette's GZipMiddleware (its keyword arguments in ``gzip``), bypassed for the paths
    in ``plain``."""

    def __init__(self, app: ASGIApp, plain: frozenset[str], gzip: dict[str, Any]) -> None:
        self.app, self.plain = app, plain
        self.gzip = GZipMiddleware(app, **gzip)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] in self.plain:
            await self.app(scope, receive, send)
        else:
            await self.gzip(scope, receive, send)
