"""Labelled chest X-ray folders for the trainer: ChestX-ray14, CheXpert and the service's feedback export.

Each loader reads a folder laid out exactly as the public release (or ``feedback.export``) writes
it and returns a :class:`LabeledSet`: one :class:`Record` per image with its patient and its labels
in the dataset's own vocabulary (1.0, 0.0, or ``nan`` = unknown). :func:`label_matrix` maps those
onto a model's labels (aliases, masks) and :class:`ImageDataset` turns them into tensors with the
server's own preprocessing, so training and serving see the same pixels.
"""

import csv
import logging
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from cxr_triage.errors import CxrError
from cxr_triage.imaging import ImageLimits, prepare, to_batch
from cxr_triage.repository.models import InputSpec

log = logging.getLogger(__name__)

UncertaintyPolicy = Literal["ones", "zeros", "ignore"]

NIH_LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
NO_FINDING = "No Finding"
CHEXPERT_LABELS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)

NIH_ENTRY = "Data_Entry_2017.csv"
NIH_SPLIT_LISTS = {"train_val": "train_val_list.txt", "test": "test_list.txt"}
CHEXPERT_SPLITS = {"train": "train.csv", "valid": "valid.csv"}
FEEDBACK_LABELS = "feedback_labels.csv"
FEEDBACK_FIXED_COLUMNS = ("study_uid", "instance_uid", "reader", "reported_at")
SYNTHETIC_MARKER = "SYNTHETIC.txt"
"""A folder holding this file is a synthetic phantom set (written by ``train.synthetic``)."""

# Same finding, different spelling across vocabularies; keys and values are canonical keys.
_ALIASES = {"pleural effusion": "effusion"}
# Training reads files it trusts, some of them large: far above the server's upload limits.
_TRAIN_LIMITS = ImageLimits(max_bytes=1 << 30, max_pixels=400_000_000)
_PATIENT_DIR = re.compile(r"^patient\d+$")


class DatasetError(CxrError):
    """A dataset folder breaks its layout; the message names the file and what was expected."""

    code, status = "invalid_dataset", 500


@dataclass(frozen=True)
class Record:
    """One image: its file, its patient, and its labels (1.0 / 0.0, ``nan`` = unknown)."""

    image: Path
    patient_id: str
    labels: Mapping[str, float] = field(hash=False)


@dataclass(frozen=True)
class LabeledSet:
    """The images of one dataset folder (or a subset of them) and the dataset's label vocabulary.

    ``source`` names the kind of dataset only (never a path, it ends up in model metadata);
    ``synthetic`` is True for phantom folders, which must never pass for clinical data.
    """

    source: str
    synthetic: bool
    labels: tuple[str, ...]
    records: tuple[Record, ...]

    def patients(self) -> set[str]:
        return {r.patient_id for r in self.records}

    def subset(self, records: Iterable[Record]) -> "LabeledSet":
        """The same dataset restricted to ``records`` (source, labels and synthetic flag kept)."""
        return LabeledSet(self.source, self.synthetic, self.labels, tuple(records))

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)


# --- ChestX-ray14 ----------------------------------------------------------------------------


