"""Accuracy and macro-F1 of an encoder + frozen head on a task split.

Inference runs under ``torch.inference_mode()`` in eval mode. Texts are
tokenised once (:class:`EvalSet`) and batched in order of length, which on CPU
cuts padding work several-fold; predictions are put back in row order. An
``EvalSet`` is reusable, so the λ search tokenises each task once and only
re-runs the encoder per candidate.

Which head scores a model folder (:func:`resolve_head`): an explicit head
file; else ``MODEL_DIR/heads/<task>.safetensors`` (written by ``finetune``);
else the zero-shot head built from the *base* encoder — task vectors never
touch heads, so every edited model is scored with the base's head.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from taskvec.config import Params, TaskSpec
from taskvec.data import Split, load_split
from taskvec.errors import TaskvecError
from taskvec.heads import EncoderClassifier, Head, build_head, device_of, load_encoder, load_head


def metrics(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> dict[str, float]:
    """Accuracy and macro-F1 (mean over all declared classes; a class with no support and no prediction scores 0)."""
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if len(y_true) == 0:
        raise TaskvecError("cannot score an empty split")
    f1s = []
    for cls in range(n_classes):
        tp = np.sum((y_pred == cls) & (y_true == cls))
        fp = np.sum((y_pred == cls) & (y_true != cls))
        fn = np.sum((y_pred != cls) & (y_true == cls))
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return {"accuracy": float(np.mean(y_true == y_pred)), "macro_f1": float(np.mean(f1s)), "n": int(len(y_true))}


@dataclass
class EvalSet:
    """A split tokenised once, in length-sorted batches, ready for repeated scoring."""

    task: str
    split: str
    batches: list[dict[str, torch.Tensor]]
    order: np.ndarray
    labels: np.ndarray
    lineage: dict

    @classmethod
    def build(cls, split: Split, tokenizer, *, batch_size: int, max_length: int) -> EvalSet:
        texts = split.dataset["text"]
        encoded = tokenizer(list(texts), truncation=True, max_length=max_length)
        order = np.argsort([len(ids) for ids in encoded["input_ids"]], kind="stable")
        batches = []
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            features = [{key: encoded[key][i] for key in encoded} for i in rows]
            batches.append(dict(tokenizer.pad(features, return_tensors="pt")))
        labels = np.asarray(list(split.dataset["label"]))
        return cls(split.task, split.name, batches, order, labels, split.lineage())


@torch.inference_mode()
def predict(model: EncoderClassifier, evalset: EvalSet) -> np.ndarray:
    """Predicted class index per row, in the split's row order."""
    was_training = model.training
    model.eval()
    device = device_of(model.encoder)
    try:
        chunks = [model(**{k: v.to(device) for k, v in batch.items()}).logits.argmax(-1).cpu() for batch in evalset.batches]
    finally:
        model.train(was_training)
    sorted_pred = torch.cat(chunks).numpy()
    pred = np.empty_like(sorted_pred)
    pred[evalset.order] = sorted_pred
    return pred


def score(model: EncoderClassifier, evalset: EvalSet) -> dict[str, float]:
    """Accuracy and macro-F1 of ``model`` on ``evalset``."""
    return metrics(evalset.labels, predict(model, evalset), len(model.labels))


def resolve_head(
    model_dir: Path,
    spec: TaskSpec,
    *,
    head_path: str | Path | None = None,
    base: str | Path | None = None,
    max_length: int = 128,
) -> Head:
    """The head to score ``spec`` with: ``head_path``, else the model's own, else built from ``base``."""
    path = Path(head_path) if head_path is not None else model_dir / "heads" / f"{spec.name}.safetensors"
    if head_path is not None or path.is_file():
        head = load_head(path)
        if head.labels != spec.labels:
            raise TaskvecError(f"head {path} has labels {head.labels}, task {spec.name} declares {spec.labels}")
        return head
    if base is None:
        raise TaskvecError(f"no head for task {spec.name} in {model_dir} and no base model to build one")
    encoder, tokenizer, _ = load_encoder(base)
    return build_head(encoder, tokenizer, spec.name, spec.labels, spec.head_texts, max_length=max_length)


def evaluate_model(
    model: str | Path,
    task: str,
    params: Params,
    *,
    split: str = "validation",
    head_path: str | Path | None = None,
    max_rows: int | None = None,
) -> dict:
    """Score a model folder (or hub id) on one task split; returns a JSON-able dict.

    ``max_rows`` overrides ``params.eval.max_rows.<split>``.
    """
    spec = params.task(task)
    if spec.kind != "classification":
        raise TaskvecError(f"task {task} is an {spec.kind} task; only classification tasks can be evaluated")
    cap = max_rows if max_rows is not None else params.eval.max_rows.get(split)
    data = load_split(spec, params.data_root(), split, max_rows=cap, seed=params.eval.seed)
    encoder, tokenizer, path = load_encoder(model)
    if torch.cuda.is_available():
        encoder.cuda()
    head = resolve_head(path, spec, head_path=head_path, base=params.base, max_length=params.eval.max_length)
    evalset = EvalSet.build(data, tokenizer, batch_size=params.eval.batch_size, max_length=params.eval.max_length)
    result = score(EncoderClassifier(encoder, head), evalset)
    return {"model": str(model), "task": task, "split": split, **result, "data": evalset.lineage, "head": {"texts": head.texts, "encoder_hash": head.encoder_hash}}
