"""The benchmark's client: a closed-loop load generator that runs as its own process.

``bench_peers.py`` starts it once per cell with one JSON argument (see ``Job``). It sends the
given bodies from ``concurrency`` asyncio workers over one httpx client (each worker: send, wait
for the reply, send again) for ``warmup`` + ``duration`` seconds; with ``stat_every`` > 0 it also
sends open-loop "stat" requests with exponential gaps (Poisson arrivals) next to them.

It prints ``window start`` once the warm-up has passed and every client has had a reply, and
``window end`` when the measured window closes (the bench takes its CPU snapshots on those
lines), then lets the requests in flight finish (so the server is idle when it exits) and prints
one JSON line: per request class, the latency of every request completed inside the window and
the status counts.
"""

import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx


@dataclass(frozen=True)
class Job:
    url: str  # the predict endpoint
    bodies: list[str]  # files, sent in turn
    content_type: str
    upload: str  # "raw": the body is the image; "multipart": a form part named "file"
    concurrency: int
    warmup: float
    duration: float
    params: dict[str, str] = field(default_factory=dict)  # query of the closed-loop ("routine") requests
    stat_every: float = 0.0  # mean seconds between stat requests; 0: none
    stat_params: dict[str, str] = field(default_factory=dict)
    timeout: float = 120.0


@dataclass
class Record:
    latencies_ms: list[float] = field(default_factory=list)  # 200 replies completed in the window
    status: dict[str, int] = field(default_factory=dict)  # every reply in the window, by status


@dataclass
class State:
    warmup_until: float
    window: tuple[float, float] = (float("inf"), float("inf"))  # set by clock()
    running: bool = True
    answered: set[int] = field(default_factory=set)  # closed-loop workers that have had a reply
    records: dict[str, Record] = field(default_factory=lambda: {"routine": Record(), "stat": Record()})

    def note(self, kind: str, sent: float, status: str) -> None:
        done = time.perf_counter()
        start, end = self.window
        if not start <= done <= end:
            return
        record = self.records[kind]
        record.status[status] = record.status.get(status, 0) + 1
        if status == "200":
            record.latencies_ms.append((done - sent) * 1000.0)


def request_args(job: Job, body: bytes) -> dict[str, Any]:
    if job.upload == "multipart":
        return {"files": {"file": ("image", body, job.content_type)}}
    return {"content": body, "headers": {"content-type": job.content_type}}


async def send(client: httpx.AsyncClient, job: Job, body: bytes, kind: str, state: State) -> None:
    params = job.stat_params if kind == "stat" else job.params
    sent = time.perf_counter()
    try:
        response = await client.post(job.url, params=params, **request_args(job, body))
        status = str(response.status_code)
    except httpx.HTTPError as exc:  # counted, not fatal: a failing server shows in the table
        status = type(exc).__name__
    state.note(kind, sent, status)
    if status != "200":
        await asyncio.sleep(0.05)


async def worker(client: httpx.AsyncClient, job: Job, bodies: list[bytes], first: int, state: State) -> None:
    i = first
    while state.running:
        await send(client, job, bodies[i % len(bodies)], "routine", state)
        state.answered.add(first)
        i += 1


async def stat_arrivals(client: httpx.AsyncClient, job: Job, bodies: list[bytes], state: State) -> None:
    rng = random.Random(0)
    pending: list[asyncio.Task[None]] = []
    i = 0
    while state.running:
        await asyncio.sleep(rng.expovariate(1.0 / job.stat_every))
        if state.running:
            pending.append(asyncio.create_task(send(client, job, bodies[i % len(bodies)], "stat", state)))
        i += 1
    await asyncio.gather(*pending)


async def clock(state: State, job: Job) -> None:
    """The window opens after the warm-up once every client has had a reply (so slow inputs at high
    concurrency are measured in steady state, not in the first wave), and lasts ``duration``."""
    await asyncio.sleep(max(0.0, state.warmup_until - time.perf_counter()))
    while len(state.answered) < job.concurrency:
        await asyncio.sleep(0.05)
    start = time.perf_counter()
    state.window = (start, start + job.duration)
    print("window start", flush=True)
    await asyncio.sleep(job.duration)
    print("window end", flush=True)
    state.running = False


async def run(job: Job) -> dict[str, Any]:
    bodies = [Path(p).read_bytes() for p in job.bodies]
    connections = job.concurrency + (16 if job.stat_every > 0 else 0)
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(limits=limits, timeout=job.timeout) as client:
        state = State(warmup_until=time.perf_counter() + job.warmup)
        tasks = [worker(client, job, bodies, i, state) for i in range(job.concurrency)]
        if job.stat_every > 0:
            tasks.append(stat_arrivals(client, job, bodies, state))
        await asyncio.gather(clock(state, job), *tasks)
    return {
        "seconds": job.duration,
        "classes": {
            k: {"latencies_ms": r.latencies_ms, "status": r.status} for k, r in state.records.items()
        },
    }


def main(argv: list[str]) -> int:
    job = Job(**json.loads(argv[1]))
    result = asyncio.run(run(job))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
