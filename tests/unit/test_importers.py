"""Importers for torchxrayvision DenseNets and CXR-ML-GZSL checkpoints.

The reference models are built here with torchvision (a dependency of timm) exactly as the source
projects build them: xrv's DenseNet is torchvision's DenseNet-121 with a 1-channel conv0, an
18-way classifier and an ``op_threshs`` buffer (torchxrayvision/models.py); ZSLNet is a
torchvision DenseNet-121 whose classifier is ``nn.Identity`` plus the MLPs ``fc_v`` / ``fc_t``
(CXR-ML-GZSL zsl_models.py). Inputs are 64 px so everything stays fast.
"""

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torchvision
import yaml
from torch import nn

from cxr_triage.errors import ExportError
from cxr_triage.repository.models import ModelConfig
from cxr_triage.train.importers import (
    XRV_PATHOLOGIES,
    XRV_STD,
    backbone_init_from,
    build_projection,
    check_xrv_config,
    import_gzsl_checkpoint,
    import_torchxrayvision,
)
from cxr_triage.train.models import build_backbone

ROOT = Path(__file__).resolve().parents[2]
XRV_CONFIG = ROOT / "model_repo" / "densenet121-xrv-nih" / "config.yaml"
NIH14: list[str] = json.loads((ROOT / "tests" / "nih14.json").read_text())
SIZE = 64
# model_urls["all"]["op_threshs"] in torchxrayvision/models.py
ALL_OP_THRESHS = [0.07422872, 0.038290843, 0.09814756, 0.0098118475, 0.023601074, 0.0022490358,
                  0.010060724, 0.103246614, 0.056810737, 0.026791653, 0.050318155, 0.023985857,
                  0.01939503, 0.042889766, 0.053369623, 0.035975814, 0.20204692, 0.05015312]  # fmt: skip


def _config(
    labels: list[str] = NIH14,
    channels: int = 1,
    mean: float | list[float] = 0.5,
    std: float | list[float] = XRV_STD,
    architecture: str = "densenet121",
) -> ModelConfig:
    raw: dict[str, Any] = yaml.safe_load(XRV_CONFIG.read_text())
    raw.update(labels=labels, thresholds=dict.fromkeys(labels, 0.5), architecture=architecture)
    raw["critical_findings"] = [x for x in raw["critical_findings"] if x in labels]
    raw["input"].update(
        size=SIZE,
        channels=channels,
        mean=mean if isinstance(mean, list) else [mean] * channels,
        std=std if isinstance(std, list) else [std] * channels,
    )
    return ModelConfig.model_validate(raw)


