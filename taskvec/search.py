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

Control constraint: ``max_control_drop`` (accuracy points) lets each control
task lose at most that much against its base accuracy, for negation (on top
of ``threshold``) and for addition with control tasks. ``details["constraint"]``
says whether the constraint was binding (the unconstrained best λ breaks it);
when no searched λ is feasible the search picks λ = 0, the base (one extra
evaluation if 0 is off the lattice), and says so instead of failing.

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
    control constraint. ``fallback`` is a λ known to be feasible (λ = 0, the
    base, under a ``max_control_drop`` constraint) that the search picks,
    saying so, when no evaluated λ is feasible.
    """

    name: str
    value: Callable[[Mapping[str, float]], float]
    maximize: bool
    feasible: Callable[[Mapping[str, float]], bool] = lambda metrics: True
    describe: dict = field(default_factory=dict)
    fallback: float | None = None

    def raw_key(self, metrics: Mapping[str, float]) -> float:
        """Higher is better, ignoring the constraint."""
        value = self.value(metrics)
        return value if self.maximize else -value

    def key(self, metrics: Mapping[str, float]) -> float:
        """Higher is better; infeasible λ rank below everything."""
        return self.raw_key(metrics) if self.feasible(metrics) else -math.inf


TOLERANCE = 1e-12  # accuracies compared with a floor: ignore float rounding of ``base - drop``


def control_floors(
    controls: Sequence[str], base: Mapping[str, float], *, threshold: float | None = None, max_control_drop: float | None = None
) -> dict[str, float]:
    """The lowest accuracy each control may reach: ``threshold × base`` and ``base − max_control_drop/100``, the stricter.

    ``max_control_drop`` is in accuracy *points* (percentage points: 2 = two points, 0.80 → 0.78).
    """
    if max_control_drop is not None and max_control_drop < 0:
        raise TaskvecError(f"max_control_drop must be ≥ 0 points, got {max_control_drop}")
    missing = [c for c in controls if c not in base]
    if missing:
        raise TaskvecError(f"no base accuracy for control task {missing[0]}")
    floors = {}
    for c in controls:
        candidates = [threshold * base[c]] if threshold is not None else []
        if max_control_drop is not None:
            candidates.append(base[c] - max_control_drop / 100)
        floors[c] = max(candidates) if candidates else -math.inf
    return floors


def _within(floors: Mapping[str, float]) -> Callable[[Mapping[str, float]], bool]:
    return lambda m: all(m[c] >= floor - TOLERANCE for c, floor in floors.items())


def addition_objective(
    tasks: Sequence[str],
    reference: Mapping[str, float],
    *,
    controls: Sequence[str] = (),
    base: Mapping[str, float] | None = None,
    max_control_drop: float | None = None,
) -> Objective:
    """Mean over ``tasks`` of accuracy / ``reference[task]`` (the task's fine-tuned accuracy).

    With ``controls`` (and their ``base`` accuracies), λ is feasible iff every
    control loses at most ``max_control_drop`` points; λ = 0 is the fallback.
    """
    missing = [task for task in tasks if not reference.get(task)]
    if missing:
        raise TaskvecError(f"addition needs a positive fine-tuned reference accuracy for task {missing[0]}")
    tasks = list(tasks)
    describe: dict = {"tasks": tasks, "reference": dict(reference)}
    if not controls:
        return Objective("addition", lambda m: float(np.mean([m[t] / reference[t] for t in tasks])), maximize=True, describe=describe)
    if base is None or max_control_drop is None:
        raise TaskvecError("addition with control tasks needs their base accuracies and max_control_drop")
    floors = control_floors(controls, base, max_control_drop=max_control_drop)
    describe |= {"controls": list(controls), "base": dict(base), "control_floor": floors, "max_control_drop": max_control_drop}
    return Objective(
        "addition",
        lambda m: float(np.mean([m[t] / reference[t] for t in tasks])),
        maximize=True,
        feasible=_within(floors),
        describe=describe,
        fallback=0.0,
    )


def negation_objective(
    targets: Sequence[str],
    controls: Sequence[str],
    base: Mapping[str, float],
    threshold: float = 0.95,
    *,
    max_control_drop: float | None = None,
) -> Objective:
    """Mean target accuracy (minimised), feasible iff each control ≥ ``threshold`` × its base accuracy
    and, with ``max_control_drop``, loses at most that many points (then λ = 0 is the fallback)."""
    if not targets or not controls:
        raise TaskvecError("negation needs at least one target task and one control task")
    targets = list(targets)
    floors = control_floors(controls, base, threshold=threshold, max_control_drop=max_control_drop)
    describe = {"targets": targets, "controls": list(controls), "base": dict(base), "control_floor": floors, "threshold": threshold}
    if max_control_drop is not None:
        describe["max_control_drop"] = max_control_drop
    return Objective(
        "negation",
        lambda m: float(np.mean([m[t] for t in targets])),
        maximize=False,
        feasible=_within(floors),
        describe=describe,
        fallback=0.0 if max_control_drop is not None else None,
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

    details: dict = {"objective_details": objective.describe}
    best = _best(cached.cache, objective)
    if best is None and objective.fallback is not None:
        cached(objective.fallback)  # the known-feasible edit (λ = 0: the base); may add one evaluation
        best = _best(cached.cache, objective)
        if best is not None:
            details["constraint"] = {
                "feasible_found": False,
                "note": f"no searched λ keeps every control within its floor; picked the fallback λ = {best:g}",
            }
    if best is None:
        raise NoFeasibleLambda(f"no feasible λ: every evaluated λ breaks the {objective.name} constraint")
    unconstrained = min(cached.cache, key=lambda lam: (-objective.raw_key(cached.cache[lam]), lam))
    if "control_floor" in objective.describe and "constraint" not in details:
        binding = not objective.feasible(cached.cache[unconstrained])
        details["constraint"] = {"feasible_found": True, "binding": binding, "unconstrained_best_lambda": unconstrained}
        if binding:
            details["constraint"]["note"] = f"the control constraint is binding: λ = {unconstrained:g} scores better but breaks it; picked λ = {best:g}"
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
        details=details,
    )


def _best(cache: Mapping[float, Mapping[str, float]], objective: Objective) -> float | None:
    """The best feasible λ evaluated (ties: the smaller λ), or None."""
    best = min(cache, key=lambda lam: (-objective.key(cache[lam]), lam))
    return None if objective.key(cache[best]) == -math.inf else best
