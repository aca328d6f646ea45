"""Model construction with timm, from a model_repo config."""

from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from cxr_triage.errors import ExportError
from cxr_triage.repository.models import ModelConfig


class WithSigmoid(nn.Module):
    """Engines output probabilities (multi-label: one sigmoid per label)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.backbone(x))


def build_backbone(config: ModelConfig) -> nn.Module:
    """The timm network for ``config`` with one logit per label; never downloads weights."""
    kwargs: dict[str, Any] = {"num_classes": len(config.labels), "in_chans": config.input.channels}
    if "vit" in config.architecture:
        kwargs["img_size"] = config.input.size
    kwargs.update(config.architecture_kwargs)
    return timm.create_model(config.architecture, pretrained=False, **kwargs)


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a state dict saved by torch (a bare state dict, or under "state_dict"/"model").

    Raises:
        ExportError: the file does not fit the architecture (lists the mismatching keys).
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ExportError(f"{path.name} does not fit this architecture: {str(exc)[:400]}") from exc
    if result.missing_keys or result.unexpected_keys:
        raise ExportError(
            f"{path.name} does not fit this architecture: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}; check the model name and the number of labels"
        )
