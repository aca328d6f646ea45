"""``cxr-triage retrain``: radiologists' labels in, a better served version out (or none).

Fine-tunes the served version of the model (its ``weights.pt``) on the feedback export,
plus a base dataset when given, registers the result with its own operating points, and
sends it through the promotion gate on a held-out set no image of the training came from.
A refused candidate stays registered, unserved, for a person to look at.
"""

import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cxr_triage.repository import ModelRepository
from cxr_triage.train.config import TrainConfig
from cxr_triage.train.datasets import load_dataset
from cxr_triage.train.export import WEIGHTS_FILE
from cxr_triage.train.promote import GateResult, apply_promotion, run_gate
from cxr_triage.train.registry import register_run
from cxr_triage.train.scoring import default_split
from cxr_triage.train.trainer import TrainingError, train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetrainOutcome:
    model: str
    base_version: str
    candidate: str
    run_dir: Path
    gate: GateResult
    promoted: bool

    def summary(self) -> str:
        verdict = "promoted" if self.promoted else "NOT promoted (registered only)"
        head = f"{self.model}: fine-tuned version {self.base_version} -> version {self.candidate}, {verdict}"
        return head + "\n" + self.gate.summary()


def retrain(
    repo: Path,
    feedback: Path,
    base: Path | None = None,
    holdout: Path | None = None,
    model: str | None = None,
    epochs: int = 3,
    lr: float = 1e-4,
    canary: float | None = None,
    run_dir: Path | None = None,
    progress: bool = True,
) -> RetrainOutcome:
    """Fine-tune, register, gate and (if it passes) promote; see the module docstring.

    Raises:
        TrainingError: no held-out set, or the served version has no PyTorch weights to start from.
    """
    entry = ModelRepository.load(repo, model, check_engines=False).get(model)
    current = entry.served
    if current is None or not (current.path / WEIGHTS_FILE).is_file():
        raise TrainingError(
            f"{entry.name} has no served version with {WEIGHTS_FILE} to fine-tune; "
            f"train one with `cxr-triage train {entry.name} --register` first"
        )
    if holdout is None and base is None:
        raise TrainingError("the gate needs a held-out set: pass --holdout, or --base with a test split")
    gate_data = holdout if holdout is not None else base
    assert gate_data is not None
    gate_split = default_split(gate_data, "test")
    held_out = load_dataset(gate_data, split=gate_split)
    cfg = TrainConfig(
        model=entry.name,
        data=(str(feedback),) + ((str(base),) if base else ()),
        epochs=epochs,
        lr=lr,
        warmup_epochs=0.0,
        init=str(current.path / WEIGHTS_FILE),
        init_kind="torch",
    )
    where = run_dir or Path("runs") / f"{entry.name}-retrain-{datetime.now():%Y%m%d-%H%M%S}"
    train(cfg, entry.config, where, progress=progress)
    candidate = register_run(where, repo).version
    gate = run_gate(repo, entry.name, candidate, held_out, gate_split)
    if gate.passed:
        apply_promotion(repo, gate, canary)
    else:
        log.warning(
            "%s version %s did not pass the gate; it stays registered, unserved", entry.name, candidate
        )
    return RetrainOutcome(entry.name, current.version, candidate, where, gate, gate.passed)
