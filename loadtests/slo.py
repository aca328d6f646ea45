"""SLO checker: run a Locust suite headless, read its CSV, fail when a target is broken.

    python -m loadtests.slo --suite predict-png [--suite predict-dicom-j2k] [--users 4]
        [--duration 60s] [--targets loadtests/slo.yaml] [--host URL | --model-repo DIR]
    python -m loadtests.slo --suite predict-png --from-csv DIR/predict-png   # re-check a run

Without ``--host`` it starts ``cxr-triage serve`` itself on a free 127.0.0.1 port with the
embedded defaults (CPU engine where no GPU is, a fresh embedded Redis in a temporary folder,
``model_repo/``), exporting an untrained default engine first when the repository has none.
Before each suite it sends the suite's ``warmup`` samples (engine and decode workers warm), then
runs ``locust --headless --csv`` for the suite's user classes, parses ``<prefix>_stats.csv``
and compares p95, p99 and the error rate with the suite's targets (see loadtests/slo.yaml).

Prints a table per suite and writes ``benchmarks/results/loadtest-<suite>-latest.md`` (the
machine described, with the load average before and after, since other processes skew the
figures). Exit status: 0 every target met, 1 a target broken, 2 the run itself failed.
"""

import argparse
import csv
import os
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import yaml
from benchmarks.bench_core import embedded_redis, running_server
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loadtests import samples

ROOT = Path(__file__).resolve().parents[1]
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
RESULTS = ROOT / "benchmarks" / "results"
AGGREGATED = "Aggregated"
BUSY_LOAD_PER_CORE = 0.5  # 1-minute load average per core above which the machine counts as busy
BUSY_OTHER_CORES = 0.2  # cores taken by other processes during a run above which it counts as busy


class CheckerError(Exception):
    """The run could not be made or read (exit status 2), as opposed to a broken target."""


# --------------------------------------------------------------------------- targets


class Target(BaseModel):
    """Upper bounds for one Locust row; None = reported, not enforced."""

    model_config = ConfigDict(extra="forbid")
    p95_ms: float | None = Field(None, ge=0)
    p99_ms: float | None = Field(None, ge=0)
    max_error_rate: float | None = Field(None, ge=0, le=1)


class Suite(Target):
    description: str = ""
    user_classes: list[str] = Field(..., min_length=1)
    users: int = Field(4, ge=1)
    duration: str = "60s"
    warmup: list[str] = Field(default_factory=list)
    requests: dict[str, Target] = Field(default_factory=dict)

    def targets(self) -> dict[str, Target]:
        """Locust row name -> its targets; the suite-level ones apply to the Aggregated row."""
        own = Target(p95_ms=self.p95_ms, p99_ms=self.p99_ms, max_error_rate=self.max_error_rate)
        return {AGGREGATED: own, **self.requests}


class TargetsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    suites: dict[str, Suite]


def load_targets(path: Path) -> TargetsFile:
    """Read and validate a targets file. Raises CheckerError saying what is wrong in it."""
    try:
        loaded = TargetsFile.model_validate(yaml.safe_load(path.read_text()))
    except (OSError, yaml.YAMLError, ValidationError) as exc:
        raise CheckerError(f"cannot use targets file {path}: {exc}") from exc
    for name, suite in loaded.suites.items():
        unknown = sorted(set(suite.warmup) - set(samples.KINDS))
        if unknown:
            raise CheckerError(f"suite {name}: unknown warmup samples {unknown}; use {list(samples.KINDS)}")
        duration_s(suite.duration)
    return loaded


def duration_s(text: str) -> float:
    """Seconds in a Locust run time ("90", "30s", "2m", "1h30m"). Raises CheckerError."""
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s?)?", text.strip())
    if not text.strip() or match is None:
        raise CheckerError(f"duration {text!r} is not like 30s, 2m or 1h30m")
    hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return float(hours * 3600 + minutes * 60 + seconds)


# --------------------------------------------------------------------------- Locust's CSV


