"""The worklist page's routes: the page itself at ``/`` and the image routes it reads (API.md
"Worklist page"). Study data stays behind the API key; only the page shell is open."""

from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, FastAPI, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field
from starlette.routing import BaseRoute

from cxr_triage.dicomweb.publisher import FAILED, OUTBOX, WORKING
from cxr_triage.errors import CxrError, StudyNotFound
from cxr_triage.queue import payload
from cxr_triage.queue.studies import StudyStore
from cxr_triage.schemas import ErrorResponse
from cxr_triage.serving.intake import Intake
from cxr_triage.web.images import describe, heatmap_png, label_index, preview_png
from cxr_triage.web.page import PageMiddleware, load_assets

SrState = Literal["off", "none", "pending", "stored", "failed"]
_PNG = {"content": {"image/png": {}}, "description": "PNG image"}
_ERRORS: dict[int | str, dict[str, Any]] = {404: {"model": ErrorResponse}}
# Images may carry burned-in patient data: never cached on disk, never sniffed as anything else.
_IMAGE_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}


class ImageNotAvailable(CxrError):
    code, status = "image_not_available", 404


class ImageOut(BaseModel):
    job_id: str
    instance_uid: str | None
    status: str = Field(..., description="queued | running | done | failed")
    preview_url: str | None = Field(None, description="PNG of the model input; null when none is kept")
    heatmap_labels: list[str] = Field(
        default_factory=list, description="findings with a heatmap at heatmap_url (label substituted)"
    )
    heatmap_url: str | None = Field(None, description="template with {label}")
    dicom: dict[str, str] = Field(default_factory=dict, description="descriptive DICOM attributes, no PHI")
    warnings: list[str] = Field(default_factory=list)
    error: dict[str, Any] | None = None


class StudyImagesOut(BaseModel):
    study_uid: str
    sr: SrState = Field(
        ...,
        description="DICOM SR back to the PACS: off (no CXR_PACS_URL), none (not DICOM, or nothing "
        "scored), pending, stored, failed (parked after an error; see the server log)",
    )
    images: list[ImageOut]


def build_web_router(intake: Intake, studies: StudyStore) -> APIRouter:
    """Image routes of the page: one study's images, each image's preview and heatmaps."""
    router = APIRouter(prefix="/v1/studies/{study_uid}/images")
    queue = intake.queue

    @router.get("", response_model=StudyImagesOut, responses=_ERRORS,
                summary="A study's images: preview and heatmap links, DICOM attributes")  # fmt: skip
    def images(study_uid: str) -> StudyImagesOut:
        found = _study(studies, study_uid)
        instances = found["instances"]
        headers = queue.headers([i["job_id"] for i in instances])
        kept = [queue.heatmap(i["job_id"]) for i in instances]
        queued = [bool(queue.r.exists(_payload_key(i["job_id"]))) for i in instances]
        out = [
            _image_out(study_uid, i, h, k is not None and k[1] is not None, k is not None or waiting)
            for i, h, k, waiting in zip(instances, headers, kept, queued, strict=True)
        ]
        return StudyImagesOut(study_uid=study_uid, sr=_sr_state(intake, studies, found, headers), images=out)

    @router.get("/{job_id}/preview.png", response_class=Response, responses={200: _PNG, **_ERRORS},
                summary="The image as the model saw it (windowed, MONOCHROME1 inverted), PNG")  # fmt: skip
    def preview(study_uid: str, job_id: str) -> Response:
        _instance(studies, study_uid, job_id)
        image = _model_input(intake, job_id)
        if image is None:
            raise ImageNotAvailable(
                "no image is kept for this instance (scoring failed, or its model keeps none)"
            )
        return Response(preview_png(image), media_type="image/png", headers=_IMAGE_HEADERS)

    @router.get("/{job_id}/heatmaps/{label}.png", response_class=Response, responses={200: _PNG, **_ERRORS},
                summary="A finding's class activation map, RGBA PNG to lay over the preview")  # fmt: skip
    def heatmap(study_uid: str, job_id: str, label: str) -> Response:
        instance = _instance(studies, study_uid, job_id)
        kept = queue.heatmap(job_id)
        index = label_index(instance.get("prediction", {}).get("findings", []), label)
        image, cams = kept if kept is not None else (None, None)
        if image is None or cams is None or index is None:
            raise ImageNotAvailable(
                f"no heatmap of {label!r} for this image (not scored yet, a model without heatmaps, "
                "or no such finding)"
            )
        return Response(heatmap_png(cams[index], image.shape), media_type="image/png", headers=_IMAGE_HEADERS)

    return router


