"""Evaluate a multi-label classifier from score arrays: per-label AUROC with bootstrap CIs,
operating points at a target sensitivity, metrics at thresholds, calibration, and a report.

Works on arrays only (no torch), so the trainer and the promotion gate (which scores ONNX
engines) share it. Arrays are ``targets`` (N, L) 0/1, ``mask`` (N, L) bool (False: the label of
that image is unknown, so the cell is left out of every metric of that label) and ``scores``
(N, L) probabilities in [0, 1], columns in the order of ``labels``.
"""

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from pydantic import BaseModel, ConfigDict, Field
from sklearn.metrics import roc_auc_score, roc_curve

DEFAULT_TARGET_SENSITIVITY = 0.95
THRESHOLD_MIN, THRESHOLD_MAX = 1e-6, 1 - 1e-6  # model configs refuse thresholds of exactly 0 or 1
CALIBRATION_BINS = 10
SYNTHETIC_NOTE = (
    "Synthetic data: these figures say the training loop learns; they say nothing about clinical performance."
)
_CELLS_PER_CHUNK = 4_000_000  # bootstrap resamples are done in chunks of (resamples x images) this big


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OperatingPoint(_Frozen):
    """A threshold chosen to reach ``target_sensitivity`` on the data named by ``chosen_on``."""

    threshold: float = Field(..., gt=0.0, lt=1.0, description="positive where score >= threshold")
    target_sensitivity: float = Field(..., gt=0.0, le=1.0)
    sensitivity: float = Field(..., ge=0.0, le=1.0, description="achieved on the data it was chosen on")
    specificity: float = Field(..., ge=0.0, le=1.0)
    chosen_on: str = "validation"


class LabelMetrics(_Frozen):
    """One label over its masked-in images; ``auroc`` is None where the label has one class only."""

    n: int
    positives: int
    auroc: float | None = None
    auroc_ci95: tuple[float, float] | None = None
    threshold: float | None = None
    sensitivity: float | None = None
    specificity: float | None = None
    ppv: float | None = None
    npv: float | None = None
    f1: float | None = None


class EvaluationReport(_Frozen):
    labels: tuple[str, ...]
    per_label: dict[str, LabelMetrics]
    mean_auroc: float | None = Field(..., description="over evaluable labels only")
    evaluable: tuple[str, ...]
    not_evaluable: tuple[str, ...]
    n_images: int
    bootstrap: int = Field(..., description="resamples for the 95% CIs; 0: no CIs")
    seed: int
    brier: float | None = Field(None, description="pooled over the evaluable labels' masked-in cells")
    ece: float | None = Field(
        None, description=f"expected calibration error, {CALIBRATION_BINS} bins, pooled"
    )
    dataset: str = ""
    model: str = ""

    def summary(self) -> str:
        """A few lines for a terminal."""
        lines = []
        if self.model or self.dataset:
            lines.append(" | ".join(x for x in (self.model, self.dataset) if x))
        if self.mean_auroc is None:
            lines.append(f"mean AUROC: n/a (no label has both classes; {self.n_images} images)")
        else:
            lines.append(
                f"mean AUROC {self.mean_auroc:.4f} over {len(self.evaluable)}/{len(self.labels)} labels, "
                f"{self.n_images} images"
            )
        if self.brier is not None and self.ece is not None:
            lines.append(f"Brier {self.brier:.4f}  ECE {self.ece:.4f}")
        width = max((len(x) for x in self.labels), default=0)
        for label in self.evaluable:
            m = self.per_label[label]
            ci = f" [{m.auroc_ci95[0]:.3f}, {m.auroc_ci95[1]:.3f}]" if m.auroc_ci95 else ""
            at = (
                f"  sens {_fmt(m.sensitivity, 2)} spec {_fmt(m.specificity, 2)} @ {m.threshold:.4g}"
                if m.threshold is not None
                else ""
            )
            lines.append(f"  {label:<{width}}  AUROC {_fmt(m.auroc, 3)}{ci}{at}")
        if self.not_evaluable:
            lines.append(f"not evaluable (one class only): {', '.join(self.not_evaluable)}")
        return "\n".join(lines)


