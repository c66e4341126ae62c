"""λ search: strategies on known curves, negation's constraint, caching, exact in-place restore, outputs."""

from __future__ import annotations

import csv
import json
import math
from statistics import NormalDist

import pytest
import torch

from taskvec.config import SearchSpec
from taskvec.errors import HomologyError, TaskvecError
from taskvec.heads import load_encoder
from taskvec.search import CachedEvaluator, Objective, addition_objective, drop_se_key, lattice, negation_objective, paired_drop_se, search_lambda
from taskvec.search_run import compose, run_search, write_outputs
from taskvec.suite import WeightEditor
from tests.conftest_tasks import data_dir, params, tiny_model  # noqa: F401 - fixtures

SPEC = SearchSpec()
GRID = SearchSpec(strategy="grid")


def peaked(peak: float, width: float = 0.6):
    """A unimodal accuracy curve for one task with its maximum at ``peak``."""
    return lambda lam: {"a": 0.9 - (lam - peak) ** 2 / width, "b": 0.5}


ADD = addition_objective(["a"], {"a": 0.9})


@pytest.mark.parametrize("peak", [0.0, 0.05, 0.23, 0.4, 0.5, 0.61, 0.77, 0.95, 1.0, 1.3, -0.2])
def test_golden_lands_within_005_of_the_grid_best_in_at_most_8_evaluations(peak):
    grid = search_lambda(peaked(peak), ADD, GRID)
    smart = search_lambda(peaked(peak), ADD, SPEC)
    assert len(grid.evaluations) == 21
    assert grid.best_lambda == pytest.approx(min(max(round(peak * 20) / 20, 0.0), 1.0))
    assert len(smart.evaluations) <= 8 and not smart.budget_exhausted
    assert abs(smart.best_lambda - grid.best_lambda) <= 0.05 + 1e-9
    assert smart.best_score == pytest.approx(ADD.value(peaked(peak)(smart.best_lambda)))


def test_addition_score_is_mean_normalised_accuracy():
    objective = addition_objective(["a", "b"], {"a": 0.8, "b": 0.5})
    assert objective.value({"a": 0.4, "b": 0.5}) == pytest.approx((0.5 + 1.0) / 2)
    with pytest.raises(TaskvecError, match="reference accuracy for task b"):
        addition_objective(["a", "b"], {"a": 0.8})


def negation_curve(lam: float) -> dict[str, float]:
    # Target accuracy falls with λ; control accuracy stays flat, then drops past λ = 0.62.
    return {"toxic": 0.9 - 0.6 * lam, "control": 0.8 if lam <= 0.5 else 0.8 - 0.5 * (lam - 0.5)}


@pytest.mark.parametrize("spec", [SPEC, GRID])
def test_negation_respects_the_control_constraint(spec):
    evaluate = CachedEvaluator(negation_curve)
    objective = negation_objective(["toxic"], ["control"], evaluate(0.0), max_control_drop=4)
    result = search_lambda(evaluate, objective, spec)
    # control loses ≤ 4 points ⇔ 0.5(λ − 0.5) ≤ 0.04 ⇔ λ ≤ 0.58, so the largest feasible lattice point is 0.55.
    assert result.best_lambda == pytest.approx(0.55)
    assert result.best_metrics["control"] >= 0.8 - 0.04
    assert result.best_score == pytest.approx(0.9 - 0.6 * 0.55)
    assert len(result.evaluations) <= (8 if spec is SPEC else 21)
    infeasible = [e for e in result.evaluations if not e["feasible"]]
    assert infeasible and all(e["lambda"] > 0.55 for e in infeasible)


def test_an_objective_without_a_feasible_fallback_is_refused():
    objective = Objective("negation", lambda m: m["toxic"], maximize=False, feasible=lambda m: False)
    with pytest.raises(TaskvecError, match="no feasible λ"):
        search_lambda(negation_curve, objective, SPEC)


@pytest.mark.parametrize("max_evals", [3, 4, 5])
def test_evaluations_are_cached_and_the_budget_holds(max_evals):
    calls = []

    def evaluate(lam):
        calls.append(lam)
        return {"a": math.sin(40 * lam)}  # far from unimodal

    cached = CachedEvaluator(evaluate)
    cached(0.5), cached(0.5)
    assert calls == [0.5]
    result = search_lambda(cached, ADD, SearchSpec(max_evals=max_evals))
    assert len(calls) == len(result.evaluations) == max_evals and result.budget_exhausted


