"""Backlog mode: score an archive through a running cxr-triage, without hurting live traffic.

``cxr-triage backlog FOLDER`` (or ``--qido URL``) sends every CR/DX instance of an archive to
``POST /v1/studies?priority=backfill`` of a running service (any replica, or a load balancer in
front of several), over HTTP only, and follows each job through its ``status_url``:

- **live traffic first**: ``backfill`` is the lowest priority class (the queue serves live jobs
  first), and the command keeps at most ``--max-in-flight`` of its own jobs unfinished, so the
  queue never holds more than that many backlog jobs ahead of a live one; it pauses on 429/503
  for the ``Retry-After`` the service gives (and on connection errors, with back-off);
- **resumable**: a checkpoint of JSON lines (append-only, flushed per line) records each item's
  key (the file's path relative to the folder, or ``study/series/instance`` UIDs from QIDO),
  its job and its final outcome; a new run skips finished items, polls submitted ones again
  and retries failed ones only with ``--retry-failed``. The service scores an instance UID
  once, so sending one twice is safe;
- **no PHI**: the checkpoint and the output hold UIDs, relative paths, job ids, triage classes
  and the API's error codes and messages; no patient attribute is ever read or written.

HTTP only: no Redis, no model, no torch. The QIDO source needs dicomweb-client (a core
dependency of the service).
"""

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Protocol

import httpx

DICOM_MEDIA_TYPE = "application/dicom"
DEFAULT_MODALITIES = ("CR", "DX")
# Final outcomes in the checkpoint; "submitted" is the one state that is not final.
DONE, FAILED, SKIPPED, SUBMITTED = "done", "failed", "skipped", "submitted"
FINAL = frozenset({DONE, FAILED, SKIPPED})
# Media Storage SOP classes that never hold an image to score: DICOMDIR, SR, presentation states.
NON_IMAGE_CLASSES = ("1.2.840.10008.1.3.10", "1.2.840.10008.5.1.4.1.1.88.", "1.2.840.10008.5.1.4.1.1.11.")
POLL_FIRST_S, POLL_MAX_S = 0.25, 2.0
BACKOFF_MAX_S = 30.0
QIDO_PAGE = 500
UNREACHABLE_GIVE_UP_S = 300.0  # the service unreachable this long: stop, the checkpoint resumes


