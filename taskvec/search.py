"""Search the scaling coefficient λ of a task-vector composition.

The edited model is ``θ(λ) = θ_base + λ·τ`` (addition) or ``θ_base − λ·τ``
(negation). This module is the search algorithm only; running it on a real
model (one load, in-place edits by :class:`taskvec.suite.WeightEditor`,
outputs) is :mod:`taskvec.search_run`.

Objectives (the paper's, §3/§4 of Ilharco et al.):

* ``addition`` maximises the mean *normalised* accuracy over the tasks,
  accuracy / that task's fine-tuned accuracy;
* ``negation`` minimises the mean target accuracy.

Strategies, over the lattice ``linspace(lambda_min, lambda_max, grid_points)``
(the paper's 21 points on [0, 1]):

* ``grid`` evaluates every point;
* ``golden`` (default) is golden-section search on the lattice indices,
  reusing one probe per step, then sweeping the last ≤ 4 candidates. For a
  unimodal curve it returns exactly the grid's best point; on 21 points it
  needs at most 7 evaluations (8 with negation's base evaluation). It never
  exceeds ``max_evals``. Ties prefer the smaller λ (the smaller edit).

Control constraint — the one mechanism that protects control tasks
(:class:`ControlConstraint`, :func:`control_constraint`): a control may lose at
most ``max_control_drop`` accuracy *points* against the base, and the search
enforces it with its uncertainty. λ is feasible iff, for every control, the
one-sided upper confidence bound of its drop,
``100·(base − acc) + z·100·se`` with ``z`` the ``confidence`` quantile of the
normal (1.645 for 95 %), is ≤ ``max_control_drop``. ``se`` is the *paired*
standard error of the drop measured on the same rows as the base
(:func:`paired_drop_se`: the rows a λ flips, right → wrong and wrong → right),
reported by the evaluator under :func:`drop_se_key` (``"<control>/drop_se"``);
an evaluator that reports none gets the point estimate (se = 0). λ = 0 (the
base: no drop, no uncertainty) is always feasible: when no other λ is, the
search picks it and says so (``details["constraint"]``:
``feasible_found: false`` and a ``note``); when the constraint cuts off the
unconstrained best λ it says that too (``binding``).

Evaluations are cached by λ. The evaluation callable is injectable
(``λ -> {task: accuracy}``), so tests search known synthetic curves.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist

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
    control constraint (``constraint``, when there is one). ``fallback`` is a
    λ known to be feasible (λ = 0, the base, under a control constraint) that
    the search picks, saying so, when no evaluated λ is feasible.
    """

    name: str
    value: Callable[[Mapping[str, float]], float]
    maximize: bool
    feasible: Callable[[Mapping[str, float]], bool] = lambda metrics: True
    describe: dict = field(default_factory=dict)
    fallback: float | None = None
    constraint: ControlConstraint | None = None

    def raw_key(self, metrics: Mapping[str, float]) -> float:
        """Higher is better, ignoring the constraint."""
        value = self.value(metrics)
        return value if self.maximize else -value

    def key(self, metrics: Mapping[str, float]) -> float:
        """Higher is better; infeasible λ rank below everything."""
        return self.raw_key(metrics) if self.feasible(metrics) else -math.inf


TOLERANCE = 1e-9  # points: ignore float rounding when a bound equals max_control_drop
SE_SUFFIX = "/drop_se"


def drop_se_key(control: str) -> str:
    """The metrics key under which an evaluator reports a control's paired standard error of its drop."""
    return control + SE_SUFFIX


def paired_drop_se(base_correct: Sequence[bool], correct: Sequence[bool]) -> float:
    """Standard error of the accuracy drop ``mean(base_correct) − mean(correct)`` over the same rows.

    The per-row differences ``d_i = base_i − now_i`` ∈ {−1, 0, 1}; se = sd(d) / √n
    (sample sd, ddof = 1): only the rows a λ flips contribute, so a paired
    comparison is far tighter than two independent binomial errors.
    """
    base = np.asarray(base_correct, dtype=float)
    now = np.asarray(correct, dtype=float)
    if base.shape != now.shape or base.ndim != 1:
        raise TaskvecError(f"paired rows differ: {base.shape} vs {now.shape}")
    n = len(base)
    if n < 2:
        return 0.0
    return float(np.std(base - now, ddof=1) / math.sqrt(n))


@dataclass(frozen=True)
class ControlConstraint:
    """Every control may lose at most ``max_drop`` points against ``base``, at one-sided ``confidence``."""

    base: Mapping[str, float]
    max_drop: float
    confidence: float = 0.95

    @property
    def z(self) -> float:
        return NormalDist().inv_cdf(self.confidence)

    def drop(self, metrics: Mapping[str, float], control: str) -> float:
        """The point estimate of the drop, in points."""
        return 100 * (self.base[control] - metrics[control])

    def bound(self, metrics: Mapping[str, float], control: str) -> float:
        """The upper confidence bound of the drop, in points (se from the evaluator, else 0)."""
        return self.drop(metrics, control) + self.z * 100 * float(metrics.get(drop_se_key(control), 0.0))

    def bounds(self, metrics: Mapping[str, float]) -> dict[str, float]:
        return {c: self.bound(metrics, c) for c in self.base}

    def ok(self, metrics: Mapping[str, float]) -> bool:
        return all(b <= self.max_drop + TOLERANCE for b in self.bounds(metrics).values())

    def describe(self) -> dict:
        return {"controls": list(self.base), "base": dict(self.base), "max_control_drop": self.max_drop, "confidence": self.confidence, "z": round(self.z, 6)}


