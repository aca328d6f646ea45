"""The model versions one inference worker serves: engines, the canary split, hot swaps.

Each model is served by its default (promoted) version and, during a canary, a candidate that
scores a fixed share of jobs (``model_repo/<name>/serving.json``). When serving.json changes,
the engines of the versions it names are built and warmed up first and swapped in between
batches; if they do not load, the old ones keep serving (no restart, no failed request).
"""

import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from cxr_triage.config import Settings
from cxr_triage.engines import Engine, OnnxEngine
from cxr_triage.engines.gzsl import GzslEngine, to_probability
from cxr_triage.errors import RepositoryError
from cxr_triage.observability import metrics
from cxr_triage.queue.findings import AddedFinding, latents_of
from cxr_triage.repository import (
    Canary,
    ModelConfig,
    ModelEntry,
    ModelRepository,
    VersionEntry,
    goes_to_canary,
)
from cxr_triage.schemas import ZERO_SHOT_WARNING, provenance_warning
from cxr_triage.serving.reload import ServingWatch, read_serving, serving_versions
from cxr_triage.serving.yielding import uninterrupted

log = logging.getLogger(__name__)


class LoadedModel:
    """One version of a model with its engine, and what its results say and are scored with.

    A zero-shot (gzsl) version scores its trained labels and the findings added to it at run
    time (``set_added``), from the latents of both; a classifier scores its engine's outputs.
    """

    def __init__(self, entry: ModelEntry, version: VersionEntry, engine: Engine | GzslEngine) -> None:
        self.entry, self.version, self.engine = entry, version, engine
        self.ref = {
            "name": entry.name,
            "version": version.version,
            "backend": engine.backend,
            "weights": version.metadata.weights,
        }
        self._own_thresholds = version.metadata.thresholds_for(entry.config)
        self.thresholds: dict[str, float] = dict(self._own_thresholds)
        self.labels: tuple[str, ...] = entry.config.labels
        self._own_unseen = frozenset(engine.unseen) if isinstance(engine, GzslEngine) else frozenset()
        self.unseen = self._own_unseen
        self.added: tuple[AddedFinding, ...] = ()
        self.added_revision = -1  # the FindingStore revision ``added`` was read at; -1: never
        self._latents = engine.label_latents if isinstance(engine, GzslEngine) else None
        warning = provenance_warning(version.metadata.weights, version.metadata.data)
        self.warnings = [w for w in (warning, ZERO_SHOT_WARNING if self.zero_shot else None) if w]

    @property
    def zero_shot(self) -> bool:
        return isinstance(self.engine, GzslEngine)

    def set_added(self, findings: Sequence[AddedFinding], revision: int) -> None:
        """Score these run-time findings after the trained labels from the next batch on."""
        if not isinstance(self.engine, GzslEngine):
            raise TypeError(f"{self.entry.name} is not a zero-shot model; findings cannot be added")
        extra = latents_of(findings, self.engine.latent_dim)
        self._latents = np.vstack([self.engine.label_latents, extra])
        self.added, self.added_revision = tuple(findings), revision
        self.labels = self.entry.config.labels + tuple(f.label for f in findings)
        self.unseen = self._own_unseen | {f.label for f in findings}
        self.thresholds = dict(self._own_thresholds)
        self.thresholds.update({f.label: f.threshold for f in findings if f.threshold is not None})

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Per-label scores in 0-1 (N, len(labels)) and class activation maps where the model has them."""
        if isinstance(self.engine, GzslEngine):
            return to_probability(self.engine.score_images(batch, self._latents)), None
        return self.engine.run_with_heatmaps(batch)

    @property
    def key(self) -> tuple[str, str]:
        return self.entry.name, self.version.version

    @property
    def info(self) -> tuple[str, str, str, str]:
        """Label values of the model-info gauge."""
        return self.entry.name, self.version.version, self.version.metadata.weights, self.engine.backend


@dataclass(frozen=True)
class Route:
    """The versions that score one model's jobs."""

    default: LoadedModel
    canary: LoadedModel | None = None
    split: Canary | None = None

    def pick(self, job_id: str) -> LoadedModel:
        """The canary for the jobs ``goes_to_canary`` sends there (stable per job id), else the default."""
        if self.canary is not None and goes_to_canary(job_id, self.split):
            return self.canary
        return self.default

    def loaded(self) -> list[LoadedModel]:
        return [self.default] + ([self.canary] if self.canary is not None else [])

    def describe(self) -> str:
        text = f"version {self.default.version.version}"
        if self.canary is not None and self.split is not None:
            text += f", canary version {self.canary.version.version} on {self.split.fraction:.0%} of jobs"
        return text


