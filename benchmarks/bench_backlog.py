"""Backlog mode: live latency with and without an archive being scored at backfill priority.

Run from the repository root (``make bench-backlog``)::

    .venv/bin/python benchmarks/bench_backlog.py [--duration 45] [--studies 600] [--max-in-flight 1,2,8]

Starts the server (``model_repo/``, CPU engine, a fresh embedded Redis) and measures live
traffic — ``--clients`` closed-loop clients posting 224 px PNGs (``bench_core.small_pngs``) to
``POST /v1/predict`` at the default (routine) priority, ``--think`` seconds apart — for
``--duration`` seconds with no backlog, then for as long again while ``cxr-triage backlog``
(the real command, a separate process, over HTTP) scores a folder of ``--studies`` re-stamped
chest CRs (pydicom-data's RG1, 1955x1841, new UIDs each) at ``backfill`` priority, once per
``--max-in-flight`` value. The backlog starts before the live window and is stopped (SIGINT,
as Ctrl-C) when it ends; its rate is the studies it finished inside the window (from its
checkpoint) per second. Each backlog phase gets a fresh folder (the previous one is deleted, so
the disk holds one); a backlog that runs out of studies inside the window is flagged.

Writes ``benchmarks/results/backlog-<machine>-<UTC date>.md`` and ``backlog-latest.md`` with the
machine described. Refuses a busy machine unless ``--allow-busy``.
"""

import argparse
import asyncio
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pydicom
from pydicom.uid import generate_uid

from bench_core import (
    BUSY_OTHER_CORES,
    RESULTS,
    console,
    cpu_snapshot,
    group_cpu,
    machine_rows,
    other_cores,
    refuse_if_busy,
    running_server,
    small_pngs,
    testdata,
    write_report,
)

INPUTS = {"uncompressed": ("RG1_UNCR.dcm", 7.3e6), "j2k": ("RG1_J2KR.dcm", 4.4e6)}  # file, bytes


@dataclass
class Phase:
    name: str
    max_in_flight: int | None  # None: no backlog
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    errors: int = 0
    backlog_done: int = 0
    backlog_ran_out: bool = False
    server_cores: float = 0.0
    backlog_cores: float = 0.0
    other_cores: float = 0.0

    def q(self, p: float) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, math.ceil(p * len(xs)) - 1)] * 1000 if xs else float("nan")

    @property
    def live_rps(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    @property
    def backlog_rate(self) -> float:
        return self.backlog_done / self.seconds if self.seconds else 0.0


def write_archive(folder: Path, count: int, name: str) -> None:
    """``count`` copies of a pydicom-data file, each a new study (new UIDs)."""
    template = pydicom.dcmread(io.BytesIO(testdata(name)))
    for i in range(count):
        template.StudyInstanceUID = generate_uid()
        template.SeriesInstanceUID, template.SOPInstanceUID = generate_uid(), generate_uid()
        template.file_meta.MediaStorageSOPInstanceUID = template.SOPInstanceUID
        template.save_as(folder / f"study{i:05d}.dcm", enforce_file_format=True)


async def live_load(
    url: str, images: list[bytes], clients: int, seconds: float, think: float, phase: Phase
) -> None:
    deadline = time.monotonic() + seconds

    async def client(http: httpx.AsyncClient, first: int) -> None:
        i = first
        while time.monotonic() < deadline:
            sent = time.monotonic()
            try:
                reply = await http.post(
                    f"{url}/v1/predict",
                    content=images[i % len(images)],
                    headers={"Content-Type": "image/png"},
                )
            except httpx.HTTPError:
                phase.errors += 1
                await asyncio.sleep(0.1)
                continue
            if reply.status_code == 200:
                phase.latencies.append(time.monotonic() - sent)
            else:
                phase.errors += 1
            i += clients
            if think:
                await asyncio.sleep(think)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        started = time.monotonic()
        await asyncio.gather(*(client(http, i) for i in range(clients)))
        phase.seconds = time.monotonic() - started


def finished(checkpoint: Path) -> int:
    if not checkpoint.is_file():
        return 0
    count = 0
    for line in checkpoint.read_text().splitlines():
        try:
            count += json.loads(line).get("event") in ("done", "failed")
        except json.JSONDecodeError:
            continue
    return count


def start_backlog(
    url: str, folder: Path, checkpoint: Path, max_in_flight: int, log: Path
) -> subprocess.Popen[bytes]:
    exe = Path(sys.executable).parent / "cxr-triage"
    args = [str(exe), "backlog", str(folder), "--server", url, "--checkpoint", str(checkpoint)]
    args += ["--max-in-flight", str(max_in_flight)]
    with log.open("wb") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stop_backlog(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)  # as Ctrl-C: it records what it has and stops
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def run_phase(
    url: str, pgid: int, phase: Phase, plan: argparse.Namespace, images: list[bytes], work: Path
) -> Phase:
    backlog = None
    checkpoint = work / f"checkpoint-{phase.max_in_flight}.jsonl"
    if phase.max_in_flight is not None:
        start = finished(checkpoint)
        folder = work / "archive"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        with console.status(f"writing {plan.studies} re-stamped chest CRs"):
            write_archive(folder, plan.studies, INPUTS[plan.input][0])
        backlog = start_backlog(url, folder, checkpoint, phase.max_in_flight, work / "backlog.log")
        deadline = time.monotonic() + 120
        while finished(checkpoint) < start + 2 * phase.max_in_flight:  # wait until it runs steadily
            if backlog.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"the backlog did not start:\n{(work / 'backlog.log').read_text()[-2000:]}")
            time.sleep(0.2)
    try:
        done_before = finished(checkpoint)
        backlog_before = sum(group_cpu(backlog.pid).values()) if backlog else 0.0
        before = cpu_snapshot(pgid)
        with console.status(f"{phase.name}: {plan.duration:.0f} s of live traffic"):
            asyncio.run(live_load(url, images, plan.clients, plan.duration, plan.think, phase))
        after = cpu_snapshot(pgid)
        backlog_cpu = (sum(group_cpu(backlog.pid).values()) - backlog_before) if backlog else 0.0
        phase.backlog_done = finished(checkpoint) - done_before
        phase.backlog_ran_out = backlog is not None and backlog.poll() is not None
    finally:
        if backlog is not None:
            stop_backlog(backlog)
    wall = after.wall - before.wall
    phase.server_cores = (after.server_total - before.server_total) / wall
    phase.backlog_cores = backlog_cpu / wall
    phase.other_cores = max(0.0, other_cores(before, after) - phase.backlog_cores)
    return phase