def choose_operating_points(
    targets: np.ndarray,
    mask: np.ndarray,
    scores: np.ndarray,
    labels: Sequence[str],
    target_sensitivity: float | Mapping[str, float] = DEFAULT_TARGET_SENSITIVITY,
    chosen_on: str = "validation",
) -> dict[str, OperatingPoint]:
    """Per evaluable label, the highest threshold whose sensitivity on these data meets the target.

    The highest such threshold keeps specificity as high as the target allows. It is the
    positive score at that point, clamped into [1e-6, 1 - 1e-6] (a clamp down only adds
    positives, so the target still holds; a clamp up, for positives scored below 1e-6, may
    miss it, and the achieved sensitivity says so). Labels with one class get no point.
    ``target_sensitivity``: one value, or per label (labels not named get 0.95).
    """
    y, m, s = _check(targets, mask, scores, labels)
    wanted = _targets_for(labels, target_sensitivity)
    points = {}
    for j, label in enumerate(labels):
        yj, sj = y[m[:, j], j], s[m[:, j], j]
        pos = np.sort(sj[yj == 1])[::-1]
        if not len(pos) or len(pos) == len(sj):
            continue
        # k positives at or above the k-th highest positive score; the fewest k that reach the target
        k = int(np.searchsorted(np.arange(1, len(pos) + 1) / len(pos), wanted[label] - 1e-12))
        threshold = min(max(float(pos[min(k, len(pos) - 1)]), THRESHOLD_MIN), THRESHOLD_MAX)
        counts = _counts(yj, sj, threshold)
        points[label] = OperatingPoint(
            threshold=threshold,
            target_sensitivity=wanted[label],
            sensitivity=counts["tp"] / (counts["tp"] + counts["fn"]),
            specificity=counts["tn"] / (counts["tn"] + counts["fp"]),
            chosen_on=chosen_on,
        )
    return points


def evaluate(
    targets: np.ndarray,
    mask: np.ndarray,
    scores: np.ndarray,
    labels: Sequence[str],
    thresholds: Mapping[str, float],
    bootstrap: int = 1000,
    seed: int = 0,
    dataset: str = "",
    model: str = "",
) -> EvaluationReport:
    """Per-label AUROC (with a percentile bootstrap 95% CI over images), metrics at ``thresholds``
    (positive: score >= threshold; labels without one get none), and pooled calibration.

    A label with no positive or no negative among its masked-in images is not evaluable: no
    AUROC, and it is left out of the mean. ``bootstrap=0`` skips the CIs.
    """
    y, m, s = _check(targets, mask, scores, labels)
    unknown = sorted(set(thresholds) - set(labels))
    if unknown:
        raise ValueError(f"thresholds for labels the model does not have: {unknown}")
    bad = {k: v for k, v in thresholds.items() if not (math.isfinite(v) and 0.0 <= v <= 1.0)}
    if bad:
        raise ValueError(f"thresholds must lie in [0, 1]; got {bad}")
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be >= 0; got {bootstrap}")
    columns = [(y[m[:, j], j], s[m[:, j], j]) for j in range(len(labels))]
    cols = [j for j, (yj, _) in enumerate(columns) if 0 < yj.sum() < len(yj)]
    evaluable = [labels[j] for j in cols]
    cis = _bootstrap_ci(y, m, s, cols, bootstrap, seed) if bootstrap else {}
    per_label = {}
    for j, (label, (yj, sj)) in enumerate(zip(labels, columns, strict=True)):
        threshold = thresholds.get(label)
        at = _at_threshold(_counts(yj, sj, float(threshold))) if threshold is not None else {}
        per_label[label] = LabelMetrics(
            n=len(yj),
            positives=int(yj.sum()),
            auroc=float(roc_auc_score(yj, sj)) if j in cols else None,
            auroc_ci95=cis.get(j),
            threshold=None if threshold is None else float(threshold),
            **at,
        )
    pooled_y = np.concatenate([columns[j][0] for j in cols]) if cols else np.empty(0)
    pooled_s = np.concatenate([columns[j][1] for j in cols]) if cols else np.empty(0)
    aurocs = [a for x in evaluable if (a := per_label[x].auroc) is not None]
    return EvaluationReport(
        labels=tuple(labels),
        per_label=per_label,
        mean_auroc=float(np.mean(aurocs)) if aurocs else None,
        evaluable=tuple(evaluable),
        not_evaluable=tuple(x for x in labels if x not in evaluable),
        n_images=len(y),
        bootstrap=bootstrap,
        seed=seed,
        brier=float(np.mean((pooled_s - pooled_y) ** 2)) if len(pooled_y) else None,
        ece=_ece(pooled_y, pooled_s) if len(pooled_y) else None,
        dataset=dataset,
        model=model,
    )


