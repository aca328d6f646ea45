"""The one place that turns errors into HTTP responses (API.md: ``{"error": {code, message}}``)."""

import logging

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
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


def to_http_exception(err: CxrError) -> HTTPException:
    """For the inference worker: LitServe carries an HTTPException back to the HTTP process."""
    headers = {"Retry-After": "1"} if err.status in (429, 503) else None
    return HTTPException(status_code=err.status, detail=err.to_dict(), headers=headers)


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    metrics.ERRORS.labels(code).inc()
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Make every error, ours or the framework's, answer in the API.md shape."""

    @app.exception_handler(CxrError)
    async def _cxr(_: Request, exc: CxrError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
        return error_response(exc.status, exc.code, exc.message, headers)

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

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        return error_response(400, "bad_request", "; ".join(parts) or "malformed request")
