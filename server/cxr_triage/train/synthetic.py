"""Synthetic chest phantoms in the ChestX-ray14 layout, for testing the trainer end to end.

The images are drawn, not acquired: a body outline, two dark lung fields with vessel-like
markings, the mediastinum and heart, diaphragm domes, ribs and clavicles, then blur, exposure
and quantum noise, with the anatomy and pose varied per patient and per image. Seven findings
are drawn as simple, learnable patterns (see :data:`PATTERNS`), each independently present
with the given prevalence. The folder carries a ``SYNTHETIC.txt`` marker that
``datasets.load_chestxray14`` turns into ``synthetic=True``, so a model trained on it can never
pass for one trained on clinical data.
"""

import csv
import math
import time
from collections.abc import Collection
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from cxr_triage.feedback.export import ENTRY_COLUMNS
from cxr_triage.train.datasets import NIH_ENTRY, NIH_LABELS, NIH_SPLIT_LISTS, SYNTHETIC_MARKER, DatasetError

PATTERNS: dict[str, str] = {
    "Cardiomegaly": "heart shadow enlarged: cardiothoracic ratio 0.58-0.66 (normal phantoms 0.39-0.46)",
    "Effusion": "fluid at one lung base (both in a quarter of cases): soft-tissue density with a meniscus "
    "rising to the lateral chest wall, blunting the costophrenic angle",
    "Nodule": "small bright round spot inside a lung, 6-8 % of the image width across "
    "(large enough to survive downscaling to 64 px)",
    "Mass": "larger bright lobulated opacity inside a lung, 12-18 % of the image width across",
    "Pneumothorax": "dark band without lung markings along the apex and lateral wall of one lung, "
    "bounded by a thin bright pleural line",
    "Consolidation": "patchy dense opacity filling part of one lung",
    "Edema": "bilateral perihilar haze (bat-wing pattern), patchy",
}
SYNTHETIC_FINDINGS: tuple[str, ...] = tuple(label for label in NIH_LABELS if label in PATTERNS)
"""The ChestX-ray14 labels the phantoms can show; every other label is always 0 (not evaluable)."""

MARKER_TITLE = "SYNTHETIC PHANTOMS — not clinical data, not for any diagnostic use"


@dataclass(frozen=True)
class Phantom:
    """One drawn image: float32 (size, size) in 0-1, where each present finding was drawn, and its CTR."""

    image: np.ndarray
    regions: dict[str, np.ndarray]
    ctr: float


