"""Export a GZSL model for serving (torch-free) and register it as a version folder.

Version folder (appears whole, renamed into place by ``claim_version``)::

    image_encoder.onnx    "input" (N, 3, S, S) float32, the DenseNet engines' model input
                          -> "latent" (N, 128) float32, L2-normalised
    text_encoder.onnx     "input_ids", "attention_mask" (N, T) int64 -> "latent" (N, 128),
                          L2-normalised: frozen sentence encoder + mean pooling + fc_t
    tokenizer.json        the `tokenizers` tokenizer (pads to the longest text, truncates)
    label_latents.npy     (L, 128) float32, L2-normalised latents of metadata.json's labels
    label_embeddings.npy  (L, d_text) float32, the frozen text encoder's label embeddings
    weights.pt            the PyTorch state dict, for fine-tuning (never served)
    metadata.json         provenance (VersionMetadata) + "gzsl": labels seen / unseen,
                          input spec, text encoder, files with their SHA-256, parity

A finding's score is ``image_latent @ label_latent`` (both unit vectors: cosine similarity).
"""

import json
import logging
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from cxr_triage.errors import ExportError
from cxr_triage.repository.models import METADATA_FILE, EngineInfo, VersionMetadata, Weights
from cxr_triage.repository.writer import claim_version, sha256_of
from cxr_triage.train.export import DEFAULT_TOLERANCE, OPSET, _source_commit
from cxr_triage.train.gzsl.config import GzslConfig
from cxr_triage.train.gzsl.model import GzslModel, ImageTower, TextTower
from cxr_triage.train.gzsl.text import TextEncoder, label_text, tokenize
from cxr_triage.train.gzsl.trainer import input_spec, label_texts, load_run, validation_operating_points

log = logging.getLogger(__name__)
MODEL_TYPE = "gzsl"
IMAGE_ENGINE = "image_encoder.onnx"
TEXT_ENGINE = "text_encoder.onnx"
TOKENIZER = "tokenizer.json"
LABEL_LATENTS = "label_latents.npy"
LABEL_EMBEDDINGS = "label_embeddings.npy"
WEIGHTS = "weights.pt"
PARITY_TEXTS = ("Hernia", "pleural thickening", "a small round nodule in the left upper zone")
"""Texts no training label need be: findings added at run time must match torch too."""


@dataclass(frozen=True)
class GzslExport:
    version: str
    path: Path
    parity: dict[str, float]


def export_run(
    run_dir: Path,
    model_dir: Path,
    metrics: dict[str, Any] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    target_sensitivity: float = 0.95,
) -> GzslExport:
    """Register a finished run's best weights as a new version of ``model_dir``, with operating
    points for its seen labels chosen on validation at ``target_sensitivity``.

    Raises:
        ExportError: the text encoder no longer gives the run's label embeddings, or ONNX
        Runtime disagrees with PyTorch by more than ``tolerance``.
    """
    cfg, model = load_run(run_dir)
    text = TextEncoder.load(cfg.text_encoder)
    again = text.embed(label_texts(cfg))
    drift = float((again - model.text_embeddings).abs().max())
    if drift > 1e-4:
        raise ExportError(
            f"text encoder {text.name} gives other label embeddings than run {run_dir.name} had "
            f"(max |diff| {drift:.2e}); export with the encoder the run was trained with"
        )
    data = json.loads((run_dir / "data.json").read_text())
    synthetic = "SYNTHETIC " if data.get("synthetic") else ""
    note = (
        f"{synthetic}{data.get('source')} training split without unseen-carrying images: "
        f"{data['train']['images']} training images ({data['train']['patients']} patients), "
        f"{data['val']['images']} validation; run {run_dir.name}"
    )
    run = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    points = validation_operating_points(run_dir, target_sensitivity)
    extra = {
        "training": {"run": run_dir.name, "best_epoch": run.get("best_epoch"), "epochs": run.get("epochs")},
        "thresholds": {label: p.threshold for label, p in points.items()},
        "operating_points": {label: p.model_dump(mode="json") for label, p in points.items()},
    }
    return export_model(cfg, model, text, model_dir, "trained", note, metrics, tolerance, extra)


def model_config(cfg: GzslConfig, name: str, critical: Sequence[str] = ()) -> dict[str, Any]:
    """The config.yaml of a new gzsl model in the repository: what the server needs to serve
    the versions ``cfg`` trains (operating points come with each version)."""
    spec = input_spec(cfg.image_size)
    return {
        "name": name,
        "type": MODEL_TYPE,
        "description": f"CXR-ML-GZSL ({cfg.architecture} + {Path(cfg.text_encoder).name}); zero-shot: "
        "findings can be added by name at run time",
        "architecture": cfg.architecture,
        "label_set": "gzsl",
        "labels": list(cfg.labels),
        "input": spec.model_dump(mode="json"),
        "batching": {"max_batch_size": 8, "batch_timeout_ms": 10},
        "thresholds": {},
        "critical_findings": [x for x in critical if x in cfg.labels],
        "heatmap": "none",
        "default": False,
    }


