"""Unsupervised SimCSE (taskvec.contrastive) on a tiny random BERT: exact loss, training moves the encoder, seeded."""

from __future__ import annotations

import math

import pytest
import torch

from taskvec.config import TrainSpec
from taskvec.contrastive import info_nce, simcse
from taskvec.errors import TaskvecError
from taskvec.heads import load_encoder
from tests.conftest_tasks import sentiment_rows, tiny_model  # noqa: F401 - fixtures


def test_info_nce_is_the_cross_entropy_against_the_diagonal():
    a = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=-1)
    # identical views, orthogonal rows: logit 1/τ on the diagonal, 0 elsewhere
    expected = -math.log(math.exp(2.0) / (math.exp(2.0) + 1))
    assert float(info_nce(a, a, temperature=0.5)) == pytest.approx(expected, rel=1e-6)
    assert float(info_nce(a, a.flip(0), temperature=0.5)) == pytest.approx(-math.log(1 / (math.exp(2.0) + 1)), rel=1e-6)


def trained(model_dir, texts, seed=0):
    encoder, tokenizer, _ = load_encoder(model_dir, dtype=torch.float32)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    train = TrainSpec(steps=6, batch_size=8, max_length=16, lr=1e-3, warmup_ratio=0.0, seed=seed)
    losses = simcse(encoder, tokenizer, texts, train)
    return before, encoder.state_dict(), losses


def test_simcse_trains_the_encoder_deterministically(tiny_model):
    texts = [t for t, _ in sentiment_rows(48, seed=3)]
    before, after, losses = trained(tiny_model, texts)
    assert [step for step, _ in losses] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(v) for _, v in losses)
    moved = [k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])]
    assert any(k.startswith("encoder.layer.") for k in moved)
    _, again, losses_again = trained(tiny_model, texts)
    assert losses_again == losses and all(torch.equal(after[k], again[k]) for k in after)
    _, other, _ = trained(tiny_model, texts, seed=1)
    assert any(not torch.equal(after[k], other[k]) for k in after if after[k].is_floating_point())


def test_simcse_refuses_too_few_texts(tiny_model):
    encoder, tokenizer, _ = load_encoder(tiny_model, dtype=torch.float32)
    with pytest.raises(TaskvecError, match="at least 2"):
        simcse(encoder, tokenizer, ["only one", "  "], TrainSpec(steps=1, batch_size=2))
