"""The paper's table from score arrays: AUROC per label, seen / unseen / harmonic, top-k."""

import numpy as np
import pytest

from cxr_triage.train.gzsl.metrics import gzsl_report, harmonic, top_k

LABELS = ("a", "b", "c", "d")
UNSEEN = ("c", "d")


def _data(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 4)) < 0.3).astype(np.float32)
    s = rng.uniform(-1, 1, (n, 4)).astype(np.float32)
    s[:, 0] = np.where(y[:, 0] > 0, 0.9, -0.9)  # a: perfect
    s[:, 1] = np.where(y[:, 1] > 0, -0.5, 0.5)  # b: perfectly wrong
    s[:, 2] = y[:, 2] * 0.5 + rng.normal(0, 0.3, n)  # c: informative
    return y, np.ones_like(y, dtype=bool), s


def test_means_and_harmonic() -> None:
    y, m, s = _data()
    report = gzsl_report(y, m, s, LABELS, UNSEEN, bootstrap=0)
    assert report.auroc["a"] == pytest.approx(1.0)
    assert report.auroc["b"] == pytest.approx(0.0)
    assert report.seen == ("a", "b") and report.unseen == UNSEEN
    assert report.seen_mean == pytest.approx(0.5)
    assert 0.75 < report.auroc["c"] < 0.95 and 0.4 < report.auroc["d"] < 0.6
    assert report.unseen_mean == pytest.approx((report.auroc["c"] + report.auroc["d"]) / 2)
    assert report.harmonic == pytest.approx(harmonic(report.seen_mean, report.unseen_mean))
    assert harmonic(0.79, 0.66) == pytest.approx(0.72, abs=0.005)  # the paper's table
    assert harmonic(None, 0.5) is None


def test_bootstrap_intervals_bracket_the_estimates() -> None:
    y, m, s = _data()
    report = gzsl_report(y, m, s, LABELS, UNSEEN, bootstrap=200, seed=1)
    lo, hi = report.unseen_mean_ci95 or (0.0, 0.0)
    assert report.unseen_mean is not None and lo <= report.unseen_mean <= hi and hi - lo > 0.01
    c_lo, c_hi = report.auroc_ci95["c"]
    assert c_lo <= (report.auroc["c"] or 0) <= c_hi
    again = gzsl_report(y, m, s, LABELS, UNSEEN, bootstrap=200, seed=1)
    assert again.unseen_mean_ci95 == report.unseen_mean_ci95


def test_top_k_by_hand() -> None:
    y = np.array([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 0, 0]], dtype=np.float32)
    s = np.array([[0.9, 0.8, 0.1, 0.2], [0.1, 0.2, 0.9, 0.3], [0.5, 0.5, 0.5, 0.5]], dtype=np.float32)
    m = np.ones_like(y, dtype=bool)
    t = top_k(y, m, s, 2)  # image 2 has no positive: left out; hits: 1 + 0
    assert t.precision == pytest.approx(1 / 4)
    assert t.recall == pytest.approx(1 / 3)
    assert t.f1 == pytest.approx(2 * (1 / 4) * (1 / 3) / (1 / 4 + 1 / 3))
    t3 = top_k(y, m, s, 3)  # image 0 top-3 {0, 1, 3}: 2 hits; image 1 top-3 {2, 3, 1}: 1 hit
    assert t3.precision == pytest.approx(3 / 6) and t3.recall == pytest.approx(1.0)


def test_masked_cells_and_one_class_labels() -> None:
    y, m, s = _data()
    y[:, 3] = 0  # d has no positive: no AUROC, left out of the unseen mean
    m[:50, 0] = False
    report = gzsl_report(y, m, s, LABELS, UNSEEN, bootstrap=0)
    assert report.auroc["d"] is None
    assert report.unseen_mean == pytest.approx(report.auroc["c"])
    assert "n/a" in report.summary() and "unseen" in report.summary()
    with pytest.raises(ValueError, match="unseen"):
        gzsl_report(y, m, s, LABELS, ("z",), bootstrap=0)
    with pytest.raises(ValueError):
        gzsl_report(y[:, :3], m[:, :3], s[:, :3], LABELS, UNSEEN, bootstrap=0)


def test_unseen_controls_tell_a_name_from_a_generic_abnormality_score() -> None:
    rng = np.random.default_rng(4)
    n = 600
    y = (rng.random((n, 4)) < 0.3).astype(np.float32)
    m = np.ones_like(y, dtype=bool)
    abnormal = y.sum(axis=1, keepdims=True)
    generic = np.repeat(abnormal, 4, axis=1) + rng.normal(0, 0.3, (n, 4))  # "anything abnormal"
    specific = y + rng.normal(0, 0.3, (n, 4))  # each label's own pattern
    g = gzsl_report(y, m, generic, LABELS, UNSEEN, bootstrap=0).controls["c"]
    sp = gzsl_report(y, m, specific, LABELS, UNSEEN, bootstrap=0).controls["c"]
    assert sp["own_name"] > 0.85 and sp["other_unseen_names"] < 0.6
    assert g["own_name"] == pytest.approx(g["other_unseen_names"], abs=0.05)  # the name adds nothing
    assert (g["mean_seen_score"] or 0) > 0.6
