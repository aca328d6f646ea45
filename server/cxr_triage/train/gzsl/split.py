"""Seen and unseen findings, and the data each split may hold (the paper's protocol).

Unseen findings (the paper's: Edema, Pneumonia, Emphysema, Fibrosis) are named to the model
but never shown: training and validation drop every image that carries one, the test split
keeps every image. Images with no positive seen finding give the objective nothing to learn
from (no ranking pair, no alignment target), so training leaves them out too (the reference
drops them from every split; here validation and test keep them, as a triage service sees them).
"""

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cxr_triage.train.datasets import (
    NIH_ENTRY,
    NIH_LABELS,
    DatasetError,
    LabeledSet,
    label_matrix,
    load_dataset,
)

PAPER_UNSEEN: tuple[str, ...] = ("Edema", "Pneumonia", "Emphysema", "Fibrosis")
LABELS_FILE = "gzsl_labels.json"
"""A dataset folder may carry this file: ``{"labels": [...], "unseen": [...], "descriptions": {...}}``."""


@dataclass(frozen=True)
class LabelSplit:
    """The model's labels (score order) and which of them are unseen."""

    labels: tuple[str, ...]
    unseen: tuple[str, ...]
    descriptions: dict[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        stray = [u for u in self.unseen if u not in self.labels]
        if stray:
            raise DatasetError(f"unseen labels {stray} are not among the labels {list(self.labels)}")
        if len(self.unseen) == len(self.labels):
            raise DatasetError("every label is unseen: at least one label must be seen in training")

    @property
    def seen(self) -> tuple[str, ...]:
        return tuple(x for x in self.labels if x not in self.unseen)

    def seen_mask(self) -> list[bool]:
        return [x not in self.unseen for x in self.labels]


def label_split_for(root: Path, unseen: Sequence[str] | None = None) -> LabelSplit:
    """The split of a dataset folder: its ``gzsl_labels.json`` if it has one, else ChestX-ray14's
    14 labels with the paper's unseen four. ``unseen`` overrides the unseen list."""
    path = Path(root) / LABELS_FILE
    if path.is_file():
        spec = json.loads(path.read_text())
        labels, default_unseen = tuple(spec["labels"]), tuple(spec.get("unseen", ()))
        descriptions = dict(spec.get("descriptions", {}))
    else:
        labels, default_unseen, descriptions = NIH_LABELS, PAPER_UNSEEN, {}
    return LabelSplit(labels, tuple(unseen) if unseen is not None else default_unseen, descriptions)


def load_split(root: Path, split: str) -> LabeledSet:
    """``train`` (ChestX-ray14's train_val_list) or ``test`` images of a GZSL dataset folder.

    A ChestX-ray14 folder is read by :func:`datasets.load_dataset`; a folder with ``train_val/``
    and ``test/`` sub-folders (the compositional phantoms, each a labelled-image folder in the
    feedback-export layout) is read sub-folder by sub-folder.

    Raises:
        DatasetError: no known layout, or an unknown split.
    """
    root = Path(root)
    if split not in ("train", "test"):
        raise DatasetError(f"unknown split {split!r}; use train or test")
    if (root / NIH_ENTRY).is_file() and not (root / "train_val").is_dir():
        return load_dataset(root, split)
    folder = root / ("train_val" if split == "train" else "test")
    if folder.is_dir():
        return load_dataset(folder)
    raise DatasetError(
        f"{root} is not a GZSL dataset: expected ChestX-ray14 ({NIH_ENTRY}, images/, split lists) "
        "or train_val/ and test/ folders (`cxr-triage gzsl synth-data`)"
    )


def source_name(root: Path, data: LabeledSet) -> str:
    """What kind of data this is, for records (never a path): the compositional phantoms are
    read through the feedback layout but are not feedback."""
    if data.synthetic and (Path(root) / LABELS_FILE).is_file():
        return "gzsl-compositional-phantoms"
    return data.source


def drop_unseen(data: LabeledSet, unseen: Sequence[str]) -> LabeledSet:
    """``data`` without the images that carry any unseen finding (a positive value)."""
    if not unseen:
        return data
    targets, mask = label_matrix(data, list(unseen))
    carries = (targets * mask).sum(axis=1) > 0
    return data.subset(r for r, bad in zip(data.records, carries, strict=True) if not bad)


def with_positive(data: LabeledSet, labels: Sequence[str]) -> LabeledSet:
    """``data`` restricted to images with at least one positive among ``labels``."""
    targets, mask = label_matrix(data, list(labels))
    keep = (targets * mask).sum(axis=1) > 0
    return data.subset(r for r, k in zip(data.records, keep, strict=True) if k)


def check_labels_known(data: LabeledSet, labels: Sequence[str]) -> list[str]:
    """Labels the dataset does not annotate at all (never known for any image)."""
    _, mask = label_matrix(data, list(labels))
    return [x for j, x in enumerate(labels) if not mask[:, j].any()] if len(data) else list(labels)


__all__ = [
    "LABELS_FILE",
    "PAPER_UNSEEN",
    "LabelSplit",
    "check_labels_known",
    "drop_unseen",
    "label_split_for",
    "load_split",
    "source_name",
    "with_positive",
]
