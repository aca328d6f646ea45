"""Experiments and versions in MLflow: a real `mlflow server` on 127.0.0.1, started by the test.

train -> MLflow run (params, per-epoch metrics, run files); register -> registry version tagged
with the model_repo version, run id in metadata.json; promote -> `champion` alias, canary ->
`challenger`, in step with serving.json. And the default with no server: a sqlite store beside
the runs.
"""

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from cxr_triage.repository import ModelRepository, read_serving_state
from cxr_triage.train.config import TrainConfig
from cxr_triage.train.datasets import load_chestxray14
from cxr_triage.train.export import export_model, read_config
from cxr_triage.train.promote import promote
from cxr_triage.train.registry import register_run
from cxr_triage.train.synthetic import generate
from cxr_triage.train.trainer import train
from tests.helpers import free_port, make_tiny_repo

mlflow = pytest.importorskip("mlflow")
MODEL = "densenet121-nih14"


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    executable = shutil.which("mlflow", path=str(Path(sys.executable).parent))
    if executable is None:
        pytest.fail("the mlflow CLI is not installed in this environment")
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    command = [executable, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    command += ["--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"]
    command += ["--artifacts-destination", str(root / "artifacts")]
    log = (root / "server.log").open("w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert process.poll() is None, (root / "server.log").read_text()[-2000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("mlflow server did not become ready in 90 s")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("mlflow-loop")
    generate(root / "data", patients=30, size=64, seed=2)
    repo = make_tiny_repo(root / "repo", size=64)
    config = yaml.safe_load((repo / MODEL / "config.yaml").read_text())
    config["promotion"] = {"tolerance": 0.5, "per_label_tolerance": None}  # one-epoch models: any will do
    (repo / MODEL / "config.yaml").write_text(yaml.safe_dump(config))
    export_model(repo, MODEL)  # untrained version 1 serves first
    return repo, root / "data"


def _train_and_register(repo: Path, data: Path, run: Path, seed: int) -> str:
    cfg = TrainConfig(model=MODEL, data=(str(data),), epochs=2, batch_size=8, augment=False, seed=seed)
    train(cfg, read_config(repo, MODEL), run, progress=False)
    return register_run(run, repo).version


def test_runs_versions_and_aliases_follow_model_repo(
    mlflow_server: str, setup: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CXR_MLFLOW_TRACKING_URI", mlflow_server)
    repo, data = setup
    client = mlflow.MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    held_out = load_chestxray14(data, "test")

    first = _train_and_register(repo, data, tmp_path / "run-a", seed=0)
    meta = ModelRepository.load(repo).get(MODEL).versions[first].metadata
    record = meta.mlflow  # type: ignore[attr-defined]
    run = client.get_run(record["run_id"])
    assert record["tracking_uri"] == mlflow_server
    assert (
        run.data.params["config_hash"] == TrainConfig.read(tmp_path / "run-a" / "config.yaml").config_hash()
    )
    assert run.data.params["epochs"] == "2"
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2]
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "data.json", "metrics.jsonl", "run.json", "model"} <= files
    assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/model.onnx"]
    (registered,) = client.search_model_versions(f"name = '{MODEL}' and run_id = '{run.info.run_id}'")
    assert registered.tags["model_repo_version"] == first

    promote(repo, MODEL, first, held_out, "test")
    assert client.get_model_version_by_alias(MODEL, "champion").tags["model_repo_version"] == first

    second = _train_and_register(repo, data, tmp_path / "run-b", seed=1)
    promote(repo, MODEL, second, held_out, "test", canary=0.2)
    state = read_serving_state(repo / MODEL)
    assert state is not None and state.canary is not None and state.canary.version == second
    assert client.get_model_version_by_alias(MODEL, "challenger").tags["model_repo_version"] == second
    assert client.get_model_version_by_alias(MODEL, "champion").tags["model_repo_version"] == first

    promote(repo, MODEL, second, held_out, "test")  # the canary did well: it serves
    assert client.get_model_version_by_alias(MODEL, "champion").tags["model_repo_version"] == second
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_model_version_by_alias(MODEL, "challenger")


def test_without_a_server_runs_go_to_a_sqlite_store_beside_them(
    setup: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CXR_MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    repo, data = setup
    cfg = TrainConfig(model=MODEL, data=(str(data),), epochs=1, batch_size=8, augment=False)
    train(cfg, read_config(repo, MODEL), tmp_path / "runs" / "local", progress=False)
    store = tmp_path / "runs" / "mlflow.db"
    assert store.is_file()
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiment = client.get_experiment_by_name(f"cxr-triage/{MODEL}")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "local" and run.data.metrics["val_loss"] > 0
    assert (tmp_path / "runs" / "mlartifacts").is_dir()
