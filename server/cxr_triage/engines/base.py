"""The one Engine protocol every backend implements."""

from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Engine(Protocol):
    """Runs a compiled model on a batch.

    ``run`` takes the NCHW float32 tensor built by ``imaging.to_batch`` and returns float32
    (batch, labels) probabilities in 0-1, in the model config's label order.
    """

    backend: str

    def run(self, batch: np.ndarray) -> np.ndarray: ...

    def run_with_heatmaps(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities and, where the model gives them, class activation maps
        (batch, labels, h, w) on the logit scale; None otherwise."""
        ...
