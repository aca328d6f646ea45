"""``cxr-triage train``: fit a model_repo model on labelled radiographs, one run folder per run.

The mistakes the CXR-ML-GZSL reproduction found are checked, loudly, not trusted away:

- a loss that is zero, NaN or infinite stops the run (a zeroed loss term trains nothing);
- on the first step every trainable parameter must receive a non-zero gradient
  (a detached input or a frozen module would otherwise train silently wrong);
- the run does exactly ``epochs`` passes, counted from 1 in every output, and a resumed run
  continues where the last finished epoch left off;
- the resolved configuration, every default filled in, is written next to the run.

Run folder::

    config.yaml      the TrainConfig actually used
    data.json        what was trained on: sources, synthetic or not, images and patients per split
    metrics.jsonl    one line per epoch: losses, validation AUROC per label, learning rate, time
    last.pt          everything needed to resume (weights, optimizer, schedule, RNG, epoch)
    best.pt          weights of the epoch with the best validation mean AUROC
    val_scores.npz   validation targets, mask and the best epoch's scores (operating points)
    run.json         summary written when the run ends
"""

import copy
import hashlib
import json
import logging
import math
import os
import random
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import ConcatDataset, DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from cxr_triage.config import TrainerSettings
from cxr_triage.errors import CxrError
from cxr_triage.repository.models import ModelConfig
from cxr_triage.train.config import TrainConfig
from cxr_triage.train.datasets import ImageDataset, LabeledSet, label_matrix, load_dataset, split_by_patient
from cxr_triage.train.evaluate import evaluate
from cxr_triage.train.models import build_backbone
from cxr_triage.train.scoring import default_split
from cxr_triage.train.tracking import Tracker

log = logging.getLogger(__name__)


class TrainingError(CxrError):
    """The run cannot go on: a loss that trains nothing, a gradient that never arrives, bad data."""


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    epochs_run: int
    best_epoch: int
    best_val_mean_auroc: float | None
    history: list[dict[str, Any]]


@dataclass(frozen=True)
class Splits:
    train: list[LabeledSet]
    val: list[LabeledSet]

    def describe(self) -> dict[str, Any]:
        return {
            "sources": [s.source for s in self.train],
            "synthetic": any(s.synthetic for s in self.train),
            "train": {"images": sum(len(s) for s in self.train), "patients": _patients(self.train)},
            "val": {"images": sum(len(s) for s in self.val), "patients": _patients(self.val)},
        }


def _patients(sets: Sequence[LabeledSet]) -> int:
    return len({(s.source, p) for s in sets for p in s.patients()})


def load_splits(cfg: TrainConfig) -> Splits:
    """Training and validation sets: each dataset's training portion, split by patient."""
    train, val = [], []
    for root in cfg.data:
        data = load_dataset(Path(root), default_split(Path(root), "train"), cfg.uncertainty)
        fit, held = split_by_patient(data, cfg.val_fraction, seed=cfg.seed)
        if len(fit) == 0 or len(held) == 0:
            raise TrainingError(
                f"{data.source} data has too few patients ({len(data.patients())}) to hold out "
                f"{cfg.val_fraction:.0%} for validation"
            )
        train.append(fit)
        val.append(held)
    return Splits(train, val)


