"""Synchronous predict with a small 8-bit PNG (noise: this measures the service, not the model).

    locust -f loadtests/locustfile.py --headless -u 4 -r 4 -t 30s --host http://127.0.0.1:8000

The SLO checker and the other suites (full-resolution JPEG/DICOM, STOW-RS, priority mix,
worklist reader) are built on this in the load-test issue.
"""

import io

import numpy as np
from locust import HttpUser, between, task
from PIL import Image


def _noise_png(size: int = 224) -> bytes:
    rng = np.random.default_rng(0)
    img = (rng.random((size, size)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


PNG = _noise_png()


class PredictUser(HttpUser):
    wait_time = between(0.0, 0.05)

    @task
    def predict_png(self) -> None:
        self.client.post("/v1/predict", data=PNG, headers={"Content-Type": "image/png"}, name="/v1/predict png")
