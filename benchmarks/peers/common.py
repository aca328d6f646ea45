"""What every peer server shares: the engine session and the model input.

Each peer decodes the request body with ``cxr_triage.imaging.prepare`` (pydicom with its default
decoder order / Pillow, the server's own resize and 0-1 scaling) and ``to_batch`` (per-channel
normalisation), so
every server feeds the engine exactly the same tensor for the same upload; only the serving
around it differs. The engine is an ONNX Runtime CPU session over the same model.onnx, with
ONNX Runtime's default options apart from the intra-op thread count.

Configured by environment variables (the bench sets them; ``bentoml serve`` takes no arguments):
``PEER_MODEL`` (model.onnx path), ``PEER_SPEC`` (the model's input spec as JSON),
``PEER_THREADS`` (intra-op threads, 0 = ONNX Runtime's default: one per core), ``PEER_PORT``.
"""

import json
import os

import numpy as np
import onnxruntime as ort

from cxr_triage.imaging import ImageLimits, dicom, prepare, to_batch
from cxr_triage.repository.models import InputSpec

LIMITS = ImageLimits()
# The peers decode DICOM the way a server written around pydicom does: its default decoder
# order. cxr-triage's choice per transfer syntax (PREFERRED_DECODERS) is one of the things
# measured; the arrays are the same either way (checked by the bench: max abs Δp).
dicom.PREFERRED_DECODERS.clear()


def input_spec() -> InputSpec:
    return InputSpec.model_validate(json.loads(os.environ["PEER_SPEC"]))


def threads() -> int:
    return int(os.environ.get("PEER_THREADS", "0"))


def port() -> int:
    return int(os.environ["PEER_PORT"])


class Engine:
    """One ONNX Runtime session; ``run`` returns the first output (the 14 probabilities)."""

    def __init__(self) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads()
        self.session = ort.InferenceSession(
            os.environ["PEER_MODEL"], sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.input = self.session.get_inputs()[0].name
        self.output = self.session.get_outputs()[0].name

    def run(self, batch: np.ndarray) -> np.ndarray:
        (out,) = self.session.run([self.output], {self.input: batch})
        return np.asarray(out, dtype=np.float32)


def model_input(body: bytes, spec: InputSpec) -> np.ndarray:
    """One upload (PNG, JPEG or DICOM bytes; the bytes decide the decoder) -> (C, H, W) float32."""
    pixels = prepare(body, "application/octet-stream", spec, LIMITS).pixels
    return to_batch([pixels], spec)[0]


def reply(probabilities: np.ndarray) -> dict[str, list[float]]:
    return {"probabilities": [float(p) for p in probabilities]}
