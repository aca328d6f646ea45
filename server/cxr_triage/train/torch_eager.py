"""PyTorch eager reference engine: for parity checks and benchmarks, never for serving."""

import numpy as np
import torch
from torch import nn


class TorchEagerEngine:
    backend = "torch-eager-cpu"

    def __init__(self, model: nn.Module, threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.model = model.eval()

    @torch.inference_mode()
    def run_with_heatmaps(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        out = self.model(torch.from_numpy(batch))
        probs, cam = out if isinstance(out, tuple) else (out, None)
        return probs.numpy().astype(np.float32), None if cam is None else cam.numpy().astype(np.float32)

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.run_with_heatmaps(batch)[0]
