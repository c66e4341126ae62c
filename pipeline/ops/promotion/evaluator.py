"""Evaluators: ``evaluate(model_dir) -> {task: accuracy}``, injected into the promote flow and rollback.

:func:`load_evaluator` resolves ``"module:function"`` strings so flows,
deployments and params.yaml (``promotion.evaluator``) can name one.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path

from pipeline.ops.promotion.gates import load_spec
from taskvec.errors import TaskvecError

Evaluator = Callable[[Path], dict[str, float]]


# ---------------------------------------------------------------------------
# Evaluators


def load_evaluator(ref: str | Evaluator) -> Evaluator:
    """A callable, or ``"module:function"`` naming one."""
    if callable(ref):
        return ref
    mod, _, name = str(ref).partition(":")
    if not mod or not name:
        raise TaskvecError(f"evaluator {ref!r}: expected 'module:function'")
    try:
        fn = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as exc:
        raise TaskvecError(f"evaluator {ref!r} not found ({exc})") from None
    return fn


def default_evaluator(model_dir: Path, params_file: str | os.PathLike | None = None) -> dict[str, float]:
    """Validation accuracy of every target and control task, through the harness (:class:`taskvec.suite.Suite`).

    The model's encoder is loaded once for all tasks. Heads come from the
    task's fine-tune output when present (``outputs/finetuned/<task>``), else
    from the model folder, else the base's zero-shot head (the base loaded at
    most once). The params file is validated with the pipeline's schema.
    """
    from taskvec.suite import Suite

    from pipeline.params import load as load_params

    params_file = params_file or os.environ.get("TASKVEC_PARAMS", "params.yaml")
    spec = load_spec(params_file)
    params = load_params(params_file)
    tasks = list(dict.fromkeys(spec.targets + spec.controls))
    finetuned = Path(params_file).resolve().parent / "outputs" / "finetuned"
    heads = {task: finetuned / task / "heads" / f"{task}.safetensors" for task in tasks}
    suite = Suite.load(model_dir, tasks, params, splits=("validation",), heads="resolve", head_paths={t: h for t, h in heads.items() if h.is_file()})
    return {task: float(acc) for task, acc in suite.accuracies().items()}


