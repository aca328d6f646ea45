"""The model repository contract (model_repo/): configs, versions, provenance, validation."""

from cxr_triage.repository.models import (
    BatchingSpec,
    InputSpec,
    ModelConfig,
    VersionMetadata,
    Weights,
)
from cxr_triage.repository.repo import ModelEntry, ModelRepository, VersionEntry
from cxr_triage.repository.serving import (
    SERVING_FILE,
    Canary,
    ServingState,
    goes_to_canary,
    read_serving_state,
    write_serving_state,
)

__all__ = [
    "SERVING_FILE",
    "BatchingSpec",
    "Canary",
    "InputSpec",
    "ModelConfig",
    "ModelEntry",
    "ModelRepository",
    "ServingState",
    "VersionEntry",
    "VersionMetadata",
    "Weights",
    "goes_to_canary",
    "read_serving_state",
    "write_serving_state",
]
