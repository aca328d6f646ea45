"""The trainer end to end on SYNTHETIC phantoms: it learns, counts epochs exactly, resumes,
registers versions with their own operating points, gates promotion and retrains from feedback.

Everything runs on the CPU at 64 px so the module stays within a few minutes on 2 cores.
"""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from cxr_triage.repository import ModelRepository, read_serving_state
from cxr_triage.train.config import TrainConfig
from cxr_triage.train.datasets import load_chestxray14
from cxr_triage.train.export import WEIGHTS_FILE, export_model, read_config
from cxr_triage.train.promote import PromotionRefused, promote, rollback
from cxr_triage.train.registry import register_run
from cxr_triage.train.retrain import retrain
from cxr_triage.train.scoring import score_version
from cxr_triage.train.synthetic import generate
from cxr_triage.train.trainer import TrainingError, _check_gradients, _check_loss, masked_bce, train
from tests.helpers import make_tiny_repo

MODEL = "densenet121-nih14"
CLI = [sys.executable, "-m", "cxr_triage"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic")
    generate(root, patients=500, size=96, seed=0)
    return root


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("small")
    generate(root, patients=30, size=64, seed=1)
    return root


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = make_tiny_repo(tmp_path_factory.mktemp("repo"), size=64)
    config_path = repo / MODEL / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["promotion"] = {"tolerance": 0.03, "per_label_tolerance": 0.1}
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    export_model(repo, MODEL)  # version 1: untrained, served until something better is promoted
    return repo


@pytest.fixture(scope="module")
def trained(repo: Path, synthetic: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The proof that the loop learns: a few CPU minutes of DenseNet-121 on the phantoms."""
    # Augmentation off: the phantoms vary enough, and the proof must fit in a few CPU minutes.
    cfg = TrainConfig(model=MODEL, data=(str(synthetic),), epochs=7, lr=3e-3, augment=False, seed=0)
    run = tmp_path_factory.mktemp("runs") / "learn"
    train(cfg, read_config(repo, MODEL), run, progress=False)
    return run, register_run(run, repo).version


def _test_auroc(repo: Path, version: str, data_root: Path) -> float:
    from cxr_triage.train.evaluate import evaluate

    config = read_config(repo, MODEL)
    entry = ModelRepository.load(repo, check_engines=False).get(MODEL).versions[version]
    held_out = load_chestxray14(data_root, "test")
    scored = score_version(entry, config, held_out)
    report = evaluate(
        scored.targets, scored.mask, scored.scores, config.labels, config.thresholds, bootstrap=0
    )
    assert report.mean_auroc is not None
    return report.mean_auroc


def test_training_learns_the_synthetic_findings(
    repo: Path, synthetic: Path, trained: tuple[Path, str]
) -> None:
    run, version = trained
    assert _test_auroc(repo, version, synthetic) >= 0.9  # held-out patients, the served ONNX engine
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5, 6, 7]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert TrainConfig.read(run / "config.yaml").epochs == 7
    assert json.loads((run / "data.json").read_text())["synthetic"] is True


def test_registered_version_says_trained_synthetic_with_its_own_operating_points(
    repo: Path, trained: tuple[Path, str]
) -> None:
    _, version = trained
    entry = ModelRepository.load(repo).get(MODEL)
    meta = entry.versions[version].metadata
    assert meta.weights == "trained"
    assert meta.data is not None and meta.data.startswith("synthetic")
    assert meta.metrics["mean_auroc"] > 0.8
    assert meta.thresholds and set(meta.thresholds) <= set(entry.config.labels)
    for label, point in meta.operating_points.items():
        assert point["sensitivity"] >= point["target_sensitivity"] == 0.95
        assert 0 < meta.thresholds[label] < 1
    assert meta.parity["max_abs_diff"] <= 1e-4
    assert (entry.versions[version].path / WEIGHTS_FILE).is_file()
    # registering did not promote: version 1 still serves until the gate says otherwise
    state = read_serving_state(repo / MODEL)
    assert state is not None and state.default_version == "1"


def test_gate_promotes_better_refuses_worse_and_rollback_restores(
    repo: Path, synthetic: Path, trained: tuple[Path, str]
) -> None:
    _, version = trained
    held_out = load_chestxray14(synthetic, "test")
    gate = promote(repo, MODEL, version, held_out, "test")
    assert gate.passed and gate.current == "1"
    assert gate.candidate_mean_auroc is not None and gate.current_mean_auroc is not None
    assert gate.candidate_mean_auroc > gate.current_mean_auroc
    state = read_serving_state(repo / MODEL)
    assert state is not None and state.default_version == version and state.history[-1]["passed"]

    worse = export_model(repo, MODEL).version  # untrained candidate
    with pytest.raises(PromotionRefused, match="mean AUROC fell"):
        promote(repo, MODEL, worse, held_out, "test")
    after = read_serving_state(repo / MODEL)
    assert after is not None and after.default_version == version  # unchanged

    assert rollback(repo, MODEL, "1").default_version == "1"
    assert rollback(repo, MODEL, version).default_version == version


def _feedback_export(src: Path, dest: Path, labels: tuple[str, ...], patients: int) -> Path:
    """Radiologists' reads in the service's feedback-export layout, from phantoms of train_val."""
    data = load_chestxray14(src, "train_val")
    chosen = sorted(data.patients())[:patients]
    (dest / "images").mkdir(parents=True)
    rows = []
    for i, record in enumerate(r for r in data.records if r.patient_id in chosen):
        instance = f"1.2.826.0.1.3680043.8.498.{i + 1}"
        (dest / "images" / f"{instance}.png").write_bytes(record.image.read_bytes())
        calls = [
            "" if i % 7 == 0 and lbl == "Nodule" else str(int(record.labels.get(lbl, 0.0))) for lbl in labels
        ]
        rows.append([f"1.2.3.{record.patient_id}", instance, "reader-1", "2026-11-23T00:00:00Z", *calls])
    with (dest / "feedback_labels.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["study_uid", "instance_uid", "reader", "reported_at", *labels])
        writer.writerows(rows)
    return dest


def test_retrain_from_feedback_fine_tunes_registers_and_promotes(
    repo: Path, synthetic: Path, trained: tuple[Path, str], tmp_path: Path
) -> None:
    _, version = trained
    rollback(repo, MODEL, version)  # the trained version serves; retraining starts from it
    labels = read_config(repo, MODEL).labels
    feedback = _feedback_export(synthetic, tmp_path / "feedback", labels, patients=60)
    outcome = retrain(
        repo, feedback, holdout=synthetic, epochs=1, lr=1e-4, run_dir=tmp_path / "run", progress=False
    )
    assert outcome.base_version == version
    assert outcome.gate.current == version and outcome.gate.candidate == outcome.candidate
    assert outcome.promoted, outcome.summary()
    state = read_serving_state(repo / MODEL)
    assert state is not None and state.default_version == outcome.candidate
    meta = ModelRepository.load(repo).get(MODEL).versions[outcome.candidate].metadata
    assert meta.weights == "trained" and meta.training["data"]["sources"] == ["feedback"]  # type: ignore[attr-defined]


def test_cli_runs_exactly_the_epochs_asked_and_resumes(repo: Path, small: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    base = [*CLI, "train", MODEL, "--data", str(small), "--model-repo", str(repo), "--run-dir", str(run)]
    done = subprocess.run(
        [*base, "--epochs", "1", "--no-progress"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1]
    assert torch.load(run / "last.pt", weights_only=False)["epoch"] == 1

    done = subprocess.run(
        [*base, "--epochs", "2", "--resume", "--no-progress"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    epochs = [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]

    done = subprocess.run(
        [*base, "--epochs", "3", "--resume", "--lr", "0.5", "--no-progress"], capture_output=True, text=True
    )
    assert done.returncode == 2 and "only --epochs may change" in done.stderr


def test_gradient_accumulation_steps_the_optimizer_once_per_group(
    repo: Path, small: Path, tmp_path: Path
) -> None:
    cfg = TrainConfig(model=MODEL, data=(str(small),), epochs=1, batch_size=4, accumulate=3, augment=False)
    train(cfg, read_config(repo, MODEL), tmp_path, progress=False)
    state = torch.load(tmp_path / "last.pt", weights_only=False)
    data = json.loads((tmp_path / "data.json").read_text())
    micro = -(-data["train"]["images"] // 4)
    assert state["schedule"]["_step_count"] - 1 == -(-micro // 3)


def test_vit_b16_trains_one_epoch(repo: Path, small: Path, tmp_path: Path) -> None:
    config_path = repo / "vit-b16-nih14" / "config.yaml"
    config = yaml.safe_load(config_path.read_text())
    config.pop("architecture_kwargs", None)  # the real ViT-B/16, at 32 px so it is quick on a CPU
    config["input"]["size"] = 32
    vit_repo = tmp_path / "repo"
    (vit_repo / "vit-b16-nih14").mkdir(parents=True)
    (vit_repo / "vit-b16-nih14" / "config.yaml").write_text(yaml.safe_dump(config))
    cfg = TrainConfig(model="vit-b16-nih14", data=(str(small),), epochs=1, batch_size=8)
    result = train(cfg, read_config(vit_repo, "vit-b16-nih14"), tmp_path / "run", progress=False)
    assert result.epochs_run == 1
    assert sum(p.numel() for p in torch.load(tmp_path / "run" / "best.pt")["model"].values()) > 80e6


def test_a_zero_loss_stops_the_run() -> None:
    logits, target = torch.zeros(2, 3), torch.ones(2, 3)
    zero = masked_bce(logits, target, torch.zeros(2, 3, dtype=torch.bool))  # everything masked
    with pytest.raises(TrainingError, match="zero loss trains nothing"):
        _check_loss(zero, 1, 0)
    with pytest.raises(TrainingError, match="nan"):
        _check_loss(torch.tensor(float("nan")), 1, 0)


def test_a_detached_branch_is_caught_on_the_first_step() -> None:
    class Detached(nn.Module):  # the CXR-ML-GZSL bug: an input detached before the loss
        def __init__(self) -> None:
            super().__init__()
            self.encoder, self.projection = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.projection(self.encoder(x).detach())

    model = Detached()
    masked_bce(model(torch.randn(5, 4)), torch.ones(5, 3), torch.ones(5, 3, dtype=torch.bool)).backward()
    with pytest.raises(TrainingError, match=r"received no gradient, e.g. \['encoder.weight'"):
        _check_gradients(model)


def test_masked_cells_do_not_train() -> None:
    logits = torch.zeros(1, 2, requires_grad=True)
    loss = masked_bce(logits, torch.tensor([[1.0, 0.0]]), torch.tensor([[True, False]]))
    loss.backward()
    assert logits.grad is not None
    assert logits.grad[0, 1] == 0 and logits.grad[0, 0] != 0
    np.testing.assert_allclose(loss.item(), np.log(2), rtol=1e-6)
