import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from cxr_triage.train.evaluate import (
    DEFAULT_TARGET_SENSITIVITY,
    SYNTHETIC_NOTE,
    EvaluationReport,
    OperatingPoint,
    _weighted_auroc,
    choose_operating_points,
    evaluate,
    write_report,
)

LABELS = ("Atelectasis", "Effusion", "Mass")


def random_data(n: int = 400, seed: int = 0, signal: float = 0.3, labels: tuple[str, ...] = LABELS):
    """Targets, mask (about 10% unknown), and scores that lean towards the truth by ``signal``."""
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, len(labels))) < 0.3).astype(np.float32)
    mask = rng.random((n, len(labels))) > 0.1
    scores = np.clip(signal * targets + (1 - signal) * rng.random((n, len(labels))), 0, 1)
    return targets, mask, scores.astype(np.float32)


def brute_force_threshold(y: np.ndarray, s: np.ndarray, target: float) -> float:
    """The highest candidate threshold (every score, clamped) whose sensitivity meets the target."""
    candidates = sorted({min(max(float(v), 1e-6), 1 - 1e-6) for v in s}, reverse=True)
    for t in candidates:
        if (s[y == 1] >= t).mean() >= target:
            return t
    raise AssertionError("no threshold meets the target")


def test_perfect_scores_give_auroc_one_with_ci_one() -> None:
    targets = np.array([[0], [0], [1], [1], [0], [1]] * 10, dtype=float)
    mask = np.ones_like(targets, dtype=bool)
    report = evaluate(targets, mask, targets * 0.8 + 0.1, ["Mass"], {"Mass": 0.5}, bootstrap=200)
    m = report.per_label["Mass"]
    assert m.auroc == 1.0 and m.auroc_ci95 == (1.0, 1.0) and report.mean_auroc == 1.0
    assert (m.sensitivity, m.specificity, m.ppv, m.npv, m.f1) == (1.0, 1.0, 1.0, 1.0, 1.0)


def test_random_scores_give_auroc_near_half_with_ci_containing_half() -> None:
    rng = np.random.default_rng(3)
    targets = (rng.random((4000, 2)) < 0.5).astype(float)
    report = evaluate(targets, np.ones((4000, 2), bool), rng.random((4000, 2)), ["A", "B"], {}, bootstrap=300)
    for label in ("A", "B"):
        m = report.per_label[label]
        assert m.auroc is not None and m.auroc_ci95 is not None
        assert abs(m.auroc - 0.5) < 0.03
        assert m.auroc_ci95[0] < 0.5 < m.auroc_ci95[1] and m.auroc_ci95[1] - m.auroc_ci95[0] < 0.06
        assert m.threshold is None and m.sensitivity is None


def test_auroc_matches_sklearn_on_masked_cells() -> None:
    targets, mask, scores = random_data()
    report = evaluate(targets, mask, scores, LABELS, {}, bootstrap=0)
    for j, label in enumerate(LABELS):
        keep = mask[:, j]
        want = roc_auc_score(targets[keep, j], scores[keep, j])
        assert report.per_label[label].auroc == pytest.approx(want, rel=1e-12)
        assert report.per_label[label].n == keep.sum()
        assert report.per_label[label].positives == targets[keep, j].sum()
        assert report.per_label[label].auroc_ci95 is None
    assert report.mean_auroc == pytest.approx(np.mean([report.per_label[x].auroc for x in LABELS]))


def test_bootstrap_auroc_of_counts_matches_weighted_sklearn_with_ties() -> None:
    rng = np.random.default_rng(5)
    y = (rng.random(300) < 0.3).astype(float)
    s = np.round(rng.random(300), 1)  # many ties
    weights = rng.integers(0, 4, size=(6, 300))
    got = _weighted_auroc(y, s, weights)
    want = [roc_auc_score(y, s, sample_weight=w) for w in weights]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    one_class = np.where(y == 1, 0, 1)[None]
    assert np.isnan(_weighted_auroc(y, s, one_class))[0]


def test_one_class_label_is_not_evaluable_and_left_out_of_the_mean() -> None:
    targets, mask, scores = random_data()
    targets[:, 2] = 0.0
    targets[~mask[:, 1], 1] = 1.0  # positives only where the mask hides them: one class among known cells
    targets[mask[:, 1], 1] = 0.0
    report = evaluate(targets, mask, scores, LABELS, {"Mass": 0.5}, bootstrap=50)
    assert report.evaluable == ("Atelectasis",) and report.not_evaluable == ("Effusion", "Mass")
    assert report.per_label["Mass"].auroc is None and report.per_label["Mass"].auroc_ci95 is None
    assert report.mean_auroc == report.per_label["Atelectasis"].auroc
    assert report.per_label["Mass"].sensitivity is None and report.per_label["Mass"].specificity is not None
    assert "Effusion" not in choose_operating_points(targets, mask, scores, LABELS)
    none = evaluate(np.zeros((5, 1)), np.ones((5, 1), bool), np.full((5, 1), 0.5), ["A"], {}, bootstrap=10)
    assert none.mean_auroc is None and none.brier is None and none.ece is None


