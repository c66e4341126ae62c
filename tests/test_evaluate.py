"""Evaluation: metric arithmetic, row order after length-sorted batching, and the end-to-end command."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from taskvec.config import TaskSpec
from taskvec.data import load_split
from taskvec.errors import HomologyError, TaskvecError
from taskvec.evaluate import EvalSet, evaluate_model, metrics, predict, score
from taskvec.heads import EncoderClassifier, build_head, load_encoder, save_head
from tests.conftest_tasks import LABELS, data_dir, params, tiny_model, write_csv  # noqa: F401 - fixtures


def test_metrics_by_hand():
    result = metrics(np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0]), 2)
    # class 0: tp 2 fp 1 fn 0 -> F1 0.8; class 1: tp 1 fp 0 fn 1 -> F1 2/3
    assert result == {"accuracy": 0.75, "macro_f1": pytest.approx((0.8 + 2 / 3) / 2), "n": 4}
    assert metrics(np.array([0, 0]), np.array([0, 0]), 3)["macro_f1"] == pytest.approx(1 / 3)
    with pytest.raises(TaskvecError):
        metrics(np.array([]), np.array([]), 2)


def _arranged(tiny_model, tmp_path, rows, **batching):
    """A classifier whose head rows are the embeddings of "bad" and "good", and the validation set of ``rows``."""
    write_csv(tmp_path / "c" / "validation.csv", rows)
    spec = TaskSpec(name="c", source=str(tmp_path / "c"), labels=LABELS)
    encoder, tokenizer, _ = load_encoder(tiny_model)
    head = build_head(encoder, tokenizer, "c", LABELS, ["bad", "good"])
    return EncoderClassifier(encoder, head), EvalSet.build(load_split(spec, tmp_path, "validation"), tokenizer, **batching)


def test_constructed_case_scores_exactly_three_of_four(tiny_model, tmp_path):
    # The head rows are the embeddings of "bad" and "good", so those exact texts
    # are classified as their own row; one row is labelled wrongly on purpose.
    # Texts of different lengths check that length-sorted batching keeps row order.
    rows = [("good", "positive"), ("bad bad bad", "negative"), ("bad", "positive"), ("good good", "positive")]
    model, evalset = _arranged(tiny_model, tmp_path, rows, batch_size=3, max_length=16)
    pred = predict(model, evalset)
    assert pred[0] == 1 and pred[2] == 0  # the texts equal to a head row
    expected = metrics(evalset.labels, pred, 2)
    assert score(model, evalset) == expected
    truth = np.array([1, 0, 1, 1])
    assert expected["accuracy"] == np.mean(pred == truth)
    assert model.training  # predict restores the mode it found


def test_exact_accuracy_with_an_arranged_encoder(tiny_model, tmp_path):
    rows = [("good", "positive"), ("bad", "negative"), ("good", "negative"), ("bad", "negative")]
    model, evalset = _arranged(tiny_model, tmp_path, rows, batch_size=2, max_length=8)
    assert score(model, evalset)["accuracy"] == 0.75


def test_evaluate_model_prefers_the_models_own_head(tiny_model, params, tmp_path):
    base = evaluate_model(tiny_model, "senti", params, split="test")
    assert base["n"] == 16 and 0 <= base["accuracy"] <= 1 and base["data"]["split"] == "test"
    # A head whose label texts are swapped flips every prediction: accuracy becomes 1 - acc.
    encoder, tokenizer, _ = load_encoder(tiny_model)
    head = build_head(encoder, tokenizer, "senti", LABELS, ["good", "bad"])
    save_head(head, tiny_model / "heads" / "senti.safetensors")
    flipped = evaluate_model(tiny_model, "senti", params, split="test")
    assert flipped["accuracy"] == pytest.approx(1 - base["accuracy"])


def test_evaluate_refuses_mlm_tasks_and_mismatched_heads(tiny_model, params, tmp_path):
    with pytest.raises(TaskvecError, match="only classification tasks"):
        evaluate_model(tiny_model, "senti_lm", params)
    encoder, tokenizer, _ = load_encoder(tiny_model)
    path = save_head(build_head(encoder, tokenizer, "x", ["no", "yes"]), tmp_path / "x.safetensors")
    with pytest.raises(TaskvecError, match="has labels"):
        evaluate_model(tiny_model, "senti", params, head_path=path)
    wide = build_head(encoder, tokenizer, "senti", LABELS)
    wide.weight = torch.ones(2, 64)
    with pytest.raises(HomologyError, match="width 64 but the encoder's hidden size is 32"):
        EncoderClassifier(encoder, wide)


def test_evaluate_command(tiny_model, data_dir, tmp_path):
    import typer

    from taskvec.cli_tasks import register

    app = typer.Typer()
    register(app)
    (tmp_path / "params.yaml").write_text(
        f"base: {tiny_model}\ndata_dir: {data_dir}\ntasks:\n  senti: {{source: senti, labels: [negative, positive]}}\neval: {{batch_size: 4}}\n"
    )
    out = tmp_path / "m.json"
    result = CliRunner().invoke(app, ["evaluate", str(tiny_model), "--task", "senti", "-p", str(tmp_path / "params.yaml"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "senti validation: accuracy" in result.output
    assert json.loads(out.read_text())["n"] == 16
    bad = CliRunner().invoke(app, ["evaluate", str(tiny_model), "--task", "senti", "--split", "dev", "-p", str(tmp_path / "params.yaml")])
    assert isinstance(bad.exception, TaskvecError)
