"""Step 4 — λ search: θ(λ) = θ₀ + λ·τ_edit scored on validation, best λ into ``outputs/search/``.

Objective (the paper's, generalised to a mixed plan), on the ``search.split``
split capped by ``eval.max_rows``:

* **learn / analogy targets** — mean *normalised* accuracy, acc(θ_λ) /
  acc(θ_ft) (the fine-tuned model of that task; a target without one is
  normalised by the base's zero-shot accuracy);
* **forget** — minus the mean accuracy relative to the base's;
* **control** — a constraint (the core's :class:`taskvec.search.ControlConstraint`):
  every control task may lose at most ``search.max_control_drop`` points
  against the base, judged by the ``search.control_confidence`` upper bound
  of its drop (paired standard error over ``search.control_rows`` rows). When
  no λ ≠ 0 meets it, λ = 0 is picked and the step says so (stderr and
  ``best.json``: ``control.feasible_found: false``, ``control.note``).

The search itself is the core's (:func:`taskvec.search.search_lambda`):
``search.strategy: grid`` scores the paper's grid of ``grid_points`` λ values
on [lambda_min, lambda_max]; ``golden`` runs golden-section search over the
same lattice with at most ``max_evals`` model evaluations. Scoring is the
harness's (:class:`taskvec.suite.Suite`: one encoder loaded once, on CUDA when
available); weights are updated in place by its
:class:`~taskvec.suite.WeightEditor` (θ₀ + λτ per covered tensor, base
restored exactly).

Writes ``curve.csv`` (λ, objective, feasible, ``acc/<task>``; the harness's
:func:`~taskvec.suite.write_curve`), ``curve.png`` and ``best.json`` (best λ, its scores, base and fine-tuned
references); the ``lambda`` plot and the ``search`` metrics of ``dvc.yaml``.

    python -m pipeline.steps.search --params params.yaml
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from pipeline import params as P
from pipeline.steps import EVAL_THREADS, pinned_threads
from taskvec.errors import TaskvecError

CURVE = "curve.csv"
PLOT = "curve.png"
BEST = "best.json"


def load_tau(path: Path, encoder) -> dict:
    """The composed vector as {state_dict name: float32 tensor}; names must be the encoder's."""
    from taskvec.vector import VectorFile

    state = encoder.state_dict()
    with VectorFile(path) as vf:
        missing = [n for n in vf.names if n not in state]
        if missing:
            raise TaskvecError(f"vector {path} has tensor {missing[0]!r} that the base encoder does not have")
        return {n: vf.read(n) for n in vf.names}


def edit_objective(p: P.PipelineParams, base: dict[str, float], ft: dict[str, float]):
    """The plan's objective: normalised target accuracy − relative forget accuracy; controls as the core's constraint."""
    from taskvec.search import Objective, control_constraint

    plan = p.edit
    targets = plan.target_tasks()

    def value(acc) -> float:
        parts = []
        if targets:
            parts.append(sum(acc[t] / max(ft.get(t, base[t]), 1e-9) for t in targets) / len(targets))
        if plan.forget:
            parts.append(-sum(acc[t] / max(base[t], 1e-9) for t in plan.forget) / len(plan.forget))
        return sum(parts)

    describe = {"targets": targets, "forget": list(plan.forget)}
    if not plan.control:
        return Objective("edit", value, maximize=True, describe=describe)
    constraint = control_constraint(plan.control, base, p.search.max_control_drop, confidence=p.search.control_confidence)
    return Objective("edit", value, maximize=True, feasible=constraint.ok, describe=describe | {"constraint": constraint.describe()}, fallback=0.0, constraint=constraint)


@pinned_threads(EVAL_THREADS)
def main(params_file: str | os.PathLike = P.DEFAULT_PARAMS) -> dict:
    import torch

    from taskvec.io import atomic_dir
    from taskvec.search import CachedEvaluator, NoFeasibleLambda, search_lambda
    from taskvec.search_run import SuiteMetrics, control_sets
    from taskvec.suite import Suite, write_curve

    from pipeline.portable import lineage
    from pipeline.steps.compose import VECTOR

    started = time.perf_counter()
    p = P.load(params_file)
    vector = P.edit_dir(p) / VECTOR
    if not vector.is_file():
        raise TaskvecError(f"composed vector not found: {vector} (run the compose step first)")
    plan = p.edit
    tasks = plan.eval_tasks()
    split = p.search.split
    where, sets = control_sets(p.search, plan.control, split)
    suite = Suite.load(p.base, tasks, p, splits=(split,), dtype=torch.float32, **sets)
    tau = load_tau(vector, suite.encoder)
    measure = SuiteMetrics(suite, split, tasks, plan.control, control_split=where)
    base_acc = measure.base
    ft_acc: dict[str, float] = {}
    for t in plan.target_tasks():
        folder = P.finetuned_dir(p, t)
        if folder.is_dir():
            ft_acc[t] = suite.score_model(folder, tasks=[t])[t]
    objective = edit_objective(p, base_acc, ft_acc)

    def evaluate(lam: float) -> dict[str, float]:
        editor.apply(lam)
        return measure()

    out = P.search_dir(p)
    extra, scaled = {}, {}
    cached = CachedEvaluator(evaluate)
    if plan.control:
        cached.cache[0.0] = measure.at_base()  # the base (θ + 0·τ), measured above
    with suite.editor(tau) as editor:
        try:
            if p.search.strategy in ("per_task", "adamerging"):  # learned coefficients: pipeline/steps/search_coeffs.py
                from pipeline.steps.search_coeffs import learned_search

                found, extra, scaled = learned_search(p, suite, objective, out, measure)
            else:
                found = search_lambda(cached, objective, p.search)
        except NoFeasibleLambda:
            raise TaskvecError(
                f"no coefficients keep every control task within search.max_control_drop = {p.search.max_control_drop} points "
                f"of its base accuracy; use search.strategy golden or grid (they fall back to λ = 0) or raise the limit"
            ) from None
    if found.note:
        print(f"search: control constraint: {found.note}", file=sys.stderr, flush=True)
    result = {
        "lambda": found.best_lambda,
        "objective": found.best_score,
        "accuracy": {t: found.best_metrics[t] for t in tasks},
        **({"control": found.details["constraint"]} if "constraint" in found.details else {}),
        "base_accuracy": base_acc,
        "finetuned_accuracy": ft_acc,
        "evaluations": len(found.evaluations),
        "strategy": p.search.strategy,
        "split": split,
        "vector_sha256": _sha(vector),
        "data": lineage(p, suite.lineage(split) | suite.lineage(where)),
    }
    result |= extra
    with atomic_dir(out) as tmp:
        if scaled:
            from pipeline.steps.search_coeffs import write_scaled

            result["vectors"] = write_scaled(p, tmp, out, scaled)
        write_curve(tmp, found, tasks=tasks, score_column="objective", task_prefix="acc/")
        (tmp / BEST).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    seconds = round(time.perf_counter() - started, 2)  # for MLflow metrics only: best.json holds no wall time
    return {"step": "search", "path": str(out), "best": str(out / BEST), "curve": str(out / CURVE), "plot": str(out / PLOT), **result, "seconds": seconds}


def _sha(path: Path) -> str:
    from taskvec.io import file_sha256

    return file_sha256(path)


if __name__ == "__main__":
    P.step_cli(main, sys.argv[1:], description=__doc__.splitlines()[0])
