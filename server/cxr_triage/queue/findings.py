"""Findings added at run time to a zero-shot (gzsl) model version, kept in Redis.

Redis, not the version folder: every replica sees a finding the moment it is added (the model
repository is mounted read-only in Kubernetes), and it survives restarts with the queue's own
persistence (append-only file). One hash per model version, one field per finding::

    cxr:findings:<model>:<version>   label -> JSON {label, description, text, latent, seq,
                                                     added_at, threshold, operating_point}
    cxr:findings:rev                 bumped on every change; workers re-read when it moves

A latent belongs to the version whose text tower made it, so each version keeps its own.
"""

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import numpy as np
import redis
from redis.client import Pipeline

REVISION = "cxr:findings:rev"


def findings_key(model: str, version: str) -> str:
    return f"cxr:findings:{model}:{version}"


@dataclass(frozen=True)
class AddedFinding:
    """A finding the model was never trained on, added by name (and description)."""

    label: str
    description: str | None
    text: str  # what the text encoder read (engines.gzsl.label_text)
    latent: tuple[float, ...]
    seq: int = 0  # order of addition: results list added findings in this order
    added_at: str = ""
    threshold: float | None = None
    operating_point: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {
                "label": self.label,
                "description": self.description,
                "text": self.text,
                "latent": list(self.latent),
                "seq": self.seq,
                "added_at": self.added_at,
                "threshold": self.threshold,
                "operating_point": self.operating_point,
            }
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> "AddedFinding":
        d = json.loads(raw)
        return cls(
            label=d["label"],
            description=d.get("description"),
            text=d.get("text", ""),
            latent=tuple(float(x) for x in d["latent"]),
            seq=int(d.get("seq", 0)),
            added_at=d.get("added_at", ""),
            threshold=d.get("threshold"),
            operating_point=d.get("operating_point") or {},
        )

    def public(self, version: str) -> dict[str, Any]:
        """What the API shows of it (not the latent)."""
        return {
            "label": self.label,
            "description": self.description,
            "version": version,
            "unseen": True,
            "threshold": self.threshold,
            "operating_point": self.operating_point or None,
            "added_at": self.added_at,
        }


class FindingStore:
    def __init__(self, client: redis.Redis) -> None:
        self.r = client

    def revision(self) -> int:
        return int(self.r.get(REVISION) or 0)

    def list(self, model: str, version: str) -> list[AddedFinding]:
        """The version's added findings, in the order they were added."""
        found = [AddedFinding.from_json(v) for v in self.r.hvals(findings_key(model, version))]
        return sorted(found, key=lambda f: (f.seq, f.label))

    def get(self, model: str, version: str, label: str) -> AddedFinding | None:
        raw = self.r.hget(findings_key(model, version), label)
        return AddedFinding.from_json(raw) if raw is not None else None

    def add(self, model: str, versions: Mapping[str, AddedFinding]) -> bool:
        """Add one finding to several versions of ``model`` at once (all or none).

        Returns False, changing nothing, when any of them already has a finding of that label.
        """
        labels = {f.label for f in versions.values()}
        if len(labels) != 1:
            raise ValueError(f"one finding at a time; got labels {sorted(labels)}")
        (label,) = labels
        keys = [findings_key(model, v) for v in versions]

        def add(pipe: Pipeline) -> bool:
            if any(pipe.hexists(k, label) for k in keys):
                return False
            seq = int(pipe.get(REVISION) or 0) + 1
            now = datetime.now(UTC).isoformat(timespec="seconds")
            pipe.multi()
            for key, finding in zip(keys, versions.values(), strict=True):
                pipe.hset(key, label, replace(finding, seq=seq, added_at=now).to_json())
            pipe.incr(REVISION)
            return True

        return bool(self.r.transaction(add, *keys, REVISION, value_from_callable=True))

    def remove(self, model: str, versions: Sequence[str], label: str) -> bool:
        """Remove ``label`` from these versions; False if none had it."""
        with self.r.pipeline() as pipe:
            for v in versions:
                pipe.hdel(findings_key(model, v), label)
            removed = sum(pipe.execute())
        if removed:
            self.r.incr(REVISION)
        return bool(removed)

    def set_operating_point(
        self, model: str, version: str, label: str, threshold: float | None, evidence: Mapping[str, Any]
    ) -> AddedFinding | None:
        """Set (or, with None, clear) one version's operating point for an added finding."""
        key = findings_key(model, version)

        def update(pipe: Pipeline) -> AddedFinding | None:
            raw = pipe.hget(key, label)
            if raw is None:
                return None
            point = dict(evidence) if threshold is not None else {}
            new = replace(AddedFinding.from_json(raw), threshold=threshold, operating_point=point)
            pipe.multi()
            pipe.hset(key, label, new.to_json())
            pipe.incr(REVISION)
            return new

        found: AddedFinding | None = self.r.transaction(update, key, value_from_callable=True)
        return found


def latents_of(findings: Sequence[AddedFinding], dim: int) -> np.ndarray:
    """(len(findings), dim) float32 matrix of the findings' latents."""
    if not findings:
        return np.zeros((0, dim), np.float32)
    matrix = np.asarray([f.latent for f in findings], dtype=np.float32)
    if matrix.shape != (len(findings), dim):
        raise ValueError(f"stored latents have shape {matrix.shape}, the version's are {dim}-d")
    return matrix
