"""Core benchmark: engine throughput, decode cost per format, served vs bare-engine throughput.

Run from the repository root (``make bench``)::

    .venv/bin/python benchmarks/bench_core.py [--quick] [--duration S] [--skip-torch] [--skip-server]

Writes ``benchmarks/results/core-<machine>-<UTC date>.md`` and ``benchmarks/results/core-latest.md``.
See benchmarks/README.md for how to read the numbers.
"""

import argparse
import asyncio
import gc
import io
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from cxr_triage.engines import OnnxEngine
from cxr_triage.errors import CxrError
from cxr_triage.imaging import ImageLimits, decode, prepare, to_batch
from cxr_triage.repository import ModelConfig, ModelRepository

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MODEL = "densenet121-nih14"
BATCHES = (1, 8)
BUSY_LOAD_PER_CORE = 0.5  # 1-minute load average per core above which the machine counts as busy
BUSY_OTHER_CORES = 0.2  # CPU cores other processes may take during a phase before it is flagged
console = Console()
T = TypeVar("T")


# --------------------------------------------------------------------------- plan and results


@dataclass(frozen=True)
class Plan:
    duration: float  # seconds per timed throughput measurement
    repeats: int  # decode repeats per format
    warmup_calls: int
    served_warmup: float
    quick: bool
    skip_torch: bool
    skip_server: bool
    clients_per_batch: int  # concurrent clients = this x max_batch_size


@dataclass(frozen=True)
class Throughput:
    engine: str
    batch: int
    calls: int
    seconds: float
    latency_ms: list[float]

    @property
    def img_s(self) -> float:
        return self.calls * self.batch / self.seconds

    @property
    def p50_ms(self) -> float:
        return statistics.median(self.latency_ms)


@dataclass(frozen=True)
class DecodeTiming:
    name: str
    size_bytes: int
    shape: tuple[int, int]
    times_ms: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def p90(self) -> float:
        return float(np.percentile(self.times_ms, 90))


