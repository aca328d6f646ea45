"""Scale-out: two replicas on one Redis behave as one service and lose nothing when one dies.

Everything is a real process: one Debian redis-server (append-only file, fsync always) and two
``cxr-triage serve`` replicas ("a" and "b"), run twice: on 127.0.0.1 ports, and as separate
hosts, each in its own network namespace on a bridge (``ip netns``, veth), with the test
process as the client on the bridge. The tests of one variant share the three processes and
run in file order; the last ones kill or drain a replica.

Jobs are checked in Redis, the source of truth: every accepted job is ``done`` with exactly
one stored outcome, naming the replica that scored it. "Scored once" is checked on the
engines' side too: the sum over both replicas of ``cxr_triage_batch_size`` (images run
through an engine) equals the number of jobs.
"""

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest
import redis

from cxr_triage.queue import JobQueue
from cxr_triage.serving.lifecycle import SHUTDOWN_MARGIN_S
from tests.helpers import ServerProcess, chest_u8, free_port, png_bytes, require_binary, start_server, stop

LEASE_S = 3.0  # short, so that the jobs of a killed replica come back quickly
DRAIN_GRACE_S = 12.0
API_KEY = "replica-test-key"
HEADERS = {"X-API-Key": API_KEY}


@dataclass
class Hosts:
    """Where each process runs: a command prefix and the address the others reach it at."""

    redis: tuple[tuple[str, ...], str]
    replicas: dict[str, tuple[tuple[str, ...], str]]


@contextlib.contextmanager
def loopback_hosts() -> Iterator[Hosts]:
    local: tuple[tuple[str, ...], str] = ((), "127.0.0.1")
    yield Hosts(redis=local, replicas={"a": local, "b": local})


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@contextlib.contextmanager
def namespace_hosts() -> Iterator[Hosts]:
    """Three network namespaces (redis, a, b) on a bridge whose address is the test's own."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (CAP_NET_ADMIN); the 127.0.0.1 variant ran")
    tag = f"cx{os.getpid() % 100000}"
    subnet = f"10.231.{os.getpid() % 200 + 20}"
    bridge = f"br{tag}"
    names = {"redis": 2, "a": 3, "b": 4}
    made: list[str] = []
    try:
        try:
            _ip("link", "add", bridge, "type", "bridge")
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"cannot create a bridge for network namespaces here: {exc.stderr.strip()}")
        _ip("addr", "add", f"{subnet}.1/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for name, host in names.items():
            ns = f"{tag}{name}"
            _ip("netns", "add", ns)
            made.append(ns)
            outer, inner = f"v{tag}{host}", f"p{tag}{host}"
            _ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            _ip("link", "set", inner, "netns", ns)
            _ip("link", "set", outer, "master", bridge, "up")
            _ip("-n", ns, "addr", "add", f"{subnet}.{host}/24", "dev", inner)
            _ip("-n", ns, "link", "set", inner, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

        def where(name: str) -> tuple[tuple[str, ...], str]:
            return ("ip", "netns", "exec", f"{tag}{name}"), f"{subnet}.{names[name]}"

        yield Hosts(redis=where("redis"), replicas={"a": where("a"), "b": where("b")})
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)


@dataclass
class Cluster:
    repo: Path
    workdir: Path
    hosts: Hosts
    redis_port: int = field(default_factory=free_port)
    redis_proc: subprocess.Popen[bytes] | None = None
    replicas: dict[str, ServerProcess] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def redis_url(self) -> str:
        return f"redis://{self.hosts.redis[1]}:{self.redis_port}/0"

    def start_redis(self) -> None:
        binary = require_binary("redis-server", "redis-server")
        wrapper, address = self.hosts.redis
        args = [*wrapper, binary, "--bind", address, "--port", str(self.redis_port), "--save", ""]
        args += ["--dir", str(self.workdir / "redis"), "--appendonly", "yes", "--appendfsync", "always"]
        args += ["--protected-mode", "no"]
        (self.workdir / "redis").mkdir(exist_ok=True)
        self.redis_proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        for _ in range(200):
            with contextlib.suppress(redis.RedisError):
                if self.client().ping():
                    return
            time.sleep(0.05)
        raise TimeoutError("redis-server did not start")

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, socket_timeout=5)

    def start(self, name: str, **env: str) -> ServerProcess:
        wrapper, address = self.hosts.replicas[name]
        port = self.ports.setdefault(name, free_port())
        settings = {
            "CXR_REDIS_URL": self.redis_url,
            "CXR_REPLICA_ID": name,
            "CXR_HOST": "0.0.0.0" if wrapper else "127.0.0.1",
            "CXR_API_KEYS": json.dumps([API_KEY]),
            "CXR_LEASE_S": str(LEASE_S),
            "CXR_DECODE_WORKERS": "1",
            "CXR_INTRA_OP_THREADS": "1",
            "CXR_RELOAD_POLL_S": "0",
            "CXR_DRAIN_GRACE_S": str(DRAIN_GRACE_S),
            "CXR_DATA_DIR": str(self.workdir / f"data-{name}"),
            "CXR_METRICS_DIR": str(self.workdir / f"metrics-{name}"),
            **env,
        }
        log = self.workdir / f"replica-{name}.log"
        server = start_server(self.repo, settings, port, log, wrapper, address)
        self.replicas[name] = server
        return server

    def url(self, name: str) -> str:
        return self.replicas[name].url

    def workers(self, name: str) -> list[psutil.Process]:
        """The replica's inference workers: spawned children of its main process."""
        main = psutil.Process(self.replicas[name].proc.pid)
        return [c for c in main.children() if "spawn_main" in " ".join(c.cmdline())]

    def signal_workers(self, name: str, sig: signal.Signals) -> None:
        workers = self.workers(name)
        assert workers, f"replica {name} has no inference worker"
        for w in workers:
            w.send_signal(sig)

    def close(self) -> None:
        for server in self.replicas.values():
            with contextlib.suppress(psutil.Error):
                for w in psutil.Process(server.proc.pid).children(recursive=True):
                    w.send_signal(signal.SIGCONT)
            stop(server.proc)
        if self.redis_proc is not None:
            stop(self.redis_proc)


