"""Search the scaling coefficient λ of a task-vector composition.

The edited model is ``θ(λ) = θ_base + λ·τ`` (addition) or ``θ_base − λ·τ``
(negation). This module is the search algorithm only; running it on a real
model (one load, in-place edits by :class:`taskvec.suite.WeightEditor`,
outputs) is :mod:`taskvec.search_run`.

Objectives (the paper's, §3/§4 of Ilharco et al.):

* ``addition`` maximises the mean *normalised* accuracy over the tasks,
  accuracy / that task's fine-tuned accuracy;
* ``negation`` minimises the mean target accuracy subject to every control
  task keeping ≥ ``threshold`` (0.95) × its base accuracy; infeasible λ are
  excluded (they rank below every feasible λ).

Strategies, over the lattice ``linspace(lambda_min, lambda_max, grid_points)``
(the paper's 21 points on [0, 1]):

* ``grid`` evaluates every point;
* ``golden`` (default) is golden-section search on the lattice indices,
  reusing one probe per step, then sweeping the last ≤ 4 candidates. For a
  unimodal curve it returns exactly the grid's best point; on 21 points it
  needs at most 7 evaluations (8 with negation's base evaluation). It never
  exceeds ``max_evals``. Ties prefer the smaller λ (the smaller edit).

Evaluations are cached by λ. The evaluation callable is injectable
(``λ -> {task: accuracy}``), so tests search known synthetic curves.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from taskvec.config import SearchSpec
from taskvec.errors import TaskvecError

Evaluate = Callable[[float], dict[str, float]]
INV_PHI = (math.sqrt(5) - 1) / 2


@dataclass(frozen=True)
class Objective:
    """How a λ is scored from per-task accuracies.

    ``value`` is the natural quantity (mean normalised accuracy, or mean target
    accuracy); ``maximize`` says which way is better; ``feasible`` applies the
    control constraint.
    """

    name: str
    value: Callable[[Mapping[str, float]], float]
    maximize: bool
    feasible: Callable[[Mapping[str, float]], bool] = lambda metrics: True
    describe: dict = field(default_factory=dict)

    def key(self, metrics: Mapping[str, float]) -> float:
        """Higher is better; infeasible λ rank below everything."""
        if not self.feasible(metrics):
            return -math.inf
        value = self.value(metrics)
        return value if self.maximize else -value


def addition_objective(tasks: Sequence[str], reference: Mapping[str, float]) -> Objective:
    """Mean over ``tasks`` of accuracy / ``reference[task]`` (the task's fine-tuned accuracy)."""
    missing = [task for task in tasks if not reference.get(task)]
    if missing:
        raise TaskvecError(f"addition needs a positive fine-tuned reference accuracy for task {missing[0]}")
    tasks = list(tasks)
    return Objective(
        "addition",
        lambda m: float(np.mean([m[t] / reference[t] for t in tasks])),
        maximize=True,
        describe={"tasks": tasks, "reference": dict(reference)},
    )


def negation_objective(targets: Sequence[str], controls: Sequence[str], base: Mapping[str, float], threshold: float = 0.95) -> Objective:
    """Mean target accuracy (minimised), feasible iff each control ≥ ``threshold`` × its base accuracy."""
    if not targets or not controls:
        raise TaskvecError("negation needs at least one target task and one control task")
    targets, floors = list(targets), {c: threshold * base[c] for c in controls}
    return Objective(
        "negation",
        lambda m: float(np.mean([m[t] for t in targets])),
        maximize=False,
        feasible=lambda m: all(m[c] >= floor for c, floor in floors.items()),
        describe={"targets": targets, "controls": list(controls), "base": dict(base), "control_floor": floors, "threshold": threshold},
    )


class CachedEvaluator:
    """Memoise an evaluation callable by λ and record the order of evaluations."""

    def __init__(self, evaluate: Evaluate, progress: tqdm | None = None):
        self._evaluate = evaluate
        self._progress = progress
        self.cache: dict[float, dict[str, float]] = {}

    def __contains__(self, lam: float) -> bool:
        return round(float(lam), 12) in self.cache

    def __call__(self, lam: float) -> dict[str, float]:
        lam = round(float(lam), 12)
        if lam not in self.cache:
            self.cache[lam] = dict(self._evaluate(lam))
            if self._progress is not None:
                self._progress.update(1)
                self._progress.set_postfix(lam=f"{lam:.3g}")
        return self.cache[lam]


@dataclass
class SearchResult:
    """Best λ, its score and every evaluation (in evaluation order)."""

    strategy: str
    objective: str
    best_lambda: float
    best_score: float
    best_metrics: dict[str, float]
    evaluations: list[dict]
    seconds: float
    budget_exhausted: bool = False
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "strategy": self.strategy,
            "objective": self.objective,
            "best_lambda": self.best_lambda,
            "best_score": self.best_score,
            "best_metrics": self.best_metrics,
            "n_evals": len(self.evaluations),
            "evaluations": self.evaluations,
            "seconds": round(self.seconds, 3),
            "budget_exhausted": self.budget_exhausted,
            **self.details,
        }


