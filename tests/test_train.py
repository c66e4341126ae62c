"""Fine-tuning: the loss falls, the encoder is saved in the base's format, runs are reproducible."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from taskvec.data import load_split
from taskvec.errors import TaskvecError
from taskvec.heads import EncoderClassifier, load_encoder, load_head
from taskvec.train import finetune, training_rows
from tests.conftest_tasks import data_dir, make_tokenizer, params, tiny_model, write_csv  # noqa: F401 - fixtures


def tensors(folder):
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def train_loss(model_dir, head_path, params):
    """Mean cross-entropy of an encoder + head over the rows the fine-tune trained on."""
    encoder, tokenizer, _ = load_encoder(model_dir)
    model = EncoderClassifier(encoder, load_head(head_path)).eval()
    rows = training_rows(load_split(params.task("senti"), params.data_root(), "train"), params.train)
    batch = tokenizer(list(rows["text"]), padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch, labels=torch.tensor(list(rows["label"]))).loss.item()


def test_classifier_finetune_lowers_loss_and_keeps_the_base_format(tiny_model, params, tmp_path):
    out = tmp_path / "runs" / "senti"
    result = finetune("senti", params, out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "finetune.json", "heads", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    ]
    assert [p.name for p in out.parent.iterdir()] == ["senti"]  # the temp folder was renamed away
    base, tuned = tensors(tiny_model), tensors(out)
    assert set(tuned) == set(base)
    assert all(tuned[n].shape == base[n].shape and tuned[n].dtype == base[n].dtype for n in base)
    assert not torch.equal(tuned["encoder.layer.0.attention.self.query.weight"], base["encoder.layer.0.attention.self.query.weight"])
    assert torch.equal(tuned["pooler.dense.weight"], base["pooler.dense.weight"])  # unused by mean pooling
    head = out / "heads" / "senti.safetensors"
    assert load_head(head).texts == ["bad", "good"]
    assert train_loss(out, head, params) < train_loss(tiny_model, head, params)
    manifest = json.loads((out / "finetune.json").read_text())
    assert manifest["task"] == "senti" and manifest["train"]["steps"] == 12
    assert manifest["data"]["sha256"] == load_split(params.task("senti"), params.data_root(), "train").digest
    assert manifest["data"]["rows_trained"] == 64 and len(result.losses) >= 2


def test_same_seed_same_weights(params, tmp_path):
    first = finetune("senti", params, tmp_path / "a", steps=3, progress=False)
    second = finetune("senti", params, tmp_path / "b", steps=3, progress=False)
    a, b = tensors(first.out_dir), tensors(second.out_dir)
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_mlm_finetune_saves_the_encoder_only(tiny_model, params, tmp_path):
    out = tmp_path / "lm"
    result = finetune("senti_lm", params, out, steps=4, progress=False)
    base, tuned = tensors(tiny_model), tensors(out)
    assert set(tuned) == set(base)
    assert not torch.equal(tuned["embeddings.word_embeddings.weight"], base["embeddings.word_embeddings.weight"])
    assert torch.equal(tuned["pooler.dense.weight"], base["pooler.dense.weight"])  # no pooler in the MLM model
    assert not (out / "heads").exists()
    assert result.manifest["kind"] == "mlm" and result.losses


def test_bad_data_fails_before_training(params, data_dir, tmp_path):
    write_csv(data_dir / "senti" / "train.csv", [("good film", "positive"), ("meh", "mixed")])
    with pytest.raises(TaskvecError, match="data row 2 has unknown label 'mixed'"):
        finetune("senti", params, tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()


def test_finetune_command(params, data_dir, tiny_model, tmp_path):
    import typer
    import yaml

    from taskvec.cli_tasks import register

    app = typer.Typer()
    register(app)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params.model_dump()))
    result = CliRunner().invoke(app, ["finetune", "senti", "-p", str(path), "-o", str(tmp_path / "cli"), "--steps", "2", "-q"])
    assert result.exit_code == 0, result.output
    assert "2 steps in" in result.output and (tmp_path / "cli" / "model.safetensors").is_file()
    unknown = CliRunner().invoke(app, ["finetune", "nope", "-p", str(path), "-o", str(tmp_path / "x")])
    assert isinstance(unknown.exception, TaskvecError) and "unknown task 'nope'" in str(unknown.exception)


def test_diverging_finetune_is_refused_and_writes_nothing(params, tmp_path):
    diverging = params.model_copy(update={"train": params.train.model_copy(update={"lr": 1.0e6})})
    with pytest.raises(TaskvecError) as err:
        finetune("senti", diverging, tmp_path / "out" / "senti", steps=4, progress=False)
    assert "task senti: the fine-tune diverged (non-finite weights in" in str(err.value) and "lower train.lr (now 1e+06)" in str(err.value)
    assert "\n" not in str(err.value)
    assert list((tmp_path / "out").iterdir()) == []  # neither the folder nor its temporary sibling


def test_mlm_decoder_copy_keeps_the_output_layer_out_of_the_vector(params, tmp_path):
    """A tied decoder (BERT's layout) moves every word embedding through the output softmax, so the task vector
    holds the output layer's updates; ``mlm_decoder: copy`` trains a copy that is discarded with the head, and
    a token that never occurs in the text ([UNK] here) keeps its input embedding up to weight decay."""
    unk = make_tokenizer().convert_tokens_to_ids("[UNK]")
    base = tensors(Path(params.base))["embeddings.word_embeddings.weight"][unk]

    def moved(**train):
        p = params.model_copy(update={"train": params.train.model_copy(update=train)})
        out = finetune("senti_lm", p, tmp_path / str(train), steps=4, progress=False).out_dir
        return float((tensors(out)["embeddings.word_embeddings.weight"][unk] - base).abs().max())

    tied, copy = moved(mlm_decoder="tied"), moved(mlm_decoder="copy")
    assert tied > 1e-3  # Adam steps of ~lr (1e-3) per step on every row
    assert copy <= 4 * params.train.lr * params.train.weight_decay * float(base.abs().max()) + 1e-7  # decoupled weight decay only


def test_mlm_head_warmup_trains_the_head_alone_first(params, tmp_path):
    p = params.model_copy(update={"train": params.train.model_copy(update={"mlm_head_steps": 3, "mlm_head_lr": 1e-2})})
    warm = finetune("senti_lm", p, tmp_path / "warm", steps=2, progress=False)
    cold = finetune("senti_lm", params, tmp_path / "cold", steps=2, progress=False)
    steps = [step for step, _ in warm.losses]
    assert steps[0] == -2 and steps[-1] == 2 and all(s <= 0 for s in steps[: steps.index(0) + 1])  # head steps counted up to 0
    assert warm.manifest["train"]["mlm_head_steps"] == 3
    a, b = tensors(warm.out_dir), tensors(cold.out_dir)
    assert not torch.equal(a["encoder.layer.0.attention.self.query.weight"], b["encoder.layer.0.attention.self.query.weight"])
