"""Peer (b): plain LitServe with its default loop and batching (max_batch_size 8, 10 ms window).

LitServe's defaults otherwise: one inference worker for the CPU, its default HTTP server
processes; decode_request (the decoding) runs in the inference worker, one request at a time,
then predict runs the engine on the batch. The request timeout is raised to 120 s so that slow
inputs at high concurrency are measured rather than cut off.
"""

import os
from typing import Annotated, Any

import common
import litserve as ls
import numpy as np
from fastapi import Body


class PeerAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.engine = common.Engine()
        self.spec = common.input_spec()

    def decode_request(self, request: Annotated[bytes, Body(media_type="application/octet-stream")]) -> Any:
        return common.model_input(request, self.spec)

    def batch(self, inputs: list[np.ndarray]) -> np.ndarray:
        return np.stack(inputs)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.engine.run(x)

    def unbatch(self, output: np.ndarray) -> list[np.ndarray]:
        return list(output)

    def encode_response(self, output: np.ndarray) -> dict[str, list[float]]:
        return common.reply(output)


def workers() -> int:
    """``PEER_WORKERS``: inference workers (``cores``: one per usable core); default 1."""
    value = os.environ.get("PEER_WORKERS", "1")
    return len(os.sched_getaffinity(0)) if value == "cores" else int(value)


if __name__ == "__main__":
    api = PeerAPI(max_batch_size=int(os.environ.get("PEER_MAX_BATCH", "8")), batch_timeout=0.01)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=workers(), timeout=120)
    server.run(host="127.0.0.1", port=common.port(), log_level="warning", generate_client_file=False)
