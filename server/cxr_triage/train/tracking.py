"""Experiments and versions in MLflow, beside model_repo/ (which stays what the server reads).

Every ``train``, ``evaluate`` and ``retrain`` run is an MLflow run: resolved config as params,
per-epoch metrics, the run's files and reports as artifacts. A registered version's ONNX goes
to the MLflow model registry (one registered model per model_repo model) and its
metadata.json carries the run id and registry version; promotion moves the registry alias
``champion`` (a canary gets ``challenger``) in step with serving.json.

Where: ``CXR_MLFLOW_TRACKING_URI`` (or ``MLFLOW_TRACKING_URI``) names a shared server;
otherwise a local sqlite store ``mlflow.db`` beside the runs, with artifacts in
``mlartifacts/`` — no server, no network (telemetry off). ``CXR_MLFLOW=off`` turns it off.
"""

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cxr_triage.config import TrainerSettings

log = logging.getLogger(__name__)
CHAMPION, CHALLENGER = "champion", "challenger"


def enabled() -> bool:
    return TrainerSettings().mlflow


def tracking_uri(runs_root: Path) -> str:
    """The shared server if one is configured, else the sqlite store under ``runs_root``."""
    uri = TrainerSettings().mlflow_tracking_uri
    if uri:
        return uri
    runs_root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(runs_root / 'mlflow.db').resolve()}"


class Tracker:
    """One MLflow run; every method is a no-op when tracking is off, so callers need no ifs."""

    def __init__(self, client: Any = None, run_id: str | None = None, uri: str | None = None) -> None:
        self.client, self.run_id, self.uri = client, run_id, uri

    @classmethod
    def start(
        cls,
        experiment: str,
        run_name: str,
        runs_root: Path,
        tags: Mapping[str, str] | None = None,
        uri: str | None = None,
    ) -> "Tracker":
        """A new run; ``uri`` (e.g. the store a version was trained in) wins over the default."""
        if not enabled():
            return cls()
        TrainerSettings.prepare_mlflow_environment()
        from mlflow import MlflowClient

        uri = uri or tracking_uri(runs_root)
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            local = None if "://" in uri and not uri.startswith("sqlite") else runs_root / "mlartifacts"
            location = local.resolve().as_uri() if local else None
            experiment_id = client.create_experiment(experiment, artifact_location=location)
        run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags or {}))
        log.info("MLflow run %s in experiment %s (%s)", run.info.run_id, experiment, _safe(uri))
        return cls(client, run.info.run_id, uri)

    @classmethod
    def resume(cls, uri: str | None, run_id: str | None) -> "Tracker":
        """Re-open a finished run (to attach its exported engine), or nothing."""
        if not (enabled() and uri and run_id):
            return cls()
        TrainerSettings.prepare_mlflow_environment()
        from mlflow import MlflowClient

        return cls(MlflowClient(tracking_uri=uri, registry_uri=uri), run_id, uri)

    def params(self, values: Mapping[str, Any]) -> None:
        if self.client is None:
            return
        from mlflow.entities import Param

        params = [Param(k, str(v)[:6000]) for k, v in values.items()]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def metrics(self, values: Mapping[str, float | None], step: int = 0) -> None:
        if self.client is None:
            return
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(_key(k), float(v), now, step) for k, v in values.items() if v is not None]
        for i in range(0, len(batch), 500):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 500])

    def artifacts(self, files: Iterable[Path], folder: str | None = None) -> None:
        if self.client is None:
            return
        for path in files:
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path), folder)

    def finish(self, status: str = "FINISHED") -> None:
        if self.client is not None:
            self.client.set_terminated(self.run_id, status)

    def record(self) -> dict[str, Any]:
        """What a version's metadata.json keeps to find this run again (no credentials)."""
        if self.client is None:
            return {}
        return {"tracking_uri": _safe(self.uri or ""), "run_id": self.run_id}

    def register(self, model: str, engine: Path, version: str) -> str | None:
        """Log the engine under ``model/`` and make it a registry version tagged with the
        model_repo version; returns the registry version number."""
        if self.client is None:
            return None
        self.artifacts([engine], "model")
        if not self.client.search_registered_models(filter_string=f"name = '{model}'"):
            self.client.create_registered_model(model, description="cxr-triage model_repo model")
        run = self.client.get_run(self.run_id)
        created = self.client.create_model_version(
            model,
            source=f"{run.info.artifact_uri}/model",
            run_id=self.run_id,
            tags={"model_repo_version": version},
        )
        return str(created.version)


def move_alias(model: str, record: Mapping[str, Any] | None, version: str, alias: str) -> bool:
    """Point ``alias`` at the registry version made from model_repo ``version``; False if none.

    A failure is logged, not raised: promotion in model_repo/ stands without the registry.
    """
    found = _registry_version(model, record, version)
    if found is None:
        return False
    client, number = found
    try:
        client.set_registered_model_alias(model, alias, number)
    except Exception as exc:  # the server is away or refuses: say so, don't undo the promotion
        log.warning("MLflow alias %s not moved (%s: %s)", alias, type(exc).__name__, exc)
        return False
    return True


def drop_alias(model: str, record: Mapping[str, Any] | None, alias: str) -> None:
    if not (enabled() and record and record.get("tracking_uri")):
        return
    from mlflow import MlflowClient

    uri = record["tracking_uri"]
    try:
        MlflowClient(tracking_uri=uri, registry_uri=uri).delete_registered_model_alias(model, alias)
    except Exception as exc:  # no such alias, or the server is away: nothing to undo
        log.debug("MLflow alias %s not dropped: %s", alias, exc)


def _registry_version(model: str, record: Mapping[str, Any] | None, version: str) -> tuple[Any, str] | None:
    if not (enabled() and record and record.get("tracking_uri") and record.get("run_id")):
        return None
    from mlflow import MlflowClient

    uri = record["tracking_uri"]
    try:
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        hits = client.search_model_versions(f"name = '{model}' and run_id = '{record['run_id']}'")
    except Exception as exc:  # a registry that cannot be reached does not block promotion
        log.warning("MLflow registry not reachable (%s: %s)", type(exc).__name__, exc)
        return None
    for hit in hits:
        if hit.tags.get("model_repo_version") == version:
            return client, str(hit.version)
    return None


def _key(name: str) -> str:
    """MLflow metric names allow letters, digits, _ - . / and spaces."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)


def _safe(uri: str) -> str:
    """A tracking URI without credentials (user:password@host), fit for logs and metadata."""
    if "@" in uri and "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://{rest.split('@', 1)[1]}"
    return uri