def load_chestxray14(root: Path, split: Literal["train_val", "test", "all"] = "all") -> LabeledSet:
    """Read the NIH ChestX-ray14 layout: ``Data_Entry_2017.csv``, images and the official split lists.

    Images are found by filename under ``images/`` or the release's ``images_001/images/`` …
    ``images_012/images/`` folders. ``split`` picks the rows listed in ``train_val_list.txt`` or
    ``test_list.txt`` (``all``: every row of the CSV). Every label is known here: a finding not
    named in ``Finding Labels`` is 0. Listed images missing on disk are skipped with one warning.

    Raises:
        DatasetError: missing CSV or split list, missing columns, label names outside the 14
            ChestX-ray14 labels, or no listed image found on disk.
    """
    root = Path(root)
    entry = root / NIH_ENTRY
    if not entry.is_file():
        raise DatasetError(f"{entry} not found; a ChestX-ray14 folder holds {NIH_ENTRY} and images/")
    if split not in ("train_val", "test", "all"):
        raise DatasetError(f"unknown ChestX-ray14 split {split!r}; use train_val, test or all")
    rows = _read_nih_entry(entry)
    names = list(rows)
    if split != "all":
        listed = _read_list(root / NIH_SPLIT_LISTS[split])
        stray = [n for n in listed if n not in rows]
        if stray:
            log.warning(
                "%d images in %s are not in %s and were skipped (e.g. %s)",
                len(stray),
                NIH_SPLIT_LISTS[split],
                NIH_ENTRY,
                ", ".join(stray[:3]),
            )
        names = [n for n in listed if n in rows]
    files = _nih_image_index(root)
    missing = [n for n in names if n not in files]
    if names and len(missing) == len(names):
        raise DatasetError(
            f"none of the {len(names)} images listed for split {split!r} were found under "
            f"{root / 'images'} or {root / 'images_*' / 'images'}; extract the image archives there"
        )
    if missing:
        log.warning(
            "%d of %d ChestX-ray14 images listed for split %r are missing on disk and were skipped (e.g. %s)",
            len(missing),
            len(names),
            split,
            ", ".join(missing[:3]),
        )
    records = []
    for name in names:
        if name in files:
            patient, findings = rows[name]
            labels = {label: float(label in findings) for label in NIH_LABELS}
            records.append(Record(image=files[name], patient_id=patient, labels=labels))
    return LabeledSet("chestxray14", is_synthetic(root), NIH_LABELS, tuple(records))


def _read_nih_entry(path: Path) -> dict[str, tuple[str, frozenset[str]]]:
    """Image Index -> (Patient ID, findings); rejects label names outside the vocabulary."""
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        needed = ("Image Index", "Finding Labels", "Patient ID")
        absent = [c for c in needed if c not in header]
        if absent:
            raise DatasetError(
                f"{path} lacks columns {absent}; expected the ChestX-ray14 header starting "
                "'Image Index,Finding Labels,Follow-up #,Patient ID,…'"
            )
        i_name, i_find, i_pat = (header.index(c) for c in needed)
        width = max(i_name, i_find, i_pat) + 1
        rows: dict[str, tuple[str, frozenset[str]]] = {}
        unknown: dict[str, int] = {}
        for line_no, row in enumerate(reader, start=2):
            if not any(cell.strip() for cell in row):
                continue
            if len(row) < width:
                raise DatasetError(f"{path} line {line_no} has {len(row)} columns; expected at least {width}")
            findings = {x.strip() for x in row[i_find].split("|") if x.strip()} - {NO_FINDING}
            for name in findings - set(NIH_LABELS):
                unknown[name] = unknown.get(name, 0) + 1
            rows[row[i_name].strip()] = (row[i_pat].strip(), frozenset(findings))
    if unknown:
        raise DatasetError(
            f"{path} names labels outside ChestX-ray14's 14 (and '{NO_FINDING}'): "
            + ", ".join(f"{name!r} ({n} rows)" for name, n in sorted(unknown.items()))
        )
    return rows


