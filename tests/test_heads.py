"""Zero-shot heads: shape, normalisation, storage round trip and zero-shot prediction."""

from __future__ import annotations

import pytest
import torch

from taskvec.errors import FormatError
from taskvec.heads import SCALE, EncoderClassifier, build_head, encode, load_encoder, load_head, mean_pool, save_head, state_hash
from tests.conftest_tasks import tiny_model  # noqa: F401 - fixture


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    assert torch.equal(mean_pool(hidden, torch.tensor([[1, 1, 0]])), torch.tensor([[2.0, 3.0]]))


def test_head_rows_are_unit_embeddings_of_the_label_texts(tiny_model):
    encoder, tokenizer, _ = load_encoder(tiny_model)
    head = build_head(encoder, tokenizer, "senti", ["negative", "positive"], ["bad", "good"])
    assert head.weight.shape == (2, 32) and head.weight.dtype == torch.float32
    assert torch.allclose(head.weight.norm(dim=-1), torch.ones(2))
    assert torch.allclose(head.weight, encode(encoder, tokenizer, ["bad", "good"]))
    assert head.texts == ["bad", "good"] and head.labels == ["negative", "positive"]
    assert head.encoder_hash == state_hash(encoder)


def test_zero_shot_prediction_picks_the_matching_description(tiny_model):
    encoder, tokenizer, _ = load_encoder(tiny_model)
    texts = ["awful", "superb", "boring", "happy"]
    head = build_head(encoder, tokenizer, "t", ["a", "b", "c", "d"], texts)
    model = EncoderClassifier(encoder, head).eval()
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, labels=torch.arange(4))
    assert out.logits.argmax(-1).tolist() == [0, 1, 2, 3]
    assert torch.allclose(out.logits.diagonal(), torch.full((4,), SCALE), atol=1e-4)  # cos(x, x) = 1
    assert out.loss is not None and out.loss.item() > 0


def test_head_is_frozen_and_outside_the_state_dict(tiny_model):
    encoder, tokenizer, _ = load_encoder(tiny_model)
    model = EncoderClassifier(encoder, build_head(encoder, tokenizer, "t", ["x", "y"], ["bad", "good"]))
    assert all(not name.startswith("head") for name, _ in model.named_parameters())
    assert set(model.state_dict()) == {f"encoder.{name}" for name in encoder.state_dict()}


def test_save_and_load_round_trip(tiny_model, tmp_path):
    encoder, tokenizer, _ = load_encoder(tiny_model)
    head = build_head(encoder, tokenizer, "senti", ["negative", "positive"])
    path = save_head(head, tmp_path / "heads" / "senti.safetensors")
    loaded = load_head(path)
    assert torch.equal(loaded.weight, head.weight)
    assert (loaded.task, loaded.labels, loaded.texts, loaded.encoder_hash, loaded.scale) == (
        "senti", ["negative", "positive"], ["negative", "positive"], head.encoder_hash, SCALE,
    )
    assert [p.name for p in path.parent.iterdir()] == ["senti.safetensors"]  # no temp file left


def test_load_head_refuses_other_files(tiny_model, tmp_path):
    with pytest.raises(FormatError, match="is not a taskvec head"):
        load_head(tiny_model / "model.safetensors")
    with pytest.raises(FormatError, match="head file not found"):
        load_head(tmp_path / "none.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(FormatError, match="cannot read head"):
        load_head(tmp_path / "junk.safetensors")
