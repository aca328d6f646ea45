"""Read model_repo/ and check its contract; refuse a broken repository with a fix for each problem."""

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import yaml
from google.protobuf.message import DecodeError
from pydantic import ValidationError

from cxr_triage.errors import ModelNotFound, RepositoryError
from cxr_triage.repository.models import CONFIG_FILE, METADATA_FILE, ModelConfig, VersionMetadata
from cxr_triage.repository.serving import SERVING_FILE, ServingState, read_serving_state

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VersionEntry:
    version: str
    path: Path
    metadata: VersionMetadata

    @property
    def engine_path(self) -> Path:
        return self.path / self.metadata.engine.file


@dataclass(frozen=True)
class ModelEntry:
    config: ModelConfig
    path: Path
    versions: dict[str, VersionEntry] = field(default_factory=dict)
    serving: ServingState | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def served(self) -> VersionEntry | None:
        """The version that serves traffic: the promoted one (serving.json), else the latest."""
        if self.serving is not None:
            return self.versions[self.serving.default_version]
        return self.latest

    @property
    def canary(self) -> VersionEntry | None:
        """The candidate version that gets a fraction of the traffic, if one is set."""
        if self.serving is None or self.serving.canary is None:
            return None
        return self.versions[self.serving.canary.version]

    @property
    def latest(self) -> VersionEntry | None:
        """The highest version number, or None when nothing has been exported yet."""
        return self.versions[max(self.versions, key=int)] if self.versions else None


@dataclass(frozen=True)
class ModelRepository:
    root: Path
    models: dict[str, ModelEntry]
    default_model: str

    @classmethod
    def load(
        cls, root: Path, default_model: str | None = None, check_engines: bool = True
    ) -> "ModelRepository":
        """Read and validate every model under ``root``.

        Raises:
            RepositoryError: listing every problem found, each with what to do about it.
        """
        problems: list[str] = []
        if not root.is_dir():
            raise RepositoryError(f"model repository {root} does not exist; create it or set CXR_MODEL_REPO")
        models = {}
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            entry = _load_model(folder, problems, check_engines)
            if entry is not None:
                models[entry.name] = entry
        if not models and not problems:
            problems.append(f"{root} holds no model folder with a {CONFIG_FILE}")
        chosen = _choose_default(models, default_model, problems)
        if problems:
            raise RepositoryError(
                "model repository " + str(root) + " is invalid:\n  - " + "\n  - ".join(problems)
            )
        return cls(root=root, models=models, default_model=chosen)

    def get(self, name: str | None) -> ModelEntry:
        """The named model (default model when ``name`` is None)."""
        key = name or self.default_model
        if key not in self.models:
            raise ModelNotFound(f"unknown model {key!r}; GET /v1/models lists the served models")
        return self.models[key]

    def servable(self) -> list[ModelEntry]:
        """Models that have at least one exported version."""
        return [m for m in self.models.values() if m.versions]


def _load_model(folder: Path, problems: list[str], check_engines: bool) -> ModelEntry | None:
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        problems.append(f"{folder.name}/: missing {CONFIG_FILE}; every model folder needs one")
        return None
    try:
        raw = yaml.safe_load(config_path.read_text()) or {}
        config = ModelConfig.model_validate(raw)
    except (yaml.YAMLError, ValidationError) as exc:
        problems.append(f"{folder.name}/{CONFIG_FILE}: {_short(exc)}")
        return None
    if config.name != folder.name:
        problems.append(f"{folder.name}/{CONFIG_FILE}: name {config.name!r} must equal the folder name")
        return None
    versions: dict[str, VersionEntry] = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        if not sub.name.isdigit():
            problems.append(f"{folder.name}/{sub.name}/: version folders are positive integers (1, 2, …)")
            continue
        version = _load_version(config, sub, problems, check_engines)
        if version is not None:
            versions[sub.name] = version
    try:
        serving = read_serving_state(folder)
    except ValueError as exc:
        problems.append(f"{folder.name}/{exc}; fix it or re-run `cxr-triage promote`")
        return None
    if serving is not None:
        gone = [v for v in serving.versions() if v not in versions]
        if gone:
            problems.append(
                f"{folder.name}/{SERVING_FILE} names version(s) {gone} that are not in the repository; "
                "restore them or promote an existing version"
            )
            return None
    return ModelEntry(config=config, path=folder, versions=versions, serving=serving)