def _read_list(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetError(
            f"{path} not found; ChestX-ray14 splits come from train_val_list.txt and test_list.txt"
        )
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _nih_image_index(root: Path) -> dict[str, Path]:
    """Filename -> path over ``images/``, ``images_NNN/images/`` and ``images_NNN/`` (first wins)."""
    folders = [root / "images"]
    for part in sorted(root.glob("images_*")):
        folders += [part / "images", part]
    files: dict[str, Path] = {}
    for folder in folders:
        if folder.is_dir():
            for path in folder.iterdir():
                files.setdefault(path.name, path)
    return files


# --- CheXpert --------------------------------------------------------------------------------


def load_chexpert(
    root: Path,
    split: Literal["train", "valid"] = "train",
    uncertainty: UncertaintyPolicy = "ones",
    frontal_only: bool = True,
) -> LabeledSet:
    """Read the CheXpert layout: ``train.csv`` / ``valid.csv`` and the image tree.

    Label cells are 1.0, 0.0, -1.0 (uncertain) or blank. Blank means the report did not mention
    the finding and is read as 0.0, the convention of the CheXpert paper's baselines. Uncertain
    cells follow ``uncertainty``: ``ones`` (U-Ones), ``zeros`` (U-Zeros) or ``ignore`` (unknown,
    masked in the loss). ``Path`` starts with the release folder name
    (``CheXpert-v1.0-small/train/patient00001/…``); it is resolved against ``root``'s parent,
    then ``root``, then ``root`` without that first component (a renamed folder). The patient is
    the ``patientNNNNN`` component. Rows whose image is missing are skipped with one warning.

    Raises:
        DatasetError: missing CSV or columns, a cell that is not 1/0/-1/blank, a path without a
            patient folder, or no image found on disk.
    """
    root = Path(root)
    if split not in CHEXPERT_SPLITS:
        raise DatasetError(f"unknown CheXpert split {split!r}; use train or valid")
    if uncertainty not in ("ones", "zeros", "ignore"):
        raise DatasetError(f"unknown uncertainty policy {uncertainty!r}; use ones, zeros or ignore")
    path = root / CHEXPERT_SPLITS[split]
    if not path.is_file():
        raise DatasetError(f"{path} not found; a CheXpert folder holds train.csv and valid.csv")
    uncertain = {"ones": 1.0, "zeros": 0.0, "ignore": math.nan}[uncertainty]
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in reader.fieldnames or []]
        reader.fieldnames = header
        absent = [c for c in ("Path", "Frontal/Lateral", *CHEXPERT_LABELS) if c not in header]
        if absent:
            raise DatasetError(f"{path} lacks the CheXpert columns {absent}")
        rows = [
            (reader.line_num, row)
            for row in reader
            if row.get("Path") and (not frontal_only or row["Frontal/Lateral"].strip() == "Frontal")
        ]
    base = _chexpert_base(root, [row["Path"].strip() for _, row in rows[:50]])
    records, missing = [], 0
    for line_no, row in rows:
        rel = row["Path"].strip()
        image = base(rel)
        if not image.is_file():
            missing += 1
            continue
        patient = next((p for p in Path(rel).parts if _PATIENT_DIR.match(p)), None)
        if patient is None:
            raise DatasetError(f"{path}: Path {rel!r} has no patientNNNNN folder to take the patient from")
        labels = {
            label: _chexpert_value(row[label], uncertain, path, line_no, label) for label in CHEXPERT_LABELS
        }
        records.append(Record(image=image, patient_id=patient, labels=labels))
    if rows and not records:
        raise DatasetError(
            f"none of the {len(rows)} images in {path} were found; Path is resolved against "
            f"{root.parent} and {root}; put the images where the Path column says"
        )
    if missing:
        log.warning(
            "%d of %d CheXpert images in %s are missing on disk and were skipped",
            missing,
            len(rows),
            path.name,
        )
    return LabeledSet("chexpert", is_synthetic(root), CHEXPERT_LABELS, tuple(records))


def _chexpert_base(root: Path, sample: Sequence[str]) -> Callable[[str], Path]:
    """How ``Path`` cells become files: the first rule under which a sampled image exists."""
    rules: list[Callable[[str], Path]] = [
        lambda rel: root.parent / rel,
        lambda rel: root / rel,
        lambda rel: root.joinpath(*Path(rel).parts[1:]),
    ]
    for rule in rules:
        if any(rule(rel).is_file() for rel in sample):
            return rule
    return rules[0]


