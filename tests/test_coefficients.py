"""Per-task λ search (taskvec.coefficients) on hand-built score functions: exact optima, budgets, constraints."""

from __future__ import annotations

import math

import pytest

from taskvec.coefficients import BudgetSpent, PointCache, coordinate_search, per_task_search
from taskvec.config import SearchSpec
from taskvec.errors import TaskvecError
from taskvec.search import NoFeasibleLambda, Objective, addition_objective, negation_objective

SPEC = SearchSpec(grid_points=11, lambda_min=0.0, lambda_max=2.0, max_evals=40)  # lattice spacing 0.2


def quadratic(centre):
    """Accuracies whose mean normalised value is maximal exactly at ``centre`` (reference 1 for every task)."""
    names = [f"t{i}" for i in range(len(centre))]

    def evaluate(point):
        return {n: 1.0 - (v - c) ** 2 for n, v, c in zip(names, point, centre)}

    return names, evaluate


def test_coordinate_search_finds_a_separable_optimum_on_the_step_lattice():
    calls = []

    def key(p):
        calls.append(p)
        return -((p[0] - 0.7) ** 2) - (p[1] - 1.3) ** 2

    res = coordinate_search(key, (1.0, 1.0), step=0.4, min_step=0.05, lower=0.0, upper=2.0)
    # 1.0 → steps 0.4, 0.2, 0.1 reach 0.7 and 1.3 exactly (rounded to 12 decimals)
    assert res.best == (0.7, 1.3)
    assert not res.budget_exhausted
    assert res.path[0] == (1.0, 1.0) and res.path[-1] == (0.7, 1.3)
    values = [key(p) for p in res.path]
    assert all(b > a for a, b in zip(values, values[1:]))  # every accepted move strictly improves
    assert res.best_key == pytest.approx(0.0)


def test_coordinate_search_respects_bounds_and_keeps_the_start_on_ties():
    res = coordinate_search(lambda p: 5.0, (0.5, 0.5), step=0.2, min_step=0.1, lower=0.0, upper=1.0)
    assert res.best == (0.5, 0.5) and res.path == [(0.5, 0.5)]
    res = coordinate_search(lambda p: p[0], (0.9,), step=0.4, min_step=0.1, lower=0.0, upper=1.0)
    assert res.best == (1.0,)  # clipped at the upper bound, never beyond


def test_coordinate_search_stops_at_the_budget_with_the_best_point_so_far():
    cache = PointCache(lambda p: {"v": -abs(p[0] - 2.0)}, max_evals=3)
    res = coordinate_search(lambda p: cache(p)["v"], (0.0,), step=0.5, min_step=0.01, lower=0.0, upper=2.0)
    assert res.budget_exhausted
    assert len(cache.cache) == 3
    assert res.best == (1.0,)  # 0 → 0.5 → 1.0, then the budget is spent


def test_point_cache_counts_distinct_points_only():
    seen = []
    cache = PointCache(lambda p: seen.append(p) or {"a": 1.0}, max_evals=2)
    cache((0.1, 0.2))
    cache((0.1000000000001, 0.2))  # rounds to the same point
    cache((0.3, 0.2))
    assert seen == [(0.1, 0.2), (0.3, 0.2)]
    with pytest.raises(BudgetSpent):
        cache((0.5, 0.5))


def test_per_task_search_reaches_distinct_per_task_optima_within_budget():
    names, evaluate = quadratic((0.4, 1.2, 0.8))
    objective = addition_objective(names, {n: 1.0 for n in names})
    res = per_task_search(evaluate, 3, objective, SPEC, labels=names)
    assert res.strategy == "per_task"
    assert res.details["lambdas"] == {"t0": 0.4, "t1": 1.2, "t2": 0.8}
    assert res.best_score == pytest.approx(1.0)
    assert res.best_lambda == pytest.approx(0.8)
    assert len(res.evaluations) <= SPEC.max_evals
    phases = res.details["phases"]
    assert phases["diagonal"] + phases["coordinate"] == len(res.evaluations)
    assert phases["diagonal"] <= SPEC.max_evals // 2
    # the diagonal phase starts at the global golden-section optimum: mean of the centres on the lattice
    assert res.details["start"] == {"t0": 0.8, "t1": 0.8, "t2": 0.8}
    assert not res.budget_exhausted


