"""Importers for weights users already have: torchxrayvision DenseNets and CXR-ML-GZSL checkpoints.

Nothing here downloads anything. Every file is read with ``torch.load(map_location="cpu",
weights_only=True)``, so no code in the file runs. A file may hold a bare state dict or one nested
under ``state_dict`` / ``model`` / ``model_state_dict``; ``module.`` prefixes (DataParallel) are
stripped. Anything that does not fit raises :class:`~cxr_triage.errors.ExportError` with the first
mismatching keys and what to check.

torchxrayvision (``mlmed/torchxrayvision``, ``torchxrayvision/models.py`` at commit f4087a0)
-------------------------------------------------------------------------------------------------
``xrv.models.DenseNet`` (models.py:185) is torchvision's DenseNet-121 with ``in_channels=1``:
``features`` is an ``nn.Sequential`` of ``conv0`` (1 input channel, models.py:275), ``norm0``,
``denseblock1-4`` of ``_DenseLayer`` (``norm1, conv1, norm2, conv2``, models.py:147),
``transition1-3`` (``norm, conv``, models.py:175) and ``norm5`` (models.py:294); then
``classifier = nn.Linear(1024, 18)`` (models.py:297) and the buffer ``op_threshs`` (18,)
(models.py:310, filled from ``model_urls[weights]["op_threshs"]`` at models.py:330 after the
weights are loaded). ``forward`` is ``relu(features(x))`` -> global average pool -> ``classifier``
(``features2`` and ``forward``, models.py:341-357), which is exactly timm's ``densenet121`` (its
``norm5`` is a BatchNorm + ReLU), so the key mapping is:

    features.*                               -> features.*        (same names in timm)
    features.*.denselayerN.norm.1.weight     -> ...denselayerN.norm1.weight  (old torchvision
        checkpoints; the regex of torchvision.models.densenet._load_state_dict)
    features.conv0.weight (64, 1, 7, 7)      -> kept for ``channels: 1``; for ``channels: 3`` it is
        repeated over 3 channels and divided by 3, which gives the same logits on a grey image
        replicated over the 3 channels (what ``to_batch`` feeds)
    classifier.weight (18, 1024), .bias (18) -> rows picked and reordered to ``config.labels`` by
        pathology name
    op_threshs (18,)                         -> not a weight: returned in ImportReport.operating_points
        (Youden-J points on the sigmoid of each output, scripts/model_calibrate.py:197-202)

xrv's ``forward`` with ``op_threshs`` set rescales each sigmoid so its op_thresh maps to 0.5
(``op_norm``, models.py:359-361); the engine here outputs the plain sigmoid, so xrv's calls are
reproduced by thresholding at ``op_threshs`` (``ImportReport.source_thresholds()``), not at 0.5.

The 18 outputs, in order, are ``XRV_PATHOLOGIES`` (``DenseNet.targets`` and
``datasets.default_pathologies``). Weights trained on fewer datasets leave some outputs untrained:
their ``model_urls[...]["labels"]`` entry is ``""`` and their ``op_threshs`` entry is NaN
(``nih``: outputs 14-17; ``pc``: 14, 16, 17; ``chex``/``mimic_nb``/``mimic_ch``: 2, 5, 6, 9, 11-13;
``rsna``: all but Pneumonia and Lung Opacity). Mapping a config label onto such an output is refused.

Input: 1 channel, 224 x 224, pixels scaled to [-1024, 1024] by ``xrv.utils.normalize``
(utils.py:53-63: ``(2 * (x / maxval) - 1) * 1024``), i.e. ``(x01 - 0.5) / (1 / 2048)`` on a 0-1
image: ``input.mean: [0.5]``, ``input.std: [0.00048828125]``. xrv centre-crops to a square
(datasets.py:2322, ``XRayCenterCrop``) then resizes (``XRayResizer``).

torchxrayvision's released ``.pt`` files pickle the whole module (models.py:316 loads them with
``weights_only=False``), which this importer refuses to unpickle; convert once where torchxrayvision
is installed::

    python -c "import torch, torchxrayvision as xrv; torch.save(xrv.models.DenseNet(
        weights='densenet121-res224-all').state_dict(), 'xrv-all.pt')"

CXR-ML-GZSL (Hayat et al. 2021, ``nyuad-cai/CXR-ML-GZSL`` at commit 01ed953)
-----------------------------------------------------------------------------
``ChexnetTrainer.save_checkpoint`` (ChexnetTrainer.py:93-102) saves ``{"epoch", "state_dict":
self.model.state_dict(), "max_auroc_mean", "optimizer", "lossMIN"}``; the model is a plain
``ZSLNet(...).to(device)`` (ChexnetTrainer.py:31), no DataParallel, so no ``module.`` prefix (one
is stripped anyway). ``ZSLNet`` (zsl_models.py:11-70):

    vision_backbone = torchvision.models.densenet121(...)   (zsl_models.py:21; densenet169/201 via
        --vision-backbone, arguments.py:18), its ``classifier`` replaced by ``nn.Identity``
        (zsl_models.py:23-30): no classifier keys
    fc_v = Sequential(Linear(1024, 512), ReLU, Linear(512, 256), ReLU, Linear(256, 128))
        (zsl_models.py:56-62): image projection
    fc_t = Sequential(Linear(d_textual, 512), ReLU, Linear(512, 256), ReLU, Linear(256, 128))
        (zsl_models.py:64-70): text projection; d_textual = 1024 for the shipped BioBERT
        embeddings (embeddings/nih_chest_xray_biobert.npy, 14 x 1024), which are a plain
        attribute, not in the state dict
    classifier = Sequential(Linear(1024, num_classes), Sigmoid) only with --bce-only
        (zsl_models.py:45-47), instead of fc_v / fc_t

so the mapping is:

    vision_backbone.features.*  -> GzslWeights.backbone ``features.*`` (timm densenet names;
                                   old ``norm.1`` names renamed as above)
    fc_v.{0,2,4}.{weight,bias}  -> GzslWeights.image_projection ``{0,2,4}.{weight,bias}``
    fc_t.{0,2,4}.{weight,bias}  -> GzslWeights.text_projection ``{0,2,4}.{weight,bias}``
    classifier.0.{weight,bias}  -> GzslWeights.bce_classifier (``--bce-only`` checkpoints)

The projections load strictly into ``build_projection(sizes)``. The encoder was trained on RGB
images with ImageNet normalisation (ChexnetTrainer.py:105).
"""

