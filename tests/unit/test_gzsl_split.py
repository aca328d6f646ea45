"""Seen / unseen protocol and the compositional phantoms it is tested on."""

import json
from pathlib import Path

import numpy as np
import pytest

from cxr_triage.train.datasets import NIH_LABELS, DatasetError, label_matrix
from cxr_triage.train.gzsl.split import (
    LABELS_FILE,
    PAPER_UNSEEN,
    LabelSplit,
    drop_unseen,
    label_split_for,
    load_split,
    with_positive,
)
from cxr_triage.train.gzsl.synthetic import FINDINGS, SIDES, TYPES, UNSEEN, ZONES, generate, render
from cxr_triage.train.synthetic import generate as generate_nih


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gzsl")
    generate(root, patients=120, size=48, prevalence=0.15, seed=3)
    return root


def test_paper_split_is_the_default_for_chestxray14(tmp_path: Path) -> None:
    split = label_split_for(tmp_path)
    assert split.labels == NIH_LABELS
    assert set(split.unseen) == {"Edema", "Pneumonia", "Emphysema", "Fibrosis"} == set(PAPER_UNSEEN)
    assert len(split.seen) == 10 and not set(split.seen) & set(split.unseen)
    with pytest.raises(DatasetError):
        LabelSplit(("a", "b"), ("c",))
    with pytest.raises(DatasetError):
        LabelSplit(("a", "b"), ("a", "b"))


def test_training_never_holds_an_unseen_finding_and_test_keeps_everything(phantoms: Path) -> None:
    split = label_split_for(phantoms)
    assert split.labels == FINDINGS and split.unseen == UNSEEN
    train, test = load_split(phantoms, "train"), load_split(phantoms, "test")
    assert train.synthetic and test.synthetic
    assert not train.patients() & test.patients()
    kept = drop_unseen(train, split.unseen)
    y, m = label_matrix(kept, list(split.unseen))
    assert m.all() and y.sum() == 0
    y_all, _ = label_matrix(train, list(split.unseen))
    assert len(train) - len(kept) == int((y_all.sum(axis=1) > 0).sum()) > 0
    y_test, _ = label_matrix(test, list(split.unseen))
    assert y_test.sum() > 0  # the test split keeps images carrying unseen findings
    positive = with_positive(kept, split.seen)
    y_seen, _ = label_matrix(positive, list(split.seen))
    assert (y_seen.sum(axis=1) > 0).all()


def test_chestxray14_layout_is_read_with_the_official_lists(tmp_path: Path) -> None:
    generate_nih(tmp_path, patients=12, size=32, prevalence=0.4, seed=0)
    train, test = load_split(tmp_path, "train"), load_split(tmp_path, "test")
    names = {Path(r.image).name for r in train}
    assert names == set((tmp_path / "train_val_list.txt").read_text().split())
    assert len(test) > 0
    dropped = drop_unseen(train, PAPER_UNSEEN)
    y, _ = label_matrix(dropped, list(PAPER_UNSEEN))
    assert y.sum() == 0
    with pytest.raises(DatasetError):
        load_split(tmp_path / "nothing", "train")


def test_every_unseen_finding_shares_its_type_and_its_place_with_seen_ones() -> None:
    seen = [f for f in FINDINGS if f not in UNSEEN]
    assert len(FINDINGS) == len(TYPES) * len(SIDES) * len(ZONES) == 16 and len(UNSEEN) == 4
    for finding in UNSEEN:
        side, zone, kind = finding.split(" ", 2)
        assert sum(f.endswith(kind) for f in seen) == 3
        assert sum(f.startswith(f"{side} {zone} ") for f in seen) == 3


def test_a_finding_changes_only_its_own_side(phantoms: Path) -> None:
    base = render([], size=64, patient=5, seed=1)
    for finding in ("right upper nodule", "left lower cavity"):
        diff = np.abs(render([finding], size=64, patient=5, seed=1) - base)
        left, right = diff[:, :32].sum(), diff[:, 32:].sum()
        # the patient's right is the image's left on a PA film
        assert (left > 5 * right) if finding.startswith("right") else (right > 5 * left)
        rows = np.nonzero(diff.sum(axis=1) > 0.05)[0]
        centre = rows.mean() / 64
        assert (centre < 0.4) if " upper " in finding else (centre > 0.38)
    with pytest.raises(ValueError):
        render(["middle upper nodule"])
    spec = json.loads((phantoms / LABELS_FILE).read_text())
    assert spec["unseen"] == list(UNSEEN) and set(spec["descriptions"]) == set(FINDINGS)


def test_generate_refuses_to_overwrite_other_data(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("x")
    with pytest.raises(DatasetError):
        generate(tmp_path, patients=4)
