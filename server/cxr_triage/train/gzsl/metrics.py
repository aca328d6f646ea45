"""The paper's table: AUROC per label, seen / unseen / harmonic means, and top-k retrieval.

Arrays only (no torch), like :mod:`cxr_triage.train.evaluate`, whose Mann-Whitney bootstrap
(:func:`~cxr_triage.train.evaluate._weighted_auroc`) gives the 95% intervals here too.
``scores`` are the model's cosine similarities (N, L) in [-1, 1]; AUROC is rank-based, so
their scale does not matter.

Top-k follows the multi-label zero-shot literature the paper compares with (LESA, MLZSL;
"overall" F1): over the images with at least one positive label (the reference's test set has
no "No Finding" image), each image's k best-scored labels among *all* labels (seen and unseen:
the generalised setting) are its predictions; precision = hits / (images · k), recall =
hits / positives, F1 their harmonic mean.
"""

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from sklearn.metrics import roc_auc_score

from cxr_triage.train.evaluate import bootstrap_aurocs, percentile_ci

PAPER = {"seen": 0.79, "unseen": 0.66, "harmonic": 0.72}
"""Hayat et al. 2021, Table 1 (ChestX-ray14 test split), for putting a run beside the paper."""


class TopK(BaseModel):
    model_config = ConfigDict(frozen=True)
    k: int
    precision: float
    recall: float
    f1: float


class GzslReport(BaseModel):
    """One evaluation, in the paper's columns; CIs are percentile bootstrap over images."""

    model_config = ConfigDict(frozen=True)

    labels: tuple[str, ...]
    seen: tuple[str, ...]
    unseen: tuple[str, ...]
    auroc: dict[str, float | None]
    auroc_ci95: dict[str, tuple[float, float]] = Field(default_factory=dict)
    positives: dict[str, int]
    seen_mean: float | None
    unseen_mean: float | None
    harmonic: float | None
    seen_mean_ci95: tuple[float, float] | None = None
    unseen_mean_ci95: tuple[float, float] | None = None
    harmonic_ci95: tuple[float, float] | None = None
    topk: list[TopK]
    controls: dict[str, dict[str, float | None]] = Field(
        default_factory=dict,
        description="per unseen label: AUROC with its own name's latent, with the other unseen "
        "names' latents (mean), and with the mean score over seen labels (an 'anything abnormal' "
        "detector): zero-shot transfer means own > both",
    )
    n_images: int
    topk_images: int
    bootstrap: int
    seed: int
    dataset: str = ""
    model: str = ""

    def summary(self) -> str:
        """The paper's table row, then one line per label."""
        lines = [" | ".join(x for x in (self.model, self.dataset) if x)] if self.model or self.dataset else []
        head = "".join(f"  r@{t.k}   p@{t.k}   f1@{t.k}" for t in self.topk)
        lines.append(f"{head}      S      U      H")
        row = "".join(f"  {t.recall:.3f} {t.precision:.3f} {t.f1:.3f}" for t in self.topk)
        lines.append(f"{row}  {_f(self.seen_mean)}  {_f(self.unseen_mean)}  {_f(self.harmonic)}")
        for name, ci in (
            ("seen mean", self.seen_mean_ci95),
            ("unseen mean", self.unseen_mean_ci95),
            ("harmonic", self.harmonic_ci95),
        ):
            if ci:
                lines.append(f"{name} AUROC 95% CI [{ci[0]:.3f}, {ci[1]:.3f}] ({self.bootstrap} resamples)")
        if self.controls:
            own = _mean([c["own_name"] for c in self.controls.values()])
            other = _mean([c["other_unseen_names"] for c in self.controls.values()])
            generic = _mean([c["mean_seen_score"] for c in self.controls.values()])
            lines.append(
                f"unseen controls (mean AUROC): own name {_f(own)}, other unseen names {_f(other)}, "
                f"mean seen score {_f(generic)}"
            )
        lines.append(
            f"paper (ChestX-ray14): S {PAPER['seen']}, U {PAPER['unseen']}, H {PAPER['harmonic']}; "
            f"{self.n_images} images, top-k over {self.topk_images} with a positive label"
        )
        width = max((len(x) for x in self.labels), default=0)
        for label in self.labels:
            ci = self.auroc_ci95.get(label)
            tag = "unseen" if label in self.unseen else "seen"
            interval = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
            lines.append(
                f"  {label:<{width}}  {tag:<6}  AUROC {_f(self.auroc[label])}{interval}"
                f"  ({self.positives[label]} positive)"
            )
        return "\n".join(lines)


def _f(v: float | None) -> str:
    return "  n/a" if v is None else f"{v:.3f}"


def harmonic(a: float | None, b: float | None) -> float | None:
    """2ab / (a + b); None when either is missing."""
    if a is None or b is None or a + b <= 0:
        return None
    return 2 * a * b / (a + b)


def top_k(targets: np.ndarray, mask: np.ndarray, scores: np.ndarray, k: int) -> TopK:
    """Overall precision / recall / F1 of each image's k best labels (images with a positive)."""
    positive = (targets > 0.5) & mask
    rows = positive.any(axis=1)
    if not rows.any():
        return TopK(k=k, precision=0.0, recall=0.0, f1=0.0)
    y, s = positive[rows], scores[rows]
    k = min(k, s.shape[1])
    best = np.argsort(-s, axis=1, kind="stable")[:, :k]
    hits = float(np.take_along_axis(y, best, axis=1).sum())
    precision, recall = hits / (len(y) * k), hits / float(y.sum())
    f1 = 0.0 if hits == 0 else 2 * precision * recall / (precision + recall)
    return TopK(k=k, precision=precision, recall=recall, f1=f1)


