"""STOW-RS receiver (PS3.18 §10.5): each instance of a multipart/related body becomes a job.

The reply is the standard Store Instances Response Module as DICOM JSON: ReferencedSOPSequence
(0008,1199) for accepted instances, FailedSOPSequence (0008,1198) with a Failure Reason
(0008,1197) — plus an Error Comment (0000,0902) in words — for each rejected one. Status:
200 all stored, 202 some failed, 409 none stored (§10.5.3).
"""

import logging
from collections.abc import Sequence
from io import BytesIO
from typing import Any

import pydicom
import requests
from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from cxr_triage.dicomweb.multipart import Part, related_boundary, split
from cxr_triage.errors import CxrError, NotReady, PayloadTooLarge
from cxr_triage.schemas import DICOM_UID_PATTERN
from cxr_triage.serving.intake import Intake, _read_body, _request_id

log = logging.getLogger(__name__)
DICOM_JSON = "application/dicom+json"
PROJECTION_MODALITIES = frozenset({"CR", "DX"})
# Failure Reason values, PS3.4 Annex GG / PS3.18 Table 10.5.3-3.
_REASONS = {
    "payload_too_large": 0xA700,  # Refused: Out of Resources
    "image_too_large": 0xA700,
    "not_an_image": 0xC000,  # Error: Cannot Understand
    "corrupt_image": 0xC000,
    "unsupported_transfer_syntax": 0xC122,  # Referenced Transfer Syntax not supported
    "pixel_data_missing": 0x0122,  # Referenced SOP Class not supported
    "wrong_modality": 0x0122,
}
PROCESSING_FAILURE = 0x0110


def build_stow_router(intake: Intake) -> APIRouter:
    """STOW-RS under /dicom-web, and POST /v1/pacs/pull."""
    router = APIRouter()

    @router.post("/dicom-web/studies", summary="STOW-RS: store instances (each becomes a scoring job)")
    async def stow(request: Request) -> Response:
        return await receive(request, intake, None)

    @router.post("/dicom-web/studies/{study_uid}", summary="STOW-RS into one study")
    async def stow_study(request: Request, study_uid: str) -> Response:
        return await receive(request, intake, study_uid)

    @router.post("/v1/pacs/pull", summary="Pull a study from CXR_PACS_URL (WADO-RS)", status_code=202)
    async def pull(body: PullIn) -> dict[str, Any]:
        if not intake.settings.pacs_url:
            raise NotReady("no PACS is configured; set CXR_PACS_URL to its DICOMweb root")
        from cxr_triage.dicomweb.publisher import pacs_client
        from cxr_triage.dicomweb.pull import PacsPuller

        puller = PacsPuller(pacs_client(intake.settings), intake.queue, intake.repository, intake.limits)
        try:
            instances = await run_in_threadpool(puller.pull_study, body.study_uid)
        except requests.RequestException as exc:
            raise NotReady(f"the PACS did not answer the retrieve ({type(exc).__name__})") from exc
        status_url = f"/v1/studies/{body.study_uid}"
        return {"study_uid": body.study_uid, "instances": instances, "status_url": status_url}

    return router


class PullIn(BaseModel):
    study_uid: str = Field(..., pattern=DICOM_UID_PATTERN, max_length=64)


async def receive(request: Request, intake: Intake, study_uid: str | None) -> Response:
    """Accept what can be scored, refuse the rest per instance; never fail the whole request
    for one bad instance."""
    boundary = related_boundary(request.headers.get("content-type", ""))
    parts = split(await _read_body(request, intake.limits.max_bytes), boundary)
    if len(parts) > intake.settings.max_stow_parts:
        limit = intake.settings.max_stow_parts
        raise PayloadTooLarge(f"{len(parts)} instances in one request; the limit is {limit}")
    request_id = _request_id(request)
    name = intake.resolve_model(None)
    stored: list[Dataset] = []
    failed: list[Dataset] = []
    for part in parts:
        try:
            accepted = await _accept_part(intake, part, name, request_id, study_uid)
        except CxrError as exc:
            failed.append(_failed_item(part.data, exc))
            continue
        except Exception as exc:  # boundary: one bad instance fails alone, the others are stored
            log.exception("STOW part failed")
            failed.append(_failed_item(part.data, CxrError(f"processing failed ({type(exc).__name__})")))
            continue
        stored.append(_sop_item(part.data, accepted))
    status = 200 if not failed else (202 if stored else 409)
    return JSONResponse(_response(stored, failed), status_code=status, media_type=DICOM_JSON)


async def _accept_part(intake: Intake, part: Part, name: str, request_id: str, study_uid: str | None) -> Any:
    if part.content_type not in ("application/dicom", ""):
        raise CxrError(f"part of type {part.content_type} is not application/dicom", code="not_an_image")
    if study_uid and str(_header(part.data).get("StudyInstanceUID", "")) != study_uid:
        raise CxrError(f"instance does not belong to study {study_uid}", code="wrong_study")
    return await intake.accept_bytes(
        part.data, "application/dicom", name, None, True, ("", ""), request_id, PROJECTION_MODALITIES
    )


def _header(data: bytes) -> Dataset:
    try:
        return pydicom.dcmread(BytesIO(data), stop_before_pixels=True, force=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, AttributeError):
        return Dataset()


def _sop_item(data: bytes, accepted: Any) -> Dataset:
    header = _header(data)
    item = Dataset()
    item.ReferencedSOPClassUID = header.get("SOPClassUID", "")
    item.ReferencedSOPInstanceUID = accepted.instance_uid
    return item


def _failed_item(data: bytes, exc: CxrError) -> Dataset:
    header = _header(data)
    item = Dataset()
    item.ReferencedSOPClassUID = header.get("SOPClassUID", "")
    item.ReferencedSOPInstanceUID = header.get("SOPInstanceUID", "")
    item.FailureReason = _REASONS.get(exc.code, PROCESSING_FAILURE)
    item.add_new(0x00000902, "LO", f"{exc.code}: {exc.message}"[:64])  # Error Comment
    return item


def _response(stored: Sequence[Dataset], failed: Sequence[Dataset]) -> dict[str, Any]:
    ds = Dataset()
    if stored:
        ds.ReferencedSOPSequence = list(stored)
    if failed:
        ds.FailedSOPSequence = list(failed)
    return ds.to_json_dict()
