"""Triage value: time-to-read of critical, abnormal and normal chest X-rays, FIFO vs cxr-triage.

Run from the repository root::

    .venv/bin/python benchmarks/triage_sim.py [--days 20] [--seed 0] [--readers 2 3]
        [--model 0.9/0.8 --model 0.95/0.6] [--labels Data_Entry_2017.csv]

A discrete-event simulation (plain heapq) of a day of chest radiographs read by N radiologists,
in arrival order (FIFO, the status quo) or in cxr-triage's worklist order, with a model of a
given sensitivity and specificity. Writes ``benchmarks/results/triage-sim-latest.md`` (tables)
and ``triage-sim-latest.png`` (plot). Seeded and deterministic; no dependency beyond numpy
(matplotlib for the plot).

**Arrivals** (an assumption, shaped like a busy hospital's CXR day, ~500 studies): Poisson within
each hour at the rates in ``HOURLY_RATES`` (studies per hour, hour 0 = 00:00-01:00):

- emergency department, ~216/day: lowest at night (3-4/h), 12-13/h from 11:00 to 18:00;
- inpatients, ~172/day: the morning portable round (10-22/h from 04:00 to 09:00), 3-6/h otherwise;
- outpatients, ~110/day: clinic hours only, 9-12/h from 08:00 to 18:00.

Arrivals stop at 24:00; the readers go on until the worklist is empty (the overnight drain).
Each simulated day starts with an empty worklist at 00:00.

**Findings** follow ChestX-ray14's label table (``Data_Entry_2017_v2020.csv``, 112,120 frontal
images of 30,805 patients; X. Wang et al., "ChestX-ray8", CVPR 2017; NIH Clinical Center release).
Published counts: No Finding 60,361 (53.84%); Infiltration 19,894; Effusion 13,317; Atelectasis
11,559; Nodule 6,331; Mass 5,782; Pneumothorax 5,302; Consolidation 4,667; Pleural_Thickening
3,385; Cardiomegaly 2,776; Emphysema 2,516; Edema 2,303; Fibrosis 1,686; Pneumonia 1,431;
Hernia 227. A study is *critical* when it has any of the model config's ``critical_findings``
(Pneumothorax, Effusion, Edema, Consolidation, Pneumonia, Mass): 26,958 images (24.04%, counted
over the table's multi-label rows); *abnormal* with other findings only: 24,801 (22.12%);
*normal* with No Finding: 60,361 (53.84%). ``--labels FILE`` recounts from your own copy.

**Model**: sensitivity = P(flagged | critical or abnormal), specificity = P(called normal | normal).
A flagged critical study is called critical, a flagged abnormal one abnormal; a missed one is
called normal (the worst case for triage). A false positive is called critical or abnormal in
proportion to their prevalence. Abnormality scores are uniform in [0.5, 1) for flagged studies,
[0, 0.5) for studies called normal.

**Reading**: ``--readers N`` radiologists read during the day shift (08:00-18:00) and
``--night-readers`` (1) at other hours; each reads one study at a time and finishes the one in
hand when the shift ends. Reading time (to the signed report) is lognormal, sigma 0.5, median
2.5 min for normal, 3.5 min for abnormal and 4.5 min for critical studies (which include calling
the referring physician) — means 2.8 / 4.0 / 5.1 min. An assumption: typical chest radiograph
reads take one to five minutes.

**Orders**: FIFO reads the oldest study first. cxr-triage reads the highest ``rank`` first, ties
oldest first, with the server's own functions (``cxr_triage.triage.worklist.place_of`` and
``rank``; the sort key of ``queue/studies.py``): place = tier + score (critical 2, abnormal 1,
normal 0), raised by 3 x waited / ``CXR_WORKLIST_MAX_WAIT_S`` (4 h), so no study starves.
Scoring itself (under a second) is neglected against minutes of waiting.

**Time-to-read** = arrival to the end of its read (report signed), in minutes. The same days
(arrivals, findings, reading times) and the same per-study random draws of the model are used
for every ordering and setting, so differences come from the ordering alone.
"""

