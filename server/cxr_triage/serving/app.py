"""Assemble the service: repository check, LitServe server, routes, error handling."""

import _thread
import asyncio
import contextlib
import functools
import logging
import multiprocessing.util
import os
import signal
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event

import litserve as ls
from fastapi import FastAPI
from fastapi.routing import APIRoute
from litserve.loops.base import _SENTINEL_VALUE
from litserve.utils import WorkerSetupStatus

from cxr_triage.config import Settings
from cxr_triage.dicomweb.stow import build_stow_router
from cxr_triage.engines import accelerated
from cxr_triage.errors import RepositoryError
from cxr_triage.observability import tracing
from cxr_triage.queue import JobQueue, RedisHandle, connect
from cxr_triage.queue.findings import FindingStore
from cxr_triage.queue.studies import StudyStore
from cxr_triage.repository import ModelRepository
from cxr_triage.schemas import provenance_warning
from cxr_triage.serving.api import TriageAPI
from cxr_triage.serving.auth import ApiKeyMiddleware
from cxr_triage.serving.finding_routes import build_finding_router
from cxr_triage.serving.http_errors import install_error_handlers
from cxr_triage.serving.intake import Intake
from cxr_triage.serving.lifecycle import (
    ManagerGone,
    die_with_parent,
    drain_then_stop,
    name_process,
    replica_event,
)
from cxr_triage.serving.replies import Replies
from cxr_triage.serving.routes import (
    build_predict_router,
    build_router,
    compress_except,
    install_request_metrics,
)
from cxr_triage.serving.study_routes import build_study_router
from cxr_triage.web import install_web

log = logging.getLogger(__name__)


@dataclass
class Service:
    server: ls.LitServer
    intake: Intake
    redis: RedisHandle  # holds the embedded Redis (if any) for the life of the service
    drain: Event  # set on SIGTERM, seen by every process of the replica

    def run(self) -> None:
        """Serve until SIGTERM (a drain: serving.lifecycle) or Ctrl-C (LitServe stops at once),
        then shut LitServe down and stop the embedded Redis."""
        s = self.intake.settings
        name_process("main")
        signal.signal(signal.SIGTERM, functools.partial(self._on_sigterm, os.getpid()))
        # Every process LitServe forks (HTTP servers, its multiprocessing manager) dies with this
        # one: a replica killed with SIGKILL leaves nothing serving its port.
        multiprocessing.util.register_after_fork(self, _die_with_parent_after_fork)
        publisher = self._start_publisher()
        logging.getLogger("litserve.server").addFilter(ManagerGone())
        try:
            # No uvicorn access log: its request paths carry study UIDs.
            self.server.run(
                host=s.host,
                port=s.port,
                num_api_servers=s.http_servers or None,
                log_level=s.log_level,
                generate_client_file=False,
                access_log=False,
            )
        finally:
            if publisher is not None:
                publisher.terminate()
                publisher.join(5)
            self.redis.close()

    def _start_publisher(self) -> BaseProcess | None:
        """The PACS process (SRs back to the PACS, polling), when CXR_PACS_URL is set."""
        s = self.intake.settings
        if not (s.pacs_url and (s.pacs_store_sr or s.pacs_poll_s > 0)):
            return None
        from cxr_triage.dicomweb.publisher import run_pacs_worker

        context = get_context("spawn")
        process = context.Process(target=run_pacs_worker, args=(s,), name="pacs-worker", daemon=True)
        process.start()
        log.info("PACS worker started (store SR: %s, poll: %s s)", s.pacs_store_sr, s.pacs_poll_s or "off")
        return process

    def _on_sigterm(self, main_pid: int, signum: int, frame: object) -> None:
        if os.getpid() != main_pid:  # a forked child before it set its own handler: default
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.drain.is_set():
            log.warning("SIGTERM again: already draining")
            return
        s = self.intake.settings
        log.warning("SIGTERM: draining replica %s (at most %.0f s)", s.replica, s.drain_grace_s)
        self.drain.set()
        threading.Thread(
            target=drain_then_stop,
            args=(self.intake.queue, s.replica, self._in_flight, s.drain_grace_s, self._stop),
            name="drain",
            daemon=True,
        ).start()

    def _in_flight(self) -> int | None:
        return self.server.active_requests  # type: ignore[no-any-return]

    def _stop(self) -> None:
        """End the inference workers' loops (LitServe's stop message, which its own shutdown
        does not send to them), then LitServe's graceful stop."""
        queues = getattr(self.server, "litapi_request_queues", {})
        for queue in queues.values():
            for _ in range(self.intake.settings.litserve_workers):
                queue.put(_SENTINEL_VALUE)
        event = getattr(self.server, "_shutdown_event", None)
        if event is not None:
            event.set()
        else:  # another LitServe: its KeyboardInterrupt path
            _thread.interrupt_main()


def _die_with_parent_after_fork(_: object) -> None:
    die_with_parent(signal.SIGKILL)


def served_models(settings: Settings, repo: ModelRepository) -> list[str]:
    """Models to load: CXR_MODELS, else every model with a version. The default must be among them."""
    wanted = settings.models or [m.name for m in repo.servable()]
    problems = [f"{n}: not in the repository" for n in wanted if n not in repo.models]
    problems += [
        f"{n}: has no exported version; run `cxr-triage export {n}`"
        for n in wanted
        if n in repo.models and not repo.models[n].versions
    ]
    if repo.default_model not in wanted:
        problems.append(
            f"default model {repo.default_model}: not served; run `cxr-triage export {repo.default_model}` "
            "or set CXR_DEFAULT_MODEL"
        )
    if problems:
        raise RepositoryError("cannot serve:\n  - " + "\n  - ".join(problems))
    return wanted


