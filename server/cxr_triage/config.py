"""The one Settings object: every knob of the service, read from ``CXR_*`` environment variables.

Build it once at the edge (the CLI) and pass it in; nothing else in the package reads the
environment. Defaults are the embedded development set-up: loopback only, CPU engine.
"""

import os
import socket
import tempfile
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cxr_triage.cores import usable_cores

Backend = Literal["auto", "cpu", "cuda", "tensorrt"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CXR_", env_file=None, extra="ignore")

    host: str = Field("127.0.0.1", description="address to bind; LitServe accepts 127.0.0.1, 0.0.0.0 or ::")
    port: int = Field(8000, ge=1024, le=65535)
    model_repo: Path = Field(Path("model_repo"), description="the model repository folder")
    default_model: str | None = Field(None, description="overrides the repository's `default: true` model")
    models: list[str] | None = Field(None, description="models to serve; default: every model with a version")
    reload_poll_s: float = Field(
        2.0,
        ge=0,
        description="how often (s) each process looks for a changed serving.json (promotion, canary) "
        "and switches versions without a restart; 0 = never",
    )
    backend: Backend = Field("auto", description="engine preference; auto picks TensorRT > CUDA > CPU")
    inference_workers: int = Field(
        0,
        ge=0,
        le=64,
        description="LitServe inference processes; 0 = one per usable core on the CPU engine, 1 on a GPU",
    )
    intra_op_threads: int = Field(
        0,
        ge=0,
        description="ONNX Runtime threads per engine; 0 = the cores shared out among inference workers",
    )
    cpu_max_batch_size: int = Field(
        2,
        ge=1,
        le=1024,
        description="largest engine batch on the CPU engine (config.yaml's max_batch_size applies on a GPU): "
        "a CPU gains nothing per image from big batches, and a stat study waits for the batch running",
    )
    urgent_lane: bool = Field(
        True,
        description="one more inference worker that only scores jobs due within the urgent class's max "
        "wait (stat and urgent studies, and overdue ones), so they never wait for a routine batch",
    )
    lane_scores_lone: bool = Field(
        True,
        description="the urgent lane also scores a lone routine job (the only one queued while none is "
        "being scored: a quiet moment) at once, on every core, instead of one routine worker after its "
        "batch window",
    )
    lane_preempts: bool = Field(
        True,
        description="on a CPU engine, routine workers stop their engine run while the urgent lane scores "
        "and run that batch again after it, so that a stat study has every core",
    )
    routine_nice: int = Field(
        10,
        ge=0,
        le=19,
        description="OS niceness of the inference workers that score routine work; the urgent lane, HTTP "
        "and decoding keep the default, so a stat study is not queued for CPU behind routine inference",
    )
    http_servers: int = Field(
        0,
        ge=0,
        description="HTTP server processes (LitServe's API servers); 0 = LitServe's default, one per "
        "inference process (the urgent lane's included)",
    )
    decode_workers: int = Field(
        0, ge=0, description="image decoding processes of each HTTP server process; 0 = one per usable core"
    )
    decode_threads: int = Field(
        0,
        ge=0,
        description="most threads one JPEG 2000 decode may take while cores are idle (a study arriving "
        "at a quiet moment is decoded sooner; under load each decode keeps one thread, the least CPU per "
        "image); 0 = every usable core, 1 = always one",
    )
    inline_decode_pixels: int = Field(
        512 * 512,
        ge=0,
        description="PNG and JPEG uploads of at most this many pixels are decoded in the HTTP process "
        "(under a millisecond), larger ones and DICOM in the decoding processes; 0 = always there",
    )
    max_upload_bytes: int = Field(64 * 1024 * 1024, ge=1024, description="largest request body accepted")
    max_pixels: int = Field(40_000_000, ge=1, description="largest decoded image (rows x columns)")
    request_timeout_s: float = Field(30.0, gt=0, description="a request waiting longer is answered 504")
    redis_url: str | None = Field(None, description="external Redis; default: embedded Redis under data_dir")
    data_dir: Path = Field(Path("data"), description="embedded Redis data (append-only file)")
    lease_s: float = Field(30.0, gt=0, description="a leased job not acknowledged in time is re-delivered")
    max_attempts: int = Field(3, ge=1, description="deliveries before a job that keeps failing is failed")
    replica_id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,62}$",
        description="this replica's name in results, job records and metrics (one per replica, so a "
        "bounded label); default: host name:port (in Kubernetes: the pod name)",
    )
    drain_grace_s: float = Field(
        40.0,
        ge=0,
        description="after SIGTERM: longest drain (stop leasing, finish or release held jobs, answer "
        "requests in flight) before the replica exits; keep below the orchestrator's grace period",
    )
    max_queue: int = Field(512, ge=0, description="queued jobs above which synchronous requests get 429")
    max_wait_s: dict[str, float] = Field(
        default_factory=lambda: {"stat": 0.0, "urgent": 15.0, "routine": 60.0, "backfill": 600.0},
        description="per priority class: how long newer higher-class jobs may overtake a job",
    )
    backfill_batch: int = Field(
        2,
        ge=1,
        description="most backfill (archive) jobs in one engine batch: a live study arriving meanwhile "
        "waits for at most this many archive images",
    )
    clinical_window: int = Field(200, ge=1, le=5000, description="recent reports behind the clinical metrics")
    worklist_max_wait_s: float = Field(4 * 3600.0, gt=0, description="no unread study waits much longer")
    pacs_url: str | None = Field(
        None, description="the PACS's DICOMweb root, e.g. http://pacs:8042/dicom-web"
    )
    pacs_username: str | None = None
    pacs_password: SecretStr | None = None
    pacs_store_sr: bool = Field(True, description="store a DICOM SR of each scored study back to the PACS")
    pacs_poll_s: float = Field(0.0, ge=0, description="poll the PACS for new CR/DX studies (s); 0 = off")
    metrics_dir: Path | None = Field(None, description="Prometheus multiprocess folder; default: a temp dir")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    otel_exporter_otlp_endpoint: str | None = Field(
        None, validation_alias="OTEL_EXPORTER_OTLP_ENDPOINT", description="traces over OTLP/HTTP when set"
    )
    otel_service_name: str = Field("cxr-triage", validation_alias="OTEL_SERVICE_NAME")
    api_keys: list[SecretStr] = Field(
        default_factory=list, description='JSON list; clients send "Authorization: Bearer <key>" or X-API-Key'
    )
    behind_auth_proxy: bool = Field(False, description="an authenticating proxy guards a non-loopback bind")
    max_stow_parts: int = Field(256, ge=1, description="instances accepted in one STOW-RS request")

    @model_validator(mode="after")
    def _no_open_bind(self) -> "Settings":
        if self.host != "127.0.0.1" and not self.api_keys and not self.behind_auth_proxy:
            raise ValueError(
                f"refusing to bind {self.host} with no authentication: set CXR_API_KEYS, "
                "or CXR_BEHIND_AUTH_PROXY=true if a proxy authenticates every request"
            )
        return self

    @field_validator("host")
    @classmethod
    def _known_host(cls, v: str) -> str:
        if v not in ("127.0.0.1", "0.0.0.0", "::"):
            raise ValueError(
                "CXR_HOST must be 127.0.0.1 (default), 0.0.0.0 or :: (LitServe binds only these)"
            )
        return v

    @field_validator("max_wait_s")
    @classmethod
    def _every_class(cls, v: dict[str, float]) -> dict[str, float]:
        order = ["stat", "urgent", "routine", "backfill"]
        if sorted(v) != sorted(order) or any(x < 0 for x in v.values()):
            raise ValueError(f"CXR_MAX_WAIT_S needs a non-negative number of seconds for each of {order}")
        if [v[k] for k in order] != sorted(v[k] for k in order):
            raise ValueError("CXR_MAX_WAIT_S must not decrease from stat to backfill")
        return v

    @property
    def replica(self) -> str:
        return self.replica_id or f"{socket.gethostname()[:56]}:{self.port}"

    def resolved_decode_workers(self) -> int:
        return self.decode_workers or usable_cores()

    def resolved_decode_threads(self) -> int:
        return self.decode_threads or usable_cores()

    def resolved_engines(self, accelerated: bool) -> "Settings":
        """These settings with ``inference_workers`` and ``intra_op_threads`` made concrete.

        On the CPU engine, engine threads are matched to cores: one inference worker per core,
        each with one intra-op thread, runs whole images side by side, which beats one engine
        splitting each image across cores (no barrier waits, and a core taken a moment by
        decoding or HTTP stalls one image, not every thread of a parallel one). On a GPU one
        worker feeds the device. ``accelerated``: the engine backend is a GPU one. Cores are the
        usable ones (``cores.usable_cores``: CPU affinity and a container's CPU quota), not the
        host's: a container given 2 CPUs on a 64-core host starts 2 workers, not 64.
        """
        cores = usable_cores()
        workers = self.inference_workers or (1 if accelerated else cores)
        threads = self.intra_op_threads or max(1, cores // workers)
        return self.model_copy(update={"inference_workers": workers, "intra_op_threads": threads})

    @property
    def litserve_workers(self) -> int:
        """Inference processes LitServe starts: the workers, then the urgent lane's."""
        return self.inference_workers + int(self.urgent_lane)

    def prepare_process_environment(self) -> Path:
        """Point prometheus-client at a multiprocess folder before any metric is created.

        prometheus-client picks its value storage from ``PROMETHEUS_MULTIPROC_DIR`` when it is
        imported, and LitServe runs the HTTP server and the inference workers as separate
        processes that inherit this environment; so this runs once, first, in the CLI.
        Returns the folder (emptied: stale files from a dead process would be counted again).
        """
        folder = self.metrics_dir or Path(tempfile.mkdtemp(prefix="cxr-triage-metrics-"))
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.db"):
            stale.unlink()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
        return folder


def litserve_worker_id() -> str | None:
    """This inference worker's number, which LitServe sets in each worker process before
    ``setup`` (after Settings were built in the parent, so it is not a Settings field)."""
    return os.environ.get("LITSERVE_WORKER_ID")


class TrainerSettings(BaseSettings):
    """The trainer's environment: where MLflow records go, and the launch torchrun describes.

    ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` are torchrun's own variables (no CXR_ prefix):
    set in each process it starts, absent in a plain run.
    """

    model_config = SettingsConfigDict(env_prefix="CXR_", env_file=None, extra="ignore")

    mlflow: bool = Field(
        True, description="log train/evaluate runs and versions to MLflow (CXR_MLFLOW=off: no)"
    )
    mlflow_tracking_uri: str | None = Field(
        None,
        validation_alias=AliasChoices("CXR_MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI"),
        description="a shared MLflow server; default: sqlite beside the runs",
    )
    rank: int = Field(0, ge=0, validation_alias="RANK")
    world_size: int = Field(1, ge=1, validation_alias="WORLD_SIZE")
    local_rank: int | None = Field(None, ge=0, validation_alias="LOCAL_RANK")

    @property
    def under_torchrun(self) -> bool:
        return self.local_rank is not None

    @staticmethod
    def prepare_mlflow_environment() -> None:
        """MLflow calls home unless told not to; this machine and many hospitals have no internet."""
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
