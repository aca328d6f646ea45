"""The promotion gate (``cxr-triage promote``): a candidate serves only if it is not worse.

Both the served version and the candidate are scored by their ONNX engines on the same
held-out images; the candidate passes when its mean AUROC has not dropped by more than the
model's ``promotion.tolerance`` and no label's AUROC by more than ``per_label_tolerance``.
A passed gate writes serving.json (the running server swaps engines on its next poll),
as the default or as a canary taking a fraction of the traffic; the gate's figures are kept
in serving.json's history.
"""

import logging
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cxr_triage.errors import CxrError
from cxr_triage.repository import Canary, ServingState, read_serving_state, write_serving_state
from cxr_triage.train import tracking
from cxr_triage.train.datasets import LabeledSet
from cxr_triage.train.evaluate import evaluate
from cxr_triage.train.scoring import describe, find_version, score_version

log = logging.getLogger(__name__)


class PromotionRefused(CxrError):
    """The candidate is worse than the served version beyond the configured tolerance."""


@dataclass(frozen=True)
class GateResult:
    model: str
    candidate: str
    current: str
    passed: bool
    candidate_mean_auroc: float | None
    current_mean_auroc: float | None
    tolerance: float
    per_label_tolerance: float | None
    dataset: str
    reasons: list[str] = field(default_factory=list)
    label_deltas: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        verdict = "PASSED" if self.passed else "REFUSED"
        lines = [
            f"{self.model}: candidate version {self.candidate} vs served version {self.current}",
            f"  on {self.dataset}",
            f"  mean AUROC {_fmt(self.candidate_mean_auroc)} vs {_fmt(self.current_mean_auroc)} "
            f"(tolerance {self.tolerance})  -> {verdict}",
        ]
        lines += [f"  - {r}" for r in self.reasons]
        return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def run_gate(
    repo: Path, model: str, candidate: str, data: LabeledSet, split: str | None = None
) -> GateResult:
    """Score the served version and ``candidate`` on ``data`` and compare them."""
    config, cand = find_version(repo, model, candidate)
    _, current = find_version(repo, model, None)
    if current.version == cand.version:
        raise PromotionRefused(f"{model} version {candidate} already serves")
    spec = config.promotion
    reports = {}
    for version in (cand, current):
        scored = score_version(version, config, data)
        reports[version.version] = evaluate(
            scored.targets,
            scored.mask,
            scored.scores,
            config.labels,
            version.metadata.thresholds_for(config),
            bootstrap=0,
        )
    new, old = reports[cand.version], reports[current.version]
    reasons, deltas = [], {}
    if new.mean_auroc is None:
        reasons.append("no label of the held-out set has both classes: nothing to compare on")
    elif old.mean_auroc is not None and new.mean_auroc < old.mean_auroc - spec.tolerance:
        reasons.append(
            f"mean AUROC fell by {old.mean_auroc - new.mean_auroc:.4f} (> tolerance {spec.tolerance})"
        )
    reasons += _int8_reasons(cand.metadata)
    for label in new.evaluable:
        a, b = new.per_label[label].auroc, old.per_label[label].auroc
        if a is None or b is None:
            continue
        deltas[label] = a - b
        if spec.per_label_tolerance is not None and b - a > spec.per_label_tolerance:
            reasons.append(f"{label} AUROC fell by {b - a:.4f} (> {spec.per_label_tolerance})")
    return GateResult(
        model=model,
        candidate=cand.version,
        current=current.version,
        passed=not reasons,
        candidate_mean_auroc=new.mean_auroc,
        current_mean_auroc=old.mean_auroc,
        tolerance=spec.tolerance,
        per_label_tolerance=spec.per_label_tolerance,
        dataset=describe(data, split),
        reasons=reasons,
        label_deltas=deltas,
    )


def _int8_reasons(metadata: Any) -> list[str]:
    """An int8 engine is kept only where it pays: faster than its fp32 source, measured here."""
    if getattr(metadata, "precision", "fp32") != "int8":
        return []
    speed = getattr(metadata, "speed", {}) or {}
    try:
        ratios = [speed[f"int8_b{b}"] / speed[f"fp32_b{b}"] for b in (1, 8)]
    except (KeyError, TypeError, ZeroDivisionError):
        return ["int8 version without a speed measurement; re-quantize it"]
    if min(ratios) <= 1.0:
        shown = ", ".join(f"batch {b}: {r:.2f}x" for b, r in zip((1, 8), ratios, strict=True))
        return [f"int8 is not faster than fp32 on {speed.get('measured_on', 'this machine')} ({shown})"]
    return []


def promote(
    repo: Path,
    model: str,
    candidate: str,
    data: LabeledSet,
    split: str | None = None,
    canary: float | None = None,
) -> GateResult:
    """Run the gate; when it passes, make ``candidate`` the served version (or its canary).

    Raises:
        PromotionRefused: the gate failed (serving.json is left as it was).
    """
    gate = run_gate(repo, model, candidate, data, split)
    if not gate.passed:
        raise PromotionRefused(gate.summary())
    apply_promotion(repo, gate, canary)
    return gate


def apply_promotion(repo: Path, gate: GateResult, canary: float | None = None) -> ServingState:
    """Write serving.json for a passed gate, keeping the gate's figures in its history."""
    if not gate.passed:
        raise PromotionRefused(gate.summary())
    model_dir = repo / gate.model
    before = read_serving_state(model_dir)
    record: dict[str, Any] = {
        "at": datetime.now(UTC).isoformat(),
        "action": "canary" if canary else "promote",
        **{k: v for k, v in asdict(gate).items() if k != "label_deltas"},
    }
    history = (before.history if before else ()) + (record,)
    if canary:
        state = ServingState(
            default_version=gate.current,
            canary=Canary(version=gate.candidate, fraction=canary),
            history=history,
        )
    else:
        state = ServingState(default_version=gate.candidate, history=history)
    write_serving_state(model_dir, state)
    _move_aliases(repo, gate.model, gate.candidate, canary is not None)
    where = f"canary at {canary:.0%}" if canary else "serves"
    log.info("%s: version %s now %s", gate.model, gate.candidate, where)
    return state


def rollback(repo: Path, model: str, version: str) -> ServingState:
    """Serve an earlier version again at once (no gate: it served before), dropping any canary."""
    _, entry = find_version(repo, model, version)
    model_dir = repo / model
    before = read_serving_state(model_dir)
    record = {"at": datetime.now(UTC).isoformat(), "action": "rollback", "to": entry.version}
    state = ServingState(
        default_version=entry.version, history=(before.history if before else ()) + (record,)
    )
    write_serving_state(model_dir, state)
    _move_aliases(repo, model, entry.version, canary=False)
    return state


def _move_aliases(repo: Path, model: str, version: str, canary: bool) -> None:
    """Keep the MLflow registry in step: `champion` serves, `challenger` is the canary."""
    _, entry = find_version(repo, model, version)
    record = getattr(entry.metadata, "mlflow", None)
    if canary:
        tracking.move_alias(model, record, version, tracking.CHALLENGER)
        return
    tracking.move_alias(model, record, version, tracking.CHAMPION)
    tracking.drop_alias(model, record, tracking.CHALLENGER)