def train(
    cfg: TrainConfig, config: ModelConfig, run_dir: Path, resume: bool = False, progress: bool = True
) -> TrainResult:
    """Train ``config``'s network as ``cfg`` says; write everything into ``run_dir``.

    Under torchrun (``WORLD_SIZE`` > 1) the same run is data-parallel (DDP: NCCL on GPUs, gloo
    on CPUs): ``batch_size`` stays the global batch, each rank sees its shard of every epoch,
    losses are averaged over ranks, and only rank 0 validates and writes files.

    Raises:
        TrainingError: bad data, a loss or gradient that cannot train, a resume that does
        not match the run it resumes, or ranks whose parameters diverged.
    """
    ddp = Distributed.from_environment()
    main = ddp.rank == 0
    device = ddp.device()
    dtype = _autocast_dtype(cfg.precision, device)
    _seed_everything(cfg.seed)  # same seed on every rank: identical initial weights
    splits = load_splits(cfg)
    labels = config.labels
    train_ds = _dataset(splits.train, config, augment=cfg.augment, seed=cfg.seed)
    val_ds = _dataset(splits.val, config, augment=False, seed=cfg.seed)
    _check_labels(splits.train, labels)
    if cfg.batch_size % ddp.world:
        raise TrainingError(f"--batch-size {cfg.batch_size} must be a multiple of the {ddp.world} processes")

    net = build_backbone(config)
    if cfg.init:
        _load_init(net, cfg, config)
    if cfg.grad_checkpointing:
        if not hasattr(net, "set_grad_checkpointing"):
            raise TrainingError(f"{config.architecture} does not support gradient checkpointing")
        net.set_grad_checkpointing(True)  # type: ignore[operator]
    if cfg.lora_rank:
        net = _with_lora(net, cfg)
    net = net.to(device)
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sampler = ddp.sampler(train_ds, cfg.seed)
    loader = DataLoader(
        train_ds,
        batch_size=cfg.batch_size // ddp.world,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=cfg.workers,
        generator=torch.Generator().manual_seed(cfg.seed),
        drop_last=False,
    )
    steps_per_epoch = math.ceil(len(loader) / cfg.accumulate)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _warmup_cosine(steps_per_epoch * cfg.epochs, round(steps_per_epoch * cfg.warmup_epochs))
    )
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    start, best = 0, None
    history: list[dict[str, Any]] = []
    if resume and (run_dir / "last.pt").is_file():
        start, best, history = _resume(run_dir, cfg, net, optimizer, schedule, scaler, main)
        log.info("resuming %s after epoch %d of %d", run_dir.name, start, cfg.epochs)
    elif main:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.write(run_dir / "config.yaml")
        (run_dir / "data.json").write_text(json.dumps(splits.describe(), indent=2) + "\n")
        (run_dir / "metrics.jsonl").write_text("")
    model = ddp.wrap(net)
    tracker = _start_tracking(cfg, run_dir, ddp.world, resumed=start > 0) if main else Tracker()

    checked = start > 0
    for epoch in range(start + 1, cfg.epochs + 1):  # epochs are counted from 1, exactly cfg.epochs of them
        began = time.perf_counter()
        model.train()
        if sampler is not None:
            sampler.set_epoch(epoch)
        for part in getattr(train_ds, "datasets", [train_ds]):
            part.set_epoch(epoch)  # a fresh draw of augmentations each epoch
        losses = []
        # disable=None: the bar shows on a terminal only, so logs and CI output stay readable
        shown = None if progress and main else True
        batches = tqdm(loader, desc=f"epoch {epoch}/{cfg.epochs}", disable=shown, leave=False)
        for i, (x, y, mask) in enumerate(batches):
            x, y, mask = x.to(device), y.to(device), mask.to(device)
            with _autocast(device, dtype):
                loss = masked_bce(model(x), y, mask)
            _check_loss(loss, epoch, i)
            scaler.scale(loss / cfg.accumulate).backward()
            if not checked:
                _check_gradients(model)
                checked = True
            if (i + 1) % cfg.accumulate == 0 or i + 1 == len(loader):
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                schedule.step()
            losses.append(loss.item())
            batches.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
        train_loss = ddp.mean(float(np.sum(losses)), len(losses))
        row = None
        if main:
            val = _validate(net, val_ds, labels, cfg.batch_size, device, dtype)
            row = {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_loss": val["loss"],
                "val_mean_auroc": val["mean_auroc"],
                "val_auroc": val["auroc"],
                "lr": schedule.get_last_lr()[0],
                "seconds": round(time.perf_counter() - began, 2),
                "images": len(train_ds),  # type: ignore[arg-type]
                "processes": ddp.world,
            }
            history.append(row)
            if best is None or _better(row, history[best - 1]):
                best = epoch
                _atomic_save({"model": plain_state_dict(net), "epoch": epoch}, run_dir / "best.pt")
                np.savez(run_dir / "val_scores.npz", **val["arrays"])
            with (run_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
            _atomic_save(
                {
                    "model": net.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "scaler": scaler.state_dict(),
                    "epoch": epoch,
                    "best_epoch": best,
                    "config_hash": cfg.config_hash(),
                    "rng": _rng_state(),
                },
                run_dir / "last.pt",
            )
            tracker.metrics(_flat(row), step=epoch)
            _log_epoch(row, cfg.epochs)
        else:
            history.append({"epoch": epoch, "train_loss": train_loss})
        best = ddp.from_main(best)
    if len(history) != cfg.epochs:  # cannot happen with the loop above; a resume bug would show here
        raise TrainingError(f"ran {len(history)} epochs, asked for {cfg.epochs}")
    checksums = ddp.gather(parameter_checksum(net))
    if len(set(checksums)) != 1:
        raise TrainingError(f"the {ddp.world} processes ended with different parameters: {checksums}")
    best_epoch = best or cfg.epochs
    result = TrainResult(
        run_dir=run_dir,
        epochs_run=len(history),
        best_epoch=best_epoch,
        best_val_mean_auroc=history[best_epoch - 1].get("val_mean_auroc"),
        history=history,
    )
    if main:
        summary = {
            "epochs": result.epochs_run,
            "best_epoch": best_epoch,
            "best_val_mean_auroc": result.best_val_mean_auroc,
            "config_hash": cfg.config_hash(),
            "device": device.type,
            "precision": str(dtype).removeprefix("torch."),
            "processes": ddp.world,
            "parameter_sha256_per_rank": checksums,
            "parameters": {
                "total": sum(p.numel() for p in net.parameters()),
                "trainable": sum(p.numel() for p in trainable),
            },
            "peak_memory_bytes": _peak_memory(device),
            "lora_rank": cfg.lora_rank,
            "mlflow": tracker.record(),
        }
        (run_dir / "run.json").write_text(json.dumps(summary, indent=2) + "\n")
        tracker.artifacts(
            run_dir / name for name in ("config.yaml", "data.json", "metrics.jsonl", "run.json")
        )
        tracker.finish()
    ddp.close()
    return result


def _start_tracking(cfg: TrainConfig, run_dir: Path, world: int, resumed: bool) -> Tracker:
    tags = {"kind": "train", "model": cfg.model, "run_dir": run_dir.name, "resumed": str(resumed)}
    tracker = Tracker.start(f"cxr-triage/{cfg.model}", run_dir.name, run_dir.parent, tags)
    tracker.params(cfg.model_dump() | {"config_hash": cfg.config_hash(), "processes": world})
    return tracker


def _flat(row: dict[str, Any]) -> dict[str, float | None]:
    """An epoch's metrics row as MLflow metrics: scalars, and per-label AUROC under val_auroc/."""
    flat = {k: v for k, v in row.items() if isinstance(v, int | float) and k not in ("epoch", "processes")}
    return flat | {f"val_auroc/{label}": v for label, v in row.get("val_auroc", {}).items()}


def _with_lora(net: nn.Module, cfg: TrainConfig) -> nn.Module:
    """LoRA adapters (peft) on ``cfg.lora_targets``; the classifier head trains in full."""
    from peft import LoraConfig, get_peft_model

    head = [n for n in ("head", "classifier", "fc") if isinstance(getattr(net, n, None), nn.Linear)]
    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        target_modules=list(cfg.lora_targets),
        lora_dropout=cfg.lora_dropout,
        modules_to_save=head,
    )
    try:
        wrapped = get_peft_model(net, lora)
    except ValueError as exc:  # no module matched the targets
        raise TrainingError(f"LoRA: {exc}; set lora_targets to module names of this network") from exc
    return wrapped


