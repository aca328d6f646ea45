"""The HTTP side of scoring: read the upload, check it, decode it in a process pool.

Decoding a full-resolution radiograph costs tens to hundreds of milliseconds of CPU (J2K far
more than inference), so it runs in worker processes, overlapping with the inference worker,
and a bad image is refused here with its own error before it ever reaches a batch.
"""

import asyncio
import logging
import os
import re
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context

from fastapi import Query, Request
from starlette.datastructures import UploadFile

from cxr_triage import imaging
from cxr_triage.config import Settings
from cxr_triage.errors import BadRequest, CorruptImage, NotReady, PayloadTooLarge
from cxr_triage.imaging import ImageLimits, ModelInput
from cxr_triage.observability import metrics
from cxr_triage.repository import ModelRepository
from cxr_triage.schemas import Priority

log = logging.getLogger(__name__)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


@dataclass
class ScoringRequest:
    """What travels from the HTTP process to the inference worker (pickled by LitServe)."""

    request_id: str
    model: str
    priority: Priority
    input: ModelInput
    accepted_at: float  # time.monotonic(); CLOCK_MONOTONIC is system-wide on Linux
    preprocess_ms: float
    extras: dict[str, str] = field(default_factory=dict)


class Intake:
    """Per-HTTP-process state: settings, the repository's configs and the decoding pool."""

    def __init__(self, settings: Settings, repository: ModelRepository, served: list[str]) -> None:
        self.settings = settings
        self.repository = repository
        self.served = served
        self.limits = ImageLimits(max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels)
        self._pool: ProcessPoolExecutor | None = None
        self._pool_pid: int | None = None

    def pool(self) -> ProcessPoolExecutor:
        # Created lazily in the process that uses it: LitServe forks the HTTP server after start-up.
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ProcessPoolExecutor(
                self.settings.resolved_decode_workers(), mp_context=get_context("spawn")
            )
            self._pool_pid = os.getpid()
        return self._pool

    async def warm(self) -> None:
        """Start every decoding process (spawn + imports take ~1 s) before traffic arrives."""
        loop = asyncio.get_running_loop()
        n = self.settings.resolved_decode_workers()
        await asyncio.gather(*(loop.run_in_executor(self.pool(), imaging.sniff, b"") for _ in range(n)))

    async def prepare(self, data: bytes, media_type: str, model: str) -> ModelInput:
        spec = self.repository.get(model).config.input
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self.pool(), imaging.prepare, data, media_type, spec, self.limits
            )
        except BrokenProcessPool as exc:
            log.error("a decoding process died; restarting the pool")
            self._pool = None
            raise CorruptImage("decoding this image crashed the decoder; check the file") from exc

    def resolve_model(self, name: str | None) -> str:
        entry = self.repository.get(name)
        if entry.name not in self.served:
            raise NotReady(
                f"model {entry.name!r} has no exported version loaded; run `cxr-triage export {entry.name}`"
            )
        return entry.name


async def read_upload(
    request: Request,
    model: str | None = Query(None, description="model name; the default model when absent"),
    priority: Priority = Query("routine", description="stat | urgent | routine | backfill"),
) -> ScoringRequest:
    """FastAPI dependency behind ``POST /v1/predict``: body -> decoded ScoringRequest.

    Accepts the image as the body (image/png, image/jpeg, application/dicom) or as the
    ``file`` part of multipart/form-data.

    Raises:
        BadRequest, PayloadTooLarge, UnsupportedMediaType, ModelNotFound and the image errors.
    """
    intake: Intake = request.app.state.intake
    request_id = _request_id(request)
    name = intake.resolve_model(model)
    data, media_type = await _read_image(request, intake.limits.max_bytes)
    start = time.perf_counter()
    prepared = await intake.prepare(data, media_type, name)
    elapsed = time.perf_counter() - start
    metrics.PREPROCESS_SECONDS.labels(prepared.source).observe(elapsed)
    return ScoringRequest(
        request_id=request_id,
        model=name,
        priority=priority,
        input=prepared,
        accepted_at=time.monotonic(),
        preprocess_ms=elapsed * 1000.0,
    )


def _request_id(request: Request) -> str:
    given = request.headers.get("x-request-id", "")
    return given if _REQUEST_ID.match(given) else uuid.uuid4().hex


async def _read_image(request: Request, limit: int) -> tuple[bytes, str]:
    body = await _read_body(request, limit)
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type != "multipart/form-data":
        if not body:
            raise BadRequest("the request body is empty; send the image as the body or as a `file` form part")
        return body, media_type
    request._body = body  # starlette re-reads a cached body for form parsing
    form = await request.form(max_files=1, max_fields=16)
    part = form.get("file")
    if not isinstance(part, UploadFile):
        raise BadRequest("multipart/form-data needs a `file` part holding the image")
    data = await part.read()
    part_type = (part.content_type or "application/octet-stream").split(";")[0].strip().lower()
    return data, part_type


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(
            f"body is {declared} bytes, above the limit of {limit}; CXR_MAX_UPLOAD_BYTES sets it"
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body is above the limit of {limit} bytes; CXR_MAX_UPLOAD_BYTES sets it")
        chunks.append(chunk)
    return b"".join(chunks)