def control_constraint(controls: Sequence[str], base: Mapping[str, float], max_control_drop: float, *, confidence: float = 0.95) -> ControlConstraint:
    """A :class:`ControlConstraint` for ``controls`` (their base accuracies from ``base``); one-line errors."""
    if max_control_drop is None or max_control_drop < 0:
        raise TaskvecError(f"max_control_drop must be ≥ 0 points, got {max_control_drop}")
    if not 0.5 <= confidence < 1:
        raise TaskvecError(f"control confidence must be in [0.5, 1), got {confidence}")
    missing = [c for c in controls if c not in base]
    if missing:
        raise TaskvecError(f"no base accuracy for control task {missing[0]}")
    return ControlConstraint({c: float(base[c]) for c in controls}, float(max_control_drop), confidence)


def addition_objective(
    tasks: Sequence[str],
    reference: Mapping[str, float],
    *,
    controls: Sequence[str] = (),
    base: Mapping[str, float] | None = None,
    max_control_drop: float | None = None,
    confidence: float = 0.95,
) -> Objective:
    """Mean over ``tasks`` of accuracy / ``reference[task]`` (the task's fine-tuned accuracy).

    With ``controls`` (and their ``base`` accuracies), λ is feasible iff every
    control's drop bound is ≤ ``max_control_drop`` points; λ = 0 is the fallback.
    """
    missing = [task for task in tasks if not reference.get(task)]
    if missing:
        raise TaskvecError(f"addition needs a positive fine-tuned reference accuracy for task {missing[0]}")
    tasks = list(tasks)
    describe: dict = {"tasks": tasks, "reference": dict(reference)}
    value = lambda m: float(np.mean([m[t] / reference[t] for t in tasks]))  # noqa: E731
    if not controls:
        return Objective("addition", value, maximize=True, describe=describe)
    if base is None or max_control_drop is None:
        raise TaskvecError("addition with control tasks needs their base accuracies and max_control_drop")
    constraint = control_constraint(controls, base, max_control_drop, confidence=confidence)
    return Objective("addition", value, maximize=True, feasible=constraint.ok, describe=describe | {"constraint": constraint.describe()}, fallback=0.0, constraint=constraint)


def negation_objective(
    targets: Sequence[str],
    controls: Sequence[str],
    base: Mapping[str, float],
    *,
    max_control_drop: float = 1.0,
    confidence: float = 0.95,
) -> Objective:
    """Mean target accuracy (minimised), feasible iff every control's drop bound is ≤ ``max_control_drop`` points
    (λ = 0 is the fallback)."""
    if not targets or not controls:
        raise TaskvecError("negation needs at least one target task and one control task")
    targets = list(targets)
    constraint = control_constraint(controls, base, max_control_drop, confidence=confidence)
    return Objective(
        "negation",
        lambda m: float(np.mean([m[t] for t in targets])),
        maximize=False,
        feasible=constraint.ok,
        describe={"targets": targets, "constraint": constraint.describe()},
        fallback=0.0,
        constraint=constraint,
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

    @property
    def note(self) -> str | None:
        """The control constraint's one-line verdict when it mattered (no feasible edit, or binding), else None."""
        return self.details.get("constraint", {}).get("note")

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
    if best is None:
        raise NoFeasibleLambda(f"no feasible λ: every evaluated λ breaks the {objective.name} constraint")
    if objective.constraint is not None:
        details["constraint"] = _constraint_report(cached.cache, objective, best)
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


def _constraint_report(cache: Mapping[float, Mapping[str, float]], objective: Objective, best: float) -> dict:
    """Whether any edit (λ ≠ 0) keeps every control, whether the constraint cut off the unconstrained best, and a note."""
    constraint = objective.constraint
    assert constraint is not None
    unconstrained = min(cache, key=lambda lam: (-objective.raw_key(cache[lam]), lam))
    feasible_found = any(lam != 0 and objective.feasible(m) for lam, m in cache.items())
    binding = not objective.feasible(cache[unconstrained])
    report = {
        "feasible_found": feasible_found,
        "binding": binding,
        "unconstrained_best_lambda": unconstrained,
        "max_control_drop": constraint.max_drop,
        "confidence": constraint.confidence,
        "drop_at_best": {c: round(constraint.drop(cache[best], c), 6) for c in constraint.base},
        "drop_bound_at_best": {c: round(b, 6) for c, b in constraint.bounds(cache[best]).items()},
    }
    level = f"{constraint.confidence:.0%} upper bound"
    if not feasible_found:
        report["note"] = (
            f"no searched λ ≠ 0 keeps every control within {constraint.max_drop:g} points ({level} of the drop); "
            f"picked λ = {best:g}{' (the base: no edit)' if best == 0 else ''}"
        )
    elif binding:
        report["note"] = f"the control constraint is binding: λ = {unconstrained:g} scores better but a control may lose more than {constraint.max_drop:g} points ({level}); picked λ = {best:g}"
    return report


def _best(cache: Mapping[float, Mapping[str, float]], objective: Objective) -> float | None:
    """The best feasible λ evaluated (ties: the smaller λ), or None."""
    best = min(cache, key=lambda lam: (-objective.key(cache[lam]), lam))
    return None if objective.key(cache[best]) == -math.inf else best