def test_lattice_and_bad_strategy():
    assert lattice(SPEC) == pytest.approx([i / 20 for i in range(21)])
    assert lattice(SearchSpec(grid_points=5, lambda_min=-1, lambda_max=1)) == [-1.0, -0.5, 0.0, 0.5, 1.0]
    with pytest.raises(TaskvecError, match="unknown search strategy"):
        search_lambda(peaked(0.5), ADD, SPEC, strategy="random")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_in_place_edits_restore_the_base_exactly(tiny_model, dtype):
    encoder, _, _ = load_encoder(tiny_model)
    encoder.to(dtype)
    before = {name: t.clone() for name, t in encoder.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    tau = {name: torch.randn(t.shape, generator=gen) * 0.01 for name, t in before.items() if name.startswith("encoder.layer.0")}
    ids_before = {name: t.data_ptr() for name, t in encoder.state_dict().items()}
    with WeightEditor(encoder, tau) as editor:
        for lam in (0.3, 1.0, -0.7):
            editor.apply(lam)
            state = encoder.state_dict()
            for name, delta in tau.items():
                assert torch.equal(state[name], (before[name].float() + delta * lam).to(dtype))  # the product rounded, then the sum: `taskvec apply`'s bits
            assert torch.equal(state["embeddings.word_embeddings.weight"], before["embeddings.word_embeddings.weight"])
    after = encoder.state_dict()
    assert all(torch.equal(after[name], before[name]) for name in before)
    assert {name: t.data_ptr() for name, t in after.items()} == ids_before  # same storage: edited in place


def test_editor_refuses_foreign_vectors(tiny_model):
    encoder, _, _ = load_encoder(tiny_model)
    with pytest.raises(HomologyError, match="'nope' is not in the model"):
        WeightEditor(encoder, {"nope": torch.zeros(1)})
    with pytest.raises(HomologyError, match="has shape"):
        WeightEditor(encoder, {"pooler.dense.bias": torch.zeros(3)})


def test_compose_weights_and_checks_coverage():
    a, b = {"w": torch.ones(2)}, {"w": torch.full((2,), 2.0)}
    assert torch.equal(compose([(a, 1.0), (b, -0.5)])["w"], torch.zeros(2))
    with pytest.raises(HomologyError):
        compose([(a, 1.0), ({"v": torch.ones(2)}, 1.0)])


def test_outputs_csv_png_json(tmp_path):
    result = search_lambda(peaked(0.3), ADD, SPEC)
    out = write_outputs(result, tmp_path / "search")
    rows = list(csv.DictReader((out / "curve.csv").open()))
    assert [float(r["lambda"]) for r in rows] == sorted(e["lambda"] for e in result.evaluations)
    assert set(rows[0]) == {"lambda", "score", "feasible", "a", "b"}
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "search.json").read_text())
    assert saved["best_lambda"] == pytest.approx(0.3) and saved["n_evals"] == len(result.evaluations)


def test_run_search_on_a_real_model(tiny_model, params):
    encoder, _, _ = load_encoder(tiny_model)
    gen = torch.Generator().manual_seed(1)
    tau = {name: torch.randn(t.shape, generator=gen) * 0.05 for name, t in encoder.state_dict().items()}
    result = run_search(tiny_model, [(tau, 1.0)], "addition", ["senti"], params, progress=False)
    assert len(result.evaluations) <= 8
    reference = result.details["objective_details"]["reference"]["senti"]
    at_one = [e for e in result.evaluations if e["lambda"] == 1.0]
    if at_one:  # θ + 1·τ is the "fine-tuned" model whose accuracy is the reference
        assert at_one[0]["metrics"]["senti"] == pytest.approx(reference)
    accuracies = [e["metrics"]["senti"] for e in result.evaluations]
    assert result.best_score == pytest.approx(max(accuracies) / reference)
    negation = run_search(tiny_model, [(tau, 1.0)], "negation", ["senti"], params, controls=["senti"], strategy="grid", progress=False)
    assert len(negation.evaluations) == 21 and negation.evaluations[0]["lambda"] == 0.0


def test_run_search_refusals(tiny_model, params):
    with pytest.raises(TaskvecError, match="unknown objective"):
        run_search(tiny_model, [({}, 1.0)], "multiply", ["senti"], params)
    with pytest.raises(TaskvecError, match="got 2 vectors for 1 tasks"):
        run_search(tiny_model, [({}, 1.0), ({}, 1.0)], "addition", ["senti"], params)
    with pytest.raises(TaskvecError, match="mlm task"):
        run_search(tiny_model, [({}, 1.0)], "negation", ["senti_lm"], params, controls=["senti"])


# --- max_control_drop: a control task may lose at most that many points, judged with its uncertainty ----