@dataclass(frozen=True)
class Row:
    """One line of Locust's <prefix>_stats.csv; times in ms (None where Locust wrote N/A)."""

    name: str
    method: str
    requests: int
    failures: int
    median_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    max_ms: float | None
    rps: float

    @property
    def error_rate(self) -> float:
        return self.failures / self.requests if self.requests else 0.0


def _number(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "", "N/A") else None
    except ValueError:
        return None


def read_stats(prefix: Path) -> dict[str, Row]:
    """Rows of ``<prefix>_stats.csv`` by request name ("Aggregated" for the total).
    Raises CheckerError when the file is missing or not Locust's."""
    path = Path(f"{prefix}_stats.csv")
    try:
        with path.open(newline="") as f:
            lines = list(csv.DictReader(f))
        rows = [
            Row(
                name=line["Name"],
                method=line["Type"],
                requests=int(line["Request Count"]),
                failures=int(line["Failure Count"]),
                median_ms=_number(line["50%"]),
                p95_ms=_number(line["95%"]),
                p99_ms=_number(line["99%"]),
                max_ms=_number(line["Max Response Time"]),
                rps=_number(line["Requests/s"]) or 0.0,
            )
            for line in lines
        ]
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise CheckerError(f"cannot read Locust's stats {path}: {exc!r}") from exc
    return {row.name: row for row in rows}


def read_failures(prefix: Path) -> list[tuple[str, str, int]]:
    """(request name, error, occurrences) from ``<prefix>_failures.csv``; empty if none."""
    path = Path(f"{prefix}_failures.csv")
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [(r["Name"], r["Error"], int(r["Occurrences"])) for r in csv.DictReader(f)]


# --------------------------------------------------------------------------- checking


@dataclass(frozen=True)
class Check:
    request: str
    metric: str  # p95_ms | p99_ms | max_error_rate
    target: float
    measured: float | None  # None: no request of that name completed
    ok: bool

    def message(self) -> str:
        what = "error rate" if self.metric == "max_error_rate" else self.metric.removesuffix("_ms")
        if self.measured is None:
            return (
                f"{self.request}: no completed request, so {what} cannot be checked (target {self.target:g})"
            )
        unit = "" if self.metric == "max_error_rate" else " ms"
        sign = "<=" if self.ok else ">"
        return f"{self.request}: {what} {self.measured:g}{unit} {sign} target {self.target:g}{unit}"


def evaluate(suite: Suite, rows: dict[str, Row]) -> list[Check]:
    """Every enforced target of the suite against the measured rows."""
    checks = []
    for name, target in suite.targets().items():
        row = rows.get(name)
        for metric in ("p95_ms", "p99_ms", "max_error_rate"):
            bound = getattr(target, metric)
            if bound is None:
                continue
            if row is None or row.requests == 0:
                checks.append(Check(name, metric, bound, None, False))
                continue
            value = row.error_rate if metric == "max_error_rate" else getattr(row, metric)
            checks.append(Check(name, metric, bound, value, value is not None and value <= bound))
    return checks


# --------------------------------------------------------------------------- the machine


def cpu_model() -> str:
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def cores() -> tuple[int, int]:
    """(logical cores in /proc/cpuinfo, cores this process may use)."""
    logical = os.cpu_count() or 1
    with suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        logical = sum(line.startswith("processor") for line in lines) or logical
    return logical, len(os.sched_getaffinity(0))


