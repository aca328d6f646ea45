"""Peers benchmark: cxr-triage against the usual ways to serve the same model, same run, same machine.

Run from the repository root (``make bench-peers``)::

    .venv/bin/python benchmarks/bench_peers.py [--duration S] [--concurrency 1,4,16]
        [--inputs png,jpeg,j2k] [--peers naive,litserve,litserve-cores,ray,bentoml,cxr-triage]
        [--rounds 2]

Each peer serves the same engine file (``model_repo/densenet121-nih14/<latest>/model.onnx``) on
127.0.0.1 and builds the model input with ``cxr_triage.imaging`` (identical tensors; see
benchmarks/peers/common.py): (a) the seed plan's naive FastAPI server, ONNX Runtime at 1 and 2
intra-op threads; (b) plain LitServe, batch 8 / 10 ms, and plain LitServe laid out like
cxr-triage (one single-threaded worker per core, batch ≤ 2); (c) Ray Serve and BentoML, from their own
virtual environment ``.venv-peers`` (built here from benchmarks/peers/requirements.txt);
(d) cxr-triage itself, started by ``bench_core.running_server``. A separate load-generator
process (benchmarks/peers/loadgen.py) drives each cell (peer x input x concurrency); the bench
records the CPU seconds of the server's process tree, of the client and of everything else, and
refuses to time a busy machine. After that first pass, the throughput targets' cells are measured
again (``--rounds``, default 2) with the naive configurations and cxr-triage taking turns, and
the targets compare those (``bench_interleaved``). Writes
``benchmarks/results/peers-<machine>-<UTC date>.md``, ``peers-latest.md``, ``peers-latest.json``
and ``peers-latest.png``.
"""

import argparse
import hashlib
import json
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from multiprocessing import get_context
from pathlib import Path
from typing import Any

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from bench_core import (  # noqa: E402
    BUSY_LOAD_PER_CORE,
    BUSY_OTHER_CORES,
    ROOT,
    CpuSnapshot,
    Results,
    Throughput,
    bench_onnx,
    console,
    embedded_redis,
    engine_inputs,
    free_port,
    git_commit,
    machine_busy_seconds,
    machine_section,
    machine_tag,
    metric_sums,
    new_progress,
    other_cores,
    require_engine,
    running_server,
    small_pngs,
    stop_server,
    table,
    version_of,
)
from bench_core import Plan as CorePlan  # noqa: E402
from cxr_triage.engines import OnnxEngine  # noqa: E402
from cxr_triage.imaging import ImageLimits, prepare, to_batch  # noqa: E402
from cxr_triage.repository import ModelConfig  # noqa: E402

PEERS_DIR = ROOT / "benchmarks" / "peers"
PEERS_VENV = ROOT / ".venv-peers"
REQUIREMENTS = PEERS_DIR / "requirements.txt"
LOADGEN = PEERS_DIR / "loadgen.py"
# Shared with .venv: pinned to .venv's versions in .venv-peers, so every peer has the same engine
# and decoders as cxr-triage.
SHARED_DISTS = (
    "numpy",
    "onnxruntime",
    "onnx",
    "pillow",
    "pydicom",
    "pylibjpeg",
    "pylibjpeg-openjpeg",
    "pylibjpeg-libjpeg",
    "pylibjpeg-rle",
    "python-gdcm",
)
SMOKE_BELOW_S = 10.0  # a --duration below this is a smoke run: named and marked as such
MAX_WINDOW_FACTOR = 3  # the longest interleaved cell, in --duration (window_s)
MAX_DELTA_P = 1e-3  # largest |probability difference| to the bare engine that counts as the same input


# --------------------------------------------------------------------------- peers and inputs


@dataclass(frozen=True)
class Peer:
    id: str
    label: str
    script: str | None  # file in benchmarks/peers/; None: cxr-triage itself
    venv: str  # "main" (.venv) or "peers" (.venv-peers)
    threads: int  # ONNX Runtime intra-op threads (0: its default, one per core)
    how: str  # one line for the report
    upload: str = "raw"  # "raw" body, or "multipart" (a form part named "file")
    naive: bool = False
    env: tuple[tuple[str, str], ...] = ()  # more PEER_* variables for its script


PEERS: dict[str, Peer] = {
    p.id: p
    for p in (
        Peer(
            "naive-t1",
            "naive FastAPI, ORT 1 thread",
            "naive_fastapi.py",
            "main",
            1,
            "FastAPI + uvicorn, 1 process; sync handler (thread pool): decode, engine at batch 1, reply",
            naive=True,
        ),
        Peer(
            "naive-t2",
            "naive FastAPI, ORT 2 threads",
            "naive_fastapi.py",
            "main",
            2,
            "as naive-t1 with 2 intra-op threads",
            naive=True,
        ),
        Peer(
            "litserve",
            "LitServe",
            "litserve_plain.py",
            "main",
            0,
            "LitServe defaults (1 CPU inference worker, default loop), max_batch_size 8, batch_timeout "
            "0.01 s; decode_request decodes in the inference worker",
        ),
        Peer(
            "litserve-cores",
            "LitServe, 1 worker per core",
            "litserve_plain.py",
            "main",
            1,
            "plain LitServe at cxr-triage's CPU layout: one single-threaded inference worker per core "
            "(workers_per_device = cores), max_batch_size 2, batch_timeout 0.01 s, LitServe's default "
            "HTTP servers (one per worker); decode_request decodes in the inference worker",
            env=(("PEER_WORKERS", "cores"), ("PEER_MAX_BATCH", "2")),
        ),
        Peer(
            "ray",
            "Ray Serve",
            "ray_serve_app.py",
            "peers",
            0,
            "local Ray (num_cpus = cores, no dashboard), 1 replica, max_ongoing_requests 16, "
            "@serve.batch 8 / 0.01 s; the replica's handler decodes",
        ),
        Peer(
            "bentoml",
            "BentoML",
            "bentoml_service.py",
            "peers",
            0,
            "1 worker, sync API in BentoML's thread pool, engine at batch 1; image as its native "
            "multipart file input",
            upload="multipart",
        ),
        Peer(
            "cxr-triage",
            "cxr-triage",
            None,
            "main",
            1,
            "`cxr-triage serve` with its defaults (bench_core.running_server, fresh embedded Redis): "
            "decode pool (pylibjpeg-openjpeg first for JPEG 2000), durable priority queue (the HTTP "
            "process queues the job in Redis and waits there for its outcome), one single-threaded "
            "inference worker per core at batch ≤ 2 (niced) plus the urgent lane (stat and urgent "
            "jobs, and a lone routine job, on every core)",
        ),
    )
}
ALIASES = {"naive": ["naive-t1", "naive-t2"]}
DEFAULT_PEERS = "naive,litserve,litserve-cores,ray,bentoml,cxr-triage"


@dataclass(frozen=True)
class InputKind:
    id: str
    label: str
    content_type: str


INPUTS: dict[str, InputKind] = {
    i.id: i
    for i in (
        InputKind("png", "224 px PNG (8-bit)", "image/png"),
        InputKind("jpeg", "full-resolution JPEG (1841x1955, 8-bit, q95)", "image/jpeg"),
        InputKind("j2k", "J2K DICOM (RG1_J2KR chest CR, 1841x1955, JPEG 2000 lossless)", "application/dicom"),
    )
}


def input_bodies(kind: str) -> list[bytes]:
    """The request bodies of one input kind (benchmarks' and load tests' own samples)."""
    if kind == "png":
        return small_pngs()  # 8 distinct 224x224 8-bit PNGs of the pydicom-data chest CR
    from loadtests.samples import sample

    return [sample("dicom-j2k" if kind == "j2k" else "jpeg")[0]]


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Plan:
    duration: float
    warmup: float
    concurrency: tuple[int, ...]
    inputs: tuple[str, ...]
    peers: tuple[str, ...]
    priority: bool
    priority_input: str
    priority_concurrency: int
    stat_every: float
    allow_busy: bool
    quiet_timeout: float
    results_dir: Path
    rounds: int = 2  # interleaved rounds of the target cells (bench_interleaved); 0: none
    min_replies: int = 100  # an interleaved cell measures long enough for this many (see window_s)

    @property
    def smoke(self) -> bool:
        return self.duration < SMOKE_BELOW_S

    @property
    def partial(self) -> bool:
        """Fewer cells than the default run: its results do not replace peers-latest.*."""
        full = parse_args([])
        return (self.inputs, self.concurrency, self.peers, self.priority) != (
            full.inputs,
            full.concurrency,
            full.peers,
            full.priority,
        ) or (self.priority_input, self.priority_concurrency) != (
            full.priority_input,
            full.priority_concurrency,
        )


def csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def expand_peers(names: Sequence[str]) -> tuple[str, ...]:
    out: list[str] = []
    for name in names:
        for peer in ALIASES.get(name, [name]):
            if peer not in PEERS:
                raise ValueError(f"unknown peer {peer!r}; choose from {', '.join([*ALIASES, *PEERS])}")
            if peer not in out:
                out.append(peer)
    return tuple(out)