import argparse
import csv
import heapq
import shlex
import sys
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import yaml

from cxr_triage.config import Settings
from cxr_triage.triage.worklist import place_of, rank

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CLASSES = ("critical", "abnormal", "normal")
DAY_S = 24 * 3600.0
MAX_WAIT_S = float(Settings.model_fields["worklist_max_wait_s"].default)

HOURLY_RATES: dict[str, tuple[float, ...]] = {
    "emergency": (6, 5, 4, 4, 4, 4, 5, 6, 8, 10, 12, 13, 13, 13, 13, 13, 13, 13, 12, 11, 10, 9, 8, 7),
    "inpatient": (3, 3, 3, 4, 10, 18, 22, 20, 14, 8, 6, 6, 6, 6, 5, 5, 5, 5, 5, 4, 4, 4, 3, 3),
    "outpatient": (0, 0, 0, 0, 0, 0, 0, 0, 10, 12, 12, 11, 9, 11, 12, 12, 11, 10, 0, 0, 0, 0, 0, 0),
}
# ChestX-ray14 (Data_Entry_2017_v2020.csv): images per study class for the default critical list.
CHESTXRAY14_IMAGES = {"critical": 26_958, "abnormal": 24_801, "normal": 60_361}
READ_MEDIAN_MIN = {"critical": 4.5, "abnormal": 3.5, "normal": 2.5}
READ_SIGMA = 0.5


@dataclass(frozen=True)
class Study:
    uid: str
    arrival_s: float
    source: str
    truth: str  # critical | abnormal | normal
    read_s: float
    draws: tuple[float, float, float]  # the model's per-study random draws (detect, class, score)


@dataclass(frozen=True)
class Called:
    """A study as the worklist sees it: the model's triage class and score, and its place."""

    study: Study
    call: str
    score: float
    place: float


@dataclass(frozen=True)
class Read:
    called: Called
    start_s: float
    end_s: float

    @property
    def time_to_read_min(self) -> float:
        return (self.end_s - self.called.study.arrival_s) / 60.0


@dataclass(frozen=True)
class Operating:
    """A model's operating point: sensitivity and specificity, 0-1."""

    sensitivity: float
    specificity: float

    @property
    def label(self) -> str:
        return f"sens {self.sensitivity:g} / spec {self.specificity:g}"


def prevalence(counts: Mapping[str, float]) -> dict[str, float]:
    total = sum(counts.values())
    return {c: counts[c] / total for c in CLASSES}


def class_counts(labels_csv: Path, critical: Iterable[str]) -> dict[str, int]:
    """Images per study class in a ChestX-ray14 label table (``Finding Labels`` joined by ``|``)."""
    critical = set(critical)
    counts = dict.fromkeys(CLASSES, 0)
    with labels_csv.open(newline="") as f:
        for row in csv.DictReader(f):
            labels = set(row["Finding Labels"].split("|")) - {"No Finding", ""}
            counts["critical" if labels & critical else "abnormal" if labels else "normal"] += 1
    return counts


def critical_findings(repo: Path = ROOT / "model_repo", model: str = "densenet121-nih14") -> list[str]:
    return list(yaml.safe_load((repo / model / "config.yaml").read_text())["critical_findings"])


# --------------------------------------------------------------------------- a day


def arrivals(rng: np.random.Generator, rates: Mapping[str, Sequence[float]]) -> list[tuple[float, str]]:
    """(arrival second, source) for one day, sorted: Poisson counts per hour, uniform within it."""
    out = []
    for source, per_hour in rates.items():
        for hour, rate in enumerate(per_hour):
            for t in rng.uniform(hour * 3600.0, (hour + 1) * 3600.0, rng.poisson(rate)):
                out.append((float(t), source))
    return sorted(out)


