"""The CXR-ML-GZSL objective, as the paper states it: L = L_rank + γ1·L_align + γ2·L_con.

Where the paper and the reference code (``nyuad-cai/CXR-ML-GZSL``, ``zsl_models.py`` and
``loss.py``) disagree, this follows the paper:

- the reference multiplies L_align by ``0.0`` and computes it on ``.detach()``-ed latents, so
  the alignment term never trained anything; here it is added with weight γ1 and its gradient
  reaches the image encoder and both projections;
- the reference's L_con compares the mapped label similarities against a ``.detach()``-ed copy
  of the same latents (half the gradient is dropped); here both sides carry gradient;
- the reference's default margin is 0.03; the paper's δ is 0.5 (the default here).

Every term takes ``mask`` (N, L) bool: the labels that take part for each image (the seen
labels, and only where the image's label is known). Unseen labels never enter L_rank or
L_align, because no training image may carry them.
"""

from dataclasses import dataclass

import torch
from torch import nn

from cxr_triage.train.gzsl.model import cosine


def ranking_loss(
    scores: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, margin: float
) -> torch.Tensor:
    """L_rank: every positive label's score above every negative label's by ``margin`` (δ).

    ``(1/N) Σ_i Σ_{p ∈ P_i} Σ_{n ∈ N_i} max(0, δ + s_in − s_ip)``: a hinge over all
    (positive, negative) pairs of each image, summed per image and averaged over the N images
    of the batch (the paper's normalisation, and the reference's). An image without a positive
    (or without a negative) label has no pair and adds 0.
    """
    scores = scores.float()
    pos = (targets > 0.5) & mask
    neg = (targets <= 0.5) & mask
    hinge = torch.relu(margin + scores[:, None, :] - scores[:, :, None])  # [i, p, n]: δ + s_n − s_p
    pairs = (pos[:, :, None] & neg[:, None, :]).to(hinge.dtype)
    return (hinge * pairs).sum() / max(1, scores.shape[0])


def alignment_loss(
    image_latents: torch.Tensor, label_latents: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """L_align: each image's latent close (in cosine) to its positive labels' latents.

    ``mean_i (1 − cos(v_i, mean_{p ∈ P_i} t_p))`` over the images with at least one positive
    label (the reference's ``map_visual_text`` + ``CosineLoss``, without its ``detach``).
    0 when no image of the batch has a positive label.
    """
    pos = ((targets > 0.5) & mask).to(label_latents.dtype)
    count = pos.sum(dim=1)
    has = count > 0
    if not bool(has.any()):
        return image_latents.sum() * 0.0
    centroid = (pos[has] @ label_latents) / count[has, None]
    return (
        1.0 - nn.functional.cosine_similarity(image_latents[has].float(), centroid.float(), dim=-1)
    ).mean()


def consistency_loss(text_embeddings: torch.Tensor, label_latents: torch.Tensor) -> torch.Tensor:
    """L_con: label-to-label cosine similarities in text space kept in the latent space.

    ``mean_{j,k} |cos(a_j, a_k) − cos(t_j, t_k)|`` over every pair of labels (a: frozen text
    embeddings, t = fc_t(a): latents). Only ``fc_t`` receives its gradient.
    """
    return (
        (cosine(text_embeddings, text_embeddings).detach() - cosine(label_latents, label_latents))
        .abs()
        .mean()
    )


@dataclass(frozen=True)
class Terms:
    total: torch.Tensor
    rank: torch.Tensor
    align: torch.Tensor
    con: torch.Tensor

    def floats(self) -> dict[str, float]:
        return {k: float(getattr(self, k).detach()) for k in ("total", "rank", "align", "con")}


def objective(
    scores: torch.Tensor,
    image_latents: torch.Tensor,
    label_latents: torch.Tensor,
    text_embeddings: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    margin: float,
    gamma_align: float,
    gamma_con: float,
    con_labels: torch.Tensor | None = None,
) -> Terms:
    """The weighted sum and its three terms. ``con_labels`` (bool (L,)) limits L_con to some
    labels; by default all of the model's labels, seen and unseen (their names are known at
    training time; only their images are not), as the reference does."""
    rank = ranking_loss(scores, targets, mask, margin)
    align = alignment_loss(image_latents, label_latents, targets, mask)
    keep = slice(None) if con_labels is None else con_labels
    con = consistency_loss(text_embeddings[keep], label_latents[keep])
    return Terms(rank + gamma_align * align + gamma_con * con, rank, align, con)
