"""ONNX Runtime engine: TensorRT, CUDA or CPU execution provider, whichever is present."""

import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from cxr_triage.config import Backend

log = logging.getLogger(__name__)

# Preference order for `auto`; the first one this onnxruntime build has wins.
_PROVIDERS: dict[str, str] = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
_BACKEND_NAMES = {v: f"onnxruntime-{k}" for k, v in _PROVIDERS.items()}


def choose_providers(preference: Backend, available: list[str] | None = None) -> list[str]:
    """Execution providers to ask for, best first, always ending with the CPU.

    ``preference`` "auto" takes every accelerated provider present; a named backend that is
    absent falls back to the CPU with a log line saying so.
    """
    available = ort.get_available_providers() if available is None else available
    wanted = list(_PROVIDERS) if preference == "auto" else [preference]
    chosen = [_PROVIDERS[w] for w in wanted if _PROVIDERS[w] in available and w != "cpu"]
    if preference not in ("auto", "cpu") and not chosen:
        log.warning(
            "backend %s requested but %s is absent; falling back to CPU", preference, _PROVIDERS[preference]
        )
    return [*chosen, _PROVIDERS["cpu"]]


def accelerated(preference: Backend, available: list[str] | None = None) -> bool:
    """Whether ``preference`` gets a GPU execution provider from this onnxruntime build."""
    return choose_providers(preference, available)[0] != _PROVIDERS["cpu"]


def backend_name(provider: str) -> str:
    """The backend label used in responses and metrics, e.g. onnxruntime-cpu."""
    return _BACKEND_NAMES.get(provider, provider)


class Preempted(RuntimeError):
    """A run stopped by ``interrupt_runs`` (another worker took the cores); run it again."""


# One RunOptions for every session of the process: an inference worker runs one batch at a time,
# and ``interrupt_runs``, from another thread, stops it at the engine's next node (~1 ms).
_RUN_OPTIONS = ort.RunOptions()


def interrupt_runs() -> None:
    """Stop this process's engine run in progress, and any started, until ``resume_runs``."""
    _RUN_OPTIONS.terminate = True


def resume_runs() -> None:
    _RUN_OPTIONS.terminate = False


def runs_interrupted() -> bool:
    return bool(_RUN_OPTIONS.terminate)


class OnnxEngine:
    """An ONNX Runtime inference session over one model file."""

    def __init__(self, path: Path, preference: Backend = "auto", intra_op_threads: int = 0) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        # Idle intra-op threads spin by default, burning the cores that HTTP and decoding
        # need on a small machine; sleeping costs a few microseconds of wake-up per call.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(
            str(path), sess_options=options, providers=choose_providers(preference)
        )
        self._input = self._session.get_inputs()[0].name
        self._outputs = [o.name for o in self._session.get_outputs()]
        self.backend = backend_name(self._session.get_providers()[0])

    def run(self, batch: np.ndarray) -> np.ndarray:
        (out,) = self._run(self._outputs[:1], batch)
        return np.asarray(out, dtype=np.float32)

    def run_with_heatmaps(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        outs = self._run(self._outputs[:2], batch)
        cam = np.asarray(outs[1], dtype=np.float32) if len(outs) > 1 else None
        return np.asarray(outs[0], dtype=np.float32), cam

    def _run(self, outputs: list[str], batch: np.ndarray) -> list[np.ndarray]:
        try:
            return list(self._session.run(outputs, {self._input: batch}, _RUN_OPTIONS))
        except Exception as exc:  # ONNX Runtime's own error classes (Fail, …)
            if runs_interrupted():
                raise Preempted("the run was interrupted") from exc
            raise
