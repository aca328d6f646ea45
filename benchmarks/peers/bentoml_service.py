"""Peer (c2): BentoML 1.4 (new-style service). One worker; the API is a plain ``def``, which
BentoML runs in its thread pool, with the engine called inline at batch 1: BentoML's adaptive
batching needs a batchable input (arrays), not an uploaded file. The image arrives as BentoML's
native file input, a ``multipart/form-data`` part named ``file`` (BentoML parses any other body
as JSON). Started by ``bentoml serve bentoml_service:CxrPeer`` from this folder, with
``BENTOML_DO_NOT_TRACK=true``; runs with the peers' virtual environment (.venv-peers).
"""

from pathlib import Path

import bentoml
import common


@bentoml.service(workers=1, traffic={"timeout": 120})
class CxrPeer:
    def __init__(self) -> None:
        self.engine = common.Engine()
        self.spec = common.input_spec()

    @bentoml.api(route="/predict")
    def predict(self, file: Path) -> dict[str, list[float]]:
        batch = common.model_input(file.read_bytes(), self.spec)[None]
        return common.reply(self.engine.run(batch)[0])
