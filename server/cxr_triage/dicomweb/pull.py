"""Pull studies from a PACS that cannot push: WADO-RS retrieve, and a QIDO-RS poller for new CR/DX.

Retrieved instances go through the same decoding and job building as uploads
(``serving.intake.make_job``): CR/DX only, priority from DICOM tags, one job per instance,
duplicates not scored twice.
"""

import logging
import time
from datetime import UTC, datetime, timedelta
from io import BytesIO
from typing import Any

import redis
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset

from cxr_triage import imaging
from cxr_triage.dicomweb.stow import PROJECTION_MODALITIES
from cxr_triage.errors import CxrError
from cxr_triage.imaging import ImageLimits
from cxr_triage.queue import JobQueue
from cxr_triage.repository import ModelRepository
from cxr_triage.serving.intake import make_job

log = logging.getLogger(__name__)
SEEN, LAST_POLL = "cxr:pacs:seen", "cxr:pacs:last_poll"


class PacsPuller:
    def __init__(
        self, pacs: DICOMwebClient, queue: JobQueue, repo: ModelRepository, limits: ImageLimits
    ) -> None:
        self.pacs, self.queue, self.repo, self.limits = pacs, queue, repo, limits

    def pull_study(self, study_uid: str, request_id: str = "pacs-pull") -> list[dict[str, Any]]:
        """Retrieve one study (WADO-RS) and queue its instances; one outcome per instance."""
        model = self.repo.get(None)
        outcomes = []
        for ds in self.pacs.retrieve_study(study_uid):
            outcomes.append(self._queue_instance(ds, model.name, model.config.input, request_id))
        return outcomes

    def _queue_instance(self, ds: Dataset, name: str, spec: Any, request_id: str) -> dict[str, Any]:
        uid = str(ds.get("SOPInstanceUID", ""))
        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        data = buf.getvalue()
        try:
            prepared = imaging.prepare(data, "application/dicom", spec, self.limits)
            job = make_job(data, prepared, name, None, True, ("", ""), request_id, PROJECTION_MODALITIES)
            submitted = self.queue.submit(job)
        except CxrError as exc:
            return {"instance_uid": uid, "error": exc.to_dict()}
        return {"instance_uid": uid, "job_id": submitted.job_id, "duplicate": submitted.duplicate}

    def poll_once(self, client: redis.Redis) -> int:
        """Pull every CR/DX study the PACS shows since the last poll (a day's overlap, minus the
        studies already seen). Returns how many studies were pulled."""
        since = float(client.get(LAST_POLL) or time.time() - 86400)
        date = (datetime.fromtimestamp(since, UTC) - timedelta(days=1)).strftime("%Y%m%d")
        started = time.time()
        pulled = 0
        for modality in sorted(PROJECTION_MODALITIES):
            filters = {"ModalitiesInStudy": modality, "StudyDate": f"{date}-"}
            found = self.pacs.search_for_studies(search_filters=filters)
            for study in found:
                uid = study["0020000D"]["Value"][0]
                if client.sadd(SEEN, uid):
                    self.pull_study(uid, request_id="pacs-poll")
                    pulled += 1
        client.set(LAST_POLL, started)
        return pulled
