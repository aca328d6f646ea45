"""A finished training run becomes a model_repo version (``cxr-triage register``).

The version carries its own operating points, chosen on the run's validation split for the
model's target sensitivity, so every version is scored with thresholds made for it. The
version is *registered*, not served: ``cxr-triage promote`` decides that, through the gate.
"""

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cxr_triage.repository.writer import pin_served
from cxr_triage.train.config import TrainConfig
from cxr_triage.train.evaluate import choose_operating_points, evaluate
from cxr_triage.train.export import ExportResult, export_model, read_config
from cxr_triage.train.tracking import Tracker

log = logging.getLogger(__name__)


def register_run(run_dir: Path, repo: Path, bootstrap: int = 200) -> ExportResult:
    """Export ``run_dir``'s best epoch as a new version of its model, with operating points.

    Raises:
        FileNotFoundError: the run has no best.pt / val_scores.npz (it never finished an epoch).
        ExportError: the export or its parity check failed (nothing is registered).
    """
    cfg = TrainConfig.read(run_dir / "config.yaml")
    config = read_config(repo, cfg.model)
    best = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    val = np.load(run_dir / "val_scores.npz")
    data = json.loads((run_dir / "data.json").read_text())
    points = choose_operating_points(
        val["targets"], val["mask"], val["scores"], config.labels, config.target_sensitivity
    )
    thresholds = {label: p.threshold for label, p in points.items()}
    report = evaluate(
        val["targets"],
        val["mask"],
        val["scores"],
        config.labels,
        config.thresholds | thresholds,
        bootstrap=bootstrap,
        dataset=_data_text(data, "validation"),
    )
    run = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    extra: dict[str, Any] = {
        "metrics": {
            "split": "validation",
            "mean_auroc": report.mean_auroc,
            "auroc": {k: m.auroc for k, m in report.per_label.items() if m.auroc is not None},
            "auroc_ci95": {k: m.auroc_ci95 for k, m in report.per_label.items() if m.auroc_ci95},
        },
        "thresholds": thresholds,
        "operating_points": {k: p.model_dump() for k, p in points.items()},
        "training": {
            "run": run_dir.name,
            "config_hash": cfg.config_hash(),
            "epochs": cfg.epochs,
            "best_epoch": best.get("epoch", run.get("best_epoch")),
            "data": data,
        },
    }
    tracker = Tracker.resume(run.get("mlflow", {}).get("tracking_uri"), run.get("mlflow", {}).get("run_id"))
    if tracker.record():
        extra["mlflow"] = tracker.record()
    pin_served(repo / cfg.model)
    result = export_model(
        repo,
        cfg.model,
        state=best["model"],
        weights_kind="trained",
        data=_data_text(data, "training"),
        extra=extra,
    )
    registered = tracker.register(cfg.model, result.path / "model.onnx", result.version)
    if registered:
        log.info("MLflow: %s version %s is registry version %s", cfg.model, result.version, registered)
    return result


def _data_text(data: dict[str, Any], split: str) -> str:
    """``synthetic`` first where it is, so no reader mistakes phantoms for patients."""
    kind = "synthetic (not clinical)" if data.get("synthetic") else "+".join(data.get("sources", []))
    part = data.get("train" if split == "training" else "val", {})
    return f"{kind}: {split} split, {part.get('images', '?')} images, {part.get('patients', '?')} patients"