def busy_jiffies() -> float:
    """CPU seconds the whole machine has spent not idle (all cores), from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def group_cpu_s(pgid: int | None, extra_pids: Sequence[int] = ()) -> float:
    """User + system CPU seconds of the live processes of group ``pgid`` and ``extra_pids``."""
    if pgid is None:
        return 0.0
    total, tick = 0.0, os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid or int(stat.parent.name) in extra_pids:  # fields after "(comm)"
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


# --------------------------------------------------------------------------- the server


def default_model(repo: Path) -> str:
    """The model the server scores by default: CXR_DEFAULT_MODEL, else the config marked default."""
    if os.environ.get("CXR_DEFAULT_MODEL"):
        return os.environ["CXR_DEFAULT_MODEL"]
    for config in sorted(repo.glob("*/config.yaml")):
        if (yaml.safe_load(config.read_text()) or {}).get("default"):
            return config.parent.name
    raise CheckerError(f"no model in {repo} has `default: true` in its config.yaml")


def ensure_engine(repo: Path) -> None:
    """Export an untrained default engine when the repository has no version of it (needs torch)."""
    name = default_model(repo)
    if any(p.is_file() for p in (repo / name).glob("[0-9]*/metadata.json")):
        return
    exe = Path(sys.executable).parent / "cxr-triage"
    print(f"{repo}/{name} has no version: exporting an untrained engine (cxr-triage export {name})")
    done = subprocess.run([str(exe), "export", name, "--model-repo", str(repo)], check=False)
    if done.returncode != 0:
        raise CheckerError(
            f"cxr-triage export {name} failed; it needs the train extra (pip install -e '.[train]')"
        )


@dataclass
class Server:
    url: str
    pgid: int | None = None  # None: not started here
    data_dir: Path | None = None

    def redis_pids(self) -> list[int]:
        """The embedded Redis daemonizes into its own session; found by its working folder."""
        pid = embedded_redis(self.data_dir) if self.data_dir is not None else None
        return [] if pid is None else [pid]


@contextmanager
def local_server(repo: Path, timeout: float = 180.0) -> Iterator[Server]:
    """``cxr-triage serve`` on a free 127.0.0.1 port, embedded defaults, a fresh embedded Redis
    (benchmarks' running_server: the same start, readiness wait and shutdown as the benchmarks)."""
    ensure_engine(repo)
    print("starting cxr-triage serve on 127.0.0.1 …", flush=True)
    try:
        with running_server(timeout, repo) as (url, pgid, data_dir):
            yield Server(url, pgid, data_dir)
    except (RuntimeError, TimeoutError) as exc:  # the server exited or never became ready
        raise CheckerError(str(exc)) from exc


def warm_up(url: str, kinds: Sequence[str], headers: dict[str, str]) -> dict[str, Any]:
    """Send each sample kind 2 x cores times, cores at once (every decode worker and the engine
    see it before the measurement). Returns the served model of the last reply."""
    workers = cores()[1]
    model: dict[str, Any] = {}

    def one(kind: str) -> dict[str, Any]:
        body, content_type = samples.sample(kind)
        reply = httpx.post(
            f"{url}/v1/predict", content=body, timeout=120, headers={**headers, "Content-Type": content_type}
        )
        if reply.status_code != 200:
            raise CheckerError(f"warm-up {kind} got {reply.status_code}: {reply.text[:300]}")
        return dict(reply.json().get("model", {}))

    with ThreadPoolExecutor(workers) as pool:
        for kind in kinds:
            for got in pool.map(one, [kind] * (2 * workers)):
                model = got
    return model


def wait_idle(url: str, headers: dict[str, str], timeout: float = 300.0) -> None:
    """Wait until no job is queued (cxr_triage_queue_depth), so one suite's backlog (STOW,
    studies) does not load the next suite's measurement."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with suppress(httpx.HTTPError):
            text = httpx.get(f"{url}/metrics", headers=headers, timeout=10).text
            depth = sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("cxr_triage_queue_depth{")
            )
            if depth == 0:
                return
        time.sleep(1.0)
    print(f"warning: jobs still queued after {timeout:.0f} s; measuring anyway", file=sys.stderr)


# --------------------------------------------------------------------------- one run


@dataclass
class Run:
    """What a suite's run measured, with the conditions it ran under."""

    suite: str
    spec: Suite
    users: int
    duration: str
    spawn_rate: float
    host: str
    started_server: bool
    prefix: Path
    command: list[str] = field(default_factory=list)
    model: dict[str, Any] = field(default_factory=dict)
    after_suite: str | None = None  # the suite run just before on the same server, if any
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    wall_s: float = 0.0
    machine_cpu_s: float = 0.0
    locust_cpu_s: float = 0.0
    server_cpu_s: float | None = None
    rows: dict[str, Row] = field(default_factory=dict)
    failures: list[tuple[str, str, int]] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


def locust_command(run: Run) -> list[str]:
    options = (
        f"--headless -u {run.users} -r {run.spawn_rate:g} -t {run.duration} --only-summary "
        "--stop-timeout 30 --loglevel WARNING"
    )
    return [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE.relative_to(ROOT)), *run.spec.user_classes,
            *options.split(), "--host", run.host, "--csv", str(run.prefix)]  # fmt: skip


