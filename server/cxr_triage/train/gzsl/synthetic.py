"""Compositional phantoms for zero-shot learning: unseen findings share visual attributes with
seen ones, and their names share the same words.

Each finding is a *type* of lesion at a *place*: its name is ``"<side> <zone> <type>"``, e.g.
``"right upper nodule"``. Four types (nodule, mass, patchy opacity, cavity), two sides (the
patient's right is the image's left, as on any PA film) and two zones (upper, lower) make 16
findings. Four of them are unseen, one per type and one per side-and-zone, so every unseen
finding's type is seen at three other places and its place is seen with three other types::

                  right upper   right lower   left upper   left lower
    nodule           seen          seen        UNSEEN        seen
    mass             seen         UNSEEN        seen         seen
    patchy opacity  UNSEEN         seen         seen         seen
    cavity           seen          seen         seen        UNSEEN

A model that learns what "nodule" and "left upper" look like, and that its text projection maps
the words onto those looks, ranks ``left upper nodule`` images above others without ever
seeing one. The lesions are drawn over the anatomy of :func:`cxr_triage.train.synthetic.render_phantom`
(a finding-free phantom: body, lungs, heart, ribs, exposure and noise).

Written as two labelled-image folders, ``train_val/`` and ``test/`` (split by patient, the
feedback-export layout, which carries any label vocabulary), plus ``gzsl_labels.json`` (labels,
unseen, descriptions) and the ``SYNTHETIC.txt`` marker in every folder.
"""

import csv
import json
import math
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from cxr_triage.train.datasets import FEEDBACK_FIXED_COLUMNS, FEEDBACK_LABELS, SYNTHETIC_MARKER, DatasetError
from cxr_triage.train.gzsl.split import LABELS_FILE
from cxr_triage.train.synthetic import MARKER_TITLE, _grid, _norm, _smooth_noise, _soft, render_phantom

SIDES = {"right": -1, "left": 1}
"""Patient's side -> image side (-1: image left). A PA film shows the patient's right on the left."""
ZONES = {"upper": 0.29, "lower": 0.465}
"""Zone -> vertical centre of the lesion, in image heights (lungs span about 0.15-0.55)."""
TYPES = {
    "nodule": "small bright round spot, 7-9 % of the image width across",
    "mass": "large bright lobulated opacity, 14-18 % of the image width across",
    "patchy opacity": "faint patchy haze filling most of the zone",
    "cavity": "dark round lucency, 10-13 % across, ringed by a bright wall",
}
UNSEEN: tuple[str, ...] = (
    "left upper nodule",
    "right lower mass",
    "right upper patchy opacity",
    "left lower cavity",
)
FINDINGS: tuple[str, ...] = tuple(
    f"{side} {zone} {kind}" for kind in TYPES for side in SIDES for zone in ZONES
)
_LUNG_DX, _LUNG_AX = 0.177, 0.135


def describe(finding: str) -> str:
    side, zone, kind = _parse(finding)
    return f"{TYPES[kind]}, in the {zone} zone of the {side} lung"


def _parse(finding: str) -> tuple[str, str, str]:
    parts = finding.split(" ", 2)
    if len(parts) != 3 or parts[0] not in SIDES or parts[1] not in ZONES or parts[2] not in TYPES:
        raise ValueError(f"{finding!r} is not '<side> <zone> <type>'; findings are {list(FINDINGS)}")
    return parts[0], parts[1], parts[2]