def export_model(
    cfg: GzslConfig,
    model: GzslModel,
    text: TextEncoder,
    model_dir: Path,
    weights: Weights = "untrained",
    data: str | None = None,
    metrics: dict[str, Any] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    extra: dict[str, Any] | None = None,
) -> GzslExport:
    """Export ``model`` (with ``text``, the frozen encoder it was built with) into a new version
    of ``model_dir`` after the parity checks; see the module docstring for the folder."""
    model = model.cpu().eval()
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = model_dir / f".staging-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        image_tower, text_tower = ImageTower(model).eval(), TextTower(text.encoder, model).eval()
        _export_image(image_tower, cfg.image_size, staging / IMAGE_ENGINE)
        _export_text(text_tower, text, staging / TEXT_ENGINE)
        text.tokenizer.save(str(staging / TOKENIZER))
        with torch.no_grad():
            latents = torch.nn.functional.normalize(model.label_latents(), dim=-1).numpy().astype(np.float32)
        np.save(staging / LABEL_LATENTS, latents)
        np.save(staging / LABEL_EMBEDDINGS, model.text_embeddings.numpy().astype(np.float32))
        torch.save(model.state_dict(), staging / WEIGHTS)
        parity = _parity(image_tower, text_tower, text, cfg, staging, latents)
        worst = max(parity.values())
        if not worst <= tolerance:
            raise ExportError(
                f"ONNX Runtime differs from PyTorch by {worst:.2e} (> {tolerance:.0e}): {parity}"
            )
        files = {p.name: sha256_of(p) for p in sorted(staging.iterdir()) if p.is_file()}
        meta = VersionMetadata(
            weights=weights,
            data=data if weights != "untrained" else None,
            metrics=metrics or {},
            created=datetime.now(UTC),
            source_commit=_source_commit(),
            engine=EngineInfo(
                file=IMAGE_ENGINE,
                sha256=files[IMAGE_ENGINE],
                opset=OPSET,
                input_name="input",
                output_name="latent",
            ),
            labels=cfg.labels,
            parity={"reference": "pytorch-eager-fp32", "tolerance": tolerance, **parity},
            architecture=cfg.architecture,
            exported_with={"torch": torch.__version__, "onnxruntime": ort.__version__},
            model_type=MODEL_TYPE,
            gzsl=_gzsl_section(cfg, text, latents),
            files=files,
            **(extra or {}),
        )
        (staging / METADATA_FILE).write_text(meta.model_dump_json(indent=2) + "\n")
        version, final = claim_version(model_dir, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("registered %s version %s (%s, worst parity %.2e)", model_dir.name, version, weights, worst)
    return GzslExport(version, final, parity)


def _gzsl_section(cfg: GzslConfig, text: TextEncoder, latents: np.ndarray) -> dict[str, Any]:
    return {
        "labels": list(cfg.labels),
        "seen": list(cfg.seen),
        "unseen": list(cfg.unseen),
        "descriptions": dict(cfg.descriptions),
        "label_texts": label_texts(cfg),
        "latent_dim": int(latents.shape[1]),
        "input": input_spec(cfg.image_size).model_dump(mode="json"),
        "image_engine": {"file": IMAGE_ENGINE, "input": "input", "output": "latent"},
        "text_engine": {
            "file": TEXT_ENGINE,
            "inputs": ["input_ids", "attention_mask"],
            "output": "latent",
            "encoder": text.name,
            "embedding_dim": text.encoder.dim,
            "pooling": "mean over attention_mask, L2-normalised",
            "max_length": text.max_length,
        },
        "tokenizer": TOKENIZER,
        "label_latents": LABEL_LATENTS,
        "label_embeddings": LABEL_EMBEDDINGS,
        "score": "cosine similarity: image latent . label latent (both unit vectors), in [-1, 1]",
        "objective": {"margin": cfg.margin, "gamma_align": cfg.gamma_align, "gamma_con": cfg.gamma_con},
    }


def _export_image(tower: ImageTower, size: int, path: Path) -> None:
    example = torch.randn(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(
        tower,
        (example,),
        str(path),
        input_names=["input"],
        output_names=["latent"],
        opset_version=OPSET,
        dynamo=True,
        external_data=False,
        dynamic_shapes={"x": {0: batch}},
    )


def _export_text(tower: TextTower, text: TextEncoder, path: Path) -> None:
    ids, mask = tokenize(text.tokenizer, ["pleural effusion", "a small round nodule in the left upper zone"])
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=2, max=text.max_length)
    torch.onnx.export(
        tower,
        (ids, mask),
        str(path),
        input_names=["input_ids", "attention_mask"],
        output_names=["latent"],
        opset_version=OPSET,
        dynamo=True,
        external_data=False,
        dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
    )


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _parity(
    image_tower: ImageTower,
    text_tower: TextTower,
    text: TextEncoder,
    cfg: GzslConfig,
    folder: Path,
    latents: np.ndarray,
) -> dict[str, float]:
    """Max |ONNX Runtime - PyTorch| of image latents, text latents, and the stored label latents."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 3, cfg.image_size, cfg.image_size), dtype=np.float32)
    with torch.no_grad():
        ref_image = image_tower(torch.from_numpy(x)).numpy()
    (got_image,) = _session(folder / IMAGE_ENGINE).run(None, {"input": x})
    texts = [*label_texts(cfg), *(label_text(t) for t in PARITY_TEXTS)]
    ids, mask = tokenize(text.tokenizer, texts)
    with torch.no_grad():
        ref_text = text_tower(ids, mask).numpy()
    (got_text,) = _session(folder / TEXT_ENGINE).run(
        None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    )
    got_text = np.asarray(got_text)
    return {
        "image_latent_max_abs_diff": float(np.abs(np.asarray(got_image) - ref_image).max()),
        "text_latent_max_abs_diff": float(np.abs(got_text - ref_text).max()),
        "label_latents_max_abs_diff": float(np.abs(got_text[: len(cfg.labels)] - latents).max()),
    }