def run_locust(run: Run, server: Server) -> None:
    """Run Locust headless for the suite; fills the run's CPU and wall-clock figures and rows."""
    run.prefix.parent.mkdir(parents=True, exist_ok=True)
    run.command = locust_command(run)
    redis = server.redis_pids()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    machine, served, start = busy_jiffies(), group_cpu_s(server.pgid, redis), time.monotonic()
    log = Path(f"{run.prefix}-locust.log")
    print(f"{run.suite}: {run.users} users for {run.duration} against {run.host} …", flush=True)
    with log.open("wb") as out:
        timeout = duration_s(run.duration) + 120
        try:
            done = subprocess.run(
                run.command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=timeout
            )
        except subprocess.TimeoutExpired as exc:
            raise CheckerError(f"locust ran past {timeout:.0f} s; see {log}") from exc
    run.wall_s = time.monotonic() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    run.locust_cpu_s = after.ru_utime + after.ru_stime - children.ru_utime - children.ru_stime
    run.machine_cpu_s = busy_jiffies() - machine
    if server.pgid is not None:
        run.server_cpu_s = group_cpu_s(server.pgid, redis) - served
    if done.returncode not in (0, 1):  # 1: some requests failed, which the error-rate target judges
        tail = log.read_text(errors="replace")[-3000:]
        raise CheckerError(f"locust exited with {done.returncode}:\n{tail}")
    run.rows, run.failures = read_stats(run.prefix), read_failures(run.prefix)


# --------------------------------------------------------------------------- output


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def stats_table(rows: dict[str, Row]) -> tuple[list[str], list[list[str]]]:
    header = [
        "request",
        "requests",
        "failures",
        "error rate",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "max ms",
        "req/s",
    ]
    ordered = sorted(rows.values(), key=lambda r: (r.name == AGGREGATED, r.name))
    body = [
        [
            r.name,
            str(r.requests),
            str(r.failures),
            f"{r.error_rate:.2%}",
            _ms(r.median_ms),
            _ms(r.p95_ms),
            _ms(r.p99_ms),
            _ms(r.max_ms),
            f"{r.rps:.2f}",
        ]
        for r in ordered
    ]
    return header, body


def checks_table(checks: list[Check]) -> tuple[list[str], list[list[str]]]:
    header = ["request", "target", "measured", "verdict"]
    body = []
    for c in checks:
        unit = "" if c.metric == "max_error_rate" else " ms"
        name = "error rate" if c.metric == "max_error_rate" else c.metric.removesuffix("_ms")
        measured = "no requests" if c.measured is None else f"{c.measured:g}{unit}"
        body.append([c.request, f"{name} <= {c.target:g}{unit}", measured, "pass" if c.ok else "BREACH"])
    return header, body


def text_table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in [header, *body]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def md_table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in body]


def print_summary(suite: str, rows: dict[str, Row], checks: list[Check]) -> None:
    print(f"\n== {suite}\n{text_table(*stats_table(rows))}\n")
    if checks:
        print(text_table(*checks_table(checks)))
    for c in checks:
        if not c.ok:
            print(f"SLO BREACH in {suite}: {c.message()}")
    print(f"{suite}: {'SLO met' if all(c.ok for c in checks) else 'SLO BREACHED'}\n", flush=True)


def git_commit() -> str:
    with suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() + (" (uncommitted changes)" if dirty.stdout.strip() else "")
    return "unknown"


def _load(load: tuple[float, float, float]) -> str:
    return " / ".join(f"{v:.2f}" for v in load)


