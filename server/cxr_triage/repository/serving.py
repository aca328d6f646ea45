"""Which version of a model serves traffic: ``model_repo/<name>/serving.json``.

Written only by the promotion gate (``cxr-triage promote``), read by the server, which swaps
engines between batches when it changes (hot reload, no restart). Without the file the
highest version serves, as before any promotion.

A canary sends a fixed fraction of jobs to a candidate version. The split is a hash of the
job id, so a re-delivered job is scored by the same version, and every response names the
version that made it.
"""

import hashlib
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

SERVING_FILE = "serving.json"
_VERSION = r"^[1-9][0-9]*$"


class Canary(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: str = Field(..., pattern=_VERSION)
    fraction: float = Field(..., gt=0.0, lt=1.0, description="share of jobs scored by the candidate")


class ServingState(BaseModel):
    """The served (default) version of one model, an optional canary, and how they got there."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default_version: str = Field(..., pattern=_VERSION)
    canary: Canary | None = None
    updated: datetime = Field(default_factory=lambda: datetime.now(UTC))
    history: tuple[dict[str, Any], ...] = Field(
        (), description="promotion records, oldest first: gate metrics, who replaced whom, when"
    )

    def versions(self) -> tuple[str, ...]:
        """Versions this state serves: the default, then the canary if any."""
        return (self.default_version,) + ((self.canary.version,) if self.canary else ())


def read_serving_state(model_dir: Path) -> ServingState | None:
    """The model's serving state, or None when nothing was ever promoted.

    Raises:
        ValueError: the file exists but is not a valid serving state (says which field).
    """
    path = model_dir / SERVING_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return ServingState.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "file"
        raise ValueError(f"{SERVING_FILE}: {where}: {first['msg']}") from exc


def write_serving_state(model_dir: Path, state: ServingState) -> None:
    """Replace the serving state atomically: a reader sees the old file or the new one, never half."""
    fd, tmp = tempfile.mkstemp(dir=model_dir, prefix=".serving-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(state.model_dump_json(indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, model_dir / SERVING_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def goes_to_canary(job_id: str, canary: Canary | None) -> bool:
    """Whether ``job_id`` is scored by the canary: a stable hash, uniform over job ids."""
    if canary is None:
        return False
    bucket = int.from_bytes(hashlib.blake2b(job_id.encode(), digest_size=8).digest(), "big")
    return bucket / 2**64 < canary.fraction
