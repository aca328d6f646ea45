"""Asynchronous studies, the worklist and radiologists' reports (API.md "Studies, worklist and feedback")."""

from typing import Any

from fastapi import APIRouter, Query, Request

from cxr_triage.errors import BadRequest, StudyNotFound
from cxr_triage.queue.findings import FindingStore
from cxr_triage.queue.studies import StudyStore
from cxr_triage.schemas import ErrorResponse, Priority, ReportIn, StudyAccepted
from cxr_triage.serving.intake import _MODEL_QUERY, _PRIORITY_QUERY, Intake
from cxr_triage.serving.reload import traffic_split

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 404, 413, 415, 422, 503)
}


def added_labels(intake: Intake) -> set[str]:
    """Findings added at run time to the served zero-shot models (any serving version)."""
    store = FindingStore(intake.queue.r)
    return {
        f.label
        for name in intake.served
        if (entry := intake.repository.get(name)).config.type == "gzsl"
        for version in traffic_split(entry, intake.pinned.get(name))
        for f in store.list(name, version)
    }


def build_study_router(intake: Intake, studies: StudyStore) -> APIRouter:
    router = APIRouter(prefix="/v1")

    @router.post("/studies", status_code=202, response_model=StudyAccepted, responses=_ERRORS,
                 summary="Queue one image of a study for scoring (asynchronous)")  # fmt: skip
    async def submit(
        request: Request,
        model: str | None = _MODEL_QUERY,
        priority: Priority | None = _PRIORITY_QUERY,
        study_uid: str = Query("", description="for non-DICOM input; DICOM carries its own"),
        instance_uid: str = Query("", description="for non-DICOM input; DICOM carries its own"),
    ) -> StudyAccepted:
        accepted = await intake.accept(request, model, priority, track=True, uids=(study_uid, instance_uid))
        return StudyAccepted(
            job_id=accepted.job_id,
            study_uid=accepted.study_uid,
            instance_uid=accepted.instance_uid,
            status_url=f"/v1/studies/{accepted.study_uid}",
            duplicate=accepted.duplicate,
            priority=accepted.priority,
            request_id=accepted.request_id,
        )

    @router.get("/studies/{study_uid}", responses=_ERRORS, summary="Study status and result")
    async def study(study_uid: str) -> dict[str, Any]:
        found = studies.study(study_uid)
        if found is None:
            raise StudyNotFound(f"no study {study_uid!r} was submitted here")
        return found

    @router.get("/worklist", summary="Unread studies, most urgent first, each with the reason for its place")
    async def worklist(limit: int = Query(50, ge=1, le=1000)) -> dict[str, Any]:
        items = studies.worklist(limit, intake.settings.worklist_max_wait_s)
        return {"studies": items, "max_wait_s": intake.settings.worklist_max_wait_s}

    @router.post(
        "/studies/{study_uid}/report", responses=_ERRORS, summary="Final labels from the radiologist"
    )
    async def report(study_uid: str, body: ReportIn) -> dict[str, Any]:
        if not studies.exists(study_uid):
            raise StudyNotFound(f"no study {study_uid!r} was submitted here")
        known = {label for name in intake.served for label in intake.repository.get(name).config.labels}
        known |= added_labels(intake)
        unknown = sorted(set(body.labels) - known)
        if unknown:
            raise BadRequest(f"unknown labels {unknown}; use the model labels listed by GET /v1/models")
        return studies.report(study_uid, body.labels, body.reader)

    return router