def _chexpert_value(cell: str | None, uncertain: float, path: Path, line_no: int, label: str) -> float:
    text = (cell or "").strip()
    if not text:
        return 0.0  # not mentioned in the report: negative, by the usual convention
    try:
        value = float(text)
    except ValueError:
        value = math.inf
    if value == 1.0 or value == 0.0:
        return value
    if value == -1.0:
        return uncertain
    raise DatasetError(f"{path} line {line_no}, {label}: {text!r} is not 1.0, 0.0, -1.0 or blank")


# --- feedback export -------------------------------------------------------------------------


def load_feedback(root: Path) -> LabeledSet:
    """Read a ``cxr-triage`` feedback export: ``feedback_labels.csv`` and ``images/<instance_uid>.png``.

    A label cell is 1, 0, or empty where the reader made no call (unknown, masked in the loss).
    The patient is the study UID (the service keeps no patient identifiers), so one study never
    lands in two splits. Rows without an image file are skipped with one warning.

    Raises:
        DatasetError: missing CSV or columns, a cell that is not 1/0/empty, or no image on disk.
    """
    root = Path(root)
    path = root / FEEDBACK_LABELS
    if not path.is_file():
        raise DatasetError(f"{path} not found; a feedback export holds {FEEDBACK_LABELS} and images/")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        if tuple(header[:4]) != FEEDBACK_FIXED_COLUMNS or len(header) < 5:
            raise DatasetError(
                f"{path} must start with columns {list(FEEDBACK_FIXED_COLUMNS)}, then one column per label"
            )
        labels = tuple(header[4:])
        rows = [(line_no, row) for line_no, row in enumerate(reader, start=2) if any(c.strip() for c in row)]
    records, missing = [], 0
    for line_no, row in rows:
        if len(row) < len(header):
            raise DatasetError(f"{path} line {line_no} has {len(row)} columns; expected {len(header)}")
        study, instance = row[0].strip(), row[1].strip()
        image = root / "images" / f"{instance}.png"
        if not image.is_file():
            missing += 1
            continue
        values = {label: _feedback_value(row[4 + i], path, line_no, label) for i, label in enumerate(labels)}
        records.append(Record(image=image, patient_id=study, labels=values))
    if rows and not records:
        raise DatasetError(
            f"none of the {len(rows)} images of {path} were found; "
            f"expected {root / 'images'}/<instance_uid>.png"
        )
    if missing:
        log.warning("%d of %d feedback rows have no image under images/ and were skipped", missing, len(rows))
    return LabeledSet("feedback", is_synthetic(root), labels, tuple(records))


def _feedback_value(cell: str, path: Path, line_no: int, label: str) -> float:
    text = cell.strip()
    if not text:
        return math.nan
    if text in ("1", "1.0"):
        return 1.0
    if text in ("0", "0.0"):
        return 0.0
    raise DatasetError(f"{path} line {line_no}, {label}: {text!r} is not 1, 0 or empty")


# --- layout detection, splits, label mapping -------------------------------------------------


def is_synthetic(root: Path) -> bool:
    """Whether ``root`` is a synthetic phantom folder (it holds the ``SYNTHETIC.txt`` marker)."""
    return (Path(root) / SYNTHETIC_MARKER).is_file()


# Generic split names (what the trainer and the gate ask for) -> each layout's own split.
_SPLITS: dict[str, dict[str | None, str]] = {
    "chestxray14": {
        None: "all",
        "all": "all",
        "train": "train_val",
        "train_val": "train_val",
        "test": "test",
    },
    "chexpert": {None: "train", "train": "train", "valid": "valid", "val": "valid", "test": "valid"},
    "feedback": {None: "all", "all": "all", "train": "all"},
}