def plain_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """The weights as the plain timm network has them: LoRA adapters merged in (on a copy)."""
    if hasattr(net, "merge_and_unload"):
        merged: Any = copy.deepcopy(net)
        merged = merged.merge_and_unload()
        return {k: v.detach().cpu() for k, v in merged.state_dict().items()}
    return {k: v.detach().cpu() for k, v in net.state_dict().items()}


def _peak_memory(device: torch.device) -> int:
    """Peak memory of this process: CUDA allocations on a GPU, else the peak resident set."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _log_epoch(row: dict[str, Any], epochs: int) -> None:
    auroc = "n/a" if row["val_mean_auroc"] is None else f"{row['val_mean_auroc']:.3f}"
    log.info(
        "epoch %d/%d: train loss %.4f, val loss %.4f, val mean AUROC %s (%.0f s)",
        row["epoch"],
        epochs,
        row["train_loss"],
        row["val_loss"],
        auroc,
        row["seconds"],
    )


def parameter_checksum(model: nn.Module) -> str:
    """SHA-256 of every parameter, in order: equal on every rank of a healthy DDP run.

    Buffers are left out: BatchNorm running statistics follow each rank's last local batch
    (DDP re-broadcasts rank 0's at the next forward), and rank 0's are the ones saved.
    """
    digest = hashlib.sha256()
    for tensor in model.parameters():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class Distributed:
    """The process group torchrun set up (or a single process): rank, device, reductions."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0) -> None:
        self.rank, self.world, self.local_rank = rank, world, local_rank

    @classmethod
    def from_environment(cls) -> "Distributed":
        launch = TrainerSettings()
        world = launch.world_size
        if world <= 1:
            return cls()
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend)
        local_rank = launch.local_rank or 0
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        log.info("rank %d of %d (%s)", dist.get_rank(), world, backend)
        return cls(dist.get_rank(), world, local_rank)

    def device(self) -> torch.device:
        return torch.device(f"cuda:{self.local_rank}") if torch.cuda.is_available() else torch.device("cpu")

    def sampler(self, dataset: Dataset, seed: int) -> DistributedSampler | None:
        if self.world == 1:
            return None
        return DistributedSampler(dataset, self.world, self.rank, shuffle=True, seed=seed)

    def wrap(self, model: nn.Module) -> nn.Module:
        if self.world == 1:
            return model
        ids = [self.local_rank] if torch.cuda.is_available() else None
        return DistributedDataParallel(model, device_ids=ids)

    def mean(self, total: float, count: int) -> float:
        """Mean over every rank's items (each rank gives its sum and count)."""
        if self.world == 1:
            return total / max(1, count)
        t = torch.tensor([total, float(count)], dtype=torch.float64)
        if torch.cuda.is_available():
            t = t.cuda()
        dist.all_reduce(t)
        return float(t[0] / t[1].clamp(min=1))

    def from_main(self, value: Any) -> Any:
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        if self.world == 1:
            return [value]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def masked_bce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy over the known labels only (unknown cells contribute nothing)."""
    per_cell = nn.functional.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
    weight = mask.to(per_cell.dtype)
    return (per_cell * weight).sum() / weight.sum().clamp(min=1.0)


def _dataset(sets: Sequence[LabeledSet], config: ModelConfig, augment: bool, seed: int) -> Dataset:
    parts = [ImageDataset(s, config.labels, config.input, augment=augment, seed=seed) for s in sets]
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)


def _check_labels(sets: Sequence[LabeledSet], labels: Sequence[str]) -> None:
    matrices = [label_matrix(s, labels) for s in sets]
    masks = np.concatenate([mask for _, mask in matrices])
    positives = np.concatenate([t * m for t, m in matrices]) > 0
    known = [bool(masks[:, j].any()) for j in range(len(labels))]
    positive = [bool(positives[:, j].any()) for j in range(len(labels))]
    if not any(known):
        raise TrainingError(f"the data has none of the model's labels {list(labels)}")
    silent = [label for label, k, p in zip(labels, known, positive, strict=True) if not (k and p)]
    if silent:
        log.warning("the data has no positive case of %s: those outputs learn only 'absent'", silent)


def _check_loss(loss: torch.Tensor, epoch: int, step: int) -> None:
    value = loss.item()
    if not math.isfinite(value):
        raise TrainingError(f"loss is {value} at epoch {epoch} step {step}; lower the learning rate")
    if value <= 0.0:
        raise TrainingError(f"loss is {value} at epoch {epoch} step {step}: a zero loss trains nothing")


def _check_gradients(model: nn.Module) -> None:
    """After the first backward: every trainable parameter got a gradient, and not all zero."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    none = [n for n, p in trainable if p.grad is None]
    if none:
        raise TrainingError(f"{len(none)} trainable parameters received no gradient, e.g. {none[:3]}")
    total = sum(float(p.grad.detach().abs().sum()) for _, p in trainable if p.grad is not None)
    if not total > 0.0:
        raise TrainingError("every gradient is zero on the first step: the loss does not reach the model")