def render(phases: list[Phase], load: float, plan: argparse.Namespace, started: datetime) -> str:
    think = f", {plan.think:g} s apart" if plan.think else ", back to back"
    lines = [
        f"# Backlog mode: live latency with and without a backlog — {started:%Y-%m-%d %H:%M} UTC",
        "",
        "`benchmarks/bench_backlog.py`: the server on `model_repo/` (CPU engine, fresh embedded Redis);",
        f"live traffic = {plan.clients} closed-loop clients posting 224 px PNGs to `POST /v1/predict`",
        f"(routine){think}, {plan.duration:.0f} s per phase after {plan.warmup:.0f} s of warm-up. Backlog =",
        f"`cxr-triage backlog FOLDER --max-in-flight M` on {plan.studies} re-stamped chest CRs",
        f"(pydicom-data {INPUTS[plan.input][0]}, 1955x1841) at `backfill` priority, started before the live",
        "window and stopped with SIGINT at its end; its rate = studies it finished inside the window per",
        "second. Each backlog phase has its own fresh archive.",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in machine_rows(load)],
        "",
        "| phase | live requests | live req/s | live p50 ms | live p95 ms | live p99 ms | errors "
        "| backlog studies/s | server cores | backlog command cores | other cores busy |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in phases:
        flag = " **busy**" if p.other_cores > BUSY_OTHER_CORES else ""
        rate = "—" if p.max_in_flight is None else f"{p.backlog_rate:.2f}"
        if p.backlog_ran_out:
            rate += " (**ran out of studies**: raise --studies)"
        lines.append(
            f"| {p.name} | {len(p.latencies)} | {p.live_rps:.1f} | {p.q(0.5):.0f} | {p.q(0.95):.0f} "
            f"| {p.q(0.99):.0f} | {p.errors} | {rate} | {p.server_cores:.2f} | {p.backlog_cores:.2f} "
            f"| {p.other_cores:.2f}{flag} |"
        )
    base = phases[0]
    lines += ["", "Live p95 with a backlog running, against none:", ""]
    for p in phases[1:]:
        lines.append(
            f"- {p.name}: {p.q(0.95):.0f} ms vs {base.q(0.95):.0f} ms "
            f"({p.q(0.95) / base.q(0.95):.2f}x), p99 {p.q(0.99):.0f} vs {base.q(0.99):.0f} ms; "
            f"the backlog scored {p.backlog_rate:.2f} studies/s meanwhile."
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=45.0, help="seconds of live traffic per phase")
    parser.add_argument("--warmup", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=2, help="live closed-loop clients")
    parser.add_argument(
        "--think", type=float, default=0.0, help="seconds each live client waits between requests"
    )
    parser.add_argument("--studies", type=int, default=600, help="studies in each backlog phase's folder")
    parser.add_argument("--input", choices=sorted(INPUTS), default="uncompressed", help="backlog DICOM (RG1)")
    parser.add_argument(
        "--max-in-flight", default="1,2,8", help="comma-separated backlog --max-in-flight values"
    )
    parser.add_argument("--model-repo", type=Path, default=None, help="default: model_repo/")
    parser.add_argument("--allow-busy", action="store_true", help="time a busy machine anyway (flagged)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    plan = parser.parse_args(argv)
    load = refuse_if_busy(plan.allow_busy)
    name, size = INPUTS[plan.input]
    testdata(name)  # exits naming pydicom-data when it is missing
    need = plan.studies * size
    if shutil.disk_usage(tempfile.gettempdir()).free < need * 1.2:
        sys.exit(f"{need / 1e9:.1f} GB needed in {tempfile.gettempdir()} for --studies {plan.studies}")
    started = datetime.now(UTC)
    images = small_pngs()
    work = Path(tempfile.mkdtemp(prefix="cxr-backlog-bench-"))
    phases = [Phase("no backlog", None)]
    phases += [Phase(f"backlog, max in flight {m}", int(m)) for m in plan.max_in_flight.split(",")]
    try:
        with running_server(repo=plan.model_repo) as (url, pgid, _):
            asyncio.run(live_load(url, images, plan.clients, plan.warmup, plan.think, Phase("warm-up", None)))
            for phase in phases:
                run_phase(url, pgid, phase, plan, images, work)
                rate = f", backlog {phase.backlog_rate:.2f} studies/s" if phase.max_in_flight else ""
                console.print(
                    f"{phase.name}: live p50 {phase.q(0.5):.0f} ms, p95 {phase.q(0.95):.0f} ms, "
                    f"p99 {phase.q(0.99):.0f} ms{rate}"
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = render(phases, load, plan, started)
    dated, _ = write_report(text, False, started, "backlog", plan.out)
    console.print(f"wrote {dated}")


if __name__ == "__main__":
    main()
