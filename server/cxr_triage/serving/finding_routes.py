"""Findings added at run time to zero-shot (gzsl) models: ``/v1/models/{name}/findings``.

Adding a finding encodes its name (and description) with the text tower of every version that
scores the model's jobs (the default and any canary), in this HTTP process, and stores the
latents in Redis (queue.findings); every worker of every replica scores it from its next batch
on, marked ``"unseen": true`` and without an operating point until one is set from labelled data
(``cxr-triage gzsl operating-point``, which PUTs what it measured).
"""

import asyncio
from pathlib import Path
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, Field

from cxr_triage.engines.gzsl import GzslEngine, label_text
from cxr_triage.errors import BadRequest, FindingExists, FindingNotFound, NotZeroShot
from cxr_triage.queue.findings import AddedFinding, FindingStore
from cxr_triage.repository import ModelEntry
from cxr_triage.schemas import ErrorResponse
from cxr_triage.serving.intake import Intake
from cxr_triage.serving.reload import traffic_split

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 _(),.'+-]*$"  # no '/': the label is a path segment
_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 404, 409, 503)}


class FindingIn(BaseModel):
    name: str = Field(
        ..., min_length=1, max_length=64, pattern=NAME_PATTERN, description="e.g. 'Pneumoperitoneum'"
    )
    description: str | None = Field(
        None, max_length=300, description="optional words the text encoder reads after the name"
    )


class OperatingPointIn(BaseModel):
    """An operating point measured on labelled data (``cxr-triage gzsl operating-point``)."""

    version: str = Field(..., pattern=r"^[0-9]+$", description="the version it was measured with")
    threshold: float | None = Field(
        ..., gt=0, lt=1, description="score at or above which the finding is called; null: clear it"
    )
    chosen_on: str = Field(..., min_length=1, max_length=200, description="which labelled data")
    target_sensitivity: float = Field(..., gt=0, le=1)
    sensitivity: float = Field(..., ge=0, le=1)
    specificity: float = Field(..., ge=0, le=1)
    positives: int = Field(..., ge=1, description="labelled images with the finding")
    negatives: int = Field(..., ge=1, description="labelled images without it")


class TextTowers:
    """Text towers of gzsl versions, loaded on first use in this HTTP process (a few hundred ms)."""

    def __init__(self, intake: Intake) -> None:
        self.intake = intake
        self._loaded: dict[Path, GzslEngine] = {}
        self._lock = asyncio.Lock()

    async def encode(self, path: Path, name: str, description: str | None) -> tuple[float, ...]:
        async with self._lock:
            if path not in self._loaded:
                s = self.intake.settings
                self._loaded[path] = await asyncio.to_thread(
                    GzslEngine, path, s.backend, s.intra_op_threads, True, False
                )
            engine = self._loaded[path]
        (latent,) = await asyncio.to_thread(engine.encode_text, [name], [description])
        return tuple(float(x) for x in latent)


def build_finding_router(intake: Intake, store: FindingStore) -> APIRouter:
    router = APIRouter(prefix="/v1/models")
    towers = TextTowers(intake)

    def zero_shot(name: str) -> tuple[ModelEntry, list[str]]:
        entry = intake.repository.get(name)
        if entry.config.type != "gzsl":
            raise NotZeroShot(
                f"model {name!r} is a classifier ({len(entry.config.labels)} trained outputs); findings "
                "can be added to zero-shot (type: gzsl) models only, see GET /v1/models"
            )
        intake.resolve_model(name)  # served, else 503
        versions = list(traffic_split(entry, intake.pinned.get(name)))
        return entry, versions

    @router.get("/{name}/findings", responses=_ERRORS, summary="Findings added at run time (zero-shot)")
    async def listed(name: str) -> dict[str, Any]:
        entry, versions = zero_shot(name)
        return {
            "model": entry.name,
            "trained_labels": list(entry.config.labels),
            "findings": [f.public(v) for v in versions for f in store.list(entry.name, v)],
        }

    @router.post(
        "/{name}/findings",
        status_code=201,
        responses=_ERRORS,
        summary="Add a finding by name to a zero-shot model; scored from the next batch on",
    )
    async def add(name: str, body: FindingIn) -> dict[str, Any]:
        entry, versions = zero_shot(name)
        label = " ".join(body.name.split())
        description = body.description.strip() if body.description and body.description.strip() else None
        words = label_text(label)
        clash = [x for x in entry.config.labels if label_text(x) == words]
        if clash:
            raise FindingExists(
                f"{label!r} is the trained label {clash[0]!r} of {entry.name}; it is scored already"
            )
        latents = {}
        for v in versions:
            latent = await towers.encode(entry.versions[v].path, label, description)
            latents[v] = AddedFinding(label, description, label_text(label, description), latent)
        others = {f.label for v in versions for f in store.list(entry.name, v)}
        same = [x for x in others if label_text(x) == words]
        if same or not store.add(entry.name, latents):
            raise FindingExists(
                f"{entry.name} already has a finding {(same or [label])[0]!r}; DELETE it first to change it"
            )
        return {
            "model": entry.name,
            "label": label,
            "description": description,
            "unseen": True,
            "threshold": None,
            "versions": versions,
            "message": "scored in every later result of this model, without an operating point "
            "until one is set from labelled data",
        }

    @router.delete("/{name}/findings/{label}", responses=_ERRORS, summary="Remove an added finding")
    async def remove(name: str, label: str) -> dict[str, Any]:
        entry, versions = zero_shot(name)
        if label in entry.config.labels:
            raise BadRequest(
                f"{label!r} is a trained label of {entry.name}; only added findings can be removed"
            )
        if not store.remove(entry.name, versions, label):
            raise FindingNotFound(
                f"{entry.name} has no added finding {label!r}; GET its findings to list them"
            )
        return {"model": entry.name, "removed": label, "versions": versions}

    @router.put(
        "/{name}/findings/{label}/operating-point",
        responses=_ERRORS,
        summary="Set an added finding's operating point, measured on labelled data",
    )
    async def operating_point(name: str, label: str, body: OperatingPointIn) -> dict[str, Any]:
        entry, versions = zero_shot(name)
        if body.version not in versions:
            raise BadRequest(
                f"version {body.version} of {entry.name} does not serve (serving: {versions}); "
                "measure the operating point with a serving version"
            )
        evidence = body.model_dump(exclude={"threshold", "version"})
        found = store.set_operating_point(entry.name, body.version, label, body.threshold, evidence)
        if found is None:
            raise FindingNotFound(f"{entry.name} version {body.version} has no added finding {label!r}")
        return found.public(body.version)

    return router