def _load_version(
    config: ModelConfig, folder: Path, problems: list[str], check_engines: bool
) -> VersionEntry | None:
    where = f"{config.name}/{folder.name}"
    meta_path = folder / METADATA_FILE
    try:
        metadata = VersionMetadata.model_validate(json.loads(meta_path.read_text()))
    except FileNotFoundError:
        problems.append(f"{where}/: missing {METADATA_FILE}; re-run `cxr-triage export {config.name}`")
        return None
    except (ValueError, ValidationError) as exc:
        problems.append(f"{where}/{METADATA_FILE}: {_short(exc)}")
        return None
    if metadata.labels is not None and tuple(metadata.labels) != config.labels:
        problems.append(
            f"{where}: exported with labels {list(metadata.labels)} but config.yaml lists "
            f"{list(config.labels)}; restore the config or export a new version"
        )
    entry = VersionEntry(version=folder.name, path=folder, metadata=metadata)
    if config.type == "gzsl":
        problems.extend(f"{where}/: {p}" for p in check_gzsl(entry, config))
        return entry
    if not entry.engine_path.is_file():
        problems.append(f"{where}/: engine file {metadata.engine.file} is missing; re-export this version")
    elif check_engines:
        problems.extend(f"{where}/{metadata.engine.file}: {p}" for p in check_onnx(entry.engine_path, config))
    return entry


def check_gzsl(entry: VersionEntry, config: ModelConfig) -> list[str]:
    """Check a CXR-ML-GZSL version folder against its config (the files' SHA-256 are checked
    when a worker loads it); return the problems."""
    extra = entry.metadata.model_extra or {}
    spec = extra.get("gzsl")
    if extra.get("model_type") != "gzsl" or not isinstance(spec, dict):
        return [
            f"config.yaml says type: gzsl but {METADATA_FILE} is not a GZSL export; register it with "
            "`cxr-triage gzsl register`"
        ]
    problems = []
    if tuple(spec.get("labels", ())) != config.labels:
        problems.append(
            f"exported with labels {spec.get('labels')} but config.yaml lists {list(config.labels)}; "
            "restore the config or register a new version"
        )
    size = (spec.get("input") or {}).get("size")
    if size != config.input.size:
        problems.append(f"exported for {size} px input but config.yaml says input.size {config.input.size}")
    files = [spec.get("image_engine", {}).get("file"), spec.get("text_engine", {}).get("file")]
    files += [spec.get("tokenizer"), spec.get("label_latents")]
    missing = [f for f in files if not f or not (entry.path / f).is_file()]
    if missing:
        problems.append(f"files {missing} are missing; register this version again")
    return problems


def check_onnx(path: Path, config: ModelConfig) -> list[str]:
    """Check an ONNX file's input/output shapes against the model config; return the problems."""
    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except (OSError, DecodeError) as exc:
        return [f"not a readable ONNX file ({type(exc).__name__}); re-export this version"]
    inputs = [i for i in graph.input if i.name not in {init.name for init in graph.initializer}]
    outputs = 2 if config.heatmap == "cam" else 1
    if len(inputs) != 1 or len(graph.output) != outputs:
        return [
            f"this engine must take one input and give {outputs} output(s) (heatmap: {config.heatmap}); "
            f"it has {len(inputs)} and {len(graph.output)}: re-export it"
        ]
    problems = []
    in_dims = inputs[0].type.tensor_type.shape.dim
    out_dims = graph.output[0].type.tensor_type.shape.dim
    if len(in_dims) != 4 or in_dims[0].dim_value:
        problems.append(
            "input must be NCHW with a dynamic batch axis (export with a dynamic batch dimension)"
        )
    else:
        expected = (config.input.channels, config.input.size, config.input.size)
        fixed = tuple(d.dim_value for d in in_dims[1:])
        if any(f and f != e for f, e in zip(fixed, expected, strict=True)):
            problems.append(f"input shape {fixed} does not match config input {expected}")
    if len(out_dims) != 2 or (out_dims[1].dim_value and out_dims[1].dim_value != len(config.labels)):
        problems.append(f"output must be (batch, {len(config.labels)}) — one column per label")
    if outputs == 2:
        cam_dims = graph.output[1].type.tensor_type.shape.dim
        if len(cam_dims) != 4 or (cam_dims[1].dim_value and cam_dims[1].dim_value != len(config.labels)):
            problems.append(f"the heatmap output must be (batch, {len(config.labels)}, h, w)")
    return problems


def _choose_default(models: dict[str, ModelEntry], override: str | None, problems: list[str]) -> str:
    flagged = [m.name for m in models.values() if m.config.default]
    if override:
        if override not in models:
            problems.append(f"CXR_DEFAULT_MODEL={override!r} is not in the repository ({sorted(models)})")
        return override
    if len(flagged) > 1:
        problems.append(f"several models say `default: true` ({flagged}); keep exactly one")
    if flagged:
        return flagged[0]
    return next(iter(models), "")


def _short(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'file'}: {e['msg']}" for e in exc.errors())
    return str(exc).splitlines()[0]