def parse_args(argv: list[str] | None = None) -> Plan:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=20.0, help="seconds measured per cell (default 20)")
    p.add_argument("--warmup", type=float, help="seconds of load before each cell's window (default 3)")
    p.add_argument("--concurrency", default="1,4,16", help="concurrent clients per cell (default 1,4,16)")
    p.add_argument("--inputs", default="png,jpeg,j2k", help=f"of {', '.join(INPUTS)} (default all)")
    p.add_argument(
        "--peers", default=DEFAULT_PEERS, help=f"default {DEFAULT_PEERS} (naive = naive-t1,naive-t2)"
    )
    p.add_argument("--no-priority", action="store_true", help="skip the priority-under-saturation cells")
    p.add_argument("--priority-input", default="png", choices=list(INPUTS))
    p.add_argument("--priority-concurrency", type=int, default=16, help="routine clients (default 16)")
    p.add_argument("--stat-every", type=float, default=0.5, help="mean seconds between stat requests")
    p.add_argument("--allow-busy", action="store_true", help="time a busy machine anyway (cells are flagged)")
    p.add_argument("--quiet-timeout", type=float, default=120.0, help="seconds to wait for a quiet machine")
    p.add_argument("--results-dir", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="rounds of the interleaved re-measure of the target cells, naive and cxr-triage taking "
        "turns (default 2; 0: none)",
    )
    p.add_argument(
        "--min-replies",
        type=int,
        default=100,
        help="an interleaved cell measures long enough for this many replies at the slowest first-pass "
        f"rate of its peers, at most {MAX_WINDOW_FACTOR}x --duration (default 100)",
    )
    a = p.parse_args(argv)
    inputs = tuple(csv_list(a.inputs))
    if unknown := [i for i in inputs if i not in INPUTS]:
        p.error(f"unknown input {unknown}; choose from {', '.join(INPUTS)}")
    try:
        peers = expand_peers(csv_list(a.peers))
        concurrency = tuple(int(c) for c in csv_list(a.concurrency))
    except ValueError as exc:
        p.error(str(exc))
    if not concurrency or min(concurrency) < 1 or a.duration <= 0 or a.rounds < 0 or a.min_replies < 0:
        p.error(
            "--concurrency needs positive integers, --duration a positive number, --rounds and "
            "--min-replies ≥ 0"
        )
    return Plan(
        duration=a.duration,
        warmup=a.warmup if a.warmup is not None else (1.0 if a.duration < SMOKE_BELOW_S else 3.0),
        concurrency=concurrency,
        inputs=inputs,
        peers=peers,
        priority=not a.no_priority,
        priority_input=a.priority_input,
        priority_concurrency=a.priority_concurrency,
        stat_every=a.stat_every,
        allow_busy=a.allow_busy,
        quiet_timeout=a.quiet_timeout,
        results_dir=a.results_dir,
        rounds=a.rounds,
        min_replies=a.min_replies,
    )


# --------------------------------------------------------------------------- results


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


@dataclass
class Cell:
    """One measured window: a peer, an input, a concurrency (and, for priority cells, stat arrivals)."""

    peer: str
    input: str
    concurrency: int
    seconds: float
    latencies_ms: dict[str, list[float]]  # request class ("routine", "stat") -> 200 latencies in the window
    status: dict[str, dict[str, int]]  # class -> status -> count
    server_cpu_s: float
    client_cpu_s: float
    other_cpu_s: float
    wall_s: float  # between the CPU snapshots
    priority: bool = False
    # cxr-triage only: its server CPU seconds by process name (serving.lifecycle.PROCESS_NAMES),
    # and the engine's share, from its cxr_triage_engine_cpu_seconds_total.
    roles_cpu_s: dict[str, float] = field(default_factory=dict)
    engine_cpu_s: float | None = None
    round: int | None = None  # the interleaved re-measure's round (bench_interleaved); None: first pass

    def ok(self, kind: str = "routine") -> int:
        return len(self.latencies_ms.get(kind, []))

    def errors(self, kind: str = "routine") -> int:
        return sum(n for s, n in self.status.get(kind, {}).items() if s != "200")

    def throughput(self, kind: str = "routine") -> float:
        return self.ok(kind) / self.seconds if self.seconds else float("nan")

    def p(self, q: float, kind: str = "routine") -> float:
        return percentile(self.latencies_ms.get(kind, []), q)

    @property
    def other_cores(self) -> float:
        return self.other_cpu_s / self.wall_s if self.wall_s else float("nan")

    @property
    def busy(self) -> bool:
        return self.other_cores > BUSY_OTHER_CORES

    def summary(self) -> dict[str, Any]:
        kinds = [k for k in ("routine", "stat") if k in self.latencies_ms]
        return {
            "peer": self.peer,
            "input": self.input,
            "concurrency": self.concurrency,
            "priority": self.priority,
            **({} if self.round is None else {"round": self.round}),
            "seconds": self.seconds,
            "busy": self.busy,
            "cpu_s": {"server": self.server_cpu_s, "client": self.client_cpu_s, "other": self.other_cpu_s},
            "server_cpu_s_by_process": self.roles_cpu_s,
            "engine_cpu_s": self.engine_cpu_s,
            "classes": {
                k: {
                    "ok": self.ok(k),
                    "errors": self.errors(k),
                    "req_s": self.throughput(k),
                    "p50_ms": self.p(50, k),
                    "p95_ms": self.p(95, k),
                    "p99_ms": self.p(99, k),
                }
                for k in kinds
            },
        }


@dataclass
class Run:
    plan: Plan
    started: datetime
    load: float
    cells: list[Cell] = field(default_factory=list)
    interleaved: list[Cell] = field(default_factory=list)  # bench_interleaved's rounds
    bare: list[Throughput] = field(default_factory=list)
    bare_rounds: list[Throughput] = field(default_factory=list)  # its turns in bench_interleaved
    bare_other_cores: float = float("nan")
    deltas: dict[str, float] = field(default_factory=dict)  # peer -> max |p - bare engine p| over inputs
    versions: dict[str, str] = field(default_factory=dict)
    decode_cpu_ms: dict[str, float] = field(default_factory=dict)  # input -> cxr-triage's CPU per decode
    pipeline_req_s: dict[str, float] = field(default_factory=dict)  # input -> bare_pipeline's req/s
    cores: int = field(default_factory=lambda: os.cpu_count() or 1)

    @property
    def bare_img_s(self) -> float | None:
        return max((t.img_s for t in self.bare), default=None)

    @property
    def bare_rounds_img_s(self) -> float | None:
        """The bare engine's interleaved turns pooled (images ÷ seconds over every turn)."""
        seconds = sum(t.seconds for t in self.bare_rounds)
        return sum(t.calls * t.batch for t in self.bare_rounds) / seconds if seconds else None

    def ceiling(self, input: str) -> float | None:
        """Requests per second a server with no overhead at all could reach on this machine:
        every core busy with nothing but decoding (cxr-triage's decoders) and the engine, as
        measured in this run by ``bare_pipeline``."""
        return self.pipeline_req_s.get(input)

    def ceiling_alone(self, input: str) -> float | None:
        """The ceiling computed from costs measured one at a time: cores ÷ (engine CPU per image
        at the best bare layout + decoding CPU per upload, decoded alone). Higher than
        ``ceiling`` where work side by side on the cores slows each other down (shared caches
        and memory bandwidth, or cores that are SMT siblings on the host)."""
        if not self.bare_img_s or input not in self.decode_cpu_ms:
            return None
        engine_ms = 1000.0 * self.cores / self.bare_img_s
        return 1000.0 * self.cores / (engine_ms + self.decode_cpu_ms[input])


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Verdict:
    name: str
    target: str
    measured: str
    ok: bool | None  # None: not measured in this run
    busy: bool = False  # a compared cell ran on a busy machine
    reachable: bool | None = None  # False: even a server with no overhead could not meet it here

    @property
    def word(self) -> str:
        word = "not measured" if self.ok is None else ("PASS" if self.ok else "MISS")
        if self.ok is False and self.reachable is False:
            word += " (out of reach on this machine)"
        return f"{word} (machine busy: not valid)" if self.busy and self.ok is not None else word


def best_naive(cells: Sequence[Cell], input: str, concurrency: int) -> Cell | None:
    """The naive configuration with the highest throughput in that cell."""
    naive = [
        c
        for c in cells
        if PEERS[c.peer].naive and (c.input, c.concurrency, c.priority) == (input, concurrency, False)
    ]
    return max(naive, key=lambda c: c.throughput(), default=None)


def find(
    cells: Sequence[Cell], peer: str, input: str, concurrency: int, priority: bool = False
) -> Cell | None:
    return next(
        (
            c
            for c in cells
            if (c.peer, c.input, c.concurrency, c.priority) == (peer, input, concurrency, priority)
        ),
        None,
    )


def ratio(a: float, b: float) -> float:
    return a / b if b and b == b else float("nan")


def throughput_verdict(
    cells: Sequence[Cell], input: str, concurrency: int, factor: float, ceiling: float | None = None
) -> Verdict:
    """``ceiling``: the machine's zero-overhead requests per second for this input (Run.ceiling)."""
    name = f"{INPUTS[input].label.split(' (')[0]}, c{concurrency}: throughput vs best naive"
    target = f"≥ {factor:g}x"
    ours, naive = find(cells, "cxr-triage", input, concurrency), best_naive(cells, input, concurrency)
    if ours is None or naive is None:
        return Verdict(name, target, "—", None)
    r = ratio(ours.throughput(), naive.throughput())
    measured = f"{r:.2f}x ({ours.throughput():.1f} vs {naive.peer} {naive.throughput():.1f} req/s)"
    reachable = None
    if ceiling:
        top = ratio(ceiling, naive.throughput())
        measured += f"; ceiling here {ceiling:.1f} req/s = {top:.2f}x"
        reachable = top >= factor
    return Verdict(name, target, measured, r >= factor, ours.busy or naive.busy, reachable)