@pytest.mark.parametrize("spec", [SPEC, GRID])
def test_negation_max_control_drop_picks_the_best_feasible_lambda_and_says_the_constraint_binds(spec):
    evaluate = CachedEvaluator(negation_curve)
    # 2 points: 0.5(λ − 0.5) ≤ 0.02 ⇔ λ ≤ 0.54.
    objective = negation_objective(["toxic"], ["control"], evaluate(0.0), max_control_drop=2)
    result = search_lambda(evaluate, objective, spec)
    assert result.best_lambda == pytest.approx(0.5)
    constraint = result.details["constraint"]
    assert constraint["binding"] and constraint["feasible_found"] and constraint["unconstrained_best_lambda"] > 0.54
    assert "binding" in result.note and "picked λ = 0.5" in result.note
    assert constraint["drop_at_best"] == {"control": 0.0} and constraint["max_control_drop"] == 2
    assert all(e["feasible"] == (e["lambda"] <= 0.54) for e in result.evaluations)


def se_curve(lam: float) -> dict[str, float]:
    """The control loses λ points (0.8 → 0.79 at λ = 1) with a paired standard error of 0.3·λ points."""
    return {"t": 0.9 - 0.5 * lam, "c": 0.8 - 0.01 * lam, drop_se_key("c"): 0.003 * lam}


def test_the_bound_adds_z_times_the_paired_standard_error():
    z = NormalDist().inv_cdf(0.95)
    objective = negation_objective(["t"], ["c"], {"t": 0.9, "c": 0.8}, max_control_drop=1)
    # bound(λ) = λ + z·0.3·λ = 1.4935·λ points ≤ 1 ⇔ λ ≤ 0.6696: 0.65 is the last lattice point
    assert objective.constraint.bound(se_curve(0.65), "c") == pytest.approx(0.65 * (1 + 0.3 * z))
    result = search_lambda(se_curve, objective, GRID)
    assert result.best_lambda == pytest.approx(0.65)
    report = result.details["constraint"]
    assert report["binding"] and report["unconstrained_best_lambda"] == 1.0
    assert report["drop_at_best"]["c"] == pytest.approx(0.65) and report["drop_bound_at_best"]["c"] == pytest.approx(0.65 * (1 + 0.3 * z))
    # the point estimate alone (no standard error reported) would allow every λ: the uncertainty is what binds
    point = search_lambda(lambda lam: {k: v for k, v in se_curve(lam).items() if "/" not in k}, objective, GRID)
    assert point.best_lambda == 1.0 and not point.details["constraint"]["binding"] and point.note is None
    # a lower confidence level loosens the bound: z(0.5) = 0, so λ = 1 (exactly 1 point) is feasible
    loose = search_lambda(se_curve, negation_objective(["t"], ["c"], {"t": 0.9, "c": 0.8}, max_control_drop=1, confidence=0.5), GRID)
    assert loose.best_lambda == 1.0


def test_paired_drop_se_is_the_standard_error_of_the_per_row_differences():
    base = [1, 1, 1, 1, 0, 0, 0, 0, 1, 1]
    now = [1, 1, 0, 1, 0, 1, 0, 0, 1, 1]  # one row lost, one gained: no drop, but uncertainty
    assert paired_drop_se(base, now) == pytest.approx(math.sqrt(2 / 9) / math.sqrt(10))
    assert paired_drop_se(base, base) == 0.0 and paired_drop_se([1], [0]) == 0.0
    with pytest.raises(TaskvecError, match="paired rows differ"):
        paired_drop_se([1, 0], [1])


def test_max_control_drop_is_inclusive_and_a_loose_one_does_not_bind():
    curve = lambda lam: {"t": 0.9 - 0.5 * lam, "c": 0.8 - 0.1 * lam}  # noqa: E731 - control loses 2 points at λ = 0.2
    tight = search_lambda(curve, negation_objective(["t"], ["c"], curve(0.0), max_control_drop=2), GRID)
    assert tight.best_lambda == pytest.approx(0.2)  # exactly 2 points lost is allowed
    loose = search_lambda(curve, negation_objective(["t"], ["c"], curve(0.0), max_control_drop=50), GRID)
    report = loose.details["constraint"]
    assert loose.best_lambda == 1.0 and report["feasible_found"] and not report["binding"] and loose.note is None


