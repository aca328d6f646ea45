"""Synthetic phantoms: the ChestX-ray14 layout, the marker, patient splits, determinism, visible findings."""

import csv
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from cxr_triage.feedback.export import ENTRY_COLUMNS
from cxr_triage.imaging import resize_for_model
from cxr_triage.repository.models import InputSpec
from cxr_triage.train.datasets import NIH_LABELS, DatasetError, load_chestxray14, split_by_patient
from cxr_triage.train.synthetic import MARKER_TITLE, SYNTHETIC_FINDINGS, generate, render_phantom

NIH_COLUMNS = ENTRY_COLUMNS  # the ChestX-ray14 header, one definition


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    root = tmp_path_factory.mktemp("phantoms") / "set"
    return root, generate(root, patients=40, size=96, prevalence=0.3, seed=7)


def test_layout_is_chestxray14_and_marked_synthetic(phantoms: tuple[Path, dict[str, Any]]) -> None:
    root, summary = phantoms
    data = load_chestxray14(root)
    assert data.synthetic and data.source == "chestxray14" and len(data) == summary["images"]
    marker = (root / "SYNTHETIC.txt").read_text()
    assert marker.startswith(MARKER_TITLE)
    assert "SYNTHETIC PHANTOMS" in marker and "not clinical data, not for any diagnostic use" in marker
    assert all(name in marker for name in SYNTHETIC_FINDINGS) and "Hernia" in marker  # drawn / never drawn
    with (root / "Data_Entry_2017.csv").open(newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == NIH_COLUMNS
    for row in rows[1:]:
        assert len(row) == 11 and all(cell != "" for cell in row)
        match = re.fullmatch(r"(\d{8})_(\d{3})\.png", row[0])
        assert match and int(match[1]) == int(row[3]) and int(match[2]) == int(row[2])
        assert row[5] in ("M", "F") and row[6] in ("PA", "AP") and 18 <= int(row[4]) < 100
    img = Image.open(data.records[0].image)
    assert img.mode == "L" and img.size == (96, 96)


def test_official_lists_split_by_patient(phantoms: tuple[Path, dict[str, Any]]) -> None:
    root, summary = phantoms
    train_val, test = load_chestxray14(root, "train_val"), load_chestxray14(root, "test")
    assert not train_val.patients() & test.patients()
    assert len(train_val) + len(test) == summary["images"] and len(test.patients()) == 8
    assert len(train_val.patients() | test.patients()) == 40
    for seed in range(3):  # and the trainer's own validation split of train_val
        fit, val = split_by_patient(train_val, 0.25, seed)
        assert not fit.patients() & val.patients() and not val.patients() & test.patients()


def test_prevalence_is_roughly_as_asked_and_other_labels_are_never_drawn(tmp_path: Path) -> None:
    summary = generate(
        tmp_path / "p", patients=300, images_per_patient=(2, 2), size=32, prevalence=0.2, seed=1
    )
    assert summary["images"] == 600
    data = load_chestxray14(tmp_path / "p")
    for label in NIH_LABELS:
        rate = np.mean([r.labels[label] for r in data.records])
        if label in SYNTHETIC_FINDINGS:
            assert 0.15 < rate < 0.25, (label, rate)
            assert summary["positives"][label] == round(rate * 600)
        else:
            assert rate == 0.0


def test_generation_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    def files(root: Path) -> dict[str, bytes]:
        return {
            p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
        }

    a, b, c = (tmp_path / n for n in "abc")
    generate(a, patients=6, size=64, seed=3)
    generate(b, patients=6, size=64, seed=3)
    generate(c, patients=6, size=64, seed=4)
    assert files(a) == files(b)
    assert files(a)["images/00000001_000.png"] != files(c)["images/00000001_000.png"]
    np.testing.assert_array_equal(
        render_phantom(["Mass"], 64, 2, 1, 5).image, render_phantom(["Mass"], 64, 2, 1, 5).image
    )


@pytest.mark.parametrize("finding", SYNTHETIC_FINDINGS)
def test_each_finding_changes_its_region_visibly_at_64_pixels(finding: str) -> None:
    """Same anatomy, pose and noise with and without the finding; compared after resizing to 64 px."""
    spec = InputSpec(size=64)
    for patient in range(6):
        pos = render_phantom([finding], 256, patient=patient, image=1, seed=11)
        neg = render_phantom([], 256, patient=patient, image=1, seed=11)
        region = resize_for_model(pos.regions[finding].astype(np.float32), spec) > 0.5
        assert region.sum() >= 3
        change = (
            resize_for_model(pos.image, spec)[region].mean()
            - resize_for_model(neg.image, spec)[region].mean()
        )
        if finding == "Pneumothorax":  # darker: air without lung markings
            assert change < -0.04, (patient, change)
        else:
            assert change > 0.1, (patient, change)
        assert np.abs(pos.image - neg.image)[230:].max() < 1e-6  # below the lungs: nothing else moved
        if finding not in ("Edema", "Effusion"):  # a haze with long tails; fluid partly behind the heart
            assert np.abs(pos.image - neg.image)[~_dilate(pos.regions[finding], 40)].max() < 1e-6  # local


def _dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    """The mask grown by ``pixels`` (a square), without scipy."""
    out = mask.copy()
    ys, xs = np.nonzero(mask)
    out[
        max(0, ys.min() - pixels) : ys.max() + pixels + 1, max(0, xs.min() - pixels) : xs.max() + pixels + 1
    ] = True
    return out


def test_cardiothoracic_ratio_separates_cardiomegaly() -> None:
    for patient in range(10):
        assert render_phantom(["Cardiomegaly"], 64, patient=patient).ctr > 0.55
        assert 0.38 < render_phantom([], 64, patient=patient).ctr < 0.47


def test_nodule_and_mass_sizes() -> None:
    for patient in range(6):
        for name, lo, hi in (("Nodule", 0.055, 0.085), ("Mass", 0.11, 0.2)):
            region = render_phantom([name], 256, patient=patient).regions[name]
            cols = np.nonzero(region.any(axis=0))[0]
            assert lo < (cols.max() - cols.min() + 1) / 256 < hi, (name, patient)


def test_bad_arguments_and_real_data_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Hernia"):
        render_phantom(["Hernia"])
    with pytest.raises(ValueError):
        generate(tmp_path / "x", patients=0)
    real = tmp_path / "real"
    real.mkdir()
    (real / "Data_Entry_2017.csv").write_text("Image Index\n")
    with pytest.raises(DatasetError, match="refusing"):
        generate(real, patients=2)
