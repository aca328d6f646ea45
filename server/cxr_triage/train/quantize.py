"""INT8 CPU engines (``cxr-triage export MODEL --quantize int8``), kept only where they pay.

A registered fp32 version is statically quantized (ONNX Runtime, QDQ, Conv and Gemm, per-channel
weights), calibrated on training images decoded and preprocessed exactly as the server does.
The new version's metadata records, measured here and now, its img/s against the fp32 engine at
batch 1 and 8 and its mean AUROC change on a held-out set. The promotion gate then refuses an
int8 version that is not faster on this machine, or whose AUROC fell beyond the tolerance.
No torch.
"""

import json
import logging
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from cxr_triage.engines import OnnxEngine
from cxr_triage.errors import ExportError
from cxr_triage.imaging import prepare, to_batch
from cxr_triage.repository import ModelConfig
from cxr_triage.repository.models import METADATA_FILE, EngineInfo, VersionMetadata
from cxr_triage.repository.repo import VersionEntry, check_onnx
from cxr_triage.repository.writer import claim_version, pin_served, sha256_of
from cxr_triage.train.datasets import LabeledSet
from cxr_triage.train.evaluate import evaluate
from cxr_triage.train.scoring import LIMITS, find_version, score_version

log = logging.getLogger(__name__)
CALIBRATION_IMAGES = 64


@dataclass(frozen=True)
class QuantizeResult:
    version: str
    path: Path
    speed: dict[str, float]
    mean_auroc: dict[str, float | None]

    @property
    def speedup(self) -> float:
        return min(
            self.speed["int8_b1"] / self.speed["fp32_b1"], self.speed["int8_b8"] / self.speed["fp32_b8"]
        )


def quantize_version(
    repo: Path,
    model: str,
    version: str | None,
    calibration: LabeledSet,
    holdout: LabeledSet,
    seconds: float = 2.0,
) -> QuantizeResult:
    """Quantize ``version`` (the served one if None) and register the int8 engine as a new version.

    Raises:
        ExportError: the quantized engine breaks the repository contract (nothing is registered).
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    config, source = find_version(repo, model, version)
    if getattr(source.metadata, "precision", "fp32") == "int8":
        raise ExportError(f"{model} version {source.version} is already int8")
    staging = repo / model / f".staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        target = staging / "model.onnx"

        class Reader(CalibrationDataReader):  # type: ignore[misc]
            def __init__(self) -> None:
                self.batches = _batches(calibration, config, CALIBRATION_IMAGES)

            def get_next(self) -> dict[str, np.ndarray] | None:
                batch = next(self.batches, None)
                return None if batch is None else {source.metadata.engine.input_name: batch}

        quantize_static(
            source.engine_path,
            target,
            Reader(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["Conv", "Gemm"],
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        problems = check_onnx(target, config)
        if problems:
            raise ExportError(f"the int8 engine breaks the repository contract: {problems}")
        speed = {
            f"{kind}_b{batch}": _images_per_second(path, config, batch, seconds)
            for kind, path in (("fp32", source.engine_path), ("int8", target))
            for batch in (1, 8)
        }
        fp32_auroc = _mean_auroc(source, config, holdout)
        meta = source.metadata.model_copy(
            update={
                "created": datetime.now(UTC),
                "engine": EngineInfo(
                    file=target.name,
                    sha256=sha256_of(target),
                    opset=source.metadata.engine.opset,
                    heatmap_output=source.metadata.engine.heatmap_output,
                ),
                "parity": {},
            }
        )
        fields: dict[str, Any] = json.loads(meta.model_dump_json())
        fields.pop("mlflow", None)  # the registry version belongs to the fp32 engine
        fields |= {
            "precision": "int8",
            "quantized_from": source.version,
            "quantization": {
                "format": "QDQ",
                "ops": ["Conv", "Gemm"],
                "calibration_images": CALIBRATION_IMAGES,
            },
            "speed": speed | {"measured_on": _machine()},
        }
        staged = VersionEntry("staging", staging, VersionMetadata.model_validate(fields))
        aurocs = {"fp32": fp32_auroc, "int8": _mean_auroc(staged, config, holdout)}
        fields["auroc_vs_fp32"] = aurocs | {"held_out": f"{len(holdout)} images"}
        (staging / METADATA_FILE).write_text(VersionMetadata.model_validate(fields).model_dump_json(indent=2))
        pin_served(repo / model)  # the new version must not serve by the back door
        number, final = claim_version(repo / model, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info(
        "%s version %s: int8 of version %s, speed %s, mean AUROC %s",
        model,
        number,
        source.version,
        speed,
        aurocs,
    )
    return QuantizeResult(number, final, speed, aurocs)


def _batches(data: LabeledSet, config: ModelConfig, limit: int, size: int = 8) -> Iterator[np.ndarray]:
    records = list(data.records)[:limit]
    for start in range(0, len(records), size):
        pixels = [
            prepare(r.image.read_bytes(), "", config.input, LIMITS).pixels
            for r in records[start : start + size]
        ]
        yield to_batch(pixels, config.input)


def _images_per_second(path: Path, config: ModelConfig, batch: int, seconds: float) -> float:
    engine = OnnxEngine(path, "cpu")
    x = np.random.default_rng(0).standard_normal(
        (batch, config.input.channels, config.input.size, config.input.size), dtype=np.float32
    )
    engine.run(x)  # warm-up
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        engine.run(x)
        runs += 1
    return round(runs * batch / (time.perf_counter() - start), 2)


def _mean_auroc(version: VersionEntry, config: ModelConfig, holdout: LabeledSet) -> float | None:
    scored = score_version(version, config, holdout)
    thresholds = version.metadata.thresholds_for(config)
    report = evaluate(scored.targets, scored.mask, scored.scores, config.labels, thresholds, bootstrap=0)
    return report.mean_auroc


def _machine() -> str:
    import os
    import platform

    return f"{platform.machine()} {os.cpu_count()} cores"
