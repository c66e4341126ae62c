"""Accuracy and macro-F1 of an encoder + frozen head on a task split.

Inference runs under ``torch.inference_mode()`` in eval mode. Texts are
tokenised once (:class:`EvalSet`) and batched in order of length, which on CPU
cuts padding work several-fold; predictions are put back in row order. An
``EvalSet`` is reusable, so the λ search tokenises each task once and only
re-runs the encoder per candidate.

Which head scores a model folder (:func:`taskvec.suite.resolve_heads`): an
explicit head file; else ``MODEL_DIR/heads/<task>.safetensors`` (written by
``finetune``); else the zero-shot head built from the *base* encoder — task
vectors never touch heads, so every edited model is scored with the base's head.
Loading, heads, row caps and the device are the harness's
(:mod:`taskvec.suite`); this module keeps the metrics and the batched predictor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from taskvec.config import Params
from taskvec.data import Split
from taskvec.errors import TaskvecError
from taskvec.heads import EncoderClassifier, device_of

Place = Callable[[Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]]


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
def predict(model: EncoderClassifier, evalset: EvalSet, *, place: Place | None = None) -> np.ndarray:
    """Predicted class index per row, in the split's row order.

    ``place`` moves each batch to the model's device (the harness passes its
    device policy's; default: ``.to(device_of(model.encoder))``).
    """
    was_training = model.training
    model.eval()
    if place is None:
        device = device_of(model.encoder)
        place = lambda batch: {k: v.to(device) for k, v in batch.items()}  # noqa: E731
    try:
        chunks = [model(**place(batch)).logits.argmax(-1).cpu() for batch in evalset.batches]
    finally:
        model.train(was_training)
    sorted_pred = torch.cat(chunks).numpy()
    pred = np.empty_like(sorted_pred)
    pred[evalset.order] = sorted_pred
    return pred


def score(model: EncoderClassifier, evalset: EvalSet, *, place: Place | None = None) -> dict[str, float]:
    """Accuracy and macro-F1 of ``model`` on ``evalset``."""
    return metrics(evalset.labels, predict(model, evalset, place=place), len(model.labels))


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

    A thin wrapper on :class:`taskvec.suite.Suite` (heads resolved as the
    module docstring says); ``max_rows`` overrides ``params.eval.max_rows.<split>``.
    """
    from taskvec.suite import Suite

    suite = Suite.load(
        model, [task], params, splits=(split,), max_rows={split: max_rows}, heads="resolve",
        head_paths={task: head_path} if head_path is not None else None,
    )
    head = suite.heads[task]
    result = suite.scores(split)[task]
    lineage = suite.sets[split][task].lineage
    return {"model": str(model), "task": task, "split": split, **result, "data": lineage, "head": {"texts": head.texts, "encoder_hash": head.encoder_hash}}
