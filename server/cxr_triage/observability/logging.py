"""Structured JSON logs (python-json-logger) with the request id of the request being served.

Never log PHI: messages name jobs and request ids, never patient attributes or UIDs.
"""

import logging
import re
import sys
import uuid
from contextvars import ContextVar

from pythonjsonlogger.json import JsonFormatter

REQUEST_ID: ContextVar[str] = ContextVar("request_id", default="")
_WELL_FORMED = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def request_id_for(given: str) -> str:
    """The caller's X-Request-ID when well formed (it lands in logs and bodies), else a new one."""
    return given if _WELL_FORMED.match(given) else uuid.uuid4().hex


class _RequestId(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = REQUEST_ID.get()
        return True


def configure(level: str) -> None:
    """One JSON line per record on stderr: time, level, logger, message, request_id, process."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestId())
    handler.setFormatter(
        JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s %(request_id)s %(process)d",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