import itertools
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import timm
import torch
from torch import Tensor, nn

from cxr_triage.errors import ExportError
from cxr_triage.repository.models import ModelConfig
from cxr_triage.train.models import build_backbone

log = logging.getLogger(__name__)

XRV_PATHOLOGIES: tuple[str, ...] = (
    "Atelectasis",
    "Consolidation",
    "Infiltration",
    "Pneumothorax",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Effusion",
    "Pneumonia",
    "Pleural_Thickening",
    "Cardiomegaly",
    "Nodule",
    "Mass",
    "Hernia",
    "Lung Lesion",
    "Fracture",
    "Lung Opacity",
    "Enlarged Cardiomediastinum",
)
XRV_MEAN = 0.5
XRV_STD = 1.0 / 2048  # 0.00048828125: a 0-1 image -> [-1024, 1024], as xrv.utils.normalize
XRV_RESOLUTION = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
InitKind = Literal["torchxrayvision", "gzsl", "torch"]

_NESTED = ("state_dict", "model", "model_state_dict")
# torchvision.models.densenet._load_state_dict: "denselayer1.norm.1.weight" -> "denselayer1.norm1.weight"
_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)
_DENSE_LAYER = re.compile(r"features\.denseblock(\d+)\.denselayer(\d+)\.")
_DENSENETS: dict[tuple[int, ...], str] = {
    (6, 12, 24, 16): "densenet121",
    (6, 12, 32, 32): "densenet169",
    (6, 12, 48, 32): "densenet201",
    (6, 12, 36, 24): "densenet161",
}
_CONV0 = "features.conv0.weight"
_XRV_HINT = (
    "expected a torchxrayvision DenseNet-121 state dict (xrv.models.DenseNet(...).state_dict()); "
    "ResNet or autoencoder weights are not supported"
)


