"""The trainer's dataset loaders (ChestX-ray14, CheXpert, feedback export), splits, label mapping, tensors.

Fixtures are written in each public dataset's exact layout under tmp_path.
"""

import csv
import logging
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cxr_triage.errors import CxrError
from cxr_triage.imaging import ImageLimits, prepare, to_batch
from cxr_triage.repository.models import InputSpec
from cxr_triage.train.datasets import (
    CHEXPERT_LABELS,
    NIH_LABELS,
    DatasetError,
    ImageDataset,
    LabeledSet,
    Record,
    augment_pixels,
    label_matrix,
    load_chestxray14,
    load_chexpert,
    load_dataset,
    load_feedback,
    split_by_patient,
)
from tests.helpers import dicom_bytes

NIH_HEADER = (
    "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,View Position,"
    "OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]"
)
CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS]


def write_image(path: Path, seed: int = 0, shape: tuple[int, int] = (40, 48)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def write_nih(
    root: Path,
    rows: list[tuple[str, str, int]],
    image_dir: str = "images",
    trailing_comma: bool = False,
    train_val: list[str] | None = None,
    test: list[str] | None = None,
    skip_images: tuple[str, ...] = (),
) -> Path:
    """ChestX-ray14 as released: the 11-column CSV (optionally the trailing empty one), images, lists."""
    root.mkdir(parents=True, exist_ok=True)
    end = "," if trailing_comma else ""
    lines = [NIH_HEADER + end]
    for i, (name, findings, patient) in enumerate(rows):
        follow_up = int(name.split("_")[1].split(".")[0])
        lines.append(f"{name},{findings},{follow_up},{patient},{40 + i},M,PA,2500,2048,0.143,0.143{end}")
        if name not in skip_images:
            write_image(root / image_dir / name, seed=i)
    (root / "Data_Entry_2017.csv").write_text("\n".join(lines) + "\n")
    names = [r[0] for r in rows]
    (root / "train_val_list.txt").write_text("\n".join(train_val if train_val is not None else names) + "\n")
    (root / "test_list.txt").write_text("\n".join(test or []) + "\n")
    return root


NIH_ROWS = [
    ("00000001_000.png", "Cardiomegaly|Effusion", 1),
    ("00000001_001.png", "No Finding", 1),
    ("00000002_000.png", "Hernia", 2),
    ("00000003_000.png", "Mass|Nodule|Pleural_Thickening", 3),
]


# --- ChestX-ray14 ----------------------------------------------------------------------------


def test_chestxray14_reads_labels_patients_and_official_splits(tmp_path: Path) -> None:
    root = write_nih(
        tmp_path / "nih",
        NIH_ROWS,
        train_val=["00000001_000.png", "00000001_001.png", "00000002_000.png"],
        test=["00000003_000.png"],
    )
    every = load_chestxray14(root)
    assert every.source == "chestxray14" and not every.synthetic and every.labels == NIH_LABELS
    assert len(every) == 4 and every.patients() == {"1", "2", "3"}
    first = every.records[0]
    assert first.image == root / "images" / "00000001_000.png" and first.patient_id == "1"
    assert {k for k, v in first.labels.items() if v == 1.0} == {"Cardiomegaly", "Effusion"}
    assert all(v in (0.0, 1.0) for r in every.records for v in r.labels.values())  # every label known
    assert set(every.records[1].labels.values()) == {0.0}  # No Finding
    assert every.records[3].labels["Pleural_Thickening"] == 1.0
    train_val, test = load_chestxray14(root, "train_val"), load_chestxray14(root, "test")
    assert [r.image.name for r in train_val.records] == [
        "00000001_000.png",
        "00000001_001.png",
        "00000002_000.png",
    ]
    assert [r.image.name for r in test.records] == ["00000003_000.png"]


def test_chestxray14_finds_images_in_the_release_folders_and_tolerates_a_trailing_column(
    tmp_path: Path,
) -> None:
    root = write_nih(tmp_path / "nih", NIH_ROWS, image_dir="images_001/images", trailing_comma=True)
    (root / "images_002" / "images").mkdir(parents=True)
    for name in ("00000002_000.png", "00000003_000.png"):  # the second archive of the release
        (root / "images_001" / "images" / name).rename(root / "images_002" / "images" / name)
    data = load_chestxray14(root)
    assert [r.image.parent.parent.name for r in data.records] == ["images_001"] * 2 + ["images_002"] * 2
    assert data.records[0].labels["Cardiomegaly"] == 1.0 and data.records[3].patient_id == "3"


def test_chestxray14_skips_missing_images_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = write_nih(tmp_path / "nih", NIH_ROWS, skip_images=("00000001_001.png", "00000002_000.png"))
    with caplog.at_level(logging.WARNING, logger="cxr_triage.train.datasets"):
        data = load_chestxray14(root, "train_val")
    assert [r.image.name for r in data.records] == ["00000001_000.png", "00000003_000.png"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 of 4" in warnings[0].getMessage()


def test_chestxray14_without_any_image_is_an_error(tmp_path: Path) -> None:
    root = write_nih(tmp_path / "nih", NIH_ROWS, skip_images=tuple(r[0] for r in NIH_ROWS))
    with pytest.raises(DatasetError, match="none of the 4 images"):
        load_chestxray14(root)


def test_chestxray14_unknown_label_names_are_an_error(tmp_path: Path) -> None:
    root = write_nih(tmp_path / "nih", [*NIH_ROWS, ("00000004_000.png", "Pneumonia|Covid|Efusion", 4)])
    with pytest.raises(DatasetError, match=r"'Covid'.*'Efusion'") as info:
        load_chestxray14(root)
    assert isinstance(info.value, CxrError)


def test_chestxray14_missing_files_are_named(tmp_path: Path) -> None:
    root = write_nih(tmp_path / "nih", NIH_ROWS)
    (root / "test_list.txt").unlink()
    with pytest.raises(DatasetError, match=r"test_list\.txt"):
        load_chestxray14(root, "test")
    with pytest.raises(DatasetError, match=r"Data_Entry_2017\.csv"):
        load_chestxray14(tmp_path)


# --- CheXpert --------------------------------------------------------------------------------


def chexpert_row(path: str, view: str = "Frontal", **labels: str) -> list[str]:
    cells = {name: "" for name in CHEXPERT_LABELS}
    cells.update({k.replace("_", " "): v for k, v in labels.items()})
    return [
        path,
        "Female",
        "68",
        view,
        "AP" if view == "Frontal" else "",
        *(cells[n] for n in CHEXPERT_LABELS),
    ]


def write_chexpert(
    csv_dir: Path, rows: list[list[str]], image_of: Callable[[str], Path], split: str = "train"
) -> Path:
    """``<split>.csv`` in ``csv_dir``, and each row's image (a JPEG) at ``image_of(Path)``."""
    csv_dir.mkdir(parents=True, exist_ok=True)
    with (csv_dir / f"{split}.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CHEXPERT_HEADER)
        writer.writerows(rows)
    for i, row in enumerate(rows):
        write_image(image_of(row[0]), seed=i)
    return csv_dir


PREFIX = "CheXpert-v1.0-small/train"
CHEXPERT_ROWS = [
    chexpert_row(f"{PREFIX}/patient00001/study1/view1_frontal.jpg", Cardiomegaly="1.0", Edema="-1.0"),
    chexpert_row(f"{PREFIX}/patient00001/study1/view2_lateral.jpg", "Lateral", Cardiomegaly="1.0"),
    chexpert_row(f"{PREFIX}/patient00002/study2/view1_frontal.jpg", No_Finding="1.0", Pleural_Effusion="0.0"),
    chexpert_row(
        f"{PREFIX}/patient00003/study1/view1_frontal.jpg", Pleural_Effusion="1.0", Atelectasis="-1.0"
    ),
]


@pytest.fixture
def chexpert(tmp_path: Path) -> Path:
    """The usual install: the CSV inside the release folder, Path relative to its parent."""
    return write_chexpert(tmp_path / "CheXpert-v1.0-small", CHEXPERT_ROWS, lambda rel: tmp_path / rel)


@pytest.mark.parametrize(("policy", "expected"), [("ones", 1.0), ("zeros", 0.0), ("ignore", math.nan)])
def test_chexpert_uncertainty_policies(chexpert: Path, policy: str, expected: float) -> None:
    data = load_chexpert(chexpert, uncertainty=policy)  # type: ignore[arg-type]
    edema = data.records[0].labels["Edema"]
    assert edema == expected or (math.isnan(expected) and math.isnan(edema))
    assert data.records[0].labels["Cardiomegaly"] == 1.0


def test_chexpert_blank_is_negative_and_patients_come_from_the_path(chexpert: Path) -> None:
    data = load_chexpert(chexpert)
    assert data.source == "chexpert" and data.labels == CHEXPERT_LABELS
    assert [r.patient_id for r in data.records] == ["patient00001", "patient00002", "patient00003"]
    assert data.records[0].labels["Pneumothorax"] == 0.0  # blank: not mentioned
    assert data.records[1].labels["No Finding"] == 1.0 and data.records[1].labels["Pleural Effusion"] == 0.0
    assert data.records[0].image == chexpert.parent / CHEXPERT_ROWS[0][0]


def test_chexpert_frontal_only(chexpert: Path) -> None:
    assert len(load_chexpert(chexpert)) == 3
    both = load_chexpert(chexpert, frontal_only=False)
    assert len(both) == 4 and both.records[1].image.name == "view2_lateral.jpg"


def test_chexpert_path_resolves_against_root_or_a_renamed_folder(tmp_path: Path) -> None:
    inside = tmp_path / "a"  # root/train.csv and root/CheXpert-v1.0-small/train/…
    write_chexpert(inside, CHEXPERT_ROWS, lambda rel: inside / rel)
    assert load_chexpert(inside).records[0].image == inside / CHEXPERT_ROWS[0][0]
    renamed = tmp_path / "chexpert"  # the release folder itself, renamed
    write_chexpert(renamed, CHEXPERT_ROWS, lambda rel: renamed.joinpath(*Path(rel).parts[1:]))
    data = load_chexpert(renamed)
    assert data.records[0].image == renamed / "train" / "patient00001" / "study1" / "view1_frontal.jpg"
    assert data.patients() == {"patient00001", "patient00002", "patient00003"}


def test_chexpert_bad_cell_and_missing_images(tmp_path: Path, chexpert: Path) -> None:
    bad = tmp_path / "bad"
    rows = [
        chexpert_row(f"{PREFIX}/patient00009/s/lat.jpg", "Lateral"),
        chexpert_row(f"{PREFIX}/patient00009/s/v.jpg", Edema="2"),
    ]
    write_chexpert(bad, rows, lambda rel: bad / rel)
    with pytest.raises(DatasetError, match=r"line 3, Edema: '2'"):  # the file's line, lateral rows counted
        load_chexpert(bad)
    with pytest.raises(DatasetError, match=r"valid\.csv"):
        load_chexpert(chexpert, split="valid")
    for row in CHEXPERT_ROWS:
        (chexpert.parent / row[0]).unlink()
    with pytest.raises(DatasetError, match="none of the 3 images"):
        load_chexpert(chexpert)


# --- feedback export -------------------------------------------------------------------------


def write_feedback(
    root: Path, labels: list[str], rows: list[tuple[str, str, list[str]]], images: set[str]
) -> Path:
    root.mkdir(parents=True)
    with (root / "feedback_labels.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["study_uid", "instance_uid", "reader", "reported_at", *labels])
        for study, instance, calls in rows:
            writer.writerow([study, instance, "dr-a", "2026-01-01T00:00:00Z", *calls])
    (root / "Data_Entry_2017.csv").write_text(NIH_HEADER + "\n")
    for i, instance in enumerate(sorted(images)):
        write_image(root / "images" / f"{instance}.png", seed=i)
    return root


def test_feedback_empty_cells_are_unknown_and_masked(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = write_feedback(
        tmp_path / "fb",
        ["Effusion", "Pneumothorax", "Pleural Thickening"],
        [
            ("1.2.3", "1.2.3.1", ["1", "", "0"]),
            ("1.2.3", "1.2.3.2", ["", "0", ""]),
            ("1.2.4", "1.2.4.1", ["0"] * 3),
        ],
        images={"1.2.3.1", "1.2.3.2"},
    )
    with caplog.at_level(logging.WARNING, logger="cxr_triage.train.datasets"):
        data = load_feedback(root)
    assert data.source == "feedback" and data.labels == ("Effusion", "Pneumothorax", "Pleural Thickening")
    assert len(data) == 2 and data.patients() == {"1.2.3"}  # patient = study
    assert "1 of 3" in caplog.text
    assert math.isnan(data.records[0].labels["Pneumothorax"])
    targets, mask = label_matrix(data, ["Effusion", "Pneumothorax", "Pleural_Thickening", "Hernia"])
    np.testing.assert_array_equal(targets, [[1, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(mask, [[True, False, True, False], [False, True, False, False]])
    assert load_dataset(root, "train").source == "feedback"  # detected before its Data_Entry_2017.csv


# --- detection, splits, label mapping --------------------------------------------------------


def test_load_dataset_detects_each_layout_and_maps_split_names(tmp_path: Path, chexpert: Path) -> None:
    nih = write_nih(tmp_path / "nih", NIH_ROWS, train_val=[r[0] for r in NIH_ROWS[:3]], test=[NIH_ROWS[3][0]])
    assert len(load_dataset(nih)) == 4
    assert len(load_dataset(nih, "train")) == 3 and len(load_dataset(nih, "train_val")) == 3
    assert len(load_dataset(nih, "test")) == 1
    assert load_dataset(chexpert, "train", uncertainty="zeros").records[0].labels["Edema"] == 0.0
    with pytest.raises(DatasetError, match="no split 'valid'"):
        load_dataset(nih, "valid")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"feedback_labels\.csv.*Data_Entry_2017\.csv.*train\.csv"):
        load_dataset(tmp_path / "empty")


def synthetic_set(patients: int, images: int = 3) -> LabeledSet:
    records = [
        Record(Path(f"/x/{p:04d}_{i}.png"), f"p{p}", {"Effusion": float(i % 2)})
        for p in range(patients)
        for i in range(1 + p % images)
    ]
    return LabeledSet("chestxray14", False, ("Effusion",), tuple(records))


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.5, 0.85])
def test_split_by_patient_never_shares_a_patient_and_is_deterministic(fraction: float) -> None:
    data = synthetic_set(97)
    for seed in range(5):
        train, val = split_by_patient(data, fraction, seed=seed)
        assert not train.patients() & val.patients()
        assert train.patients() | val.patients() == data.patients()
        assert len(train) + len(val) == len(data)
        assert len(val.patients()) == round(fraction * 97)
        for part in (train, val):  # every patient's images stay together
            for patient in part.patients():
                assert sum(r.patient_id == patient for r in part.records) == sum(
                    r.patient_id == patient for r in data.records
                )
        again = split_by_patient(data.subset(reversed(data.records)), fraction, seed=seed)
        assert again[1].patients() == val.patients()  # same split whatever the record order
        assert (train.source, train.labels, train.synthetic) == (data.source, data.labels, data.synthetic)
    assert (
        split_by_patient(data, fraction, 0)[1].patients() != split_by_patient(data, fraction, 1)[1].patients()
    )


def test_split_by_patient_edges() -> None:
    train, val = split_by_patient(synthetic_set(2), 0.1)
    assert len(train.patients()) == 1 and len(val.patients()) == 1
    assert len(split_by_patient(synthetic_set(5), 0.0)[1]) == 0
    with pytest.raises(ValueError):
        split_by_patient(synthetic_set(5), 1.0)


def test_label_matrix_aliases_and_masks(chexpert: Path) -> None:
    data = load_chexpert(chexpert, uncertainty="ignore")
    model = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Edema", "Pleural_Thickening"]
    targets, mask = label_matrix(data, model)
    assert targets.dtype == np.float32 and mask.dtype == bool and targets.shape == (3, 6)
    np.testing.assert_array_equal(targets[:, 2], [0, 0, 1])  # Effusion <- CheXpert "Pleural Effusion"
    assert mask[:, 2].all()
    assert not mask[:, 3].any() and not mask[:, 5].any()  # CheXpert has no Infiltration / Pleural_Thickening
    assert not mask[0, 4] and not mask[2, 0]  # uncertain + ignore = unknown
    np.testing.assert_array_equal(targets[:, 1], [1, 0, 0])
    nih = LabeledSet("chestxray14", False, NIH_LABELS, (Record(Path("a.png"), "1", {"Effusion": 1.0}),))
    targets, mask = label_matrix(nih, ["Pleural Effusion", "Pleural Thickening"])  # the reverse direction
    np.testing.assert_array_equal(targets, [[1, 0]])
    np.testing.assert_array_equal(mask, [[True, False]])  # Pleural_Thickening absent from the record's labels


# --- ImageDataset ----------------------------------------------------------------------------


def test_image_dataset_matches_the_server_preprocessing(tmp_path: Path) -> None:
    root = write_nih(tmp_path / "nih", NIH_ROWS)
    write_image(root / "images" / "00000002_000.png", seed=9, shape=(90, 60))  # letterboxed
    data = load_chestxray14(root)
    spec = InputSpec(size=32)
    ds = ImageDataset(data, NIH_LABELS, spec)
    assert len(ds) == 4
    for i, record in enumerate(data.records):
        x, target, mask = ds[i]
        served = to_batch([prepare(record.image.read_bytes(), "", spec, ImageLimits()).pixels], spec)[0]
        assert x.dtype == torch.float32 and tuple(x.shape) == (3, 32, 32)
        np.testing.assert_array_equal(x.numpy(), served)
        assert target.dtype == torch.float32 and mask.dtype == torch.bool and tuple(target.shape) == (14,)
        assert bool(mask.all())
    assert ds[0][1][NIH_LABELS.index("Cardiomegaly")] == 1.0
    cached = ds._cache[1]  # resized pixels, not normalised floats
    assert cached.shape == (32, 32) and cached.min() >= 0.0 and cached.max() <= 1.0


def test_image_dataset_reads_dicom_like_the_server(tmp_path: Path) -> None:
    path = tmp_path / "rg1.dcm"
    path.write_bytes(dicom_bytes("RG1_UNCR.dcm"))
    spec = InputSpec(size=48, channels=1, mean=(0.5,), std=(0.25,))
    data = LabeledSet("chestxray14", False, ("Effusion",), (Record(path, "1", {"Effusion": 0.0}),))
    x, _, _ = ImageDataset(data, ["Effusion"], spec, cache=False)[0]
    served = to_batch([prepare(path.read_bytes(), "application/dicom", spec, ImageLimits()).pixels], spec)[0]
    np.testing.assert_array_equal(x.numpy(), served)


def test_augment_changes_pixels_not_labels_and_is_seeded(tmp_path: Path) -> None:
    root = write_nih(tmp_path / "nih", NIH_ROWS)
    data = load_chestxray14(root)
    spec = InputSpec(size=32)
    plain = ImageDataset(data, NIH_LABELS, spec)
    aug = ImageDataset(data, NIH_LABELS, spec, augment=True, seed=1)
    x0, t0, m0 = plain[0]
    x1, t1, m1 = aug[0]
    assert not torch.equal(x0, x1)
    assert torch.equal(t0, t1) and torch.equal(m0, m1)
    assert torch.equal(aug[0][0], x1)  # same seed, epoch and index: same draw
    aug.set_epoch(1)
    assert not torch.equal(aug[0][0], x1)


def test_augment_never_flips_left_and_right() -> None:
    image = np.zeros((64, 64), dtype=np.float32)
    image[:, :24] = 1.0  # the left third bright
    for seed in range(30):
        out = augment_pixels(image, np.random.default_rng(seed))
        assert out.shape == (64, 64) and out.dtype == np.float32
        assert out[:, :20].mean() > 0.6 and out[:, 40:].mean() < 0.1
        assert np.abs(out - image).mean() > 0.0


def test_image_dataset_names_a_file_it_cannot_decode(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    data = LabeledSet("feedback", False, ("Effusion",), (Record(bad, "s", {"Effusion": 1.0}),))
    with pytest.raises(DatasetError, match=r"bad\.png"):
        ImageDataset(data, ["Effusion"], InputSpec(size=32))[0]
