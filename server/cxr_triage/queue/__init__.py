"""The priority queue of scoring jobs on Redis (6.2 commands only), studies and the worklist."""

from cxr_triage.queue.connection import RedisHandle, connect
from cxr_triage.queue.jobs import Completion, JobQueue, LeasedJob, NewJob, SubmitResult

__all__ = ["Completion", "JobQueue", "LeasedJob", "NewJob", "RedisHandle", "SubmitResult", "connect"]