def busy_verdict(run: Run, usable: int) -> str:
    """Whether other processes competed for the CPU: measured during the run when the server is
    ours (its CPU and Locust's are known), else judged from the load average before the run."""
    other = other_cores(run)
    if other is not None:
        if other > BUSY_OTHER_CORES:
            return (
                f"**busy: other processes took {other:.2f} cores during the run; latencies are pessimistic**"
            )
        return "quiet during the run (see CPU used)"
    if run.load_before[0] / usable > BUSY_LOAD_PER_CORE:
        return "**busy: other processes were running; latencies are pessimistic**"
    return "quiet"


def machine_rows(run: Run) -> list[list[str]]:
    logical, usable = cores()
    before = _load(run.load_before)
    if run.after_suite:
        before += f" (right after suite {run.after_suite}, whose load is in these averages)"
    rows = [
        ["CPU", f"{cpu_model()}, {logical} logical cores ({usable} usable) — /proc/cpuinfo"],
        ["load average before the run (1 / 5 / 15 min)", before],
        ["other processes", busy_verdict(run, usable)],
        ["load average after the run", _load(run.load_after)],
        ["CPU used during the run (cores, mean)", cpu_split(run)],
        ["Python", sys.version.split()[0]],
    ]
    if not run.started_server:
        return rows
    overrides = sorted(k for k in os.environ if k.startswith("CXR_") and not k.startswith("CXR_LOADTEST"))
    return [*rows, ["CXR_* settings", ", ".join(overrides) if overrides else "none (server defaults)"]]


def other_cores(run: Run) -> float | None:
    """Mean cores other processes used during the run; None when the server is not ours."""
    if run.server_cpu_s is None or run.wall_s <= 0:
        return None
    return max(0.0, (run.machine_cpu_s - run.locust_cpu_s - run.server_cpu_s) / run.wall_s)


def cpu_split(run: Run) -> str:
    if run.wall_s <= 0:
        return "n/a"
    machine, locust = run.machine_cpu_s / run.wall_s, run.locust_cpu_s / run.wall_s
    other = other_cores(run)
    if run.server_cpu_s is None or other is None:
        return f"machine {machine:.2f}, of which Locust {locust:.2f} (the server was not started here)"
    server = run.server_cpu_s / run.wall_s
    return f"machine {machine:.2f}: server {server:.2f}, Locust {locust:.2f}, other processes {other:.2f}"


def render(run: Run, argv: Sequence[str]) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    verdict = (
        "**PASS** — every target met"
        if run.ok
        else "**BREACH** — " + "; ".join(c.message() for c in run.checks if not c.ok)
    )
    model = run.model
    served = "unknown"
    if model:
        served = f"{model.get('name')} v{model.get('version')} ({model.get('backend')}, "
        served += f"weights {model.get('weights')})"
    where = "started by the checker: `cxr-triage serve`, embedded defaults, a fresh embedded Redis"
    lines = [
        f"# cxr-triage load test: {run.suite}",
        "",
        f"{when} · commit {git_commit()} · {verdict}",
        "",
        f"- Command: `python -m loadtests.slo {shlex.join(argv)}`",
        f"- Suite: {run.spec.description} — Locust user classes {', '.join(run.spec.user_classes)}; "
        f"{run.users} users (spawn rate {run.spawn_rate:g}/s) for {run.duration}",
        f"- Locust: `{shlex.join(['locust', *run.command[3:]])}`",
        f"- Server: {where if run.started_server else run.host}",
        f"- Model: {served}",
        "",
        "## Machine",
        "",
        *md_table(["", ""], machine_rows(run)),
        "",
        "## Results",
        "",
        *md_table(*stats_table(run.rows)),
        "",
        "Response times are Locust's: client send to last byte received, over the whole run (the",
        "checker warms the server up before Locust starts). Locust keeps them exact below 100 ms,",
        "rounded to 10 ms up to 1 s and to 100 ms up to 10 s, so a percentile may exceed the max.",
        "",
        "## Targets (loadtests/slo.yaml)",
        "",
        *(md_table(*checks_table(run.checks)) if run.checks else ["None enforced; figures reported only."]),
        "",
    ]
    if run.failures:
        lines += [
            "## Failures",
            "",
            *md_table(["request", "error", "count"], [[n, e, str(c)] for n, e, c in run.failures]),
            "",
        ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtests.slo", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", action="append", required=True, help="suite of the targets file (repeat)")
    p.add_argument("--targets", type=Path, default=Path(__file__).resolve().parent / "slo.yaml")
    p.add_argument("--users", type=int, help="Locust users (default: the suite's)")
    p.add_argument("--duration", help="run time, e.g. 30s, 2m (default: the suite's)")
    p.add_argument("--spawn-rate", type=float, help="users started per second (default: all in 1 s)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--host", help="a running server's base URL; otherwise one is started here")
    where.add_argument(
        "--model-repo", type=Path, default=ROOT / "model_repo", help="for the server started here"
    )
    where.add_argument(
        "--from-csv",
        type=Path,
        metavar="PREFIX",
        help="check an earlier run's PREFIX_stats.csv instead of running (one suite)",
    )
    p.add_argument("--csv-dir", type=Path, help="where Locust writes its CSV (default: a temporary folder)")
    p.add_argument("--results-dir", type=Path, default=RESULTS, help="where loadtest-<suite>-latest.md goes")
    args = p.parse_args(argv)
    if args.from_csv and len(args.suite) != 1:
        p.error("--from-csv checks one suite")
    if args.users is not None and args.users < 1:
        p.error("--users must be at least 1")
    return args


