"""The CXR-ML-GZSL network: image encoder, two projections, cosine scores.

``fc_v`` and ``fc_t`` keep the reference's layout (``Linear, ReLU, Linear, ReLU, Linear``,
1024/d_text -> 512 -> 256 -> 128), built by :func:`cxr_triage.train.importers.build_projection`,
so a CXR-ML-GZSL checkpoint's projections load into them unchanged.
"""

from collections.abc import Sequence
from typing import Any

import timm
import torch
from torch import nn

from cxr_triage.train.gzsl.text import SentenceEncoder
from cxr_triage.train.importers import build_projection

LATENT_DIM = 128
HIDDEN = (512, 256)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, d) x (M, d) -> (N, M) cosine similarities."""
    return nn.functional.normalize(a, dim=-1) @ nn.functional.normalize(b, dim=-1).T


class GzslModel(nn.Module):
    """Image encoder (timm, no classifier) + ``fc_v``; ``fc_t`` over the frozen label embeddings.

    ``text_embeddings`` (L, d_text) are the frozen text encoder's embeddings of the model's
    labels, computed once; they are a buffer (saved with the weights, never trained). The image
    encoder is built with ``pretrained=False``: nothing is downloaded.
    """

    text_embeddings: torch.Tensor
    encoder: Any  # a timm model: num_features, forward -> pooled features

    def __init__(
        self,
        text_embeddings: torch.Tensor,
        architecture: str = "densenet121",
        in_chans: int = 3,
        hidden: Sequence[int] = HIDDEN,
        latent_dim: int = LATENT_DIM,
    ) -> None:
        super().__init__()
        self.encoder = timm.create_model(architecture, pretrained=False, num_classes=0, in_chans=in_chans)
        features = int(self.encoder.num_features)
        self.fc_v = build_projection((features, *hidden, latent_dim))
        self.fc_t = build_projection((int(text_embeddings.shape[1]), *hidden, latent_dim))
        self.register_buffer("text_embeddings", text_embeddings.detach().float().clone())

    @property
    def feature_dim(self) -> int:
        return int(self.encoder.num_features)

    def image_latents(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) model input -> (N, latent) image latents (not normalised)."""
        return self.fc_v(self.encoder(x))

    def label_latents(self) -> torch.Tensor:
        """(L, latent) latents of the model's labels (not normalised)."""
        return self.fc_t(self.text_embeddings)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scores (N, L) in [-1, 1], image latents (N, latent), label latents (L, latent)."""
        image, labels = self.image_latents(x), self.label_latents()
        return cosine(image, labels), image, labels


class ImageTower(nn.Module):
    """What serving runs for an image: model input -> L2-normalised latent (N, latent)."""

    def __init__(self, model: GzslModel) -> None:
        super().__init__()
        self.encoder, self.fc_v = model.encoder, model.fc_v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.fc_v(self.encoder(x)), dim=-1)


class TextTower(nn.Module):
    """What serving runs for a finding's text: (input_ids, attention_mask) -> L2-normalised latent."""

    def __init__(self, encoder: SentenceEncoder, model: GzslModel) -> None:
        super().__init__()
        self.encoder, self.fc_t = encoder, model.fc_t

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.fc_t(self.encoder(input_ids, attention_mask)), dim=-1)