class BacklogError(Exception):
    """A problem with the run as a whole (not one item): wrong checkpoint, rejected API key, …"""

    def __init__(self, message: str, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage  # a usage error (exit 2) rather than a failed run (exit 1)


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Item:
    """One instance of the archive. ``load`` returns its DICOM Part 10 bytes; ``check`` (when
    given) reads just enough to say why it must be skipped, or None to score it."""

    key: str
    load: Callable[[], bytes]
    check: Callable[[], str | None] | None = None


class Source(Protocol):
    identity: str  # what the checkpoint belongs to (hashed into its default name)
    label: str  # PHI-free description for the output
    total: int | None  # items the source will yield, when known before it is read
    skipped_outside: int  # skipped without ever being an Item (series of other modalities)

    def items(self) -> Iterator[Item]: ...


def is_dicom(path: Path) -> bool:
    """A DICOM Part 10 file: 128-byte preamble then "DICM"."""
    try:
        with path.open("rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _header_skip_reason(path: Path, modalities: frozenset[str] | None) -> str | None:
    """Why a DICOM file is not a radiograph to score, from its header (no pixels read). A header
    that does not parse is not skipped: the service reports what is wrong with the file."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality", "SOPClassUID"])
    except (InvalidDicomError, OSError, EOFError, ValueError):
        return None
    sop_class = str(getattr(ds.file_meta, "MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", ""))
    if sop_class.startswith(NON_IMAGE_CLASSES):
        return "not an image (DICOMDIR, SR or presentation state)"
    modality = str(ds.get("Modality", "") or "")
    if modalities is not None and modality and modality not in modalities:
        return f"modality {modality}"
    return None


class FolderSource:
    """Every file under ``root`` (recursive, sorted, symbolic links not followed); DICOM files
    by their "DICM" preamble, anything else skipped and counted."""

    def __init__(self, root: Path, modalities: frozenset[str] | None, exclude: Path | None = None) -> None:
        if not root.is_dir():
            raise BacklogError(f"{root} is not a folder", usage=True)
        self.root = root.resolve()
        self.modalities = modalities
        self.identity = folder_identity(root)
        self.label = "folder"
        self.skipped_outside = 0
        skip = exclude.resolve() if exclude is not None else None
        self.files = [p for p in self._walk() if p != skip]
        self.total: int | None = len(self.files)

    def _walk(self) -> Iterator[Path]:
        for top, dirs, files in os.walk(self.root):
            dirs.sort()
            for name in sorted(files):
                yield Path(top) / name

    def items(self) -> Iterator[Item]:
        for path in self.files:
            yield Item(path.relative_to(self.root).as_posix(), path.read_bytes, self._check(path))

    def _check(self, path: Path) -> Callable[[], str | None]:
        def check() -> str | None:
            if not is_dicom(path):
                return "not DICOM"
            return _header_skip_reason(path, self.modalities)

        return check


def folder_identity(root: Path) -> str:
    return f"folder:{root.resolve()}"


def qido_identity(url: str, modalities: frozenset[str] | None, study_date: str | None) -> str:
    return f"qido:{url.rstrip('/')}|{','.join(sorted(modalities or []))}|{study_date or ''}"


def _value(attrs: dict[str, Any], tag: str) -> str:
    values = attrs.get(tag, {}).get("Value") or [""]
    return str(values[0])


class QidoSource:
    """CR/DX instances of the studies a QIDO-RS search finds on a DICOMweb server, each fetched
    with WADO-RS when its turn comes (in its stored transfer syntax, no transcoding asked)."""

    def __init__(
        self,
        url: str,
        modalities: frozenset[str] | None,
        study_date: str | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float = 60.0,
    ) -> None:
        import requests
        from dicomweb_client.api import DICOMwebClient

        session = requests.Session()
        if auth is not None:
            session.auth = auth
        self.client = DICOMwebClient(url.rstrip("/"), session=session, timeout=timeout)
        self.modalities = modalities
        self.study_date = study_date
        self.identity = qido_identity(url, modalities, study_date)
        self.label = "QIDO-RS"
        self.total: int | None = None
        self.skipped_outside = 0
        self.studies_found = 0
        self._lock = threading.Lock()  # one DICOMweb call at a time: gentle on the PACS, safe for requests

    def _search(self, level: str, *uids: str, filters: dict[str, str] | None = None) -> list[dict[str, Any]]:
        """Every match of one QIDO-RS search, page by page (``limit``/``offset``). Not
        dicomweb-client's ``get_remaining``: against a server that ignores ``offset`` (Orthanc
        1.10) it never ends. A page that brings nothing new ends the search too."""
        search = getattr(self.client, f"search_for_{level}")
        key = {"studies": "0020000D", "series": "0020000E", "instances": "00080018"}[level]
        found: dict[str, dict[str, Any]] = {}
        while True:
            with self._lock:
                page = search(*uids, limit=QIDO_PAGE, offset=len(found), search_filters=filters)
            new = {_value(m, key): m for m in page if _value(m, key) not in found}
            found.update(new)
            if len(page) < QIDO_PAGE or not new:
                return list(found.values())

    def _studies(self) -> list[str]:
        queries: list[dict[str, str]] = []
        for modality in sorted(self.modalities) if self.modalities else [""]:
            filters = {"ModalitiesInStudy": modality} if modality else {}
            if self.study_date:
                filters["StudyDate"] = self.study_date
            queries.append(filters)
        seen: dict[str, None] = {}
        for filters in queries:
            for study in self._search("studies", filters=filters):
                seen.setdefault(_value(study, "0020000D"), None)
        return [uid for uid in seen if uid]

    def items(self) -> Iterator[Item]:
        studies = self._studies()
        self.studies_found = len(studies)
        for study in studies:
            for one in self._search("series", study):
                series_uid, modality = _value(one, "0020000E"), _value(one, "00080060")
                if self.modalities is not None and modality not in self.modalities:
                    self.skipped_outside += int(_value(one, "00201209") or 1)
                    continue
                for instance in self._search("instances", study, series_uid):
                    sop = _value(instance, "00080018")
                    yield Item(f"{study}/{series_uid}/{sop}", self._loader(study, series_uid, sop))

    def _loader(self, study: str, series: str, sop: str) -> Callable[[], bytes]:
        def load() -> bytes:
            from io import BytesIO

            with self._lock:
                ds = self.client.retrieve_instance(study, series, sop, media_types=((DICOM_MEDIA_TYPE, "*"),))
            buf = BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            return buf.getvalue()

        return load


# --------------------------------------------------------------------------- checkpoint


def default_checkpoint(identity: str, folder: Path | None = None) -> Path:
    digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
    return (folder or Path.cwd()) / f".cxr-backlog-{digest}.jsonl"


class Checkpoint:
    """Append-only JSON lines: a header naming the source (by hash), then one line per event of
    an item (``submitted``, then ``done`` / ``failed`` / ``skipped``); the last line of a key
    is its state. A torn last line (the process killed mid-write) is ignored. Locked: a second
    run on the same checkpoint is refused."""

    def __init__(self, path: Path, identity: str) -> None:
        self.path = path
        self.source_hash = hashlib.sha256(identity.encode()).hexdigest()[:16]
        self.state: dict[str, dict[str, Any]] = {}
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = path.open("a+", encoding="utf-8")
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            self._file.close()
            raise BacklogError(f"{path} is in use by another backlog run", usage=True) from exc
        self._file.seek(0)
        text = self._file.read()
        header = None
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "key" in entry:
                self.state[entry["key"]] = entry
            elif entry.get("event") == "start" and header is None:
                header = entry
        if header is not None and header.get("source") != self.source_hash:
            self._file.close()
            raise BacklogError(f"{path} is the checkpoint of another source; pass another --checkpoint", True)
        self.resumed = bool(self.state)
        if text and not text.endswith("\n"):  # a line torn by a kill: end it
            self._file.write("\n")
        self._write({"event": "start", "source": self.source_hash, "time": _now()})

    def _write(self, entry: dict[str, Any]) -> None:
        self._file.write(json.dumps(entry, separators=(",", ":")) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def record(self, key: str, event: str, **fields: Any) -> None:
        entry = {"key": key, "event": event, **{k: v for k, v in fields.items() if v is not None}}
        entry["time"] = _now()
        self._write(entry)
        self.state[key] = entry

    def counts(self) -> dict[str, int]:
        out = {DONE: 0, FAILED: 0, SKIPPED: 0, SUBMITTED: 0}
        for entry in self.state.values():
            out[entry["event"]] = out.get(entry["event"], 0) + 1
        return out

    def failures(self) -> list[dict[str, Any]]:
        return [e for e in self.state.values() if e["event"] == FAILED]

    def close(self) -> None:
        self._file.close()


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- the run


@dataclass(frozen=True)
class Options:
    server: str = "http://127.0.0.1:8000"
    api_key: str | None = None
    max_in_flight: int = 2
    limit: int | None = None  # items to send in this run (then stop; the checkpoint resumes)
    retry_failed: bool = False
    model: str | None = None
    poll_first_s: float = POLL_FIRST_S
    poll_max_s: float = POLL_MAX_S
    request_timeout_s: float = 300.0


@dataclass
class Tally:
    """This run's counts (the checkpoint holds the whole archive's)."""

    done: int = 0
    failed: int = 0
    skipped: int = 0
    from_checkpoint: int = 0  # finished in an earlier run
    sent: int = 0
    started: float = field(default_factory=time.monotonic)
    interrupted: bool = False
    stopped_by_limit: bool = False
    fatal: str | None = None
    fatal_usage: bool = False

    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.started, 1e-9)


class ItemFailed(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


class _Resubmit(Exception):
    """The service no longer knows the job (e.g. its Redis was replaced): send the item again."""


class Fatal(Exception):
    def __init__(self, message: str, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


def _error_of(response: httpx.Response) -> tuple[str, str]:
    try:
        error = response.json()["error"]
        return str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        return f"http_{response.status_code}", response.text[:200]


def _retry_after(response: httpx.Response, default: float) -> float:
    try:
        return max(0.1, float(response.headers.get("Retry-After", default)))
    except ValueError:
        return default


class Backlog:
    """Drives one run: reads the source, keeps ``max_in_flight`` jobs unfinished, records every
    outcome in the checkpoint. ``on_change`` is called after every count change (progress)."""

    def __init__(
        self,
        source: Source,
        checkpoint: Checkpoint,
        options: Options,
        on_change: Callable[["Backlog"], None] | None = None,
    ) -> None:
        self.source, self.checkpoint, self.options = source, checkpoint, options
        self.on_change = on_change or (lambda _: None)
        self.tally = Tally()
        self.seen = 0  # items looked at (progress position)
        self._pause_until = 0.0
        self._unreachable_since: float | None = None
        self._load_lock = asyncio.Lock()

    # ---------------------------------------------------------------- entry point

    def run(self) -> Tally:
        """Run until the source is exhausted, ``limit`` items were sent, SIGINT/SIGTERM, or a
        fatal error; every finished item is in the checkpoint either way."""
        try:
            asyncio.run(self._main())
        except KeyboardInterrupt:  # a second Ctrl-C while stopping
            self.tally.interrupted = True
        return self.tally

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def interrupt() -> None:
            self.tally.interrupted = True
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, interrupt)
        headers = {"X-API-Key": self.options.api_key} if self.options.api_key else {}
        timeout = httpx.Timeout(self.options.request_timeout_s, connect=10.0)
        limits = httpx.Limits(max_connections=self.options.max_in_flight + 2)
        tasks: set[asyncio.Task[None]] = set()
        try:
            async with httpx.AsyncClient(
                base_url=self.options.server.rstrip("/"), headers=headers, timeout=timeout, limits=limits
            ) as http:
                producer = asyncio.create_task(self._produce(http, tasks, stop))
                stopper = asyncio.create_task(stop.wait())
                await asyncio.wait({producer, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if not producer.done():  # interrupted or a fatal error: stop now, resume later
                    producer.cancel()
                    for task in tasks:
                        task.cancel()
                    await asyncio.gather(producer, *tasks, return_exceptions=True)
                else:
                    stopper.cancel()
                    producer.result()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.remove_signal_handler(sig)

    async def _produce(
        self, http: httpx.AsyncClient, tasks: set[asyncio.Task[None]], stop: asyncio.Event
    ) -> None:
        slots = asyncio.Semaphore(self.options.max_in_flight)
        iterator = self.source.items()
        while True:
            item = await asyncio.to_thread(next, iterator, None)
            if item is None:
                break
            self.seen += 1
            previous = self.checkpoint.state.get(item.key)
            if previous is not None and self._finished(previous):
                self.tally.from_checkpoint += 1
                self.on_change(self)
                continue
            if item.check is not None and previous is None:
                reason = await asyncio.to_thread(item.check)
                if reason is not None:
                    self.checkpoint.record(item.key, SKIPPED, reason=reason)
                    self.tally.skipped += 1
                    self.on_change(self)
                    continue
            if self.options.limit is not None and self.tally.sent >= self.options.limit:
                self.tally.stopped_by_limit = True
                self.seen -= 1
                break
            await slots.acquire()
            self.tally.sent += 1
            task = asyncio.create_task(self._one(http, item, previous, stop))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            task.add_done_callback(lambda _: slots.release())
        await asyncio.gather(*list(tasks))

    def _finished(self, entry: dict[str, Any]) -> bool:
        event = entry["event"]
        return event in (DONE, SKIPPED) or (event == FAILED and not self.options.retry_failed)

    # ---------------------------------------------------------------- one item

    async def _one(
        self, http: httpx.AsyncClient, item: Item, previous: dict[str, Any] | None, stop: asyncio.Event
    ) -> None:
        try:
            job = None
            if previous is not None and previous["event"] == SUBMITTED:
                job = (previous["job_id"], previous["status_url"])  # submitted earlier: follow it
            for _ in range(3):
                if job is None:
                    job = await self._submit(http, item)
                try:
                    outcome = await self._follow(http, *job)
                    break
                except _Resubmit:
                    job = None
            else:
                raise ItemFailed("job_lost", "the service lost the job three times; see its logs")
        except ItemFailed as exc:
            self.checkpoint.record(item.key, FAILED, code=exc.code, message=exc.message)
            self.tally.failed += 1
        except Fatal as exc:
            self.tally.fatal, self.tally.fatal_usage = str(exc), exc.usage
            stop.set()
            return
        else:
            self.checkpoint.record(item.key, DONE, **outcome)
            self.tally.done += 1
        self.on_change(self)

    async def _wait_pause(self) -> None:
        while (delay := self._pause_until - time.monotonic()) > 0:
            await asyncio.sleep(delay)

    def _pause(self, seconds: float) -> None:
        self._pause_until = max(self._pause_until, time.monotonic() + seconds)

    def _unreachable(self, exc: Exception, attempt: int) -> None:
        now = time.monotonic()
        self._unreachable_since = self._unreachable_since or now
        if now - self._unreachable_since > UNREACHABLE_GIVE_UP_S:
            raise Fatal(f"the service at {self.options.server} is unreachable ({type(exc).__name__})")
        self._pause(min(BACKOFF_MAX_S, 0.5 * 2**attempt))

    async def _submit(self, http: httpx.AsyncClient, item: Item) -> tuple[str, str]:
        async with self._load_lock:  # one file / one WADO-RS retrieve at a time
            try:
                data = await asyncio.to_thread(item.load)
            except OSError as exc:
                raise ItemFailed("unreadable", f"could not read the file: {exc.strerror or exc}") from exc
            except Exception as exc:  # a WADO-RS retrieve that fails
                raise ItemFailed("retrieve_failed", f"WADO-RS retrieve failed: {type(exc).__name__}") from exc
        params = {"priority": "backfill"}
        if self.options.model:
            params["model"] = self.options.model
        attempt = 0
        while True:
            await self._wait_pause()
            try:
                response = await http.post(
                    "/v1/studies", params=params, content=data, headers={"Content-Type": DICOM_MEDIA_TYPE}
                )
            except httpx.TransportError as exc:
                self._unreachable(exc, attempt)
                attempt += 1
                continue
            self._unreachable_since = None
            if response.status_code == 202:
                body = response.json()
                self.checkpoint.record(
                    item.key,
                    SUBMITTED,
                    job_id=body["job_id"],
                    status_url=body["status_url"],
                    study_uid=body["study_uid"],
                    instance_uid=body["instance_uid"],
                    duplicate=body.get("duplicate"),
                )
                return body["job_id"], body["status_url"]
            code, message = _error_of(response)
            if response.status_code in (429, 503):
                self._pause(_retry_after(response, min(BACKOFF_MAX_S, 2.0**attempt)))
                attempt += 1
                continue
            if response.status_code in (401, 403):
                raise Fatal(
                    f"the service refused the API key ({code}): pass --api-key or set CXR_API_KEY", True
                )
            raise ItemFailed(code, message)

    async def _follow(self, http: httpx.AsyncClient, job_id: str, status_url: str) -> dict[str, Any]:
        """Poll the study until this job is done or failed; returns what the checkpoint keeps."""
        interval, attempt = self.options.poll_first_s, 0
        while True:
            await asyncio.sleep(interval)
            await self._wait_pause()
            interval = min(self.options.poll_max_s, interval * 1.5)
            try:
                response = await http.get(status_url)
            except httpx.TransportError as exc:
                self._unreachable(exc, attempt)
                attempt += 1
                continue
            self._unreachable_since = None
            if response.status_code == 404:
                raise _Resubmit
            if response.status_code in (429, 503):
                self._pause(_retry_after(response, 1.0))
                continue
            if response.status_code in (401, 403):
                raise Fatal("the service refused the API key: pass --api-key or set CXR_API_KEY", True)
            if response.status_code != 200:
                code, message = _error_of(response)
                raise ItemFailed(code, message)
            study = response.json()
            mine = [i for i in study.get("instances", []) if i.get("job_id") == job_id]
            if not mine:
                raise _Resubmit
            instance = mine[0]
            if instance["status"] == DONE:
                prediction = instance.get("prediction") or {}
                model = prediction.get("model") or {}
                return {
                    "job_id": job_id,
                    "study_uid": study.get("study_uid"),
                    "instance_uid": instance.get("instance_uid"),
                    "triage": prediction.get("triage"),
                    "abnormality_score": prediction.get("abnormality_score"),
                    "model": f"{model.get('name')}/{model.get('version')}" if model else None,
                }
            if instance["status"] == FAILED:
                error = instance.get("error") or {}
                raise ItemFailed(str(error.get("code", "failed")), str(error.get("message", "")))


# --------------------------------------------------------------------------- the command


def parse_modalities(text: str) -> frozenset[str] | None:
    """ "CR,DX" -> {"CR", "DX"}; "any" (or empty) -> None: every modality is sent."""
    names = {m.strip().upper() for m in text.split(",") if m.strip()}
    return None if not names or names == {"ANY"} else frozenset(names)


def preflight(options: Options) -> None:
    """Is there a cxr-triage at ``server``, and does it take the key? (BacklogError otherwise.)"""
    headers = {"X-API-Key": options.api_key} if options.api_key else {}
    url = f"{options.server.rstrip('/')}/v1/models"
    try:
        response = httpx.get(url, headers=headers, timeout=30)
    except httpx.HTTPError as exc:
        raise BacklogError(f"no cxr-triage answers at {options.server} ({type(exc).__name__})", True) from exc
    if response.status_code in (401, 403):
        raise BacklogError("the service refused the API key: pass --api-key or set CXR_API_KEY", True)
    if response.status_code != 200:
        code, message = _error_of(response)
        raise BacklogError(f"{options.server} answered {response.status_code} ({code}): {message}", True)


def run_command(
    console: Any,
    folder: Path | None,
    qido: str | None,
    modalities: str,
    study_date: str | None,
    checkpoint: Path | None,
    options: Options,
    pacs_auth: tuple[str, str] | None = None,
) -> int:
    """``cxr-triage backlog``: exit 0 all scored (or --limit reached without a failure), 1 some
    failed (or the run stopped on an error), 2 usage error, 130 interrupted."""
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if (folder is None) == (qido is None):
        console.print("[red]give a FOLDER or --qido URL (one of them)[/]")
        return 2
    if options.max_in_flight < 1:
        console.print("[red]--max-in-flight must be at least 1[/]")
        return 2
    mods = parse_modalities(modalities)
    identity = folder_identity(folder) if folder is not None else qido_identity(str(qido), mods, study_date)
    checkpoint = checkpoint or default_checkpoint(identity)
    try:
        preflight(options)
        source: Source = (
            FolderSource(folder, mods, exclude=checkpoint)
            if folder is not None
            else QidoSource(str(qido), mods, study_date, pacs_auth)
        )
        state = Checkpoint(checkpoint, identity)
    except BacklogError as exc:
        console.print(f"[red]error[/]: {escape(str(exc))}")
        return 2 if exc.usage else 1
    if state.resumed:
        done = state.counts()
        console.print(
            f"resuming from {checkpoint.name}: {done[DONE]} scored, {done[FAILED]} failed, "
            f"{done[SKIPPED]} skipped, {done[SUBMITTED]} submitted and unfinished"
        )
    progress = Progress(
        TextColumn(f"backlog ({source.label}) at backfill"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[counts]}"),
        TimeElapsedColumn(),
        console=console,
    )
    task = progress.add_task("backlog", total=source.total, counts="")

    def on_change(run: Backlog) -> None:
        t = run.tally
        skipped = t.skipped + run.source.skipped_outside
        progress.update(
            task,
            total=run.source.total,
            completed=t.done + t.failed + skipped + t.from_checkpoint,
            counts=f"done {t.done} · failed {t.failed} · skipped {skipped} · earlier {t.from_checkpoint}"
            f" · {t.rate():.2f} instances/s",
        )

    backlog = Backlog(source, state, options, on_change)
    try:
        with progress:
            on_change(backlog)
            tally = backlog.run()
            on_change(backlog)
    except Exception as exc:  # a QIDO search that fails, …: what is recorded stays recorded
        state.close()
        console.print(f"[red]the backlog stopped[/]: {type(exc).__name__}: {escape(str(exc))[:300]}")
        console.print(f"resume: run the same command again (checkpoint {checkpoint})")
        return 1
    state.close()
    return _summary(console, tally, backlog, state, checkpoint)


def _summary(console: Any, tally: Tally, backlog: Backlog, state: Checkpoint, checkpoint: Path) -> int:
    from rich.markup import escape

    seconds = time.monotonic() - tally.started
    skipped = tally.skipped + backlog.source.skipped_outside
    console.print(
        f"this run: {tally.done} scored, {tally.failed} failed, {skipped} skipped, "
        f"{tally.from_checkpoint} finished earlier; {tally.rate():.2f} instances/s over {seconds:.0f} s"
    )
    counts = state.counts()
    console.print(
        f"checkpoint {checkpoint}: {counts[DONE]} scored, {counts[FAILED]} failed, "
        f"{counts[SKIPPED]} skipped, {counts[SUBMITTED]} submitted and unfinished"
    )
    failures = state.failures()
    for entry in failures[:20]:
        message = escape(entry.get("message", ""))
        console.print(f"  [red]failed[/] {escape(entry['key'])}: {entry.get('code')} — {message}")
    if len(failures) > 20:
        console.print(f"  … and {len(failures) - 20} more (the checkpoint lists them)")
    if failures:
        console.print("fix or remove those, then run again with --retry-failed to send them again")
    resume = f"resume: run the same command again (checkpoint {checkpoint})"
    if tally.fatal:
        console.print(f"[red]stopped[/]: {escape(tally.fatal)}")
        console.print(resume)
        return 2 if tally.fatal_usage else 1
    if tally.interrupted:
        console.print(f"[yellow]interrupted[/]; {resume}")
        return 130
    if tally.stopped_by_limit:
        console.print(f"stopped after --limit {backlog.options.limit} items; {resume}")
    return 1 if failures else 0