def targets(
    cells: Sequence[Cell],
    bare_img_s: float | None,
    priority_concurrency: int = 16,
    ceilings: dict[str, float | None] | None = None,
) -> list[Verdict]:
    """``ceilings``: input -> the zero-overhead requests per second on this machine (Run.ceiling)."""
    ceilings = ceilings or {}
    out = [throughput_verdict(cells, "png", 16, 0.95, ceilings.get("png"))]
    ours, naive = find(cells, "cxr-triage", "png", 16), best_naive(cells, "png", 16)
    name = "224 px PNG, c16: p95 vs the best naive's"
    if ours is None or naive is None:
        out.append(Verdict(name, "no worse", "—", None))
    else:
        measured = f"{ours.p(95):.0f} vs {naive.peer} {naive.p(95):.0f} ms"
        out.append(Verdict(name, "no worse", measured, ours.p(95) <= naive.p(95), ours.busy or naive.busy))
    name = "224 px PNG, c16: served ÷ bare engine"
    if ours is None or not bare_img_s:
        out.append(Verdict(name, "≥ 0.9", "—", None))
    else:
        r = ours.throughput() / bare_img_s
        measured = f"{r:.2f} ({ours.throughput():.1f} vs {bare_img_s:.1f} img/s)"
        if naive is not None:  # what a server with no queue at all reaches against the same engine
            measured += f"; best naive {naive.throughput() / bare_img_s:.2f}"
        out.append(Verdict(name, "≥ 0.9", measured, r >= 0.9, ours.busy))
    out += [throughput_verdict(cells, i, c, 1.3, ceilings.get(i)) for i in ("jpeg", "j2k") for c in (4, 16)]
    out.append(priority_verdict(cells, priority_concurrency))
    return out


def pooled(cells: Sequence[Cell]) -> list[Cell]:
    """One cell per peer, input and concurrency of ``cells`` (the interleaved rounds): their
    replies, latencies, seconds and CPU added up, so that its figures weigh every round alike."""
    groups: dict[tuple[str, str, int, bool], list[Cell]] = {}
    for c in cells:
        groups.setdefault((c.peer, c.input, c.concurrency, c.priority), []).append(c)
    out = []
    for (peer, input, concurrency, priority), group in groups.items():
        kinds = dict.fromkeys(k for c in group for k in c.latencies_ms)
        status: dict[str, Counter[str]] = {}  # request class -> HTTP status -> count, added up
        roles: Counter[str] = Counter()
        for c in group:
            for kind, counts in c.status.items():
                status.setdefault(kind, Counter()).update(counts)
            roles.update(c.roles_cpu_s)
        engine = [c.engine_cpu_s for c in group]
        out.append(
            Cell(
                peer=peer,
                input=input,
                concurrency=concurrency,
                seconds=sum(c.seconds for c in group),
                latencies_ms={k: [ms for c in group for ms in c.latencies_ms.get(k, [])] for k in kinds},
                status={kind: dict(counts) for kind, counts in status.items()},
                server_cpu_s=sum(c.server_cpu_s for c in group),
                client_cpu_s=sum(c.client_cpu_s for c in group),
                other_cpu_s=sum(c.other_cpu_s for c in group),
                wall_s=sum(c.wall_s for c in group),
                priority=priority,
                roles_cpu_s=dict(roles),
                engine_cpu_s=None if None in engine else sum(e for e in engine if e is not None),
            )
        )
    return out


def target_cells(run: "Run") -> list[Cell]:
    """The cells the targets compare: the interleaved rounds, pooled, where they were measured;
    the first pass elsewhere (and for priority)."""
    again = pooled(run.interleaved)
    keys = {(c.input, c.concurrency) for c in again}
    return [c for c in run.cells if c.priority or (c.input, c.concurrency) not in keys] + again


def priority_verdict(cells: Sequence[Cell], concurrency: int) -> Verdict:
    name = f"priority under saturation (c{concurrency} routine): stat p95 vs naive's"
    target = "≤ 0.25x"
    prio = [c for c in cells if c.priority and c.concurrency == concurrency and c.ok("stat")]
    ours = next((c for c in prio if c.peer == "cxr-triage"), None)
    naive = min((c for c in prio if PEERS[c.peer].naive), key=lambda c: c.p(95, "stat"), default=None)
    if ours is None or naive is None:
        return Verdict(name, target, "—", None)
    r = ratio(ours.p(95, "stat"), naive.p(95, "stat"))
    measured = f"{r:.2f}x ({ours.p(95, 'stat'):.0f} vs {naive.peer} {naive.p(95, 'stat'):.0f} ms)"
    return Verdict(name, target, measured, r <= 0.25, ours.busy or naive.busy)


# --------------------------------------------------------------------------- CPU accounting


def read_procs() -> dict[int, tuple[int, int, int, float]]:
    """pid -> (ppid, process group, session, user + system CPU seconds) of every live process."""
    out, tick = {}, os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # after "(comm)": state(0) ppid(1) pgrp(2) session(3) ... utime(11) stime(12)
        out[int(stat.parent.name)] = (
            int(fields[1]),
            int(fields[2]),
            int(fields[3]),
            (int(fields[11]) + int(fields[12])) / tick,
        )
    return out


def tree_cpu(
    roots: Sequence[int], procs: dict[int, tuple[int, int, int, float]] | None = None
) -> dict[int, float]:
    """CPU seconds of each process that belongs to ``roots``: the roots, their descendants, and any
    process in a session or process group that a root leads (Ray's actors lead their own groups)."""
    procs = read_procs() if procs is None else procs
    wanted = set(roots)
    members = {
        pid for pid, (_, pgid, sid, _) in procs.items() if pid in wanted or pgid in wanted or sid in wanted
    }
    children: dict[int, list[int]] = {}
    for pid, (ppid, *_) in procs.items():
        children.setdefault(ppid, []).append(pid)
    todo = list(members)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in members:
                members.add(child)
                todo.append(child)
    return {pid: procs[pid][3] for pid in members}


def snapshot(server_roots: Sequence[int], client_pid: int | None = None) -> CpuSnapshot:
    """bench_core's CpuSnapshot: ``client`` is the load generator (or this process), ``server`` the
    server's process tree."""
    procs = read_procs()
    server = tree_cpu(server_roots, procs) if server_roots else {}
    client = sum(tree_cpu([client_pid], procs).values()) if client_pid else time.process_time()
    return CpuSnapshot(time.perf_counter(), machine_busy_seconds(), client, server)


class Busy(RuntimeError):
    """The machine is not quiet: nothing is timed."""


def wait_quiet(server_roots: Sequence[int], plan: Plan, what: str, check_load: bool = False) -> float:
    """Wait until other processes take at most BUSY_OTHER_CORES (2 s samples) and, with
    ``check_load``, the load average is below bench_core's threshold; return the last sample.
    Raises Busy after ``plan.quiet_timeout`` s unless --allow-busy."""
    cores = os.cpu_count() or 1
    deadline = time.monotonic() + plan.quiet_timeout
    with console.status(f"checking that the machine is quiet before {what}…") as status:
        while True:
            before = snapshot(server_roots)
            time.sleep(2.0)
            sample = other_cores(before, snapshot(server_roots))
            load = os.getloadavg()[0]
            quiet = sample <= BUSY_OTHER_CORES and (not check_load or load < BUSY_LOAD_PER_CORE * cores)
            if quiet or plan.allow_busy:
                if not quiet:
                    console.print(
                        f"[yellow]busy machine ({sample:.2f} other cores, load {load:.2f}): "
                        "timing anyway (--allow-busy)[/]"
                    )
                return sample
            if time.monotonic() > deadline:
                raise Busy(
                    f"the machine is busy before {what}: other processes take {sample:.2f} cores "
                    f"(limit {BUSY_OTHER_CORES}), load average {load:.2f}; nothing timed. "
                    "Stop the other work, or pass --allow-busy to time it anyway (flagged)."
                )
            status.update(
                f"waiting for a quiet machine before {what}: other {sample:.2f} cores, load {load:.2f}"
            )


# --------------------------------------------------------------------------- the peers' environment


def constraints_text() -> str:
    return "".join(f"{d}=={v}\n" for d in SHARED_DISTS if (v := version_of(d)) != "not installed")


def ensure_peers_venv() -> Path:
    """.venv-peers with Ray Serve and BentoML (and .venv's engine and decoders), built when
    benchmarks/peers/requirements.txt or those versions changed. Returns its python."""
    python = PEERS_VENV / "bin" / "python"
    constraints = constraints_text()
    want = hashlib.sha256(REQUIREMENTS.read_bytes() + constraints.encode()).hexdigest()
    stamp = PEERS_VENV / ".bench-peers-stamp"
    if python.is_file() and stamp.is_file() and stamp.read_text().strip() == want:
        return python
    with console.status(
        "installing the peers (Ray Serve, BentoML) into .venv-peers (minutes the first time)…"
    ):
        if not python.is_file():
            subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
        with tempfile.NamedTemporaryFile("w", suffix=".txt") as c:
            c.write(constraints)
            c.flush()
            cmd = [str(python), "-m", "pip", "install", "-q", "-r", str(REQUIREMENTS), "-c", c.name]
            subprocess.run(cmd, check=True)
    stamp.write_text(want + "\n")
    return python