def write_report(
    report: EvaluationReport,
    out_dir: Path,
    targets: np.ndarray,
    mask: np.ndarray,
    scores: np.ndarray,
    operating_points: Mapping[str, OperatingPoint] | None = None,
) -> dict[str, Path]:
    """Write report.md, report.json, roc.png and calibration.png into ``out_dir``.

    The arrays must be those the report was computed from (the plots need the curves).
    report.json is ``{"report": ..., "operating_points": ...}``; the report part validates back
    with ``EvaluationReport.model_validate``.
    """
    y, m, s = _check(targets, mask, scores, report.labels)
    if len(y) != report.n_images:
        raise ValueError(f"the arrays have {len(y)} images; the report was computed on {report.n_images}")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": out_dir / "report.md",
        "json": out_dir / "report.json",
        "roc": out_dir / "roc.png",
        "calibration": out_dir / "calibration.png",
    }
    _plot_roc(report, y, m, s, paths["roc"])
    _plot_calibration(report, y, m, s, paths["calibration"])
    points = {k: p.model_dump(mode="json") for k, p in (operating_points or {}).items()}
    document: dict[str, Any] = {"report": report.model_dump(mode="json"), "operating_points": points}
    paths["json"].write_text(json.dumps(document, indent=2) + "\n")
    paths["markdown"].write_text(_markdown(report, operating_points or {}, paths))
    return paths


# -- checks and counts ---------------------------------------------------------------------------