def _randomise_batchnorms(model: nn.Module) -> None:
    """Non-trivial running statistics, so a mis-mapped BatchNorm buffer would show in the output."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = 0.8 + 0.4 * torch.rand(n, generator=g)
            m.bias.data = 0.1 * torch.randn(n, generator=g)
            m.running_mean.data = 0.1 * torch.randn(n, generator=g)  # type: ignore[union-attr]
            m.running_var.data = 0.5 + torch.rand(n, generator=g)  # type: ignore[union-attr]


def _xrv_reference() -> nn.Module:
    """xrv.models.DenseNet(weights=...): torchvision DenseNet-121, 1 channel, 18 outputs, op_threshs."""
    torch.manual_seed(0)
    model = torchvision.models.densenet121(weights=None, num_classes=len(XRV_PATHOLOGIES))
    model.features.conv0 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(model.features.conv0.weight)
    _randomise_batchnorms(model)
    with torch.no_grad():  # trained-like norm0 statistics for [-1024, 1024] input: logits stay O(1)
        out = model.features.conv0((2 * torch.rand(4, 1, SIZE, SIZE) - 1) * 1024)
        model.features.norm0.running_mean.copy_(out.mean(dim=(0, 2, 3)))
        model.features.norm0.running_var.copy_(out.var(dim=(0, 2, 3)))
    nn.init.normal_(model.classifier.weight, std=0.05)
    model.classifier.bias.data = torch.arange(len(XRV_PATHOLOGIES), dtype=torch.float32) / 10
    model.register_buffer("op_threshs", torch.tensor(ALL_OP_THRESHS))
    return model.eval()


class _ZSLNet(nn.Module):
    """CXR-ML-GZSL zsl_models.py ZSLNet (ranking mode, the paper's model), same attribute names."""

    def __init__(self, textual_embeddings: np.ndarray) -> None:
        super().__init__()
        self.vision_backbone = torchvision.models.densenet121(weights=None)
        d_visual = self.vision_backbone.classifier.in_features
        self.vision_backbone.classifier = nn.Identity(d_visual)  # type: ignore[assignment]
        self.textual_embeddings = torch.from_numpy(textual_embeddings)  # a plain attribute, not saved
        d_textual = self.textual_embeddings.shape[-1]
        self.fc_v = nn.Sequential(
            nn.Linear(d_visual, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 128)
        )
        self.fc_t = nn.Sequential(
            nn.Linear(d_textual, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 128)
        )


@pytest.fixture(scope="module")
def xrv_model() -> nn.Module:
    return _xrv_reference()


@pytest.fixture(scope="module")
def xrv_file(xrv_model: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("xrv") / "xrv-all.pt"
    torch.save(xrv_model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def xrv_input() -> torch.Tensor:
    """A 1-channel batch already scaled like xrv.utils.normalize: [-1024, 1024]."""
    x01 = torch.rand(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    return (2 * x01 - 1) * 1024


@pytest.fixture(scope="module")
def gzsl_model() -> _ZSLNet:
    torch.manual_seed(3)
    model = _ZSLNet(np.random.default_rng(3).standard_normal((14, 1024)).astype(np.float32))
    _randomise_batchnorms(model)
    return model.eval()


@pytest.fixture(scope="module")
def gzsl_file(gzsl_model: _ZSLNet, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Saved as ChexnetTrainer.save_checkpoint does, with a stepped Adam in it."""
    optimizer = torch.optim.Adam(gzsl_model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-5)
    gzsl_model.fc_t(gzsl_model.textual_embeddings).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    path = tmp_path_factory.mktemp("gzsl") / "best_auroc_checkpoint.pth.tar"
    torch.save(
        {
            "epoch": 7,
            "state_dict": gzsl_model.state_dict(),
            "max_auroc_mean": 0.78,
            "optimizer": optimizer.state_dict(),
            "lossMIN": 0.31,
        },
        path,
    )
    return path


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4) -> bool:
    return float((a - b).abs().max()) <= rtol * max(1.0, float(b.abs().max()))


# --- torchxrayvision ------------------------------------------------------------------------


def test_shipped_config_fits_torchxrayvision() -> None:
    config = ModelConfig.model_validate(yaml.safe_load(XRV_CONFIG.read_text()))
    assert config.name == XRV_CONFIG.parent.name and not config.default
    assert list(config.labels) == NIH14 and config.input.channels == 1 and config.heatmap == "cam"
    assert config.input.std == (0.00048828125,) and config.input.size == 224
    check_xrv_config(config)


def test_xrv_classifier_rows_follow_config_labels(
    xrv_model: nn.Module, xrv_file: Path, xrv_input: torch.Tensor
) -> None:
    config = _config()
    state, report = import_torchxrayvision(xrv_file, config)
    model = build_backbone(config).eval()
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        ours, ref = model(xrv_input), xrv_model(xrv_input)
    for j, label in enumerate(config.labels):
        assert _close(ours[:, j], ref[:, XRV_PATHOLOGIES.index(label)]), label
    assert [m.label for m in report.mapped] == NIH14
    assert report.mapped[1].source == "Cardiomegaly" and report.mapped[1].index == 10
    assert report.dropped_outputs == XRV_PATHOLOGIES[14:] and report.untrained_outputs == ()
    assert report.input_mean == (0.5,) and report.input_std == (XRV_STD,)
    assert report.operating_points["Atelectasis"] == pytest.approx(0.07422872)
    assert report.source_thresholds()["Cardiomegaly"] == pytest.approx(0.050318155)
    assert "14 labels mapped" in str(report)


def test_xrv_old_names_nested_and_module_prefix(
    xrv_model: nn.Module, tmp_path: Path, xrv_input: torch.Tensor
) -> None:
    """Pre-0.4 torchvision names (``norm.1``), no BatchNorm counters, DataParallel, nested."""
    old = {
        "module." + re.sub(r"(denselayer\d+\.(?:norm|conv))([12])\.", r"\1.\2.", k): v
        for k, v in xrv_model.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    assert "module.features.denseblock1.denselayer1.norm.1.weight" in old
    path = tmp_path / "old.pt"
    torch.save({"epoch": 3, "model_state_dict": old}, path)
    config = _config(labels=["Hernia", "Pneumothorax"])
    state, report = import_torchxrayvision(path, config)
    model = build_backbone(config).eval()
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        ours, ref = model(xrv_input), xrv_model(xrv_input)
    assert _close(ours, ref[:, [13, 3]])
    assert len(report.dropped_outputs) == 16


def test_xrv_three_channels_gives_the_same_logits(
    xrv_model: nn.Module, xrv_file: Path, xrv_input: torch.Tensor
) -> None:
    config = _config(channels=3)
    state, report = import_torchxrayvision(xrv_file, config)
    assert state["features.conv0.weight"].shape == (64, 3, 7, 7)
    model = build_backbone(config).eval()
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        ours, ref = model(xrv_input.repeat(1, 3, 1, 1)), xrv_model(xrv_input)
    assert _close(ours, ref[:, [XRV_PATHOLOGIES.index(x) for x in NIH14]])
    assert any("3 channels" in n for n in report.notes)


def test_xrv_missing_label_is_named(xrv_file: Path) -> None:
    with pytest.raises(ExportError, match=r"missing \['COVID-19'\]"):
        import_torchxrayvision(xrv_file, _config(labels=[*NIH14, "COVID-19"]))


@pytest.mark.parametrize(
    ("mean", "std", "arch"),
    [(0.485, 0.229, "densenet121"), (0.5, 0.5, "densenet121"), (0.5, XRV_STD, "resnet50")],
)
def test_xrv_wrong_config_names_the_fix(xrv_file: Path, mean: float, std: float, arch: str) -> None:
    fix = r"input.std: \[0.00048828125\]" if arch == "densenet121" else "architecture: densenet121"
    with pytest.raises(ExportError, match=fix):
        import_torchxrayvision(xrv_file, _config(mean=mean, std=std, architecture=arch))


def test_xrv_untrained_outputs_are_refused(xrv_model: nn.Module, tmp_path: Path) -> None:
    """densenet121-res224-chex leaves Infiltration (and others) untrained: empty name, NaN op_thresh."""
    state = xrv_model.state_dict()
    state["op_threshs"] = state["op_threshs"].clone()
    state["op_threshs"][[2, 5, 6, 9, 11, 12, 13]] = math.nan
    path = tmp_path / "chex.pt"
    torch.save(state, path)
    with pytest.raises(ExportError, match=r"untrained in these weights.*'Infiltration'"):
        import_torchxrayvision(path, _config())
    names = ["" if i in (2, 5) else n for i, n in enumerate(XRV_PATHOLOGIES)]
    with pytest.raises(ExportError, match=r"'Infiltration', 'Emphysema'"):
        import_torchxrayvision(path, _config(), pathologies=names)
    _, report = import_torchxrayvision(path, _config(labels=["Effusion", "Lung Opacity"]))
    assert report.untrained_outputs == (2, 5, 6, 9, 11, 12, 13)
    assert report.operating_points["Hernia"] is None


def test_xrv_pickled_module_and_wrong_files_are_refused(tmp_path: Path, gzsl_file: Path) -> None:
    pickled = tmp_path / "module.pt"
    torch.save(nn.Linear(2, 2), pickled)
    with pytest.raises(ExportError, match=r"not a plain state dict.*state_dict\(\)"):
        import_torchxrayvision(pickled, _config())
    with pytest.raises(ExportError, match=r"no classifier\.weight"):
        import_torchxrayvision(gzsl_file, _config())
    with pytest.raises(ExportError, match="not found"):
        import_torchxrayvision(tmp_path / "absent.pt", _config())


def test_xrv_export_end_to_end(xrv_model: nn.Module, xrv_file: Path, tmp_path: Path) -> None:
    """import -> file -> export_model (as `cxr-triage import-weights` does) -> ONNX == xrv."""
    import onnxruntime as ort

    from cxr_triage.repository.models import VersionMetadata
    from cxr_triage.train.export import export_model, read_config

    repo = tmp_path / "model_repo"
    (repo / XRV_CONFIG.parent.name).mkdir(parents=True)
    raw = yaml.safe_load(XRV_CONFIG.read_text())
    raw["input"]["size"] = SIZE
    (repo / XRV_CONFIG.parent.name / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    config = read_config(repo, XRV_CONFIG.parent.name)
    state, report = import_torchxrayvision(xrv_file, config)
    weights = tmp_path / "imported.pt"
    torch.save(state, weights)
    result = export_model(
        repo,
        config.name,
        weights=weights,
        weights_kind="imported",
        data="torchxrayvision densenet121-res224-all (test weights)",
        extra={"thresholds": report.source_thresholds()},
    )
    meta = VersionMetadata.model_validate_json((result.path / "metadata.json").read_text())
    assert result.version == "1" and meta.weights == "imported" and meta.labels == config.labels
    assert meta.thresholds is not None and meta.thresholds["Atelectasis"] == pytest.approx(0.07422872)

    x01 = np.random.default_rng(5).random((2, 1, SIZE, SIZE), dtype=np.float32)
    session = ort.InferenceSession(str(result.path / "model.onnx"), providers=["CPUExecutionProvider"])
    probs, cam = session.run(None, {"input": (x01 - 0.5) / np.float32(XRV_STD)})
    with torch.no_grad():  # xrv.utils.normalize(x * 255, 255) on the same image
        ref = torch.sigmoid(xrv_model(torch.from_numpy((2 * x01 - 1) * 1024)))
    assert np.abs(probs - ref[:, [XRV_PATHOLOGIES.index(x) for x in NIH14]].numpy()).max() < 1e-4
    assert cam.shape[:2] == (2, 14)


# --- CXR-ML-GZSL ----------------------------------------------------------------------------


def test_gzsl_encoder_and_projections_match_the_reference(gzsl_model: _ZSLNet, gzsl_file: Path) -> None:
    weights = import_gzsl_checkpoint(gzsl_file)
    assert weights.architecture == "densenet121" and weights.feature_dim == 1024
    assert weights.image_sizes == (1024, 512, 256, 128) and weights.text_sizes == (1024, 512, 256, 128)
    assert weights.embed_dim == 128 and weights.input_channels == 3 and not weights.bce_classifier

    config = _config(channels=3, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    model = build_backbone(config).eval()
    result = model.load_state_dict(weights.backbone, strict=False)
    assert sorted(result.missing_keys) == ["classifier.bias", "classifier.weight"]
    assert not result.unexpected_keys
    image = build_projection(weights.image_sizes).eval()
    image.load_state_dict(weights.image_projection, strict=True)
    text = build_projection(weights.text_sizes).eval()
    text.load_state_dict(weights.text_projection, strict=True)

    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = model.forward_head(model.forward_features(x), pre_logits=True)
        ref = gzsl_model.vision_backbone(x)  # classifier is Identity: the pooled 1024 features
        assert _close(ours, ref)
        assert _close(image(ours), gzsl_model.fc_v(ref))
        emb = gzsl_model.textual_embeddings
        assert _close(text(emb), gzsl_model.fc_t(emb))


def test_gzsl_legacy_format_dataparallel_and_bce_only(gzsl_model: _ZSLNet, tmp_path: Path) -> None:
    """torch 1.4 (the reference's environment.yml) wrote the legacy, non-zip format."""
    wrapped = nn.DataParallel(gzsl_model).state_dict()
    assert next(iter(wrapped)).startswith("module.vision_backbone.")
    path = tmp_path / "legacy.pth.tar"
    torch.save({"state_dict": wrapped, "epoch": 1}, path, _use_new_zipfile_serialization=False)
    weights = import_gzsl_checkpoint(path)
    ref = gzsl_model.vision_backbone.state_dict()
    assert all(torch.equal(weights.backbone[k], v) for k, v in ref.items())

    bce = {k: v for k, v in gzsl_model.state_dict().items() if k.startswith("vision_backbone.")}
    bce.update({"classifier.0.weight": torch.zeros(14, 1024), "classifier.0.bias": torch.zeros(14)})
    torch.save({"state_dict": bce}, path)
    weights = import_gzsl_checkpoint(path)
    assert weights.bce_classifier["0.weight"].shape == (14, 1024)
    assert weights.image_projection == {} and weights.embed_dim == 0


def _garbage(tmp_path: Path, kind: str, gzsl_model: _ZSLNet, xrv_file: Path) -> Path:
    path = tmp_path / f"{kind}.pt"
    if kind == "random-bytes":
        path.write_bytes(os.urandom(4096))
    elif kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "unrelated-tensors":
        torch.save({"state_dict": {"encoder.weight": torch.zeros(3)}}, path)
    elif kind == "projection-missing":
        state = {k: v for k, v in gzsl_model.state_dict().items() if not k.startswith("fc_t.")}
        torch.save({"state_dict": state}, path)
    elif kind == "truncated-backbone":
        state = {k: v for k, v in gzsl_model.state_dict().items() if "denseblock4.denselayer16" not in k}
        torch.save({"state_dict": state}, path)
    elif kind == "not-a-dict":
        torch.save([torch.zeros(2)], path)
    else:
        return xrv_file
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("random-bytes", "not a readable torch file"),
        ("text", "not a readable torch file"),
        ("unrelated-tensors", r"not a CXR-ML-GZSL ZSLNet checkpoint.*encoder.weight"),
        ("projection-missing", "no fc_t"),
        ("truncated-backbone", "not a torchvision DenseNet"),
        ("not-a-dict", "holds list, not a state dict"),
        ("xrv-state-dict", r"not a CXR-ML-GZSL ZSLNet checkpoint.*features.conv0.weight"),
    ],
)
def test_gzsl_garbage_is_refused(
    tmp_path: Path, gzsl_model: _ZSLNet, xrv_file: Path, kind: str, message: str
) -> None:
    with pytest.raises(ExportError, match=message):
        import_gzsl_checkpoint(_garbage(tmp_path, kind, gzsl_model, xrv_file))


# --- --init for training ----------------------------------------------------------------------


def _load_for_training(config: ModelConfig, state: dict[str, torch.Tensor]) -> list[str]:
    result = build_backbone(config).load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    return sorted(result.missing_keys)


def test_backbone_init_from_each_kind(gzsl_file: Path, xrv_file: Path, tmp_path: Path) -> None:
    imagenet = _config(channels=3, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    head = ["classifier.bias", "classifier.weight"]
    assert _load_for_training(imagenet, backbone_init_from(gzsl_file, "gzsl", imagenet)) == head
    grey = _config()
    state = backbone_init_from(gzsl_file, "gzsl", grey)
    assert state["features.conv0.weight"].shape == (64, 1, 7, 7)
    assert _load_for_training(grey, state) == head

    assert _load_for_training(grey, backbone_init_from(xrv_file, "torchxrayvision", grey)) == []
    other = _config(labels=["Effusion", "COVID-19"])
    assert _load_for_training(other, backbone_init_from(xrv_file, "torchxrayvision", other)) == head
    with pytest.raises(ExportError, match=r"input\.std"):
        backbone_init_from(xrv_file, "torchxrayvision", imagenet)

    previous = tmp_path / "weights.pt"
    torch.save(build_backbone(grey).state_dict(), previous)
    assert _load_for_training(grey, backbone_init_from(previous, "torch", grey)) == []
    three = _config(labels=["Effusion", "Mass", "Nodule"])
    assert _load_for_training(three, backbone_init_from(previous, "torch", three)) == head
    with pytest.raises(ExportError, match="does not fit"):
        backbone_init_from(gzsl_file, "torch", grey)
    with pytest.raises(ExportError, match="unknown init kind"):
        backbone_init_from(previous, "onnx", grey)  # type: ignore[arg-type]