# --- reading files --------------------------------------------------------------------------


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """A flat ``{name: tensor}`` from a torch file: bare, or nested under state_dict/model/
    model_state_dict (at any depth); ``module.`` prefixes stripped. Never runs code from the file.

    Raises:
        ExportError: missing file, not a torch file, a pickled module, or no tensors in it.
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path} not found")
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if found:
            raise ExportError(
                f"{path.name} is not a plain state dict: it pickles Python objects ({found.group(1)}), "
                f"e.g. a whole nn.Module, as torchxrayvision's released .pt files do; it is not "
                f"unpickled here. Save its state dict once where that library is installed: "
                f"torch.save(model.state_dict(), 'weights.pt')"
            ) from exc
        detail = str(exc).strip().splitlines()[-1][:200] if str(exc).strip() else type(exc).__name__
        raise ExportError(
            f"{path.name} is not a readable torch file ({type(exc).__name__}: {detail})"
        ) from exc
    for _ in range(4):
        if not isinstance(obj, Mapping):
            break
        inner = next((obj[k] for k in _NESTED if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise ExportError(
            f"{path.name} holds {type(obj).__name__}, not a state dict (a dict of tensors, or one under "
            f"{'/'.join(_NESTED)})"
        )
    odd = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if odd:
        raise ExportError(
            f"{path.name} is not a state dict: entries that are not tensors: {odd[:5]}; "
            f"top-level keys {[str(k) for k in list(obj)[:8]]}"
        )
    state: dict[str, Tensor] = {}
    for key, value in obj.items():
        name = key
        while name.startswith("module."):
            name = name[len("module.") :]
        if name in state:
            raise ExportError(f"{path.name}: {key!r} and another key both become {name!r} without 'module.'")
        state[name] = value
    return state


def rename_old_densenet_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Old torchvision DenseNet names (``denselayer1.norm.1.weight``) -> current (``norm1.weight``)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        match = _OLD_DENSENET_KEY.match(key)
        out[match.group(1) + match.group(2) if match else key] = value
    return out


# --- fitting a state dict to a model --------------------------------------------------------


def _target(config: ModelConfig) -> tuple[dict[str, torch.Size], set[str]]:
    """Parameter/buffer shapes of ``build_backbone(config)`` (built on the meta device: no memory,
    no init cost) and the keys of its classifier."""
    with torch.device("meta"):
        model: Any = build_backbone(config)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    return shapes, _head_keys(model, shapes)


def _head_keys(model: Any, shapes: Mapping[str, torch.Size]) -> set[str]:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    prefix = next((name for name, m in model.named_modules() if name and m is head), None)
    if prefix is None:
        return set()
    return {k for k in shapes if k.startswith(prefix + ".")}


def _check_fits(
    state: dict[str, Tensor],
    shapes: Mapping[str, torch.Size],
    what: str,
    hint: str,
    may_miss: set[str] | frozenset[str] = frozenset(),
) -> None:
    """Raise unless ``state`` loads into a model of ``shapes`` (strictly, but for ``may_miss``).
    BatchNorm counters absent from old checkpoints are filled in (0), as torch itself does."""
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked") and key not in state and key not in may_miss:
            state[key] = torch.zeros(shape, dtype=torch.long)
    missing = [k for k in shapes if k not in state and k not in may_miss]
    unexpected = [k for k in state if k not in shapes]
    wrong = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(shapes[k])}"
        for k in state
        if k in shapes and state[k].shape != shapes[k]
    ]
    if missing or unexpected or wrong:
        raise ExportError(
            f"{what}: missing {missing[:5]} ({len(missing)} in all), unexpected {unexpected[:5]} "
            f"({len(unexpected)} in all), wrong shapes {wrong[:3]}; {hint}"
        )


def adapt_first_conv(weight: Tensor, channels: int, what: str = "features.conv0.weight") -> Tensor:
    """Fit a first convolution to ``channels`` inputs. 1 -> 3: repeat and divide by 3, so a grey
    image replicated over 3 channels gives the same output; 3 -> 1: sum over channels (the same
    on a grey image when each channel is normalised alike)."""
    have = weight.shape[1]
    if have == channels:
        return weight
    if have == 1:
        return weight.repeat(1, channels, 1, 1) / channels
    if channels == 1:
        return weight.sum(dim=1, keepdim=True)
    raise ExportError(f"{what} has {have} input channels; the config asks for {channels}")


# --- torchxrayvision ------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelMapping:
    """Config label ``label`` is the source output ``index``, named ``source`` there."""

    label: str
    source: str
    index: int


@dataclass(frozen=True)
class ImportReport:
    """What an import did, and what the model config must say for the weights to mean anything."""

    source: str
    file: str
    mapped: tuple[LabelMapping, ...]
    dropped_outputs: tuple[str, ...]
    """Trained source outputs that no config label uses."""
    untrained_outputs: tuple[int, ...]
    """Source outputs the weights never trained (empty pathology name or NaN operating point)."""
    input_channels: int
    input_mean: tuple[float, ...]
    input_std: tuple[float, ...]
    operating_points: dict[str, float | None]
    """The source's own operating points per source pathology (xrv ``op_threshs``: Youden-J points on
    the sigmoid, chosen on its own data; None where NaN). Informative, not applied."""
    notes: tuple[str, ...] = ()

    def source_thresholds(self) -> dict[str, float]:
        """The source's operating points for the config labels (where it has one), usable as a
        version's ``thresholds`` in metadata: they are on the same sigmoid scale as the engine."""
        out: dict[str, float] = {}
        for m in self.mapped:
            value = self.operating_points.get(m.source)
            if value is not None and 0.0 < value < 1.0:
                out[m.label] = value
        return out

    def __str__(self) -> str:
        moved = sum(1 for i, m in enumerate(self.mapped) if m.index != i)
        dropped = f"dropped {', '.join(self.dropped_outputs)}" if self.dropped_outputs else "none dropped"
        norm = ", ".join(f"(x - {m:g}) / {s:g}" for m, s in zip(self.input_mean, self.input_std, strict=True))
        return (
            f"{self.source}: {len(self.mapped)} labels mapped ({moved} reordered), {dropped}; "
            f"input {self.input_channels} channel(s) {norm}"
            + (f"; {'; '.join(self.notes)}" if self.notes else "")
        )


