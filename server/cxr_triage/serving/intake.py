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
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from io import BytesIO
from multiprocessing import get_context

import pydicom
from fastapi import Query, Request
from pydicom.uid import generate_uid
from starlette.datastructures import UploadFile

from cxr_triage import imaging
from cxr_triage.config import Settings
from cxr_triage.errors import BadRequest, CorruptImage, NotReady, PayloadTooLarge, WrongModality
from cxr_triage.imaging import ImageLimits, ModelInput
from cxr_triage.observability import metrics, tracing
from cxr_triage.observability.logging import REQUEST_ID, request_id_for
from cxr_triage.queue import JobQueue, NewJob
from cxr_triage.repository import ModelRepository
from cxr_triage.schemas import DICOM_UID_PATTERN, Priority
from cxr_triage.serving.lifecycle import start_decoder
from cxr_triage.serving.reload import ServingWatch, default_version, read_serving

log = logging.getLogger(__name__)


def _start_decoding_process() -> None:
    """The decoding pool's initializer: the process's role (``start_decoder``), then its
    JPEG 2000 decoders loaded, so that no study pays for their first use."""
    start_decoder()
    imaging.warm_decoders()


@dataclass(frozen=True)
class Accepted:
    """An upload decoded and queued."""

    job_id: str
    duplicate: bool
    request_id: str
    model: str
    priority: Priority
    study_uid: str
    instance_uid: str