def peers_versions(python: Path) -> dict[str, str]:
    code = (
        "from importlib.metadata import version as v; import json; "
        "print(json.dumps({d: v(d) for d in ('ray', 'bentoml')}))"
    )
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=False)
    return json.loads(out.stdout) if out.returncode == 0 else {}


# --------------------------------------------------------------------------- servers


@dataclass
class Running:
    peer: Peer
    url: str  # the predict endpoint
    roots: list[int]  # the server's process tree: session / group leaders
    idle_cores: float = 0.0  # its CPU use with no requests (Ray's background processes), once started
    metrics_url: str | None = None  # cxr-triage's /metrics: the engine's CPU time


def peer_env(peer: Peer, engine: Path, config: ModelConfig, port: int, home: Path) -> dict[str, str]:
    pythonpath = os.pathsep.join([str(ROOT / "server"), str(PEERS_DIR)])
    return {
        **os.environ,
        "PEER_MODEL": str(engine),
        "PEER_SPEC": config.input.model_dump_json(),
        "PEER_THREADS": str(peer.threads),
        "PEER_PORT": str(port),
        "PYTHONPATH": pythonpath,
        "BENTOML_DO_NOT_TRACK": "true",
        "BENTOML_HOME": str(home),
        "RAY_USAGE_STATS_ENABLED": "0",
        **dict(peer.env),
    }


def peer_command(peer: Peer, port: int) -> list[str]:
    assert peer.script is not None
    if peer.venv == "main":
        return [sys.executable, str(PEERS_DIR / peer.script)]
    if peer.id == "bentoml":
        bentoml = str(PEERS_VENV / "bin" / "bentoml")
        return [bentoml, "serve", "bentoml_service:CxrPeer", "--host", "127.0.0.1", "--port", str(port)]
    return [str(PEERS_VENV / "bin" / "python"), str(PEERS_DIR / peer.script)]


def post(url: str, body: bytes, content_type: str, upload: str, timeout: float = 120.0) -> httpx.Response:
    if upload == "multipart":
        return httpx.post(url, files={"file": ("image", body, content_type)}, timeout=timeout)
    return httpx.post(url, content=body, headers={"content-type": content_type}, timeout=timeout)


def wait_answering(proc: subprocess.Popen[bytes], running: Running, log: Any, timeout: float) -> None:
    """Until the server scores a PNG (200), or fail with its log."""
    body, deadline = input_bodies("png")[0], time.monotonic() + timeout
    with console.status(f"starting {running.peer.label}…"):
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            with suppress(httpx.HTTPError):
                if post(running.url, body, "image/png", running.peer.upload, 30).status_code == 200:
                    return
            time.sleep(0.5)
    log.seek(0)
    tail = log.read().decode(errors="replace")[-3000:]
    state = (
        f"exited with {proc.returncode}" if proc.poll() is not None else f"not ready after {timeout:.0f} s"
    )
    raise RuntimeError(f"{running.peer.id} {state}:\n{tail}")


def kill_leftovers(roots: Sequence[int]) -> None:
    """SIGKILL what is left of a stopped server's tree (Ray's actors lead their own groups)."""
    for pid in tree_cpu(roots):
        with suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


@contextmanager
def start_peer(peer: Peer, engine: Path, config: ModelConfig) -> Iterator[Running]:
    if peer.script is None:
        with running_server() as (url, pgid, data_dir):
            redis = embedded_redis(data_dir)
            roots = [pgid] + ([redis] if redis else [])
            yield Running(peer, f"{url}/v1/predict", roots, metrics_url=f"{url}/metrics")
        return
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="cxr-peer-") as home, tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            peer_command(peer, port),
            cwd=PEERS_DIR,
            env=peer_env(peer, engine, config, port, Path(home)),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        running = Running(peer, f"http://127.0.0.1:{port}/predict", [proc.pid])
        try:
            wait_answering(proc, running, log, timeout=300.0)
            yield running
        finally:
            stop_server(proc, grace=30.0)
            deadline = time.monotonic() + 15
            while tree_cpu([proc.pid]) and time.monotonic() < deadline:
                time.sleep(0.5)
            kill_leftovers([proc.pid])


# --------------------------------------------------------------------------- correctness probe


def model_input(body: bytes, kind: str, config: ModelConfig) -> np.ndarray:
    """The engine's batch of one for an upload of ``kind``, built with cxr-triage's decoding
    (``prepare``, then ``to_batch``): the model input every peer must build."""
    return to_batch(
        [prepare(body, INPUTS[kind].content_type, config.input, ImageLimits()).pixels], config.input
    )


def reference(engine_path: Path, config: ModelConfig, bodies: dict[str, bytes]) -> dict[str, np.ndarray]:
    """The bare engine's probabilities for each input (the model input every peer must build)."""
    engine = OnnxEngine(engine_path, "cpu", intra_op_threads=0)
    return {kind: engine.run(model_input(body, kind, config))[0] for kind, body in bodies.items()}


def probabilities(body: dict[str, Any]) -> list[float]:
    """A peer's reply ({"probabilities": [...]}) or cxr-triage's (API.md: findings in label order)."""
    if "probabilities" in body:
        return [float(p) for p in body["probabilities"]]
    return [float(f["probability"]) for f in body["findings"]]


def probe(running: Running, bodies: dict[str, bytes], ref: dict[str, np.ndarray]) -> float:
    """One request per input (also a warm-up); the largest |probability difference| to the bare engine."""
    worst = 0.0
    for kind, body in bodies.items():
        response = post(running.url, body, INPUTS[kind].content_type, running.peer.upload)
        if response.status_code != 200:
            raise RuntimeError(
                f"{running.peer.id} answered {response.status_code} to {kind}: {response.text[:300]}"
            )
        got = np.asarray(probabilities(response.json()), dtype=np.float32)
        worst = max(worst, float(np.max(np.abs(got - ref[kind]))))
    return worst


# --------------------------------------------------------------------------- cells


def server_cores(roots: Sequence[int], seconds: float) -> float:
    """Mean cores the server's tree uses over ``seconds``."""
    before = snapshot(roots)
    time.sleep(seconds)
    after = snapshot(roots)
    used = sum(cpu - before.server.get(pid, 0.0) for pid, cpu in after.server.items())
    return used / (after.wall - before.wall)


def settle(running: "Running", limit_s: float = 30.0) -> None:
    """Wait until the server is back to its idle CPU use (it finished what it had queued)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and server_cores(running.roots, 0.5) > running.idle_cores + 0.2:
        pass


@dataclass
class Window:
    """What run_loadgen saw at the edges of the load generator's window."""

    result: dict[str, Any]
    before: CpuSnapshot
    after: CpuSnapshot
    engine_cpu_s: float | None  # cxr-triage's engine CPU seconds in the window


def engine_cpu_seconds(metrics_url: str | None) -> float | None:
    """cxr_triage_engine_cpu_seconds_total, summed over its series (None: not served)."""
    if metrics_url is None:
        return None
    name = "cxr_triage_engine_cpu_seconds_total"
    return metric_sums(httpx.get(metrics_url, timeout=30).text, [name]).get(name)


def process_names(pids: Iterable[int]) -> dict[int, str]:
    """/proc/PID/comm of each process still alive: cxr-triage's name their role."""
    out = {}
    for pid in pids:
        with suppress(OSError):
            out[pid] = Path(f"/proc/{pid}/comm").read_text().strip()
    return out


