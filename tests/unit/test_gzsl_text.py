"""The frozen text encoder: all-MiniLM-L6-v2 offline, pooled exactly as sentence-transformers
does, and label names whose embeddings carry the phantoms' attributes."""

from pathlib import Path

import numpy as np
import pytest

from cxr_triage.train.gzsl.synthetic import FINDINGS, UNSEEN
from cxr_triage.train.gzsl.text import (
    DEFAULT_TEXT_ENCODER,
    TextEncoder,
    TextEncoderError,
    label_text,
    resolve,
)


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return TextEncoder.load()


def test_label_text() -> None:
    assert label_text("Pleural_Thickening") == "pleural thickening"
    assert label_text("Hernia", "  bowel above the diaphragm ") == "hernia: bowel above the diaphragm"
    assert label_text("Edema", "") == "edema"


def test_minilm_matches_sentence_transformers(minilm: TextEncoder) -> None:
    from sentence_transformers import SentenceTransformer

    folder, name = resolve(DEFAULT_TEXT_ENCODER)
    assert name == "sentence-transformers/all-MiniLM-L6-v2" and minilm.encoder.dim == 384
    texts = ["effusion", "pleural thickening", "a small round nodule in the left upper zone of the lung"]
    reference = SentenceTransformer(str(folder), device="cpu").encode(texts)
    ours = minilm.embed(texts).numpy()
    assert ours.shape == (3, 384)
    assert np.abs(ours - reference).max() < 1e-5


def test_unknown_encoder_is_refused_with_a_hint(tmp_path: Path) -> None:
    with pytest.raises(TextEncoderError, match="Hugging Face model folder"):
        TextEncoder.load(str(tmp_path / "biobert"))


def test_names_share_attributes_in_text_space(minilm: TextEncoder) -> None:
    """The premise of the phantoms: an unseen finding's nearest seen names share its words."""
    seen = [f for f in FINDINGS if f not in UNSEEN]
    emb = minilm.embed([label_text(f) for f in [*UNSEEN, *seen]]).numpy()
    cos = emb[: len(UNSEEN)] @ emb[len(UNSEEN) :].T
    for i, finding in enumerate(UNSEEN):
        words = set(finding.split())
        nearest = seen[int(np.argmax(cos[i]))]
        assert len(words & set(nearest.split())) >= 2, (finding, nearest)
