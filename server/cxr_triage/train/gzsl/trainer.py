"""``cxr-triage gzsl train``: fit CXR-ML-GZSL on the seen findings, one run folder per run.

The trainer's safeguards apply (``cxr_triage.train.trainer``): a zero, NaN or infinite loss
stops the run; after the first backward every trainable parameter must hold a non-zero
gradient (the reference's detached L_align would fail here); exactly ``epochs`` epochs at most,
counted from 1. Run folder::

    config.yaml           the GzslConfig actually used (every default filled in)
    data.json             images and patients per split, dropped unseen-carrying images
    label_embeddings.npy  the frozen text encoder's embeddings of the labels (L, d_text)
    metrics.jsonl         per epoch: each loss term, validation loss and seen AUROC, LR, time
    best.pt               weights (state dict) of the epoch with the best validation seen AUROC
    run.json              summary written at the end
"""

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from cxr_triage.engines.gzsl import to_probability
from cxr_triage.repository.models import InputSpec
from cxr_triage.train.datasets import ImageDataset, LabeledSet, split_by_patient
from cxr_triage.train.evaluate import OperatingPoint, choose_operating_points
from cxr_triage.train.gzsl.config import GzslConfig
from cxr_triage.train.gzsl.losses import Terms, objective
from cxr_triage.train.gzsl.metrics import GzslReport, gzsl_report
from cxr_triage.train.gzsl.model import GzslModel
from cxr_triage.train.gzsl.split import (
    check_labels_known,
    drop_unseen,
    load_split,
    source_name,
    with_positive,
)
from cxr_triage.train.gzsl.text import TextEncoder, label_text
from cxr_triage.train.tracking import Tracker
from cxr_triage.train.trainer import (
    TrainingError,
    _atomic_save,
    _autocast,
    _autocast_dtype,
    _check_gradients,
    _check_loss,
    _seed_everything,
)

log = logging.getLogger(__name__)
BEST = "best.pt"
EMBEDDINGS = "label_embeddings.npy"


def input_spec(size: int) -> InputSpec:
    """The engines' input: 3 channels, ImageNet mean/std, letterboxed (as the DenseNet configs)."""
    return InputSpec(size=size, channels=3)


@dataclass(frozen=True)
class GzslRun:
    run_dir: Path
    epochs_run: int
    best_epoch: int
    best_val_seen_auroc: float | None
    history: list[dict[str, Any]]


def label_texts(cfg: GzslConfig) -> list[str]:
    return [label_text(x, cfg.descriptions.get(x)) for x in cfg.labels]


def build_model(cfg: GzslConfig, text: TextEncoder) -> GzslModel:
    """The network for ``cfg`` with its label embeddings computed once by the frozen ``text``."""
    embeddings = text.embed(label_texts(cfg))
    return GzslModel(embeddings, cfg.architecture, 3, cfg.hidden, cfg.latent_dim)


