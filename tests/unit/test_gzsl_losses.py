"""The CXR-ML-GZSL objective: each term's value on known inputs, non-zero on real input, and its
gradient reaching exactly the parameters it should (the reference's L_align reached none)."""

import numpy as np
import pytest
import torch
from torch import nn

from cxr_triage.imaging import to_batch
from cxr_triage.train.gzsl.losses import alignment_loss, consistency_loss, objective, ranking_loss
from cxr_triage.train.gzsl.model import GzslModel, cosine
from cxr_triage.train.gzsl.synthetic import FINDINGS, UNSEEN, render
from cxr_triage.train.gzsl.text import SentenceEncoder, TextEncoder, label_text
from cxr_triage.train.gzsl.trainer import input_spec

SIZE = 64


def test_ranking_loss_by_hand() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.3, 0.0]])
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.ones(2, 3, dtype=torch.bool)
    # image 0: pairs (0,1): max(0, .5 + .1 - .9) = 0; (0,2): .5 + .5 - .9 = .1; image 1: no positive
    assert ranking_loss(scores, targets, mask, 0.5).item() == pytest.approx(0.1 / 2)
    # two positives, one negative: both pairs count
    two = torch.tensor([[0.2, 0.4, 0.3]])
    expected = (0.5 + 0.3 - 0.2) + (0.5 + 0.3 - 0.4)
    assert ranking_loss(
        two, torch.tensor([[1.0, 1.0, 0.0]]), torch.ones(1, 3, dtype=torch.bool), 0.5
    ).item() == (pytest.approx(expected))


def test_masked_labels_take_no_part_in_ranking_or_alignment() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.8]])
    targets = torch.tensor([[1.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False]])  # label 2 unseen: its high score must not count
    assert ranking_loss(scores, targets, mask, 0.5).item() == pytest.approx(0.0)
    assert ranking_loss(scores, targets, torch.ones_like(mask), 0.5).item() == pytest.approx(0.4)
    image = torch.tensor([[1.0, 0.0]])
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    both = torch.tensor([[1.0, 0.0, 1.0]])
    assert alignment_loss(image, labels, both, mask).item() == pytest.approx(0.0)  # label 2 masked out
    assert alignment_loss(image, labels, both, torch.ones_like(mask)).item() == pytest.approx(1 - 1 / 2**0.5)


