"""The SLO checker (python -m loadtests.slo) end to end: it starts the real server, runs a Locust
suite headless, reads Locust's CSV, passes generous targets and fails impossible ones."""

import subprocess
import sys
from pathlib import Path

import yaml
from loadtests import slo

from tests.helpers import ROOT

STATS_HEADER = (
    "Type,Name,Request Count,Failure Count,Median Response Time,Average Response Time,Min Response Time,"
    "Max Response Time,Average Content Size,Requests/s,Failures/s,50%,66%,75%,80%,90%,95%,98%,99%,"
    "99.9%,99.99%,100%"
)


def _targets(path: Path, p95_ms: float, max_error_rate: float = 0.0) -> Path:
    suite = {
        "user_classes": ["PredictPngUser"],
        "warmup": ["png"],
        "p95_ms": p95_ms,
        "p99_ms": None,
        "max_error_rate": max_error_rate,
    }
    path.write_text(yaml.safe_dump({"suites": {"predict-png": suite}}))
    return path


def _checker(*args: object) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "loadtests.slo", *map(str, args)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=150)


def test_checker_runs_a_suite_passes_generous_targets_and_fails_an_impossible_one(
    exported_repo: Path, tmp_path: Path
) -> None:
    csv_dir, results = tmp_path / "csv", tmp_path / "results"
    done = _checker(
        "--suite",
        "predict-png",
        "--users",
        2,
        "--duration",
        "10s",
        "--targets",
        _targets(tmp_path / "generous.yaml", 60_000),
        "--model-repo",
        exported_repo,
        "--csv-dir",
        csv_dir,
        "--results-dir",
        results,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "predict-png: SLO met" in done.stdout

    rows = slo.read_stats(csv_dir / "predict-png")
    total = rows["Aggregated"]
    assert total.requests > 10 and total.failures == 0 and total.p95_ms is not None
    assert rows["/v1/predict png"].requests == total.requests
    report = (results / "loadtest-predict-png-latest.md").read_text()
    assert "**PASS**" in report and "load average before the run" in report and "/proc/cpuinfo" in report
    assert f"| Aggregated | {total.requests} | 0 | 0.00% |" in report

    done = _checker(
        "--suite",
        "predict-png",
        "--targets",
        _targets(tmp_path / "impossible.yaml", 0.001),
        "--from-csv",
        csv_dir / "predict-png",
    )
    assert done.returncode == 1, done.stdout + done.stderr
    expected = f"SLO BREACH in predict-png: Aggregated: p95 {total.p95_ms:g} ms > target 0.001 ms"
    assert expected in done.stdout


def test_checker_fails_on_the_error_rate_read_from_the_csv(tmp_path: Path, capsys) -> None:
    row = "POST,/v1/predict png,50,5,40,45,10,90,400,9.5,0.9,40,42,44,46,60,80,85,90,90,90,90"
    total = ",Aggregated,50,5,40,45,10,90,400,9.5,0.9,40,42,44,46,60,80,85,90,90,90,90"
    (tmp_path / "run_stats.csv").write_text("\n".join([STATS_HEADER, row, total]) + "\n")
    targets = _targets(tmp_path / "t.yaml", 1000, max_error_rate=0.01)

    assert (
        slo.main(["--suite", "predict-png", "--targets", str(targets), "--from-csv", str(tmp_path / "run")])
        == 1
    )
    assert "Aggregated: error rate 0.1 > target 0.01" in capsys.readouterr().out


def test_checker_says_what_is_wrong_with_its_inputs(tmp_path: Path, capsys) -> None:
    targets = _targets(tmp_path / "t.yaml", 1000)
    assert slo.main(["--suite", "nope", "--targets", str(targets), "--from-csv", str(tmp_path / "x")]) == 2
    assert "no suite ['nope']" in capsys.readouterr().err
    assert (
        slo.main(["--suite", "predict-png", "--targets", str(targets), "--from-csv", str(tmp_path / "x")])
        == 2
    )
    assert "cannot read Locust's stats" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("suites: {predict-png: {user_classes: [PredictPngUser], p95: 1}}")
    assert (
        slo.main(["--suite", "predict-png", "--targets", str(tmp_path / "bad.yaml"), "--from-csv", "x"]) == 2
    )
    assert "p95" in capsys.readouterr().err