@torch.inference_mode()
def _validate(
    model: nn.Module,
    dataset: Dataset,
    labels: Sequence[str],
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, Any]:
    model.eval()
    scores, targets, masks, losses = [], [], [], []
    for x, y, mask in DataLoader(dataset, batch_size=batch_size):
        with _autocast(device, dtype):
            logits = model(x.to(device)).float()
        losses.append(masked_bce(logits, y.to(device), mask.to(device)).item() * len(x))
        scores.append(torch.sigmoid(logits).cpu().numpy())
        targets.append(y.numpy())
        masks.append(mask.numpy())
    arrays = {
        "scores": np.concatenate(scores),
        "targets": np.concatenate(targets),
        "mask": np.concatenate(masks),
    }
    thresholds = dict.fromkeys(labels, 0.5)
    report = evaluate(arrays["targets"], arrays["mask"], arrays["scores"], labels, thresholds, bootstrap=0)
    return {
        "loss": float(np.sum(losses) / max(1, len(arrays["scores"]))),
        "mean_auroc": report.mean_auroc,
        "auroc": {k: m.auroc for k, m in report.per_label.items() if m.auroc is not None},
        "arrays": arrays,
    }


def _better(row: dict[str, Any], best: dict[str, Any]) -> bool:
    if row["val_mean_auroc"] is not None and best["val_mean_auroc"] is not None:
        return bool(row["val_mean_auroc"] > best["val_mean_auroc"])
    return bool(row["val_loss"] < best["val_loss"])