@pytest.fixture(scope="module", params=["loopback", "netns"])
def cluster(request: pytest.FixtureRequest, exported_repo: Path, tmp_path_factory: pytest.TempPathFactory):
    hosts_of = loopback_hosts if request.param == "loopback" else namespace_hosts
    with hosts_of() as hosts:
        c = Cluster(exported_repo, tmp_path_factory.mktemp(f"replicas-{request.param}"), hosts)
        try:
            c.start_redis()
            for name in ("a", "b"):
                c.start(name)
            for server in c.replicas.values():
                server.wait_ready(120)
            yield c
        finally:
            c.close()


IMAGE = png_bytes(chest_u8(64))


def submit(client: httpx.Client, url: str, priority: str = "routine") -> str:
    r = client.post(
        f"{url}/v1/studies",
        params={"priority": priority},
        content=IMAGE,
        headers={**HEADERS, "Content-Type": "image/png"},
    )
    assert r.status_code == 202, r.text
    return str(r.json()["job_id"])


def jobs_of(c: Cluster, job_ids: list[str]) -> list[dict[str, str]]:
    return JobQueue(c.client(), {}).jobs(job_ids)


def wait_done(c: Cluster, job_ids: list[str], timeout: float = 90.0) -> list[dict[str, str]]:
    deadline = time.monotonic() + timeout
    while True:
        jobs = jobs_of(c, job_ids)
        pending = [j for j, job in zip(job_ids, jobs, strict=True) if job.get("status") != "done"]
        if not pending:
            return jobs
        if time.monotonic() > deadline:
            states = {j: jobs_of(c, [j])[0].get("status") for j in pending[:5]}
            pytest.fail(f"{len(pending)} of {len(job_ids)} jobs not done: {states}")
        time.sleep(0.1)


def scored_by(job: dict[str, str]) -> str:
    return str(json.loads(job["outcome"])["replica"])


def engine_images(c: Cluster, name: str) -> float:
    """Images this replica ran through an engine (cxr_triage_batch_size's sum)."""
    text = httpx.get(f"{c.url(name)}/metrics", headers=HEADERS, timeout=10).text
    rows = [line for line in text.splitlines() if line.startswith("cxr_triage_batch_size_sum")]
    assert all(f'replica="{name}"' in line for line in rows), rows
    return sum(float(line.rsplit(" ", 1)[1]) for line in rows)


