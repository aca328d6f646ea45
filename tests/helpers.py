"""Shared test helpers: real DICOM from pydicom-data, images, a tiny model repository, a server."""

import functools
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pydicom
import yaml
from PIL import Image
from pydicom.data import get_testdata_file

from cxr_triage.serving.lifecycle import die_with_parent

ROOT = Path(__file__).resolve().parents[1]
MODEL_REPO = ROOT / "model_repo"
DEFAULT_MODEL = "densenet121-nih14"


def dicom_path(name: str) -> Path:
    path = get_testdata_file(name)
    assert path, f"pydicom-data lacks {name}; install the dev extra"
    return Path(str(path))


def dicom_bytes(name: str) -> bytes:
    return dicom_path(name).read_bytes()


def dataset_bytes(ds: pydicom.Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(arr: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def chest_u8(size: int | None = None) -> np.ndarray:
    """RG1 (a real PA chest CR) as an 8-bit display image, optionally downsized."""
    from cxr_triage.imaging import ImageLimits, decode

    pixels = decode(dicom_bytes("RG1_UNCR.dcm"), "application/dicom", ImageLimits()).pixels
    img = Image.fromarray((pixels * 255).round().astype(np.uint8))
    return np.asarray(img.resize((size, size)) if size else img)


def make_tiny_repo(dest: Path, size: int = 64, batch_timeout_ms: float = 10.0, max_batch: int = 8) -> Path:
    """Copy model_repo/ configs (no versions) with a small input size, so exports stay fast."""
    dest.mkdir(parents=True, exist_ok=True)
    for folder in MODEL_REPO.iterdir():
        if not (folder / "config.yaml").is_file():
            continue
        config = yaml.safe_load((folder / "config.yaml").read_text())
        config["input"]["size"] = size
        config["batching"] = {"max_batch_size": max_batch, "batch_timeout_ms": batch_timeout_ms}
        if config["architecture"].startswith("vit"):
            config["architecture_kwargs"] = {"depth": 1, "embed_dim": 48, "num_heads": 2}
        (dest / folder.name).mkdir(exist_ok=True)
        (dest / folder.name / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return dest


def copy_repo(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def metrics_text(url: str) -> str:
    """``/metrics`` of a server, with the ``replica`` label every sample carries taken out (one
    server: it is the same everywhere), so tests can match the other labels exactly."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    assert re.search(r'replica="[^"]+"', text), "samples must name their replica"
    return re.sub(r"\{\}", "", re.sub(r',?replica="[^"]*"', "", text))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    """A started ``cxr-triage serve`` (its own session: its whole process group can be signalled)."""

    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def wait_ready(self, timeout: float = 90.0) -> "ServerProcess":
        _wait_ready(self.proc, self.url, timeout, self.log_path)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(
    repo: Path,
    env: dict[str, str] | None = None,
    port: int | None = None,
    log_path: Path | None = None,
    wrapper: tuple[str, ...] = (),
    address: str = "127.0.0.1",
) -> ServerProcess:
    """Start the real server as a process (not waiting for it). ``wrapper`` runs it through
    another command (``ip netns exec NS``); ``address`` is where the test reaches it."""
    port = port or free_port()
    full_env = {**os.environ, "CXR_MODEL_REPO": str(repo), "CXR_PORT": str(port), **(env or {})}
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix="cxr-server-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [*wrapper, sys.executable, "-m", "cxr_triage", "serve"],
            env=full_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # SIGTERM (a drain) when pytest ends, however it ends: a killed run leaves no server
            preexec_fn=functools.partial(die_with_parent, signal.SIGTERM),
        )
    return ServerProcess(proc, f"http://{address}:{port}", log_path)


@contextmanager
def running_server(
    repo: Path,
    env: dict[str, str] | None = None,
    timeout: float = 90.0,
    port: int | None = None,
    log_path: Path | None = None,
) -> Iterator[str]:
    """The real server as a process on a free 127.0.0.1 port; yields its base URL once /ready is 200."""
    server = start_server(repo, env, port, log_path)
    try:
        yield server.wait_ready(timeout).url
    finally:
        stop(server.proc)
        if log_path is None:
            server.log_path.unlink(missing_ok=True)


def _wait_ready(proc: subprocess.Popen[bytes], url: str, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"server at {url} not ready after {timeout}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    # Workers live in the same session: make sure none outlives the test.
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def require_binary(name: str, package: str) -> str:
    """Path of a service binary; skip without it, unless CI demands every service."""
    import pytest

    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))  # venv tools
    if path is None:
        if os.environ.get("CXR_REQUIRE_SERVICES") == "1":
            pytest.fail(f"{name} is missing: apt-get install {package} (make services)")
        pytest.skip(f"{name} is missing: apt-get install {package}")
    return path


@contextmanager
def redis_server(data_dir: Path, appendonly: bool = False, port: int | None = None) -> Iterator[str]:
    """A Debian redis-server on 127.0.0.1; yields its URL."""
    binary = require_binary("redis-server", "redis-server")
    port = port or free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    args = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--dir", str(data_dir)]
    args += ["--appendonly", "yes", "--appendfsync", "always"] if appendonly else ["--appendonly", "no"]
    proc = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        _wait_redis(url, proc)
        yield url
    finally:
        stop(proc)


def _wait_redis(url: str, proc: subprocess.Popen[bytes]) -> None:
    import redis

    for _ in range(100):
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {proc.returncode}")
        with suppress(redis.RedisError):
            if redis.Redis.from_url(url).ping():
                return
        time.sleep(0.05)
    raise TimeoutError("redis-server did not start")


@contextmanager
def orthanc(workdir: Path, dicomweb_servers: dict[str, str] | None = None) -> Iterator[str]:
    """A real Orthanc with its DICOMweb plugin on free 127.0.0.1 ports; yields its HTTP URL."""
    import json

    binary = require_binary("Orthanc", "orthanc orthanc-dicomweb")
    http_port, dicom_port = free_port(), free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "cxr-test-orthanc",
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "Plugins": ["/usr/share/orthanc/plugins"],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": dicomweb_servers or {}},
    }
    (workdir / "orthanc.json").write_text(json.dumps(config))
    log = (workdir / "orthanc.log").open("wb")
    proc = subprocess.Popen([binary, str(workdir / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{http_port}"
    try:
        for _ in range(200):
            if proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(workdir / 'orthanc.log').read_text()[-2000:]}")
            with suppress(httpx.HTTPError):
                if httpx.get(f"{url}/system", timeout=2).status_code == 200:
                    break
            time.sleep(0.1)
        yield url
    finally:
        stop(proc)
        log.close()


def add_version(
    model_dir: Path,
    source: str = "1",
    scale: float = 1.0,
    thresholds: dict[str, float] | None = None,
    engine: bytes | None = None,
) -> str:
    """Register a new version of an exported model by copying version ``source`` (no torch).

    ``scale`` multiplies the classifier weights (the one initializer shaped (labels, features)),
    so the new version's probabilities differ; ``thresholds`` go into its metadata.json (its
    own operating points); ``engine`` replaces the ONNX file's bytes (e.g. a corrupt one). The
    folder is renamed into place whole, as the exporter does. Returns the new version.
    """
    import hashlib
    import json
    import uuid

    import onnx
    from onnx import numpy_helper

    labels = yaml.safe_load((model_dir / "config.yaml").read_text())["labels"]
    staging = model_dir / f".staging-{uuid.uuid4().hex[:8]}"
    shutil.copytree(model_dir / source, staging)
    meta = json.loads((staging / "metadata.json").read_text())
    onnx_path = staging / meta["engine"]["file"]
    if engine is None and scale != 1.0:
        model = onnx.load(str(onnx_path))
        heads = [i for i in model.graph.initializer if len(i.dims) == 2 and i.dims[0] == len(labels)]
        assert len(heads) == 1, f"expected one classifier initializer, found {[h.name for h in heads]}"
        weights = numpy_helper.to_array(heads[0]) * np.float32(scale)
        heads[0].CopyFrom(numpy_helper.from_array(weights, heads[0].name))
        onnx.save(model, str(onnx_path))
    elif engine is not None:
        onnx_path.write_bytes(engine)
    meta["engine"]["sha256"] = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    if thresholds is not None:
        meta["thresholds"] = thresholds
    (staging / "metadata.json").write_text(json.dumps(meta, indent=2))
    version = str(max(int(p.name) for p in model_dir.iterdir() if p.name.isdigit()) + 1)
    staging.rename(model_dir / version)
    return version


def save_tiny_bert(folder: Path) -> Path:
    """A tiny random BERT with all-MiniLM-L6-v2's tokenizer, saved as a local Hugging Face
    folder (the "any encoder given by path" route, e.g. BioBERT): GZSL exports stay fast."""
    import torch
    from transformers import BertConfig, BertModel

    from cxr_triage.train.gzsl.text import resolve

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(folder)
    minilm, _ = resolve("all-MiniLM-L6-v2")
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm / name, folder / name)
    return folder
