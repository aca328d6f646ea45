"""Wire types of the HTTP contract (../shared/API.md), shared by routes and results."""

from typing import Any, Literal

from pydantic import BaseModel, Field

Priority = Literal["stat", "urgent", "routine", "backfill"]
PRIORITIES: tuple[Priority, ...] = ("stat", "urgent", "routine", "backfill")
DICOM_UID_PATTERN = r"^[0-9]+(\.[0-9]+)*$"  # PS3.5 §9.1, at most 64 characters
UNTRAINED_WARNING = "model weights are untrained: scores are meaningless, not for clinical use"
ZERO_SHOT_WARNING = (
    "zero-shot model: a finding's probability is (1 + cosine similarity) / 2, not a calibrated "
    "probability; findings marked unseen were never trained on"
)
SYNTHETIC_WARNING = "model trained on synthetic phantoms, not patients: not for clinical use"


def provenance_warning(weights: str, data: str | None) -> str | None:
    """The warning every result of a version carries when its weights cannot be trusted clinically."""
    if weights == "untrained":
        return UNTRAINED_WARNING
    if data and data.lower().startswith("synthetic"):
        return SYNTHETIC_WARNING
    return None


class ModelRef(BaseModel):
    name: str
    version: str
    backend: str
    weights: Literal["trained", "imported", "untrained"]


class FindingOut(BaseModel):
    label: str
    probability: float = Field(
        ..., ge=0, le=1, description="classifiers: probability; zero-shot (gzsl) models: (1 + cosine) / 2"
    )
    threshold: float | None = Field(
        ..., gt=0, lt=1, description="operating point; null: none set yet, so the finding is not called"
    )
    positive: bool | None = Field(..., description="probability >= threshold; null without a threshold")
    critical: bool = Field(False, description="a positive call on this label makes the study critical")
    unseen: bool = Field(
        False, description="zero-shot: the model was never trained on this finding (gzsl models)"
    )


class PredictResponse(BaseModel):
    request_id: str
    job_id: str
    model: ModelRef
    findings: list[FindingOut] = Field(..., description="every label of the model, in its label order")
    abnormality_score: float = Field(..., ge=0, le=1, description=">= 0.5 iff some finding is positive")
    triage: Literal["critical", "abnormal", "normal"]
    priority: Priority
    warnings: list[str]
    timing_ms: dict[str, float] = Field(..., description="queue, preprocess, inference (milliseconds)")
    batch_size: int = Field(..., ge=1, description="how many requests shared the engine call")
    replica: str | None = Field(None, description="the replica (server instance) that scored the job")


class VersionOut(BaseModel):
    version: str
    backend: str | None = Field(None, description="engine backend when this version is loaded")
    weights: Literal["trained", "imported", "untrained"]
    data: str | None = None
    created: str
    metrics: dict[str, Any] = Field(default_factory=dict)
    serving: bool = Field(..., description="this version scores jobs (as the default or the canary)")
    role: Literal["default", "canary"] | None = Field(
        None,
        description="default: the promoted version (before any promotion, the highest one when the "
        "service started); canary: a candidate scoring a fixed share of jobs; null: not serving",
    )
    traffic: float | None = Field(
        None, ge=0, le=1, description="share of the model's jobs this version scores; null: not serving"
    )


class ModelOut(BaseModel):
    name: str
    type: Literal["classifier", "gzsl"] = Field(
        "classifier", description="gzsl: zero-shot, findings can be added at POST /v1/models/{name}/findings"
    )
    description: str
    default: bool
    labels: list[str] = Field(..., description="trained labels, in output order")
    added_findings: list[str] = Field(
        default_factory=list, description="gzsl: findings added at run time, scored after the labels"
    )
    critical_findings: list[str]
    input: dict[str, Any]
    versions: list[VersionOut]


class ModelsResponse(BaseModel):
    models: list[ModelOut]


class StudyAccepted(BaseModel):
    job_id: str
    study_uid: str
    instance_uid: str
    status_url: str
    duplicate: bool = Field(..., description="this instance was already queued or scored; not scored again")
    priority: Priority
    request_id: str


class ReportIn(BaseModel):
    labels: dict[str, bool] = Field(..., description="final label per finding, e.g. {'Effusion': true}")
    reader: str = Field(..., min_length=1, max_length=128, description="who read the study")


class ErrorDetail(BaseModel):
    code: str = Field(..., description="stable machine-readable code, e.g. unsupported_photometric")
    message: str = Field(..., description="what went wrong and how to fix it")


class ErrorResponse(BaseModel):
    error: ErrorDetail