@dataclass
class ServedStats:
    ok: int = 0
    other: Counter[str] = field(default_factory=Counter)
    batch_sizes: list[int] = field(default_factory=list)
    timing_ms: dict[str, float] = field(default_factory=dict)  # sums over 200 responses
    engine_ms: float = 0.0  # sum of inference_ms / batch_size: engine time spent on these requests
    seconds: float = 0.0
    client_cpu_s: float = 0.0
    server_cpu_s: dict[int, float] = field(default_factory=dict)  # per server process (pid)
    other_cpu_s: float = 0.0

    def record(self, response: httpx.Response) -> None:
        if response.status_code != 200:
            self.other[str(response.status_code)] += 1
            return
        body = response.json()
        self.ok += 1
        self.batch_sizes.append(int(body["batch_size"]))
        for key, value in body["timing_ms"].items():
            self.timing_ms[key] = self.timing_ms.get(key, 0.0) + float(value)
        self.engine_ms += float(body["timing_ms"]["inference"]) / int(body["batch_size"])

    @property
    def img_s(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0


@dataclass
class Results:
    engines: list[Throughput] = field(default_factory=list)
    decodes: list[DecodeTiming] = field(default_factory=list)
    served: ServedStats | None = None
    other_cores: dict[str, float] = field(default_factory=dict)  # phase -> CPU used by other processes

    def engine(self, name: str, batch: int) -> Throughput | None:
        return next((t for t in self.engines if t.engine == name and t.batch == batch), None)


def parse_args(argv: list[str] | None = None) -> Plan:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short durations, for a smoke run")
    p.add_argument("--duration", type=float, help="seconds per timed throughput measurement (default 20)")
    p.add_argument("--repeats", type=int, help="decode repeats per format (default 30)")
    p.add_argument("--skip-torch", action="store_true", help="no PyTorch eager measurement")
    p.add_argument("--skip-server", action="store_true", help="no served-throughput measurement")
    p.add_argument(
        "--clients-per-batch",
        type=int,
        default=2,
        help="served load: concurrent clients per max_batch_size (2: a batch queues while one runs)",
    )
    a = p.parse_args(argv)
    return Plan(
        duration=a.duration or (3.0 if a.quick else 20.0),
        repeats=a.repeats or (5 if a.quick else 30),
        warmup_calls=2 if a.quick else 5,
        served_warmup=1.0 if a.quick else 3.0,
        quick=a.quick,
        skip_torch=a.skip_torch,
        skip_server=a.skip_server,
        clients_per_batch=a.clients_per_batch,
    )


# --------------------------------------------------------------------------- machine description


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def ram_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return float("nan")


def os_name() -> str:
    try:
        release = dict(
            line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line
        )
        name = release.get("PRETTY_NAME", "").strip('"')
    except OSError:
        name = ""
    return f"{name or platform.system()} (kernel {platform.release()}, {platform.machine()})"


def version_of(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def git_commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + (" (uncommitted changes)" if dirty else "")


def machine_tag() -> str:
    """Short, hostname-free label for file names, e.g. ``amd-epyc-2c``."""
    slug = re.sub(r"\(r\)|\(tm\)|cpu|processor|@.*$|\d+-core", "", cpu_model().lower())
    slug = re.sub(r"[^a-z0-9]+", "-", slug).strip("-")[:32].strip("-") or "cpu"
    return f"{slug}-{os.cpu_count()}c"


def cxr_overrides() -> list[str]:
    """CXR_* settings in the environment (they change the server); path values are not shown."""
    return [
        f"{k}={'<path>' if '/' in v else v}" for k, v in sorted(os.environ.items()) if k.startswith("CXR_")
    ]


def machine_rows(load: float) -> list[tuple[str, str]]:
    cores = os.cpu_count() or 1
    busy = load >= BUSY_LOAD_PER_CORE * cores
    state = "**high: machine was busy just before the start** (the row below measures each phase)"
    state = state if busy else "quiet"
    dists = ("onnxruntime", "torch", "numpy", "pillow", "pydicom", "litserve")
    return [
        ("CPU", f"{cpu_model()} — {cores} logical cores ({len(os.sched_getaffinity(0))} usable)"),
        ("RAM", f"{ram_gib():.1f} GiB"),
        ("OS", os_name()),
        ("Python", platform.python_version()),
        ("packages", ", ".join(f"{d} {version_of(d)}" for d in dists)),
        (
            "DICOM decoders",
            f"python-gdcm {version_of('python-gdcm')}, pylibjpeg-openjpeg {version_of('pylibjpeg-openjpeg')}",
        ),
        ("load average (1 min) at start", f"{load:.2f} — {state}"),
        ("CXR_* overrides", ", ".join(cxr_overrides()) or "none (server defaults)"),
    ]


# --------------------------------------------------------------------------- CPU accounting


@dataclass(frozen=True)
class CpuSnapshot:
    wall: float
    busy: float  # whole machine: CPU seconds not idle since boot
    client: float  # this process, every thread
    server: dict[int, float]  # the server's processes (pid -> CPU seconds), when one runs

    @property
    def server_total(self) -> float:
        return sum(self.server.values())


def refuse_if_busy(allow_busy: bool) -> float:
    """The 1-minute load average; exits naming it when the machine is busy (per core at or
    above BUSY_LOAD_PER_CORE), unless ``allow_busy``: a busy machine's figures are not timed."""
    load = os.getloadavg()[0]
    if load >= BUSY_LOAD_PER_CORE * (os.cpu_count() or 1) and not allow_busy:
        sys.exit(f"the machine is busy (1-min load {load:.2f}); wait, or pass --allow-busy (flagged)")
    return load


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (user, nice, system, irq, softirq) since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    user, nice, system, _idle, _iowait, irq, softirq = values
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def cpu_snapshot(server_pgid: int | None = None) -> CpuSnapshot:
    server = group_cpu(server_pgid) if server_pgid else {}
    return CpuSnapshot(time.perf_counter(), machine_busy_seconds(), time.process_time(), server)


def other_cores(before: CpuSnapshot, after: CpuSnapshot) -> float:
    """Mean CPU cores used by processes other than this benchmark (and its server) in between."""
    own = (after.client - before.client) + (after.server_total - before.server_total)
    return max(0.0, after.busy - before.busy - own) / max(after.wall - before.wall, 1e-9)


# --------------------------------------------------------------------------- inputs


def require_engine() -> tuple[ModelConfig, Path]:
    """The model config and its latest engine, or exit telling how to build it."""
    try:
        entry = ModelRepository.load(ROOT / "model_repo", check_engines=False).get(MODEL)
    except CxrError as exc:
        sys.exit(f"model repository problem: {exc.message}")
    latest = entry.latest
    if latest is None or not latest.engine_path.is_file():
        sys.exit(f"no engine for {MODEL}: run `cxr-triage export {MODEL}` (or `make engine`) first")
    return entry.config, latest.engine_path


def testdata(name: str) -> bytes:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        sys.exit(f"pydicom test file {name} not found: pip install pydicom-data (dev extra)")
    return Path(str(path)).read_bytes()


def encode(array: np.ndarray, fmt: str, **options: Any) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **options)
    return buf.getvalue()


def format_samples() -> dict[str, tuple[bytes, str]]:
    """One chest radiograph (pydicom-data RG1) in each input format: name -> (bytes, media type)."""
    uncompressed = testdata("RG1_UNCR.dcm")
    pixels = decode(uncompressed, "application/dicom", ImageLimits()).pixels  # 0-1, 0 = black
    return {
        "DICOM uncompressed": (uncompressed, "application/dicom"),
        "DICOM JPEG 2000 lossless": (testdata("RG1_J2KR.dcm"), "application/dicom"),
        "PNG 16-bit": (encode((pixels * 65535).round().astype(np.uint16), "PNG"), "image/png"),
        "JPEG 8-bit q95": (encode((pixels * 255).round().astype(np.uint8), "JPEG", quality=95), "image/jpeg"),
    }


def small_pngs(count: int = 8, size: int = 224) -> list[bytes]:
    """``count`` distinct 8-bit size x size PNGs (the radiograph plus a little seeded noise)."""
    uncompressed = testdata("RG1_UNCR.dcm")
    pixels = decode(uncompressed, "application/dicom", ImageLimits()).pixels
    base = np.asarray(Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR))
    rng = np.random.default_rng(0)
    noisy = (np.clip(base + rng.normal(0, 0.01, (count, size, size)), 0, 1) * 255).round()
    return [encode(img.astype(np.uint8), "PNG") for img in noisy]


