"""Studies, the worklist and radiologists' reports, read from and written to Redis."""

import json
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import redis

from cxr_triage.queue.jobs import _text, job_key
from cxr_triage.triage.scoring import strength
from cxr_triage.triage.study import combine
from cxr_triage.triage.worklist import rank

WORKLIST, REPORTS = b"cxr:worklist", b"cxr:reports"
CriticalOf = Callable[[str], Sequence[str]]


def study_status(statuses: Sequence[str]) -> str:
    """queued | running | done | failed for a study from its jobs' statuses."""
    states = set(statuses)
    if states <= {"queued"}:
        return "queued"
    if states & {"queued", "running"}:
        return "running"
    return "failed" if states == {"failed"} else "done"


class StudyStore:
    def __init__(self, client: redis.Redis, critical_of: CriticalOf) -> None:
        self.r = client
        self.critical_of = critical_of

    def study(self, uid: str) -> dict[str, Any] | None:
        """Status, per-instance outcomes and, once any image is scored, the study result."""
        info = _text(self.r.hgetall(f"cxr:study:{uid}"))
        if not info:
            return None
        jobs = self._jobs(uid)
        instances = [_instance(j) for j in jobs]
        done = [i["prediction"] for i in instances if "prediction" in i]
        result = None
        if done:
            model = done[0]["model"]["name"]
            same = [d for d in done if d["model"]["name"] == model]
            result = {"model": done[0]["model"], **combine(same, self.critical_of(model))}
        return {
            "study_uid": uid,
            "status": study_status([i["status"] for i in instances]),
            "priority": info.get("priority", "routine"),
            "instances": instances,
            "result": result,
            "worklist": self._worklist_entry(uid, info),
            "report": self.report_of(uid),
        }

    def _jobs(self, uid: str) -> list[dict[str, str]]:
        ids = sorted(m.decode() for m in self.r.smembers(f"cxr:study:{uid}:jobs"))
        pipe = self.r.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(job_key(job_id))
        return [_text(h) for h in pipe.execute()]

    def _worklist_entry(self, uid: str, info: Mapping[str, str]) -> dict[str, Any] | None:
        place = self.r.zscore(WORKLIST, uid)
        if place is None:
            return None
        return {"place": place, "reason": info.get("place_reason", "")}

    def worklist(self, limit: int, max_wait_s: float, now: float | None = None) -> list[dict[str, Any]]:
        """Unread studies, most urgent first (see triage.worklist for the rules)."""
        now = time.time() if now is None else now
        entries = self.r.zrange(WORKLIST, 0, -1, withscores=True)
        pipe = self.r.pipeline(transaction=False)
        for uid, _ in entries:
            pipe.hgetall(b"cxr:study:" + uid)
        rows = []
        for (uid, place), raw in zip(entries, pipe.execute(), strict=True):
            info = _text(raw)
            first_seen = float(info.get("first_seen", now))
            ranked = rank(uid.decode(), place, first_seen, info.get("place_reason", ""), now, max_wait_s)
            rows.append((ranked, info))
        rows.sort(key=lambda r: (-r[0].rank, -r[0].waited_s))
        return [_worklist_row(ranked, info, self._summary(info)) for ranked, info in rows[:limit]]

    def _summary(self, info: Mapping[str, str]) -> dict[str, Any]:
        job = _text(self.r.hgetall(job_key(info["place_job"]))) if info.get("place_job") else {}
        outcome = json.loads(job["outcome"]) if job.get("outcome") else {}
        if job.get("status") == "failed":
            return {"status": "unscored", "error": outcome.get("error")}
        if not outcome:
            return {"status": "queued"}
        top = sorted(outcome["findings"], key=strength, reverse=True)[:3]
        return {
            "status": "scored",
            "triage": outcome["triage"],
            "abnormality_score": outcome["abnormality_score"],
            "top_findings": top,
            "model": outcome["model"],
        }

    def worklist_gauges(self, now: float | None = None) -> tuple[int, float]:
        """(unread studies, seconds the oldest unread abnormal-or-worse study has waited)."""
        now = time.time() if now is None else now
        size = int(self.r.zcard(WORKLIST))
        abnormal = self.r.zrangebyscore(WORKLIST, 1.5, "+inf")  # places of abnormal, critical, unscored
        pipe = self.r.pipeline(transaction=False)
        for uid in abnormal:
            pipe.hget(b"cxr:study:" + uid, "first_seen")
        seen = [float(t) for t in pipe.execute() if t is not None]
        return size, (now - min(seen)) if seen else 0.0

    def report(self, uid: str, labels: Mapping[str, bool], reader: str) -> dict[str, Any]:
        """Store final labels durably and take the study off the worklist (one MULTI)."""
        now = datetime.now(UTC).isoformat()
        record = {"study_uid": uid, "labels": dict(labels), "reader": reader, "reported_at": now}
        body = json.dumps(record)
        pipe = self.r.pipeline(transaction=True)
        pipe.set(f"cxr:report:{uid}", body)
        pipe.xadd(REPORTS, {"study_uid": uid, "report": body})
        pipe.hset(f"cxr:study:{uid}", "reported_at", record["reported_at"])
        pipe.zrem(WORKLIST, uid)
        pipe.execute()
        return record

    def report_of(self, uid: str) -> dict[str, Any] | None:
        raw = self.r.get(f"cxr:report:{uid}")
        return json.loads(raw) if raw else None

    def reports(self) -> list[dict[str, Any]]:
        """Every report ever stored, oldest first (amendments included; the last one wins)."""
        return [json.loads(fields[b"report"]) for _, fields in self.r.xrange(REPORTS)]

    def recent_reported(self, n: int) -> list[tuple[dict[str, bool], dict[str, Any]]]:
        """(labels, study result) of the ``n`` most recently reported studies that were scored."""
        latest: dict[str, dict[str, bool]] = {}
        for _, fields in self.r.xrevrange(REPORTS, count=4 * n):
            report = json.loads(fields[b"report"])
            latest.setdefault(report["study_uid"], report["labels"])
            if len(latest) >= n:
                break
        out = []
        for uid, labels in latest.items():
            found = self.study(uid)
            if found and found["result"]:
                out.append((labels, found["result"]))
        return out

    def exists(self, uid: str) -> bool:
        return bool(self.r.exists(f"cxr:study:{uid}"))


def _instance(job: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "job_id": job.get("job_id"),
        "instance_uid": job.get("instance_uid") or None,
        "status": job.get("status", "queued"),
    }
    if job.get("outcome"):
        outcome = json.loads(job["outcome"])
        out["prediction" if job.get("status") == "done" else "error"] = (
            outcome if job.get("status") == "done" else outcome.get("error")
        )
    return out


def _worklist_row(ranked: Any, info: Mapping[str, str], summary: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "study_uid": ranked.study_uid,
        "priority": info.get("priority", "routine"),
        "waiting_s": round(ranked.waited_s, 1),
        "place": round(ranked.place, 4),
        "rank": round(ranked.rank, 4),
        "reason": ranked.reason,
        **summary,
    }