def load_dataset(root: Path, split: str | None = None, uncertainty: UncertaintyPolicy = "ones") -> LabeledSet:
    """Load whichever supported layout ``root`` holds.

    ``feedback_labels.csv`` means a feedback export (checked first: it also carries a
    ``Data_Entry_2017.csv``), ``Data_Entry_2017.csv`` ChestX-ray14, ``train.csv`` / ``valid.csv``
    CheXpert. ``split`` may be generic or the layout's own name:

    =============  ===================  ==========  ==============
    split          ChestX-ray14         CheXpert    feedback
    =============  ===================  ==========  ==============
    None           all                  train       all
    ``train``      train_val            train       all
    ``test``       test                 valid       (none)
    own names      train_val, all       valid, val  all
    =============  ===================  ==========  ==============

    (CheXpert's public release has no labelled test split; its ``valid`` is the held-out set.)

    Raises:
        DatasetError: no layout fits (the message names the files looked for), or ``split`` is not
            one of the detected layout's splits.
    """
    root = Path(root)
    if (root / FEEDBACK_LABELS).is_file():
        _layout_split("feedback", split)
        return load_feedback(root)
    if (root / NIH_ENTRY).is_file():
        return load_chestxray14(root, _layout_split("chestxray14", split))  # type: ignore[arg-type]
    if any((root / name).is_file() for name in CHEXPERT_SPLITS.values()):
        return load_chexpert(root, _layout_split("chexpert", split), uncertainty)  # type: ignore[arg-type]
    raise DatasetError(
        f"{root} holds no known dataset layout; expected {FEEDBACK_LABELS} (feedback export), "
        f"{NIH_ENTRY} with images/ (ChestX-ray14) or train.csv / valid.csv (CheXpert)"
    )


def _layout_split(layout: str, split: str | None) -> str:
    names = _SPLITS[layout]
    if split not in names:
        known = ", ".join(str(k) for k in names if k is not None)
        raise DatasetError(f"a {layout} folder has no split {split!r}; use one of: {known}")
    return names[split]


def split_by_patient(data: LabeledSet, val_fraction: float, seed: int = 0) -> tuple[LabeledSet, LabeledSet]:
    """Split into (train, validation) by patient: all of a patient's images land on one side.

    ``val_fraction`` is the share of patients (not images) held out, rounded, at least one each
    side when there are two patients or more. Deterministic for (patients, fraction, seed),
    whatever order the records come in.

    Raises:
        ValueError: ``val_fraction`` outside [0, 1).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1); got {val_fraction}")
    patients = sorted(data.patients())
    n_val = round(val_fraction * len(patients))
    if val_fraction > 0 and len(patients) >= 2:
        n_val = min(max(n_val, 1), len(patients) - 1)
    order = np.random.default_rng(seed).permutation(len(patients))
    held = {patients[i] for i in order[:n_val]}
    train = [r for r in data.records if r.patient_id not in held]
    val = [r for r in data.records if r.patient_id in held]
    return data.subset(train), data.subset(val)


def _canonical(label: str) -> str:
    key = " ".join(label.replace("_", " ").lower().split())
    return _ALIASES.get(key, key)


def label_matrix(data: LabeledSet, model_labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Targets (N, L) float32 in 0/1 and mask (N, L) bool for a model's labels, in its order.

    A model label takes the dataset label of the same name, else one that is the same finding
    spelled differently (``Pleural Effusion`` = ``Effusion``; ``Pleural_Thickening`` =
    ``Pleural Thickening``). The mask is False where the value is unknown or the dataset lacks
    the label: a finding a dataset does not annotate is never taken as absent.
    """
    by_key: dict[str, str] = {}
    for name in data.labels:
        by_key.setdefault(_canonical(name), name)
    source = [label if label in data.labels else by_key.get(_canonical(label)) for label in model_labels]
    targets = np.zeros((len(data), len(model_labels)), dtype=np.float32)
    mask = np.zeros((len(data), len(model_labels)), dtype=bool)
    for i, record in enumerate(data.records):
        for j, src in enumerate(source):
            value = record.labels.get(src, math.nan) if src is not None else math.nan
            if not math.isnan(value):
                targets[i, j] = 1.0 if value >= 0.5 else 0.0
                mask[i, j] = True
    return targets, mask