def run_loadgen(running: Running, job: dict[str, Any]) -> Window:
    """The load generator as its own process; CPU snapshots at its window's start and end."""
    proc = subprocess.Popen(
        [sys.executable, str(LOADGEN), json.dumps(job)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    before = after = None
    engine: list[float | None] = []
    result: dict[str, Any] | None = None
    for line in proc.stdout:
        if line.startswith("window start"):
            before = snapshot(running.roots, proc.pid)
            engine.append(engine_cpu_seconds(running.metrics_url))
        elif line.startswith("window end"):
            after = snapshot(running.roots, proc.pid)
            engine.append(engine_cpu_seconds(running.metrics_url))
        elif line.startswith("{"):
            result = json.loads(line)
    if proc.wait() != 0 or result is None or before is None or after is None:
        raise RuntimeError(f"the load generator failed (exit {proc.returncode})")
    start, end = engine
    return Window(result, before, after, None if start is None or end is None else end - start)


def measure_cell(
    running: Running,
    kind: str,
    files: list[str],
    concurrency: int,
    plan: Plan,
    priority: bool = False,
) -> Cell:
    job: dict[str, Any] = {
        "url": running.url,
        "bodies": files,
        "content_type": INPUTS[kind].content_type,
        "upload": running.peer.upload,
        "concurrency": concurrency,
        "warmup": plan.warmup,
        "duration": plan.duration,
    }
    if priority:
        job |= {
            "params": {"priority": "routine"},
            "stat_every": plan.stat_every,
            "stat_params": {"priority": "stat"},
        }
    window = run_loadgen(running, job)
    result, before, after = window.result, window.before, window.after
    # Per process, so that a process started or ended in the window counts only its own share.
    used = {pid: cpu - before.server.get(pid, 0.0) for pid, cpu in after.server.items()}
    server = sum(used.values())
    roles: dict[str, float] = {}
    if running.metrics_url is not None:
        for pid, name in process_names(used).items():
            roles[name] = roles.get(name, 0.0) + used[pid]
    client = after.client - before.client
    classes = result["classes"] if priority else {"routine": result["classes"]["routine"]}
    return Cell(
        peer=running.peer.id,
        input=kind,
        concurrency=concurrency,
        seconds=float(result["seconds"]),
        latencies_ms={k: v["latencies_ms"] for k, v in classes.items()},
        status={k: v["status"] for k, v in classes.items()},
        server_cpu_s=server,
        client_cpu_s=client,
        other_cpu_s=max(0.0, after.busy - before.busy - server - client),
        wall_s=after.wall - before.wall,
        priority=priority,
        roles_cpu_s=roles,
        engine_cpu_s=window.engine_cpu_s,
    )


def timed_cell(
    running: Running, kind: str, files: list[str], concurrency: int, plan: Plan, priority: bool = False
) -> Cell:
    """A cell on a quiet machine: rerun once after waiting when other work ran meanwhile."""
    for attempt in range(2):
        cell = measure_cell(running, kind, files, concurrency, plan, priority)
        settle(running)
        if not cell.busy or plan.allow_busy:
            return cell
        console.print(f"[yellow]other processes took {cell.other_cores:.2f} cores during the cell[/]")
        if attempt == 0:
            wait_quiet(running.roots, plan, "rerunning the cell")
    raise Busy(
        f"other processes took {cell.other_cores:.2f} cores (limit {BUSY_OTHER_CORES}) during "
        f"{running.peer.id} {kind} c{concurrency} twice; stopped. Pass --allow-busy to time it anyway."
    )


def cell_line(c: Cell) -> str:
    extra = f", stat p95 {c.p(95, 'stat'):.0f} ms" if c.priority else ""
    busy = " [yellow](busy)[/]" if c.busy else ""
    return (
        f"{c.peer:<11} {c.input:<5} c{c.concurrency:<3}{' priority' if c.priority else ''}: "
        f"{c.throughput():.1f} req/s, p95 {c.p(95):.0f} ms{extra}, "
        f"errors {sum(c.errors(k) for k in c.status)}; "
        f"CPU server {c.server_cpu_s / c.wall_s:.2f} / client {c.client_cpu_s / c.wall_s:.2f} / "
        f"other {c.other_cores:.2f} cores{busy}"
    )


def side_by_side(engine_path: Path, batch: np.ndarray, sessions: int, seconds: float) -> Throughput:
    """``sessions`` single-threaded engines side by side (threads: ONNX Runtime releases the GIL),
    the layout of cxr-triage's CPU workers; images per second over ``seconds``."""
    engines = [OnnxEngine(engine_path, "cpu", intra_op_threads=1) for _ in range(sessions)]
    for engine in engines:
        engine.run(batch)
    stop = time.perf_counter() + seconds
    latencies: list[list[float]] = [[] for _ in engines]

    def loop(i: int) -> None:
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            engines[i].run(batch)
            latencies[i].append((time.perf_counter() - t0) * 1000)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(sessions)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = [ms for per in latencies for ms in per]
    return Throughput(f"{sessions} x 1 thread", len(batch), len(flat), time.perf_counter() - t0, flat)


def decode_cpu_ms(kind: str, config: ModelConfig, repeats: int) -> float:
    """CPU milliseconds per upload of ``kind`` for cxr-triage's decoding (prepare + to_batch)."""
    body = input_bodies(kind)[0]
    model_input(body, kind, config)  # imports, plugin choice
    t0 = time.process_time()
    for _ in range(repeats):
        model_input(body, kind, config)
    return (time.process_time() - t0) * 1000.0 / repeats


def bare_pipeline(
    kind: str, engine_path: Path, config: ModelConfig, processes: int, seconds: float
) -> tuple[float, float]:
    """Requests per second with no server at all: ``processes`` processes (one per core) each
    decoding an upload of ``kind`` with cxr-triage's decoding and running the engine on it
    (single-threaded, batch 1), over and over, side by side for ``seconds``. The ceiling of
    every server here: it pays only for decoding and the engine, but pays for them side by
    side, as a saturated server does. Also returns the cores other processes took meanwhile."""
    before, children = snapshot([]), _children_cpu_s()
    context = get_context("spawn")
    start, results = context.Barrier(processes), context.SimpleQueue()
    args = (kind, str(engine_path), config, seconds, start, results)
    workers = [context.Process(target=_pipeline_loop, args=args, daemon=True) for _ in range(processes)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(seconds + 600)
    if any(worker.exitcode != 0 for worker in workers):
        raise RuntimeError(f"a bare pipeline process for {kind} failed: {[w.exitcode for w in workers]}")
    req_s = sum(calls / elapsed for calls, elapsed in (results.get() for _ in workers))
    after = snapshot([])
    ours = _children_cpu_s() - children  # the pipeline's processes, ended and waited for
    other = other_cores(before, after) - ours / max(after.wall - before.wall, 1e-9)
    return req_s, max(0.0, other)


def _children_cpu_s() -> float:
    """CPU seconds of this process's children that ended and were waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _pipeline_loop(
    kind: str, engine: str, config: ModelConfig, seconds: float, start: Any, results: Any
) -> None:
    """One process of ``bare_pipeline``: warm up, wait for the others, then decode and score
    until ``seconds`` have passed (at least twice); puts (uploads, seconds) on ``results``."""
    try:
        session = OnnxEngine(Path(engine), "cpu", intra_op_threads=1)
        body = input_bodies(kind)[0]

        def once() -> None:
            session.run(model_input(body, kind, config))

        once()
    except BaseException:
        start.abort()  # the others stop waiting for this one
        raise
    start.wait(600)
    t0, calls = time.perf_counter(), 0
    while calls < 2 or time.perf_counter() - t0 < seconds:
        once()
        calls += 1
    results.put((calls, time.perf_counter() - t0))


def bench_bare(engine_path: Path, config: ModelConfig, plan: Plan, run: Run) -> None:
    """The bare engine (no server) in this process: one session on all cores at batch 1 and 8,
    and one single-threaded session per core side by side at batch 1 and 2; then decoding's CPU
    per input. The best of them is the ceiling for served ÷ engine and for the targets."""
    wait_quiet([], plan, "the bare engine")
    core = CorePlan(
        duration=plan.duration,
        repeats=0,
        warmup_calls=3,
        served_warmup=0.0,
        quick=plan.smoke,
        skip_torch=True,
        skip_server=True,
        clients_per_batch=2,
    )
    before = snapshot([])
    inputs = engine_inputs(config)
    with new_progress() as progress:
        run.bare = bench_onnx(engine_path, inputs, core, progress)
    seconds = 2.0 if plan.smoke else plan.duration
    for batch in (1, 2):
        run.bare.append(side_by_side(engine_path, np.concatenate([inputs[1]] * batch), run.cores, seconds))
    run.bare_other_cores = other_cores(before, snapshot([]))
    for kind in INPUTS:
        run.decode_cpu_ms[kind] = decode_cpu_ms(kind, config, 2 if kind == "j2k" or plan.smoke else 20)
        run.pipeline_req_s[kind], other = bare_pipeline(kind, engine_path, config, run.cores, seconds)
        run.bare_other_cores = max(run.bare_other_cores, other)


def bench_peer(
    peer: Peer,
    engine: Path,
    config: ModelConfig,
    files: dict[str, list[str]],
    refs: Any,
    plan: Plan,
    run: Run,
) -> None:
    bodies = {k: Path(v[0]).read_bytes() for k, v in files.items()}
    with start_peer(peer, engine, config) as running:
        run.deltas[peer.id] = probe(running, bodies, refs)
        running.idle_cores = server_cores(running.roots, 2.0)
        wait_quiet(running.roots, plan, f"timing {peer.id}")
        for kind in plan.inputs:
            for concurrency in plan.concurrency:
                cell = timed_cell(running, kind, files[kind], concurrency, plan)
                run.cells.append(cell)
                console.print(cell_line(cell))
        if plan.priority and (peer.naive or peer.id == "cxr-triage"):
            kind = plan.priority_input
            cell = timed_cell(running, kind, files[kind], plan.priority_concurrency, plan, priority=True)
            run.cells.append(cell)
            console.print(cell_line(cell))


# The throughput-target cells (issue 13), measured again with the servers taking turns.
INTERLEAVED_CELLS = (("png", 16), ("jpeg", 4), ("jpeg", 16), ("j2k", 4), ("j2k", 16))


@contextmanager
def frozen(servers: Sequence[Running]) -> Iterator[None]:
    """Stop every process of ``servers`` (SIGSTOP; SIGCONT on leaving): a server waiting for its
    turn takes no CPU from the one measured, not even its idle upkeep."""
    pids = [pid for s in servers for pid in tree_cpu(s.roots)]
    for pid in pids:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def window_s(plan: Plan, first_pass: Sequence[Cell]) -> float:
    """Seconds an interleaved cell measures: ``plan.duration``, or longer where the slowest peer's
    first-pass rate would give fewer than ``plan.min_replies`` replies (a J2K cell gets ~40 in
    20 s, so one reply more or less moves its ratio by ~2.5%), at most MAX_WINDOW_FACTOR times."""
    rates = [c.throughput() for c in first_pass if not c.priority]
    if not rates or min(rates) <= 0:
        return plan.duration
    wanted = plan.min_replies / min(rates)
    return min(max(plan.duration, wanted), MAX_WINDOW_FACTOR * plan.duration)


def bench_interleaved(
    engine: Path, config: ModelConfig, files: dict[str, list[str]], plan: Plan, run: Run
) -> None:
    """The target cells again, every naive configuration and cxr-triage running at once and taking
    turns, ``plan.rounds`` times (the order reversed every other round; the servers not measured
    are frozen). The first pass runs every cell of a peer before the next peer, so the naive and
    cxr-triage cells of one input lie many minutes apart; here the machine's drift over the run
    falls on both alike. The PNG c16 rounds also give the bare engine a turn (every server
    frozen; one single-threaded session per core, cxr-triage's layout, at batch 1), so that
    served ÷ bare engine compares two measures taken side by side too."""
    peers = [p for p in plan.peers if PEERS[p].naive or p == "cxr-triage"]
    keys = [(i, c) for i, c in INTERLEAVED_CELLS if i in plan.inputs and c in plan.concurrency]
    if plan.rounds < 1 or "cxr-triage" not in peers or len(peers) < 2 or not keys:
        return
    one = engine_inputs(config)[1]  # the bare engine's batch for its turns (decoded once)
    with ExitStack() as stack:
        servers = [stack.enter_context(start_peer(PEERS[p], engine, config)) for p in peers]
        for s in servers:
            with frozen([o for o in servers if o is not s]):
                s.idle_cores = server_cores(s.roots, 2.0)
        for kind, concurrency in keys:
            first = [
                c for c in run.cells if c.peer in peers and (c.input, c.concurrency) == (kind, concurrency)
            ]
            cell_plan = replace(plan, duration=window_s(plan, first))
            turns: list[Running | None] = [*servers, *([None] if (kind, concurrency) == ("png", 16) else [])]
            for r in range(plan.rounds):
                for s in turns if r % 2 == 0 else turns[::-1]:
                    if s is None:  # the bare engine's turn
                        with frozen(servers):
                            bare = side_by_side(engine, one, run.cores, cell_plan.duration)
                        run.bare_rounds.append(bare)
                        console.print(f"round {r + 1}: bare engine {bare.engine}: {bare.img_s:.1f} img/s")
                        continue
                    with frozen([o for o in servers if o is not s]):
                        cell = replace(timed_cell(s, kind, files[kind], concurrency, cell_plan), round=r + 1)
                    run.interleaved.append(cell)
                    console.print(f"round {r + 1}: {cell_line(cell)}")


def run_all(plan: Plan) -> Run:
    config, engine = require_engine()
    run = Run(plan, datetime.now(UTC), os.getloadavg()[0])
    wait_quiet([], plan, "the benchmark", check_load=True)
    if any(PEERS[p].venv == "peers" for p in plan.peers):
        run.versions = peers_versions(ensure_peers_venv())
    kinds = sorted({*plan.inputs, plan.priority_input} if plan.priority else set(plan.inputs))
    with tempfile.TemporaryDirectory(prefix="cxr-bench-peers-") as tmp:
        files: dict[str, list[str]] = {}
        for kind in kinds:
            files[kind] = []
            for i, body in enumerate(input_bodies(kind)):
                path = Path(tmp) / f"{kind}-{i}"
                path.write_bytes(body)
                files[kind].append(str(path))
        refs = reference(engine, config, {k: Path(v[0]).read_bytes() for k, v in files.items()})
        bench_bare(engine, config, plan, run)
        for peer_id in plan.peers:
            bench_peer(PEERS[peer_id], engine, config, files, refs, plan, run)
        bench_interleaved(engine, config, files, plan, run)
    return run


# --------------------------------------------------------------------------- report


def fmt(value: float, digits: int = 0) -> str:
    return "—" if value != value else f"{value:.{digits}f}"


def cpu_cell(seconds: float, wall: float) -> str:
    return f"{seconds:.1f} ({seconds / wall:.2f})" if wall else "—"


def result_rows(
    cells: Sequence[Cell], kind: str, concurrency: Sequence[int], peers: Sequence[str]
) -> list[list[str]]:
    rows = []
    for c in concurrency:
        for peer in peers:
            cell = find(cells, peer, kind, c)
            if cell is None:
                continue
            rows.append([str(c), *cell_figures(cell)])
    return rows


def cell_figures(cell: Cell) -> list[str]:
    """A cell's row from its peer on (RESULT_HEADER less the concurrency)."""
    req_s = f"{cell.throughput():.1f}"
    return [
        PEERS[cell.peer].label,
        f"**{req_s}**" if cell.peer == "cxr-triage" else req_s,
        fmt(cell.p(50)),
        fmt(cell.p(95)),
        fmt(cell.p(99)),
        f"{cell.ok()} / {cell.errors()}",
        cpu_cell(cell.server_cpu_s, cell.wall_s),
        cpu_cell(cell.client_cpu_s, cell.wall_s),
        cpu_cell(cell.other_cpu_s, cell.wall_s) + (" **busy**" if cell.busy else ""),
    ]


RESULT_HEADER = [
    "conc.",
    "peer",
    "req/s",
    "p50 ms",
    "p95 ms",
    "p99 ms",
    "200 / other",
    "CPU s server (cores)",
    "CPU s client (cores)",
    "CPU s other (cores)",
]


def results_section(run: Run) -> list[str]:
    out = ["## Results", ""]
    for kind in run.plan.inputs:
        rows = result_rows(run.cells, kind, run.plan.concurrency, run.plan.peers)
        out += [f"### {INPUTS[kind].label}", "", *table(RESULT_HEADER, rows), ""]
    out += [
        f"Each cell: {run.plan.warmup:g} s warm-up, then {run.plan.duration:g} s measured; *req/s* counts "
        "200 replies completed in the window, latencies are the client's send-to-reply times of those "
        "replies. CPU seconds in the window: the server's whole process tree (cxr-triage: with its "
        "embedded Redis; Ray: every Ray process), the load generator (its own process), and "
        "everything else on the machine (`/proc/stat` minus those two); in brackets, mean cores. "
        f"A cell where everything else took more than {BUSY_OTHER_CORES} cores is marked **busy**.",
        "",
    ]
    return out


def priority_section(run: Run) -> list[str]:
    cells = [c for c in run.cells if c.priority]
    if not cells:
        return []
    rows = [
        [
            PEERS[c.peer].label,
            f"{c.throughput():.1f}",
            fmt(c.p(95)),
            str(c.ok("stat")),
            fmt(c.p(50, "stat")),
            f"**{fmt(c.p(95, 'stat'))}**",
            fmt(c.p(99, "stat")),
            f"{c.errors() + c.errors('stat')}",
            cpu_cell(c.server_cpu_s, c.wall_s),
            cpu_cell(c.client_cpu_s, c.wall_s),
            cpu_cell(c.other_cpu_s, c.wall_s) + (" **busy**" if c.busy else ""),
        ]
        for c in cells
    ]
    header = [
        "peer",
        "routine req/s",
        "routine p95 ms",
        "stat n",
        "stat p50 ms",
        "stat p95 ms",
        "stat p99 ms",
        "errors",
        "CPU s server",
        "CPU s client",
        "CPU s other",
    ]
    kind = INPUTS[run.plan.priority_input].label
    return [
        "## Priority under saturation",
        "",
        *table(header, rows),
        "",
        f"{run.plan.priority_concurrency} closed-loop clients send {kind} with `?priority=routine` and keep "
        f"the server saturated; stat requests (`?priority=stat`) arrive at random next to them, one per "
        f"{run.plan.stat_every:g} s on average (open loop). The naive server ignores the parameter.",
        "",
    ]


def bare_section(run: Run) -> list[str]:
    def layout(t: Throughput) -> str:
        return "1 session, intra-op threads 0 (all cores)" if t.engine == "onnxruntime-cpu" else t.engine

    rows = [[layout(t), str(t.batch), f"{t.img_s:.1f}", f"{t.p50_ms:.1f}"] for t in run.bare]
    rows += [
        [f"{t.engine}, PNG c16 round {i + 1}", str(t.batch), f"{t.img_s:.1f}", f"{t.p50_ms:.1f}"]
        for i, t in enumerate(run.bare_rounds)
    ]
    busy = " **busy**" if run.bare_other_cores > BUSY_OTHER_CORES else ""
    decode = [
        [
            INPUTS[k].label,
            f"{ms:.1f}",
            fmt(run.ceiling_alone(k) or float("nan"), 1),
            fmt(run.ceiling(k) or float("nan"), 1),
        ]
        for k, ms in run.decode_cpu_ms.items()
    ]
    return [
        "## Bare engine (no server)",
        "",
        *table(["layout", "batch", "img/s", "ms/call p50"], rows),
        "",
        f"ONNX Runtime CPU EP, the same model.onnx and a pre-decoded radiograph; {run.plan.duration:g} s "
        f"per row, in the bench process with no server running (other processes: "
        f"{fmt(run.bare_other_cores, 2)} cores{busy}). *N x 1 thread*: one single-threaded session per "
        "core running side by side (cxr-triage's CPU layout). *served ÷ bare engine* uses the best row, "
        "or, where taken, the bare engine's turns in the interleaved PNG c16 rounds, pooled (every "
        "server stopped meanwhile).",
        "",
        *table(
            [
                "input",
                "decoding CPU ms per upload, alone (cxr-triage's decoders)",
                "cores ÷ (engine + decoding), each alone: req/s",
                "**ceiling**: decoding and engine side by side, req/s",
            ],
            decode,
        ),
        "",
        f"*Ceiling*: what a server with no overhead at all reaches here, measured: {run.cores} processes "
        "(one per core) each decoding the upload with cxr-triage's decoding and running the engine on "
        f"it (1 thread, batch 1) over and over, side by side, {run.plan.duration:g} s (section *Targets* "
        "compares with it). Beside it, the same computed from costs measured one at a time (the best "
        "row above, and one decode with the other cores idle): where it is higher, work side by side "
        "on the cores slows each other down (shared caches and memory bandwidth, or vCPUs that share "
        "a physical core on the host), which every server here pays too.",
        "",
    ]


def targets_section(run: Run) -> list[str]:
    ceilings = {kind: run.ceiling(kind) for kind in INPUTS}
    cells = target_cells(run)
    bare = run.bare_rounds_img_s or run.bare_img_s  # the turns next to the rounds, where taken
    verdicts = targets(cells, bare, run.plan.priority_concurrency, ceilings)
    if run.interleaved:  # the first pass's figure beside each one measured again
        first = targets(run.cells, run.bare_img_s, run.plan.priority_concurrency, ceilings)
        verdicts = [
            v
            if v.measured == f.measured
            else replace(v, measured=f"{v.measured}; first pass {f.measured.split(';')[0]}")
            for v, f in zip(verdicts, first, strict=True)
        ]
    floor = durable_floor(run, cells)
    if floor is not None and verdicts[0].ok is False:  # the PNG c16 throughput target
        left = f"Redis-queue floor {floor.ms:.1f} vs {floor.budget_ms:.1f} ms left"
        measured = f"{verdicts[0].measured}; {left}"
        reachable = floor.reachable and verdicts[0].reachable is not False
        verdicts[0] = replace(verdicts[0], measured=measured, reachable=reachable)
    rows = [[v.name, v.target, v.measured, f"**{v.word}**"] for v in verdicts]
    return [
        "## Targets (issue 13, from this one run)",
        "",
        *table(["target", "needs", "measured", "verdict"], rows),
        "",
        "*Best naive*: the naive configuration (ORT 1 or 2 threads) with the higher throughput in that "
        "cell; its own p95 is the one compared. For priority, the naive configuration with the lower "
        "stat p95. *Ceiling here*: what a server with no overhead at all reaches on this machine, "
        f"measured in this run with no server: {run.cores} processes, one per core, each decoding "
        "uploads with cxr-triage's decoding and running the engine on them, side by side (section "
        "*Bare engine*); a target above it is *out of reach on this machine*.",
        *(["", *_interleaved_text(run)] if run.interleaved else []),
        *(["", *_floor_text(floor)] if floor is not None else []),
        "",
    ]


def _interleaved_text(run: Run) -> list[str]:
    rounds = max(c.round or 0 for c in run.interleaved)
    return [
        f"*Interleaved*: the throughput targets' cells were measured again after the first pass, "
        f"{rounds} rounds, with {', '.join(dict.fromkeys(c.peer for c in run.interleaved))} running "
        "at once and taking turns (the order reversed every other round; the servers waiting for "
        "their turn stopped with SIGSTOP, so that they take no CPU). The first pass runs every cell "
        "of a peer before the next peer starts, so the cells compared lie many minutes apart and "
        "the machine's drift between them lands in the ratio; taking turns spreads it over both "
        "sides. Those rows compare the rounds pooled (replies ÷ seconds over all rounds, "
        "percentiles over every reply), with the first pass's figure beside them; each round is "
        "in section *Interleaved rounds*.",
        *(
            [
                "",
                f"*served ÷ bare engine* compares those PNG c16 rounds with the bare engine's turns in "
                f"the same rounds ({len(run.bare_rounds)} turns, pooled: "
                f"{run.bare_rounds_img_s or float('nan'):.1f} img/s; every server stopped meanwhile; "
                f"{run.cores} x 1 thread at batch 1, cxr-triage's layout); its first-pass figure compares "
                f"with the bare engine timed at the start of the run ({run.bare_img_s or float('nan'):.1f} "
                "img/s, section *Bare engine*), before the machine's drift over the run.",
            ]
            if run.bare_rounds
            else []
        ),
    ]


def interleaved_section(run: Run) -> list[str]:
    if not run.interleaved:
        return []
    order = sorted(run.interleaved, key=lambda c: (list(INPUTS).index(c.input), c.concurrency, c.round))
    rows = [
        [
            INPUTS[c.input].label.split(" (")[0],
            str(c.concurrency),
            str(c.round),
            fmt(c.seconds),
            *cell_figures(c),
        ]
        for c in order
    ]
    header = ["input", RESULT_HEADER[0], "round", "s", *RESULT_HEADER[1:]]
    return [
        "## Interleaved rounds",
        "",
        *table(header, rows),
        "",
        f"Each row: {run.plan.warmup:g} s warm-up, then {run.plan.duration:g} s measured as in *Results*, "
        f"or longer where the slowest peer's first-pass rate would give fewer than {run.plan.min_replies} "
        f"replies (at most {MAX_WINDOW_FACTOR * run.plan.duration:g} s; column *s*); "
        "*CPU s other* includes nothing of the servers waiting for their turn (they are stopped).",
        "",
    ]


# cxr-triage's processes (serving.lifecycle.PROCESS_NAMES) as the CPU breakdown shows them
CPU_PARTS = (
    ("HTTP", ("cxr-http",)),
    ("decoders", ("cxr-decoder",)),
    ("Redis", ("redis-server",)),
    ("main + manager", ("cxr-main",)),
)
TARGET_FACTOR = 0.95  # issue 13's PNG c16 target, as a share of the best naive's throughput


def per_request_ms(cpu_s: float, cell: Cell) -> float:
    return 1000.0 * cpu_s / cell.ok() if cell.ok() else float("nan")


def naive_and_budget(run: Run, c: Cell, cells: Sequence[Cell] | None = None) -> tuple[float, float]:
    """For a cxr-triage cell, CPU ms per reply beyond the bare engine's CPU per image: what the
    best naive configuration of that cell spends, and what 0.95x its req/s would leave a server
    on the cores this cell's server used. ``cells``: where the naive cell is (run.cells)."""
    bare_ms = 1000.0 * run.cores / run.bare_img_s if run.bare_img_s else float("nan")
    naive = best_naive(run.cells if cells is None else cells, c.input, c.concurrency)
    if naive is None:
        return float("nan"), float("nan")
    budget = 1000.0 * c.server_cpu_s / c.wall_s / (TARGET_FACTOR * naive.throughput())
    return per_request_ms(naive.server_cpu_s, naive) - bare_ms, budget - bare_ms


@dataclass(frozen=True)
class Floor:
    """The least CPU per reply beyond the engine that a server with a Redis queue pays in the
    PNG c16 cell: the Redis server's own CPU in cxr-triage's cell (storing each job's input and
    outcome) plus the best naive's whole cost beyond the engine (HTTP, decoding, result), which
    every server pays too; against what the 0.95x target leaves."""

    redis_ms: float
    naive_ms: float
    budget_ms: float

    @property
    def ms(self) -> float:
        return self.redis_ms + self.naive_ms

    @property
    def reachable(self) -> bool:
        return self.ms <= self.budget_ms


def durable_floor(run: Run, cells: Sequence[Cell] | None = None) -> Floor | None:
    """From ``cells`` (default run.cells; the targets pass target_cells)."""
    cells = run.cells if cells is None else cells
    c = find(cells, "cxr-triage", "png", 16)
    if c is None or not c.roles_cpu_s or "redis-server" not in c.roles_cpu_s or not run.bare_img_s:
        return None
    naive_ms, budget_ms = naive_and_budget(run, c, cells)
    if math.isnan(naive_ms):
        return None
    return Floor(per_request_ms(c.roles_cpu_s["redis-server"], c), naive_ms, budget_ms)


def _floor_text(floor: Floor) -> list[str]:
    return [
        "*Redis-queue floor* (PNG c16): the least CPU per reply beyond the bare engine that a server "
        f"queuing through Redis pays here: the Redis server's own CPU in cxr-triage's cell "
        f"({floor.redis_ms:.1f} ms: each job's input and outcome stored and handed over) plus the "
        f"best naive's whole cost beyond the engine ({floor.naive_ms:.1f} ms: HTTP, decoding, "
        "result), which every server pays too; it leaves out the queue's clients (the HTTP process "
        "and the workers talking to Redis). To serve 0.95x the best naive's req/s a reply may cost "
        f"{floor.budget_ms:.1f} ms beyond the engine (computed as in section *Where cxr-triage's CPU "
        "goes*, from the cells the table compares); a floor above that puts the target *out of "
        "reach on this machine* for a durable, prioritised queue.",
    ]


def cpu_rows(run: Run) -> list[list[str]]:
    """One row per cxr-triage cell: its server CPU per request, split by process, against the
    per-request cost of the best naive and of plain LitServe in the same cell (both less the
    bare engine's CPU per image) and the budget the PNG c16 target leaves."""
    bare_ms = 1000.0 * run.cores / run.bare_img_s if run.bare_img_s else float("nan")
    rows = []
    for c in run.cells:
        if c.peer != "cxr-triage" or c.priority or not c.roles_cpu_s or c.engine_cpu_s is None:
            continue
        roles = dict(c.roles_cpu_s)
        workers = roles.pop("cxr-worker", 0.0) + roles.pop("cxr-lane", 0.0) - c.engine_cpu_s
        parts = [per_request_ms(sum(roles.pop(n, 0.0) for n in names), c) for _, names in CPU_PARTS]
        other = per_request_ms(sum(roles.values()), c)
        total = per_request_ms(c.server_cpu_s, c)
        plain = find(run.cells, "litserve", c.input, c.concurrency)
        plain_ms = per_request_ms(plain.server_cpu_s, plain) if plain else float("nan")
        naive_ms, budget = naive_and_budget(run, c)
        rows.append(
            [
                f"{c.input} c{c.concurrency}",
                f"{c.throughput():.1f}",
                fmt(total, 1),
                fmt(per_request_ms(c.engine_cpu_s, c), 1),
                fmt(total - per_request_ms(c.engine_cpu_s, c), 1),
                fmt(per_request_ms(workers, c), 1),
                *(fmt(v, 1) for v in parts),
                fmt(other, 1),
                fmt(naive_ms, 1),
                fmt(plain_ms - bare_ms, 1),
                fmt(budget, 1),
            ]
        )
    return rows


def cpu_section(run: Run) -> list[str]:
    rows = cpu_rows(run)
    if not rows:
        return []
    header = [
        "cell",
        "req/s",
        "server CPU ms/req",
        "engine",
        "all but the engine",
        "inference workers, outside the engine",
        *(name for name, _ in CPU_PARTS),
        "other",
        "best naive: all but the engine",
        "plain LitServe: all but the engine",
        f"left for all but the engine at {TARGET_FACTOR:g}x naive",
    ]
    bare = f"{1000.0 * run.cores / run.bare_img_s:.1f}" if run.bare_img_s else "n/a"
    return [
        "## Where cxr-triage's CPU goes",
        "",
        *table(header, rows),
        "",
        "CPU milliseconds per 200 reply in each cxr-triage cell, by process (each process of a replica "
        "names itself after its role), in the same windows as *Results*. *engine*: the inference "
        "workers' CPU time inside engine runs (cxr_triage_engine_cpu_seconds_total); *inference "
        "workers, outside the engine*: the rest of the workers' and the urgent lane's CPU (leasing, "
        "storing, answering, announcements); *main + manager*: the replica's main process and "
        "LitServe's request/response manager forked from it. The peers' columns are their server "
        f"CPU per reply less the bare engine's CPU per image at its best layout ({bare} ms, "
        "*Bare engine*): what their HTTP, decoding and serving cost. The last column is what the PNG "
        f"c16 target leaves: to serve {TARGET_FACTOR:g}x the best naive's req/s on the cores this "
        "cell's server used, a reply may cost at most this much CPU beyond the bare engine's.",
        "",
    ]


def peers_section(run: Run) -> list[str]:
    rows = [
        [
            PEERS[p].label,
            PEERS[p].how,
            str(PEERS[p].threads or "0 (default)"),
            ".venv-peers" if PEERS[p].venv == "peers" else ".venv",
            fmt(run.deltas.get(p, float("nan")), 7) if p in run.deltas else "—",
        ]
        for p in run.plan.peers
    ]
    versions = ", ".join(
        [f"{d} {version_of(d)}" for d in ("fastapi", "uvicorn", "litserve", "httpx")]
        + [f"{d} {v}" for d, v in run.versions.items()]
    )
    return [
        "## Peers",
        "",
        *table(["peer", "how it serves", "ORT intra-op threads", "venv", "max abs Δp vs bare engine"], rows),
        "",
        "Every peer serves the same model.onnx and builds the model input with `cxr_triage.imaging` "
        "(`prepare`: pydicom / Pillow decoding, resize to 224 px, 0-1 scaling; `to_batch`: "
        "per-channel normalisation); the other peers decode DICOM with pydicom's default decoder "
        "order, cxr-triage with its own choice per transfer syntax (same arrays), so the engine sees "
        "the same tensor everywhere; *max abs Δp* is the largest difference of a probability from the bare "
        f"engine's for the same upload (one request per input before timing; above {MAX_DELTA_P:g} "
        "would mean a different input). The peers call ONNX Runtime with its default session "
        f"options apart from the thread count. Versions: {versions}. .venv-peers pins .venv's numpy, "
        "onnxruntime, Pillow, pydicom and decoders. The load generator is a separate process "
        "(benchmarks/peers/loadgen.py: asyncio + httpx, closed loop, one connection per client).",
        "",
    ]


def render(run: Run) -> str:
    plan = run.plan
    mode = "**smoke run: too short to compare**" if plan.smoke else "full"
    other = {"bare engine": run.bare_other_cores} if run.bare else {}
    for c in run.cells:
        key = f"{c.peer} (max of its cells)"
        other[key] = max(other.get(key, 0.0), c.other_cores)
    lines = [
        "# cxr-triage against its peers",
        "",
        f"{run.started:%Y-%m-%d %H:%M} UTC · commit {git_commit()} · mode: {mode} · "
        f"{plan.duration:g} s per cell after {plan.warmup:g} s warm-up · concurrency "
        f"{', '.join(map(str, plan.concurrency))} · inputs {', '.join(plan.inputs)}",
        "",
        *machine_section(run.load, Results(other_cores=other)),
        *targets_section(run),
        *results_section(run),
        *interleaved_section(run),
        *priority_section(run),
        *cpu_section(run),
        *bare_section(run),
        *peers_section(run),
    ]
    return "\n".join(lines).rstrip() + "\n"


def plot(run: Run, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = run.plan.inputs
    fig, axes = plt.subplots(2, len(kinds), figsize=(5 * len(kinds), 8), squeeze=False)
    for col, kind in enumerate(kinds):
        top, bottom = axes[0][col], axes[1][col]
        for peer in run.plan.peers:
            cells = [c for c in (find(run.cells, peer, kind, n) for n in run.plan.concurrency) if c]
            if not cells:
                continue
            style = {"linewidth": 2.5, "color": "black"} if peer == "cxr-triage" else {"linewidth": 1.2}
            xs = [c.concurrency for c in cells]
            top.plot(xs, [c.throughput() for c in cells], marker="o", label=PEERS[peer].label, **style)
            bottom.plot(xs, [c.p(95) for c in cells], marker="o", label=PEERS[peer].label, **style)
        top.set_title(INPUTS[kind].label.split(" (")[0])
        top.set_ylabel("throughput (req/s)")
        bottom.set_ylabel("p95 latency (ms)")
        bottom.set_yscale("log")
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.set_xticks(list(run.plan.concurrency), [str(c) for c in run.plan.concurrency])
            ax.set_xlabel("concurrent clients")
            ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    note = "SMOKE RUN: too short to compare · " if run.plan.smoke else ""
    fig.suptitle(f"{note}same model.onnx, same machine ({machine_tag()}), {run.started:%Y-%m-%d}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(run: Run, text: str) -> list[Path]:
    """peers-<machine>-<date>[-smoke].md, peers-latest.md / .json / .png, each written atomically.
    A partial run (fewer cells than the default) writes peers-<machine>-<date>-partial.md / .json
    only: peers-latest stays the last whole comparison."""
    out = run.plan.results_dir
    out.mkdir(parents=True, exist_ok=True)
    suffix = "-smoke" if run.plan.smoke else ("-partial" if run.plan.partial else "")
    dated = out / f"peers-{machine_tag()}-{run.started:%Y%m%d}{suffix}.md"
    summary = {
        "started": run.started.isoformat(),
        "smoke": run.plan.smoke,
        "bare_engine_img_s": {f"{t.engine} batch {t.batch}": t.img_s for t in run.bare},
        "bare_engine_rounds_img_s": [t.img_s for t in run.bare_rounds],
        "decode_cpu_ms": run.decode_cpu_ms,
        "ceiling_req_s": {kind: run.ceiling(kind) for kind in run.decode_cpu_ms},
        "ceiling_alone_req_s": {kind: run.ceiling_alone(kind) for kind in run.decode_cpu_ms},
        "cells": [c.summary() for c in run.cells],
        "interleaved": [c.summary() for c in run.interleaved],
    }
    if run.plan.partial and not run.plan.smoke:
        files = {dated: text, dated.with_suffix(".json"): json.dumps(summary, indent=1)}
    else:
        files = {
            dated: text,
            out / "peers-latest.md": text,
            out / "peers-latest.json": json.dumps(summary, indent=1),
        }
    for path, content in files.items():
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(content)
        tmp.replace(path)
    if run.plan.partial and not run.plan.smoke:
        return list(files)
    png = out / "peers-latest.png"
    tmp = out / "peers-latest.tmp.png"
    plot(run, tmp)
    tmp.replace(png)
    return [*files, png]


def main(argv: list[str] | None = None) -> int:
    plan = parse_args(argv)
    try:
        run = run_all(plan)
    except Busy as exc:
        console.print(f"[bold red]{exc}[/]")
        return 3
    text = render(run)
    paths = write_outputs(run, text)
    from rich.markdown import Markdown

    console.print(Markdown(text))
    for path in paths:
        console.print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
