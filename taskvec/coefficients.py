"""Per-task scaling coefficients: one λ per task vector, θ = θ_base + Σ_t λ_t·τ_t.

The global search (:mod:`taskvec.search`) scales a composed vector by one λ.
This module searches a λ *per vector* under a stated evaluation budget, with
the same objectives (:class:`taskvec.search.Objective`):

1. **diagonal phase** — the global golden-section search on the common λ
   (all λ_t equal; :func:`taskvec.search.search_lambda`), capped at half the
   budget; its best point is the start;
2. **coordinate phase** — :func:`coordinate_search`, a compass (pattern)
   search: for each coordinate in turn try ``λ_t + step`` then ``λ_t − step``
   (clipped to ``[lower, upper]``), move to the first strictly better point,
   and halve ``step`` after a sweep without improvement, until ``step`` falls
   below ``min_step`` or the budget is spent.

Budget: ``max_evals`` distinct evaluations in all (both phases; a point seen
twice is evaluated once — evaluations are cached by the rounded λ tuple).
Ties keep the current point (the smaller move). Infeasible points (key −∞)
never win. The evaluation callable is injectable (``λ tuple -> metrics``), so
the algorithm is tested on hand-built score functions.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from taskvec.config import SearchSpec
from taskvec.errors import TaskvecError
from taskvec.search import NoFeasibleLambda, Objective, SearchResult, search_lambda

Point = tuple[float, ...]


def _point(values: Sequence[float]) -> Point:
    return tuple(round(float(v), 12) for v in values)


class BudgetSpent(Exception):
    """A new evaluation would exceed the budget."""


@dataclass
class PointCache:
    """Memoise ``evaluate(point)`` by the rounded point; refuse to go past ``max_evals`` distinct points."""

    evaluate: Callable[[Point], Mapping[str, float]]
    max_evals: int
    cache: dict[Point, dict[str, float]] = field(default_factory=dict)

    def __call__(self, point: Sequence[float]) -> dict[str, float]:
        key = _point(point)
        if key not in self.cache:
            if len(self.cache) >= self.max_evals:
                raise BudgetSpent
            self.cache[key] = dict(self.evaluate(key))
        return self.cache[key]


@dataclass
class CoordinateResult:
    best: Point
    best_key: float
    path: list[Point]  # the accepted points, start first
    budget_exhausted: bool


def coordinate_search(
    key: Callable[[Point], float],
    start: Sequence[float],
    *,
    step: float,
    min_step: float,
    lower: float,
    upper: float,
) -> CoordinateResult:
    """Compass search maximising ``key`` from ``start`` (see the module docstring).

    ``key`` may raise :class:`BudgetSpent`; the search then stops and returns
    the best point so far with ``budget_exhausted=True``.
    """
    if step <= 0 or min_step <= 0:
        raise TaskvecError(f"coordinate search needs positive steps, got step={step}, min_step={min_step}")
    if not lower < upper:
        raise TaskvecError(f"coordinate search needs lower < upper, got [{lower}, {upper}]")
    x = _point(min(max(v, lower), upper) for v in start)
    path = [x]
    try:
        fx = key(x)
    except BudgetSpent:
        return CoordinateResult(x, -math.inf, path, True)
    exhausted = False
    try:
        while step >= min_step:
            improved = False
            for i in range(len(x)):
                for direction in (1.0, -1.0):
                    value = min(max(x[i] + direction * step, lower), upper)
                    y = _point((*x[:i], value, *x[i + 1 :]))
                    if y == x:
                        continue
                    fy = key(y)
                    if fy > fx:
                        x, fx, improved = y, fy, True
                        path.append(x)
                        break
            if not improved:
                step /= 2
    except BudgetSpent:
        exhausted = True
    return CoordinateResult(x, fx, path, exhausted)


def suite_evaluator(suite, taus: Sequence[Mapping], split: str, tasks: Sequence[str], measure: Callable[[], dict[str, float]] | None = None) -> Callable[[Point], dict[str, float]]:
    """``λ tuple -> metrics`` of θ_base + Σ_t λ_t·τ_t on a :class:`taskvec.suite.Suite` (weights restored after each).

    ``measure`` (e.g. a :class:`taskvec.search_run.SuiteMetrics`, which adds
    each control's paired standard error, so the control constraint is
    checked on its upper bound) scores the edited encoder; by default its
    accuracies on ``split``/``tasks``.
    """
    from taskvec.search_run import compose

    def evaluate(point: Point) -> dict[str, float]:
        with suite.editor(compose(list(zip(taus, point, strict=True)))) as editor:
            editor.apply(1.0)
            return measure() if measure is not None else suite.accuracies(split, tasks)

    return evaluate


def per_task_search(
    evaluate: Callable[[Point], Mapping[str, float]],
    n: int,
    objective: Objective,
    spec: SearchSpec,
    *,
    labels: Sequence[str] | None = None,
    start: float | None = None,
) -> SearchResult:
    """Search one λ per vector (``n`` vectors) in at most ``spec.max_evals`` evaluations.

    ``evaluate(λ tuple)`` returns per-task accuracies of θ_base + Σ λ_t τ_t.
    The lattice of ``spec`` (``grid_points`` on [lambda_min, lambda_max])
    gives the diagonal phase its candidates and the coordinate phase its
    bounds and steps: from twice the lattice spacing down to a quarter of it.
    The result's ``best_lambda`` is the mean λ; ``details["lambdas"]`` the
    per-vector λ (keyed by ``labels`` when given), ``details["phases"]`` the
    evaluations spent on each phase. With ``start`` (e.g. a global λ already
    searched) the diagonal phase is skipped and every λ_t starts there.
    """
    if n < 1:
        raise TaskvecError("per-task search needs at least one vector")
    if labels is not None and len(labels) != n:
        raise TaskvecError(f"per-task search got {len(labels)} labels for {n} vectors")
    started = time.perf_counter()
    cached = PointCache(evaluate, spec.max_evals)
    diagonal_budget = max(1, spec.max_evals // 2)
    diagonal_spec = spec.model_copy(update={"strategy": "golden", "max_evals": diagonal_budget})
    if start is not None:
        origin: Point = (float(start),) * n
    else:
        try:
            origin = (search_lambda(lambda lam: cached((lam,) * n), objective, diagonal_spec).best_lambda,) * n
        except NoFeasibleLambda:
            origin = (objective.fallback if objective.fallback is not None else spec.lambda_min,) * n
    after_diagonal = len(cached.cache)
    spacing = (spec.lambda_max - spec.lambda_min) / (spec.grid_points - 1)

    def key(point: Point) -> float:
        return objective.key(cached(point))

    found = coordinate_search(key, origin, step=2 * spacing, min_step=spacing / 4, lower=spec.lambda_min, upper=spec.lambda_max)
    feasible = [p for p, m in cached.cache.items() if objective.feasible(m)]
    if not feasible:
        raise NoFeasibleLambda(f"no feasible per-task λ: every evaluated point breaks the {objective.name} constraint")
    best = min(feasible, key=lambda p: (-objective.key(cached.cache[p]), sum(abs(v) for v in p), p))
    names = list(labels) if labels is not None else [str(i) for i in range(n)]
    evaluations = [
        {"lambda": sum(p) / n, "lambdas": dict(zip(names, p, strict=True)), "score": objective.value(m), "feasible": bool(objective.feasible(m)), "metrics": m}
        for p, m in cached.cache.items()
    ]
    return SearchResult(
        strategy="per_task",
        objective=objective.name,
        best_lambda=sum(best) / n,
        best_score=objective.value(cached.cache[best]),
        best_metrics=cached.cache[best],
        evaluations=evaluations,
        seconds=time.perf_counter() - started,
        budget_exhausted=found.budget_exhausted,
        details={
            "lambdas": dict(zip(names, best, strict=True)),
            "start": dict(zip(names, origin, strict=True)),
            "phases": {"diagonal": after_diagonal, "coordinate": len(cached.cache) - after_diagonal},
            "max_evals": spec.max_evals,
            "objective_details": objective.describe,
        },
    )
