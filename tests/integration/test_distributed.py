"""Data-parallel training through the real CLI: torchrun, 2 CPU processes on gloo.

Tolerance for the loss curve, stated: each epoch's mean training loss of the 2-process run is
within 25% of the 1-process run with the same global batch. They cannot be equal: each rank's
BatchNorm sees half the batch, and the distributed sampler deals the images in another order.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cxr_triage.train.synthetic import generate
from tests.helpers import make_tiny_repo

MODEL = "densenet121-nih14"
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without distributed")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ddp")
    generate(root / "data", patients=30, size=64, seed=1)
    return make_tiny_repo(root / "repo", size=64), root / "data"


def _train(repo: Path, data: Path, run: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "cxr_triage", "train", MODEL, "--data", str(data)]
    command += ["--model-repo", str(repo), "--batch-size", "8", "--no-augment", "--no-progress"]
    command += ["--run-dir", str(run), *extra]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["train_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_keep_identical_parameters_and_follow_the_one_process_curve(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    repo, data = setup
    _train(repo, data, tmp_path / "one", "--epochs", "2")
    _train(repo, data, tmp_path / "two", "--epochs", "2", "--nproc-per-node", "2")
    summary = json.loads((tmp_path / "two" / "run.json").read_text())
    assert summary["processes"] == 2
    first, second = summary["parameter_sha256_per_rank"]
    assert first == second  # the trainer also refuses to finish if they differ
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 2
    for a, b in zip(one, two, strict=True):
        assert abs(a - b) <= 0.25 * a, (one, two)
    assert two[1] < two[0]
    # only rank 0 wrote: one metrics line per epoch, not one per rank
    assert [
        json.loads(x)["processes"] for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    ] == [2, 2]


def test_resume_with_a_different_number_of_processes(setup: tuple[Path, Path], tmp_path: Path) -> None:
    repo, data = setup
    run = tmp_path / "run"
    _train(repo, data, run, "--epochs", "1", "--nproc-per-node", "2")
    _train(repo, data, run, "--epochs", "2", "--resume")  # one process takes over after epoch 1
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["processes"]) for r in rows] == [(1, 2), (2, 1)]
