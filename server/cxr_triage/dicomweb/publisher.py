"""Store each finished study's SR back to the PACS (STOW-RS), from an outbox in Redis.

The queue's COMPLETE script pushes a study to ``cxr:outbox:sr`` when its last job finishes.
This process moves it to a working list (LMOVE, so a crash loses nothing: the working list is
requeued at start), writes the SR with highdicom, stores it with dicomweb-client and only
then drops it; a PACS that is down is retried with back-off.
"""

import logging
import time
from io import BytesIO

import pydicom
import redis
import requests
from dicomweb_client.api import DICOMwebClient
from dicomweb_client.session_utils import create_session_from_user_pass

from cxr_triage.config import Settings
from cxr_triage.dicomweb.sr import build_sr
from cxr_triage.queue import JobQueue, RedisHandle
from cxr_triage.queue.studies import StudyStore
from cxr_triage.repository import ModelRepository

log = logging.getLogger(__name__)
OUTBOX, WORKING = "cxr:outbox:sr", "cxr:outbox:sr:working"


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
        except (requests.RequestException, OSError, ValueError) as exc:
            log.warning("storing the SR of a study failed (%s); retrying later", type(exc).__name__)
            self.r.lmove(WORKING, OUTBOX, "RIGHT", "RIGHT")
            time.sleep(2.0)
            return True
        self.r.lrem(WORKING, 1, study)
        return True

    def publish(self, uid: str) -> None:
        found = self.store.study(uid)
        if not found or not found["result"]:
            log.info("study has no scored image; no SR written")
            return
        done = [i["job_id"] for i in found["instances"] if i["status"] == "done"]
        headers = [pydicom.dcmread(BytesIO(h)) for h in self.queue.headers(done) if h]
        if not headers:
            log.info("study was not DICOM; no SR written")
            return
        self.pacs.store_instances([build_sr(headers, found["result"])])
        log.info("SR stored to the PACS")


def run_pacs_worker(settings: Settings) -> None:
    """Entry point of the PACS process (spawned by the service when CXR_PACS_URL is set): stores
    SRs from the outbox (unless CXR_PACS_STORE_SR=false) and polls for new studies when
    CXR_PACS_POLL_S > 0."""
    from cxr_triage.dicomweb.pull import PacsPuller
    from cxr_triage.imaging import ImageLimits

    log_format = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=settings.log_level.upper(), format=log_format)
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