def build_service(settings: Settings) -> Service:
    """Validate model_repo/ and build the server (not started). Raises RepositoryError."""
    repo = ModelRepository.load(settings.model_repo, settings.default_model)
    served = served_models(settings, repo)
    tracing.setup_tracing(settings, "http")
    handle = connect(settings)
    settings = settings.model_copy(update={"redis_url": handle.url}).resolved_engines(
        accelerated(settings.backend)
    )
    log.info(
        "engines: %d inference workers x %d ONNX Runtime threads%s; %d decoding processes",
        settings.inference_workers,
        settings.intra_op_threads,
        " and the urgent lane's" if settings.urgent_lane else "",
        settings.resolved_decode_workers(),
    )
    for name in served:
        version = repo.models[name].served
        warning = version and provenance_warning(version.metadata.weights, version.metadata.data)
        if version is not None and warning:
            log.warning("%s version %s: %s", name, version.version, warning.upper())
    pinned = {name: version.version for name in served if (version := repo.models[name].served) is not None}
    drain = replica_event()
    # The urgent lane's flag, up while it scores, for routine workers to give it the cores.
    preempts = settings.urgent_lane and settings.lane_preempts and not accelerated(settings.backend)
    lane_busy = replica_event() if preempts else None
    batching = repo.get(None).config.batching
    api = TriageAPI(settings, pinned, batching, fallback=repo, drain=drain, lane_busy=lane_busy)
    server = ls.LitServer(
        api,
        accelerator="cpu",
        workers_per_device=settings.litserve_workers,
        timeout=settings.request_timeout_s,
        healthcheck_path="/_litserve/health",
        info_path="/_litserve/info",
        # A dead inference worker is restarted (jobs it held are re-delivered from Redis)
        # instead of LitServe shutting the whole service down.
        restart_workers=True,
        track_requests=True,  # requests in flight: what a drain waits for
    )
    client = handle.client()
    intake = Intake(settings, repo, served, JobQueue(client, settings.max_wait_s))
    studies = StudyStore(client, lambda name: intake.repository.get(name).config.critical_findings)
    replies = Replies(handle.url)
    app = server.app
    app.title, app.version = "cxr-triage", _version()
    app.state.intake = intake
    own_predict_route(app, api.api_path)
    compress_except(app, frozenset({api.api_path}))
    app.include_router(build_predict_router(intake, replies))
    app.include_router(build_router(intake, studies, lambda: _workers_problem(server), drain.is_set))
    app.include_router(build_study_router(intake, studies))
    app.include_router(build_finding_router(intake, FindingStore(client)))
    app.include_router(build_stow_router(intake))
    install_error_handlers(app)
    install_request_metrics(app)
    _follow_serving(app, intake, replies)
    if settings.api_keys:
        app.add_middleware(ApiKeyMiddleware, keys=[k.get_secret_value() for k in settings.api_keys])
    install_web(app, intake, studies)  # last: the page shell answers before the API key is asked
    return Service(server=server, intake=intake, redis=handle, drain=drain)


def own_predict_route(app: FastAPI, path: str) -> None:
    """Take LitServe's POST route for the API's path off the app: the app serves that path itself
    (routes.build_predict_router). LitServe's route would carry each request to an inference
    worker and its reply back through LitServe's queues, and the job is in Redis already: the
    HTTP process waits there for the outcome instead, at a fraction of the CPU, and keeps
    waiting if the worker that held the job dies (the job is re-delivered)."""
    for route in list(app.router.routes):
        if isinstance(route, APIRoute) and (route.path, route.methods) == (path, {"POST"}):
            app.router.routes.remove(route)


def _follow_serving(app: FastAPI, intake: Intake, replies: Replies) -> None:
    """Run ``intake.follow_serving`` beside LitServe's own lifespan in each HTTP process
    (LitServe sets a lifespan, so FastAPI start-up handlers would not run), and start the
    process's decoding processes; close its wait for replies and its decoding processes at its
    end."""
    litserve_lifespan = app.router.lifespan_context

    async def warm() -> None:
        # In every HTTP process, not only the one /ready reaches: otherwise the first large
        # upload each one gets waits ~1 s for its pool to start.
        try:
            await intake.warm()
        except Exception:  # the first upload tries again, and reports what fails
            log.exception("the decoding processes did not start")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        name_process("http")
        async with litserve_lifespan(app):
            task = asyncio.create_task(intake.follow_serving(), name="follow-serving-json")
            warming = asyncio.create_task(warm(), name="warm-decoders")
            try:
                yield
            finally:
                warming.cancel()
                task.cancel()
                await replies.close()
                intake.close()

    app.router.lifespan_context = lifespan


def _workers_problem(server: ls.LitServer) -> str | None:
    status = dict(getattr(server, "workers_setup_status", None) or {})
    if not status:
        return "inference workers have not started yet"
    failed = [k for k, v in status.items() if v == WorkerSetupStatus.ERROR]
    if failed:
        return f"inference workers failed to load their models: {failed}; see the server log"
    waiting = [k for k, v in status.items() if v != WorkerSetupStatus.READY]
    return f"inference workers still loading: {waiting}" if waiting else None


def _version() -> str:
    from cxr_triage import __version__

    return __version__