def _check(
    targets: np.ndarray, mask: np.ndarray, scores: np.ndarray, labels: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float64 targets and scores, bool mask, after checking shapes and values."""
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels must be unique; got {list(labels)}")
    t, m, s = np.asarray(targets), np.asarray(mask), np.asarray(scores)
    shape = (s.shape[0] if s.ndim else 0, len(labels))
    for name, a in (("targets", t), ("mask", m), ("scores", s)):
        if a.ndim != 2 or a.shape != shape:
            raise ValueError(
                f"{name} has shape {a.shape}; expected (N, L) = {shape} for {len(labels)} labels, "
                "the same for targets, mask and scores"
            )
    if m.dtype != bool:
        if not np.isin(m, (0, 1)).all():
            raise ValueError("mask must be boolean (or 0/1)")
        m = m.astype(bool)
    s = s.astype(np.float64)
    if not np.isfinite(s).all():
        raise ValueError(f"scores must be finite; {int((~np.isfinite(s)).sum())} are NaN or infinite")
    if s.size and (s.min() < 0.0 or s.max() > 1.0):
        raise ValueError(f"scores must be probabilities in [0, 1]; got range [{s.min()}, {s.max()}]")
    t = t.astype(np.float64)
    known = t[m]
    if not np.isfinite(known).all():
        raise ValueError("targets must be finite where the mask is True")
    if not np.isin(known, (0.0, 1.0)).all():
        raise ValueError("targets must be 0 or 1 where the mask is True")
    return np.where(m, t, 0.0), m, s


def _targets_for(labels: Sequence[str], target: float | Mapping[str, float]) -> dict[str, float]:
    if isinstance(target, Mapping):
        unknown = sorted(set(target) - set(labels))
        if unknown:
            raise ValueError(f"target_sensitivity names labels the model does not have: {unknown}")
        wanted = {x: float(target.get(x, DEFAULT_TARGET_SENSITIVITY)) for x in labels}
    else:
        wanted = dict.fromkeys(labels, float(target))
    bad = {k: v for k, v in wanted.items() if not 0.0 < v <= 1.0}
    if bad:
        raise ValueError(f"target sensitivity must lie in (0, 1]; got {bad}")
    return wanted


def _counts(y: np.ndarray, s: np.ndarray, threshold: float) -> dict[str, int]:
    called, truth = s >= threshold, y == 1
    return {
        "tp": int((called & truth).sum()),
        "fp": int((called & ~truth).sum()),
        "tn": int((~called & ~truth).sum()),
        "fn": int((~called & truth).sum()),
    }


def _at_threshold(c: Mapping[str, int]) -> dict[str, float | None]:
    """Sensitivity, specificity, PPV, NPV and F1 from counts; None where a denominator is 0."""

    def ratio(a: int, b: int) -> float | None:
        return a / b if b else None

    tp, fp, tn, fn = c["tp"], c["fp"], c["tn"], c["fn"]
    return {
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "ppv": ratio(tp, tp + fp),
        "npv": ratio(tn, tn + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
    }


# -- bootstrap -----------------------------------------------------------------------------------


def _weighted_auroc(y: np.ndarray, s: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC (Mann-Whitney, ties count half) of one label under each row of ``weights`` (B, n).

    A row of bootstrap counts gives the AUROC of that resample; NaN where it has one class.
    """
    order = np.argsort(s, kind="stable")
    s, pos = s[order], y[order] == 1
    w = weights[:, order].astype(np.float64)
    wp, wn = np.where(pos, w, 0.0), np.where(pos, 0.0, w)
    cum = np.zeros((len(w), len(s) + 1))
    np.cumsum(wn, axis=1, out=cum[:, 1:])
    # each image's tie group [start, end) in sorted order
    new = np.r_[True, s[1:] != s[:-1]]
    starts = np.flatnonzero(new)
    group = np.cumsum(new) - 1
    ends = np.r_[starts[1:], len(s)]
    start, end = starts[group], ends[group]
    below = cum[:, start]
    tied = cum[:, end] - below
    num = (wp * (below + 0.5 * tied)).sum(axis=1)
    den = wp.sum(axis=1) * wn.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def bootstrap_aurocs(
    y: np.ndarray, m: np.ndarray, s: np.ndarray, cols: Sequence[int], resamples: int, seed: int
) -> dict[int, np.ndarray]:
    """The AUROC of each column of ``cols`` in each of ``resamples`` resamples of the images
    (with replacement); NaN where a resample leaves a label one class.

    Each resample is a row of counts (how often each image was drawn), so one sort per label
    serves every resample.
    """
    n = len(y)
    if not cols or not n:
        return {}
    rng = np.random.default_rng(seed)
    aurocs: dict[int, list[np.ndarray]] = {j: [] for j in cols}
    chunk = max(1, _CELLS_PER_CHUNK // n)
    for first in range(0, resamples, chunk):
        b = min(chunk, resamples - first)
        drawn = rng.integers(0, n, size=(b, n))
        counts = np.bincount((drawn + n * np.arange(b)[:, None]).ravel(), minlength=b * n).reshape(b, n)
        for j in cols:
            keep = m[:, j]
            aurocs[j].append(_weighted_auroc(y[keep, j], s[keep, j], counts[:, keep]))
    return {j: np.concatenate(parts) for j, parts in aurocs.items()}


def percentile_ci(values: np.ndarray) -> tuple[float, float] | None:
    """Percentile 95% interval of the finite ``values``; None when there are none."""
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    low, high = np.percentile(values, [2.5, 97.5])
    return (float(low), float(high))


def _bootstrap_ci(
    y: np.ndarray, m: np.ndarray, s: np.ndarray, cols: Sequence[int], resamples: int, seed: int
) -> dict[int, tuple[float, float]]:
    """Percentile 95% CIs of the AUROC of columns ``cols``, resampling images with replacement;
    resamples where a label has one class are skipped for that label."""
    aurocs = bootstrap_aurocs(y, m, s, cols, resamples, seed)
    return {j: ci for j, values in aurocs.items() if (ci := percentile_ci(values))}


# -- calibration ---------------------------------------------------------------------------------


def _reliability(y: np.ndarray, s: np.ndarray, bins: int = CALIBRATION_BINS) -> tuple[np.ndarray, ...]:
    """Per equal-width bin of score: count, mean score, fraction positive (NaN in empty bins)."""
    idx = np.minimum((s * bins).astype(int), bins - 1)
    count = np.bincount(idx, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_score = np.bincount(idx, weights=s, minlength=bins) / count
        frac_pos = np.bincount(idx, weights=y, minlength=bins) / count
    return count, mean_score, frac_pos


def _ece(y: np.ndarray, s: np.ndarray) -> float:
    count, mean_score, frac_pos = _reliability(y, s)
    used = count > 0
    return float(np.sum(count[used] / count.sum() * np.abs(frac_pos[used] - mean_score[used])))


# -- plots and markdown --------------------------------------------------------------------------


def _colors(k: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab20" if k > 10 else "tab10"]
    return [cmap(i % cmap.N) for i in range(k)]


def _plot_roc(report: EvaluationReport, y: np.ndarray, m: np.ndarray, s: np.ndarray, path: Path) -> None:
    fig = Figure(figsize=(7.5, 6.5), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="chance")
    for color, label in zip(_colors(len(report.evaluable)), report.evaluable, strict=True):
        j = report.labels.index(label)
        metrics = report.per_label[label]
        fpr, tpr, _ = roc_curve(y[m[:, j], j], s[m[:, j], j])
        ax.plot(fpr, tpr, color=color, linewidth=1.3, label=f"{label} ({metrics.auroc:.3f})")
        if metrics.sensitivity is not None and metrics.specificity is not None:
            ax.plot(1 - metrics.specificity, metrics.sensitivity, "o", color=color, markersize=5)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="1 - specificity", ylabel="sensitivity", aspect="equal")
    mean = f"mean AUROC {report.mean_auroc:.3f}" if report.mean_auroc is not None else "no evaluable label"
    ax.set_title(f"ROC ({mean}); dots: operating points", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7, title="label (AUROC)", title_fontsize=7)
    fig.savefig(path)


def _plot_calibration(
    report: EvaluationReport, y: np.ndarray, m: np.ndarray, s: np.ndarray, path: Path
) -> None:
    fig = Figure(figsize=(6.5, 7.5), dpi=110, layout="constrained")
    ax, hist = fig.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    ax.plot([0, 1], [0, 1], linestyle="--", color="0.6", linewidth=1, label="perfect calibration")
    cols = [report.labels.index(x) for x in report.evaluable]
    for color, j in zip(_colors(len(cols)), cols, strict=True):
        count, mean_score, frac_pos = _reliability(y[m[:, j], j], s[m[:, j], j])
        used = count > 0
        ax.plot(mean_score[used], frac_pos[used], color=color, alpha=0.25, linewidth=1)
    if cols:
        pooled_y = np.concatenate([y[m[:, j], j] for j in cols])
        pooled_s = np.concatenate([s[m[:, j], j] for j in cols])
        count, mean_score, frac_pos = _reliability(pooled_y, pooled_s)
        used = count > 0
        ax.plot(mean_score[used], frac_pos[used], "o-", color="black", linewidth=2, label="all labels")
        edges = np.linspace(0, 1, CALIBRATION_BINS + 1)
        hist.bar(edges[:-1], count, width=1 / CALIBRATION_BINS, align="edge", color="0.5", edgecolor="white")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="fraction positive")
    brier = f"Brier {report.brier:.4f}, ECE {report.ece:.4f}" if report.brier is not None else "no data"
    ax.set_title(f"Reliability ({CALIBRATION_BINS} bins; {brier}); faint: per label", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    hist.set(xlabel="predicted probability", ylabel="cells")
    hist.grid(alpha=0.3)
    fig.savefig(path)


def _fmt(v: float | None, digits: int = 3) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def _markdown(
    report: EvaluationReport, points: Mapping[str, OperatingPoint], paths: Mapping[str, Path]
) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = [
        "# Evaluation report",
        "",
        f"- Model: {report.model or 'not given'}",
        f"- Dataset: {report.dataset or 'not given'}",
        f"- Images: {report.n_images}",
    ]
    if "synthetic" in report.dataset.lower():
        lines += ["", f"**{SYNTHETIC_NOTE}**"]
    mean = _fmt(report.mean_auroc, 4)
    ci = (
        f"95% CIs: percentile bootstrap, {report.bootstrap} resamples of images, seed {report.seed}"
        if report.bootstrap
        else "no bootstrap CIs"
    )
    lines += [
        "",
        f"Mean AUROC: **{mean}** over {len(report.evaluable)} of {len(report.labels)} labels ({ci}).",
        "",
        f"Calibration (pooled over evaluable labels): Brier score {_fmt(report.brier, 4)}, "
        f"expected calibration error ({CALIBRATION_BINS} bins) {_fmt(report.ece, 4)}.",
        "",
        "Positive at a threshold: score >= threshold. n: images whose label is known (masked in).",
        "",
        "| Label | n | Positives | AUROC [95% CI] | Threshold | Sens | Spec | PPV | NPV | F1 |",
        "|---|--:|--:|---|--:|--:|--:|--:|--:|--:|",
    ]
    for label in report.labels:
        m = report.per_label[label]
        auroc = _fmt(m.auroc)
        if m.auroc_ci95:
            auroc += f" [{m.auroc_ci95[0]:.3f}, {m.auroc_ci95[1]:.3f}]"
        threshold = "—" if m.threshold is None else f"{m.threshold:.4g}"
        row = [cell(label), str(m.n), str(m.positives), auroc, threshold]
        row += [_fmt(v) for v in (m.sensitivity, m.specificity, m.ppv, m.npv, m.f1)]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    if report.not_evaluable:
        lines.append(f"Not evaluable (one class only among known labels): {', '.join(report.not_evaluable)}.")
    else:
        lines.append("Every label is evaluable.")
    if points:
        lines += [
            "",
            "## Operating points",
            "",
            "| Label | Target sens | Threshold | Sens | Spec | Chosen on |",
            "|---|--:|--:|--:|--:|---|",
        ]
        for label, p in points.items():
            lines.append(
                f"| {cell(label)} | {p.target_sensitivity:.3f} | {p.threshold:.4g} | {p.sensitivity:.3f} "
                f"| {p.specificity:.3f} | {cell(p.chosen_on)} |"
            )
    lines += [
        "",
        "## ROC curves",
        "",
        f"![ROC curves]({paths['roc'].name})",
        "",
        "## Calibration",
        "",
        f"![Reliability diagram]({paths['calibration'].name})",
        "",
    ]
    return "\n".join(lines)