class Intake:
    """Per-HTTP-process state: settings, the repository's configs and the decoding pool."""

    def __init__(
        self, settings: Settings, repository: ModelRepository, served: list[str], queue: JobQueue
    ) -> None:
        self.settings = settings
        self.repository = repository
        self.served = served
        # name -> version serving at start-up: it keeps serving while there is no serving.json.
        self.pinned = {n: v.version for n in served if (v := repository.get(n).served) is not None}
        self.queue = queue
        self.limits = ImageLimits(
            max_bytes=settings.max_upload_bytes,
            max_pixels=settings.max_pixels,
            decode_threads=settings.resolved_decode_threads(),
        )
        self._pool: ProcessPoolExecutor | None = None
        self._pool_pid: int | None = None
        self._answer: asyncio.Future[object] | None = None  # warm()'s call in flight
        # seen=False: the first poll re-reads, covering a promotion since ``repository`` was read.
        self._watch = ServingWatch(settings.model_repo, served, settings.reload_poll_s, seen=False)

    async def follow_serving(self) -> None:
        """Refresh the view every CXR_RELOAD_POLL_S for the life of the HTTP process (a task),
        so that it goes through the serving states the workers go through: refreshing only when
        asked could skip a good state that a broken serving.json then replaced, and keep
        showing an older one than the workers serve."""
        while self.settings.reload_poll_s > 0:
            await asyncio.sleep(self.settings.reload_poll_s)
            try:
                await self.refresh()
            except Exception:  # the poller must outlive any one bad look at the folder
                log.exception("could not look at the model repository; trying again")

    async def refresh(self) -> None:
        """Re-read the repository when a served model's serving.json changed (polled at most
        every CXR_RELOAD_POLL_S), so that what the service says it serves follows promotions.

        A repository that does not read, or names an engine that does not load, keeps the last
        good view (the inference workers keep the old version then too); logged once per change.
        """
        changed = self._watch.changed()
        if not changed:
            return
        s = self.settings
        try:  # in a thread: checking the served engines reads their ONNX files
            self.repository = await asyncio.to_thread(
                read_serving, s.model_repo, s.default_model, self.pinned
            )
        except Exception as exc:  # whatever the problem, /v1/models and /ready keep working
            names = ", ".join(changed)
            log.error(
                "serving.json of %s changed but cannot be served; keeping the previous view: %s", names, exc
            )

    def default_versions(self) -> dict[str, str]:
        """Served model -> its default (promoted) version, as the repository view says."""
        versions = {n: default_version(self.repository.get(n), self.pinned.get(n)) for n in self.served}
        return {name: v.version for name, v in versions.items() if v is not None}

    def pool(self) -> ProcessPoolExecutor:
        # Created lazily in the process that uses it: LitServe forks the HTTP server after start-up.
        if self._pool is None or self._pool_pid != os.getpid():
            self._pool = ProcessPoolExecutor(
                self.settings.resolved_decode_workers(),
                mp_context=get_context("spawn"),
                initializer=_start_decoding_process,
            )
            self._pool_pid = os.getpid()
        return self._pool

    def close(self) -> None:
        """Stop this process's decoding processes (the HTTP server's end): their queues' named
        semaphores are released with them, and nothing is left for multiprocessing's resource
        tracker to clean up (and warn about) at exit."""
        if self._pool is not None and self._pool_pid == os.getpid():
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._pool = None

    async def warm(self) -> None:
        """Have a decoding process answer: the first call starts one (spawn, imports and the J2K
        decoders' warm-up take ~1 s) before traffic arrives. One, not CXR_DECODE_WORKERS: with
        one HTTP process per inference worker, a many-core machine would start cores x cores of
        them. The pool starts more when uploads are decoded side by side. Callers at the same
        time (the start-up warm-up and a /ready probe) share one call: two tasks on a pool
        still starting would start a second process."""
        pool = self.pool()
        if self._answer is None or self._answer.done():
            self._answer = asyncio.get_running_loop().run_in_executor(pool, imaging.sniff, b"")
        await asyncio.shield(self._answer)  # a caller cancelled (shutdown) leaves the others' wait

    async def prepare(
        self, data: bytes, media_type: str, model: str, max_ready: int | None = None
    ) -> ModelInput:
        """Decode a small PNG or JPEG here (CXR_INLINE_DECODE_PIXELS: handing it to the pool
        costs more CPU than decoding it), anything else in the pool, beside inference. A pool
        broken by another upload's crash is rebuilt and this one retried once; crashing a fresh
        pool too means this image is what kills the decoder. ``max_ready``: refuse (Overloaded)
        before a pooled decode when that many jobs are ready; the submit checks it again."""
        spec = self.repository.get(model).config.input
        if imaging.small_raster(data, self.settings.inline_decode_pixels):
            return imaging.prepare(data, media_type, spec, self.limits)
        self.queue.check_room(max_ready)
        loop = asyncio.get_running_loop()
        for attempt in range(2):
            pool = self.pool()
            try:
                return await loop.run_in_executor(pool, imaging.prepare, data, media_type, spec, self.limits)
            except BrokenProcessPool as exc:
                log.error("a decoding process died; restarting the pool")
                if self._pool is pool:
                    self._pool = None
                if attempt:
                    raise CorruptImage("decoding this image crashed the decoder; check the file") from exc
        raise AssertionError("unreachable")

    def resolve_model(self, name: str | None) -> str:
        entry = self.repository.get(name)
        if entry.name not in self.served:
            raise NotReady(
                f"model {entry.name!r} has no exported version loaded; run `cxr-triage export {entry.name}`"
            )
        return entry.name

    async def accept(
        self,
        request: Request,
        model: str | None,
        priority: Priority | None,
        track: bool,
        uids: tuple[str, str] = ("", ""),
        reply_to: str = "",
    ) -> Accepted:
        """Read, decode and queue one upload. ``track``: an asynchronous study for the worklist;
        ``reply_to``: the waiting request's channel for the outcome (``Replies.channel``).

        Raises:
            BadRequest, PayloadTooLarge, UnsupportedMediaType, ModelNotFound, Overloaded (429,
            synchronous only: accepted studies are never refused for load) and the image errors.
        """
        request_id = _request_id(request)
        name = self.resolve_model(model)
        data, media_type = await _read_image(request, self.limits.max_bytes)
        return await self.accept_bytes(
            data, media_type, name, priority, track, uids, request_id, reply_to=reply_to
        )

    async def accept_bytes(
        self,
        data: bytes,
        media_type: str,
        name: str,
        priority: Priority | None,
        track: bool,
        uids: tuple[str, str],
        request_id: str,
        modalities: frozenset[str] | None = None,
        reply_to: str = "",
    ) -> Accepted:
        """Decode and queue one image already read; ``modalities`` restricts DICOM Modality.
        A synchronous request is refused (Overloaded) while CXR_MAX_QUEUE jobs are ready."""
        max_ready = None if track else self.settings.max_queue
        with tracing.span("ingest", model=name, track=int(track)) as ingest:
            start = time.perf_counter()
            with tracing.span("decode"):
                prepared = await self.prepare(data, media_type, name, max_ready)
            metrics.PREPROCESS_SECONDS.labels(prepared.source).observe(time.perf_counter() - start)
            ingest.set_attribute("format", prepared.source)
            job = make_job(data, prepared, name, priority, track, uids, request_id, modalities)
            with tracing.span("enqueue", priority=job.priority):
                submitted = self.queue.submit(
                    job, trace=tracing.carrier(), max_ready=max_ready, reply_to=reply_to
                )
        ids = (job.study_uid, job.instance_uid)
        return Accepted(submitted.job_id, submitted.duplicate, request_id, name, job.priority, *ids)