def test_masked_cells_change_nothing() -> None:
    targets, mask, scores = random_data()
    thresholds = {x: 0.4 for x in LABELS}
    before = evaluate(targets, mask, scores, LABELS, thresholds, bootstrap=100, seed=7)
    points = choose_operating_points(targets, mask, scores, LABELS)
    changed = targets.copy()
    changed[~mask] = 1 - changed[~mask]
    changed_scores = scores.copy()
    changed_scores[~mask] = 0.5
    assert evaluate(changed, mask, changed_scores, LABELS, thresholds, bootstrap=100, seed=7) == before
    assert choose_operating_points(changed, mask, changed_scores, LABELS) == points
    nan_targets = targets.copy()
    nan_targets[~mask] = np.nan  # unknown cells may hold anything
    assert evaluate(nan_targets, mask, scores, LABELS, thresholds, bootstrap=100, seed=7) == before


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, DEFAULT_TARGET_SENSITIVITY, 1.0])
def test_operating_point_is_the_highest_threshold_meeting_the_target(target: float) -> None:
    targets, mask, scores = random_data(n=300, seed=11)
    scores = np.round(scores, 2)  # ties
    points = choose_operating_points(targets, mask, scores, LABELS, target, chosen_on="test-val")
    assert set(points) == set(LABELS)
    for j, label in enumerate(LABELS):
        y, s = targets[mask[:, j], j], scores[mask[:, j], j]
        p = points[label]
        assert p.threshold == brute_force_threshold(y, s, target)
        assert p.sensitivity == pytest.approx((s[y == 1] >= p.threshold).mean()) and p.sensitivity >= target
        assert p.specificity == pytest.approx((s[y == 0] < p.threshold).mean())
        assert p.target_sensitivity == target and p.chosen_on == "test-val"


def test_per_label_targets_default_to_the_module_constant() -> None:
    targets, mask, scores = random_data(n=500, seed=2)
    points = choose_operating_points(targets, mask, scores, LABELS, {"Mass": 0.6})
    assert points["Mass"].target_sensitivity == 0.6
    assert points["Effusion"].target_sensitivity == DEFAULT_TARGET_SENSITIVITY
    assert points["Mass"].sensitivity >= 0.6
    strict = choose_operating_points(targets, mask, scores, LABELS)
    assert points["Mass"].threshold >= strict["Mass"].threshold
    with pytest.raises(ValueError, match="Nodule"):
        choose_operating_points(targets, mask, scores, LABELS, {"Nodule": 0.9})
    with pytest.raises(ValueError, match="0, 1"):
        choose_operating_points(targets, mask, scores, LABELS, 0.0)


def test_thresholds_stay_strictly_inside_zero_one() -> None:
    targets = np.array([[1, 1], [1, 1], [0, 0], [0, 0]], dtype=float)
    scores = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    points = choose_operating_points(targets, np.ones((4, 2), bool), scores, ["A", "B"], 1.0)
    a, b = points["A"], points["B"]
    assert 0 < a.threshold < 1 and a.threshold == 1 - 1e-6
    assert (a.sensitivity, a.specificity) == (1.0, 1.0)
    assert 0 < b.threshold < 1 and b.threshold == 1e-6  # positives scored 0 cannot be caught inside (0, 1)
    assert b.sensitivity == 0.0  # and the achieved sensitivity says so
    with pytest.raises(ValueError):
        OperatingPoint(threshold=1.0, target_sensitivity=0.9, sensitivity=1, specificity=1, chosen_on="v")


def test_metrics_at_threshold_match_hand_counts() -> None:
    # score >= 0.5 is positive:  TP = 2 (0.9, 0.5), FN = 1 (0.2), FP = 1 (0.7), TN = 3 (0.1, 0.3, 0.49)
    y = np.array([1, 1, 1, 0, 0, 0, 0], dtype=float)[:, None]
    s = np.array([0.9, 0.5, 0.2, 0.7, 0.1, 0.3, 0.49])[:, None]
    mask = np.ones_like(y, dtype=bool)
    m = evaluate(y, mask, s, ["A"], {"A": 0.5}, bootstrap=0).per_label["A"]
    assert m.sensitivity == pytest.approx(2 / 3) and m.specificity == pytest.approx(3 / 4)
    assert m.ppv == pytest.approx(2 / 3) and m.npv == pytest.approx(3 / 4)
    assert m.f1 == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    high = evaluate(y, mask, s, ["A"], {"A": 0.95}, bootstrap=0).per_label["A"]
    assert high.sensitivity == 0.0 and high.ppv is None and high.f1 == 0.0
    assert high.npv == pytest.approx(4 / 7)


def test_calibration_scores() -> None:
    y = np.array([0, 1, 0, 1], dtype=float)[:, None]
    s = np.array([0.05, 0.95, 0.25, 0.25])[:, None]
    report = evaluate(y, np.ones_like(y, bool), s, ["A"], {}, bootstrap=0)
    assert report.brier == pytest.approx((0.05**2 + 0.05**2 + 0.25**2 + 0.75**2) / 4)
    # bins: [0.0, 0.1) -> |0 - 0.05|, [0.2, 0.3) -> |0.5 - 0.25| (2 cells), [0.9, 1.0] -> |1 - 0.95|
    assert report.ece == pytest.approx((0.05 + 2 * 0.25 + 0.05) / 4)