def check_csv(args: argparse.Namespace, targets: TargetsFile) -> int:
    suite = args.suite[0]
    rows = read_stats(args.from_csv)
    checks = evaluate(targets.suites[suite], rows)
    print_summary(suite, rows, checks)
    return 0 if all(c.ok for c in checks) else 1


def run_suites(args: argparse.Namespace, targets: TargetsFile, argv: Sequence[str]) -> int:
    key = os.environ.get("CXR_LOADTEST_API_KEY")  # for a server with CXR_API_KEYS; never in argv
    headers = {"X-API-Key": key} if key else {}
    load_before = os.getloadavg()  # before the server starts: what else runs on the machine
    csv_dir = args.csv_dir or Path(tempfile.mkdtemp(prefix="cxr-loadtest-csv-"))
    with _server(args) as server:
        runs = []
        for i, name in enumerate(args.suite):
            spec = targets.suites[name]
            if i:
                wait_idle(server.url, headers)
                load_before = os.getloadavg()
            run = Run(
                name,
                spec,
                args.users or spec.users,
                args.duration or spec.duration,
                args.spawn_rate or float(args.users or spec.users),
                server.url,
                server.pgid is not None,
                csv_dir / name,
                after_suite=args.suite[i - 1] if i else None,
                load_before=load_before,
            )
            run.model = warm_up(server.url, spec.warmup or ["png"], headers)
            run_locust(run, server)
            run.load_after = os.getloadavg()
            run.checks = evaluate(spec, run.rows)
            print_summary(name, run.rows, run.checks)
            args.results_dir.mkdir(parents=True, exist_ok=True)
            out = args.results_dir / f"loadtest-{name}-latest.md"
            out.write_text(render(run, argv))
            print(f"wrote {out} (Locust CSV: {run.prefix}_stats.csv)")
            runs.append(run)
    return 0 if all(r.ok for r in runs) else 1


@contextmanager
def _server(args: argparse.Namespace) -> Iterator[Server]:
    if args.host:
        yield Server(args.host.rstrip("/"))
    else:
        with local_server(args.model_repo.resolve()) as server:
            yield server


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        targets = load_targets(args.targets)
        unknown = [s for s in args.suite if s not in targets.suites]
        if unknown:
            raise CheckerError(f"no suite {unknown} in {args.targets}; it has {sorted(targets.suites)}")
        return check_csv(args, targets) if args.from_csv else run_suites(args, targets, argv)
    except CheckerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
