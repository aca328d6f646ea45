"""A zero-shot (gzsl) model served beside DenseNet-121 by the real server, and findings added
to it at run time: scored from the next request on, marked unseen, never called until an
operating point is set, kept in Redis across a restart, and equal to what the torch-free
runtime computes for the same image and the same name.

The GZSL version is a tiny one (timm ``test_resnet`` + a tiny BERT, untrained) exported by the
real exporter; the server, Redis and the chest CR are real.
"""

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import yaml

from cxr_triage.engines.gzsl import GzslEngine, to_probability
from cxr_triage.imaging import ImageLimits, prepare, to_batch
from cxr_triage.repository.models import InputSpec
from cxr_triage.train.gzsl.config import GzslConfig
from cxr_triage.train.gzsl.export import export_model, model_config
from cxr_triage.train.gzsl.text import TextEncoder
from cxr_triage.train.gzsl.trainer import build_model
from tests.helpers import (
    DEFAULT_MODEL,
    chest_u8,
    copy_repo,
    png_bytes,
    redis_server,
    running_server,
    save_tiny_bert,
)

MODEL = "gzsl-tiny"
LABELS = ("Atelectasis", "Effusion", "Pleural_Thickening", "Edema")
UNSEEN = ("Edema",)
NEW, DESCRIPTION = "Pneumoperitoneum", "free air under the diaphragm"