def check_xrv_config(config: ModelConfig) -> None:
    """Raise unless ``config`` feeds a torchxrayvision DenseNet what it was trained on."""
    if config.architecture != "densenet121":
        raise ExportError(
            f"{config.name}: torchxrayvision DenseNet weights need architecture: densenet121 "
            f"(the config says {config.architecture})"
        )
    spec = config.input
    ok = all(math.isclose(m, XRV_MEAN, rel_tol=1e-4) for m in spec.mean) and all(
        math.isclose(s, XRV_STD, rel_tol=1e-4) for s in spec.std
    )
    if not ok:
        n = spec.channels
        raise ExportError(
            f"{config.name}: torchxrayvision models expect pixels in [-1024, 1024] "
            f"(xrv.utils.normalize); the config's input.mean {list(spec.mean)} / input.std "
            f"{list(spec.std)} do not give that. Set input.mean: {[XRV_MEAN] * n} and "
            f"input.std: {[XRV_STD] * n} in {config.name}/config.yaml"
        )


def import_torchxrayvision(
    state_dict_path: Path, config: ModelConfig, pathologies: Sequence[str] | None = None
) -> tuple[dict[str, Tensor], ImportReport]:
    """A torchxrayvision DenseNet state dict as a state dict for ``build_backbone(config)`` (loads
    strictly), with the classifier rows picked and ordered as ``config.labels``.

    ``pathologies`` are the file's output names in order (default ``XRV_PATHOLOGIES``, the order of
    every xrv DenseNet; ``""`` marks an untrained output).

    Raises:
        ExportError: the config's architecture or input normalisation do not fit xrv weights (says
        what to set), a config label is not among the outputs or untrained in these weights, or the
        file is not an xrv DenseNet-121 state dict.
    """
    state, report = _import_xrv(Path(state_dict_path), config, pathologies, for_init=False)
    assert report is not None
    return state, report


