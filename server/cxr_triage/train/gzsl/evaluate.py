"""Evaluate a GZSL run (PyTorch) or a registered version (ONNX Runtime, as served) on a test split."""

from pathlib import Path

import numpy as np

from cxr_triage.errors import ExportError
from cxr_triage.imaging import to_batch
from cxr_triage.repository.models import METADATA_FILE
from cxr_triage.train.datasets import ImageDataset, label_matrix
from cxr_triage.train.gzsl.metrics import GzslReport, gzsl_report
from cxr_triage.train.gzsl.split import load_split, source_name
from cxr_triage.train.gzsl.trainer import _describe, evaluate_run


def evaluate_source(
    source: Path, data: Path | None = None, bootstrap: int = 1000, seed: int = 0
) -> GzslReport:
    """``source`` is a run folder (has config.yaml) or a version folder (has metadata.json).

    Raises:
        ExportError: neither, or a version folder evaluated without ``data``.
    """
    source = Path(source)
    if (source / "config.yaml").is_file():
        return evaluate_run(source, data, bootstrap, seed)
    if (source / METADATA_FILE).is_file():
        if data is None:
            raise ExportError("evaluating a version folder needs --data (the dataset folder)")
        return evaluate_version(source, data, bootstrap, seed)
    raise ExportError(f"{source} is neither a `gzsl train` run folder nor a registered GZSL version folder")


def evaluate_version(
    version_dir: Path, data: Path, bootstrap: int = 1000, seed: int = 0, batch_size: int = 32
) -> GzslReport:
    """The served path: the version's ONNX image encoder and stored label latents on ``data``'s test split."""
    from cxr_triage.engines.gzsl import GzslEngine

    engine = GzslEngine(version_dir, preference="cpu")
    test = load_split(Path(data), "test")
    pixels = ImageDataset(test, engine.labels, engine.input_spec, cache=False)
    parts = []
    for first in range(0, len(test), batch_size):
        batch = to_batch(
            [pixels.pixels(i) for i in range(first, min(len(test), first + batch_size))], engine.input_spec
        )
        parts.append(engine.score_images(batch))
    targets, mask = label_matrix(test, engine.labels)
    scores = np.concatenate(parts) if parts else np.zeros((0, len(engine.labels)), np.float32)
    return gzsl_report(
        targets,
        mask,
        scores,
        engine.labels,
        engine.unseen,
        bootstrap=bootstrap,
        seed=seed,
        dataset=_describe(test, source_name(Path(data), test)),
        model=f"{version_dir.parent.name} version {version_dir.name} (ONNX)",
    )