def test_bootstrap_is_deterministic_for_a_seed_and_quick() -> None:
    targets, mask, scores = random_data(n=2000, labels=tuple(f"L{i}" for i in range(14)))
    labels = [f"L{i}" for i in range(14)]
    start = time.perf_counter()
    a = evaluate(targets, mask, scores, labels, {}, bootstrap=1000, seed=4)
    assert time.perf_counter() - start < 10
    small = evaluate(targets, mask, scores, labels, {}, bootstrap=100, seed=4)
    assert small == evaluate(targets, mask, scores, labels, {}, bootstrap=100, seed=4)
    other = evaluate(targets, mask, scores, labels, {}, bootstrap=100, seed=5)
    assert small.per_label["L0"].auroc_ci95 != other.per_label["L0"].auroc_ci95
    for label in labels:
        m = a.per_label[label]
        assert m.auroc is not None and m.auroc_ci95 is not None
        assert m.auroc_ci95[0] <= m.auroc <= m.auroc_ci95[1]


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda t, m, s: (t[:, :2], m, s), "targets has shape"),
        (lambda t, m, s: (t, m[:-1], s), "mask has shape"),
        (lambda t, m, s: (t, m, s[:, 0]), "scores has shape"),
        (lambda t, m, s: (t, m, np.where(np.eye(*s.shape) > 0, np.nan, s)), "finite"),
        (lambda t, m, s: (t, m, s + 1.5), r"\[0, 1\]"),
        (lambda t, m, s: (np.where(m, np.nan, t), m, s), "targets must be finite"),
        (lambda t, m, s: (t * 2, m, s), "0 or 1"),
    ],
)
def test_bad_inputs_raise_value_error(change, match: str) -> None:
    targets, mask, scores = random_data(n=20)
    t, m, s = change(targets, mask, scores)
    with pytest.raises(ValueError, match=match):
        evaluate(t, m, s, LABELS, {})
    with pytest.raises(ValueError, match=match):
        choose_operating_points(t, m, s, LABELS)


def test_bad_labels_and_thresholds_raise_value_error() -> None:
    targets, mask, scores = random_data(n=20)
    with pytest.raises(ValueError, match="shape"):
        evaluate(targets, mask, scores, LABELS[:2], {})
    with pytest.raises(ValueError, match="unique"):
        evaluate(targets, mask, scores, ("A", "A", "B"), {})
    with pytest.raises(ValueError, match="Nodule"):
        evaluate(targets, mask, scores, LABELS, {"Nodule": 0.5})
    with pytest.raises(ValueError, match="thresholds"):
        evaluate(targets, mask, scores, LABELS, {"Mass": float("nan")})


def test_write_report_writes_four_files_that_round_trip(tmp_path: Path) -> None:
    targets, mask, scores = random_data(n=240)
    targets[:, 2] = 0.0  # Mass: not evaluable
    points = choose_operating_points(targets, mask, scores, LABELS)
    report = evaluate(
        targets,
        mask,
        scores,
        LABELS,
        {**{x: 0.5 for x in LABELS}, **{k: p.threshold for k, p in points.items()}},
        bootstrap=100,
        dataset="synthetic (not clinical): test split, 240 images",
        model="densenet121-nih14 version 3",
    )
    paths = write_report(report, tmp_path / "out", targets, mask, scores, points)
    assert set(paths) == {"markdown", "json", "roc", "calibration"}
    assert all(p.is_file() and p.parent == tmp_path / "out" for p in paths.values())
    for key in ("roc", "calibration"):
        assert paths[key].stat().st_size > 10_000
        with Image.open(paths[key]) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 300
            image.verify()
    md = paths["markdown"].read_text()
    assert all(label in md for label in LABELS)
    assert f"**{SYNTHETIC_NOTE}**" in md and "densenet121-nih14 version 3" in md
    assert "](roc.png)" in md and "](calibration.png)" in md and "Not evaluable" in md
    document = json.loads(paths["json"].read_text())
    assert EvaluationReport.model_validate(document["report"]) == report
    assert {k: OperatingPoint.model_validate(v) for k, v in document["operating_points"].items()} == points
    assert "Brier" in report.summary() and "Mass" in report.summary()


def test_markdown_has_no_disclaimer_for_real_data(tmp_path: Path) -> None:
    targets, mask, scores = random_data(n=60)
    report = evaluate(targets, mask, scores, LABELS, {}, bootstrap=0, dataset="nih14: test split")
    paths = write_report(report, tmp_path, targets, mask, scores)
    assert SYNTHETIC_NOTE not in paths["markdown"].read_text()
    assert json.loads(paths["json"].read_text())["operating_points"] == {}
    with pytest.raises(ValueError, match="images"):
        write_report(report, tmp_path, targets[:10], mask[:10], scores[:10])