def test_jobs_posted_to_both_replicas_finish_exactly_once(cluster: Cluster) -> None:
    before = {n: engine_images(cluster, n) for n in ("a", "b")}
    with httpx.Client(timeout=30) as client:
        ids = [submit(client, cluster.url("ab"[i % 2])) for i in range(40)]
    jobs = wait_done(cluster, ids)
    assert len(set(ids)) == 40
    assert all(job["attempts"] == "1" for job in jobs), "a job was delivered twice"
    by = [scored_by(job) for job in jobs]
    assert set(by) == {"a", "b"}, "one replica scored everything: idle workers did not share"
    assert {job["worker"].split("/")[0] for job in jobs} == set(by)
    ran = sum(engine_images(cluster, n) - before[n] for n in ("a", "b"))
    assert ran == 40, f"the engines scored {ran} images for 40 jobs"
    # The same study answers the same on either replica.
    study = (cluster.client().hget(f"cxr:job:{ids[0]}", "study_uid") or b"").decode()
    with httpx.Client(timeout=30, headers=HEADERS) as client:
        views = [client.get(f"{cluster.url(n)}/v1/studies/{study}").json() for n in ("a", "b")]
        lists = [
            client.get(f"{cluster.url(n)}/v1/worklist", params={"limit": 100}).json() for n in ("a", "b")
        ]
    assert views[0] == views[1] and views[0]["status"] == "done"
    assert [s["study_uid"] for s in lists[0]["studies"]] == [s["study_uid"] for s in lists[1]["studies"]]


def test_priority_order_holds_across_replicas(cluster: Cluster) -> None:
    for name in ("a", "b"):  # the inference workers wait; the HTTP processes take uploads
        cluster.signal_workers(name, signal.SIGSTOP)
    try:
        with httpx.Client(timeout=30) as client:
            routine = [submit(client, cluster.url("a"), "routine") for _ in range(12)]
            stat = [submit(client, cluster.url("b"), "stat") for _ in range(5)]
    finally:
        for name in ("a", "b"):
            cluster.signal_workers(name, signal.SIGCONT)
    jobs = dict(zip(routine + stat, wait_done(cluster, routine + stat), strict=True))
    # Redis's own order of leases: leased_at comes from each worker's clock, read before its
    # lease reaches Redis, so two workers woken together can disagree by a millisecond.
    last_stat = max(int(jobs[j]["lease_seq"]) for j in stat)
    first_routine = min(int(jobs[j]["lease_seq"]) for j in routine)
    assert last_stat < first_routine, "a routine job was leased before a stat job that waited"


def test_redis_restart_with_aof_loses_no_accepted_job(cluster: Cluster) -> None:
    for name in ("a", "b"):
        cluster.signal_workers(name, signal.SIGSTOP)
    try:
        with httpx.Client(timeout=30) as client:
            ids = [submit(client, cluster.url("ab"[i % 2])) for i in range(10)]
        assert cluster.redis_proc is not None
        os.killpg(cluster.redis_proc.pid, signal.SIGKILL)  # no chance to flush anything
        cluster.redis_proc.wait()
        cluster.start_redis()  # same port, same folder: it replays the append-only file
    finally:
        for name in ("a", "b"):
            cluster.signal_workers(name, signal.SIGCONT)
    jobs = wait_done(cluster, ids)
    assert all(scored_by(job) in ("a", "b") for job in jobs)
    for name in ("a", "b"):  # both replicas found the restarted Redis on their own
        assert httpx.get(f"{cluster.url(name)}/ready", timeout=10).status_code == 200


def test_sigkill_during_a_flood_loses_nothing(cluster: Cluster) -> None:
    """Replica b waits (stopped) while a scores a flood; a is killed while it holds leases."""
    r = cluster.client()
    b_group = [psutil.Process(cluster.replicas["b"].proc.pid)]
    b_group += b_group[0].children(recursive=True)
    for p in b_group:
        p.send_signal(signal.SIGSTOP)
    held: list[str] = []
    try:
        with httpx.Client(timeout=30) as client:
            ids = [submit(client, cluster.url("a")) for _ in range(60)]
        deadline = time.monotonic() + 30
        while not held and time.monotonic() < deadline:
            if a_holds(r):  # freeze a's worker mid-batch, then see what it holds for sure
                cluster.signal_workers("a", signal.SIGSTOP)
                held = a_holds(r)
                if not held:
                    cluster.signal_workers("a", signal.SIGCONT)
        assert held, "replica a never held a lease during the flood"
        os.kill(cluster.replicas["a"].proc.pid, signal.SIGKILL)  # its main process: the others follow
        cluster.replicas["a"].proc.wait()
    finally:
        for p in b_group:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGCONT)
    jobs = dict(zip(ids, wait_done(cluster, ids, timeout=60 + LEASE_S), strict=True))
    for j in held:  # scored once more, by the survivor, after the lease expired
        assert scored_by(jobs[j]) == "b" and jobs[j]["attempts"] == "2", jobs[j]
    assert int(r.hget("cxr:stats", "redelivered") or 0) >= len(held)
    left = [" ".join(p.cmdline())[-120:] for p in _leftovers(cluster, "a")]
    assert not left, f"processes of the killed replica still run: {left}"