def render(
    findings: Collection[str] = (), size: int = 64, patient: int = 0, image: int = 0, seed: int = 0
) -> np.ndarray:
    """One (size, size) float32 0-1 phantom showing ``findings`` (names from :data:`FINDINGS`).

    The anatomy is :func:`render_phantom`'s for (seed, patient, image) without findings; each
    lesion's placement comes from its own stream, so adding a finding changes only its zone.

    Raises:
        ValueError: an unknown finding, or ``size`` below 32.
    """
    parsed = [(_parse(f), FINDINGS.index(f)) for f in findings]
    base = render_phantom((), size=size, patient=patient, image=image, seed=seed).image
    gy, gx = _grid(size)
    layer = np.zeros_like(base)
    for (side, zone, kind), index in parsed:
        rng = np.random.default_rng([seed, 7, index, patient, image])
        s = SIDES[side]
        cx = 0.5 + s * (_LUNG_DX + rng.uniform(-0.3, 0.3) * _LUNG_AX)
        cy = ZONES[zone] + rng.uniform(-0.04, 0.04)
        d = _norm(gx - cx, gy - cy)
        edge = 1.5 / size
        if kind == "nodule":
            layer += rng.uniform(0.28, 0.34) * _soft(rng.uniform(0.035, 0.045) - d, edge)
        elif kind == "mass":
            core = rng.uniform(0.07, 0.09) / 1.1
            signed = core - d
            for angle in rng.uniform(0, 2 * math.pi, size=int(rng.integers(3, 6))):
                lx, ly = cx + 0.55 * core * math.cos(angle), cy + 0.55 * core * math.sin(angle)
                signed = np.maximum(signed, 0.5 * core - _norm(gx - lx, gy - ly))
            layer += rng.uniform(0.26, 0.32) * _soft(signed, edge)
        elif kind == "patchy opacity":
            ex, ey = rng.uniform(0.09, 0.11), rng.uniform(0.07, 0.09)
            cx = 0.5 + s * _LUNG_DX
            patch = _soft((1.0 - _norm((gx - cx) / ex, (gy - cy) / ey)) * ey, 6.0 / size)
            patchy = np.clip(0.7 + 0.45 * _smooth_noise(rng, size, max(4, size // 8)), 0.1, 1.2)
            layer += rng.uniform(0.22, 0.27) * patch * patchy
        else:  # cavity: a lucent centre inside a dense wall
            radius = rng.uniform(0.05, 0.065)
            wall = _soft(radius - d, edge) - _soft(0.62 * radius - d, edge)
            layer += rng.uniform(0.24, 0.3) * wall - 0.1 * _soft(0.62 * radius - d, edge)
    if parsed:
        layer = ndimage.gaussian_filter(layer, 0.5 * size / 64)
    return np.clip(base + layer, 0.0, 1.0).astype(np.float32)


def generate(
    root: Path,
    patients: int = 1200,
    size: int = 64,
    prevalence: float = 0.12,
    test_fraction: float = 0.25,
    seed: int = 0,
) -> dict[str, Any]:
    """Write the compositional phantom set under ``root``; deterministic for ``seed``.

    One image per patient; each of the 16 findings present independently with ``prevalence``.
    Returns a summary (images per split, positives per finding).

    Raises:
        ValueError: arguments out of range.
        DatasetError: ``root`` holds something that is not a synthetic set (never overwritten).
    """
    if patients < 2 or size < 32 or not 0.0 < prevalence < 1.0 or not 0.0 < test_fraction < 1.0:
        raise ValueError("need patients >= 2, size >= 32, 0 < prevalence < 1, 0 < test_fraction < 1")
    root = Path(root)
    if root.exists() and any(root.iterdir()) and not (root / SYNTHETIC_MARKER).is_file():
        raise DatasetError(f"{root} is not empty and holds no {SYNTHETIC_MARKER}; refusing to write there")
    start = time.perf_counter()
    rng = np.random.default_rng([seed, 99])
    shown = {pid: [f for f in FINDINGS if rng.random() < prevalence] for pid in range(1, patients + 1)}
    order = rng.permutation(patients) + 1
    n_test = min(max(1, round(test_fraction * patients)), patients - 1)
    test_ids = {int(p) for p in order[:n_test]}
    summary: dict[str, Any] = {"synthetic": True, "size": size, "seed": seed, "prevalence": prevalence}
    for split, ids in (
        ("train_val", [p for p in shown if p not in test_ids]),
        ("test", sorted(test_ids)),
    ):
        folder = root / split
        (folder / "images").mkdir(parents=True, exist_ok=True)
        for stale in (folder / "images").glob("synthetic-*.png"):
            stale.unlink()
        with (folder / FEEDBACK_LABELS).open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow([*FEEDBACK_FIXED_COLUMNS, *FINDINGS])
            for pid in ids:
                study, instance = f"synthetic-{pid:06d}", f"synthetic-{pid:06d}-0"
                pixels = render(shown[pid], size=size, patient=pid, seed=seed)
                Image.fromarray(np.round(pixels * 255.0).astype(np.uint8)).save(
                    folder / "images" / f"{instance}.png", compress_level=1
                )
                cells = ["1" if x in shown[pid] else "0" for x in FINDINGS]
                writer.writerow([study, instance, "phantom", "2000-01-01T00:00:00Z", *cells])
        (folder / SYNTHETIC_MARKER).write_text(_marker(split, patients, size, prevalence, seed))
        summary[f"{split}_images"] = len(ids)
    spec = {
        "labels": list(FINDINGS),
        "unseen": list(UNSEEN),
        "descriptions": {f: describe(f) for f in FINDINGS},
    }
    (root / LABELS_FILE).write_text(json.dumps(spec, indent=2) + "\n")
    (root / SYNTHETIC_MARKER).write_text(_marker("both", patients, size, prevalence, seed))
    summary["positives"] = {x: sum(x in v for v in shown.values()) for x in FINDINGS}
    summary["seconds"] = round(time.perf_counter() - start, 2)
    return summary


def _marker(split: str, patients: int, size: int, prevalence: float, seed: int) -> str:
    table = "\n".join(
        f"  {x}{'  (UNSEEN: never in training images)' if x in UNSEEN else ''}" for x in FINDINGS
    )
    return (
        f"""{MARKER_TITLE}

Compositional zero-shot phantoms ({split}), drawn by cxr_triage.train.gzsl.synthetic.generate:
patients={patients}, size={size}, prevalence={prevalence}, seed={seed}. Each finding is
'<side> <zone> <type>' drawn over a finding-free phantom; types:
"""
        + "\n".join(f"  {k}: {v}" for k, v in TYPES.items())
        + f"""

Findings:
{table}
A model trained on these images says nothing about radiographs of people.
"""
    )
