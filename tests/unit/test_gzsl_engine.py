"""The torch-free GZSL runtime against the PyTorch model it was exported from.

A tiny image network (timm ``test_resnet``) and a tiny BERT saved to a local folder (the "any
Hugging Face encoder given by path" route, e.g. BioBERT) keep the exports fast; the integration
test does the same with DenseNet-121 and all-MiniLM-L6-v2.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cxr_triage.engines.gzsl import GzslEngine, label_text, scores
from cxr_triage.errors import RepositoryError
from cxr_triage.repository.models import VersionMetadata
from cxr_triage.train.gzsl.config import GzslConfig
from cxr_triage.train.gzsl.export import export_model
from cxr_triage.train.gzsl.model import ImageTower, TextTower
from cxr_triage.train.gzsl.text import TextEncoder, tokenize
from cxr_triage.train.gzsl.trainer import build_model
from tests.helpers import save_tiny_bert

SIZE = 32
LABELS = ("Atelectasis", "Effusion", "Pleural_Thickening", "Edema")
NEW = (("Hernia", None), ("Pleural thickening", "thickened pleura along the lateral chest wall"))


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def exported(
    tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[GzslConfig, object, TextEncoder, Path]:
    cfg = GzslConfig(
        data="unused",
        labels=LABELS,
        unseen=("Edema",),
        text_encoder=str(tiny_bert),
        architecture="test_resnet",
        image_size=SIZE,
    )
    text = TextEncoder.load(cfg.text_encoder)
    torch.manual_seed(1)
    model = build_model(cfg, text).eval()
    result = export_model(cfg, model, text, tmp_path_factory.mktemp("repo") / "gzsl-tiny")
    assert result.version == "1" and max(result.parity.values()) <= 1e-4
    return cfg, model, text, result.path


def test_metadata_records_provenance_and_every_file(exported: tuple) -> None:
    cfg, _, text, path = exported
    meta = json.loads((path / "metadata.json").read_text())
    VersionMetadata.model_validate(meta)  # the repository's own contract
    assert meta["weights"] == "untrained" and meta["data"] is None and meta["model_type"] == "gzsl"
    assert meta["gzsl"]["labels"] == list(LABELS) and meta["gzsl"]["unseen"] == ["Edema"]
    assert meta["gzsl"]["text_engine"]["encoder"] == text.name == Path(cfg.text_encoder).name
    assert str(Path.home()) not in json.dumps(meta) and cfg.text_encoder not in json.dumps(meta)
    on_disk = {p.name for p in path.iterdir()} - {"metadata.json"}
    assert (
        set(meta["files"])
        == on_disk
        >= {
            "image_encoder.onnx",
            "text_encoder.onnx",
            "tokenizer.json",
            "label_latents.npy",
            "label_embeddings.npy",
            "weights.pt",
        }
    )
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".staging")]


def test_runtime_matches_torch(exported: tuple) -> None:
    _, model, text, path = exported
    engine = GzslEngine(path, preference="cpu")
    assert engine.labels == LABELS and engine.unseen == ("Edema",) and engine.input_spec.size == SIZE
    x = np.random.default_rng(0).standard_normal((5, 3, SIZE, SIZE), dtype=np.float32)
    with torch.no_grad():
        ref_image = ImageTower(model).eval()(torch.from_numpy(x)).numpy()
    got_image = engine.encode_images(x)
    assert got_image.shape == (5, 128)
    assert np.abs(got_image - ref_image).max() <= 1e-4
    names, descriptions = [n for n, _ in NEW], [d for _, d in NEW]
    ids, mask = tokenize(text.tokenizer, [label_text(n, d) for n, d in NEW])
    with torch.no_grad():
        ref_text = TextTower(text.encoder, model).eval()(ids, mask).numpy()
    got_text = engine.encode_text(names, descriptions)
    assert np.abs(got_text - ref_text).max() <= 1e-4
    assert np.allclose(np.linalg.norm(got_text, axis=1), 1.0, atol=1e-5)
    # the stored label latents are what the text engine gives for the label names
    assert np.abs(engine.encode_text(list(LABELS)) - engine.label_latents).max() <= 1e-4
    with torch.no_grad():
        ref_scores = model(torch.from_numpy(x))[0].numpy()
    assert np.abs(engine.score_images(x) - ref_scores).max() <= 1e-4
    both = np.vstack([engine.label_latents, got_text])
    assert engine.scores(got_image, both).shape == (5, len(LABELS) + 2)
    with pytest.raises(ValueError):
        engine.encode_text(["Hernia"], [None, "two descriptions"])
    with pytest.raises(ValueError):
        engine.encode_text([""])


def test_scores_are_cosine_similarities() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(3, 6)), rng.normal(size=(4, 6))
    expected = (a / np.linalg.norm(a, axis=1)[:, None]) @ (b / np.linalg.norm(b, axis=1)[:, None]).T
    assert np.allclose(scores(a, b), expected, atol=1e-6)
    with pytest.raises(ValueError):
        scores(a, b[:, :5])


def test_a_changed_file_or_a_foreign_folder_is_refused(exported: tuple, tmp_path: Path) -> None:
    _, _, _, path = exported
    copy = tmp_path / "1"
    shutil.copytree(path, copy)
    GzslEngine(copy, preference="cpu")
    latents = np.load(copy / "label_latents.npy")
    np.save(copy / "label_latents.npy", latents[::-1].copy())
    with pytest.raises(RepositoryError, match="SHA-256"):
        GzslEngine(copy, preference="cpu")
    with pytest.raises(RepositoryError):
        GzslEngine(tmp_path / "nothing")
    np.save(copy / "label_latents.npy", latents)
    (copy / "weights.pt").unlink()  # for fine-tuning only: serving does not need it
    GzslEngine(copy, preference="cpu")
    (copy / "tokenizer.json").write_text("{}")
    with pytest.raises(RepositoryError, match=r"tokenizer\.json"):
        GzslEngine(copy, preference="cpu")


def test_a_second_export_is_a_new_version(exported: tuple) -> None:
    cfg, model, text, path = exported
    again = export_model(cfg, model, text, path.parent)
    assert again.version == "2" and (path.parent / "1" / "metadata.json").is_file()
    first = json.loads((path / "metadata.json").read_text())["files"]
    second = json.loads((again.path / "metadata.json").read_text())["files"]
    assert first["label_latents.npy"] == second["label_latents.npy"]  # same weights, same latents


def test_the_runtime_imports_no_torch(exported: tuple) -> None:
    """Serving stays torch-free: load the version and score with torch absent from sys.modules."""
    _, _, _, path = exported
    code = f"""
import sys, numpy as np
from cxr_triage.engines.gzsl import GzslEngine
engine = GzslEngine({str(path)!r}, preference="cpu")
latents = engine.encode_images(np.zeros((1, 3, {SIZE}, {SIZE}), np.float32))
engine.scores(latents, engine.encode_text(["Hernia"]))
banned = ("torch", "timm", "transformers", "sentence_transformers")
heavy = sorted(m for m in sys.modules if m.split(".")[0] in banned or m.startswith("cxr_triage.train"))
print("HEAVY", heavy)
sys.exit(1 if heavy else 0)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "HEAVY []" in done.stdout
