"""The inference worker's loop: LitServe's batching, with per-request outcomes.

LitServe's stock batched loop answers a whole batch with the first exception any request
raises. Here each request gets its own outcome, so one bad study never fails its neighbours.
This loop is also the seam where later work forms batches in priority order.
"""

import logging
from typing import Any

from fastapi import HTTPException
from litserve.loops.base import LitLoop, _StopLoopError
from litserve.utils import LitAPIStatus, LoopResponseType, PickleableHTTPException

from cxr_triage.errors import CxrError
from cxr_triage.serving.http_errors import to_http_exception

log = logging.getLogger(__name__)


class TriageLoop(LitLoop):
    def __call__(
        self,
        lit_api: Any,
        device: str,
        worker_id: int,
        request_queue: Any,
        transport: Any,
        workers_setup_status: dict[int, str],
        callback_runner: Any,
        lit_spec: Any = None,
        stream: bool = False,
    ) -> None:
        while True:
            try:
                batch, timed_out = self.get_batch_requests(lit_api, request_queue, transport)
            except _StopLoopError:
                return
            for queue_id, uid in timed_out:
                self._reply_error(
                    transport, queue_id, uid, HTTPException(504, "request timed out in the queue")
                )
            if batch:
                self._serve(lit_api, transport, batch)

    def _serve(self, lit_api: Any, transport: Any, batch: list[tuple[int, str, Any]]) -> None:
        queue_ids, uids, items = zip(*batch, strict=True)
        try:
            outcomes = lit_api.score_batch(list(items))
        except Exception:
            log.exception("batch of %d failed", len(items))
            outcomes = [CxrError("internal error while scoring; it is logged")] * len(items)
        for queue_id, uid, outcome in zip(queue_ids, uids, outcomes, strict=True):
            if isinstance(outcome, CxrError):
                self._reply_error(transport, queue_id, uid, to_http_exception(outcome))
            else:
                self.put_response(
                    transport, queue_id, uid, outcome, LitAPIStatus.OK, LoopResponseType.REGULAR
                )

    def _reply_error(self, transport: Any, queue_id: int, uid: str, exc: HTTPException) -> None:
        error = PickleableHTTPException.from_exception(exc)
        self.put_response(transport, queue_id, uid, error, LitAPIStatus.ERROR, LoopResponseType.REGULAR)