def _import_xrv(
    path: Path, config: ModelConfig, pathologies: Sequence[str] | None, for_init: bool
) -> tuple[dict[str, Tensor], ImportReport | None]:
    check_xrv_config(config)
    state = rename_old_densenet_keys(read_state_dict(path))
    op = state.pop("op_threshs", None)
    weight, bias = state.get("classifier.weight"), state.get("classifier.bias")
    if weight is None or bias is None or weight.ndim != 2 or _CONV0 not in state:
        raise ExportError(
            f"{path.name} has no classifier.weight/classifier.bias or {_CONV0}: {_XRV_HINT} "
            f"(a CXR-ML-GZSL checkpoint is kind gzsl); its first keys are {list(state)[:5]}"
        )
    names = [str(p) for p in (pathologies if pathologies is not None else XRV_PATHOLOGIES)]
    if len(names) != weight.shape[0]:
        raise ExportError(
            f"{path.name} has {weight.shape[0]} outputs but {len(names)} pathology names; pass the "
            f"weights' own list (model.targets) as pathologies"
        )
    points: list[float | None] = [None] * len(names)
    if op is not None:
        if op.numel() != len(names):
            raise ExportError(f"{path.name}: op_threshs has {op.numel()} values for {len(names)} outputs")
        points = [None if math.isnan(v) else float(v) for v in op.flatten().tolist()]
    untrained = {i for i, n in enumerate(names) if not n.strip() or (op is not None and points[i] is None)}
    index: dict[str, int] = {}
    for i, name in enumerate(names):
        if name.strip():
            if _norm(name) in index:
                raise ExportError(f"pathology {name!r} appears twice in {names}")
            index[_norm(name)] = i

    shapes, head = _target(config)
    missing = [label for label in config.labels if _norm(label) not in index]
    idle = [label for label in config.labels if index.get(_norm(label)) in untrained]
    mapped: list[LabelMapping] = []
    if missing or idle:
        problem = (
            f"{config.name} has labels the torchxrayvision weights do not predict: missing {missing}, "
            f"untrained in these weights (empty name / NaN op_threshs) {idle}; they predict "
            f"{[n for i, n in enumerate(names) if n.strip() and i not in untrained]}"
        )
        if not for_init:
            raise ExportError(problem + "; remove those labels from the config or use other weights")
        log.info("%s; the classifier starts fresh", problem)
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    else:
        mapped = [
            LabelMapping(label, names[index[_norm(label)]], index[_norm(label)]) for label in config.labels
        ]
        rows = torch.tensor([m.index for m in mapped], dtype=torch.long)
        state["classifier.weight"] = weight.index_select(0, rows).clone()
        state["classifier.bias"] = bias.index_select(0, rows).clone()
    channels = config.input.channels
    state[_CONV0] = adapt_first_conv(state[_CONV0], channels).contiguous()
    _check_fits(
        state,
        shapes,
        f"{path.name} does not fit {config.name} ({config.architecture}, {channels} channel(s))",
        _XRV_HINT,
        may_miss=head if not mapped else frozenset(),
    )
    if for_init and not mapped:
        return state, None
    used = {m.index for m in mapped}
    notes = []
    if channels == 3:
        notes.append("conv0 replicated over 3 channels / 3 (same logits on a grey image)")
    if config.input.size != XRV_RESOLUTION:
        notes.append(f"trained at {XRV_RESOLUTION} px, config input is {config.input.size} px")
    report = ImportReport(
        source="torchxrayvision",
        file=path.name,
        mapped=tuple(mapped),
        dropped_outputs=tuple(n for i, n in enumerate(names) if i not in used and i not in untrained),
        untrained_outputs=tuple(sorted(untrained)),
        input_channels=channels,
        input_mean=(XRV_MEAN,) * channels,
        input_std=(XRV_STD,) * channels,
        operating_points={n: points[i] for i, n in enumerate(names) if n.strip()},
        notes=tuple(notes),
    )
    return state, report


def _norm(name: str) -> str:
    return " ".join(name.replace("_", " ").lower().split())


# --- CXR-ML-GZSL ----------------------------------------------------------------------------


@dataclass(frozen=True)
class GzslWeights:
    """A CXR-ML-GZSL (``ZSLNet``) checkpoint, split into timm-ready parts."""

    architecture: str
    """timm name of the visual encoder (densenet121 in the paper)."""
    backbone: dict[str, Tensor]
    """timm DenseNet ``features.*`` keys, no classifier: loads into ``build_backbone`` with only the
    classifier missing."""
    image_projection: dict[str, Tensor]
    """``fc_v``: keys ``0.weight, 0.bias, 2.weight, ...``; loads into ``build_projection(image_sizes)``."""
    text_projection: dict[str, Tensor]
    """``fc_t``: same layout; loads into ``build_projection(text_sizes)``."""
    image_sizes: tuple[int, ...]
    """Layer widths of ``fc_v``, input first: (1024, 512, 256, 128) in the paper."""
    text_sizes: tuple[int, ...]
    """Layer widths of ``fc_t``, input (text embedding size) first: (1024, 512, 256, 128)."""
    feature_dim: int
    input_channels: int = 3
    input_mean: tuple[float, ...] = IMAGENET_MEAN
    input_std: tuple[float, ...] = IMAGENET_STD
    bce_classifier: dict[str, Tensor] = field(default_factory=dict)
    """``classifier.0.*`` of a ``--bce-only`` checkpoint (no projections then)."""

    @property
    def embed_dim(self) -> int:
        """Width of the joint image-text space (0 for a --bce-only checkpoint)."""
        return self.image_sizes[-1] if self.image_sizes else 0


