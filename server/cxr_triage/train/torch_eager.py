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
    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.model(torch.from_numpy(batch)).numpy().astype(np.float32)