def make_day(
    seed: int,
    rates: Mapping[str, Sequence[float]] = HOURLY_RATES,
    prevalences: Mapping[str, float] | None = None,
) -> list[Study]:
    """One day of studies: arrivals, true class, reading time and the model's random draws."""
    rng = np.random.default_rng(seed)
    prev = prevalences or prevalence(CHESTXRAY14_IMAGES)
    times = arrivals(rng, rates)
    truths = rng.choice(CLASSES, size=len(times), p=[prev[c] for c in CLASSES])
    medians = np.array([READ_MEDIAN_MIN[str(t)] for t in truths]) * 60.0
    reads = medians * np.exp(rng.normal(0.0, READ_SIGMA, len(times)))
    draws = rng.random((len(times), 3))
    return [
        Study(f"{seed}.{i}", t, source, str(truth), float(read), (float(d[0]), float(d[1]), float(d[2])))
        for i, ((t, source), truth, read, d) in enumerate(zip(times, truths, reads, draws, strict=True))
    ]


def call(study: Study, op: Operating, prev: Mapping[str, float]) -> Called:
    """The model's triage class and abnormality score for a study (see the module docstring)."""
    detect, which, score_draw = study.draws
    if study.truth == "normal":
        flagged = detect >= op.specificity
        share_critical = prev["critical"] / (prev["critical"] + prev["abnormal"])
        cls = ("critical" if which < share_critical else "abnormal") if flagged else "normal"
    else:
        cls = study.truth if detect < op.sensitivity else "normal"
    score = 0.5 + 0.5 * score_draw if cls != "normal" else 0.5 * score_draw
    return Called(study, cls, score, place_of({"triage": cls, "abnormality_score": score}))


# --------------------------------------------------------------------------- reading


def fifo(waiting: list[Called], now: float, max_wait_s: float) -> int:
    return 0  # waiting is kept in arrival order


def triage(waiting: list[Called], now: float, max_wait_s: float) -> int:
    """The index the server's worklist puts first: highest rank, then longest waited."""

    def key(i: int) -> tuple[float, float]:
        c = waiting[i]
        ranked = rank(c.study.uid, c.place, c.study.arrival_s, "", now, max_wait_s)
        return ranked.rank, ranked.waited_s

    return max(range(len(waiting)), key=key)


ORDERS: dict[str, Callable[[list[Called], float, float], int]] = {"FIFO": fifo, "cxr-triage": triage}


