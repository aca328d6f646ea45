"""LoRA fine-tuning (peft) and gradient checkpointing on a tiny ViT, merged before export."""

import json
from pathlib import Path

import pytest
import torch

from cxr_triage.repository import ModelRepository
from cxr_triage.train.config import TrainConfig
from cxr_triage.train.export import read_config
from cxr_triage.train.models import build_backbone
from cxr_triage.train.registry import register_run
from cxr_triage.train.synthetic import generate
from cxr_triage.train.trainer import TrainingError, train
from tests.helpers import make_tiny_repo

MODEL = "vit-b16-nih14"  # make_tiny_repo shrinks it to one block of width 48


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lora")
    generate(root / "data", patients=24, size=64, seed=3)
    return make_tiny_repo(root / "repo", size=32), root / "data"


def test_lora_trains_adapters_only_and_exports_a_plain_merged_engine(
    setup: tuple[Path, Path], tmp_path: Path
) -> None:
    repo, data = setup
    config = read_config(repo, MODEL)
    cfg = TrainConfig(
        model=MODEL, data=(str(data),), epochs=1, batch_size=8, lora_rank=4, augment=False, lr=1e-2
    )
    train(cfg, config, tmp_path / "run", progress=False)
    summary = json.loads((tmp_path / "run" / "run.json").read_text())
    assert summary["lora_rank"] == 4
    assert 0 < summary["parameters"]["trainable"] < 0.5 * summary["parameters"]["total"]

    merged = torch.load(tmp_path / "run" / "best.pt", weights_only=True)["model"]
    torch.manual_seed(cfg.seed)
    initial = build_backbone(config).state_dict()
    plain = build_backbone(config)
    plain.load_state_dict(merged)  # strict: no adapter keys left, the plain timm network
    assert torch.equal(merged["patch_embed.proj.weight"], initial["patch_embed.proj.weight"])  # frozen
    assert not torch.equal(
        merged["blocks.0.attn.qkv.weight"], initial["blocks.0.attn.qkv.weight"]
    )  # B·A merged
    assert not torch.equal(merged["head.weight"], initial["head.weight"])  # the head trains in full

    version = register_run(tmp_path / "run", repo)
    meta = ModelRepository.load(repo).get(MODEL).versions[version.version].metadata
    assert meta.weights == "trained" and meta.parity["max_abs_diff"] <= 1e-4


def test_gradient_checkpointing_gives_the_same_training(setup: tuple[Path, Path], tmp_path: Path) -> None:
    repo, data = setup
    config = read_config(repo, MODEL)
    losses = []
    for flag in (False, True):
        cfg = TrainConfig(
            model=MODEL, data=(str(data),), epochs=1, batch_size=8, augment=False, grad_checkpointing=flag
        )
        losses.append(train(cfg, config, tmp_path / str(flag), progress=False).history[0]["train_loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)


def test_lora_on_modules_that_do_not_exist_is_refused(setup: tuple[Path, Path], tmp_path: Path) -> None:
    repo, data = setup
    cfg = TrainConfig(model=MODEL, data=(str(data),), epochs=1, lora_rank=4, lora_targets=("nope",))
    with pytest.raises(TrainingError, match="lora_targets"):
        train(cfg, read_config(repo, MODEL), tmp_path / "run", progress=False)
