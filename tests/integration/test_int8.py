"""INT8 CPU engines: quantized from a registered version, measured against it, gated."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cxr_triage.engines import OnnxEngine
from cxr_triage.imaging import ImageLimits, prepare, to_batch
from cxr_triage.repository import ModelRepository
from cxr_triage.train.datasets import load_chestxray14
from cxr_triage.train.export import export_model
from cxr_triage.train.promote import run_gate
from cxr_triage.train.synthetic import generate
from tests.helpers import make_tiny_repo

MODEL = "densenet121-nih14"


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("int8")
    generate(root / "data", patients=30, size=64, seed=4)
    repo = make_tiny_repo(root / "repo", size=64)
    export_model(repo, MODEL)
    return repo, root / "data"


def test_int8_version_records_speed_and_auroc_and_is_gated_on_both(setup: tuple[Path, Path]) -> None:
    repo, data = setup
    command = [
        sys.executable,
        "-m",
        "cxr_triage",
        "export",
        MODEL,
        "--model-repo",
        str(repo),
        "--quantize",
        "int8",
    ]
    command += ["--calibration", str(data), "--holdout", str(data)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    entry = ModelRepository.load(repo).get(MODEL)  # the int8 engine passes the repository contract
    int8 = entry.versions["2"]
    meta = json.loads((int8.path / "metadata.json").read_text())
    assert meta["precision"] == "int8" and meta["quantized_from"] == "1"
    assert set(meta["speed"]) >= {"fp32_b1", "int8_b1", "fp32_b8", "int8_b8"}
    assert all(meta["speed"][k] > 0 for k in ("fp32_b1", "int8_b1", "fp32_b8", "int8_b8"))
    assert set(meta["auroc_vs_fp32"]) >= {"fp32", "int8"}
    assert "QuantizeLinear" in {n.op_type for n in __import__("onnx").load(str(int8.engine_path)).graph.node}

    images = load_chestxray14(data, "test").records[:8]
    limits = ImageLimits()
    x = to_batch(
        [prepare(r.image.read_bytes(), "", entry.config.input, limits).pixels for r in images],
        entry.config.input,
    )
    fp32 = OnnxEngine(entry.versions["1"].engine_path, "cpu").run(x)
    assert np.max(np.abs(OnnxEngine(int8.engine_path, "cpu").run(x) - fp32)) < 0.1  # close on radiographs

    gate = run_gate(repo, MODEL, "2", load_chestxray14(data, "test"), "test")
    ratio = min(meta["speed"][f"int8_b{b}"] / meta["speed"][f"fp32_b{b}"] for b in (1, 8))
    slower = any("int8 is not faster" in r for r in gate.reasons)
    assert slower == (ratio <= 1.0)  # kept only where it pays, on this machine's own figures
