"""Hot reload: notice a changed ``serving.json`` cheaply, then read the repository again.

The promotion gate rewrites ``model_repo/<name>/serving.json`` (atomically) while the service
runs. Every process polls it: the inference workers swap engines between batches, the HTTP
process refreshes what ``/v1/models`` and ``/ready`` describe. A poll is one ``stat`` per
served model; the repository is read again only when a stamp changed, once per change, so a
broken file is reported once and the last good state keeps serving.
"""

import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Literal

from cxr_triage.errors import RepositoryError
from cxr_triage.repository import SERVING_FILE, ModelEntry, ModelRepository, VersionEntry
from cxr_triage.repository.repo import check_onnx

Stamp = tuple[int, int, int] | None
Role = Literal["default", "canary"]
_UNSEEN: Stamp = (-1, -1, -1)  # no file has it: the first poll reports the model as changed


def serving_stamp(model_dir: Path) -> Stamp:
    """(mtime_ns, size, inode) of the model's serving.json; None while it does not exist.

    The inode tells apart two atomic replacements within one mtime tick that happen to
    have the same size (each replacement is a new file).
    """
    try:
        st = (model_dir / SERVING_FILE).stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


class ServingWatch:
    """Which models' serving.json changed, looked at most every ``poll_s`` seconds.

    Create it before reading the repository, so that a change between the two is seen at the
    first poll rather than missed; or with ``seen=False`` after reading it, so that the first
    poll reports every model (one extra read instead of a missed change).
    """

    def __init__(
        self,
        root: Path,
        names: Iterable[str],
        poll_s: float,
        seen: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root, self.poll_s, self._clock = root, poll_s, clock
        self._stamps = {name: serving_stamp(root / name) if seen else _UNSEEN for name in names}
        self._next = clock() + poll_s

    def changed(self) -> list[str]:
        """Models whose serving.json changed since the last poll; [] between polls or when off.

        A change is reported once, whatever becomes of the reload it causes.
        """
        if self.poll_s <= 0 or self._clock() < self._next:
            return []
        self._next = self._clock() + self.poll_s
        out = []
        for name, old in self._stamps.items():
            new = serving_stamp(self.root / name)
            if new != old:
                self._stamps[name] = new
                out.append(name)
        return out


def default_version(entry: ModelEntry, pinned: str | None) -> VersionEntry | None:
    """The version that scores the model's jobs outside a canary: the one serving.json names;
    without serving.json the one the service started with (``pinned``, the latest then), so
    that a new export does not go live unpromoted in a worker that happens to restart."""
    if entry.serving is not None:
        return entry.served
    if pinned is not None and pinned in entry.versions:
        return entry.versions[pinned]
    return entry.latest


def serving_versions(entry: ModelEntry, pinned: str | None) -> list[VersionEntry]:
    """The versions that score the model's jobs: the default, then the canary if any.

    Raises:
        RepositoryError: the model has no version.
    """
    default = default_version(entry, pinned)
    if default is None:
        raise RepositoryError(f"{entry.name} has no exported version; run `cxr-triage export {entry.name}`")
    canary = entry.canary
    return [default] + ([canary] if canary is not None and canary.version != default.version else [])


def traffic_split(entry: ModelEntry, pinned: str | None) -> dict[str, tuple[Role, float]]:
    """Version -> (role, share of the model's jobs, 0-1) for the versions that score its jobs."""
    default = default_version(entry, pinned)
    if default is None:
        return {}
    canary = entry.serving.canary if entry.serving is not None else None
    if canary is None or canary.version == default.version:
        return {default.version: ("default", 1.0)}
    return {
        default.version: ("default", round(1.0 - canary.fraction, 6)),
        canary.version: ("canary", canary.fraction),
    }


def read_serving(root: Path, default_model: str | None, pinned: Mapping[str, str]) -> ModelRepository:
    """The repository as it is now, with the engines of the versions serving the models of
    ``pinned`` (name -> version the service started with) checked.

    Engines of other versions are not opened: one stale version folder must not block a
    promotion of another model.

    Raises:
        RepositoryError: the repository, a serving.json or a served engine is broken (says which).
        ModelNotFound: a named model is gone.
    """
    repo = ModelRepository.load(root, default_model, check_engines=False)
    problems = []
    for name, version_at_start in pinned.items():
        entry = repo.get(name)
        for version in serving_versions(entry, version_at_start):
            problems += [
                f"{name}/{version.version}/{version.metadata.engine.file}: {p}"
                for p in check_onnx(version.engine_path, entry.config)
            ]
    if problems:
        raise RepositoryError("cannot serve:\n  - " + "\n  - ".join(problems))
    return repo
