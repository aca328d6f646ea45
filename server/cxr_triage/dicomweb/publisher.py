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


def run_publisher(settings: Settings) -> None:
    """Entry point of the publisher process (spawned by the service when a PACS is configured)."""
    log_format = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=settings.log_level.upper(), format=log_format)
    assert settings.redis_url
    client = RedisHandle(settings.redis_url).client()
    queue = JobQueue(client, settings.max_wait_s)
    repo = ModelRepository.load(settings.model_repo, settings.default_model, check_engines=False)
    store = StudyStore(client, lambda name: repo.get(name).config.critical_findings)
    publisher = SrPublisher(client, queue, store, pacs_client(settings))
    publisher.recover()
    while True:
        try:
            publisher.step()
        except redis.RedisError:
            log.exception("Redis failed; retrying in 1 s")
            time.sleep(1.0)
