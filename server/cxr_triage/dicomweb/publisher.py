"""Store each finished study's SR back to the PACS (STOW-RS), from an outbox in Redis.

The queue's COMPLETE script pushes a study to ``cxr:outbox:sr`` when its last job finishes.
This process moves it to a working list (LMOVE, so a crash loses nothing: the working list is
requeued at start), writes the SR with highdicom, stores it with dicomweb-client and only
then drops it; a PACS that is down is retried with back-off.
"""

import logging
import time
from collections.abc import Sequence
from io import BytesIO
from typing import Any

import pydicom
import redis
import requests
from dicomweb_client.api import DICOMwebClient
from dicomweb_client.session_utils import create_session_from_user_pass
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from cxr_triage.config import Settings
from cxr_triage.dicomweb.heatmap import heatmap_sc, overlay, top_finding
from cxr_triage.dicomweb.sr import build_sr
from cxr_triage.observability import tracing
from cxr_triage.observability.logging import configure as configure_logging
from cxr_triage.queue import JobQueue, RedisHandle
from cxr_triage.queue.studies import StudyStore
from cxr_triage.repository import ModelRepository
from cxr_triage.serving.lifecycle import name_process

log = logging.getLogger(__name__)
OUTBOX, WORKING, FAILED = "cxr:outbox:sr", "cxr:outbox:sr:working", "cxr:outbox:sr:failed"


def pacs_client(settings: Settings) -> DICOMwebClient:
    assert settings.pacs_url, "CXR_PACS_URL is not set"
    session = None
    if settings.pacs_username and settings.pacs_password:
        password = settings.pacs_password.get_secret_value()
        session = create_session_from_user_pass(settings.pacs_username, password)
    return DICOMwebClient(url=settings.pacs_url, session=session)


class SrPublisher:
    def __init__(self, client: redis.Redis, queue: JobQueue, store: StudyStore, pacs: DICOMwebClient) -> None:
        self.r, self.queue, self.store, self.pacs = client, queue, store, pacs

    def recover(self) -> None:
        while self.r.lmove(WORKING, OUTBOX, "RIGHT", "LEFT"):
            pass

    def step(self, timeout: float = 1.0) -> bool:
        """Publish one study from the outbox; False when none was waiting."""
        study = self.r.blmove(OUTBOX, WORKING, timeout, "LEFT", "RIGHT")
        if study is None:
            return False
        uid = study.decode()
        try:
            self.publish(uid)
        except (requests.RequestException, OSError) as exc:
            log.warning("storing the SR of a study failed (%s); retrying later", type(exc).__name__)
            self.r.lmove(WORKING, OUTBOX, "RIGHT", "RIGHT")
            time.sleep(2.0)
            return True
        except Exception:  # boundary: a study that cannot be written must not stop the others
            log.exception("writing the SR of a study failed; it is parked in %s", FAILED)
            self.r.lmove(WORKING, FAILED, "RIGHT", "RIGHT")
            return True
        self.r.lrem(WORKING, 1, study)
        return True

    def publish(self, uid: str) -> None:
        found = self.store.study(uid)
        if not found or not found["result"]:
            log.info("study has no scored image; no SR written")
            return
        done = [i for i in found["instances"] if i["status"] == "done"]
        raw = self.queue.headers([i["job_id"] for i in done])
        pairs = [(i, pydicom.dcmread(BytesIO(h))) for i, h in zip(done, raw, strict=True) if h]
        if not pairs:
            log.info("study was not DICOM; no SR written")
            return
        outputs = [build_sr([h for _, h in pairs], found["result"]), *self._heatmaps(pairs)]
        parent = tracing.context_of(self.queue.jobs([pairs[0][0]["job_id"]])[0])
        with tracing.span("sr store", parent, instances=len(outputs)):
            self.pacs.store_instances(outputs)
        log.info("SR and %d heatmap(s) stored to the PACS", len(outputs) - 1)

    def _heatmaps(self, pairs: Sequence[tuple[dict[str, Any], Dataset]]) -> list[Dataset]:
        series_uid, out = generate_uid(), list[Dataset]()
        for instance, header in pairs:
            stored = self.queue.heatmap(instance["job_id"])
            if stored is None or stored[1] is None:  # no CAM output (e.g. a ViT): no overlay
                continue
            index, label = top_finding(instance["prediction"])
            rgb = overlay(stored[0], stored[1][index])
            out.append(heatmap_sc(header, rgb, label, series_uid, len(out) + 1))
        return out


def run_pacs_worker(settings: Settings) -> None:
    """Entry point of the PACS process (spawned by the service when CXR_PACS_URL is set): stores
    SRs from the outbox (unless CXR_PACS_STORE_SR=false) and polls for new studies when
    CXR_PACS_POLL_S > 0."""
    from cxr_triage.dicomweb.pull import PacsPuller
    from cxr_triage.imaging import ImageLimits

    name_process("pacs")
    configure_logging(settings.log_level)
    tracing.setup_tracing(settings, "pacs-worker")
    if not settings.redis_url:
        raise RuntimeError("the PACS worker needs the service's Redis URL")
    client = RedisHandle(settings.redis_url).client()
    queue = JobQueue(client, settings.max_wait_s)
    repo = ModelRepository.load(settings.model_repo, settings.default_model, check_engines=False)
    store = StudyStore(client, lambda name: repo.get(name).config.critical_findings)
    pacs = pacs_client(settings)
    publisher = SrPublisher(client, queue, store, pacs) if settings.pacs_store_sr else None
    limits = ImageLimits(max_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels)
    puller = PacsPuller(pacs, queue, repo, limits) if settings.pacs_poll_s > 0 else None
    if publisher is not None:
        publisher.recover()
    next_poll = 0.0
    while True:
        try:
            if puller is not None and time.monotonic() >= next_poll:
                next_poll = time.monotonic() + settings.pacs_poll_s
                puller.poll_once(client)
            if publisher is None or not publisher.step(timeout=1.0):
                time.sleep(0.0 if publisher else 0.5)
        except (redis.RedisError, requests.RequestException, OSError) as exc:
            log.warning("PACS worker: %s; retrying in 2 s", type(exc).__name__)
            time.sleep(2.0)