class ServedVersions:
    """The routes of one worker, by model name, and their hot reload (single-threaded use)."""

    def __init__(
        self, settings: Settings, pinned: Mapping[str, str], fallback: ModelRepository | None
    ) -> None:
        """``pinned``: model name -> the version the HTTP process validated at start-up.

        The pinned version serves where there is no serving.json (not a newer, unpromoted
        export), and is the fallback at start-up when what serving.json names does not load,
        taken from ``fallback`` (the repository as the HTTP process checked it) if the
        repository on disk no longer reads.
        """
        self.settings, self.pinned, self.fallback = settings, dict(pinned), fallback
        self.routes: dict[str, Route] = {}
        # Watch before reading: a promotion while the repository is read is seen at the first poll.
        self._watch = ServingWatch(settings.model_repo, self.pinned, settings.reload_poll_s)

    def start(self) -> None:
        """Load what serving.json says now (a worker restarted after a promotion must not go
        back), else the pinned versions.

        Raises:
            RepositoryError: a model whose pinned version does not load either.
        """
        repo: ModelRepository | None = None
        problem: Exception | None = None
        try:
            repo = self._read(self.pinned)
        except Exception as exc:  # whatever keeps the repository from reading: the pinned versions
            problem = exc
        for name, pinned in self.pinned.items():
            self._swap(name, self._start_route(name, pinned, repo, problem))

    def reload_if_changed(self) -> None:
        """Swap in what a changed serving.json names, once its engines are built and warmed up.

        Call it between batches, so that no batch sees half a swap. A version that does not
        load is logged once per change and counted; the old one keeps serving until
        serving.json changes again.
        """
        changed = self._watch.changed()
        if not changed:
            return
        try:
            repo = self._read({name: self.pinned[name] for name in changed})
        except Exception as exc:  # whatever keeps the repository from reading: keep serving
            self._failed(changed, exc)
            return
        for name in changed:
            try:
                route = self._build(repo.get(name))
            except Exception as exc:  # any engine that will not load: keep serving the old one
                self._failed([name], exc)
                continue
            self._swap(name, route)
            metrics.MODEL_RELOADS.labels(name, "ok").inc()
            log.info("%s: serving.json changed; now serving %s", name, route.describe())

    def _failed(self, names: list[str], exc: Exception) -> None:
        for name in names:
            metrics.MODEL_RELOADS.labels(name, "failed").inc()
            kept = self.routes[name].describe() if name in self.routes else "nothing"
            log.error("%s: serving.json changed but cannot be served; still serving %s: %s", name, kept, exc)

    def _read(self, pinned: Mapping[str, str]) -> ModelRepository:
        return read_serving(self.settings.model_repo, self.settings.default_model, pinned)

    def _start_route(
        self, name: str, pinned: str, repo: ModelRepository | None, problem: Exception | None
    ) -> Route:
        if repo is not None:
            try:
                return self._build(repo.get(name))
            except Exception as exc:  # any engine that will not load: fall back to the pinned one
                problem = exc
        log.error("%s: what serving.json names does not load; serving version %s: %s", name, pinned, problem)
        metrics.MODEL_RELOADS.labels(name, "failed").inc()
        for source in (repo, self.fallback):
            if source is not None and name in source.models and pinned in source.models[name].versions:
                entry = source.models[name]
                return Route(self._load(entry, entry.versions[pinned]))
        raise RepositoryError(
            f"{name}: pinned version {pinned} is not in the repository either; fix it, restart"
        )

    def _build(self, entry: ModelEntry) -> Route:
        """Engines for the versions serving ``entry``: loaded ones reused, new ones built and warmed up."""
        default, *candidate = serving_versions(entry, self.pinned.get(entry.name))
        split = entry.serving.canary if entry.serving is not None and candidate else None
        canary = self._load(entry, candidate[0]) if candidate else None
        return Route(self._load(entry, default), canary, split)

    def _load(self, entry: ModelEntry, version: VersionEntry) -> LoadedModel:
        """The version with the engine already loaded for it, else a new engine, warmed up."""
        for route in self.routes.values():
            for model in route.loaded():
                if model.key == (entry.name, version.version) and model.version == version:
                    return LoadedModel(entry, version, model.engine)
        engine: Engine | GzslEngine
        if entry.config.type == "gzsl":
            engine = GzslEngine(version.path, self.settings.backend, self.settings.intra_op_threads)
            uninterrupted(functools.partial(warm_up_gzsl, engine, entry.config))
        else:
            engine = OnnxEngine(version.engine_path, self.settings.backend, self.settings.intra_op_threads)
            uninterrupted(functools.partial(warm_up, engine, entry.config))  # a warm-up may meet the lane
        weights = version.metadata.weights
        log.info(
            "loaded %s version %s on %s (weights: %s)", entry.name, version.version, engine.backend, weights
        )
        return LoadedModel(entry, version, engine)

    def _swap(self, name: str, route: Route) -> None:
        """Serve ``route`` for ``name`` from the next batch on; the model-info gauge follows."""
        old = self.routes.get(name)
        self.routes[name] = route
        live = {model.info for model in route.loaded()}
        for info in live:
            metrics.MODEL_INFO.labels(*info).set(1)
        for model in old.loaded() if old is not None else []:
            if model.info not in live:
                _unpublish(model.info)


def warm_up(engine: Engine, config: ModelConfig) -> None:
    """One blank image through a new engine before it takes traffic: it must answer one
    probability per label, and its first (slowest) call is not a patient's."""
    spec = config.input
    probs, _ = engine.run_with_heatmaps(np.zeros((1, spec.channels, spec.size, spec.size), np.float32))
    if probs.shape != (1, len(config.labels)):
        raise RepositoryError(
            f"the engine gives {probs.shape[1:]} outputs per image but config.yaml lists "
            f"{len(config.labels)} labels; re-export this version"
        )


def warm_up_gzsl(engine: GzslEngine, config: ModelConfig) -> None:
    """A blank image through the image tower and one name through the text tower: both must
    give latents of the stored label latents' size."""
    spec = config.input
    image = engine.encode_images(np.zeros((1, spec.channels, spec.size, spec.size), np.float32))
    text = engine.encode_text(["warm up"])
    if image.shape != (1, engine.latent_dim) or text.shape != (1, engine.latent_dim):
        raise RepositoryError(
            f"the GZSL towers give latents {image.shape[1:]} (image) and {text.shape[1:]} (text) but "
            f"the label latents are {engine.latent_dim}-d; register this version again"
        )


def _unpublish(info: tuple[str, str, str, str]) -> None:
    """A version no longer served: 0 on the model-info gauge, and gone where that is possible
    (prometheus-client cannot remove a series in multiprocess mode)."""
    metrics.MODEL_INFO.labels(*info).set(0)
    if not metrics.is_multiprocess():
        metrics.MODEL_INFO.remove(*info)