def install_web(app: FastAPI, intake: Intake, studies: StudyStore) -> None:
    """Serve the worklist page at ``/`` (in place of LitServe's "litserve running" route), its
    assets under ``/ui/`` and the image routes. Call after every other middleware is added:
    the page shell must answer before API-key authentication."""
    app.router.routes[:] = [r for r in app.router.routes if not _is_litserve_index(r)]
    app.include_router(build_web_router(intake, studies))
    app.add_middleware(PageMiddleware, assets=load_assets())


def _is_litserve_index(route: BaseRoute) -> bool:
    """LitServe's own ``GET /`` ("litserve running"), registered when the server is built."""
    return isinstance(route, APIRoute) and route.path == "/" and "GET" in (route.methods or set())


def _study(studies: StudyStore, uid: str) -> dict[str, Any]:
    found = studies.study(uid)
    if found is None:
        raise StudyNotFound(f"no study {uid!r} was submitted here")
    return found


def _instance(studies: StudyStore, uid: str, job_id: str) -> dict[str, Any]:
    found = _study(studies, uid)
    for instance in found["instances"]:
        if instance["job_id"] == job_id:
            return dict(instance)
    raise StudyNotFound(f"study {uid!r} has no image {job_id!r}")


def _payload_key(job_id: str) -> str:
    return f"cxr:payload:{job_id}"  # queue.scripts.SUBMIT keeps a queued job's input here


def _model_input(intake: Intake, job_id: str) -> np.ndarray | None:
    """The image as the model saw it: kept with the heatmaps once scored, else the queued input."""
    kept = intake.queue.heatmap(job_id)
    if kept is not None:
        return kept[0]
    blob = intake.queue.r.get(_payload_key(job_id))
    return payload.loads(blob).pixels if blob else None


def _image_out(
    study_uid: str, instance: dict[str, Any], header: bytes | None, has_maps: bool, has_preview: bool
) -> ImageOut:
    base = f"/v1/studies/{study_uid}/images/{instance['job_id']}"
    prediction = instance.get("prediction") or {}
    return ImageOut(
        job_id=instance["job_id"],
        instance_uid=instance.get("instance_uid"),
        status=instance["status"],
        preview_url=f"{base}/preview.png" if has_preview else None,
        heatmap_labels=[f["label"] for f in prediction.get("findings", [])] if has_maps else [],
        heatmap_url=f"{base}/heatmaps/{{label}}.png" if has_maps else None,
        dicom=describe(header),
        warnings=list(prediction.get("warnings", [])),
        error=instance.get("error"),
    )


def _sr_state(
    intake: Intake, studies: StudyStore, found: dict[str, Any], headers: list[bytes | None]
) -> SrState:
    """Where the study's DICOM SR stands (dicomweb.publisher moves it through these lists)."""
    s = intake.settings
    if not (s.pacs_url and s.pacs_store_sr):
        return "off"
    if not any(headers) or found["result"] is None:
        return "none"
    uid = found["study_uid"]
    if studies.r.lpos(FAILED, uid) is not None:
        return "failed"
    if found["status"] in ("queued", "running") or any(
        studies.r.lpos(name, uid) is not None for name in (OUTBOX, WORKING)
    ):
        return "pending"
    return "stored"
