"""The exporter and the CLI, end to end: ONNX vs PyTorch parity, versions, provenance, refusals."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cxr_triage.engines import OnnxEngine
from cxr_triage.errors import ExportError
from cxr_triage.repository import ModelRepository
from cxr_triage.train.export import export_model, read_config
from cxr_triage.train.models import WithSigmoid, build_backbone
from cxr_triage.train.torch_eager import TorchEagerEngine
from tests.helpers import make_tiny_repo


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cxr_triage", *args], capture_output=True, text=True, timeout=600, cwd=cwd
    )


def test_untrained_export_records_provenance_and_parity(exported_repo: Path) -> None:
    meta = json.loads((exported_repo / "densenet121-nih14" / "1" / "metadata.json").read_text())
    assert meta["weights"] == "untrained" and meta["data"] is None
    assert meta["parity"]["max_abs_diff"] <= meta["parity"]["tolerance"] == 1e-4
    assert meta["labels"][0] == "Atelectasis" and meta["engine"]["sha256"]
    assert meta["created"] and "source_commit" in meta


def test_imported_weights_are_what_the_engine_computes(tmp_path: Path) -> None:
    repo = make_tiny_repo(tmp_path / "model_repo")
    config = read_config(repo, "densenet121-nih14")
    torch.manual_seed(7)
    model = WithSigmoid(build_backbone(config)).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    torch.save({"state_dict": model.backbone.state_dict()}, tmp_path / "weights.pt")
    result = cli("export", "densenet121-nih14", "--weights", str(tmp_path / "weights.pt"),
                 "--data", "unit-test fixture", "--model-repo", str(repo))  # fmt: skip
    assert result.returncode == 0, result.stderr
    version = ModelRepository.load(repo).get(None).latest
    assert version is not None and version.metadata.weights == "imported"
    x = np.random.default_rng(1).standard_normal((2, 3, 64, 64), dtype=np.float32)
    expected = TorchEagerEngine(model).run(x)
    np.testing.assert_allclose(OnnxEngine(version.engine_path, "cpu").run(x), expected, atol=1e-4)


def test_weights_that_do_not_fit_are_refused_and_nothing_is_registered(tmp_path: Path) -> None:
    repo = make_tiny_repo(tmp_path / "model_repo")
    torch.save({"classifier.weight": torch.zeros(3, 3)}, tmp_path / "wrong.pt")
    with pytest.raises(ExportError, match="does not fit"):
        export_model(repo, "densenet121-nih14", tmp_path / "wrong.pt")
    assert [p.name for p in (repo / "densenet121-nih14").iterdir()] == ["config.yaml"]


def test_vit_exports_through_the_same_path_and_versions_count_up(tmp_path: Path) -> None:
    repo = make_tiny_repo(tmp_path / "model_repo")
    first = export_model(repo, "vit-b16-nih14")
    second = export_model(repo, "vit-b16-nih14")
    assert (first.version, second.version) == ("1", "2")
    assert first.max_abs_diff <= 1e-4
    entry = ModelRepository.load(repo).get("vit-b16-nih14")
    assert sorted(entry.versions) == ["1", "2"] and entry.latest is not None and entry.latest.version == "2"


def test_serve_refuses_a_broken_repository_with_what_to_fix(tmp_path: Path) -> None:
    repo = make_tiny_repo(tmp_path / "model_repo")
    (repo / "densenet121-nih14" / "7").mkdir()
    result = cli("serve", "--model-repo", str(repo), "--port", "18999")
    assert result.returncode == 2
    assert "invalid_model_repository" in result.stderr and "missing metadata.json" in result.stderr


def test_serve_refuses_a_repository_without_an_engine(tmp_path: Path) -> None:
    repo = make_tiny_repo(tmp_path / "model_repo")
    result = cli("serve", "--model-repo", str(repo), "--port", "18998")
    assert result.returncode == 2 and "cxr-triage export densenet121-nih14" in result.stderr


def test_check_repo_reports_versions(exported_repo: Path) -> None:
    result = cli("check-repo", "--model-repo", str(exported_repo))
    assert result.returncode == 0, result.stderr
    assert "densenet121-nih14: serves version 1 (untrained)" in result.stderr


def test_densenet_engine_gives_class_activation_maps_that_explain_its_scores(exported_repo: Path) -> None:
    version = ModelRepository.load(exported_repo).get("densenet121-nih14").latest
    assert version is not None and version.metadata.engine.heatmap_output == "cam"
    x = np.random.default_rng(3).standard_normal((2, 3, 64, 64), dtype=np.float32)
    probs, cam = OnnxEngine(version.engine_path, "cpu").run_with_heatmaps(x)
    assert cam is not None and cam.shape[:2] == (2, 14) and cam.ndim == 4
    # Global average pooling then a linear head: the map's mean is the logit of the probability.
    np.testing.assert_allclose(cam.mean(axis=(2, 3)), np.log(probs / (1 - probs)), atol=1e-3)