def build_projection(sizes: Sequence[int]) -> nn.Sequential:
    """``Linear, ReLU, Linear, ..., Linear`` with these widths, as ZSLNet's ``fc_v`` / ``fc_t``."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(itertools.pairwise(sizes)):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(d_in, d_out))
    return nn.Sequential(*layers)


def import_gzsl_checkpoint(path: Path) -> GzslWeights:
    """Split a CXR-ML-GZSL checkpoint (``{"state_dict": ZSLNet.state_dict(), ...}``) into the visual
    encoder (timm DenseNet names) and the two projection MLPs. See the module docstring for the map.

    Raises:
        ExportError: not a ZSLNet checkpoint, a backbone that is not a torchvision DenseNet, or
        projections that do not chain (lists the offending keys).
    """
    path = Path(path)
    state = read_state_dict(path)
    parts: dict[str, dict[str, Tensor]] = {"vision_backbone": {}, "fc_v": {}, "fc_t": {}, "classifier": {}}
    stray: list[str] = []
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head in parts and rest:
            parts[head][rest] = value
        else:
            stray.append(key)
    what = f"{path.name} is not a CXR-ML-GZSL ZSLNet checkpoint"
    if not parts["vision_backbone"] or stray:
        raise ExportError(
            f"{what}: expected only vision_backbone.*, fc_v.*, fc_t.* (or classifier.* with --bce-only) "
            f"keys; got {stray[:5] or list(state)[:5]}"
        )
    backbone = rename_old_densenet_keys(parts["vision_backbone"])
    blocks: dict[int, int] = {}
    for key in backbone:
        m = _DENSE_LAYER.match(key)
        if m:
            blocks[int(m.group(1))] = max(blocks.get(int(m.group(1)), 0), int(m.group(2)))
    arch = _DENSENETS.get(tuple(blocks[b] for b in sorted(blocks)))
    if arch is None or _CONV0 not in backbone or "features.norm5.weight" not in backbone:
        raise ExportError(
            f"{what}: its vision_backbone is not a torchvision DenseNet (dense layers per block "
            f"{[blocks[b] for b in sorted(blocks)]}; first keys {list(backbone)[:3]})"
        )
    channels = backbone[_CONV0].shape[1]
    with torch.device("meta"):
        encoder = timm.create_model(arch, pretrained=False, num_classes=0, in_chans=channels)
    _check_fits(
        backbone,
        {k: v.shape for k, v in encoder.state_dict().items()},
        f"{path.name}: vision_backbone does not fit timm {arch}",
        "is it a ZSLNet built with torchvision's DenseNet (--vision-backbone densenet121)?",
    )
    feature_dim = int(backbone["features.norm5.weight"].shape[0])
    image, image_sizes = _projection(parts["fc_v"], f"{path.name}: fc_v")
    text, text_sizes = _projection(parts["fc_t"], f"{path.name}: fc_t")
    bce = parts["classifier"]
    if not (image and text) and not bce:
        raise ExportError(
            f"{what}: it has {'fc_v' if image else 'no fc_v'} and {'fc_t' if text else 'no fc_t'}; "
            "a ZSLNet has both projections (or classifier.* when trained with --bce-only)"
        )
    if image and image_sizes[0] != feature_dim:
        raise ExportError(f"{path.name}: fc_v takes {image_sizes[0]} inputs; the encoder gives {feature_dim}")
    if image and text and image_sizes[-1] != text_sizes[-1]:
        raise ExportError(
            f"{path.name}: fc_v maps to {image_sizes[-1]} and fc_t to {text_sizes[-1]}: no joint space"
        )
    if bce and (set(bce) != {"0.weight", "0.bias"} or bce["0.weight"].shape[1] != feature_dim):
        raise ExportError(f"{path.name}: classifier keys {sorted(bce)} are not ZSLNet's --bce-only head")
    return GzslWeights(
        architecture=arch,
        backbone=backbone,
        image_projection=image,
        text_projection=text,
        image_sizes=image_sizes,
        text_sizes=text_sizes,
        feature_dim=feature_dim,
        input_channels=channels,
        bce_classifier=bce,
    )


def _projection(part: dict[str, Tensor], what: str) -> tuple[dict[str, Tensor], tuple[int, ...]]:
    """Check ``Linear`` layers at 0, 2, 4, ... (ReLUs between have no keys) that chain; their widths."""
    if not part:
        return {}, ()
    expected = {f"{i}.{p}" for i in range(0, 2 * (len(part) // 2), 2) for p in ("weight", "bias")}
    if set(part) != expected:
        raise ExportError(
            f"{what} keys {sorted(part)[:6]} are not Linear layers at 0, 2, 4, ... (Linear, ReLU, ...)"
        )
    sizes: list[int] = []
    for i in range(0, len(part), 2):
        w, b = part[f"{i}.weight"], part[f"{i}.bias"]
        if w.ndim != 2 or b.shape != (w.shape[0],) or (sizes and sizes[-1] != w.shape[1]):
            raise ExportError(f"{what}.{i}: weight {tuple(w.shape)} / bias {tuple(b.shape)} do not chain")
        if not sizes:
            sizes.append(int(w.shape[1]))
        sizes.append(int(w.shape[0]))
    return dict(part), tuple(sizes)


# --- initialising training ------------------------------------------------------------------


def backbone_init_from(path: Path, kind: InitKind, config: ModelConfig) -> dict[str, Tensor]:
    """Weights to start training ``config``'s model from (a trainer's ``--init``).

    ``torchxrayvision``: the xrv DenseNet, with its classifier mapped to the config labels when it
    predicts them all, else without a classifier (it starts fresh); the config must use xrv's
    input normalisation. ``gzsl``: the CXR-ML-GZSL visual encoder, no classifier. ``torch``: a
    state dict of the config's own architecture (e.g. an earlier version's weights.pt); a
    classifier of another shape (other labels) is dropped. Keys are the timm model's: load with
    ``strict=False``, where only the classifier may be missing.

    Raises:
        ExportError: the weights do not fit ``config`` (first mismatching keys), or kind is unknown.
    """
    path = Path(path)
    if kind == "torchxrayvision":
        return _import_xrv(path, config, None, for_init=True)[0]
    shapes, head = _target(config)
    if kind == "gzsl":
        gzsl = import_gzsl_checkpoint(path)
        if config.architecture != gzsl.architecture:
            raise ExportError(
                f"{path.name} holds a {gzsl.architecture} encoder; {config.name} is {config.architecture}"
            )
        state = dict(gzsl.backbone)
        state[_CONV0] = adapt_first_conv(state[_CONV0], config.input.channels).contiguous()
        spec = config.input
        if (spec.mean, spec.std) != (gzsl.input_mean[: spec.channels], gzsl.input_std[: spec.channels]):
            log.warning(
                "%s was trained on ImageNet-normalised RGB input; %s normalises with mean %s std %s",
                path.name,
                config.name,
                list(spec.mean),
                list(spec.std),
            )
        hint = "the GZSL encoder is a DenseNet; use a densenet config"
    elif kind == "torch":
        state = rename_old_densenet_keys(read_state_dict(path))
        for key in sorted(head):
            if key in state and state[key].shape != shapes[key]:
                log.info(
                    "%s: %s has shape %s (other labels); the classifier starts fresh",
                    path.name,
                    key,
                    tuple(state[key].shape),
                )
                state = {k: v for k, v in state.items() if k not in head}
                break
        hint = f"is it a state dict of {config.architecture} with {config.input.channels} input channel(s)?"
    else:
        raise ExportError(f"unknown init kind {kind!r}; use torchxrayvision, gzsl or torch")
    _check_fits(state, shapes, f"{path.name} does not fit {config.name} ({config.architecture})", hint, head)
    return state