@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in image widths (0-1): (y, x), each (size, size) float32."""
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size
    y, x = np.meshgrid(axis, axis, indexing="ij")
    y.flags.writeable = False
    x.flags.writeable = False
    return y, x


def _soft(signed: np.ndarray, edge: float) -> np.ndarray:
    """A 0-1 mask from an (approximate) signed distance, positive inside, ramped over ``edge``."""
    return np.clip(signed / edge + 0.5, 0.0, 1.0).astype(np.float32)


def _norm(a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
    """sqrt(a² + b²) in float32: ``np.hypot`` is about 10x slower and its overflow care is not needed."""
    return np.sqrt(np.asarray(a * a + b * b, dtype=np.float32))


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise, about zero mean and unit spread, with ``cells`` blobs across."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    img = Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BICUBIC)
    out = np.asarray(img, dtype=np.float32)
    return out / (float(out.std()) + 1e-6)


def render_phantom(
    findings: Collection[str] = (), size: int = 256, patient: int = 0, image: int = 0, seed: int = 0
) -> Phantom:
    """Draw one phantom showing ``findings``.

    Anatomy comes from (``seed``, ``patient``), pose/exposure/noise from (``seed``, ``patient``,
    ``image``) and each finding's placement from its own stream, so the same arguments with or
    without a finding give the same picture apart from that finding.

    Raises:
        ValueError: a finding outside :data:`SYNTHETIC_FINDINGS`, or ``size`` below 32.
    """
    unknown = sorted(set(findings) - set(SYNTHETIC_FINDINGS))
    if unknown:
        raise ValueError(f"phantoms cannot show {unknown}; they show {list(SYNTHETIC_FINDINGS)}")
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels; got {size}")
    present = set(findings)
    pat = np.random.default_rng([seed, 1, patient])
    img_rng = np.random.default_rng([seed, 2, patient, image])
    noise_rng = np.random.default_rng([seed, 3, patient, image])

    def finding_rng(name: str) -> np.random.Generator:
        return np.random.default_rng([seed, 4, SYNTHETIC_FINDINGS.index(name), patient, image])

    px = 1.0 / size
    edge = 1.5 * px
    # --- pose: image coordinates -> canonical anatomy coordinates --------------------------
    gy, gx = _grid(size)
    theta = math.radians(img_rng.uniform(-3.0, 3.0))
    zoom = img_rng.uniform(0.94, 1.04)
    sx, sy = img_rng.uniform(-0.025, 0.025, size=2)
    dx, dy = gx - 0.5 - sx, gy - 0.5 - sy
    cos, sin = math.cos(theta) / zoom, math.sin(theta) / zoom
    u = (cos * dx + sin * dy + 0.5).astype(np.float32)
    v = (-sin * dx + cos * dy + 0.5).astype(np.float32)

    # --- anatomy -------------------------------------------------------------------------------
    soft_val = pat.uniform(0.44, 0.52)
    lung_val = pat.uniform(0.13, 0.19)
    heart_val = pat.uniform(0.66, 0.72)
    body_ax, body_cy, body_ay = pat.uniform(0.40, 0.46), 0.72, 0.64
    lung_dx = pat.uniform(0.165, 0.19)
    lung_ax_r = pat.uniform(0.125, 0.145)  # patient's right lung = image left, a little wider
    lung_ax = {-1: lung_ax_r, 1: lung_ax_r * pat.uniform(0.9, 0.97)}
    lung_ay = pat.uniform(0.26, 0.30) * img_rng.uniform(0.96, 1.04)  # depth of inspiration
    lung_cy = pat.uniform(0.44, 0.47)
    dome_top = {-1: 0.58 - pat.uniform(0.02, 0.05), 1: 0.58}  # right hemidiaphragm higher
    dome_curv = pat.uniform(0.10, 0.15)
    ctr = normal_ctr = pat.uniform(0.39, 0.46)
    if "Cardiomegaly" in present:
        ctr = finding_rng("Cardiomegaly").uniform(0.58, 0.66)
    thoracic = 2 * lung_dx + lung_ax[-1] + lung_ax[1]

    tu, tv = ((u - 0.5) / body_ax) ** 2, ((v - body_cy) / body_ay) ** 2
    torso = np.sqrt(np.sqrt(tu * tu + tv * tv))  # a squarish oval: shoulders
    body = _soft((1.0 - torso) * body_ax, edge)
    neck = _soft(np.minimum(0.085 - np.abs(u - 0.5), 0.25 - v), edge)
    body = np.maximum(body, neck)
    img = 0.03 + body * (soft_val * (0.88 + 0.12 * np.clip(1 - np.abs(u - 0.5) / body_ax, 0, 1)) - 0.03)

    lungs: dict[int, np.ndarray] = {}
    radius: dict[int, np.ndarray] = {}
    hila: dict[int, np.ndarray] = {}
    below_dome = np.zeros_like(u)
    for side in (-1, 1):  # -1: image left (patient's right), 1: image right (patient's left)
        cx, ax = 0.5 + side * lung_dx, lung_ax[side]
        taper = ax * (0.72 + 0.28 * np.clip((v - lung_cy + lung_ay) / (1.1 * lung_ay), 0.0, 1.0))
        r = _norm((u - cx) / taper, (v - lung_cy) / lung_ay)
        peak = cx - side * 0.15 * ax
        dome = dome_top[side] + dome_curv * ((u - peak) / ax) ** 2
        lungs[side] = _soft(np.minimum((1.0 - r) * taper, dome - v), edge)
        radius[side] = r
        below_dome = np.maximum(below_dome, _soft((v - dome) * (np.abs(u - cx) < 1.3 * ax), edge))
        hx, hy = cx - side * 0.5 * ax, lung_cy + 0.04
        hila[side] = _norm(u - hx, v - hy)
    img = img + 0.07 * below_dome * body  # liver and abdomen under the domes

    markings = _smooth_noise(noise_rng, size, size // 2)  # vessel-like texture, about 2 pixels across
    lung_content = np.full_like(u, lung_val)
    for side in (-1, 1):
        near = np.exp(-(hila[side] ** 2) / (2 * 0.13**2))
        lung_content += lungs[side] * (
            0.025 * (0.5 + near) * markings + 0.09 * np.exp(-(hila[side] ** 2) / 0.005)
        )
    lung_mask = np.maximum(lungs[-1], lungs[1])

    hw = ctr * thoracic / 2
    heart_cy, heart_ay = pat.uniform(0.59, 0.62), pat.uniform(0.10, 0.12)

    def heart_of(half_width: float) -> np.ndarray:
        centre = 0.5 + 0.3 * half_width
        return _soft((1.0 - _norm((u - centre) / half_width, (v - heart_cy) / heart_ay)) * heart_ay, edge)

    heart = heart_of(hw)
    regions: dict[str, np.ndarray] = {}
    if "Cardiomegaly" in present:
        normal = heart_of(normal_ctr * thoracic / 2)
        regions["Cardiomegaly"] = (heart > 0.5) & (normal < 0.5)

    # --- findings inside the lung fields ---------------------------------------------------
    if "Pneumothorax" in present:
        rng = finding_rng("Pneumothorax")
        side = int(rng.choice([-1, 1]))
        r_in0 = rng.uniform(0.62, 0.74)
        ny = (v - lung_cy) / lung_ay
        reach = np.clip((0.4 - ny) / 0.6, 0.0, 1.0)  # full depth at the apex, tapering down the side
        lateral = side * (u - 0.5 - side * lung_dx) / lung_ax[side] > -0.35
        r_in = 1.0 - (1.0 - r_in0) * reach
        band = lungs[side] * _soft((radius[side] - r_in) * lung_ax[side], edge) * (reach > 0) * lateral
        lung_content = lung_content * (1 - band) + (lung_val * 0.3) * band
        line = (np.abs(radius[side] - r_in) * lung_ax[side] < 1.2 * px + 0.002) & (reach > 0.15) & lateral
        lung_content = lung_content + 0.16 * (line * lungs[side])
        regions["Pneumothorax"] = (band > 0.5) & ~line
    if "Consolidation" in present:
        rng = finding_rng("Consolidation")
        side = int(rng.choice([-1, 1]))
        # A zone wider than the lung, so the lung's own border bounds it, like a lobe's.
        ccx = 0.5 + side * (lung_dx + rng.uniform(0.0, 0.3) * lung_ax[side])
        ccy = lung_cy + rng.uniform(-0.45, 0.45) * lung_ay  # an upper, middle or lower zone
        eax, eay = rng.uniform(1.0, 1.3) * lung_ax[side], rng.uniform(0.3, 0.45) * lung_ay
        patch = _soft((1.0 - _norm((u - ccx) / eax, (v - ccy) / eay)) * eay, 8 * px) * lungs[side]
        patchy = np.clip(0.75 + 0.4 * _smooth_noise(rng, size, 24), 0.2, 1.0)
        lung_content = lung_content + 0.3 * patch * patchy
        regions["Consolidation"] = patch > 0.5
    if "Edema" in present:
        rng = finding_rng("Edema")
        sigma, amp = rng.uniform(0.10, 0.13), rng.uniform(0.24, 0.32)
        patchy = np.clip(0.8 + 0.25 * _smooth_noise(rng, size, 10), 0.4, 1.2)
        haze = np.zeros_like(u)
        for side in (-1, 1):
            haze += lungs[side] * np.exp(-(hila[side] ** 2) / (2 * sigma**2))
        lung_content = lung_content + amp * haze * patchy
        regions["Edema"] = (lung_mask > 0.5) & (np.minimum(hila[-1], hila[1]) < sigma)
    if "Effusion" in present:
        rng = finding_rng("Effusion")
        sides = [-1, 1] if rng.random() < 0.25 else [int(rng.choice([-1, 1]))]
        fluid = np.zeros_like(u)
        for side in sides:
            ax = lung_ax[side]
            out = np.clip(side * (u - 0.5 - side * lung_dx) / ax, 0.0, 1.2)  # 0 mid-lung, 1 lateral wall
            level = lung_cy + rng.uniform(0.0, 0.25) * lung_ay - rng.uniform(0.06, 0.1) * out**2
            fluid = np.maximum(fluid, lungs[side] * _soft(v - level, 2 * px))
        lung_content = lung_content * (1 - fluid) + (soft_val + 0.08) * fluid
        regions["Effusion"] = (fluid > 0.5) & (heart < 0.5)

    img = img * (1 - lung_mask) + lung_content * lung_mask

    # --- mediastinum, heart, bones ---------------------------------------------------------
    med_hw = pat.uniform(0.05, 0.065)
    mediastinum = _soft(np.minimum(med_hw - np.abs(u - 0.5 - 0.01), heart_cy - v), edge) * (v > 0.12)
    knob = _soft(0.035 - _norm(u - 0.5 - med_hw, v - 0.3), edge)
    mediastinum = np.maximum(mediastinum, knob) * body
    img = img * (1 - mediastinum) + (heart_val - 0.05) * mediastinum
    img = img * (1 - heart) + heart_val * heart
    spine = _soft(0.032 - np.abs(u - 0.5), edge) * body
    img = img + 0.05 * spine

    d = np.abs(u - 0.5)
    rib_y0, rib_dy = pat.uniform(0.13, 0.16), pat.uniform(0.05, 0.058)
    phase = v - (rib_y0 - 0.2 * d + 1.0 * d**2)  # posterior ribs: up from the spine, then down laterally
    nearest = np.clip(np.round(phase / rib_dy), 0, 9)
    bones = _soft(0.011 - np.abs(phase - nearest * rib_dy), edge) * (d > 0.04) * (d < body_ax * 0.92)
    clavicles = _soft(0.013 - np.abs(v - (0.16 - 0.12 * (d - 0.05))), edge) * (d > 0.04) * (d < 0.3)
    bones = np.maximum(bones, clavicles)
    img = img + 0.07 * bones * body

    # --- focal opacities (in front of everything) -------------------------------------------
    for name, lo, hi in (("Nodule", 0.06, 0.08), ("Mass", 0.12, 0.18)):
        if name not in present:
            continue
        rng = finding_rng(name)
        side = int(rng.choice([-1, 1]))
        across = rng.uniform(lo, hi)
        ccx, ccy = _inside_lung(
            rng, lung_dx, lung_ax[side], lung_cy, lung_ay, side, hw, heart_cy, heart_ay, across / 2
        )
        if name == "Nodule":
            signed = across / 2 - _norm(u - ccx, v - ccy)
        else:
            core = across / 2.2
            signed = core - _norm(u - ccx, v - ccy)
            for angle in rng.uniform(0, 2 * math.pi, size=int(rng.integers(3, 6))):
                lx, ly = ccx + 0.55 * core * math.cos(angle), ccy + 0.55 * core * math.sin(angle)
                signed = np.maximum(signed, 0.5 * core - _norm(u - lx, v - ly))
        blob = _soft(signed, 1.5 * edge)
        img = img + rng.uniform(0.26, 0.32) * blob
        regions[name] = blob > 0.5

    # --- acquisition: blur, exposure, noise -------------------------------------------------
    img = ndimage.gaussian_filter(img.astype(np.float32), img_rng.uniform(0.4, 1.2) * size / 256)
    gamma, contrast, offset = (
        img_rng.uniform(0.85, 1.15),
        img_rng.uniform(0.88, 1.12),
        img_rng.uniform(-0.04, 0.04),
    )
    heel = 1.0 + img_rng.uniform(-0.04, 0.04) * (gy - 0.5)
    img = np.clip(img, 0.0, 1.0) ** gamma * contrast * heel + offset
    img = img + img_rng.uniform(0.008, 0.022) * noise_rng.standard_normal(img.shape, dtype=np.float32)
    return Phantom(image=np.clip(img, 0.0, 1.0).astype(np.float32), regions=regions, ctr=float(ctr))


def _inside_lung(
    rng: np.random.Generator,
    lung_dx: float,
    ax: float,
    cy: float,
    ay: float,
    side: int,
    heart_hw: float,
    heart_cy: float,
    heart_ay: float,
    margin: float,
) -> tuple[float, float]:
    """A point well inside one lung field and off the heart shadow (canonical coordinates)."""
    cx = 0.5 + side * lung_dx
    heart_cx = 0.5 + 0.3 * heart_hw
    x, y = cx, cy - 0.3 * ay
    for _ in range(100):
        x, y = cx + rng.uniform(-0.6, 0.6) * ax, cy + rng.uniform(-0.7, 0.5) * ay
        in_lung = math.hypot((x - cx) / ax, (y - cy) / ay) < 0.6
        in_heart = (
            math.hypot((x - heart_cx) / (heart_hw + margin), (y - heart_cy) / (heart_ay + margin)) < 1.0
        )
        if in_lung and not in_heart:
            break
    return x, y


def generate(
    root: Path,
    patients: int = 400,
    images_per_patient: tuple[int, int] = (1, 3),
    size: int = 256,
    prevalence: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, Any]:
    """Write a phantom set in the ChestX-ray14 layout under ``root``; deterministic for ``seed``.

    Writes ``Data_Entry_2017.csv`` (all 11 columns), ``images/NNNNNNNN_FFF.png`` (8-bit
    grayscale), ``train_val_list.txt`` / ``test_list.txt`` split by patient, and the
    ``SYNTHETIC.txt`` marker. Each finding of :data:`SYNTHETIC_FINDINGS` is present in an image
    independently with probability ``prevalence``. Returns a summary (counts per split, positives
    per label) for logs and metadata.

    Raises:
        ValueError: arguments out of range.
        DatasetError: ``root`` already holds a ChestX-ray14 set that is not synthetic (it is never
            overwritten).
    """
    lo, hi = images_per_patient
    if patients < 1 or not 1 <= lo <= hi or size < 32:
        raise ValueError(
            "need patients >= 1, 1 <= images_per_patient[0] <= images_per_patient[1], size >= 32"
        )
    if not 0.0 <= prevalence <= 1.0 or not 0.0 <= test_fraction < 1.0:
        raise ValueError("need 0 <= prevalence <= 1 and 0 <= test_fraction < 1")
    root = Path(root)
    marker = root / SYNTHETIC_MARKER
    if (root / NIH_ENTRY).exists() and not marker.exists():
        raise DatasetError(
            f"{root} already holds a dataset without {SYNTHETIC_MARKER}; refusing to overwrite it"
        )
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    for stale in images_dir.glob("[0-9]" * 8 + "_[0-9][0-9][0-9].png"):
        stale.unlink()  # a previous phantom set here (the marker checked above)
    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    rows: list[list[Any]] = []
    by_patient: dict[int, list[str]] = {}
    positives = dict.fromkeys(NIH_LABELS, 0)
    jobs: list[tuple[Path, list[str], int, int]] = []
    for pid in range(1, patients + 1):
        age0, sex = int(rng.integers(18, 86)), str(rng.choice(["M", "F"]))
        width_mm, height_mm = rng.uniform(350, 430), rng.uniform(350, 430)
        for follow_up in range(int(rng.integers(lo, hi + 1))):
            name = f"{pid:08d}_{follow_up:03d}.png"
            shown = [f for f in SYNTHETIC_FINDINGS if rng.random() < prevalence]
            view = "PA" if rng.random() < 0.6 else "AP"
            spacing = round(float(rng.choice([0.139, 0.143, 0.148, 0.168])), 3)
            jobs.append((images_dir / name, shown, pid, follow_up))
            rows.append(
                [
                    name,
                    "|".join(shown) or "No Finding",
                    follow_up,
                    pid,
                    age0 + follow_up // 4,
                    sex,
                    view,
                    round(width_mm / spacing),
                    round(height_mm / spacing),
                    spacing,
                    spacing,
                ]
            )
            by_patient.setdefault(pid, []).append(name)
            for label in shown:
                positives[label] += 1

    def draw(job: tuple[Path, list[str], int, int]) -> None:
        path, shown, pid, follow_up = job
        phantom = render_phantom(shown, size=size, patient=pid, image=follow_up, seed=seed)
        Image.fromarray(np.round(phantom.image * 255.0).astype(np.uint8)).save(path, compress_level=1)

    for job in jobs:
        draw(job)
    ids = sorted(by_patient)
    n_test = round(test_fraction * len(ids))
    if test_fraction > 0 and len(ids) >= 2:
        n_test = min(max(n_test, 1), len(ids) - 1)
    test_ids = {ids[i] for i in rng.permutation(len(ids))[:n_test]}
    test = sorted(n for pid in test_ids for n in by_patient[pid])
    train_val = sorted(n for pid in ids if pid not in test_ids for n in by_patient[pid])
    with (root / NIH_ENTRY).open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(ENTRY_COLUMNS)
        writer.writerows(rows)
    (root / NIH_SPLIT_LISTS["train_val"]).write_text("".join(n + "\n" for n in train_val))
    (root / NIH_SPLIT_LISTS["test"]).write_text("".join(n + "\n" for n in test))
    marker.write_text(_marker_text(patients, images_per_patient, size, prevalence, test_fraction, seed))
    return {
        "synthetic": True,
        "images": len(rows),
        "patients": patients,
        "train_val_images": len(train_val),
        "test_images": len(test),
        "test_patients": len(test_ids),
        "positives": positives,
        "size": size,
        "prevalence": prevalence,
        "seed": seed,
        "seconds": round(time.perf_counter() - start, 2),
    }


def _marker_text(
    patients: int,
    images_per_patient: tuple[int, int],
    size: int,
    prevalence: float,
    test_fraction: float,
    seed: int,
) -> str:
    drawn = "\n".join(f"  {name}: {what}" for name, what in PATTERNS.items())
    absent = ", ".join(label for label in NIH_LABELS if label not in PATTERNS)
    return f"""{MARKER_TITLE}

Drawn by cxr_triage.train.synthetic.generate: patients={patients}, images_per_patient={images_per_patient},
size={size}, prevalence={prevalence}, test_fraction={test_fraction}, seed={seed}.
The layout is ChestX-ray14's (Data_Entry_2017.csv, images/, train_val_list.txt, test_list.txt),
split by patient; the loader sees this file and marks the set synthetic.

Each image is a drawn phantom: body outline, two dark lung fields with vessel-like markings,
mediastinum and heart shadow, diaphragm domes, ribs and clavicles, then blur, exposure and noise,
with anatomy, pose and exposure varied. Each finding is present independently with probability
{prevalence} and drawn as:
{drawn}

Always 0 here, so not evaluable on this data: {absent}.
A model trained on these images says nothing about radiographs of people.
"""
