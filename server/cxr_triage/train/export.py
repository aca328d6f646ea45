"""Export a model_repo model to ONNX, check it against PyTorch, and register a new version."""

import logging
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import yaml

from cxr_triage.errors import ExportError
from cxr_triage.repository.models import (
    CONFIG_FILE,
    METADATA_FILE,
    EngineInfo,
    ModelConfig,
    VersionMetadata,
    Weights,
)
from cxr_triage.repository.repo import check_onnx
from cxr_triage.repository.writer import claim_version, pin_served, sha256_of
from cxr_triage.train.models import export_module, load_weights
from cxr_triage.train.torch_eager import TorchEagerEngine

log = logging.getLogger(__name__)
OPSET = 18
DEFAULT_TOLERANCE = 1e-4
WEIGHTS_FILE = "weights.pt"  # the backbone's PyTorch state dict, for fine-tuning (never served)


@dataclass(frozen=True)
class ExportResult:
    version: str
    path: Path
    max_abs_diff: float
    weights: Weights


def read_config(repo: Path, name: str) -> ModelConfig:
    path = repo / name / CONFIG_FILE
    if not path.is_file():
        raise ExportError(f"{path} not found; add a config.yaml for {name} to the model repository")
    return ModelConfig.model_validate(yaml.safe_load(path.read_text()))


def export_model(
    repo: Path,
    name: str,
    weights: Path | None = None,
    weights_kind: Weights | None = None,
    data: str | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    state: dict[str, torch.Tensor] | None = None,
    extra: dict[str, Any] | None = None,
) -> ExportResult:
    """Build ``name`` with timm, export ONNX (dynamic batch), check parity, register a version.

    ``weights`` (a file) or ``state`` (a backbone state dict in memory) give the weights; without
    either the version is ``untrained``. ``extra`` adds metadata fields (metrics, thresholds,
    operating points, training provenance). The backbone's state dict is kept beside the engine
    as ``weights.pt`` so later runs can fine-tune the served version. The version folder appears atomically
    (renamed into place) only after every check passed, so the server never sees half a version.

    Raises:
        ExportError: unknown model, weights that do not fit, or ONNX Runtime disagreeing with
        PyTorch by more than ``tolerance`` (max absolute difference of probabilities).
    """
    config = read_config(repo, name)
    torch.manual_seed(0)  # an untrained export is reproducible: same config, same engine
    model = export_module(config)
    if weights is not None:
        load_weights(model.backbone, weights)
    if state is not None:
        model.backbone.load_state_dict(state)
    given = weights is not None or state is not None
    kind: Weights = weights_kind or ("imported" if given else "untrained")
    staging = repo / name / f".staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)
    try:
        onnx_path = staging / "model.onnx"
        _export_onnx(model, config, onnx_path)
        problems = check_onnx(onnx_path, config)
        if problems:
            raise ExportError(f"exported ONNX breaks the repository contract: {problems}")
        diff = parity(model, onnx_path, config)
        if not diff <= tolerance:
            raise ExportError(
                f"ONNX Runtime differs from PyTorch by {diff:.2e} (> {tolerance:.0e}); not registered"
            )
        meta = VersionMetadata(
            weights=kind,
            data=data if kind != "untrained" else None,
            created=datetime.now(UTC),
            source_commit=_source_commit(),
            engine=EngineInfo(
                file=onnx_path.name,
                sha256=sha256_of(onnx_path),
                opset=OPSET,
                heatmap_output="cam" if config.heatmap == "cam" else None,
            ),
            labels=config.labels,
            parity={"reference": "pytorch-eager-fp32", "max_abs_diff": diff, "tolerance": tolerance},
            architecture=config.architecture,
            exported_with={"torch": torch.__version__, "onnxruntime": ort.__version__},
            **(extra or {}),
        )
        torch.save(model.backbone.state_dict(), staging / WEIGHTS_FILE)
        (staging / METADATA_FILE).write_text(meta.model_dump_json(indent=2) + "\n")
        pin_served(repo / name)  # a new version serves only once promoted (or if it is the first)
        version, final = claim_version(repo / name, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("registered %s version %s (%s, max |ONNX - torch| = %.2e)", name, version, kind, diff)
    return ExportResult(version=version, path=final, max_abs_diff=diff, weights=kind)


def _export_onnx(model: torch.nn.Module, config: ModelConfig, path: Path) -> None:
    size, channels = config.input.size, config.input.channels
    example = torch.randn(2, channels, size, size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=["input"],
        output_names=["probabilities", "cam"] if config.heatmap == "cam" else ["probabilities"],
        opset_version=OPSET,
        dynamo=True,
        external_data=False,
        dynamic_shapes={"x": {0: batch}},
    )


def parity(model: torch.nn.Module, onnx_path: Path, config: ModelConfig, batch: int = 3) -> float:
    """Max absolute difference between ONNX Runtime (CPU, fp32) and PyTorch eager on one input."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(
        (batch, config.input.channels, config.input.size, config.input.size), dtype=np.float32
    )
    probs, cam = TorchEagerEngine(model).run_with_heatmaps(x)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: x})
    diff = float(np.max(np.abs(np.asarray(outputs[0]) - probs)))
    if cam is not None:  # CAMs are on the logit scale: compare relative to their range
        cam_diff = float(np.max(np.abs(np.asarray(outputs[1]) - cam)) / max(1e-6, float(np.abs(cam).max())))
        diff = max(diff, cam_diff)
    return diff


def _source_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], capture_output=True, text=True, timeout=5
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out + ("-dirty" if dirty.strip() else "")
