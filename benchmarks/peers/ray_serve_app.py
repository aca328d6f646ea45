"""Peer (c1): Ray Serve. A local Ray instance (num_cpus = the machine's cores, no dashboard), one
replica of one deployment behind Ray Serve's HTTP proxy on 127.0.0.1, with Ray Serve's own
batching (``@serve.batch``: max_batch_size 8, 10 ms window, like LitServe). The replica reads the
body and decodes it in its request handler, then awaits the batched engine call.
``max_ongoing_requests`` is 16 (default 5) so that a batch of 8 can fill.

Runs with the peers' virtual environment (.venv-peers); stops on SIGTERM.
"""

import os
import signal
import threading

import common
import numpy as np
import ray
from ray import serve
from starlette.requests import Request


@serve.deployment(max_ongoing_requests=16)
class CxrPeer:
    def __init__(self) -> None:
        self.engine = common.Engine()
        self.spec = common.input_spec()

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def infer(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        return list(self.engine.run(np.stack(inputs)))

    async def __call__(self, request: Request) -> dict[str, list[float]]:
        x = common.model_input(await request.body(), self.spec)
        return common.reply(await self.infer(x))


def main() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": common.port()})
    serve.run(CxrPeer.bind(), name="cxr-peer", route_prefix="/predict")
    print("ready", flush=True)
    stop.wait()
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