def train(cfg: GzslConfig, run_dir: Path, progress: bool = True) -> GzslRun:
    """Train as ``cfg`` says; write the run folder. Validation and test never see unseen labels'
    images in training; the best epoch is chosen on validation seen AUROC (the only kind
    validation can measure).

    Raises:
        TrainingError: data without the seen labels, a loss that cannot train, no gradient.
        DatasetError / TextEncoderError: bad data folder, missing text encoder.
    """
    _seed_everything(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = _autocast_dtype("auto", device)
    spec = input_spec(cfg.image_size)
    everything = load_split(Path(cfg.data), "train")
    unknown = check_labels_known(everything, cfg.seen)
    if unknown:
        raise TrainingError(f"the training data never annotates the seen labels {unknown}")
    kept = drop_unseen(everything, cfg.unseen)
    fit, val = split_by_patient(kept, cfg.val_fraction, seed=cfg.seed)
    fit = with_positive(fit, cfg.seen)
    if len(fit) < cfg.batch_size or len(val) == 0:
        raise TrainingError(
            f"too few images to train: {len(fit)} with a seen finding for training, {len(val)} for validation"
        )
    text = TextEncoder.load(cfg.text_encoder)
    model = build_model(cfg, text).to(device)
    seen = torch.tensor([x not in cfg.unseen for x in cfg.labels], device=device)
    train_ds = ImageDataset(fit, cfg.labels, spec, augment=cfg.augment, seed=cfg.seed)
    val_ds = ImageDataset(val, cfg.labels, spec)
    loader = DataLoader(
        train_ds,
        batch_size=cfg.batch_size,
        shuffle=True,
        num_workers=cfg.workers,
        generator=torch.Generator().manual_seed(cfg.seed),
        drop_last=len(train_ds) % cfg.batch_size == 1,  # BatchNorm cannot train on one image
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=cfg.lr_decay, patience=cfg.lr_patience
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg.write(run_dir / "config.yaml")
    np.save(run_dir / EMBEDDINGS, model.text_embeddings.cpu().numpy())
    data = {
        "source": source_name(Path(cfg.data), everything),
        "synthetic": everything.synthetic,
        "train_split_images": len(everything),
        "dropped_carrying_unseen": len(everything) - len(kept),
        "train": {"images": len(fit), "patients": len(fit.patients())},
        "val": {"images": len(val), "patients": len(val.patients())},
        "seen": list(cfg.seen),
        "unseen": list(cfg.unseen),
        "text_encoder": text.name,
    }
    (run_dir / "data.json").write_text(json.dumps(data, indent=2) + "\n")
    (run_dir / "metrics.jsonl").write_text("")
    tracker = Tracker.start("cxr-triage/gzsl", run_dir.name, run_dir.parent, {"kind": "gzsl-train"})
    tracker.params(cfg.model_dump(exclude={"descriptions"}))

    history: list[dict[str, Any]] = []
    best: int | None = None
    checked = False
    for epoch in range(1, cfg.epochs + 1):
        began = time.perf_counter()
        model.train()
        train_ds.set_epoch(epoch)
        sums: dict[str, float] = {}
        gamma_align = align_weight(cfg, epoch)
        batches = tqdm(
            loader, desc=f"epoch {epoch}/{cfg.epochs}", disable=None if progress else True, leave=False
        )
        for i, (x, y, mask) in enumerate(batches):
            x, y, mask = x.to(device), y.to(device), mask.to(device)
            with _autocast(device, dtype):
                terms = _terms(model, x, y, mask & seen, cfg, gamma_align)
            _check_loss(terms.total, epoch, i)
            optimizer.zero_grad(set_to_none=True)
            terms.total.backward()
            if not checked:
                _check_gradients(model)
                checked = True
            optimizer.step()
            for k, v in terms.floats().items():
                sums[k] = sums.get(k, 0.0) + v
            batches.set_postfix(loss=f"{sums['total'] / (i + 1):.4f}")
        steps = max(1, len(loader))
        val_loss, report = validate(model, val_ds, cfg, device, dtype)
        plateau.step(val_loss)
        row = {
            "epoch": epoch,
            **{f"train_{k}": v / steps for k, v in sums.items()},
            "gamma_align": gamma_align,
            "val_loss": val_loss,
            "val_seen_auroc": report.seen_mean,
            "val_auroc": {k: v for k, v in report.auroc.items() if v is not None},
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": round(time.perf_counter() - began, 2),
        }
        history.append(row)
        if best is None or _better(row, history[best - 1]):
            best = epoch
            _atomic_save({"model": model.state_dict(), "epoch": epoch}, run_dir / BEST)
        with (run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        tracker.metrics(
            {k: v for k, v in row.items() if isinstance(v, int | float) and k != "epoch"}, step=epoch
        )
        log.info(
            "epoch %d/%d: loss %.4f (rank %.4f, align %.4f, con %.4f), val loss %.4f, val seen AUROC %s",
            epoch,
            cfg.epochs,
            row["train_total"],
            row["train_rank"],
            row["train_align"],
            row["train_con"],
            val_loss,
            "n/a" if report.seen_mean is None else f"{report.seen_mean:.3f}",
        )
        if cfg.early_stop_patience and epoch - best >= cfg.early_stop_patience:
            log.info("no better validation seen AUROC for %d epochs: stopping early", cfg.early_stop_patience)
            break
    assert best is not None
    summary = {
        "epochs": len(history),
        "best_epoch": best,
        "best_val_seen_auroc": history[best - 1]["val_seen_auroc"],
        "device": device.type,
        "parameters": {
            "total": sum(p.numel() for p in model.parameters()),
            "trainable": sum(p.numel() for p in trainable),
        },
        "mlflow": tracker.record(),
    }
    (run_dir / "run.json").write_text(json.dumps(summary, indent=2) + "\n")
    tracker.artifacts(run_dir / n for n in ("config.yaml", "data.json", "metrics.jsonl", "run.json"))
    tracker.finish()
    return GzslRun(run_dir, len(history), best, history[best - 1]["val_seen_auroc"], history)


def align_weight(cfg: GzslConfig, epoch: int) -> float:
    """γ1 in ``epoch`` (from 1): 0 for the first ``align_warmup_epochs``, then the paper's value.

    With an ImageNet-initialised encoder (the paper) no warm-up is needed. From scratch, image
    latents start nearly identical (cosine 0.998 between images here) and L_align then pulls every
    label latent onto that one direction: measured on the phantoms, training at γ1 0.1 (or at a
    linear ramp from 0) stayed at chance for 10 epochs, while at γ1 0 the ranking loss fell from
    epoch 3.
    """
    return 0.0 if epoch <= cfg.align_warmup_epochs else cfg.gamma_align


def _terms(
    model: GzslModel,
    x: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    cfg: GzslConfig,
    gamma_align: float | None = None,
) -> Terms:
    scores, image, labels = model(x)
    return objective(
        scores.float(),
        image.float(),
        labels.float(),
        model.text_embeddings,
        y,
        mask,
        cfg.margin,
        cfg.gamma_align if gamma_align is None else gamma_align,
        cfg.gamma_con,
    )


def _better(row: dict[str, Any], best: dict[str, Any]) -> bool:
    if row["val_seen_auroc"] is not None and best["val_seen_auroc"] is not None:
        return bool(row["val_seen_auroc"] > best["val_seen_auroc"])
    return bool(row["val_loss"] < best["val_loss"])


@torch.inference_mode()
def score(
    model: GzslModel, dataset: ImageDataset, batch_size: int = 32, device: torch.device | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cosine scores (N, L), targets and mask of ``dataset`` (its labels must be the model's)."""
    device = device or next(model.parameters()).device
    model.eval()
    scores, targets, masks = [], [], []
    for x, y, mask in DataLoader(dataset, batch_size=batch_size):
        scores.append(model(x.to(device))[0].float().cpu().numpy())
        targets.append(y.numpy())
        masks.append(mask.numpy())
    return np.concatenate(scores), np.concatenate(targets), np.concatenate(masks)


@torch.inference_mode()
def validate(
    model: GzslModel, dataset: ImageDataset, cfg: GzslConfig, device: torch.device, dtype: torch.dtype
) -> tuple[float, GzslReport]:
    """Validation loss (the objective over seen labels) and seen AUROC (no bootstrap)."""
    model.eval()
    seen = torch.tensor([x not in cfg.unseen for x in cfg.labels], device=device)
    total, n = 0.0, 0
    scores, targets, masks = [], [], []
    for x, y, mask in DataLoader(dataset, batch_size=max(cfg.batch_size, 32)):
        x, y, mask = x.to(device), y.to(device), mask.to(device)
        with _autocast(device, dtype):
            terms = _terms(model, x, y, mask & seen, cfg)
            s = model(x)[0].float()
        total += float(terms.total) * len(x)
        n += len(x)
        scores.append(s.cpu().numpy())
        targets.append(y.cpu().numpy())
        masks.append((mask & seen).cpu().numpy())
    report = gzsl_report(
        np.concatenate(targets),
        np.concatenate(masks),
        np.concatenate(scores),
        cfg.labels,
        cfg.unseen,
        bootstrap=0,
    )
    return total / max(1, n), report


def load_run(run_dir: Path, device: str = "cpu") -> tuple[GzslConfig, GzslModel]:
    """A finished run's config and its best weights (label embeddings from the run folder, so
    the text encoder is not needed to score images)."""
    cfg = GzslConfig.read(run_dir / "config.yaml")
    if not (run_dir / BEST).is_file():
        raise TrainingError(f"{run_dir} has no {BEST}; is it a finished `cxr-triage gzsl train` run?")
    embeddings = torch.from_numpy(np.load(run_dir / EMBEDDINGS))
    model = GzslModel(embeddings, cfg.architecture, 3, cfg.hidden, cfg.latent_dim)
    state = torch.load(run_dir / BEST, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    return cfg, model.eval()


def evaluate_run(run_dir: Path, data: Path | None = None, bootstrap: int = 1000, seed: int = 0) -> GzslReport:
    """The run's best weights on the test split of ``data`` (default: the data it trained on),
    every image kept, every label scored."""
    cfg, model = load_run(run_dir)
    root = Path(data or cfg.data)
    test = load_split(root, "test")
    dataset = ImageDataset(test, cfg.labels, input_spec(cfg.image_size))
    scores, targets, mask = score(model, dataset)
    source = source_name(root, test)
    return gzsl_report(
        targets,
        mask,
        scores,
        cfg.labels,
        cfg.unseen,
        bootstrap=bootstrap,
        seed=seed,
        dataset=_describe(test, source),
        model=f"GZSL run {run_dir.name}",
    )


def validation_operating_points(run_dir: Path, target_sensitivity: float = 0.95) -> dict[str, OperatingPoint]:
    """Operating points for the seen labels, chosen on the run's own validation split (rebuilt
    as training built it) on the served scale, (1 + cosine) / 2. Unseen labels get none: their
    images never reach validation, so no labelled data exists to choose one on."""
    cfg, model = load_run(run_dir)
    kept = drop_unseen(load_split(Path(cfg.data), "train"), cfg.unseen)
    _, val = split_by_patient(kept, cfg.val_fraction, seed=cfg.seed)
    scores, targets, mask = score(model, ImageDataset(val, cfg.labels, input_spec(cfg.image_size)))
    seen = np.asarray([x not in cfg.unseen for x in cfg.labels])
    return choose_operating_points(
        targets, mask & seen, to_probability(scores), cfg.labels, target_sensitivity, "validation"
    )


def _describe(data: LabeledSet, source: str) -> str:
    kind = "SYNTHETIC " if data.synthetic else ""
    return f"{kind}{source} test split, {len(data)} images, {len(data.patients())} patients"