def a_holds(r: redis.Redis) -> list[str]:
    """Jobs running under a lease of replica a."""
    ids = [j.decode() for j in r.zrange("cxr:leases", 0, -1)]
    jobs = JobQueue(r, {}).jobs(ids)
    return [j for j, job in zip(ids, jobs, strict=True) if job.get("worker", "").startswith("a/")]


def _leftovers(cluster: Cluster, name: str) -> list[psutil.Process]:
    """Processes still running from a replica's command line (none after SIGKILL of its group)."""
    port = str(cluster.ports[name])
    out = []
    for p in psutil.process_iter(["environ"]):
        with contextlib.suppress(psutil.Error):
            env = p.info.get("environ") or {}
            mine = env.get("CXR_REPLICA_ID") == name and env.get("CXR_PORT") == port
            if mine and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
    return out


def test_sigterm_drains(cluster: Cluster) -> None:
    """b drains: /ready 503, leases nothing new, answers its request in flight (scored by a),
    releases the lease of a hung worker when its grace period ends, and exits 0 within it."""
    if cluster.replicas["a"].proc.poll() is not None:  # back after the previous test
        cluster.start("a").wait_ready(120)
    a = cluster.replicas["a"]
    b = cluster.replicas["b"]
    r = cluster.client()
    answer: dict[str, httpx.Response] = {}
    for name in ("a", "b"):
        cluster.signal_workers(name, signal.SIGSTOP)
    try:
        with httpx.Client(timeout=60, headers=HEADERS) as client:
            # A job held by a hung worker of b, leased for 10 minutes: the drain releases it.
            stuck = submit(client, a.url)
            leased = JobQueue(r, {}).lease(1, "b/424242", lease_s=600)
            assert [j.job_id for j in leased] == [stuck]

            def predict() -> None:  # in flight on b while it drains
                headers = {**HEADERS, "Content-Type": "image/png"}
                answer["r"] = httpx.post(f"{b.url}/v1/predict", content=IMAGE, headers=headers, timeout=60)

            in_flight = threading.Thread(target=predict)
            in_flight.start()
            time.sleep(0.5)
            os.kill(b.proc.pid, signal.SIGTERM)  # the main process only, as Kubernetes does
            started = time.monotonic()
            time.sleep(0.3)
            cluster.signal_workers("b", signal.SIGCONT)
            ready = client.get(f"{b.url}/ready")
            assert ready.status_code == 503 and "draining" in ready.text, ready.text
            assert 'cxr_triage_draining{replica="b"} 1.0' in client.get(f"{b.url}/metrics").text
            late = submit(client, b.url)  # still accepted while load balancers catch up
            time.sleep(1.0)
            statuses = JobQueue(r, {}).statuses([late, stuck])
            assert statuses == ["queued", "running"], f"a draining replica leased a job: {statuses}"
    finally:
        cluster.signal_workers("a", signal.SIGCONT)
    in_flight.join(60)
    assert answer["r"].status_code == 200, answer["r"].text
    assert answer["r"].json()["replica"] == "a"  # answered by b, scored by a
    code = b.proc.wait(timeout=DRAIN_GRACE_S + 20)
    took = time.monotonic() - started
    assert code == 0, b.log()[-3000:]
    assert DRAIN_GRACE_S - SHUTDOWN_MARGIN_S - 1 < took < DRAIN_GRACE_S, f"drain took {took:.1f} s"
    jobs = wait_done(cluster, [stuck, late])
    assert [scored_by(job) for job in jobs] == ["a", "a"]
    assert "put back on the queue: 1" in b.log()
    # every process let go of what it held: multiprocessing's resource tracker has nothing left
    assert "leaked semaphore" not in b.log(), b.log()[-3000:]