def gzsl_report(
    targets: np.ndarray,
    mask: np.ndarray,
    scores: np.ndarray,
    labels: Sequence[str],
    unseen: Sequence[str],
    ks: Sequence[int] = (2, 3),
    bootstrap: int = 1000,
    seed: int = 0,
    dataset: str = "",
    model: str = "",
) -> GzslReport:
    """Evaluate scores (N, L) against targets (N, L) 0/1 with mask (N, L) bool (False: unknown).

    A label with one class among its known images has no AUROC and is left out of its mean.

    Raises:
        ValueError: shapes that disagree, or unseen labels that are not labels.
    """
    y = np.asarray(targets, dtype=np.float64)
    m = np.asarray(mask, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    if not (y.shape == m.shape == s.shape) or y.ndim != 2 or y.shape[1] != len(labels):
        raise ValueError(
            f"targets {y.shape}, mask {m.shape}, scores {s.shape} and {len(labels)} labels disagree"
        )
    stray = [u for u in unseen if u not in labels]
    if stray:
        raise ValueError(f"unseen labels {stray} are not labels")
    if not np.isfinite(s).all():
        raise ValueError("scores hold NaN or infinity")
    seen = [x for x in labels if x not in unseen]
    auroc: dict[str, float | None] = {}
    cols = []
    for j, label in enumerate(labels):
        yj = y[m[:, j], j]
        ok = 0 < yj.sum() < len(yj)
        auroc[label] = float(roc_auc_score(yj, s[m[:, j], j])) if ok else None
        if ok:
            cols.append(j)
    seen_mean = _mean([auroc[x] for x in seen])
    unseen_mean = _mean([auroc[x] for x in unseen])
    report: dict[str, Any] = {}
    if bootstrap:
        report = _bootstrap(y, m, s, cols, list(labels), list(unseen), bootstrap, seed)
    return GzslReport(
        labels=tuple(labels),
        seen=tuple(seen),
        unseen=tuple(unseen),
        auroc=auroc,
        positives={x: int((y[:, j] * m[:, j]).sum()) for j, x in enumerate(labels)},
        seen_mean=seen_mean,
        unseen_mean=unseen_mean,
        harmonic=harmonic(seen_mean, unseen_mean),
        topk=[top_k(y, m, s, k) for k in ks],
        controls=unseen_controls(y, m, s, labels, unseen),
        n_images=len(y),
        topk_images=int(((y > 0.5) & m).any(axis=1).sum()),
        bootstrap=bootstrap,
        seed=seed,
        dataset=dataset,
        model=model,
        **report,
    )


def unseen_controls(
    targets: np.ndarray, mask: np.ndarray, scores: np.ndarray, labels: Sequence[str], unseen: Sequence[str]
) -> dict[str, dict[str, float | None]]:
    """Is an unseen label ranked by what its *name* says, or by anything abnormal?

    For each unseen label: AUROC of its ground truth under its own scores, under each other
    unseen label's scores (mean; a wrong name), and under the mean score over the seen labels.
    """
    seen_cols = [j for j, x in enumerate(labels) if x not in unseen]
    out: dict[str, dict[str, float | None]] = {}
    for u in unseen:
        j = list(labels).index(u)
        keep = mask[:, j]
        yj = targets[keep, j]
        if not 0 < yj.sum() < len(yj):
            continue
        others = [roc_auc_score(yj, scores[keep, list(labels).index(o)]) for o in unseen if o != u]
        generic = scores[keep][:, seen_cols].mean(axis=1) if seen_cols else None
        out[u] = {
            "own_name": float(roc_auc_score(yj, scores[keep, j])),
            "other_unseen_names": float(np.mean(others)) if others else None,
            "mean_seen_score": float(roc_auc_score(yj, generic)) if generic is not None else None,
        }
    return out


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return float(np.mean(known)) if known else None


def _bootstrap(
    y: np.ndarray,
    m: np.ndarray,
    s: np.ndarray,
    cols: Sequence[int],
    labels: list[str],
    unseen: list[str],
    resamples: int,
    seed: int,
) -> dict[str, Any]:
    """Per-label and mean-AUROC percentile 95% CIs from one set of image resamples."""
    values = bootstrap_aurocs(y, m, s, cols, resamples, seed)
    if not values:
        return {}
    is_unseen = {j: labels[j] in unseen for j in cols}

    def mean_of(unseen_side: bool) -> np.ndarray | None:
        picked = [values[j] for j in cols if is_unseen[j] == unseen_side]
        if not picked:
            return None
        with warnings.catch_warnings():  # a resample where no label of the side is evaluable
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nanmean(np.stack(picked), axis=0)

    seen_b, unseen_b = mean_of(False), mean_of(True)
    out: dict[str, Any] = {"auroc_ci95": {labels[j]: ci for j in cols if (ci := percentile_ci(values[j]))}}
    out["seen_mean_ci95"] = percentile_ci(seen_b) if seen_b is not None else None
    out["unseen_mean_ci95"] = percentile_ci(unseen_b) if unseen_b is not None else None
    if seen_b is not None and unseen_b is not None:
        with np.errstate(invalid="ignore", divide="ignore"):
            out["harmonic_ci95"] = percentile_ci(2 * seen_b * unseen_b / (seen_b + unseen_b))
    return out


__all__ = ["PAPER", "GzslReport", "TopK", "gzsl_report", "harmonic", "top_k", "unseen_controls"]