def _warmup_cosine(total: int, warmup: int) -> Any:
    """LR factor per optimizer step: linear warm-up, then cosine down to 1% of the peak."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _autocast_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "fp32" or (precision == "auto" and device.type == "cpu"):
        return torch.float32
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp16" and device.type == "cpu":
        raise TrainingError("fp16 mixed precision needs CUDA; use --precision bf16 or fp32 on CPU")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def _autocast(device: torch.device, dtype: torch.dtype) -> AbstractContextManager[Any]:
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _load_init(model: nn.Module, cfg: TrainConfig, config: ModelConfig) -> None:
    from cxr_triage.train.importers import backbone_init_from

    assert cfg.init is not None
    state = backbone_init_from(Path(cfg.init), cfg.init_kind, config)
    result = model.load_state_dict(state, strict=False)
    head = {n for n, _ in model.named_parameters() if n.startswith(("classifier", "head", "fc"))}
    if result.unexpected_keys or set(result.missing_keys) - head:
        raise TrainingError(
            f"--init {Path(cfg.init).name} does not fit {config.architecture}: "
            f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    if result.missing_keys:
        log.info("initialised from %s; the classifier starts fresh", Path(cfg.init).name)


def _resume(
    run_dir: Path,
    cfg: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    main: bool = True,
) -> tuple[int, int | None, list[dict[str, Any]]]:
    state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)
    if state["config_hash"] != cfg.config_hash():
        raise TrainingError(
            f"{run_dir.name} was trained with another configuration (hash {state['config_hash']}, "
            f"now {cfg.config_hash()}); only --epochs may change on resume"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    scaler.load_state_dict(state["scaler"])
    random.setstate(state["rng"]["python"])
    np.random.set_state(state["rng"]["numpy"])
    torch.set_rng_state(state["rng"]["torch"])
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    history = [json.loads(line) for line in lines if line.strip()][: state["epoch"]]
    if len(history) != state["epoch"]:
        raise TrainingError(
            f"{run_dir.name}/metrics.jsonl has {len(history)} epochs, last.pt says {state['epoch']}"
        )
    if main:
        with (run_dir / "metrics.jsonl").open("w") as f:
            f.writelines(json.dumps(row) + "\n" for row in history)
        cfg.write(run_dir / "config.yaml")  # epochs may have grown
    return int(state["epoch"]), state.get("best_epoch"), history


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
