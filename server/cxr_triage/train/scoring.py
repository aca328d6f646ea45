"""Score a registered version's engine on a labelled dataset, the way the server scores.

Evaluation and the promotion gate judge the engine that will serve (ONNX Runtime, the
server's own decoding and preprocessing), not the PyTorch module it was exported from.
No torch here.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from cxr_triage.config import Backend
from cxr_triage.engines import OnnxEngine
from cxr_triage.imaging import ImageLimits, prepare, to_batch
from cxr_triage.repository import ModelConfig, ModelRepository, VersionEntry
from cxr_triage.train.datasets import LabeledSet, label_matrix

BATCH = 32
LIMITS = ImageLimits(max_bytes=1 << 31, max_pixels=1 << 30)


@dataclass(frozen=True)
class Scored:
    """Targets, mask and engine scores of one dataset, rows in the dataset's record order."""

    targets: np.ndarray
    mask: np.ndarray
    scores: np.ndarray


def score_version(
    version: VersionEntry, config: ModelConfig, data: LabeledSet, backend: Backend = "cpu", threads: int = 0
) -> Scored:
    engine = OnnxEngine(version.engine_path, backend, threads)
    scores = []
    records = list(data.records)
    for start in range(0, len(records), BATCH):
        pixels = [
            prepare(r.image.read_bytes(), "", config.input, LIMITS).pixels
            for r in records[start : start + BATCH]
        ]
        scores.append(engine.run(to_batch(pixels, config.input)))
    targets, mask = label_matrix(data, config.labels)
    return Scored(targets, mask, np.concatenate(scores) if scores else np.zeros((0, len(config.labels))))


def find_version(repo_root: Path, model: str, version: str | None) -> tuple[ModelConfig, VersionEntry]:
    """``version`` of ``model`` (the served one when None, the highest for ``latest``), with its config."""
    entry = ModelRepository.load(repo_root, check_engines=False).get(model)
    if version == "latest":
        chosen = entry.latest
    else:
        chosen = entry.served if version is None else entry.versions.get(version)
    if chosen is None:
        have = sorted(entry.versions, key=int)
        raise ValueError(f"{model} has no version {version or '(none exported)'}; versions: {have}")
    return entry.config, chosen


def describe(data: LabeledSet, split: str | None) -> str:
    """One line naming the data, saying ``synthetic`` (not clinical) where it is."""
    kind = "synthetic phantoms (not clinical)" if data.synthetic else data.source
    where = f" {split} split" if split else ""
    return f"{kind}{where}, {len(data)} images, {len(data.patients())} patients"


def default_split(root: Path, role: Literal["train", "test"]) -> str | None:
    """The split of ``root``'s layout that plays ``role``: training data or held-out data.

    ChestX-ray14: train_val / test; CheXpert: train / valid; a feedback export has no splits.
    """
    if (root / "feedback_labels.csv").is_file():
        return None
    if (root / "Data_Entry_2017.csv").is_file():
        return "train_val" if role == "train" else "test"
    return "train" if role == "train" else "valid"
