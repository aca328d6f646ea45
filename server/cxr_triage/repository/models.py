"""Typed files of the model repository: ``config.yaml`` per model, ``metadata.json`` per version.

Layout (after Triton's model repository)::

    model_repo/<name>/config.yaml          labels in output order, input spec, batching, thresholds
    model_repo/<name>/<version>/model.onnx engine with a dynamic batch axis
    model_repo/<name>/<version>/metadata.json  where the weights came from, data, metrics
"""

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Weights = Literal["trained", "imported", "untrained"]
ModelType = Literal["classifier", "gzsl"]
CONFIG_FILE = "config.yaml"
METADATA_FILE = "metadata.json"
ENGINE_FILES = {"onnx": "model.onnx"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    """What the engine's input tensor is: NCHW float32, ``(x - mean) / std`` on a 0-1 image."""

    size: int = Field(..., ge=16, le=4096, description="square side in pixels")
    channels: Literal[1, 3] = 3
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    resize: Literal["squash", "letterbox"] = Field(
        "letterbox", description="letterbox keeps the aspect ratio and pads with black"
    )

    @model_validator(mode="after")
    def _per_channel(self) -> "InputSpec":
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"input.mean and input.std need {self.channels} values, one per channel")
        if any(s <= 0 for s in self.std):
            raise ValueError("input.std values must be > 0")
        return self


class BatchingSpec(_Strict):
    max_batch_size: int = Field(8, ge=1, le=1024)
    batch_timeout_ms: float = Field(10.0, ge=0, le=1000, description="how long a batch waits to fill")


class PromotionSpec(_Strict):
    """The gate a candidate version passes before it serves: not worse than the current one
    on the same held-out set, beyond these tolerances (AUROC points, 0-1 scale)."""

    tolerance: float = Field(0.01, ge=0.0, le=0.5, description="largest allowed drop of mean AUROC")
    per_label_tolerance: float | None = Field(
        0.05, ge=0.0, le=1.0, description="largest allowed drop of any one label's AUROC; null: not checked"
    )


class ModelConfig(_Strict):
    """``config.yaml`` of one model. ``name`` must equal the folder name."""

    name: str = Field(..., pattern=r"^[a-z0-9][a-z0-9._-]*$")
    type: ModelType = Field(
        "classifier",
        description="classifier: one ONNX engine giving a probability per label; gzsl: CXR-ML-GZSL "
        "(image and text encoders, scores are cosines to label latents, findings can be added at run time)",
    )
    description: str = ""
    architecture: str = Field(..., description="timm model name used by the exporter")
    architecture_kwargs: dict[str, Any] = Field(default_factory=dict)
    label_set: str = Field("nih14", description="which label vocabulary, e.g. nih14 or chexpert")
    labels: tuple[str, ...] = Field(..., min_length=1, description="in the engine's output order")
    input: InputSpec
    batching: BatchingSpec = BatchingSpec()
    thresholds: dict[str, float] = Field(
        default_factory=dict,
        description="per-label operating point, 0-1; every label of a classifier needs one, a gzsl "
        "label without one (an unseen finding) is scored but not called",
    )
    critical_findings: tuple[str, ...] = ()
    heatmap: Literal["none", "cam"] = Field(
        "none", description="cam: the engine also outputs class activation maps (CNNs with a linear head)"
    )
    default: bool = False
    target_sensitivity: float | dict[str, float] = Field(
        0.95,
        description="sensitivity each version's operating point is chosen for on validation data; "
        "one value, or per label (labels not listed get 0.95)",
    )
    promotion: PromotionSpec = PromotionSpec()

    @field_validator("labels")
    @classmethod
    def _unique(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        dupes = sorted({x for x in v if v.count(x) > 1})
        if dupes:
            raise ValueError(f"labels must be unique; repeated: {dupes}")
        return v

    @model_validator(mode="after")
    def _thresholds_and_critical(self) -> "ModelConfig":
        missing = [x for x in self.labels if x not in self.thresholds and self.type == "classifier"]
        unknown = [x for x in self.thresholds if x not in self.labels]
        if missing or unknown:
            raise ValueError(
                f"thresholds must have exactly one entry per label; missing {missing}, unknown {unknown}"
            )
        bad = {k: v for k, v in self.thresholds.items() if not 0.0 < v < 1.0}
        if bad:
            raise ValueError(f"thresholds must lie strictly between 0 and 1; got {bad}")
        targets = self.target_sensitivity
        if isinstance(targets, dict):
            odd = {k: v for k, v in targets.items() if k not in self.labels or not 0.0 < v <= 1.0}
            if odd:
                raise ValueError(f"target_sensitivity: unknown labels or values outside (0, 1]: {odd}")
        elif not 0.0 < targets <= 1.0:
            raise ValueError("target_sensitivity must lie in (0, 1]")
        stray = [x for x in self.critical_findings if x not in self.labels]
        if stray:
            raise ValueError(f"critical_findings must be labels of the model; unknown {stray}")
        if self.type == "gzsl" and self.heatmap != "none":
            raise ValueError("gzsl models give no class activation maps; set heatmap: none")
        return self


class EngineInfo(_Strict):
    format: Literal["onnx"] = "onnx"
    file: str = "model.onnx"
    sha256: str | None = None
    opset: int | None = None
    input_name: str = "input"
    output_name: str = "probabilities"
    heatmap_output: str | None = Field(None, description="name of the CAM output (batch, labels, h, w)")


class VersionMetadata(BaseModel):
    """``metadata.json`` of one version: provenance first, so nobody serves weights blind."""

    model_config = ConfigDict(extra="allow", frozen=True)

    weights: Weights
    data: str | None = Field(None, description="what the weights were trained on; null if untrained")
    metrics: dict[str, Any] = Field(default_factory=dict)
    created: datetime
    source_commit: str | None = None
    engine: EngineInfo = EngineInfo()
    labels: tuple[str, ...] | None = Field(None, description="labels at export time, checked against config")
    parity: dict[str, Any] = Field(default_factory=dict, description="ONNX vs PyTorch check at export")
    architecture: str | None = None
    exported_with: dict[str, str] = Field(default_factory=dict, description="library versions at export")
    thresholds: dict[str, float] | None = Field(
        None,
        description="this version's operating points (chosen on validation data at a target "
        "sensitivity); they override config.yaml's thresholds for this version only",
    )
    operating_points: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="how each threshold was chosen: target, sensitivity, specificity"
    )

    def thresholds_for(self, config: "ModelConfig") -> dict[str, float]:
        """Per-label thresholds this version is scored with: its own, else the config's (a gzsl
        label with neither has no operating point and is left out)."""
        own = {**config.thresholds, **(self.thresholds or {})}
        return {label: own[label] for label in config.labels if label in own}
