"""Writing model_repo/ safely: a version folder appears whole (staged, then renamed), or not at all."""

import hashlib
import logging
from pathlib import Path

from cxr_triage.errors import ExportError
from cxr_triage.repository.repo import ModelRepository
from cxr_triage.repository.serving import ServingState, read_serving_state, write_serving_state

log = logging.getLogger(__name__)


def claim_version(model_dir: Path, staging: Path) -> tuple[str, Path]:
    """Rename staging to the next free version number (rename is atomic; retry on a race)."""
    for _ in range(100):
        taken = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
        version = str(max(taken, default=0) + 1)
        try:
            staging.rename(model_dir / version)
            return version, model_dir / version
        except OSError:
            continue
    raise ExportError(f"could not claim a version folder in {model_dir}")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pin_served(model_dir: Path) -> None:
    """Before a new version appears, write down which version serves now.

    Without serving.json the highest version serves; registering a candidate must not
    promote it by the back door, so pin the current one first.
    """
    if read_serving_state(model_dir) is not None:
        return
    entry = ModelRepository.load(model_dir.parent, check_engines=False).get(model_dir.name)
    if entry.latest is not None:
        write_serving_state(model_dir, ServingState(default_version=entry.latest.version))
        log.info("pinned %s version %s as served before registering", model_dir.name, entry.latest.version)
