"""The training run's configuration: one typed file, recorded next to every run.

Every default lives here, once, and is written into the run's ``config.yaml`` with the values
actually used, so a run can be repeated and nobody has to guess which default applied.
"""

import hashlib
import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from cxr_triage.train.datasets import UncertaintyPolicy

Precision = Literal["auto", "fp32", "bf16", "fp16"]
InitKind = Literal["torch", "torchxrayvision", "gzsl"]


class TrainConfig(BaseModel):
    """What ``cxr-triage train`` does. Fields that change the result are hashed (``config_hash``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(..., description="model_repo model to train (its config.yaml gives labels and input)")
    data: tuple[str, ...] = Field(
        ..., min_length=1, description="dataset folders (ChestX-ray14, CheXpert, feedback)"
    )
    uncertainty: UncertaintyPolicy = Field(
        "ones", description="CheXpert uncertain labels: ones, zeros, ignore"
    )
    val_fraction: float = Field(0.15, gt=0.0, lt=0.9, description="patients held out for validation")
    epochs: int = Field(8, ge=1, le=10_000, description="exactly this many passes over the training split")
    batch_size: int = Field(16, ge=1, le=4096)
    accumulate: int = Field(1, ge=1, le=1024, description="gradient accumulation: micro-batches per step")
    lr: float = Field(1e-3, gt=0.0, le=1.0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(1e-4, ge=0.0, le=1.0)
    warmup_epochs: float = Field(0.5, ge=0.0, description="linear warm-up, then cosine decay to lr/100")
    augment: bool = Field(True, description="small random affine + intensity jitter (no flips)")
    precision: Precision = Field(
        "auto", description="auto: bf16 on CUDA when supported, fp16 on other CUDA, fp32 on CPU"
    )
    seed: int = 0
    workers: int = Field(0, ge=0, le=64, description="DataLoader worker processes")
    init: str | None = Field(None, description="weights to start from (a state dict, or an importer's input)")
    lora_rank: int = Field(
        0, ge=0, le=1024, description="LoRA adapters of this rank (peft); 0: train every weight"
    )
    lora_alpha: int = Field(16, gt=0, description="LoRA scaling numerator (scale = alpha / rank)")
    lora_targets: tuple[str, ...] = Field(
        ("qkv",), description="modules that get adapters (timm ViT: qkv, proj)"
    )
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    grad_checkpointing: bool = Field(
        False, description="recompute activations in backward: less memory, slower"
    )
    init_kind: InitKind = "torch"

    def config_hash(self) -> str:
        """Hash of everything that changes the trained weights (not ``epochs`` or ``workers``)."""
        fields = self.model_dump(exclude={"epochs", "workers"})
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    def write(self, path: Path) -> None:
        path.write_text(
            "# Resolved training configuration (every default filled in); `cxr-triage train --config`\n"
            + yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)
        )

    @classmethod
    def read(cls, path: Path) -> "TrainConfig":
        return cls.model_validate(yaml.safe_load(path.read_text()))
