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
        self.backbone: Any = backbone  # a timm model: forward_features / forward_head / get_classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.backbone(x))


class WithSigmoidAndCam(WithSigmoid):
    """Probabilities plus class activation maps (Zhou et al. 2016) in one pass.

    For a CNN whose head is global average pooling then a linear layer,
    ``cam[c] = W[c] . features + b[c]`` at each position, and its spatial mean is exactly
    the logit of label c: the heatmap explains the score it sits beside.
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__(backbone)
        head = self.backbone.get_classifier()
        pool = getattr(backbone, "global_pool", None)
        if not isinstance(head, nn.Linear) or "avg" not in str(getattr(pool, "pool_type", "")):
            raise ExportError("heatmap: cam needs a CNN with average pooling and a linear head (DenseNet)")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        features = self.backbone.forward_features(x)
        logits = self.backbone.forward_head(features)
        head = self.backbone.get_classifier()
        cam = torch.einsum("nkhw,ck->nchw", features, head.weight) + head.bias[None, :, None, None]
        return torch.sigmoid(logits), cam


def export_module(config: ModelConfig) -> WithSigmoid:
    """The module that is exported for ``config``: probabilities, plus CAMs when configured."""
    backbone = build_backbone(config)
    return (WithSigmoidAndCam if config.heatmap == "cam" else WithSigmoid)(backbone).eval()


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
