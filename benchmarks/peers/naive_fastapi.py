"""Peer (a): the seed plan's naive design. FastAPI, one uvicorn process, the model loaded once and
called inline in the request handler: decode, engine at batch 1, reply. No batching, no queue.

The handler is a plain ``def``, so FastAPI runs each request in its thread pool (the usual way
to put blocking work in FastAPI): concurrent requests decode and infer in parallel threads.
``PEER_THREADS`` sets ONNX Runtime's intra-op threads (the bench runs 1 and 2).
"""

from typing import Annotated

import common
import uvicorn
from fastapi import Body, FastAPI

app = FastAPI()
engine = common.Engine()
spec = common.input_spec()


@app.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/predict")
def predict(body: Annotated[bytes, Body(media_type="application/octet-stream")]) -> dict[str, list[float]]:
    batch = common.model_input(body, spec)[None]
    return common.reply(engine.run(batch)[0])


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=common.port(), log_level="warning", access_log=False)