@dataclass(frozen=True)
class Staffing:
    """Readers on duty: ``day`` from ``day_start`` to ``day_end`` (hours), ``night`` otherwise."""

    day: int
    night: int = 1
    day_start: int = 8
    day_end: int = 18

    def on_duty(self, reader: int, t: float) -> bool:
        hour = int(t // 3600) % 24
        return reader < (self.day if self.day_start <= hour < self.day_end else self.night)

    def next_on_duty(self, reader: int, t: float) -> float:
        """The first hour boundary after ``t`` at which ``reader`` is on duty."""
        hour = int(t // 3600)
        for h in range(hour + 1, hour + 25):
            if self.on_duty(reader, h * 3600.0):
                return h * 3600.0
        raise ValueError(f"reader {reader} is never on duty with {self}")

    @property
    def readers(self) -> int:
        return max(self.day, self.night)

    @property
    def label(self) -> str:
        return f"{self.day} ({self.day_start:02d}-{self.day_end:02d}), {self.night} otherwise"


def simulate(
    studies: Sequence[Called], staffing: Staffing, order: str, max_wait_s: float = MAX_WAIT_S
) -> list[Read]:
    """Readers on duty take the next study as soon as they are free (one in progress is finished
    past the end of a shift); every study is read. Events are taken in time order from a heap of
    (time a reader is next free, reader)."""
    pick = ORDERS[order]
    pending = deque(sorted(studies, key=lambda c: c.study.arrival_s))
    free = [(0.0, i) for i in range(staffing.readers)]
    waiting: list[Called] = []  # in arrival order
    done: list[Read] = []
    while pending or waiting:
        now, reader = heapq.heappop(free)
        if not staffing.on_duty(reader, now):
            heapq.heappush(free, (staffing.next_on_duty(reader, now), reader))
            continue
        while pending and pending[0].study.arrival_s <= now:
            waiting.append(pending.popleft())
        if not waiting:  # idle until the next arrival
            heapq.heappush(free, (pending[0].study.arrival_s, reader))
            continue
        chosen = waiting.pop(pick(waiting, now, max_wait_s))
        done.append(Read(chosen, now, now + chosen.study.read_s))
        heapq.heappush(free, (now + chosen.study.read_s, reader))
    return done


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class ClassStats:
    studies: int
    mean_min: float
    p50_min: float
    p95_min: float
    max_min: float
    within_60_min: float  # share read within an hour, 0-1


def class_stats(reads: Iterable[Read]) -> dict[str, ClassStats]:
    by_class: dict[str, list[float]] = {c: [] for c in CLASSES}
    for r in reads:
        by_class[r.called.study.truth].append(r.time_to_read_min)
    out = {}
    for cls, values in by_class.items():
        a = np.array(values) if values else np.array([np.nan])
        out[cls] = ClassStats(
            len(values),
            float(a.mean()),
            float(np.percentile(a, 50)),
            float(np.percentile(a, 95)),
            float(a.max()),
            float((a <= 60).mean()),
        )
    return out


@dataclass(frozen=True)
class Outcome:
    staffing: Staffing
    model: Operating | None  # None: FIFO, which does not use the model
    order: str
    stats: dict[str, ClassStats]
    last_read_end_h: float  # when the day's last read ended (hours from its 00:00), worst day


def run_setting(
    days: Sequence[Sequence[Study]],
    staffing: Staffing,
    order: str,
    op: Operating,
    prev: Mapping[str, float],
    max_wait_s: float = MAX_WAIT_S,
) -> tuple[list[Read], float]:
    """Every day simulated; the pooled reads and the latest end of a day's reading (hours)."""
    reads, last = [], 0.0
    for day in days:
        done = simulate([call(s, op, prev) for s in day], staffing, order, max_wait_s)
        reads += done
        last = max(last, max((r.end_s for r in done), default=0.0) / 3600.0)
    return reads, last


def run_all(
    days: Sequence[Sequence[Study]],
    staffings: Sequence[Staffing],
    models: Sequence[Operating],
    prev: Mapping[str, float],
    max_wait_s: float = MAX_WAIT_S,
) -> list[Outcome]:
    """For each staffing: FIFO (model-independent), then cxr-triage with each model."""
    out = []
    for staff in staffings:
        reads, last = run_setting(days, staff, "FIFO", models[0], prev, max_wait_s)
        out.append(Outcome(staff, None, "FIFO", class_stats(reads), last))
        for op in models:
            reads, last = run_setting(days, staff, "cxr-triage", op, prev, max_wait_s)
            out.append(Outcome(staff, op, "cxr-triage", class_stats(reads), last))
    return out


# --------------------------------------------------------------------------- report


def _f(v: float) -> str:
    return f"{v:.0f}" if v >= 10 else f"{v:.1f}"


def headline_rows(outcomes: Sequence[Outcome]) -> list[list[str]]:
    fifo_of = {o.staffing: o for o in outcomes if o.order == "FIFO"}
    rows = []
    for o in outcomes:
        if o.model is None:
            continue
        f, t = fifo_of[o.staffing].stats, o.stats
        rows.append(
            [
                o.staffing.label,
                o.model.label,
                f"{_f(f['critical'].p50_min)} → **{_f(t['critical'].p50_min)}**",
                f"{_f(f['critical'].p95_min)} → **{_f(t['critical'].p95_min)}**",
                f"{f['critical'].within_60_min:.0%} → **{t['critical'].within_60_min:.0%}**",
                f"{_f(f['abnormal'].p95_min)} → {_f(t['abnormal'].p95_min)}",
                f"{_f(f['normal'].p95_min)} → {_f(t['normal'].p95_min)}",
                f"{_f(f['normal'].max_min)} → {_f(t['normal'].max_min)}",
            ]
        )
    return rows


def detail_rows(outcomes: Sequence[Outcome]) -> list[list[str]]:
    rows = []
    for o in outcomes:
        order = o.order if o.model is None else f"{o.order}, {o.model.label}"
        for cls in CLASSES:
            s = o.stats[cls]
            rows.append(
                [
                    o.staffing.label,
                    order,
                    cls,
                    str(s.studies),
                    _f(s.mean_min),
                    _f(s.p50_min),
                    _f(s.p95_min),
                    _f(s.max_min),
                    f"{o.last_read_end_h:.1f}",
                ]
            )
    return rows


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def mean_read_min(prev: Mapping[str, float]) -> float:
    """Expected reading time of a study, minutes (lognormal mean = median x exp(sigma^2 / 2))."""
    return float(sum(prev[c] * READ_MEDIAN_MIN[c] * np.exp(READ_SIGMA**2 / 2) for c in CLASSES))


def render(
    outcomes: Sequence[Outcome], days: int, seed: int, prev: Mapping[str, float], source: str, command: str
) -> str:
    per_day = sum(sum(r) for r in HOURLY_RATES.values())
    mean_read = mean_read_min(prev)
    lines = [
        "# Triage value: time-to-read, FIFO vs cxr-triage (simulation)",
        "",
        f"{datetime.now(UTC):%Y-%m-%d %H:%M UTC} · `{command}` · {days} simulated days "
        f"(seeds {seed}…{seed + days - 1}), pooled",
        "",
        f"A day: {per_day:.0f} chest radiographs expected (emergency, inpatient and outpatient hourly "
        f"curves: the plot), mean reading time {mean_read:.1f} min, so {per_day * mean_read / 60:.0f} "
        f"reader-hours of work a day. Classes from {source}: critical {prev['critical']:.1%}, "
        f"abnormal {prev['abnormal']:.1%}, normal {prev['normal']:.1%}. Worklist aging span "
        f"{MAX_WAIT_S / 3600:g} h (CXR_WORKLIST_MAX_WAIT_S). Assumptions and sources: the docstring of "
        "benchmarks/triage_sim.py. This is a model of a department, not a measurement of one.",
        "",
        "## Headline (minutes from arrival to signed report; FIFO → cxr-triage)",
        "",
        *table(
            [
                "readers on duty",
                "model",
                "critical p50",
                "critical p95",
                "critical read ≤ 1 h",
                "abnormal p95",
                "normal p95",
                "longest normal wait",
            ],
            headline_rows(outcomes),
        ),
        "",
        "## Every class (minutes)",
        "",
        *table(
            [
                "readers on duty",
                "order",
                "class",
                "studies",
                "mean",
                "p50",
                "p95",
                "max",
                "last read ends (h after the day's 00:00, worst day)",
            ],
            detail_rows(outcomes),
        ),
        "",
        "FIFO does not use the model, so one FIFO row per staffing serves every model. A critical "
        "study the model misses is called normal and waits like one: that is the *max* of the "
        "critical rows under cxr-triage.",
        "",
        "![time-to-read](triage-sim-latest.png)",
        "",
    ]
    return "\n".join(lines)


def plot(outcomes: Sequence[Outcome], path: Path, prev: Mapping[str, float]) -> None:
    """Hourly arrivals and reading capacity; mean and p95 time-to-read per class for each
    staffing and ordering."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 8), layout="constrained")
    top, bottom = np.asarray(fig.subfigures(2, 1, height_ratios=[1, 1.4])).ravel()
    ax = top.subplots()
    hours, base = np.arange(24), np.zeros(24)
    for source, rates in HOURLY_RATES.items():
        ax.bar(hours, rates, bottom=base, label=source, align="edge", width=0.9)
        base += np.array(rates)
    staffings = list(dict.fromkeys(o.staffing for o in outcomes))
    per_reader = 60.0 / mean_read_min(prev)
    for staff, style in zip(staffings, ["--", ":", "-."] * len(staffings), strict=False):
        capacity = [
            sum(staff.on_duty(i, h * 3600.0) for i in range(staff.readers)) * per_reader for h in hours
        ]
        ax.step(
            np.arange(25),
            [*capacity, capacity[-1]],
            where="post",
            linewidth=2,
            color="black",
            linestyle=style,
            label=f"reading capacity, readers {staff.label}",
        )
    ax.set(
        xlabel="hour of day", ylabel="studies per hour", title="Arrivals (expected per hour)", xlim=(0, 24)
    )
    ax.legend(loc="upper left", fontsize=8)
    axes = bottom.subplots(1, len(staffings), sharey=True, squeeze=False)[0]
    for ax, staff in zip(axes, staffings, strict=True):
        mine = [o for o in outcomes if o.staffing == staff]
        width = 0.8 / len(mine)
        for j, o in enumerate(mine):
            x = np.arange(len(CLASSES)) + (j - (len(mine) - 1) / 2) * width
            label = "FIFO" if o.model is None else f"cxr-triage, {o.model.label}"
            ax.bar(x, [o.stats[c].mean_min for c in CLASSES], width, label=label)
            ax.scatter(x, [o.stats[c].p95_min for c in CLASSES], marker="_", s=200, color="black")
        ax.set_xticks(np.arange(len(CLASSES)), CLASSES)
        ax.set(title=f"readers {staff.label}\ntime-to-read: bar = mean, dash = p95", ylabel="minutes")
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def parse_model(text: str) -> Operating:
    try:
        sens, spec = (float(v) for v in text.split("/"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not SENS/SPEC, e.g. 0.9/0.8") from exc
    if not (0 <= sens <= 1 and 0 <= spec <= 1):
        raise argparse.ArgumentTypeError(f"{text!r}: sensitivity and specificity are between 0 and 1")
    return Operating(sens, spec)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Triage value simulation: FIFO vs cxr-triage worklist order")
    p.add_argument("--days", type=int, default=20, help="simulated days, pooled (default 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first day (days use seed, seed+1, …)")
    p.add_argument("--readers", type=int, nargs="+", default=[2, 3], help="readers on the day shift")
    p.add_argument("--night-readers", type=int, default=1, help="readers outside the day shift (default 1)")
    p.add_argument("--day-shift", default="8-18", help="day shift hours, START-END (default 8-18)")
    p.add_argument("--model", type=parse_model, action="append", help="SENS/SPEC (repeat); 0.9/0.8 0.95/0.6")
    p.add_argument("--labels", type=Path, help="a ChestX-ray14 Data_Entry_2017.csv to recount classes from")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for triage-sim-latest.md/.png")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    start, end = (int(h) for h in args.day_shift.split("-"))
    if args.days < 1 or min(args.readers) < 0 or args.night_readers < 0 or not 0 <= start < end <= 24:
        p.error("need --days >= 1, readers >= 0 and a day shift START-END within 0-24")
    staffings = [Staffing(n, args.night_readers, start, end) for n in args.readers]
    if any(s.readers == 0 for s in staffings):
        p.error("some reader must be on duty at some hour")
    models = args.model or [Operating(0.9, 0.8), Operating(0.95, 0.6)]
    if args.labels:
        prev, source = prevalence(class_counts(args.labels, critical_findings())), str(args.labels)
    else:
        prev, source = prevalence(CHESTXRAY14_IMAGES), "ChestX-ray14's Data_Entry_2017_v2020.csv"
    days = [make_day(args.seed + d, prevalences=prev) for d in range(args.days)]
    outcomes = run_all(days, staffings, models, prev)
    args.out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "benchmarks/triage_sim.py", *(sys.argv[1:] if argv is None else argv)])
    text = render(outcomes, args.days, args.seed, prev, source, command)
    (args.out / "triage-sim-latest.md").write_text(text)
    if not args.no_plot:
        plot(outcomes, args.out / "triage-sim-latest.png", prev)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
