"""benchmarks/triage_sim.py: the triage-value simulation reads every study, orders them with the
server's worklist rules, and is reproducible."""

from pathlib import Path

import pytest
from benchmarks import triage_sim as sim

PERFECT = sim.Operating(1.0, 1.0)
PREV = sim.prevalence(sim.CHESTXRAY14_IMAGES)


@pytest.fixture(scope="module")
def days() -> list[list[sim.Study]]:
    return [sim.make_day(seed) for seed in range(3)]


def _stats(days: list[list[sim.Study]], order: str, op: sim.Operating, readers: int = 2, **kw: float):
    reads, _ = sim.run_setting(days, sim.Staffing(readers), order, op, PREV, **kw)
    return sim.class_stats(reads)


def test_chestxray14_prevalence_is_the_published_one() -> None:
    assert sum(PREV.values()) == pytest.approx(1.0)
    assert PREV["normal"] == pytest.approx(60_361 / 112_120)  # No Finding, 53.8%
    assert sum(sim.CHESTXRAY14_IMAGES.values()) == 112_120


def test_class_counts_follow_the_critical_findings(tmp_path: Path) -> None:
    table = tmp_path / "Data_Entry_2017.csv"
    rows = ["No Finding", "Effusion|Atelectasis", "Infiltration", "Mass", "Hernia|Nodule"]
    table.write_text("Image Index,Finding Labels\n" + "".join(f"{i}.png,{r}\n" for i, r in enumerate(rows)))
    counts = sim.class_counts(table, sim.critical_findings())
    assert counts == {"critical": 2, "abnormal": 2, "normal": 1}


def test_a_perfect_model_calls_the_truth_and_a_blind_one_calls_everything_normal(days) -> None:
    assert all(sim.call(s, PERFECT, PREV).call == s.truth for s in days[0])
    assert {sim.call(s, sim.Operating(0.0, 1.0), PREV).call for s in days[0]} == {"normal"}


def test_triage_takes_a_fresh_critical_before_a_normal_until_the_normal_is_overdue() -> None:
    def called(uid: str, arrival: float, cls: str) -> sim.Called:
        study = sim.Study(uid, arrival, "emergency", cls, 60.0, (0.0, 0.0, 0.5))
        return sim.call(study, PERFECT, PREV)

    normal, overdue = called("n", 0.0, "normal"), sim.MAX_WAIT_S + 60.0
    critical, fresh = called("c", 3600.0, "critical"), called("f", overdue, "critical")
    assert sim.triage([normal, critical], 3600.0, sim.MAX_WAIT_S) == 1
    assert sim.triage([normal, fresh], overdue, sim.MAX_WAIT_S) == 0  # aged past the maximum: on top
    assert sim.fifo([normal, critical], 3600.0, sim.MAX_WAIT_S) == 0


def test_with_a_perfect_model_critical_studies_are_read_sooner_than_fifo(days) -> None:
    fifo, triage = _stats(days, "FIFO", PERFECT), _stats(days, "cxr-triage", PERFECT)
    assert triage["critical"].mean_min < fifo["critical"].mean_min
    assert triage["critical"].p95_min <= fifo["critical"].p95_min
    assert triage["critical"].within_60_min >= fifo["critical"].within_60_min


def test_every_study_is_read_once_and_normals_do_not_starve(days) -> None:
    op = sim.Operating(0.95, 0.6)
    for day in days:
        reads = sim.simulate([sim.call(s, op, PREV) for s in day], sim.Staffing(2), "cxr-triage")
        assert sorted(r.called.study.uid for r in reads) == sorted(s.uid for s in day)
        assert max(r.end_s for r in reads) < 36 * 3600  # the day plus the overnight drain
    aged = _stats(days, "cxr-triage", op)["normal"].max_min
    unaged = _stats(days, "cxr-triage", op, max_wait_s=1e9)["normal"].max_min
    assert aged <= sim.MAX_WAIT_S / 60 + 120  # aging: no normal waits far past the 4 h maximum
    assert unaged > aged  # and it is aging that does it


def test_readers_work_their_shifts_only() -> None:
    staff = sim.Staffing(day=3, night=1)
    assert staff.on_duty(2, 9 * 3600.0) and not staff.on_duty(2, 20 * 3600.0) and staff.on_duty(0, 3 * 3600.0)
    assert staff.next_on_duty(2, 20 * 3600.0) == 32 * 3600.0  # 08:00 the next day


def test_the_simulation_is_deterministic_for_a_seed() -> None:
    def once(seed: int) -> list[sim.Outcome]:
        return sim.run_all([sim.make_day(seed)], [sim.Staffing(2)], [sim.Operating(0.9, 0.8)], PREV)

    assert once(7) == once(7)
    assert once(7) != once(8)


def test_main_writes_the_table_and_the_plot(tmp_path: Path) -> None:
    assert sim.main(["--days", "1", "--readers", "2", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "triage-sim-latest.md").read_text()
    assert "longest normal wait" in text and "FIFO" in text and "cxr-triage" in text
    assert (tmp_path / "triage-sim-latest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