def test_when_no_edit_is_feasible_the_search_says_so_and_picks_lambda_zero():
    calls = []

    def curve(lam):
        calls.append(lam)
        return {"t": 0.9 - 0.5 * lam, "c": 0.8 - 0.5 * lam}  # every λ > 0.02 loses more than one point

    spec = SearchSpec(lambda_min=0.2, lambda_max=1.0, grid_points=5)
    result = search_lambda(curve, negation_objective(["t"], ["c"], {"t": 0.9, "c": 0.8}, max_control_drop=1), spec)
    assert result.best_lambda == 0.0 and result.best_metrics == {"t": 0.9, "c": 0.8}
    assert calls[-1] == 0.0 and 0.0 not in lattice(spec)  # evaluated once more, after the search
    assert result.details["constraint"]["feasible_found"] is False
    assert result.note == "no searched λ ≠ 0 keeps every control within 1 points (95% upper bound of the drop); picked λ = 0 (the base: no edit)"
    assert result.to_dict()["constraint"]["feasible_found"] is False  # what search.json / best.json carry


@pytest.mark.parametrize("spec", [SPEC, GRID])
def test_addition_with_a_control_task(spec):
    curve = lambda lam: {"a": 0.9 - (lam - 0.8) ** 2, "c": 0.8 if lam <= 0.3 else 0.8 - 0.2 * (lam - 0.3)}  # noqa: E731
    objective = addition_objective(["a"], {"a": 0.9}, controls=["c"], base={"c": 0.8}, max_control_drop=5)
    result = search_lambda(curve, objective, spec)
    # c ≥ 0.75 ⇔ λ ≤ 0.55; the accuracy of a rises up to λ = 0.8, so the best feasible λ is 0.55.
    assert result.best_lambda == pytest.approx(0.55)
    assert result.details["constraint"]["binding"]
    assert result.best_score == pytest.approx(curve(result.best_lambda)["a"] / 0.9)
    with pytest.raises(TaskvecError, match="base accuracies and max_control_drop"):
        addition_objective(["a"], {"a": 0.9}, controls=["c"])
    with pytest.raises(TaskvecError, match="must be ≥ 0 points"):
        negation_objective(["t"], ["c"], {"c": 0.8}, max_control_drop=-1)
    with pytest.raises(TaskvecError, match="confidence must be in"):
        negation_objective(["t"], ["c"], {"c": 0.8}, confidence=1.0)
    with pytest.raises(TaskvecError, match="no base accuracy for control task c"):
        addition_objective(["a"], {"a": 0.9}, controls=["c"], base={}, max_control_drop=1)


def test_search_command_applies_max_control_drop_with_the_paired_bound(tiny_model, data_dir, tmp_path, capsys):
    """`taskvec search --max-control-drop`: every evaluation's feasibility is the bound rule recomputed from search.json,
    on the control's own row cap (search.control_rows)."""
    from tests.conftest_tasks import assert_bound_rule, negation_search, write_mirror

    write_mirror(data_dir / "ctrl", sizes=(16, 40, 8), seed=50)
    saved = negation_search(tiny_model, data_dir, tmp_path, capsys, "--max-control-drop", "0.5", "-S", "search.control_rows=32")
    assert saved["constraint"]["max_control_drop"] == 0.5
    assert saved["data"]["ctrl"]["rows_used"] == 32 and saved["data"]["senti"]["rows_used"] == 8  # controls get their own cap
    assert_bound_rule(saved, "ctrl", 0.5)
    assert saved["best_lambda"] in [e["lambda"] for e in saved["evaluations"] if e["feasible"]]


def test_the_searched_edit_has_the_bits_taskvec_apply_writes(tiny_model, tmp_path):
    """The λ search scores base + λ·τ in memory; the registered model is `taskvec apply`'s: the same bits."""
    from pipeline.steps.search import load_tau
    from taskvec import engine
    from taskvec.io import TensorSource
    from tests.conftest import perturb

    for dtype in (torch.float32, torch.bfloat16):
        root = tmp_path / str(dtype)
        encoder, _, _ = load_encoder(tiny_model)
        encoder.to(dtype).save_pretrained(root / "base")
        base = root / "base"
        ft = perturb(base, root / "ft", 1)
        engine.extract(base, ft, root / "v.safetensors")
        engine.apply(base, [(root / "v.safetensors", 0.37)], root / "applied")
        encoder, _, _ = load_encoder(base)
        written = TensorSource(root / "applied")
        with WeightEditor(encoder, load_tau(root / "v.safetensors", encoder)) as editor:
            editor.apply(0.37)
            state = encoder.state_dict()
            names = [n for n in written.names() if n in state]
            assert len(names) > 10
            for name in names:
                assert torch.equal(state[name].view(torch.uint8), written.read(name).view(torch.uint8)), name
