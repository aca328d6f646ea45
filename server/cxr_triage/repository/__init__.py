"""The model repository contract (model_repo/): configs, versions, provenance, validation."""

from cxr_triage.repository.models import (
    BatchingSpec,
    InputSpec,
    ModelConfig,
    VersionMetadata,
    Weights,
)
from cxr_triage.repository.repo import ModelEntry, ModelRepository, VersionEntry

__all__ = [
    "BatchingSpec",
    "InputSpec",
    "ModelConfig",
    "ModelEntry",
    "ModelRepository",
    "VersionEntry",
    "VersionMetadata",
    "Weights",
]