# --- tensors ---------------------------------------------------------------------------------


class ImageDataset(torch.utils.data.Dataset):
    """Images as the engine sees them, with targets and masks for ``model_labels``.

    Each file goes through the server's own path, ``imaging.prepare`` (decode, resize) then
    ``imaging.to_batch`` (normalise), so a model is trained on exactly the tensors it is served.
    With ``cache`` the resized pixels (float32, 4·size² bytes an image) are kept after the first
    read; each DataLoader worker keeps its own copy. With ``augment``, a random affine and an
    intensity jitter are applied to the resized image before normalising, drawn from
    (``seed``, epoch, index): call :meth:`set_epoch` each epoch for fresh draws.

    ``__getitem__`` returns ``(x, target, mask)``: float32 (C, H, W), float32 (L,), bool (L,).
    """

    def __init__(
        self,
        data: LabeledSet,
        model_labels: Sequence[str],
        spec: InputSpec,
        augment: bool = False,
        cache: bool = True,
        seed: int = 0,
    ) -> None:
        self.data = data
        self.model_labels = tuple(model_labels)
        self.spec = spec
        self.augment = augment
        self.cache = cache
        self.seed = seed
        self.epoch = 0
        self.targets, self.mask = label_matrix(data, self.model_labels)
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.data)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def pixels(self, index: int) -> np.ndarray:
        """The resized (size, size) 0-1 image, exactly as the server's ``prepare`` makes it.

        Raises:
            DatasetError: the file cannot be read or decoded (its path and the reason).
        """
        cached = self._cache.get(index)
        if cached is not None:
            return cached
        path = self.data.records[index].image
        try:
            pixels = prepare(path.read_bytes(), "", self.spec, _TRAIN_LIMITS).pixels
        except OSError as exc:
            raise DatasetError(f"cannot read {path}: {exc}") from exc
        except CxrError as exc:
            raise DatasetError(f"cannot decode {path}: {exc.message}") from exc
        if self.cache:
            self._cache[index] = pixels
        return pixels

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pixels = self.pixels(index)
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            pixels = augment_pixels(pixels, rng)
        x = to_batch([pixels], self.spec)[0]
        return (
            torch.from_numpy(x),
            torch.from_numpy(self.targets[index].copy()),
            torch.from_numpy(self.mask[index].copy()),
        )


def augment_pixels(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A small random affine and brightness/contrast jitter of a (size, size) 0-1 image.

    Rotation ±7°, scale 0.9-1.1, translation ±5 % of the side, brightness and contrast ±10 %;
    areas moved in from outside are black, like letterbox padding. Never a horizontal flip: the
    heart lies on the patient's left, and a mirrored chest (situs inversus, or a film put up
    backwards) is itself a finding the model must not learn to ignore.
    """
    size = pixels.shape[0]
    angle = math.radians(rng.uniform(-7.0, 7.0))
    scale = rng.uniform(0.9, 1.1)
    tx, ty = rng.uniform(-0.05, 0.05, size=2) * size
    # PIL wants the inverse map (output -> input): p_in = R(-a) (p_out - c - t) / s + c.
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    c = size / 2.0
    ox, oy = c + tx, c + ty
    coeffs = (cos, sin, c - cos * ox - sin * oy, -sin, cos, c + sin * ox - cos * oy)
    img = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32), mode="F")
    moved = np.asarray(
        img.transform((size, size), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR, fillcolor=0.0),
        dtype=np.float32,
    )
    contrast, brightness = rng.uniform(0.9, 1.1, size=2)
    mean = float(moved.mean())
    return np.clip(((moved - mean) * contrast + mean) * brightness, 0.0, 1.0).astype(np.float32)
