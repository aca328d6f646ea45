"""Export stored reports as CSV in the ChestX-ray14 layout, plus a wide per-label table.

``Data_Entry_2017.csv`` (ChestX-ray14 columns): one row per scored image of a reported study;
``Finding Labels`` joins the labels read as present with ``|``, or says ``No Finding``.
``Patient ID`` is the study UID (the service keeps no patient identifiers), so splits by that
column never put one study in two splits. ``feedback_labels.csv``: one row per image, one
column per label, 1 / 0 as read, empty where the reader gave no call (train with it ignored).
The last report of a study wins (amendments replace earlier reads).
"""

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from cxr_triage.queue.jobs import JobQueue
from cxr_triage.queue.studies import StudyStore

ENTRY_COLUMNS = [
    "Image Index",
    "Finding Labels",
    "Follow-up #",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
    "OriginalImage[Width",
    "Height]",
    "OriginalImagePixelSpacing[x",
    "y]",
]


def latest_reports(store: StudyStore) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for report in store.reports():
        out[report["study_uid"]] = report
    return out


def export_feedback(
    store: StudyStore, labels: Sequence[str], out_dir: Path, images: JobQueue | None = None
) -> int:
    """Write the two CSVs and reports.jsonl into ``out_dir``; returns the number of image rows.

    With ``images`` (the job queue), each image the model scored is written to
    ``images/<instance>.png`` as the model saw it (8-bit, at the model's input size), so the
    export is a training set: ``cxr-triage retrain --feedback`` reads it as it is.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    reports = latest_reports(store)
    for uid, report in sorted(reports.items()):
        study = store.study(uid) or {"instances": []}
        for instance in study["instances"] or [{"instance_uid": None}]:
            name = instance.get("instance_uid") or uid
            rows.append((uid, name, report))
            if images is not None and instance.get("job_id"):
                _write_image(images, instance["job_id"], out_dir / "images" / f"{name}.png")
    with (out_dir / "Data_Entry_2017.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(ENTRY_COLUMNS)
        for uid, instance, report in rows:
            present = [lbl for lbl in labels if report["labels"].get(lbl) is True]
            writer.writerow(
                [f"{instance}.png", "|".join(present) or "No Finding", 0, uid, "", "", "", "", "", "", ""]
            )
    with (out_dir / "feedback_labels.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["study_uid", "instance_uid", "reader", "reported_at", *labels])
        for uid, instance, report in rows:
            calls = [_call(report["labels"].get(lbl)) for lbl in labels]
            writer.writerow([uid, instance, report["reader"], report["reported_at"], *calls])
    with (out_dir / "reports.jsonl").open("w") as f:
        for report in reports.values():
            f.write(json.dumps(report) + "\n")
    return len(rows)


def _write_image(queue: JobQueue, job_id: str, path: Path) -> None:
    kept = queue.heatmap(job_id)
    if kept is None:
        return
    path.parent.mkdir(exist_ok=True)
    Image.fromarray(kept[0]).save(path)


def _call(value: bool | None) -> str:
    return "" if value is None else str(int(value))
