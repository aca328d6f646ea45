import numpy as np

from cxr_triage.dicomweb.heatmap import overlay, top_finding


def finding(label: str, p: float, positive: bool, critical: bool = False) -> dict:
    return {"label": label, "probability": p, "threshold": 0.5, "positive": positive, "critical": critical}


def test_top_finding_prefers_positive_critical_then_margin() -> None:
    prediction = {"findings": [finding("Nodule", 0.9, True), finding("Effusion", 0.6, True, critical=True)]}
    assert top_finding(prediction) == (1, "Effusion")
    prediction = {"findings": [finding("Nodule", 0.4, False), finding("Mass", 0.45, False)]}
    assert top_finding(prediction) == (1, "Mass")


def test_overlay_colours_only_where_the_map_is_hot() -> None:
    image = np.full((64, 64), 100, dtype=np.uint8)
    cam = np.zeros((2, 2), dtype=np.float32)
    cam[0, 0] = 5.0
    rgb = overlay(image, cam)
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    hot, cold = rgb[0, 0], rgb[63, 63]
    assert hot[0] > hot[2] + 50  # red where the map is high
    assert tuple(cold) == (100, 100, 100)  # untouched where it is at its minimum
