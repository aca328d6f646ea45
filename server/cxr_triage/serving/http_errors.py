"""The one place that turns errors into HTTP responses (API.md: ``{"error": {code, message}}``)."""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException

from cxr_triage.errors import CxrError
from cxr_triage.observability import metrics

log = logging.getLogger(__name__)

_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "overloaded",
    503: "not_ready",
    504: "timeout",
}


_RETRY = {"Retry-After": "1"}


def _retry_headers(status: int) -> dict[str, str] | None:
    return _RETRY if status in (429, 503) else None


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    metrics.ERRORS.labels(code).inc()
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Make every error, ours or the framework's, answer in the API.md shape."""

    @app.exception_handler(CxrError)
    async def _cxr(_: Request, exc: CxrError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, _retry_headers(exc.status))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail
        if isinstance(detail, dict) and {"code", "message"} <= detail.keys():
            code, message = str(detail["code"]), str(detail["message"])
        else:
            code = _STATUS_CODES.get(exc.status_code, "internal_error" if exc.status_code >= 500 else "error")
            message = str(detail)
        if exc.status_code >= 500 and code == "internal_error":
            message = "internal error; it is logged with the request id. Please report it."
        return error_response(exc.status_code, code, message, dict(exc.headers or {}) or None)

    @app.exception_handler(RedisError)
    async def _redis(_: Request, exc: RedisError) -> JSONResponse:
        log.error("Redis failed: %s", type(exc).__name__)
        return error_response(503, "not_ready", "the job queue (Redis) is unavailable; retry shortly", _RETRY)

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "internal_error", "internal error; it is logged. Please report it.")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return error_response(400, "bad_request", "; ".join(parts) or "malformed request")
