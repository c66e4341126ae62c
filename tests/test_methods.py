"""Merge methods: one module each, options declared once, one registry check used by engine, EditPlan and MethodSpec."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml
from pydantic import ValidationError

from benchmarks.paper.spec import MethodSpec
from benchmarks.paper.vectors import merge_vectors
from pipeline import params as P
from taskvec import algebra, methods
from taskvec.config import _first_error
from taskvec.engine import MergeOptions
from taskvec.errors import TaskvecError
from tests.conftest_pipeline import REPO


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_registry_declares_each_method_and_its_options():
    assert list(methods.METHODS) == ["sum", "ties", "dare", "dare_ties", "magnitude"]
    assert {name: m.option_names for name, m in methods.METHODS.items()} == {
        "sum": (),
        "ties": ("density",),
        "dare": ("drop", "seed"),
        "dare_ties": ("drop", "seed"),
        "magnitude": ("density",),
    }
    density, drop, seed = methods.OPTIONS["density"], methods.OPTIONS["drop"], methods.OPTIONS["seed"]
    assert (density.type, density.default, density.range) == (float, 1.0, "(0, 1]")
    assert (drop.type, drop.default, drop.range) == (float, 0.0, "[0, 1)")
    assert (seed.type, seed.default, seed.range) == (int, 0, "")
    assert "kept fraction" in density.help and "[0, 1)" in drop.help
    # each method's module exports its math and its declaration
    assert methods.METHODS["ties"] is methods.ties.METHOD and methods.METHODS["dare_ties"] is methods.dare.TIES_METHOD
    assert methods.ties.METHOD.options[0] is methods.magnitude.METHOD.options[0]  # density declared once
    assert algebra.ties is methods.ties.ties and algebra.dare_sum is methods.dare.dare_sum  # taskvec.algebra re-exports
    assert algebra.METHODS == ("sum", "ties", "dare", "dare_ties", "magnitude")


def test_validate_fills_defaults_and_keeps_values():
    assert methods.validate("ties", {"density": 0.25}) == {"density": 0.25, "drop": 0.0, "seed": 0}
    assert methods.validate("dare", {"drop": 0.5, "seed": 7}) == {"density": 1.0, "drop": 0.5, "seed": 7}
    # an option a method does not take is admitted at its default (how the CLI and params.yaml spell "not set")
    assert methods.validate("sum", {"density": 1.0, "drop": 0.0, "seed": 0}) == {"density": 1.0, "drop": 0.0, "seed": 0}
    with pytest.raises(TaskvecError, match="unknown merge option 'k'"):
        methods.validate("ties", {"k": 0.2})


def test_registry_merge_dispatches_to_each_module():
    taus, lams = [t(1.0, -2.0, 3.0), t(-4.0, 1.0, 1.0)], [1.0, 0.5]
    # sum: 1*(1,-2,3) + 0.5*(-4,1,1)
    assert torch.equal(methods.merge("sum", taus, lams), t(-1.0, -1.5, 3.5))
    # ties density 2/3 keeps 2 of 3 per vector: (0,-2,3) and (-2,0.5,0.5) scaled; signs: -2->-, -1.5->-, 3.5->+
    assert torch.equal(methods.merge("ties", taus, lams, density=2 / 3), t(-2.0, -2.0, 3.0))
    # magnitude density 1/3: (0,0,3) and (-4,0,0), then 1*… + 0.5*…
    assert torch.equal(methods.merge("magnitude", taus, lams, density=1 / 3), t(-2.0, 0.0, 3.0))
    # dare p = 0 keeps everything: the sum
    assert torch.equal(methods.merge("dare", taus, lams, drop=0.0, seeds=[1, 2]), t(-1.0, -1.5, 3.5))
    with pytest.raises(ValueError, match="one seed per vector"):
        methods.merge("dare_ties", taus, lams, drop=0.5, seeds=[1])


def test_engine_record_lists_the_options_the_method_takes():
    assert MergeOptions().record() == {"method": "sum"}
    assert MergeOptions("ties", density=0.3).record() == {"method": "ties", "density": 0.3}
    assert MergeOptions("magnitude", density=0.5).record() == {"method": "magnitude", "density": 0.5}
    assert list(MergeOptions("dare_ties", drop=0.5, seed=3).record().items()) == [("method", "dare_ties"), ("drop", 0.5), ("seed", 3)]


# (method, options, the registry's one-line message): bad ranges and options the method does not take
BAD = [
    ("sum", {"density": 0.5}, "--density applies to ties and magnitude, not sum"),
    ("sum", {"drop": 0.3}, "--drop applies to dare and dare_ties, not sum"),
    ("sum", {"seed": 3}, "--seed applies to dare and dare_ties, not sum"),
    ("ties", {"drop": 0.5}, "--drop applies to dare and dare_ties, not ties"),
    ("ties", {"density": 0.0}, "density must be the kept fraction in (0, 1] (k% / 100), got 0.0"),
    ("ties", {"density": 50.0}, "density must be the kept fraction in (0, 1] (k% / 100), got 50.0"),
    ("ties", {"seed": 1}, "--seed applies to dare and dare_ties, not ties"),
    ("magnitude", {"drop": 0.1}, "--drop applies to dare and dare_ties, not magnitude"),
    ("magnitude", {"density": 1.5}, "density must be the kept fraction in (0, 1] (k% / 100), got 1.5"),
    ("dare", {"density": 0.2}, "--density applies to ties and magnitude, not dare"),
    ("dare", {"drop": 1.0}, "DARE drop probability p must be in [0, 1), got 1.0"),
    ("dare_ties", {"drop": -0.1}, "DARE drop probability p must be in [0, 1), got -0.1"),
    ("dare_ties", {"density": 0.9}, "--density applies to ties and magnitude, not dare_ties"),
    ("mean", {}, "unknown merge method 'mean': choose one of sum, ties, dare, dare_ties, magnitude"),
]


def _engine_message(method, options) -> str:
    with pytest.raises(TaskvecError) as exc:
        MergeOptions(method=method, **options)
    return str(exc.value)


def _edit_plan_message(tmp_path, method, options) -> str:
    """Through the shipped params.yaml, its edit section set to this method and options."""
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    data["edit"].update(method=method, **options)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(TaskvecError) as exc:
        P.load(path)
    return str(exc.value)


def _method_spec_message(method, options) -> str:
    options = {k: v for k, v in options.items() if k != "seed"}
    with pytest.raises(ValidationError) as exc:
        MethodSpec(name="m", method=method, **options)
    return _first_error(exc.value)


@pytest.mark.parametrize("method, options, message", BAD, ids=[f"{m}-{'-'.join(o) or 'name'}" for m, o, _ in BAD])
def test_same_refusal_from_engine_edit_plan_and_method_spec(tmp_path, method, options, message):
    engine = _engine_message(method, options)
    assert engine == message
    edit = _edit_plan_message(tmp_path, method, options)
    assert "\n" not in edit and edit.startswith(str(tmp_path / "params.yaml") + ": edit")
    assert edit.endswith(": " + message), edit
    if set(options) <= {"seed"} and options:
        return  # the benchmark's MethodSpec has no seed option (the benchmark seed is global)
    spec = _method_spec_message(method, options)
    assert spec == message or spec == f"{next(iter(options), 'method')}: {message}", spec


def test_valid_options_are_accepted_by_all_three(tmp_path):
    MergeOptions("ties", density=0.2)
    MergeOptions("dare", drop=0.5, seed=4)
    assert MethodSpec(name="t", method="ties", density=0.2).density == 0.2
    assert MethodSpec(name="d", method="dare_ties", drop=0.5).drop == 0.5
    plan = P.EditPlan(learn=["a"], method="dare", drop=0.5, seed=4)
    assert plan.merge_options().record() == {"method": "dare", "drop": 0.5, "seed": 4}


def test_benchmark_merge_gives_the_seed_to_dare_only():
    torch.manual_seed(0)
    taus = [{"w": torch.randn(5, 4)}, {"w": torch.randn(5, 4)}]
    # sum with any benchmark seed: the plain sum (seed not applicable, not an error)
    assert torch.equal(merge_vectors(taus, MethodSpec(name="s", method="sum"), seed=9)["w"], taus[0]["w"] + taus[1]["w"])
    a = merge_vectors(taus, MethodSpec(name="d", method="dare", drop=0.5), seed=1)["w"]
    b = merge_vectors(taus, MethodSpec(name="d", method="dare", drop=0.5), seed=2)["w"]
    again = merge_vectors(taus, MethodSpec(name="d", method="dare", drop=0.5), seed=1)["w"]
    assert torch.equal(a, again) and not torch.equal(a, b)
    expected = MergeOptions("dare", drop=0.5, seed=1).combine("w", [taus[0]["w"], taus[1]["w"]], [1.0, 1.0])
    assert torch.equal(a, expected)


def test_registry_and_schemas_import_without_torch():
    code = "import sys, taskvec.methods, taskvec.config, taskvec.algebra, pipeline.params; assert 'torch' not in sys.modules, 'torch imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