def make_job(
    data: bytes,
    prepared: ModelInput,
    name: str,
    priority: Priority | None,
    track: bool,
    uids: tuple[str, str],
    request_id: str,
    modalities: frozenset[str] | None = None,
) -> NewJob:
    """The queue job for a decoded upload: priority (request > DICOM tag > routine), UIDs, header.

    Raises:
        WrongModality: ``modalities`` given and the DICOM Modality is not among them.
        BadRequest: a caller-given UID is not a DICOM UID.
    """
    modality = prepared.dicom.get("Modality", "")
    if modalities is not None and modality not in modalities:
        raise WrongModality(f"modality {modality or 'unknown'} is not scored; send {sorted(modalities)}")
    study_uid, instance_uid = _uids(prepared, uids) if track else ("", "")
    return NewJob(
        model=name,
        priority=priority or dicom_priority(prepared.dicom) or "routine",
        input=prepared,
        request_id=request_id,
        study_uid=study_uid,
        instance_uid=instance_uid,
        track=track,
        header=source_header(data) if track and prepared.source == "dicom" else b"",
    )


_PRIORITY_QUERY = Query(
    None, description="stat | urgent | routine | backfill; default from DICOM, else routine"
)
_MODEL_QUERY = Query(None, description="model name; the default model when absent")


# DICOM Requested Procedure Priority (0040,1003), PS3.3 C.4.11: STAT, HIGH, ROUTINE, MEDIUM, LOW.
_DICOM_PRIORITY: dict[str, Priority] = {
    "STAT": "stat",
    "HIGH": "urgent",
    "ROUTINE": "routine",
    "MEDIUM": "routine",
    "LOW": "backfill",
}
_UID = re.compile(DICOM_UID_PATTERN)


def source_header(data: bytes) -> bytes:
    """The DICOM file without its pixel data: what an SR about it needs (patient, study, UIDs)."""
    ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def dicom_priority(tags: dict[str, str]) -> Priority | None:
    return _DICOM_PRIORITY.get(tags.get("RequestedProcedurePriority", "").strip().upper())


def _uids(prepared: ModelInput, given: tuple[str, str]) -> tuple[str, str]:
    """Study and instance UIDs: the DICOM file's own, else the caller's, else new ones."""
    study = prepared.dicom.get("StudyInstanceUID") or given[0]
    instance = prepared.dicom.get("SOPInstanceUID") or given[1]
    for name, uid in (("study_uid", study), ("instance_uid", instance)):
        if uid and (len(uid) > 64 or not _UID.match(uid)):
            raise BadRequest(f"{name} {uid!r} is not a DICOM UID (digits and dots, at most 64 characters)")
    return study or generate_uid(), instance or generate_uid()


def _request_id(request: Request) -> str:
    """The id the request middleware chose (the caller's X-Request-ID when well formed)."""
    return REQUEST_ID.get() or request_id_for(request.headers.get("x-request-id", ""))


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