def lattice(spec: SearchSpec) -> list[float]:
    """The candidate λ values: ``grid_points`` evenly spaced on [lambda_min, lambda_max]."""
    return [round(float(x), 12) for x in np.linspace(spec.lambda_min, spec.lambda_max, spec.grid_points)]


class NoFeasibleLambda(TaskvecError):
    """Every evaluated λ breaks the objective's constraint."""


class _BudgetSpent(Exception):
    """Raised when a search would need more than ``max_evals`` evaluations."""


def _golden(key: Callable[[int], float], n: int) -> None:
    """Golden-section search for the max of ``key`` over the indices 0..n-1 (unimodal ``key``)."""
    a, b, c, d = 0, n - 1, None, None
    while b - a >= 3:
        if c is None:
            c = b - round(INV_PHI * (b - a))
        if d is None:
            d = a + round(INV_PHI * (b - a))
        if c >= d:
            c, d = (a + b) // 2, (a + b) // 2 + 1
        if key(c) >= key(d):  # the max lies in [a, d-1]; c stays as the right probe
            b, d, c = d - 1, (c if a < c < d - 1 else None), None
        else:  # the max lies in [c+1, b]; d stays as the left probe
            a, c, d = c + 1, (d if c + 1 < d < b else None), None
    for index in range(a, b + 1):
        key(index)


def search_lambda(evaluate: Evaluate, objective: Objective, spec: SearchSpec, *, strategy: str | None = None) -> SearchResult:
    """Search λ on the lattice with ``strategy`` (default ``spec.strategy``).

    ``golden`` stops early (``budget_exhausted``) rather than exceed
    ``spec.max_evals`` distinct evaluations; ``grid`` evaluates every point.
    """
    strategy = strategy or spec.strategy
    if strategy not in ("golden", "grid"):
        raise TaskvecError(f"unknown search strategy {strategy!r} (golden | grid)")
    cached = evaluate if isinstance(evaluate, CachedEvaluator) else CachedEvaluator(evaluate)
    points = lattice(spec)
    started = time.perf_counter()

    def key(index: int) -> float:
        lam = points[index]
        if strategy == "golden" and lam not in cached and len(cached.cache) >= spec.max_evals:
            raise _BudgetSpent
        return objective.key(cached(lam))

    complete = True
    try:
        if strategy == "grid":
            for index in range(len(points)):
                key(index)
        else:
            _golden(key, len(points))
    except _BudgetSpent:
        complete = False
    seconds = time.perf_counter() - started

    ranked = sorted(cached.cache, key=lambda lam: (-objective.key(cached.cache[lam]), lam))
    best = ranked[0]
    if objective.key(cached.cache[best]) == -math.inf:
        raise NoFeasibleLambda(f"no feasible λ: every evaluated λ breaks the {objective.name} constraint")
    evaluations = [
        {
            "lambda": lam,
            "score": objective.value(metrics),
            "feasible": bool(objective.feasible(metrics)),
            "metrics": metrics,
        }
        for lam, metrics in cached.cache.items()
    ]
    return SearchResult(
        strategy=strategy,
        objective=objective.name,
        best_lambda=best,
        best_score=objective.value(cached.cache[best]),
        best_metrics=cached.cache[best],
        evaluations=evaluations,
        seconds=seconds,
        budget_exhausted=not complete,
        details={"objective_details": objective.describe},
    )
