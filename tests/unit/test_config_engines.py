from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from pydantic import ValidationError

from cxr_triage.config import Settings
from cxr_triage.engines import Engine, OnnxEngine, accelerated, choose_providers


def test_defaults_bind_loopback_8000(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("CXR_HOST", "CXR_PORT"):
        monkeypatch.delenv(key, raising=False)
    s = Settings()
    assert (s.host, s.port, s.backend) == ("127.0.0.1", 8000, "auto")


def test_env_overrides_and_bad_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_PORT", "9123")
    monkeypatch.setenv("CXR_MODELS", '["densenet121-nih14"]')
    s = Settings()
    assert s.port == 9123 and s.models == ["densenet121-nih14"]
    monkeypatch.setenv("CXR_HOST", "10.1.2.3")
    with pytest.raises(ValidationError, match="CXR_HOST"):
        Settings()


def test_provider_choice_prefers_accelerators_and_always_keeps_cpu() -> None:
    everything = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers("auto", everything) == everything
    assert choose_providers("auto", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]
    assert choose_providers("cuda", everything) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choose_providers("tensorrt", ["CPUExecutionProvider"]) == ["CPUExecutionProvider"]


def tiny_onnx(path: Path, labels: int = 3) -> Path:
    """Global average pool -> Gemm -> Sigmoid: enough to check the engine's plumbing."""
    w = helper.make_tensor("w", TensorProto.FLOAT, [3, labels], np.eye(3, labels).ravel().tolist())
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["probabilities"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", labels])],
        [w],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_onnx_engine_runs_any_batch_size(tmp_path: Path) -> None:
    engine = OnnxEngine(tiny_onnx(tmp_path / "m.onnx"), "auto", intra_op_threads=1)
    assert isinstance(engine, Engine) and engine.backend == "onnxruntime-cpu"
    for n in (1, 5):
        x = np.zeros((n, 3, 16, 16), dtype=np.float32)
        x[:, 1] = 2.0
        out = engine.run(x)
        assert out.shape == (n, 3)
        np.testing.assert_allclose(out[:, 1], 1 / (1 + np.exp(-2.0)), rtol=1e-6)


def test_cpu_engines_are_one_single_threaded_worker_per_core_plus_the_urgent_lane(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("cxr_triage.config.usable_cores", lambda: 4)
    cpu = Settings().resolved_engines(accelerated=False)
    assert (cpu.inference_workers, cpu.intra_op_threads, cpu.litserve_workers) == (4, 1, 5)
    gpu = Settings().resolved_engines(accelerated=True)
    assert (gpu.inference_workers, gpu.intra_op_threads) == (1, 4)
    pinned = Settings(inference_workers=2, intra_op_threads=3, urgent_lane=False).resolved_engines(False)
    assert (pinned.inference_workers, pinned.intra_op_threads, pinned.litserve_workers) == (2, 3, 2)
    assert Settings(inference_workers=3).resolved_engines(False).intra_op_threads == 1  # 4 // 3


def test_workers_follow_the_cores_this_process_may_use_not_the_hosts(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A container given 2 CPUs (cgroup v2 quota) on a 64-core host: 2 inference workers and 2
    decoding processes per HTTP process, not 64 (each worker holds an engine in memory)."""
    import cxr_triage.cores as cores

    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("200000 100000\n")
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(64)))
    monkeypatch.setattr(cores, "CPU_MAX", cpu_max)
    monkeypatch.setattr(cores, "CPU_V1", tmp_path / "no-cgroup-v1")
    cores.usable_cores.cache_clear()
    try:
        s = Settings().resolved_engines(accelerated=False)
        assert (s.inference_workers, s.intra_op_threads) == (2, 1)
        assert Settings().resolved_decode_workers() == 2
    finally:
        cores.usable_cores.cache_clear()


def test_the_cpu_engine_batches_at_most_cpu_max_batch_size() -> None:
    from cxr_triage.repository import BatchingSpec
    from cxr_triage.serving.api import TriageAPI

    api = TriageAPI(Settings(backend="cpu", cpu_max_batch_size=2), {}, BatchingSpec(max_batch_size=8))
    assert api.max_batch_size == 2
    assert TriageAPI(Settings(backend="cpu"), {}, BatchingSpec(max_batch_size=1)).max_batch_size == 1
    assert accelerated("cpu", ["CUDAExecutionProvider", "CPUExecutionProvider"]) is False
    assert accelerated("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"]) is True
    assert accelerated("auto", ["CPUExecutionProvider"]) is False