def test_per_task_search_from_a_given_start_spends_everything_on_coordinates():
    names, evaluate = quadratic((0.4, 1.2))
    objective = addition_objective(names, {n: 1.0 for n in names})
    res = per_task_search(evaluate, 2, objective, SPEC, labels=names, start=0.8)
    assert res.details["start"] == {"t0": 0.8, "t1": 0.8}
    assert res.details["phases"]["diagonal"] == 0
    assert res.details["lambdas"] == {"t0": 0.4, "t1": 1.2}


def test_per_task_search_beats_the_global_lambda_exactly_by_the_known_margin():
    names, evaluate = quadratic((0.2, 1.8))
    objective = addition_objective(names, {n: 1.0 for n in names})
    res = per_task_search(evaluate, 2, objective, SPEC, labels=names)
    global_best = max(objective.value(evaluate((lam, lam))) for lam in [i * 0.2 for i in range(11)])
    assert global_best == pytest.approx(1.0 - 0.64)  # λ = 1.0: both 0.8 away
    assert res.best_score == pytest.approx(1.0)


def test_per_task_search_never_exceeds_a_small_budget():
    names, evaluate = quadratic((0.4, 1.2, 0.8, 1.6))
    objective = addition_objective(names, {n: 1.0 for n in names})
    spec = SPEC.model_copy(update={"max_evals": 9})
    calls = []

    def counted(p):
        calls.append(p)
        return evaluate(p)

    res = per_task_search(counted, 4, objective, spec, labels=names)
    assert len(calls) == len(set(calls)) <= 9
    assert res.budget_exhausted
    assert res.best_score >= max(e["score"] for e in res.evaluations if e["lambdas"]["t0"] == e["lambdas"]["t1"])


def test_per_task_search_keeps_the_control_constraint():
    # target t0 wants λ0 = 2; the control c falls below its floor once λ0 > 1.0
    def evaluate(p):
        return {"t0": 0.5 + 0.25 * p[0], "c": 0.9 if p[0] <= 1.0 else 0.5}

    objective = Objective("addition", lambda m: m["t0"], maximize=True, feasible=lambda m: m["c"] >= 0.85)
    res = per_task_search(evaluate, 1, objective, SPEC, labels=["t0"])
    assert res.details["lambdas"] == {"t0": 1.0}
    assert all(e["feasible"] or e["lambdas"]["t0"] > 1.0 for e in res.evaluations)


def test_per_task_search_with_nothing_feasible_raises():
    objective = Objective("x", lambda m: m["a"], maximize=True, feasible=lambda m: False)
    with pytest.raises(NoFeasibleLambda):
        per_task_search(lambda p: {"a": 1.0}, 2, objective, SPEC.model_copy(update={"max_evals": 6}))


def test_per_task_search_negation_minimises_the_target_under_the_control_floor():
    # target falls with λ; the control keeps ≥ 95 % of 0.8 only while λ ≤ 0.6
    def evaluate(p):
        return {"t": 0.9 - 0.3 * p[0], "c": 0.8 if p[0] <= 0.6 else 0.7}

    objective = negation_objective(["t"], ["c"], {"c": 0.8})
    res = per_task_search(evaluate, 1, objective, SPEC, labels=["t"])
    assert res.details["lambdas"] == {"t": 0.6}


def test_per_task_search_refuses_bad_arguments():
    names, evaluate = quadratic((0.4,))
    objective = addition_objective(names, {"t0": 1.0})
    with pytest.raises(TaskvecError):
        per_task_search(evaluate, 0, objective, SPEC)
    with pytest.raises(TaskvecError):
        per_task_search(evaluate, 1, objective, SPEC, labels=["a", "b"])
    with pytest.raises(TaskvecError):
        coordinate_search(lambda p: 0.0, (0.0,), step=0.0, min_step=0.1, lower=0.0, upper=1.0)
    assert math.isinf(coordinate_search(lambda p: (_ for _ in ()).throw(BudgetSpent()), (0.0,), step=0.1, min_step=0.1, lower=0, upper=1).best_key)


def test_search_spec_accepts_the_new_strategies():
    assert SearchSpec(strategy="per_task").strategy == "per_task"
    spec = SearchSpec(strategy="adamerging", adamerging={"steps": 5, "granularity": "task"})
    assert spec.adamerging.steps == 5 and spec.adamerging.granularity == "task"
    with pytest.raises(Exception):
        SearchSpec(strategy="bayes")
