"""The model_repo/ contract: the shipped configs are valid; each kind of breakage is named with a fix."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from cxr_triage.errors import ModelNotFound, RepositoryError
from cxr_triage.repository import ModelRepository
from tests.helpers import MODEL_REPO, make_tiny_repo

NIH14 = [
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
]  # fmt: skip


def test_shipped_configs_are_valid_with_the_nih14_labels_in_order() -> None:
    repo = ModelRepository.load(MODEL_REPO, check_engines=False)
    assert repo.default_model == "densenet121-nih14"
    for name in ("densenet121-nih14", "vit-b16-nih14"):
        config = repo.get(name).config
        assert list(config.labels) == NIH14
        assert set(config.critical_findings) <= set(NIH14)
        assert config.input.channels == 3 and config.input.size == 224


def edit_config(repo: Path, folder: str, **changes: object) -> None:
    path = repo / folder / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config.update(changes)
    path.write_text(yaml.safe_dump(config))


def problems(repo: Path) -> str:
    with pytest.raises(RepositoryError) as info:
        ModelRepository.load(repo)
    return info.value.message


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return make_tiny_repo(tmp_path / "model_repo")


def test_folder_and_name_must_match(repo: Path) -> None:
    edit_config(repo, "vit-b16-nih14", name="vit-other")
    assert "must equal the folder name" in problems(repo)


def test_every_label_needs_a_threshold(repo: Path) -> None:
    config = yaml.safe_load((repo / "densenet121-nih14" / "config.yaml").read_text())
    del config["thresholds"]["Hernia"]
    edit_config(repo, "densenet121-nih14", thresholds=config["thresholds"])
    assert "missing ['Hernia']" in problems(repo)


def test_duplicate_labels_and_unknown_critical_findings(repo: Path) -> None:
    edit_config(repo, "densenet121-nih14", labels=[*NIH14[:-1], "Mass"])
    edit_config(repo, "vit-b16-nih14", critical_findings=["Pneumothorax", "Tumour"])
    message = problems(repo)
    assert "repeated: ['Mass']" in message and "unknown ['Tumour']" in message


def test_two_defaults_are_refused(repo: Path) -> None:
    edit_config(repo, "vit-b16-nih14", default=True)
    assert "keep exactly one" in problems(repo)


def test_version_folders_are_numbers_with_metadata(repo: Path) -> None:
    (repo / "densenet121-nih14" / "latest").mkdir()
    (repo / "densenet121-nih14" / "3").mkdir()
    message = problems(repo)
    assert "version folders are positive integers" in message
    assert "missing metadata.json" in message and "cxr-triage export densenet121-nih14" in message


def test_unknown_model_is_404(repo: Path) -> None:
    with pytest.raises(ModelNotFound):
        ModelRepository.load(repo).get("resnet-nothing")


def test_exported_version_validates(exported_repo: Path) -> None:
    repo = ModelRepository.load(exported_repo)
    latest = repo.get(None).latest
    assert latest is not None and latest.metadata.weights == "untrained"


def test_label_drift_and_wrong_output_width_are_caught(exported_repo: Path, tmp_path: Path) -> None:
    repo = Path(shutil.copytree(exported_repo, tmp_path / "model_repo"))
    edit_config(repo, "densenet121-nih14", labels=NIH14[:-1], thresholds={k: 0.5 for k in NIH14[:-1]})
    message = problems(repo)
    assert "exported with labels" in message and "output must be (batch, 13)" in message


def test_corrupt_engine_and_bad_metadata_are_caught(exported_repo: Path, tmp_path: Path) -> None:
    repo = Path(shutil.copytree(exported_repo, tmp_path / "model_repo"))
    version = repo / "densenet121-nih14" / "1"
    (version / "model.onnx").write_bytes(b"not an onnx file at all")
    meta = json.loads((version / "metadata.json").read_text())
    shutil.copytree(version, repo / "densenet121-nih14" / "2")
    meta["weights"] = "pretrained-ish"
    (repo / "densenet121-nih14" / "2" / "metadata.json").write_text(json.dumps(meta))
    message = problems(repo)
    assert "not a readable ONNX file" in message
    assert "2/metadata.json: weights" in message


def test_untrained_and_synthetic_versions_say_not_for_clinical_use() -> None:
    from cxr_triage.schemas import SYNTHETIC_WARNING, UNTRAINED_WARNING, provenance_warning

    assert provenance_warning("untrained", None) == UNTRAINED_WARNING
    assert (
        provenance_warning("trained", "synthetic (not clinical): training split, 10 images")
        == SYNTHETIC_WARNING
    )
    assert provenance_warning("trained", "chestxray14: training split, 86524 images") is None
    assert "not for clinical use" in SYNTHETIC_WARNING