@pytest.fixture(scope="module")
def repo(exported_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's tiny DenseNet repository plus a gzsl model with one version, whose
    operating point is set for Atelectasis only (the others are scored, not called)."""
    root = copy_repo(exported_repo, tmp_path_factory.mktemp("gzsl") / "model_repo")
    size = yaml.safe_load((root / DEFAULT_MODEL / "config.yaml").read_text())["input"]["size"]
    bert = save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))
    cfg = GzslConfig(
        data="unused",
        labels=LABELS,
        unseen=UNSEEN,
        text_encoder=str(bert),
        architecture="test_resnet",
        image_size=size,
    )
    text = TextEncoder.load(cfg.text_encoder)
    torch.manual_seed(3)
    model = build_model(cfg, text).eval()
    export_model(cfg, model, text, root / MODEL, extra={"thresholds": {"Atelectasis": 0.5}})
    config = model_config(cfg, MODEL, critical=("Effusion",))
    (root / MODEL / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return root


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis"), appendonly=True) as url:
        yield url


def _serve(repo: Path, redis_url: str) -> Iterator[str]:
    env = {"CXR_REDIS_URL": redis_url, "CXR_DECODE_WORKERS": "1", "CXR_INTRA_OP_THREADS": "1"}
    with running_server(repo, env) as url:  # its log is removed after
        yield url


@pytest.fixture(scope="module")
def server(repo: Path, redis_url: str) -> Iterator[str]:
    yield from _serve(repo, redis_url)


@pytest.fixture(scope="module")
def image() -> bytes:
    return png_bytes(chest_u8(256))


@pytest.fixture(scope="module")
def local(repo: Path, image: bytes) -> tuple[GzslEngine, np.ndarray]:
    """The torch-free runtime on the version, and the image's latent as the server would make it."""
    engine = GzslEngine(repo / MODEL / "1")
    spec = InputSpec.model_validate(yaml.safe_load((repo / MODEL / "config.yaml").read_text())["input"])
    tensor = to_batch([prepare(image, "image/png", spec, ImageLimits()).pixels], spec)
    return engine, engine.encode_images(tensor)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "cxr_triage", "gzsl", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def predict(url: str, image: bytes, model: str = MODEL) -> dict:
    r = httpx.post(
        f"{url}/v1/predict",
        params={"model": model},
        content=image,
        headers={"content-type": "image/png"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_served_beside_densenet_with_the_trained_labels(server: str, image: bytes, local: tuple) -> None:
    models = {m["name"]: m for m in httpx.get(f"{server}/v1/models").json()["models"]}
    assert models[MODEL]["type"] == "gzsl" and models[DEFAULT_MODEL]["type"] == "classifier"
    assert models[MODEL]["labels"] == list(LABELS) and models[MODEL]["added_findings"] == []
    assert predict(server, image, DEFAULT_MODEL)["model"]["name"] == DEFAULT_MODEL

    out = predict(server, image)
    assert out["model"]["name"] == MODEL and out["model"]["weights"] == "untrained"
    assert [f["label"] for f in out["findings"]] == list(LABELS)
    assert any("untrained" in w for w in out["warnings"]) and any("zero-shot" in w for w in out["warnings"])
    by = {f["label"]: f for f in out["findings"]}
    assert by["Edema"]["unseen"] and not by["Effusion"]["unseen"]
    assert by["Atelectasis"]["threshold"] == 0.5 and isinstance(by["Atelectasis"]["positive"], bool)
    assert by["Effusion"]["threshold"] is None and by["Effusion"]["positive"] is None
    # The scores are the runtime's: (1 + cosine) / 2 of the image latent and the stored label latents.
    engine, latent = local
    expected = to_probability(engine.scores(latent, engine.label_latents))[0]
    np.testing.assert_allclose([f["probability"] for f in out["findings"]], expected, atol=1e-5)
    # Only called findings decide: Atelectasis is the one with an operating point.
    assert out["triage"] == ("abnormal" if by["Atelectasis"]["positive"] else "normal")


def test_a_finding_added_by_name_is_scored_from_the_next_request(
    server: str, image: bytes, local: tuple
) -> None:
    r = httpx.post(f"{server}/v1/models/{MODEL}/findings", json={"name": NEW, "description": DESCRIPTION})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["label"] == NEW and body["unseen"] is True and body["threshold"] is None
    assert body["versions"] == ["1"]

    out = predict(server, image)
    assert [f["label"] for f in out["findings"]] == [*LABELS, NEW]
    added = out["findings"][-1]
    assert added["unseen"] is True and added["threshold"] is None and added["positive"] is None
    engine, latent = local
    text = engine.encode_text([NEW], [DESCRIPTION])
    assert added["probability"] == pytest.approx(
        float(to_probability(engine.scores(latent, text))[0, 0]), abs=1e-5
    )
    # The description is part of what was encoded: the name alone gives another latent.
    assert not np.allclose(engine.encode_text([NEW]), text, atol=1e-4)

    listed = httpx.get(f"{server}/v1/models/{MODEL}/findings").json()
    assert [(f["label"], f["version"], f["threshold"]) for f in listed["findings"]] == [(NEW, "1", None)]
    assert {m["name"]: m for m in httpx.get(f"{server}/v1/models").json()["models"]}[MODEL][
        "added_findings"
    ] == [NEW]


def test_studies_worklist_and_reports_carry_the_added_finding(server: str, image: bytes) -> None:
    uid = "1.2.826.0.1.3680043.8.498.77001"
    r = httpx.post(
        f"{server}/v1/studies",
        params={"model": MODEL, "study_uid": uid, "instance_uid": uid + ".1"},
        content=image,
        headers={"content-type": "image/png"},
    )
    assert r.status_code == 202, r.text
    for _ in range(200):
        study = httpx.get(f"{server}/v1/studies/{uid}").json()
        if study.get("result"):
            break
        time.sleep(0.1)
    result = study["result"]
    added = next(f for f in result["findings"] if f["label"] == NEW)
    assert added["unseen"] and added["positive"] is None
    rows = httpx.get(f"{server}/v1/worklist").json()["studies"]
    assert any(row["study_uid"] == uid for row in rows)
    # A radiologist's label for the added finding is accepted: it is labelled data for it.
    r = httpx.post(f"{server}/v1/studies/{uid}/report", json={"labels": {NEW: False}, "reader": "r1"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    ("model", "body", "status", "code"),
    [
        (DEFAULT_MODEL, {"name": "Hernia"}, 400, "not_zero_shot"),
        ("no-such-model", {"name": "Hernia"}, 404, "model_not_found"),
        (MODEL, {"name": NEW.lower()}, 409, "finding_exists"),
        (MODEL, {"name": "pleural thickening"}, 409, "finding_exists"),
        (MODEL, {"name": ""}, 400, "bad_request"),
        (MODEL, {"name": "<script>alert(1)</script>"}, 400, "bad_request"),
        (MODEL, {"name": "x" * 65}, 400, "bad_request"),
        (MODEL, {"name": "air/fluid"}, 400, "bad_request"),
        (MODEL, {}, 400, "bad_request"),
    ],
)
def test_bad_additions_get_clear_errors(server: str, model: str, body: dict, status: int, code: str) -> None:
    r = httpx.post(f"{server}/v1/models/{model}/findings", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]
    assert httpx.get(f"{server}/health").status_code == 200


def test_an_operating_point_from_labelled_data_makes_it_called(server: str, image: bytes) -> None:
    point = {
        "version": "1",
        "threshold": 0.01,
        "chosen_on": "test: 40 labelled images",
        "target_sensitivity": 0.95,
        "sensitivity": 0.95,
        "specificity": 0.4,
        "positives": 20,
        "negatives": 20,
    }
    r = httpx.put(f"{server}/v1/models/{MODEL}/findings/{NEW}/operating-point", json=point)
    assert r.status_code == 200, r.text
    assert r.json()["threshold"] == 0.01 and r.json()["operating_point"]["chosen_on"] == point["chosen_on"]
    added = predict(server, image)["findings"][-1]
    assert (
        added["threshold"] == 0.01 and added["positive"] is True
    )  # (1 + cos) / 2 >= 0.01 for any cos > -0.98
    bad = httpx.put(f"{server}/v1/models/{MODEL}/findings/Nothing/operating-point", json=point)
    assert bad.status_code == 404 and bad.json()["error"]["code"] == "finding_not_found"
    r = httpx.put(
        f"{server}/v1/models/{MODEL}/findings/{NEW}/operating-point", json={**point, "threshold": None}
    )
    assert r.status_code == 200 and predict(server, image)["findings"][-1]["positive"] is None


def test_the_operating_point_command_measures_on_labelled_images_through_the_service(
    server: str, tmp_path: Path
) -> None:
    """Feedback-export layout (what radiologists' reports become): 3 images with the finding, 3 without."""
    (tmp_path / "images").mkdir()
    rows = ["study_uid,instance_uid,reader,reported_at," + NEW]
    base = chest_u8(256)
    for i in range(6):
        image = np.clip(base.astype(np.int16) * (0.6 + 0.1 * i) + 5 * i, 0, 255).astype(np.uint8)
        (tmp_path / "images" / f"1.2.3.{i}.png").write_bytes(
            png_bytes(image if i % 2 else image[:, ::-1].copy())
        )
        rows.append(f"1.2.{i},1.2.3.{i},r1,2026-11-23T10:00:00,{i % 2}")
    (tmp_path / "feedback_labels.csv").write_text("\n".join(rows) + "\n")
    scores = [
        next(
            f["probability"]
            for f in predict(server, (tmp_path / "images" / f"1.2.3.{i}.png").read_bytes())["findings"]
            if f["label"] == NEW
        )
        for i in range(6)
    ]
    done = _cli(
        "operating-point",
        MODEL,
        NEW,
        "--data",
        str(tmp_path),
        "--server",
        server,
        "--target-sensitivity",
        "1",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "set on the service" in done.stdout and "3 positive / 3 negative" in done.stdout
    (listed,) = httpx.get(f"{server}/v1/models/{MODEL}/findings").json()["findings"]
    # sensitivity 1.0: the lowest positive's score is the threshold
    assert listed["threshold"] == pytest.approx(min(scores[1::2]), abs=1e-6)
    assert (
        listed["operating_point"]["positives"] == 3 and "feedback" in listed["operating_point"]["chosen_on"]
    )
    missing = _cli("operating-point", MODEL, "Nothing", "--data", str(tmp_path), "--server", server)
    assert missing.returncode == 2 and "Nothing" in missing.stderr


def test_added_findings_survive_a_restart_and_can_be_removed(
    repo: Path, redis_url: str, server: str, image: bytes
) -> None:
    first = predict(server, image)["findings"][-1]
    again = _serve(repo, redis_url)  # a second server on the same Redis, as after a restart
    url = next(again)
    try:
        out = predict(url, image)
        assert out["findings"][-1]["label"] == NEW
        assert out["findings"][-1]["probability"] == pytest.approx(first["probability"], abs=1e-6)
        r = httpx.delete(f"{url}/v1/models/{MODEL}/findings/{NEW}")
        assert r.status_code == 200, r.text
        assert [f["label"] for f in predict(url, image)["findings"]] == list(LABELS)
        assert [f["label"] for f in predict(server, image)["findings"]] == list(LABELS)  # every replica
        r = httpx.delete(f"{url}/v1/models/{MODEL}/findings/{NEW}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "finding_not_found"
    finally:
        next(again, None)