def test_alignment_and_consistency_by_hand() -> None:
    labels = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    mask = torch.ones(3, 2, dtype=torch.bool)
    image = torch.tensor([[2.0, 0.0], [1.0, 1.0], [5.0, -3.0]])  # the last image has no positive: left out
    assert alignment_loss(image, labels, y, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert alignment_loss(-image, labels, y, mask).item() == pytest.approx(2.0)
    text = torch.randn(5, 7)
    assert consistency_loss(text, text * 3.0).item() == pytest.approx(0.0, abs=1e-6)
    flipped = text.clone()
    flipped[0] = -flipped[0]
    assert consistency_loss(text, flipped).item() > 0.05


@pytest.fixture(scope="module")
def minilm() -> TextEncoder:
    return TextEncoder.load()


@pytest.fixture(scope="module")
def real_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Compositional phantoms as the model sees them, each with a seen finding or two."""
    seen = [f for f in FINDINGS if f not in UNSEEN]
    rng = np.random.default_rng(0)
    shown = [list(rng.choice(seen, size=int(rng.integers(1, 3)), replace=False)) for _ in range(6)]
    pixels = [render(s, size=SIZE, patient=i + 1) for i, s in enumerate(shown)]
    x = torch.from_numpy(to_batch(pixels, input_spec(SIZE)))
    y = torch.tensor([[float(f in s) for f in FINDINGS] for s in shown])
    return x, y


def _model(minilm: TextEncoder) -> GzslModel:
    torch.manual_seed(0)
    return GzslModel(minilm.embed([label_text(f) for f in FINDINGS]))


def _grads(model: GzslModel, loss: torch.Tensor) -> dict[str, float]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    out = {}
    for part in ("encoder", "fc_v", "fc_t"):
        params = list(getattr(model, part).parameters())
        out[part] = sum(0.0 if p.grad is None else float(p.grad.abs().sum()) for p in params)
    return out


@pytest.mark.parametrize(
    ("term", "reaches"),
    [
        ("rank", {"encoder", "fc_v", "fc_t"}),
        ("align", {"encoder", "fc_v", "fc_t"}),
        ("con", {"fc_t"}),
    ],
)
def test_each_term_is_nonzero_on_real_input_and_reaches_exactly_its_parameters(
    minilm: TextEncoder, real_batch: tuple[torch.Tensor, torch.Tensor], term: str, reaches: set[str]
) -> None:
    x, y = real_batch
    model = _model(minilm).train()
    seen = torch.tensor([f not in UNSEEN for f in FINDINGS])
    mask = torch.ones_like(y, dtype=torch.bool) & seen
    scores, image, labels = model(x)
    terms = objective(scores, image, labels, model.text_embeddings, y, mask, 0.5, 0.1, 0.1)
    value = getattr(terms, term)
    assert value.item() > 1e-4, f"L_{term} is {value.item()} on real input: it would train nothing"
    grads = _grads(model, value)
    for part, total in grads.items():
        if part in reaches:
            assert total > 0.0, f"L_{term} sends no gradient to {part}"
        else:
            assert total == 0.0, f"L_{term} must not reach {part} (got |grad| {total})"


def test_total_is_the_weighted_sum_and_align_counts(
    minilm: TextEncoder, real_batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """The reference added 0.0 * L_align: here γ1 changes the loss and its gradient."""
    x, y = real_batch
    model = _model(minilm).eval()
    mask = torch.ones_like(y, dtype=torch.bool)
    scores, image, labels = model(x)
    a = objective(scores, image, labels, model.text_embeddings, y, mask, 0.5, 0.1, 0.1)
    b = objective(scores, image, labels, model.text_embeddings, y, mask, 0.5, 0.3, 0.1)
    assert a.total.item() == pytest.approx((a.rank + 0.1 * a.align + 0.1 * a.con).item(), rel=1e-6)
    assert (b.total - a.total).item() == pytest.approx(0.2 * a.align.item(), rel=1e-5)
    ga = torch.autograd.grad(a.total, list(model.fc_v.parameters()), retain_graph=True)
    gb = torch.autograd.grad(b.total, list(model.fc_v.parameters()))
    assert any(not torch.allclose(p, q) for p, q in zip(ga, gb, strict=True))


def test_the_frozen_text_encoder_gets_no_gradient(
    minilm: TextEncoder, real_batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """Even with autograd on through the text encoder, nothing of it trains."""
    from cxr_triage.train.gzsl.text import tokenize

    x, y = real_batch
    encoder: SentenceEncoder = minilm.encoder
    assert not any(p.requires_grad for p in encoder.parameters())
    ids, attention = tokenize(minilm.tokenizer, [label_text(f) for f in FINDINGS])
    embeddings = encoder(ids, attention)  # no torch.no_grad here on purpose
    model = GzslModel(embeddings)
    scores, image, labels = model(x)
    terms = objective(
        scores, image, labels, model.text_embeddings, y, torch.ones_like(y, dtype=torch.bool), 0.5, 0.1, 0.1
    )
    terms.total.backward()
    assert all(p.grad is None for p in encoder.parameters())
    assert isinstance(model.text_embeddings, torch.Tensor) and not model.text_embeddings.requires_grad
    assert "text_embeddings" not in dict(model.named_parameters())


def test_scores_are_cosines(minilm: TextEncoder) -> None:
    a, b = torch.randn(4, 8), torch.randn(3, 8)
    expected = nn.functional.cosine_similarity(a[:, None, :], b[None, :, :], dim=-1)
    assert torch.allclose(cosine(a, b), expected, atol=1e-6)