# --------------------------------------------------------------------------- timing helpers


def new_progress() -> Progress:
    return Progress(
        TextColumn("{task.description:<44}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeRemainingColumn(),
        console=console,
    )


def timed_loop(fn: Callable[[], None], seconds: float, progress: Progress, label: str) -> list[float]:
    """Call ``fn`` until ``seconds`` have passed; return each call's duration (s)."""
    task = progress.add_task(label, total=seconds, info="")
    times: list[float] = []
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        progress.update(task, completed=min(elapsed, seconds), info=f"{len(times)} calls")
    progress.update(task, completed=seconds)
    return times


def measure(engine: Any, name: str, batch: np.ndarray, plan: Plan, progress: Progress) -> Throughput:
    """Warm up, then run ``engine`` on ``batch`` for ``plan.duration`` seconds."""
    for _ in range(plan.warmup_calls):
        engine.run(batch)
    times = timed_loop(lambda: engine.run(batch), plan.duration, progress, f"{name} batch {len(batch)}")
    return Throughput(name, len(batch), len(times), sum(times), [t * 1000 for t in times])


# --------------------------------------------------------------------------- 1. engines


def engine_inputs(config: ModelConfig) -> dict[int, np.ndarray]:
    """Pre-decoded model inputs (the radiograph, prepared once) for each batch size."""
    prepared = prepare(testdata("RG1_UNCR.dcm"), "application/dicom", config.input, ImageLimits())
    return {b: to_batch([prepared.pixels] * b, config.input) for b in BATCHES}


def bench_onnx(path: Path, inputs: dict[int, np.ndarray], plan: Plan, progress: Progress) -> list[Throughput]:
    engine = OnnxEngine(path, "cpu", intra_op_threads=0)  # as the server: 0 = every core
    return [measure(engine, "onnxruntime-cpu", inputs[b], plan, progress) for b in BATCHES]


def bench_torch(
    config: ModelConfig, inputs: dict[int, np.ndarray], plan: Plan, progress: Progress
) -> list[Throughput]:
    try:
        from cxr_triage.train.models import WithSigmoid, build_backbone
        from cxr_triage.train.torch_eager import TorchEagerEngine
    except ImportError as exc:
        console.print(f"[yellow]PyTorch eager skipped[/]: the train extra is not installed ({exc})")
        return []
    engine = TorchEagerEngine(WithSigmoid(build_backbone(config)), threads=os.cpu_count())
    results = [measure(engine, "torch-eager-cpu", inputs[b], plan, progress) for b in BATCHES]
    del engine
    gc.collect()
    return results


# --------------------------------------------------------------------------- 2. decoding


def bench_decode(config: ModelConfig, plan: Plan, progress: Progress) -> list[DecodeTiming]:
    out = []
    for name, (data, media_type) in format_samples().items():
        shape = decode(data, media_type, ImageLimits()).pixels.shape
        prepare(data, media_type, config.input, ImageLimits())  # warm-up (imports, plugin choice)
        task = progress.add_task(f"decode {name}", total=plan.repeats, info="")
        times = []
        for _ in range(plan.repeats):
            t0 = time.perf_counter()
            prepare(data, media_type, config.input, ImageLimits())
            times.append((time.perf_counter() - t0) * 1000)
            progress.advance(task)
        out.append(DecodeTiming(name, len(data), (shape[0], shape[1]), times))
    return out


# --------------------------------------------------------------------------- 3. served


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def running_server(
    timeout: float = 180.0, repo: Path | None = None, settings: dict[str, str] | None = None
) -> Iterator[tuple[str, int, Path]]:
    """The real server as a subprocess on a free port, with a fresh embedded Redis (not ./data);
    yields (base URL, process group id, the Redis data folder). ``repo``: default model_repo/;
    ``settings``: CXR_* variables for this server (``CXR_REDIS_URL``: a shared Redis instead).
    Also used by loadtests/slo.py, so every measurement starts the server the same way."""
    port = free_port()
    data_dir = Path(tempfile.mkdtemp(prefix="cxr-bench-data-"))
    env = {**os.environ, "CXR_MODEL_REPO": str(repo or ROOT / "model_repo"), "CXR_DATA_DIR": str(data_dir)}
    env.pop("CXR_REDIS_URL", None)
    env.update(settings or {})
    exe = Path(sys.executable).parent / "cxr-triage"
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [str(exe), "serve", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_ready(proc, f"http://127.0.0.1:{port}", timeout, log)
            yield f"http://127.0.0.1:{port}", proc.pid, data_dir
        finally:
            redis_pid = embedded_redis(data_dir)
            stop_server(proc)
            stop_redis(redis_pid, data_dir)
            shutil.rmtree(data_dir, ignore_errors=True)


def embedded_redis(data_dir: Path) -> int | None:
    """PID of the redis-server working in ``data_dir`` (Redis chdirs to its data folder)."""
    for proc in Path("/proc").glob("[0-9]*"):
        with suppress(OSError):
            if (
                os.readlink(proc / "cwd") == str(data_dir.resolve())
                and b"redis-server" in (proc / "cmdline").read_bytes()
            ):
                return int(proc.name)
    return None


def stop_redis(pid: int | None, data_dir: Path) -> None:
    """The service stops its embedded Redis on SIGTERM; after a SIGKILL it would outlive it."""
    if pid is not None and embedded_redis(data_dir) == pid:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


def wait_ready(proc: subprocess.Popen[bytes], url: str, timeout: float, log: Any) -> None:
    deadline = time.monotonic() + timeout
    with console.status("starting the server (model load, decode workers)…"):
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                log.seek(0)
                tail = log.read().decode(errors="replace")[-3000:]
                raise RuntimeError(f"server exited with {proc.returncode}:\n{tail}")
            try:
                if httpx.get(f"{url}/ready", timeout=10).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
    raise TimeoutError(f"server not ready after {timeout:.0f} s")


def stop_server(proc: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    """SIGTERM the server's process group, SIGKILL it after ``grace`` seconds."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with suppress(ProcessLookupError):  # workers share the session: none may outlive the benchmark
        os.killpg(proc.pid, signal.SIGKILL)


def group_cpu(pgid: int) -> dict[int, float]:
    """User + system CPU seconds of each live process in process group ``pgid``."""
    out, tick = {}, os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after "(comm)": state ppid pgrp ... utime(11) stime(12)
            out[int(stat.parent.name)] = (int(fields[11]) + int(fields[12])) / tick
    return out


async def client_worker(
    client: httpx.AsyncClient, url: str, images: list[bytes], first: int, deadline: float, stats: ServedStats
) -> None:
    i = first
    while time.perf_counter() < deadline:
        try:
            response = await client.post(
                url, content=images[i % len(images)], headers={"content-type": "image/png"}
            )
        except httpx.HTTPError as exc:  # counted, not fatal: a failing server shows in the table
            stats.other[type(exc).__name__] += 1
            await asyncio.sleep(0.1)
        else:
            stats.record(response)
        i += 1


async def ticker(progress: Progress, task: Any, start: float, seconds: float, stats: ServedStats) -> None:
    while (elapsed := time.perf_counter() - start) < seconds:
        progress.update(task, completed=elapsed, info=f"{stats.ok} ok")
        await asyncio.sleep(0.25)
    progress.update(task, completed=seconds, info=f"{stats.ok} ok")


async def drive(
    url: str, images: list[bytes], concurrency: int, seconds: float, progress: Progress, label: str
) -> ServedStats:
    """``concurrency`` clients posting images back to back for ``seconds``; all replies counted."""
    stats = ServedStats()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    task = progress.add_task(label, total=seconds, info="")
    async with httpx.AsyncClient(limits=limits, timeout=60.0) as client:
        start = time.perf_counter()
        workers = [
            client_worker(client, f"{url}/v1/predict", images, i, start + seconds, stats)
            for i in range(concurrency)
        ]
        await asyncio.gather(ticker(progress, task, start, seconds, stats), *workers)
        stats.seconds = time.perf_counter() - start
    return stats


def bench_served(config: ModelConfig, plan: Plan, progress: Progress) -> ServedStats:
    images, concurrency = small_pngs(), config.batching.max_batch_size * plan.clients_per_batch
    with running_server() as (url, pgid, _):
        asyncio.run(drive(url, images, concurrency, plan.served_warmup, progress, "served warm-up"))
        label = f"served POST /v1/predict x{concurrency}"
        before = cpu_snapshot(pgid)
        stats = asyncio.run(drive(url, images, concurrency, plan.duration, progress, label))
        after = cpu_snapshot(pgid)
    stats.client_cpu_s = after.client - before.client
    stats.server_cpu_s = {pid: cpu - before.server.get(pid, 0.0) for pid, cpu in after.server.items()}
    stats.other_cpu_s = other_cores(before, after) * (after.wall - before.wall)
    return stats


# --------------------------------------------------------------------------- report


def metric_sums(text: str, names: Iterable[str]) -> dict[str, float]:
    """The Prometheus series ``names`` in a /metrics page, each summed over its labels (a name
    with no sample is absent)."""
    wanted, out = set(names), dict[str, float]()
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        name = series.split("{", 1)[0]
        if name in wanted:
            out[name] = out.get(name, 0.0) + float(value)
    return out


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def machine_section(load: float, results: Results) -> list[str]:
    rows = [[k, v] for k, v in machine_rows(load)] + [["CPU taken by other processes", other_load(results)]]
    return ["## Machine", "", *table(["", ""], rows), ""]


def other_load(results: Results) -> str:
    """Per phase, the mean CPU cores used by processes other than the benchmark and its server."""
    parts = [f"{phase} {cores:.2f}" for phase, cores in results.other_cores.items()]
    busy = [phase for phase, cores in results.other_cores.items() if cores > BUSY_OTHER_CORES]
    verdict = f"**machine was busy during: {', '.join(busy)}**" if busy else "quiet"
    return f"{', '.join(parts)} (cores, mean per phase) — {verdict}"


def engine_section(results: Results) -> list[str]:
    rows = []
    for b in BATCHES:
        ort, pt = results.engine("onnxruntime-cpu", b), results.engine("torch-eager-cpu", b)
        ratio = f"{ort.img_s / pt.img_s:.2f}" if ort and pt else "—"
        rows.append(
            [
                str(b),
                f"{ort.img_s:.1f}" if ort else "—",
                f"{ort.p50_ms:.1f}" if ort else "—",
                f"{pt.img_s:.1f}" if pt else "skipped",
                f"{pt.p50_ms:.1f}" if pt else "—",
                ratio,
            ]
        )
    header = ["batch", "ORT img/s", "ORT ms/call p50", "torch img/s", "torch ms/call p50", "ORT / torch"]
    return [
        "## 1. Engine throughput: DenseNet-121, 224 px, CPU",
        "",
        *table(header, rows),
        "",
        f"Same pre-decoded radiograph in every batch; engine call only. {engine_threads(results)}",
        "",
    ]


def engine_threads(results: Results) -> str:
    text = "ONNX Runtime CPU EP, intra-op threads 0 (= all cores, as the server)"
    if results.engine("torch-eager-cpu", 1) is not None:
        import torch

        text += f"; PyTorch eager (inference_mode), {torch.get_num_threads()} threads"
    return text + "."


def decode_section(results: Results, plan: Plan) -> list[str]:
    rows = [
        [
            d.name,
            f"{d.size_bytes / 1e6:.2f} MB",
            f"{d.shape[1]}x{d.shape[0]}",
            f"{d.median:.1f}",
            f"{d.p90:.1f}",
        ]
        for d in results.decodes
    ]
    return [
        "## 2. Decode + resize to the model input, per format",
        "",
        *table(["format", "size", "pixels", "median ms", "p90 ms"], rows),
        "",
        f"`cxr_triage.imaging.prepare` in one process, {plan.repeats} repeats after one warm-up; "
        "the same chest radiograph (pydicom-data RG1) in each format.",
        "",
    ]


TARGET = 0.9  # served / bare-engine throughput the issue asks for on CPU


def served_rows(s: ServedStats, engine: Throughput | None) -> list[list[str]]:
    cores, ok = os.cpu_count() or 1, max(s.ok, 1)
    ratio = s.img_s / engine.img_s if engine else float("nan")
    verdict = "met" if ratio >= TARGET else "**not met**"  # NaN (no engine number) is not met
    mean = {k: v / ok for k, v in s.timing_ms.items()}
    return [
        ["served img/s (HTTP 200 per second)", f"{s.img_s:.1f}"],
        ["bare engine img/s, batch 8 (part 1)", f"{engine.img_s:.1f}" if engine else "—"],
        ["served / engine", f"**{ratio:.2f}** — target ≥ {TARGET}: {verdict}"],
        ["mean batch_size in responses", f"{statistics.fmean(s.batch_sizes or [0]):.2f}"],
        ["requests: 200 / other", f"{s.ok} / {dict(s.other) or 0}"],
        [
            "mean timing_ms queue / preprocess / inference",
            " / ".join(f"{mean.get(k, 0):.1f}" for k in ("queue", "preprocess", "inference")),
        ],
        [
            "engine busy share (Σ inference ÷ batch_size ÷ wall time, summed over inference workers)",
            f"{s.engine_ms / 1000 / s.seconds:.0%}",
        ],
        [
            "CPU used: server (each process) / load generator",
            f"{server_cores(s)} / {s.client_cpu_s / s.seconds:.2f} cores of {cores}",
        ],
    ]


def server_cores(s: ServedStats) -> str:
    """Server CPU in cores, then each process's share, busiest first (the inference worker)."""
    each = sorted((cpu / s.seconds for cpu in s.server_cpu_s.values()), reverse=True)
    shown = " + ".join(f"{c:.2f}" for c in each if c >= 0.005)
    return f"{sum(each):.2f} ({shown})"


def served_section(results: Results, config: ModelConfig, plan: Plan) -> list[str]:
    title = "## 3. Served throughput vs bare engine (batch 8)"
    if results.served is None:
        return [title, "", "Skipped (--skip-server).", ""]
    s, batch = results.served, config.batching.max_batch_size
    concurrency = batch * plan.clients_per_batch
    return [
        title,
        "",
        *table(["", ""], served_rows(s, results.engine("onnxruntime-cpu", batch))),
        "",
        f"`cxr-triage serve` (defaults, {config.batching.batch_timeout_ms:g} ms batch window) as a "
        f"subprocess; {concurrency} concurrent httpx clients (asyncio, this process, same machine) POST "
        f"224x224 8-bit PNGs for {s.seconds:.1f} s after a {plan.served_warmup:g} s warm-up. "
        "Engine busy share below 100% means the engine sometimes waited for work.",
        "",
    ]


def render(results: Results, config: ModelConfig, plan: Plan, load: float, started: datetime) -> str:
    mode = "quick smoke run: too short to compare" if plan.quick else "full"
    lines = [
        "# cxr-triage core benchmark",
        "",
        f"{started:%Y-%m-%d %H:%M} UTC · commit {git_commit()} · mode: {mode} · "
        f"{plan.duration:g} s per throughput measurement, {plan.repeats} decode repeats",
        "",
        *machine_section(load, results),
        *engine_section(results),
        *decode_section(results, plan),
        *served_section(results, config, plan),
    ]
    return "\n".join(lines).rstrip() + "\n"


def write_report(
    text: str, quick: bool, started: datetime, name: str = "core", out: Path = RESULTS
) -> list[Path]:
    """Write ``<name>-<machine>-<date>[-quick].md`` and ``<name>-latest.md`` (atomically) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if quick else ""
    paths = [out / f"{name}-{machine_tag()}-{started:%Y%m%d}{suffix}.md", out / f"{name}-latest.md"]
    for path in paths:
        tmp = path.with_suffix(".md.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return paths


# --------------------------------------------------------------------------- main


def run_all(config: ModelConfig, engine_path: Path, plan: Plan) -> Results:
    results = Results()
    inputs = engine_inputs(config)
    with new_progress() as progress:
        results.engines += metered(
            results, "ONNX Runtime", lambda: bench_onnx(engine_path, inputs, plan, progress)
        )
        gc.collect()
        if not plan.skip_torch:
            results.engines += metered(
                results, "PyTorch", lambda: bench_torch(config, inputs, plan, progress)
            )
        results.decodes = metered(results, "decode", lambda: bench_decode(config, plan, progress))
        if not plan.skip_server:
            results.served = served = bench_served(config, plan, progress)
            results.other_cores["served"] = served.other_cpu_s / served.seconds
    return results


def metered(results: Results, phase: str, fn: Callable[[], T]) -> T:
    """Run one phase, noting how much CPU other processes took meanwhile."""
    before = cpu_snapshot()
    out = fn()
    results.other_cores[phase] = other_cores(before, cpu_snapshot())
    return out


def main(argv: list[str] | None = None) -> int:
    plan = parse_args(argv)
    started, load = datetime.now(UTC), os.getloadavg()[0]
    config, engine_path = require_engine()
    if load >= BUSY_LOAD_PER_CORE * (os.cpu_count() or 1):
        console.print(f"[bold yellow]load average {load:.2f}: the machine is busy; numbers will suffer[/]")
    results = run_all(config, engine_path, plan)
    text = render(results, config, plan, load, started)
    paths = write_report(text, plan.quick, started)
    from rich.markdown import Markdown

    console.print(Markdown(text))
    for path in paths:
        console.print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
